"""Wire protocol: round trips, refusals, and no torch import."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from broker import protocol as p


def test_round_trip_keeps_header_and_raw_blobs() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    frames = p.encode(p.JOB, {"task_id": "t1", "params": {"seed": 42, "cfg": 3.5, "prompt": "猫"}}, [png, b""])
    msg = p.decode(frames)
    assert msg.command == p.JOB and msg.name == "JOB"
    assert msg.header == {"task_id": "t1", "params": {"seed": 42, "cfg": 3.5, "prompt": "猫"}}
    assert msg.blobs == [png, b""]
    assert frames[3] is png  # images travel as their own frame, not inside msgpack


def test_routed_messages_split_identity() -> None:
    identity, msg = p.split_routed(p.routed(b"node-1", p.HEARTBEAT, {"idle": True}))
    assert identity == b"node-1" and msg.command == p.HEARTBEAT and msg.header == {"idle": True}


@pytest.mark.parametrize("frames, why", [
    ([], "at least 3"),
    ([b"GS0", p.READY, msgpack.packb({})], "version"),
    ([p.PROTOCOL_VERSION, b"\xff", msgpack.packb({})], "unknown command"),
    ([p.PROTOCOL_VERSION, p.READY, b"\xc1"], "msgpack"),
    ([p.PROTOCOL_VERSION, p.READY, msgpack.packb([1, 2])], "map"),
])
def test_bad_frames_are_refused(frames: list[bytes], why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.decode(frames)


def test_encode_refuses_unknown_command() -> None:
    with pytest.raises(p.ProtocolError):
        p.encode(b"\x7f", {})


def test_commands_are_distinct_single_bytes() -> None:
    assert all(len(c) == 1 for c in p.COMMAND_NAMES)
    assert len(set(p.COMMAND_NAMES.values())) == len(p.COMMAND_NAMES)


def test_importing_protocol_and_front_never_imports_torch() -> None:
    code = ("import sys, broker.protocol, broker.server, http_front.app, gpu_node.catalog, genservectl.__main__;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
