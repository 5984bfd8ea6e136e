"""`genservectl keys`, `crypto-key` and the legacy scripts, in-process and as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from waitress.server import create_server

from genserve.keyfile import KeyFile, derive_fernet_key, make_fernet
from genservectl.__main__ import cli
from http_front.app import create_app
from http_front.config import FrontConfig
from http_front.keys import DEFAULT_KEY, KeyStore
from tests.conftest import BIN, ROOT, Processes, free_port, wait_until

ADMIN = "cli-admin-key-0123456789abcdef"


@pytest.fixture
def front(tmp_path: Path) -> Iterator[str]:
    """A real HTTP front (waitress in a thread) with an admin key and a key file; no broker needed."""
    keyfile = KeyFile(tmp_path / "api_keys.enc", make_fernet(Fernet.generate_key().decode(), DEFAULT_KEY))
    keys = KeyStore.from_env([(ADMIN, "ops", ("admin",))], DEFAULT_KEY, keyfile)
    server = create_server(create_app(None, keys, FrontConfig()), host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(timeout=5)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env={"GENSERVE_ADMIN_KEY": ADMIN, **(env or {})})


def test_keys_create_list_delete_reload(front: str) -> None:
    created = run("keys", "create", "alice", "--permissions", "generation", "--url", front, "--json")
    assert created.exit_code == 0, created.output
    body = json.loads(created.output)
    listing = run("keys", "list", "--url", front, "--json")
    keys = json.loads(listing.output)
    assert {k["name"] for k in keys} == {"ops", "alice"} and body["api_key"] not in listing.output
    table = run("keys", "list", "--url", front)
    assert "alice" in table.output and "KEY ID" in table.output
    assert run("keys", "reload", "--url", front).output.strip() == "reloaded: 2 keys"
    deleted = run("keys", "delete", "--id", body["key_id"], "--url", front)
    assert deleted.exit_code == 0 and "alice" in deleted.output
    for flag, value in (("--key", "nope"), ("--name", "nobody")):
        missing = run("keys", "delete", flag, value, "--url", front)
        assert missing.exit_code != 0 and "404" in missing.output


def test_keys_weight_and_priority_floor(front: str) -> None:
    created = json.loads(run("keys", "create", "batch", "--weight", "0.5", "--priority-floor", "10", "--url", front,
                             "--json").output)
    assert (created["weight"], created["priority_floor"]) == (0.5, 10)
    changed = run("keys", "update", created["key_id"], "--weight", "2", "--url", front)
    assert changed.exit_code == 0 and "weight 2, priority floor 10" in changed.output
    reset = run("keys", "update", created["key_id"], "--priority-floor", "default", "--url", front)
    assert "priority floor 0" in reset.output
    table = run("keys", "list", "--url", front).output
    assert "WEIGHT" in table and "FLOOR" in table
    bad = run("keys", "update", created["key_id"], "--weight", "nan", "--url", front)
    assert bad.exit_code != 0 and "422" in bad.output and "weight" in bad.output
    assert run("keys", "update", created["key_id"], "--url", front).exit_code == 2  # nothing to change
    run("keys", "delete", "--id", created["key_id"], "--url", front)


def test_keys_failures_exit_non_zero_with_a_message(front: str) -> None:
    bad = run("keys", "list", "--url", front, env={"GENSERVE_ADMIN_KEY": "wrong"})
    assert bad.exit_code != 0 and "401" in bad.output
    env_key = run("keys", "delete", "--name", "ops", "--url", front)
    assert env_key.exit_code != 0 and "environment" in env_key.output
    assert run("keys", "delete", "--url", front).exit_code != 0  # no selector
    down = run("keys", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.exit_code != 0 and "cannot reach" in down.output


def test_crypto_key_methods() -> None:
    random_line = run("crypto-key").output.strip()
    assert random_line.startswith("export API_KEYS_ENCRYPTION_KEY=") and len(random_line.split("=", 1)[1]) == 44
    Fernet(random_line.split("=", 1)[1])  # a valid Fernet key
    by_password = run("crypto-key", "--method", "password", "--password", "correct horse battery")
    assert by_password.output.strip().endswith(derive_fernet_key("correct horse battery"))
    assert run("crypto-key", "--method", "password", "--password", "short").exit_code != 0
    by_default = run("crypto-key", "--method", "default-key", env={"DEFAULT_API_KEY": "my-default"})
    assert by_default.output.strip().endswith(derive_fernet_key("my-default"))


def test_keys_check(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    path = tmp_path / "api_keys.enc"
    KeyStore.from_env([(ADMIN, "ops", ("admin",))], None, KeyFile(path, make_fernet(key, DEFAULT_KEY))).create(
        "x", ("readonly",))
    ok = run("keys", "check", "--key-file", str(path), env={"API_KEYS_ENCRYPTION_KEY": key})
    assert ok.exit_code == 0 and "1 keys" in ok.output and "0o600" in ok.output
    wrong = run("keys", "check", "--key-file", str(path), env={"API_KEYS_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    assert wrong.exit_code != 0 and "cannot decrypt" in wrong.output


@pytest.mark.e2e
def test_real_processes_front_and_cli(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    procs = Processes(tmp_path)
    port, fport = free_port(), free_port()
    env = {"API_KEY_1": f"{ADMIN}:ops:admin", "API_KEY_2": "abc123def456:developer:generation",
           "API_KEYS_ENCRYPTION_KEY": key}
    try:
        procs.start("broker", ["genserve-broker", "--frontend", f"tcp://127.0.0.1:{fport}", "--backend",
                               f"tcp://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "b")])
        procs.start("front", ["genserve-front", "--broker", f"tcp://127.0.0.1:{fport}", "--host", "127.0.0.1",
                              "--port", str(port)], env=env)
        url = f"http://127.0.0.1:{port}"
        cli_env = {**os.environ, "GENSERVE_URL": url, "GENSERVE_ADMIN_KEY": ADMIN}

        def ctl(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "genservectl"), *args], env=cli_env, capture_output=True,
                                  text=True, timeout=60)

        wait_until(lambda: ctl("keys", "list").returncode == 0, 30, 0.2, "the front")
        created = ctl("keys", "create", "bob", "--json")
        assert created.returncode == 0, created.stderr
        api_key = json.loads(created.stdout)["api_key"]
        assert (tmp_path / "api_keys.enc").stat().st_mode & 0o777 == 0o600
        assert "bob" in ctl("keys", "list").stdout
        assert ctl("keys", "delete", "--key", api_key).returncode == 0
        assert "bob" not in ctl("keys", "list").stdout
        log = procs.log("front")  # the guide's 12-character example key is called out, the long one is not
        assert "API key 'developer' is shorter than 20 characters" in log and "'ops' is shorter" not in log
        assert "abc123def456" not in log and ADMIN not in log  # names only, never the keys
    finally:
        procs.close()

    # The file written by the front opens with the legacy self-check scripts.
    script_env = {**os.environ, "API_KEYS_ENCRYPTION_KEY": key, "PYTHONPATH": str(ROOT)}
    check = subprocess.run([sys.executable, str(ROOT / "test_encryption.py")], cwd=tmp_path, env=script_env,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "api_keys.enc: 0 keys" in check.stdout, check.stdout + check.stderr
    gen = subprocess.run([sys.executable, str(ROOT / "generate_encryption_key.py"), "1"], env=script_env,
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0 and gen.stdout.startswith("export API_KEYS_ENCRYPTION_KEY=")


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["wrong key", "malformed key", "corrupted file"])
def test_front_refuses_to_start_and_leaves_the_file_untouched(tmp_path: Path, damage: str) -> None:
    key = Fernet.generate_key().decode()
    path = tmp_path / "api_keys.enc"
    KeyStore.from_env([(ADMIN, "ops", ("admin",))], None, KeyFile(path, make_fernet(key, DEFAULT_KEY))).create(
        "x", ("readonly",))
    if damage == "corrupted file":
        path.write_bytes(path.read_bytes()[:50])
    before = path.read_bytes()
    used = {"wrong key": Fernet.generate_key().decode(), "malformed key": "tooshort"}.get(damage, key)
    out = subprocess.run([str(BIN / "genserve-front"), "--port", str(free_port()), "--host", "127.0.0.1",
                          "--broker", f"tcp://127.0.0.1:{free_port()}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "API_KEYS_ENCRYPTION_KEY": used})
    assert out.returncode != 0 and "cannot start" in out.stderr, out.stderr
    assert path.read_bytes() == before
