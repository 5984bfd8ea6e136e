"""The /ui page in a real headless Chromium (Debian's chromium and chromium-driver), against a
real broker, a tiny-model node and a waitress front in threads. Nothing is downloaded: the
browser and its driver come from /usr/bin, and Selenium Manager is kept offline."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from http_front.auth import INVALID_KEY
from http_front.keys import KeyStore
from tests.conftest import Front, Stack

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "alice-ui-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT = 60.0


def require_browser() -> None:
    """Fail under CI, skip elsewhere, when the Debian browser packages are missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = f"{' and '.join(missing)} missing: apt-get install -y chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests need {message}", pytrace=False)
    pytest.skip(f"no headless browser ({message})")


def make_driver() -> webdriver.Chrome:
    """Headless Chromium from /usr/bin, with the browser console log kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)




@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module (each test starts from a fresh page and storage)."""
    require_browser()
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    driver = make_driver()
    yield driver
    driver.quit()
    if previous is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = previous


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Front]:
    """A stack serving flux1-dev, and a real waitress front on a random port."""
    keys = KeyStore.from_env([(KEY, "alice", ("generation", "readonly"))], None)
    stack = Stack(tmp_path_factory.mktemp("ui-stack"), tiny_models, ("flux1-dev",), keys=keys)
    server = Front(stack)
    yield server
    server.close()
    stack.close()


@pytest.fixture
def page(browser: webdriver.Chrome, front: Front) -> webdriver.Chrome:
    """/ui loaded at laptop width, with nothing in localStorage."""
    browser.set_window_size(1200, 900)
    browser.get(f"{front.url}/ui")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{front.url}/ui")
    browser.get_log("browser")  # start each test with an empty console log
    return browser


def wait(driver: webdriver.Chrome, condition: Callable[[webdriver.Chrome], Any], timeout: float = WAIT) -> Any:
    """WebDriverWait, polling often."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def by_id(driver: webdriver.Chrome, element_id: str) -> Any:
    return driver.find_element(By.ID, element_id)


def sign_in(driver: webdriver.Chrome, key: str = KEY) -> None:
    """Type the key, save it, and wait for the model list."""
    by_id(driver, "key").send_keys(key)
    by_id(driver, "save-key").click()
    if key == KEY:
        wait(driver, lambda d: "flux1-dev" in [o.text for o in Select(by_id(d, "model")).options])


def fill(driver: webdriver.Chrome, **fields: Any) -> None:
    for element_id, value in fields.items():
        box = by_id(driver, element_id)
        box.clear()
        box.send_keys(str(value))


def status(driver: webdriver.Chrome) -> str:
    return by_id(driver, "task-state").get_attribute("data-status") or ""


def task_id(driver: webdriver.Chrome) -> str:
    return wait(driver, lambda d: by_id(d, "task-id").get_attribute("data-task-id"))


def image_width(driver: webdriver.Chrome) -> int:
    return driver.execute_script("const i = document.getElementById('result-img');"
                                 "return i.complete && i.getAttribute('src') ? i.naturalWidth : 0;")


def security_console_errors(driver: webdriver.Chrome) -> list[str]:
    """Console messages about the Content-Security-Policy or Trusted Types."""
    return [e["message"] for e in driver.get_log("browser")
            if re.search(r"Content Security Policy|Trusted Type", e["message"], re.I)]


def task(front: Front, tid: str) -> dict[str, Any]:
    r = requests.get(f"{front.url}/task/{tid}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_text2img_completes_shows_the_image_and_lists_the_task(page: webdriver.Chrome, front: Front,
                                                               tmp_path: Path) -> None:
    sign_in(page)
    assert page.execute_script("return localStorage.getItem('genserve.apiKey')") == KEY
    fill(page, prompt="a red fox in fresh snow", width=64, height=64, steps=2, seed=7)
    by_id(page, "generate").click()
    tid = task_id(page)
    wait(page, lambda d: image_width(d) == 64)
    assert status(page) == "completed"
    assert by_id(page, "result-img").get_attribute("naturalHeight") == "64"
    link = by_id(page, "download")
    assert f"/task/{tid}/image?expires=" in link.get_attribute("href") and link.get_attribute("download")
    item = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#tasks li[data-task-id="{tid}"]'))[0]
    assert item.get_attribute("data-status") == "completed" and "a red fox in fresh snow" in item.text
    body = task(front, tid)
    assert body["status"] == "completed" and body["metadata"]["width"] == 64
    assert security_console_errors(page) == []
    shot = tmp_path / "ui.png"
    assert page.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_img2img_with_an_uploaded_file(page: webdriver.Chrome, front: Front, tmp_path: Path) -> None:
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source)
    sign_in(page)
    Select(by_id(page, "mode")).select_by_value("img2img")
    upload = by_id(page, "input_image")
    assert upload.is_displayed() and not by_id(page, "mask_image").is_displayed()
    upload.send_keys(str(source))
    fill(page, prompt="the same square as a watercolour", steps=2, strength=0.5)  # size from the input
    by_id(page, "generate").click()
    tid = task_id(page)
    wait(page, lambda d: image_width(d) == 64)
    body = task(front, tid)
    assert body["mode"] == "img2img" and body["status"] == "completed"


def test_cancel_a_running_task(page: webdriver.Chrome, front: Front) -> None:
    sign_in(page)
    fill(page, prompt="a very detailed city map", width=512, height=512, steps=100)
    by_id(page, "generate").click()
    tid = task_id(page)
    wait(page, lambda d: status(d) == "running" and "step" in by_id(d, "task-state").text)
    by_id(page, "cancel").click()
    wait(page, lambda d: status(d) == "cancelled")
    assert by_id(page, "task-state").text == "Cancelled."
    body = task(front, tid)
    assert body["status"] == "cancelled" and body["error_code"] == "cancelled"
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, f'#tasks li[data-task-id="{tid}"][data-status="cancelled"]'))


def test_errors_read_as_messages_not_json(page: webdriver.Chrome, tmp_path: Path) -> None:
    sign_in(page, "not-a-real-key-0123456789")
    error = wait(page, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"))
    assert INVALID_KEY in error.text and "{" not in error.text
    by_id(page, "forget-key").click()
    assert page.execute_script("return localStorage.getItem('genserve.apiKey')") is None
    assert by_id(page, "key").get_attribute("value") == ""
    # A server-side validation error, in the general {"error", "detail"} shape.
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is not an image")
    sign_in(page)
    wait(page, lambda d: not by_id(d, "error").is_displayed())
    Select(by_id(page, "mode")).select_by_value("img2img")
    by_id(page, "input_image").send_keys(str(bogus))
    fill(page, prompt="a cat", steps=2)
    by_id(page, "generate").click()
    error = wait(page, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"))
    assert "input_image" in error.text and "{" not in error.text


def test_no_horizontal_scrolling_on_a_phone(page: webdriver.Chrome, front: Front) -> None:
    requests.post(f"{front.url}/generate", headers=AUTH, timeout=10, json={
        "prompt": "a lighthouse " * 40, "width": 64, "height": 64, "num_inference_steps": 2, "async": True,
    }).raise_for_status()  # so that the task list has an entry with a long prompt
    sign_in(page)
    Select(by_id(page, "mode")).select_by_value("img2img")
    by_id(page, "add-lora").click()
    fill(page, prompt="x" * 300)
    try:
        page.set_window_size(375, 800)
        wait(page, lambda d: d.execute_script("return window.innerWidth") == 375, 10)
        wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#tasks li"))
        assert page.execute_script("return document.documentElement.scrollWidth") <= 375
        assert page.execute_script("return document.body.scrollWidth") <= 375
    finally:
        page.set_window_size(1200, 900)


def test_headers_and_assets(front: Front) -> None:
    r = requests.get(f"{front.url}/ui", timeout=10)  # no key: the page is public
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'", "form-action 'none'", "base-uri 'none'",
                      "require-trusted-types-for 'script'"):
        assert directive in csp
    assert "unsafe" not in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
    assert r.headers["Cache-Control"] == "no-cache"
    html = r.text
    assert '<meta name="viewport"' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html
    assets = {"ui.js": "text/javascript", "ui.css": "text/css"}
    for name, kind in assets.items():
        a = requests.get(f"{front.url}/ui/{name}", timeout=10)
        assert a.status_code == 200 and a.headers["Content-Type"].startswith(kind)
        assert a.headers["Cache-Control"] == "no-cache" and a.headers["X-Content-Type-Options"] == "nosniff"
        assert not re.search(r"https?://", a.text)  # nothing from another site
        if name.endswith(".js"):
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
                assert sink not in a.text
    assert requests.get(f"{front.url}/ui/app.py", timeout=10).status_code == 404
    assert requests.post(f"{front.url}/ui", timeout=10).status_code == 405
