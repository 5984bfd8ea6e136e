"""Hostile requests against the Falcon app with an in-process fake broker (no sockets, no models).

Each test here reproduces one defect an attacker found (issue "Hardening"): a 500 where a
4xx belongs, a non-finite number accepted, a key that reaches another key's tasks, ...
"""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.fernet import Fernet
from falcon import testing
from urllib3 import encode_multipart_formdata

from genserve import errors as e
from genserve import wire as w
from genserve.keyfile import KeyFile, make_fernet
from gpu_node.errors import LoraError
from gpu_node.loras import LoraLibrary, scan
from http_front.app import create_app
from http_front.broker_client import BrokerError
from http_front.config import FrontConfig
from http_front.keys import DEFAULT_KEY, KeyRecord, KeyStore, owner_of
from http_front.ratelimit import SlidingWindowLimiter

# Two keys with the same first 8 and last 4 characters: the same display key_id.
TWIN_A = "gs-AAAAA" + "a" * 24 + "ZZZZ"
TWIN_B = "gs-AAAAA" + "b" * 24 + "ZZZZ"
ADMIN = "admin-key-0123456789abcdefgh"
READONLY = "readonly-key-0123456789abcdef"
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


PARAMS = {"prompt": "x", "width": 16, "height": 16, "num_inference_steps": 2, "seed": 1, "cfg": 3.5, "strength": 0.8}


class FakeBroker:
    """Answers the front's typed requests from a dict of tasks; encodes like the real client."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.submitted: list[dict[str, Any]] = []
        self.refuse_submit: BrokerError | None = None
        self.event_listeners: list[Any] = []  # the BrokerClient attribute event streams register on

    def add(self, owner: str, status: str = w.QUEUED) -> str:
        task_id = uuid.uuid4().hex
        self.tasks[task_id] = {"task_id": task_id, "status": status, "owner": owner, "model_id": "flux1-dev",
                               "mode": "text2img", "priority": 0, "params": dict(PARAMS), "created_at": 0.0}
        return task_id

    def request(self, header: Any, blobs: Any = (), timeout: float | None = None) -> w.Message:
        """The BrokerClient.request contract."""
        w.encode(header, blobs)  # what the real client does first: a 500 if it cannot encode
        if isinstance(header, w.Submit):
            if self.refuse_submit is not None:
                raise self.refuse_submit
            self.submitted.append(msgspec.to_builtins(header))
            task_id = self.add(header.owner)
            return w.Message(w.ACK, w.Ack(0, 0.0, task_id, 0))
        if isinstance(header, w.InfoRequest):
            node = w.NodeView("n1", "cpu", "h", 1, "busy", False, "someone-elses-task", {}, [],
                              [w.LoraInfo("cute_cat_lora.safetensors", 0.1, "root")], 1, 1, 0.1, 0)
            return w.Message(w.REPLY, w.Reply(0, 0.0, w.InfoBody([node], {"flux1-dev": w.ServedModel(
                ["img2img", "text2img"], ["n1"], [])}, w.QueueView(0, {}), {}, 0.0)))
        task = self.tasks.get(str(header.task_id))
        if task is None:
            raise BrokerError(e.NOT_FOUND, "task not found")
        if isinstance(header, w.CancelTask) and task["status"] not in w.FINAL_STATES:
            task.update(status=w.CANCELLED, error_code=e.CANCELLED, error="cancelled by request")
        return w.Message(w.REPLY, w.Reply(0, 0.0, w.TaskBody(msgspec.convert(task, w.TaskView))))


def env_keys() -> list[tuple[str, str, tuple[str, ...]]]:
    return [(TWIN_A, "twin-a", ("generation",)), (TWIN_B, "twin-b", ("generation",)),
            (ADMIN, "admin", ("admin",)), (READONLY, "ro", ("readonly",))]


class Front:
    """The app, its fake broker and key store, and helpers to call it."""

    def __init__(self, tmp_path: Path, limit: int = 1000, failures: int = 1000) -> None:
        now = [0.0]
        self.now = now
        self.broker = FakeBroker()
        keyfile = KeyFile(tmp_path / "api_keys.enc", make_fernet(Fernet.generate_key().decode(), DEFAULT_KEY))
        self.keys = KeyStore.from_env(env_keys(), None, keyfile)
        app = create_app(self.broker, self.keys, FrontConfig(),
                         limiter=SlidingWindowLimiter(limit, 60, clock=lambda: now[0]),
                         failures=SlidingWindowLimiter(failures, 60, clock=lambda: now[0]))
        self.http = testing.TestClient(app)

    def call(self, method: str, path: str, key: str = TWIN_A, **kwargs: Any) -> testing.Result:
        """One request with `key`."""
        headers = {"Authorization": f"Bearer {key}", **kwargs.pop("headers", {})}
        return self.http.simulate_request(method, path, headers=headers, **kwargs)

    def raw_json(self, path: str, text: str, key: str = TWIN_A) -> testing.Result:
        """POST a JSON body exactly as written (NaN, lone surrogates, deep nesting)."""
        return self.call("POST", path, key, body=text.encode("utf-8"),
                         headers={"Content-Type": "application/json"})

    def form(self, path: str, fields: dict[str, Any], key: str = TWIN_A) -> testing.Result:
        """POST multipart/form-data as curl -F does."""
        body, content_type = encode_multipart_formdata(fields)
        return self.call("POST", path, key, body=body, headers={"Content-Type": content_type})


@pytest.fixture
def front(tmp_path: Path) -> Front:
    return Front(tmp_path)


def assert_error(r: testing.Result, status: int | tuple[int, ...], text: str = "") -> None:
    """A 4xx with the guide's error body, naming `text`."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    body = r.json
    assert body["success"] is False and body["error"] and body["detail"], body
    assert text in body["detail"], body


# ---- 6: owner identity is unique per key -------------------------------------------------

def test_keys_sharing_both_ends_share_a_key_id_but_not_an_owner(front: Front) -> None:
    a, b = front.keys.authenticate(TWIN_A), front.keys.authenticate(TWIN_B)
    assert a.key_id == b.key_id  # the display id cannot tell them apart
    assert a.owner != b.owner and a.owner == owner_of(TWIN_A) and len(a.owner) == 32
    assert TWIN_A not in a.owner and a.owner not in a.key_id


def test_a_key_sharing_both_ends_cannot_read_or_cancel_the_others_task(front: Front) -> None:
    task_id = front.broker.add(owner_of(TWIN_A))
    assert front.call("GET", f"/task/{task_id}", TWIN_B).status_code == 404
    assert front.call("DELETE", f"/task/{task_id}", TWIN_B).status_code == 404
    assert front.broker.tasks[task_id]["status"] == w.QUEUED
    assert front.call("GET", f"/task/{task_id}", TWIN_A).json["status"] == w.QUEUED
    assert front.call("GET", f"/task/{task_id}", ADMIN).status_code == 200


def test_a_task_is_submitted_under_the_unique_owner(front: Front) -> None:
    # Needs http_front/resources/generate.py to send `principal.owner` as the SUBMIT owner.
    r = front.call("POST", "/generate", json={"prompt": "x", "async": True})
    assert r.status_code == 202, r.text
    assert front.broker.submitted[-1]["owner"] == owner_of(TWIN_A)
    assert front.call("GET", f"/task/{r.json['task_id']}", TWIN_A).status_code == 200
    assert front.call("GET", f"/task/{r.json['task_id']}", TWIN_B).status_code == 404


def test_keys_sharing_both_ends_have_separate_rate_buckets(tmp_path: Path) -> None:
    front = Front(tmp_path, limit=3)
    assert [front.call("GET", "/task/none", TWIN_A).status_code for _ in range(4)] == [404, 404, 404, 429]
    assert front.call("GET", "/task/none", TWIN_B).status_code == 404


def test_delete_by_an_ambiguous_key_id_deletes_neither(front: Front) -> None:
    one, two = "gs-CCCCC" + "1" * 24 + "YYYY", "gs-CCCCC" + "2" * 24 + "YYYY"
    front.keys._keyfile.update(lambda current: current + [KeyRecord.from_raw(one, "one", ("readonly",), "file"),
                                                          KeyRecord.from_raw(two, "two", ("readonly",), "file")])
    front.keys.reload()
    r = front.form("/auth/delete-key-by-id", {"key_id": "gs-CCCCC-YYYY"}, ADMIN)
    assert_error(r, 409, "2 keys")
    assert front.keys.authenticate(one) and front.keys.authenticate(two)
    assert front.form("/auth/delete-key", {"api_key": one}, ADMIN).status_code == 200
    assert front.form("/auth/delete-key-by-id", {"key_id": "gs-CCCCC-YYYY"}, ADMIN).status_code == 200
    assert front.keys.authenticate(two) is None


# ---- 9: the failed-auth throttle does not lock out keys already proven from the address --

def test_throttled_address_keeps_known_keys_and_refuses_new_ones_unevaluated(tmp_path: Path) -> None:
    front = Front(tmp_path, failures=5)
    assert front.call("GET", "/", READONLY).status_code == 200  # the legitimate client, before the attack
    for _ in range(5):
        assert front.call("GET", "/", "guess-" + uuid.uuid4().hex).status_code == 401
    assert front.call("GET", "/", READONLY).status_code == 200
    uses = {r.name: r.usage_count for r in front.keys.records()}
    r = front.call("GET", "/", ADMIN)  # valid, but never authenticated from this address
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and set(r.json) == {"detail"}
    assert front.call("GET", "/", "guess-again").status_code == 429
    assert front.call("GET", "/", READONLY, headers={"Authorization": ""}).status_code == 429  # no key at all
    assert {r.name: r.usage_count for r in front.keys.records()}["admin"] == uses["admin"]  # not looked up
    assert front.call("GET", "/", ADMIN, remote_addr="10.1.2.3").status_code == 200  # other addresses unaffected
    front.now[0] = 61.0
    assert front.call("GET", "/", ADMIN).status_code == 200


# ---- 13 and 14: hostile bodies are 4xx, never 500, and never reach the broker ------------

NESTED = "[" * 10_000 + "]" * 10_000
IMG2IMG = '"mode": "img2img", "input_image": "' + PNG_1X1 + '", '
JSON_BODIES = {
    "nested array": NESTED,
    "nested field": '{"async": true, "prompt": "x", "loras": ' + NESTED + "}",
    "nested object": '{"a":' * 10_000 + "1" + "}" * 10_000,
    "nested within recursion limit": '{"async": true, "prompt": "x", "extra": ' + "[" * 500 + "]" * 500 + "}",
    "surrogate prompt": '{"async": true, "prompt": "\\ud800"}',
    "surrogate model_id": '{"async": true, "prompt": "x", "model_id": "\\ud800"}',
    "surrogate lora name": '{"async": true, "prompt": "x", "loras": [{"name": "\\udfff", "weight": 1}]}',
    "surrogate field name": '{"async": true, "prompt": "x", "\\ud800": 1}',
    "strength 0": '{"async": true, "prompt": "x", ' + IMG2IMG + '"strength": 0}',
    "strength NaN": '{"async": true, "prompt": "x", ' + IMG2IMG + '"strength": NaN}',
    "strength too small for a step": '{"async": true, "prompt": "x", ' + IMG2IMG + '"strength": 1e-20}',
    "cfg NaN": '{"async": true, "prompt": "x", "cfg": NaN}',
    "cfg Infinity": '{"async": true, "prompt": "x", "cfg": Infinity}',
    "cfg -Infinity": '{"async": true, "prompt": "x", "cfg": -Infinity}',
    "cfg overflow": '{"async": true, "prompt": "x", "cfg": 1e400}',
    "lora weight NaN": '{"async": true, "prompt": "x", "loras": [{"name": "cute_cat_lora", "weight": NaN}]}',
    "unknown field NaN": '{"async": true, "prompt": "x", "note": NaN}',
}


@pytest.mark.parametrize("text", JSON_BODIES.values(), ids=JSON_BODIES.keys())
def test_hostile_json_to_generate_is_4xx_and_submits_nothing(front: Front, text: str) -> None:
    assert_error(front.raw_json("/generate", text), (400, 422))
    assert front.broker.submitted == []


def test_the_same_bodies_made_sane_are_accepted(front: Front) -> None:
    for text in ('{"async": true, "prompt": "x", ' + IMG2IMG + '"strength": 0.01, "cfg": 0}',
                 '{"async": true, "prompt": "\\u732b \\ud83d\\ude00",'
                 ' "loras": [{"name": "cute_cat_lora", "weight": 0}]}'):
        assert front.raw_json("/generate", text).status_code == 202
    assert front.broker.submitted[-1]["task"]["params"]["prompt"] == "\u732b \U0001F600"


@pytest.mark.parametrize("field, value", [
    ("cfg", "nan"), ("cfg", "NaN"), ("cfg", "inf"), ("cfg", "-Infinity"), ("cfg", "1e999"),
    ("strength", "nan"), ("strength", "0"), ("width", "1_0_0"), ("width", "\u0661\u0660\u0660"),
    ("height", "\uff16\uff14"), ("seed", "4_2"),
    ("loras", "[" * 3000 + "]" * 3000), ("loras", '[{"name": "cute_cat_lora", "weight": NaN}]'),
])
def test_hostile_form_fields_are_422(front: Front, field: str, value: str) -> None:
    fields = {"prompt": "x", "async": "true", field: value}
    if field == "strength":
        fields.update(mode="img2img", input_image=("in.png", base64.b64decode(PNG_1X1), "image/png"))
    r = front.form("/generate/upload", fields)
    assert_error(r, 422, field)
    assert front.broker.submitted == []


def test_plain_form_numbers_still_work(front: Front) -> None:
    fields = {"prompt": "x", "async": "true", "width": "64", "height": " 48 ", "cfg": "3.5", "seed": "+42",
              "num_inference_steps": "2", "priority": "+3", "loras": '[{"name":"cute_cat_lora","weight":0.8}]'}
    r = front.form("/generate/upload", fields)
    assert r.status_code == 202, r.text
    task = front.broker.submitted[-1]["task"]
    params = task["params"]
    assert (params["width"], params["height"], params["cfg"], params["seed"]) == (64, 48, 3.5, 42)
    assert task["priority"] == 3
    r = front.form("/generate/upload", {**fields, "priority": "-1"})  # below this key's floor, in a form too
    assert r.status_code == 403 and r.json["field"] == "priority"


@pytest.mark.parametrize("text, field", [
    ('{"name": ' + NESTED + ', "permissions": "readonly"}', ""),
    ('{"name": "x", "permissions": ' + NESTED + "}", ""),
    ('{"name": "x", "permissions": [1, 2]}', "permissions"),
    ('{"name": "x", "permissions": [["admin"]]}', "permissions"),
    ('{"name": null, "permissions": "readonly"}', "name"),
    ('{"name": 5, "permissions": "readonly"}', "name"),
    ('{"name": ["a"], "permissions": "readonly"}', "name"),
    ('{"name": "x"}', "permissions"),
    ('{"name": "x", "permissions": []}', "permissions"),
    ('{"name": "x", "permissions": " , "}', "permissions"),
    ('{"name": "\\ud800", "permissions": "readonly"}', ""),
    ('{"\\ud800": {}}', ""),  # a bad field name, refused before any error message echoes it
    ('{"name": "a\\u0000b", "permissions": "readonly"}', "name"),
    ('{"name": "a\\nb", "permissions": "readonly"}', "name"),
    ('{"name": "a\\u001b[31mb", "permissions": "readonly"}', "name"),
    ('{"name": "a\\u2028b", "permissions": "readonly"}', "name"),
    ('{"name": "a\\u202eb", "permissions": "readonly"}', "name"),
    ('{"name": "x:admin", "permissions": "readonly"}', "name"),
])
def test_hostile_generate_key_bodies_are_4xx_and_create_nothing(front: Front, text: str, field: str) -> None:
    before = len(front.keys.records())
    assert_error(front.raw_json("/auth/generate-key", text, ADMIN), (400, 422), field)
    assert len(front.keys.records()) == before


def test_generate_key_form_without_permissions_is_422(front: Front) -> None:
    assert_error(front.form("/auth/generate-key", {"name": "新用户"}, ADMIN), 422, "permissions")
    assert_error(front.form("/auth/generate-key", {"name": "新用户", "permissions": ""}, ADMIN), 422, "permissions")
    r = front.form("/auth/generate-key", {"name": "新用户", "permissions": "generation,readonly"}, ADMIN)
    assert r.status_code == 201 and r.json["permissions"] == ["generation", "readonly"]
    r = front.raw_json("/auth/generate-key", '{"name": "json user", "permissions": ["readonly"]}', ADMIN)
    assert r.status_code == 201 and r.json["name"] == "json user" and r.json["permissions"] == ["readonly"]


# ---- 16: smaller ones ---------------------------------------------------------------------

def test_loras_outside_the_folder_are_neither_listed_nor_loadable(tmp_path: Path) -> None:
    base, outside = tmp_path / "loras", tmp_path / "private"
    (base / "styles").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"s" * 3 * 1024 * 1024)
    (base / "real.safetensors").write_bytes(b"r" * 1024)
    (base / "styles" / "ink.safetensors").write_bytes(b"i" * 1024)
    (base / "out.safetensors").symlink_to(outside / "secret.safetensors")
    (base / "alias.safetensors").symlink_to(base / "real.safetensors")
    (base / "dangling.safetensors").symlink_to(tmp_path / "missing.safetensors")
    (base / "linked").symlink_to(outside, target_is_directory=True)
    (base / "folder.safetensors").mkdir()
    listing = scan(base)
    assert [e.name for e in listing] == ["alias.safetensors", "real.safetensors", "styles/ink.safetensors"]
    library = LoraLibrary(base)
    assert [library.resolve(e.name) for e in listing] == ["real.safetensors", "real.safetensors",
                                                          "styles/ink.safetensors"]  # every listed one loads
    for name in ("out", "linked/secret", "dangling", "folder", "../private/secret", str(outside / "secret"),
                 "a\0b"):
        with pytest.raises(LoraError):
            library.resolve(name)
    assert library.resolve("alias") == "real.safetensors"


def test_status_hides_task_ids_from_non_admin_keys(front: Front) -> None:
    r = front.call("GET", "/status", READONLY)
    assert r.status_code == 200 and "someone-elses-task" not in r.text
    assert r.json["nodes"][0]["task_id"] is None and r.json["busy_nodes"] == 1
    assert front.call("GET", "/status", ADMIN).json["nodes"][0]["task_id"] == "someone-elses-task"


def test_cancel_answers_success_true_or_409_when_already_finished(front: Front) -> None:
    queued = front.broker.add(owner_of(TWIN_A))
    for _ in range(2):  # cancelling twice is fine: the task is cancelled either way
        r = front.call("DELETE", f"/task/{queued}")
        assert r.status_code == 200 and r.json["success"] is True and r.json["status"] == w.CANCELLED
    for status in (w.COMPLETED, w.FAILED):
        done = front.broker.add(owner_of(TWIN_A), status)
        r = front.call("DELETE", f"/task/{done}")
        assert_error(r, 409, status)
        assert r.json["task_status"] == status and front.broker.tasks[done]["status"] == status


def test_full_queue_429_carries_retry_after(front: Front) -> None:
    for message in ("queue is full (10000 tasks waiting)", "this key already has 1000 tasks waiting"):
        front.broker.refuse_submit = BrokerError(e.QUEUE_FULL, message)
        r = front.call("POST", "/generate", json={"prompt": "x", "async": True})
        assert_error(r, 429, message)
        assert int(r.headers["Retry-After"]) > 0


def test_error_bodies_are_json_even_for_hostile_input(front: Front) -> None:
    r = front.raw_json("/generate", '{"prompt": "x", "width": "' + "9" * 100_000 + '"}')
    assert_error(r, 422, "width")
    assert len(r.text) < 2000  # the value is not echoed whole
