"""The wire contract: typed round trips, refusals, one header type per command, and who imports whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msgpack
import msgspec
import pytest

from genserve import wire as w
from genserve.spec import GenerationParams, LoraRef, TaskSpec
from tests.conftest import ROOT

PARAMS = GenerationParams("猫", 64, 64, 2, 42, 3.5, 0.8, None, [LoraRef("a.safetensors", 0.5)])


def test_round_trip_keeps_the_typed_header_and_raw_blobs() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    job = w.Job("t1", "flux1-dev", "img2img", PARAMS, ["input_image"], attempt=2)
    frames = w.encode(job, [png, b""])
    msg = w.decode(frames)
    assert msg.command == w.JOB and msg.name == "JOB" and msg.header == job
    assert msg.blobs == [png, b""]
    assert frames[3] is png  # images travel as their own frame, not inside the header


def test_every_command_has_one_header_type_and_back() -> None:
    assert all(len(c) == 1 for c in w.HEADERS)
    assert set(w.HEADERS) == set(w.COMMAND_NAMES)
    assert {w.COMMANDS[t] for t in w.HEADERS.values()} == set(w.HEADERS)  # a bijection
    submit = w.Submit(7, TaskSpec("flux1-dev", "text2img", 0, PARAMS), "owner", deadline=1.5, idempotency_key="k")
    assert w.decode(w.encode(submit)).header == submit
    reply = w.Reply(7, 2.0, w.LeaseBody(3, 0.0))
    assert w.decode(w.encode(reply)).header == reply  # the tagged body comes back as its own type


def test_routed_messages_split_identity() -> None:
    identity, msg = w.split_routed(w.routed(b"node-1", w.Heartbeat(idle=True)))
    assert identity == b"node-1" and msg.command == w.HEARTBEAT and msg.header == w.Heartbeat(idle=True)


def test_defaults_are_not_sent() -> None:
    assert msgpack.unpackb(w.encode(w.Heartbeat())[2]) == {}
    assert set(msgpack.unpackb(w.encode(w.Status(1, "t"))[2])) == {"req", "task_id"}


@pytest.mark.parametrize("frames, why", [
    ([], "at least 3"),
    ([b"GS1", w.READY, msgpack.packb({})], "version"),
    ([w.VERSION, b"\xff", msgpack.packb({})], "unknown command"),
    ([w.VERSION, w.READY, b"\xc1"], "READY header"),
    ([w.VERSION, w.READY, msgpack.packb([1, 2])], "READY header"),
    ([w.VERSION, w.PROGRESS, msgpack.packb({"task_id": "t", "step": "two", "total": 4})], "step"),
    ([w.VERSION, w.SUBMIT, msgpack.packb({"req": 1, "task": {}, "owner": "o", "extra": 1})], "SUBMIT header"),
])
def test_bad_frames_are_refused(frames: list[bytes], why: str) -> None:
    with pytest.raises(w.ProtocolError, match=why):
        w.decode(frames)


def test_a_peer_of_another_version_is_named_in_the_error() -> None:
    with pytest.raises(w.ProtocolError) as err:
        w.decode([b"GS1", w.SUBMIT, msgpack.packb({"req": 4})])
    assert err.value.version == b"GS1" and w.request_id([b"GS1", w.SUBMIT, msgpack.packb({"req": 4})]) == 4


def test_encode_refuses_what_is_not_a_header() -> None:
    with pytest.raises(w.ProtocolError):
        w.encode({"task_id": "t1"})
    with pytest.raises(w.ProtocolError):
        w.encode(PARAMS)


def test_the_task_spec_survives_json_and_builtins() -> None:
    spec = TaskSpec("flux1-dev", "text2img", 0, PARAMS)
    assert msgspec.convert(msgspec.to_builtins(spec), TaskSpec) == spec


PROCESSES = ("broker", "http_front", "gpu_node", "genservectl")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports (any import statement, anywhere in it)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package", PROCESSES)
def test_process_packages_import_the_shared_package_and_never_each_other(package: str) -> None:
    crossings = {module: sorted(names & (set(PROCESSES) - {package}))
                 for module, names in imported_packages(package).items()}
    assert {m: c for m, c in crossings.items() if c} == {}


def test_the_shared_package_imports_no_process_package_and_no_torch() -> None:
    for module, names in imported_packages("genserve").items():
        assert not names & {*PROCESSES, "torch", "diffusers", "transformers"}, module
    code = ("import sys, genserve.wire, genserve.catalog, genserve.curve, genserve.keyfile, broker.server,"
            " http_front.app, genservectl.__main__; sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(ROOT)).returncode == 0
