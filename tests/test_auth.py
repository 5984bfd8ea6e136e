"""Authentication, permissions, rate limits and key administration through the Falcon app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from cryptography.fernet import Fernet
from falcon import testing
from urllib3 import encode_multipart_formdata

from genserve.keyfile import KeyFile, make_fernet
from http_front.app import create_app
from http_front.config import FrontConfig
from http_front.keys import DEFAULT_KEY, KeyStore
from http_front.ratelimit import RecentSet, SlidingWindowLimiter
from tests.conftest import Stack

KEYS = {"generation": "gen-key-0123456789abcdef", "readonly": "ro-key-0123456789abcdefg",
        "admin": "admin-key-0123456789abcde", "all": "all-key-0123456789abcdefg"}
SMALL = {"prompt": "x", "width": 32, "height": 32, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("auth")
    keyfile = KeyFile(tmp / "api_keys.enc", make_fernet(Fernet.generate_key().decode(), DEFAULT_KEY))
    keys = KeyStore.from_env([(raw, perm, (perm,)) for perm, raw in KEYS.items()], DEFAULT_KEY, keyfile)
    stack = Stack(tmp, tiny_models, ("flux1-dev",), keys=keys, front_overrides={"auth_failure_limit": 10_000})
    yield stack
    stack.close()


def form(fields: dict[str, str]) -> dict:
    body, content_type = encode_multipart_formdata(fields)
    return {"body": body, "headers": {"Content-Type": content_type}}


def admin_post(stack: Stack, path: str, fields: dict[str, str] | None = None, key: str = KEYS["admin"]):
    """POST form fields (as curl -F does) with an admin key."""
    headers = {"Authorization": f"Bearer {key}"}
    if fields is None:
        return stack.http.simulate_post(path, headers=headers)
    kwargs = form(fields)
    return stack.http.simulate_post(path, body=kwargs["body"], headers={**headers, **kwargs["headers"]})


# (method, path, request kwargs, permissions that may call it, status when allowed)
ENDPOINTS = [
    ("GET", "/", {}, {"readonly"}, 200),
    ("GET", "/health", {}, {"readonly"}, 200),
    ("GET", "/status", {}, {"readonly"}, 200),
    ("GET", "/models", {}, {"readonly"}, 200),
    ("GET", "/loras", {}, {"readonly"}, 200),
    ("GET", "/task/unknown-task", {}, {"readonly", "generation"}, 404),
    ("DELETE", "/task/unknown-task", {}, {"generation"}, 404),
    ("POST", "/generate", {"json": SMALL}, {"generation"}, 200),
    ("POST", "/generate/upload", form({k: str(v) for k, v in SMALL.items()}), {"generation"}, 200),
    ("GET", "/auth/keys", {}, {"admin"}, 200),
    ("POST", "/auth/generate-key", form({"name": "matrix", "permissions": "readonly"}), {"admin"}, 201),
    ("POST", "/auth/delete-key", form({"api_key": "no-such-key"}), {"admin"}, 404),
    ("POST", "/auth/delete-key-by-id", form({"key_id": "nosuchke-0000"}), {"admin"}, 404),
    ("POST", "/auth/delete-key-by-name", form({"name": "nobody"}), {"admin"}, 404),
    ("POST", "/auth/reload-keys", {}, {"admin"}, 200),
]
CALLERS = ["none", "unknown", "generation", "readonly", "admin", "all"]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method, path, kwargs, allowed, ok", ENDPOINTS, ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_permission_matrix(authed, caller, method, path, kwargs, allowed, ok) -> None:
    headers = dict(kwargs.get("headers", {}))
    headers["Authorization"] = "" if caller == "none" else f"Bearer {KEYS.get(caller, 'unknown-key-zzzz')}"
    request = {k: v for k, v in kwargs.items() if k != "headers"}
    r = authed.http.simulate_request(method, path, headers=headers, **request)
    if caller == "none":
        expected = 401
    elif caller == "unknown":
        expected = 401
    elif caller in ("admin", "all") or caller in allowed:
        expected = ok
    else:
        expected = 403
    assert r.status_code == expected, (caller, method, path, r.text)
    if expected in (401, 403):
        assert set(r.json) == {"detail"}
    if caller == "none":
        assert "缺少API密钥" in r.json["detail"]


def test_unknown_and_missing_keys_answer_alike(authed) -> None:
    a = authed.http.simulate_get("/status", headers={"Authorization": "Bearer gen-key-0123456789abcdeX"})
    b = authed.http.simulate_get("/status", headers={"Authorization": "", "X-API-Key": "totally-different"})
    assert a.status_code == b.status_code == 401 and a.json == b.json


def make_app(tmp_path: Path, clock, limit: int = 3, failures: int = 100, **config):
    keys = KeyStore.from_env([("k-generation-000000000000", "g", ("generation",)),
                              ("k-readonly-0000000000000", "r", ("readonly",))], None)
    app = create_app(broker=None, keys=keys, config=FrontConfig(**config),
                     limiter=SlidingWindowLimiter(limit, 60, clock=clock),
                     failures=SlidingWindowLimiter(failures, 60, clock=clock))
    return testing.TestClient(app)


def test_rate_limit_per_key_with_retry_after(tmp_path: Path) -> None:
    now = [0.0]
    client = make_app(tmp_path, lambda: now[0])
    ro = {"X-API-Key": "k-readonly-0000000000000"}
    assert all(client.simulate_get("/", headers=ro).status_code == 200 for _ in range(3))
    now[0] = 20.0
    r = client.simulate_get("/", headers=ro)
    assert r.status_code == 429 and r.headers["Retry-After"] == "40" and "detail" in r.json
    assert client.simulate_get("/", headers={"X-API-Key": "k-generation-000000000000"}).status_code == 403
    now[0] = 60.5
    assert client.simulate_get("/", headers=ro).status_code == 200


def test_repeated_failed_authentication_is_throttled_per_address(tmp_path: Path) -> None:
    now = [0.0]
    client = make_app(tmp_path, lambda: now[0], limit=100, failures=5)
    for _ in range(5):
        assert client.simulate_get("/", headers={"X-API-Key": "guess"}).status_code == 401
    r = client.simulate_get("/", headers={"X-API-Key": "k-readonly-0000000000000"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    other = client.simulate_get("/", headers={"X-API-Key": "k-readonly-0000000000000"}, remote_addr="10.9.8.7")
    assert other.status_code == 200
    now[0] = 61.0
    assert client.simulate_get("/", headers={"X-API-Key": "k-readonly-0000000000000"}).status_code == 200


def test_a_key_proven_from_an_address_outlives_its_throttle(tmp_path: Path) -> None:
    now = [0.0]
    client = make_app(tmp_path, lambda: now[0], limit=100, failures=3)
    ro, gen = {"X-API-Key": "k-readonly-0000000000000"}, {"X-API-Key": "k-generation-000000000000"}
    assert client.simulate_get("/", headers=ro).status_code == 200
    for _ in range(3):
        assert client.simulate_get("/", headers={"X-API-Key": "guess"}).status_code == 401
    assert client.simulate_get("/", headers=ro).status_code == 200  # the attacker does not lock it out
    assert client.simulate_get("/", headers=gen).status_code == 429  # new here: not evaluated
    assert client.simulate_get("/", headers=ro, remote_addr="10.0.0.9").status_code == 200


def test_recent_set_is_bounded_and_forgets() -> None:
    now = [0.0]
    seen = RecentSet(ttl=10, max_items=3, clock=lambda: now[0])
    for item in "abcd":
        seen.add(item)
    assert len(seen) == 3 and "a" not in seen and "b" in seen
    seen.add("b")  # seen again: now the most recent
    seen.add("e")
    assert "c" not in seen and {"b", "d", "e"} == {x for x in "bcde" if x in seen}
    now[0] = 10.0
    assert "b" not in seen and len(seen) == 2


def test_default_key_only_from_loopback_unless_allowed(tmp_path: Path) -> None:
    for allow, remote_status in ((False, 403), (True, 200)):
        app = create_app(None, KeyStore.from_env([], DEFAULT_KEY), FrontConfig(default_key_remote=allow))
        client = testing.TestClient(app, headers={"X-API-Key": DEFAULT_KEY})
        assert client.simulate_get("/").status_code == 200
        assert client.simulate_get("/", remote_addr="::1").status_code == 200
        assert client.simulate_get("/", remote_addr="192.0.2.10").status_code == remote_status


def test_admin_endpoints_create_list_delete_and_reload(authed) -> None:
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    r = admin_post(authed, "/auth/generate-key", {"name": "新用户", "permissions": "generation,readonly"})
    assert r.status_code == 201, r.text
    created = r.json
    assert created["name"] == "新用户" and created["permissions"] == ["generation", "readonly"]
    assert created["config_string"] == f"{created['api_key']}:新用户:generation,readonly"
    new = {"Authorization": f"Bearer {created['api_key']}"}
    assert authed.http.simulate_get("/status", headers=new).status_code == 200
    listing = authed.http.simulate_get("/auth/keys", headers=admin).json["keys"]
    mine = [k for k in listing if k["key_id"] == created["key_id"]][0]
    assert mine["source"] == "file" and mine["can_delete"] is True and mine["usage_count"] == 1
    assert created["api_key"] not in json.dumps(listing)
    env = [k for k in listing if k["name"] == "admin"][0]
    assert env["can_delete"] is False and KEYS["admin"] not in json.dumps(listing)
    set_of_fields = {"key_id", "key_preview", "name", "permissions", "created_at", "last_used", "usage_count",
                     "source", "can_delete", "weight", "priority_floor"}
    assert set(mine) == set_of_fields and (mine["weight"], mine["priority_floor"]) == (1.0, 0)
    r = admin_post(authed, "/auth/delete-key-by-id", {"key_id": created["key_id"]})
    assert r.status_code == 200 and r.json["deleted_keys"][0]["name"] == "新用户"
    assert authed.http.simulate_get("/status", headers=new).status_code == 401
    again = admin_post(authed, "/auth/generate-key", {"name": "tmp", "permissions": "readonly"}).json
    r = admin_post(authed, "/auth/delete-key", {"api_key": again["api_key"]})
    assert r.status_code == 200
    for name in ("dup", "dup"):
        admin_post(authed, "/auth/generate-key", {"name": name, "permissions": "readonly"})
    r = admin_post(authed, "/auth/delete-key-by-name", {"name": "dup"})
    assert r.status_code == 200 and len(r.json["deleted_keys"]) == 2
    r = authed.http.simulate_post("/auth/reload-keys", headers=admin)
    assert r.status_code == 200 and r.json["total_keys"] >= 4


@pytest.mark.parametrize("path, fields, status, text", [
    ("/auth/generate-key", {"permissions": "readonly"}, 422, "name"),
    ("/auth/generate-key", {"name": "x", "permissions": "root"}, 422, "permissions"),
    ("/auth/delete-key", {}, 422, "api_key"),
    ("/auth/delete-key-by-id", {"key_id": "admin-ke-bcde"}, 403, "environment"),
    ("/auth/delete-key-by-name", {"name": "admin"}, 403, "environment"),
])
def test_admin_endpoint_failures(authed, path, fields, status, text) -> None:
    r = admin_post(authed, path, fields or None)
    assert r.status_code == status, r.text
    assert r.json["success"] is False and text in r.json["detail"]


def test_reload_of_a_damaged_file_keeps_the_keys_in_use(authed) -> None:
    keyfile = authed.keys._keyfile
    created = admin_post(authed, "/auth/generate-key", {"name": "keep", "permissions": "readonly"}).json
    good = keyfile.path.read_bytes()
    keyfile.path.write_bytes(b"garbage")
    try:
        r = admin_post(authed, "/auth/reload-keys")
        assert r.status_code == 500 and "kept" in r.json["detail"]
        assert keyfile.path.read_bytes() == b"garbage"
        assert authed.http.simulate_get("/status", headers={"Authorization": f"Bearer {created['api_key']}"}).status_code == 200
    finally:
        keyfile.path.write_bytes(good)


# ---- fair-share weights and priority floors ------------------------------------------------

def gen(stack: Stack, key: str, **body: object):
    return stack.http.simulate_post("/generate", json={**SMALL, "async": True, **body},
                                    headers={"Authorization": f"Bearer {key}"})


def test_a_key_may_not_ask_for_a_priority_below_its_floor(authed) -> None:
    r = gen(authed, KEYS["generation"], priority=-1)
    assert r.status_code == 403 and r.json["field"] == "priority" and "priority_floor is 0" in r.json["detail"]
    assert gen(authed, KEYS["generation"], priority=0).status_code == 202
    assert gen(authed, KEYS["admin"], priority=-1000).status_code == 202  # admin keys may use any priority


def test_admins_set_weight_and_floor_and_the_broker_gets_the_weight(authed) -> None:
    created = admin_post(authed, "/auth/generate-key", {"name": "batch", "permissions": "generation",
                                                         "weight": "0.5", "priority_floor": "5"}).json
    assert (created["weight"], created["priority_floor"]) == (0.5, 5)
    key = created["api_key"]
    assert gen(authed, key, priority=4).status_code == 403
    task_id = gen(authed, key, priority=5).json["task_id"]
    assert authed.broker.broker.tasks[task_id].weight == 0.5
    r = admin_post(authed, "/auth/update-key", {"key_id": created["key_id"], "weight": "3", "priority_floor": "-10"})
    assert r.status_code == 200 and (r.json["key"]["weight"], r.json["key"]["priority_floor"]) == (3.0, -10)
    task_id = gen(authed, key, priority=-10).json["task_id"]
    assert authed.broker.broker.tasks[task_id].weight == 3.0
    r = admin_post(authed, "/auth/update-key", {"key_id": created["key_id"], "priority_floor": "default"})
    assert r.json["key"]["priority_floor"] == 0 and r.json["key"]["weight"] == 3.0
    listing = authed.http.simulate_get("/auth/keys", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json
    assert [k["priority_floor"] for k in listing["keys"] if k["name"] == "admin"] == [-1000]
    r = authed.http.simulate_post("/auth/update-key", json={"key_id": created["key_id"], "weight": 2},
                                  headers={"Authorization": f"Bearer {KEYS['admin']}"})
    assert r.status_code == 200 and r.json["key"]["weight"] == 2.0  # JSON numbers too


@pytest.mark.parametrize("fields, status, field", [
    ({"weight": "nan"}, 422, "weight"), ({"weight": "0"}, 422, "weight"), ({"weight": "1e9"}, 422, "weight"),
    ({"weight": "heavy"}, 422, "weight"), ({"priority_floor": "1.5"}, 422, "priority_floor"),
    ({"priority_floor": "-1001"}, 422, "priority_floor"), ({"priority_floor": "٣"}, 422, "priority_floor"),
    ({}, 422, "weight"),
])
def test_bad_scheduling_fields_are_422_and_change_nothing(authed, fields, status, field) -> None:
    created = admin_post(authed, "/auth/generate-key", {"name": "victim", "permissions": "generation"}).json
    r = admin_post(authed, "/auth/update-key", {"key_id": created["key_id"], **fields})
    assert r.status_code == status and r.json["field"] == field, r.text
    r = admin_post(authed, "/auth/generate-key", {"name": "bad", "permissions": "generation", **fields})
    assert r.status_code == (201 if not fields else status)
    mine = [k for k in authed.keys.records() if k.key_id == created["key_id"]][0]
    assert (mine.weight, mine.priority_floor) == (1.0, None)


def test_update_key_refuses_environment_keys_unknown_ids_and_non_admins(authed) -> None:
    assert admin_post(authed, "/auth/update-key", {"key_id": "admin-ke-bcde", "weight": "2"}).status_code == 403
    assert admin_post(authed, "/auth/update-key", {"key_id": "nope-nope", "weight": "2"}).status_code == 404
    r = admin_post(authed, "/auth/update-key", {"key_id": "x", "weight": "2"}, key=KEYS["generation"])
    assert r.status_code == 403


def test_a_request_without_priority_gets_the_keys_floor_when_it_is_higher(authed) -> None:
    created = admin_post(authed, "/auth/generate-key", {"name": "late", "permissions": "generation",
                                                         "priority_floor": "10"}).json
    r = gen(authed, created["api_key"])
    assert r.status_code == 202
    assert authed.broker.broker.tasks[r.json["task_id"]].priority == 10
    r = admin_post(authed, "/auth/update-key", {"key_id": created["key_id"], "priority_floor": "--5"})
    assert r.status_code == 422 and r.json["field"] == "priority_floor"
