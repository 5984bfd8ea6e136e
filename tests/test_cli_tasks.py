"""`genservectl generate` and `genservectl tasks`, against a real front (waitress in a thread) and a tiny-model node."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner
from PIL import Image

from genservectl.__main__ import cli
from http_front.keys import KeyStore
from tests.conftest import BIN, Front, Stack, wait_until

ALICE = "alice-cli-key-0123456789abcdef"
BOB = "bob-cli-key-0123456789abcdefgh"
SMALL = ["--width", "64", "--height", "64", "--steps", "3", "--seed", "7"]
LONG = {"prompt": "a long one", "width": 512, "height": 512, "num_inference_steps": 100, "async": True}




@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    keys = KeyStore.from_env([(ALICE, "alice", ("generation", "readonly")),
                              (BOB, "bob", ("generation", "readonly"))], None)
    s = Stack(tmp_path_factory.mktemp("cli-tasks"), tiny_models, ("flux1-dev",), keys=keys,
              node_overrides={"progress_interval": 0.0}, front_overrides={"rate_limit": 1_000_000})
    yield s
    s.close()


@pytest.fixture(scope="module")
def front(stack: Stack) -> Iterator[Front]:
    f = Front(stack)
    yield f
    f.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Popen'd CLIs, killed at teardown."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def env(url: str, key: str = ALICE) -> dict[str, str]:
    return {**os.environ, "GENSERVE_URL": url, "GENSERVE_API_KEY": key}


def ctl(front: Front, cwd: Path, *args: str, key: str = ALICE) -> subprocess.CompletedProcess:
    """Run the installed `genservectl` (stdout and stderr are pipes, not a TTY)."""
    return subprocess.run([str(BIN / "genservectl"), *args], env=env(front.url, key), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def invoke(front: Front, *args: str, key: str = ALICE) -> Any:
    """Run a command in-process (quicker than a subprocess)."""
    return CliRunner().invoke(cli, list(args), env={"GENSERVE_URL": front.url, "GENSERVE_API_KEY": key})


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def task_status(stack: Stack, task_id: str, key: str = ALICE) -> str:
    return stack.http.simulate_get(f"/task/{task_id}", headers=as_(key)).json["status"]


def submit(stack: Stack, body: dict[str, Any], key: str = ALICE) -> str:
    r = stack.http.simulate_post("/generate", json=body, headers=as_(key))
    assert r.status_code == 202, r.text
    return r.json["task_id"]


def start_ctl(front: Front, tmp_path: Path, procs: list, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `genservectl` in the background, stderr to a file; returns the process and that file."""
    err = tmp_path / f"stderr-{len(procs)}.txt"
    with err.open("w") as sink:
        proc = subprocess.Popen([str(BIN / "genservectl"), *args], env=env(front.url), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=sink, text=True)
    procs.append(proc)
    return proc, err


def running_task(err: Path) -> str:
    """The task id once the CLI's stderr says the task runs."""
    text = wait_until(lambda: "running on" in (t := err.read_text()) and t, 30, 0.05, "the task to run")
    return re.search(r"^task ([0-9a-f]{32})$", text, re.M)[1]


def test_generate_text2img_saves_the_png_and_logs_plain_progress(front: Front, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    r = ctl(front, tmp_path, "generate", "a red fox in snow", *SMALL, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    lines = r.stderr.splitlines()
    assert re.fullmatch(r"task [0-9a-f]{32}", lines[0]), r.stderr
    assert "running on test-node" in lines and lines[-1] == "step 3/3", r.stderr
    assert "\r" not in r.stderr  # not a TTY: plain lines only


def test_generate_img2img_webp_to_the_default_file(front: Front, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(source)
    r = ctl(front, tmp_path, "generate", "the same as a watercolour", "--mode", "img2img", "--input-image",
            str(source), "--steps", "4", "--format", "webp", "--lora", "cute_cat_lora:0.8")
    assert r.returncode == 0, r.stderr
    task_id = re.search(r"^task ([0-9a-f]{32})$", r.stderr, re.M)[1]
    assert r.stdout.strip() == f"{task_id}.webp"
    with Image.open(tmp_path / f"{task_id}.webp") as image:
        assert image.format == "WEBP" and image.size == (64, 48)  # the input's size


def test_bad_options_are_usage_errors_and_server_errors_are_readable(stack: Stack, front: Front,
                                                                      tmp_path: Path) -> None:
    before = len(stack.broker.broker.tasks)
    for bad in (["--lora", "cute_cat_lora"], ["--lora", "cute_cat_lora:heavy"], ["--lora", ":0.5"],
                ["--input-image", str(tmp_path / "missing.png")], ["--format", "gif"]):
        r = invoke(front, "generate", "a cat", *SMALL, *bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "Usage:" in r.output
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    r = invoke(front, "generate", "a cat", "--input-image", str(empty))
    assert r.exit_code == 2 and "is empty" in r.output
    no_key = CliRunner().invoke(cli, ["generate", "a cat", "--url", front.url], env={"GENSERVE_API_KEY": None})
    assert no_key.exit_code == 2 and "--key" in no_key.output
    assert len(stack.broker.broker.tasks) == before  # nothing was submitted
    r = ctl(front, tmp_path, "generate", "a cat", *SMALL, "--model", "flux9-pro")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("Error: 400: unknown model_id") and "{" not in r.stderr, r.stderr
    wrong_key = ctl(front, tmp_path, "generate", "a cat", *SMALL, key="not-a-key")
    assert wrong_key.returncode == 1 and "401" in wrong_key.stderr


def test_ctrl_c_cancels_the_task(stack: Stack, front: Front, tmp_path: Path, procs: list) -> None:
    proc, err = start_ctl(front, tmp_path, procs, "generate", "a very detailed city map", "--width", "512",
                          "--height", "512", "--steps", "100")
    task_id = running_task(err)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130, err.read_text()
    assert f"cancelled task {task_id}" in err.read_text()
    assert task_status(stack, task_id) == "cancelled"
    assert not list(tmp_path.glob(f"{task_id}.*"))


def test_a_task_cancelled_elsewhere_fails_the_command(stack: Stack, front: Front, tmp_path: Path,
                                                      procs: list) -> None:
    proc, err = start_ctl(front, tmp_path, procs, "generate", "a long one", "--width", "512", "--height", "512",
                          "--steps", "100")
    task_id = running_task(err)
    r = invoke(front, "tasks", "cancel", task_id)
    assert r.exit_code == 0 and r.output.strip() == f"cancelled task {task_id}"
    assert proc.wait(timeout=20) == 1
    assert f"Error: task {task_id} cancelled (cancelled): " in err.read_text()
    assert proc.stdout.read() == ""


def test_generate_polls_when_the_stream_is_refused(stack: Stack, tmp_path: Path) -> None:
    capped = Front(stack, max_streams=0)
    try:
        out = tmp_path / "polled.jpg"
        r = ctl(capped, tmp_path, "generate", "a lighthouse", *SMALL, "--format", "jpeg", "-o", str(out))
        assert r.returncode == 0, r.stderr
        with Image.open(out) as image:
            assert image.format == "JPEG"
    finally:
        capped.close()


def test_tasks_list_show_and_cancel(stack: Stack, front: Front) -> None:
    done = [submit(stack, {"prompt": f"list me {i}", "width": 64, "height": 64, "num_inference_steps": 2,
                           "async": True}) for i in range(2)]
    for task_id in done:
        wait_until(lambda t=task_id: task_status(stack, t) == "completed", 30, 0.05, "the task to complete")
    bobs = submit(stack, {"prompt": "bob's", "width": 64, "height": 64, "num_inference_steps": 2, "async": True},
                  BOB)

    listing = invoke(front, "tasks", "list", "--status", "completed", "--json")
    assert listing.exit_code == 0, listing.output
    body = json.loads(listing.stdout)
    ids = [t["task_id"] for t in body["tasks"]]
    assert set(done) <= set(ids) and bobs not in ids
    assert all(t["status"] == "completed" and "image" not in t for t in body["tasks"])

    page = invoke(front, "tasks", "list", "--limit", "1")
    rows = page.stdout.splitlines()
    assert rows[0].split() == ["TASK", "ID", "STATUS", "MODEL", "MODE", "CREATED"] and len(rows) == 2
    cursor = re.search(r"--cursor (\S+)", page.stderr)[1]
    second = invoke(front, "tasks", "list", "--limit", "1", "--cursor", cursor)
    assert second.exit_code == 0 and second.stdout.splitlines()[1] != rows[1]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", rows[1])
    assert invoke(front, "tasks", "list", "--limit", "0").exit_code == 2

    shown = invoke(front, "tasks", "show", done[0], "--json")
    task = json.loads(shown.stdout)
    assert task["status"] == "completed" and "image_base64" not in task and task["image_url"]
    readable = invoke(front, "tasks", "show", done[0])
    assert readable.exit_code == 0 and len(readable.output) < 2000  # no base64 image
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in readable.output.splitlines())
    assert fields["status"] == "completed" and fields["size"] == "64x64" and fields["prompt"] == "list me 0"

    finished = invoke(front, "tasks", "cancel", done[0])
    assert finished.exit_code == 1
    assert f"task {done[0]} already finished (completed); nothing to cancel" in finished.output
    others = invoke(front, "tasks", "show", bobs)
    assert others.exit_code == 1 and "404: task not found" in others.output
    assert invoke(front, "tasks", "cancel", bobs).exit_code == 1
    queued = submit(stack, {**LONG, "priority": 1000})
    try:
        r = invoke(front, "tasks", "cancel", queued)
        assert r.exit_code == 0 and f"cancelled task {queued}" in r.output
    finally:
        stack.http.simulate_delete(f"/task/{queued}", headers=as_(ALICE))
    assert task_status(stack, queued) == "cancelled"
    wait_until(lambda: task_status(stack, bobs, BOB) == "completed", 30, 0.05, "bob's task")


def test_a_terminal_gets_one_redrawn_line(capsys: pytest.CaptureFixture[str]) -> None:
    from genservectl.tasks import Display

    display = Display(tty=True, width=10)
    for data in ({"status": "queued", "queue_position": 2}, {"status": "queued", "queue_position": 1},
                 {"status": "running", "node_id": "n1"},
                 *({"status": "running", "node_id": "n1", "step": s, "total": 4} for s in range(1, 5))):
        display.update(data)
    display.close()
    err = capsys.readouterr().err  # (click drops the erase-line codes when stderr is not a terminal)
    assert err.startswith("\rqueued: 2 ahead\rqueued: 1 ahead\nrunning on n1\n\r[##........] 1/4\r"), repr(err)
    assert err.endswith("\r[#######...] 3/4\r[##########] 4/4\n")


def test_the_cli_never_follows_redirects_nor_trusts_server_text_with_paths_or_escapes() -> None:
    import click as click_module

    from genservectl.tasks import ApiError, checked_task_id, open_url, printable
    from tests.receiver import Receiver

    receiver = Receiver()
    receiver.default = "302"  # Location: /target
    try:
        with pytest.raises(ApiError) as refused:
            open_url(receiver.url("/"), "secret-key-0123456789abcdef", "GET", "/task/x")
        assert refused.value.status == 302 and receiver.paths() == ["/task/x"]  # /target never asked, key kept
    finally:
        receiver.close()
    for hostile in ("../../.bashrc", "0" * 31 + "/", None, 42):
        with pytest.raises(click_module.ClickException):
            checked_task_id(hostile)
    assert checked_task_id("0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"
    assert printable("cat\x1b]52;c;ZXZpbA==\x07 on a mat\x9b") == "cat]52;c;ZXZpbA== on a mat"
