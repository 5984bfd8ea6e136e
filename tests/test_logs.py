"""Logs: the formatters (units), and a whole deployment's JSON logs (end to end): every line is
JSON, every line about a task carries its task_id, and no secret ever appears in any log."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from genserve import logs
from tests.conftest import BIN, Processes, free_port, wait_healthy, wait_until


def record(msg: str = "task %s done", *args: object, **extra: str) -> logging.LogRecord:
    rec = logging.LogRecord("broker.server", logging.INFO, __file__, 1, msg, args or ("t1",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_ids_and_text_lines_append_them() -> None:
    line = json.loads(logs.JsonFormatter("broker").format(record(**logs.ids("t1", "n1", "k1"))))
    assert {k: line[k] for k in ("level", "process", "logger", "msg", "task_id", "node_id", "key_id")} == {
        "level": "INFO", "process": "broker", "logger": "broker.server", "msg": "task t1 done",
        "task_id": "t1", "node_id": "n1", "key_id": "k1"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    text = logs.TextFormatter().format(record(**logs.ids("t1", node_id="n1")))
    assert text.endswith("broker.server: task t1 done [task_id=t1 node_id=n1]")
    assert "[" not in logs.TextFormatter().format(record())  # no ids, nothing appended
    assert logs.ids(None, None, None) == {} and logs.key_ref("0123456789abcdef0123") == "0123456789abcdef"


def test_an_exception_stays_inside_one_json_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        rec = record("task %s failed", "t9", **logs.ids("t9"))
        rec.exc_info = sys.exc_info()
    text = logs.JsonFormatter("node").format(rec)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exc"]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError):
        logs.setup("INFO", "xml")
    from broker.__main__ import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--log-format", "xml"], {})


@pytest.mark.e2e
def test_a_full_run_logs_json_with_task_ids_and_no_secrets(processes: Processes, tiny_models: Path,
                                                           tmp_path: Path) -> None:
    from genserve.curve import create_keypair

    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    broker_pub, broker_sec = create_keypair(keys, "broker")
    for name in ("node", "front"):
        public, _ = create_keypair(keys, name)
        (authorized / public.name).write_bytes(public.read_bytes())
    api_key = "logtest-admin-key-0123456789abcdef"
    encryption_key = Fernet.generate_key().decode()
    webhook_secret = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw=="
    env = {"GENSERVE_LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}
    front_ep, backend_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    processes.start("broker", ["genserve-broker", "--frontend", front_ep, "--backend", backend_ep,
                               "--data-dir", str(tmp_path / "b"), "--curve-secret", str(broker_sec),
                               "--curve-authorized", str(authorized), "--heartbeat", "0.25"],
                    env={**env, "GENSERVE_WEBHOOK_SECRET": webhook_secret})
    processes.start("node", ["genserve-node", "--broker", backend_ep, "--device", "cpu", "--models-dir",
                             str(tiny_models), "--models", "flux1-dev", "--heartbeat", "0.25",
                             "--max-sequence-length", "32", "--node-id", "n1",
                             "--curve-secret", str(keys / "node.key_secret"), "--curve-server", str(broker_pub)],
                    env=env)
    port = free_port()
    processes.start("front", ["genserve-front", "--broker", front_ep, "--host", "127.0.0.1", "--port", str(port),
                              "--curve-secret", str(keys / "front.key_secret"), "--curve-server", str(broker_pub),
                              "--key-file", str(tmp_path / "keys.enc")],
                    env={**env, "API_KEY_1": f"{api_key}:ops:admin", "API_KEYS_ENCRYPTION_KEY": encryption_key,
                         "GENSERVE_RATE_LIMIT": "1000000"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, key=api_key)
    auth = {"Authorization": f"Bearer {api_key}"}
    created = requests.post(f"{url}/auth/generate-key", headers=auth, timeout=10,
                            data={"name": "user", "permissions": "generation,readonly"}).json()["api_key"]
    wrong = "not-a-real-key-but-looks-like-one-0123"
    assert requests.get(f"{url}/health", headers={"Authorization": f"Bearer {wrong}"}, timeout=10).status_code == 401
    user = {"Authorization": f"Bearer {created}"}
    done = requests.post(f"{url}/generate", headers=user, timeout=60,
                         json={"prompt": "a lamp", "width": 64, "height": 64, "num_inference_steps": 2})
    assert done.status_code == 200, done.text
    task_id = done.json()["task_id"]
    cancelled = requests.post(f"{url}/generate", headers=user, timeout=10, json={
        "prompt": "long", "width": 512, "height": 512, "num_inference_steps": 100, "async": True}).json()["task_id"]
    requests.delete(f"{url}/task/{cancelled}", headers=user, timeout=10)
    wait_until(lambda: f"task {cancelled} cancelled" in processes.log("broker"), 30, 0.1, "the cancel to be logged")
    subprocess.run([str(BIN / "genservectl"), "nodes", "--broker", front_ep, "--curve-secret",
                    str(keys / "front.key_secret"), "--curve-server", str(broker_pub)], capture_output=True,
                   timeout=30)
    for name in ("broker", "node", "front"):
        processes.kill(name, 15)

    secrets = {"API key": api_key, "created key": created, "refused key": wrong, "encryption key": encryption_key,
               "webhook secret": webhook_secret.removeprefix("whsec_")}
    for path in keys.glob("*.key_secret"):
        secrets[f"CURVE secret {path.name}"] = re.search(r'secret-key = "(.+)"', path.read_text())[1]
    by_task: dict[str, set[str]] = {}
    for name in ("broker", "node", "front"):
        text = processes.log(name)
        for label, secret in secrets.items():
            assert secret not in text, f"the {label} appears in the {name} log"
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)  # every line of ours is one JSON object
            except ValueError:
                raise AssertionError(f"not a JSON line in the {name} log: {line!r}") from None
            for found in re.findall(r"\btask ([0-9a-f]{32})\b", entry["msg"]):
                assert entry.get("task_id") == found, entry
                by_task.setdefault(found, set()).add(entry["process"])
    assert by_task[task_id] >= {"broker", "node"} and by_task[cancelled] >= {"broker", "node"}
