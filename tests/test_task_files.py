"""Images as files, output formats, signed URLs and task listing, against a real broker and tiny-model node."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from broker.journal import Journal
from broker.queue import TaskQueue
from broker.tasks import ListingIndex, Task, TaskTable
from http_front.keys import KeyStore
from http_front.signing import UrlSigner
from tests.conftest import Stack
from tests.fakes import params

KEYS = {"alice": "alice-files-key-0123456789ab", "bob": "bob-files-key-0123456789abcd",
        "root": "root-files-key-0123456789abc"}
SMALL = {"prompt": "x", "width": 64, "height": 48, "num_inference_steps": 1}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    keys = KeyStore.from_env([(KEYS["alice"], "alice", ("generation",)), (KEYS["bob"], "bob", ("generation",)),
                              (KEYS["root"], "root", ("admin",))], None)
    stack = Stack(tmp_path_factory.mktemp("files"), tiny_models, ("flux1-dev",), keys=keys)
    yield stack
    stack.close()


def generate(stack: Stack, who: str = "alice", **body: object) -> dict:
    r = stack.http.simulate_post("/generate", json={**SMALL, **body}, headers=as_(who))
    assert r.status_code == 200, r.text
    return r.json


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_are_encoded_on_the_node_and_served_as_files(files: Stack, fmt: str, pil: str) -> None:
    body = generate(files, output_format=fmt, output_quality=70)
    assert body["image"].startswith(f"data:image/{fmt};base64,") and body["metadata"]["format"] == fmt
    assert Image.open(io.BytesIO(base64.b64decode(body["image_base64"]))).format == pil
    r = files.http.simulate_get(f"/task/{body['task_id']}/image", headers=as_("alice"))
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(r.content)).size == (64, 48)
    assert r.content == base64.b64decode(body["image_base64"])
    assert "immutable" in r.headers["cache-control"] and r.headers["etag"].startswith('"')


@pytest.mark.parametrize("field, value", [("output_format", "gif"), ("output_format", "PNG"),
                                          ("output_quality", 0), ("output_quality", 101), ("output_quality", 9.5)])
def test_bad_output_options_are_422(files: Stack, field: str, value: object) -> None:
    r = files.http.simulate_post("/generate", json={**SMALL, field: value}, headers=as_("alice"))
    assert r.status_code == 422 and r.json["field"] == field


@pytest.mark.parametrize("speed", ["fast", "quality"])
def test_a_request_chooses_its_speed_and_the_metadata_says_which_ran(files: Stack, speed: str) -> None:
    body = generate(files, speed=speed)
    assert body["metadata"]["speed"] == speed and "lora_load" not in body["metadata"]
    polled = files.http.simulate_get(f"/task/{body['task_id']}", headers=as_("alice")).json
    assert polled["metadata"]["speed"] == speed


def test_without_a_speed_the_node_default_runs(files: Stack) -> None:
    assert generate(files)["metadata"]["speed"] == "quality"  # the test node runs without a step cache


@pytest.mark.parametrize("value", ["turbo", "FAST", "", 1, None, ["fast"]])
def test_bad_speed_is_422(files: Stack, value: object) -> None:
    r = files.http.simulate_post("/generate", json={**SMALL, "speed": value}, headers=as_("alice"))
    assert r.status_code == 422 and r.json["field"] == "speed"


def test_etag_gives_304_and_the_image_is_private_to_its_key(files: Stack) -> None:
    body = generate(files)
    path = f"/task/{body['task_id']}/image"
    first = files.http.simulate_get(path, headers=as_("alice"))
    again = files.http.simulate_get(path, headers={**as_("alice"), "If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and not again.content
    assert files.http.simulate_get(path, headers=as_("bob")).status_code == 404
    assert files.http.simulate_get(path, headers=as_("root")).status_code == 200
    assert files.http.simulate_get(path).status_code == 401


def test_a_signed_url_works_without_a_key_for_that_image_only(files: Stack) -> None:
    body = generate(files)
    url = body["image_url"]
    assert url.startswith(f"/task/{body['task_id']}/image?expires=") and KEYS["alice"] not in url
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    ok = files.http.simulate_get(parts.path, params=query)
    assert ok.status_code == 200 and ok.content == base64.b64decode(body["image_base64"])
    other = generate(files, who="bob")
    assert files.http.simulate_get(f"/task/{other['task_id']}/image", params=query).status_code == 403
    tampered = {**query, "sig": query["sig"][:-1] + ("A" if query["sig"][-1] != "A" else "B")}
    assert files.http.simulate_get(parts.path, params=tampered).status_code == 403
    later = {**query, "expires": str(int(query["expires"]) + 60)}
    assert files.http.simulate_get(parts.path, params=later).status_code == 403
    assert files.http.simulate_get(f"/task/{body['task_id']}", params=query).status_code == 401  # image only


def test_no_image_yet_is_409_and_an_unknown_task_404(files: Stack) -> None:
    long = {**SMALL, "num_inference_steps": 100, "width": 512, "height": 512, "async": True}
    blocker = files.http.simulate_post("/generate", json=long, headers=as_("alice")).json["task_id"]
    queued = files.http.simulate_post("/generate", json=long, headers=as_("alice")).json["task_id"]
    try:
        r = files.http.simulate_get(f"/task/{queued}/image", headers=as_("alice"))
        assert r.status_code == 409 and r.json["task_status"] in ("queued", "running")
    finally:
        for task_id in (queued, blocker):
            files.http.simulate_delete(f"/task/{task_id}", headers=as_("alice"))
    r = files.http.simulate_get(f"/task/{queued}/image", headers=as_("alice"))
    assert r.status_code == 409 and r.json["task_status"] == "cancelled"
    assert files.http.simulate_get("/task/nope/image", headers=as_("alice")).status_code == 404


def test_listing_is_newest_first_paginated_and_private(files: Stack) -> None:
    mine = [generate(files, who="bob", seed=i)["task_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        r = files.http.simulate_get("/tasks", params={"limit": "2", **({"cursor": cursor} if cursor else {})},
                                    headers=as_("bob"))
        assert r.status_code == 200 and r.json["count"] <= 2
        seen += [t["task_id"] for t in r.json["tasks"]]
        assert all("image" not in t and "auth_info" not in t for t in r.json["tasks"])
        cursor = r.json["next_cursor"]
        if cursor is None:
            break
    bobs = [t for t in seen if t in mine]
    assert bobs == list(reversed(mine))  # newest first, each once
    alice = files.http.simulate_get("/tasks", params={"limit": "100"}, headers=as_("alice")).json["tasks"]
    assert not {t["task_id"] for t in alice} & set(mine)
    admin = files.http.simulate_get("/tasks", params={"limit": "100"}, headers=as_("root")).json["tasks"]
    assert set(mine) <= {t["task_id"] for t in admin}
    done = files.http.simulate_get("/tasks", params={"status": "completed"}, headers=as_("bob")).json["tasks"]
    assert done and all(t["status"] == "completed" and t["image_url"] for t in done)


@pytest.mark.parametrize("query", [{"status": "done"}, {"limit": "0"}, {"limit": "101"}, {"limit": "x"},
                                   {"cursor": "-1"}, {"cursor": "١٢"}, {"limit": "1e3"}])
def test_bad_listing_parameters_are_422(files: Stack, query: dict[str, str]) -> None:
    r = files.http.simulate_get("/tasks", params=query, headers=as_("alice"))
    assert r.status_code == 422 and r.json["success"] is False


def test_the_task_table_lists_by_owner_and_status_with_a_cursor(tmp_path: Path) -> None:
    table = TaskTable(Journal(tmp_path / "j.db"), TaskQueue(30.0))
    for seq in range(1, 8):
        task = Task(task_id=f"t{seq}", model="flux1-dev", mode="text2img", priority=0, seq=table.next_seq(),
                    params=params(), owner="a" if seq % 2 else "b", created=float(seq), deadline=1e9)
        table.accept(task, 0.0)
    table.tasks["t7"].state = "completed"
    table.finish(table.tasks["t7"], None)
    page, cursor = table.listing("a", None, 2)
    assert [t.task_id for t in page] == ["t7", "t5"] and cursor == 5
    page, cursor = table.listing("a", None, 2, cursor)
    assert [t.task_id for t in page] == ["t3", "t1"] and cursor is None
    assert [t.task_id for t in table.listing(None, "completed", 10)[0]] == ["t7"]
    assert [t.task_id for t in table.listing(None, None, 3)[0]] == ["t7", "t6", "t5"]


def test_the_listing_index_matches_a_full_scan_through_random_changes(tmp_path: Path) -> None:
    """Pages come from the index (a binary search per page); a brute-force scan must agree."""
    rng = random.Random(5)
    index = ListingIndex()
    tasks: dict[int, tuple[str, str]] = {}
    for seq in range(1, 400):
        action = rng.random()
        if action < 0.6 or not tasks:
            tasks[seq] = (rng.choice("abc"), "queued")
            index.put(seq, *tasks[seq])
        elif action < 0.9:
            old = rng.choice(list(tasks))
            tasks[old] = (tasks[old][0], rng.choice(["running", "completed", "failed", "queued"]))
            index.put(old, *tasks[old])
        else:
            gone = rng.choice(list(tasks))
            del tasks[gone]
            index.remove(gone)
        owner, state = rng.choice([None, "a", "b", "c"]), rng.choice([None, "queued", "completed"])
        limit, before = rng.randint(1, 7), rng.choice([None, rng.randint(1, seq + 1)])
        expected = sorted((s for s, (o, st) in tasks.items() if (owner is None or o == owner)
                           and (state is None or st == state) and (before is None or s < before)), reverse=True)
        assert index.page(owner, state, limit, before) == (expected[:limit], len(expected) > limit)


def test_listing_survives_a_restart_and_forgets_purged_tasks(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    table = TaskTable(journal, TaskQueue(30.0))
    for seq in range(1, 5):
        task = Task(task_id=f"t{seq}", model="flux1-dev", mode="text2img", priority=0, seq=table.next_seq(),
                    params=params(), owner="a", created=float(seq), deadline=1e9)
        table.accept(task, 0.0)
    done = table.tasks["t2"]
    done.state, done.finished = "completed", 10.0
    table.finish(done, None)
    journal.close()
    again = TaskTable(Journal(tmp_path / "j.db"), TaskQueue(30.0))
    again.recover(now=20.0, grace=1.0)
    assert [t.task_id for t in again.listing("a", None, 10)[0]] == ["t4", "t3", "t2", "t1"]
    assert [t.task_id for t in again.listing("a", "completed", 10)[0]] == ["t2"]
    again.housekeeping(now=10.0 + 3600.5, result_ttl=3600.0)  # t2's retention is over
    assert [t.task_id for t in again.listing("a", None, 10)[0]] == ["t4", "t3", "t1"]
    assert again.listing(None, "completed", 10) == ([], None)
    again.journal.close()


def test_signed_urls_expire_and_bind_their_path() -> None:
    now = [1000.0]
    signer = UrlSigner(b"s" * 32, ttl=60, clock=lambda: now[0])
    url = urlsplit(signer.sign("/task/t1/image"))
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert signer.verify("/task/t1/image", q["expires"], q["sig"])
    assert not signer.verify("/task/t2/image", q["expires"], q["sig"])
    assert not UrlSigner(b"t" * 32, clock=lambda: now[0]).verify("/task/t1/image", q["expires"], q["sig"])
    now[0] += 61
    assert not signer.verify("/task/t1/image", q["expires"], q["sig"])
    assert not signer.verify("/task/t1/image", None, q["sig"]) and not signer.verify("/task/t1/image", "9" * 40, "x")
    with pytest.raises(ValueError):
        UrlSigner(b"short")
