"""Wire micro-benchmark: encode and decode SUBMIT, JOB and RESULT, old protocol against new, in one run.

    .venv/bin/python bench/wire_micro.py [--old-rev 1e086f0 | --old-protocol PATH] [--repeats 9]
                                         [--sample-s 0.1] [--write docs/benchmarks.md]

old: `broker/protocol.py` as of --old-rev (free-form msgpack maps through msgpack-python), loaded from
`git show` into a throwaway module; its encode/decode take and give plain dicts.
new: `genserve.wire.encode` / `genserve.wire.decode` on the typed msgspec Structs; decode also
validates the header against its declared type.

Both sides get the same content: an img2img request (a 100-character unicode prompt, 2 LoRAs, a
100 KB input image as a blob frame) for SUBMIT and JOB, and a RESULT with its metadata and a 200 KB
PNG as a blob frame. Blob frames are bytes, as the broker, node and front receive them
(`recv_multipart` with copy=True), and pass through untouched in both designs. Each figure is the median
over --repeats samples of one call's time, a sample being as many calls as take about --sample-s;
old and new samples alternate, so the machine's drift affects both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import msgspec  # noqa: E402

from bench.report import emit  # noqa: E402
from genserve import wire as w  # noqa: E402
from genserve.spec import GenerationParams, LoraRef, TaskSpec  # noqa: E402

OLD_REV = "1e086f0"
# 100 characters, mixed scripts (CJK, accents, emoji) as clients send them.
PROMPT = ("一只可爱的小猫坐在花园里, golden hour, très détaillé, 🌸 cherry blossoms, "
          "35mm photo, bokeh, мягкий свет, 8k uhd")
PROMPT = (PROMPT * 2)[:100]
assert len(PROMPT) == 100


def load_old_protocol(rev: str, path: Path | None) -> tuple[ModuleType, str]:
    """The old broker/protocol.py as a module of its own (never registered as `broker.protocol`)."""
    if path is None:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:broker/protocol.py"], check=True,
                                capture_output=True, text=True).stdout
        with tempfile.TemporaryDirectory(prefix="old-protocol-") as tmp:
            (Path(tmp) / "old_protocol.py").write_text(source)
            return load_old_protocol(rev, Path(tmp) / "old_protocol.py")[0], f"`git show {rev}:broker/protocol.py`"
    spec = importlib.util.spec_from_file_location("_old_genserve_protocol", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    assert module.PROTOCOL_VERSION == b"GS1", "not the old protocol"
    return module, f"`{path}`"


def fake_blob(size: int, seed: int) -> bytes:
    """Incompressible bytes of a PNG's size (content does not matter: blobs are passed through)."""
    import random

    return b"\x89PNG\r\n\x1a\n" + random.Random(seed).randbytes(size - 8)


def messages(old: ModuleType) -> list[dict[str, Any]]:
    """SUBMIT, JOB and RESULT with the same content in both designs."""
    input_png, result_png = fake_blob(100_000, 1), fake_blob(200_000, 2)
    loras = [("styles/watercolor_v2.safetensors", 0.8), ("characters/cat_ears.safetensors", 0.55)]
    params_new = GenerationParams(prompt=PROMPT, width=1024, height=768, num_inference_steps=28, seed=1234567,
                                  cfg=3.5, strength=0.75, loras=[LoraRef(n, wt) for n, wt in loras])
    params_old = {"prompt": PROMPT, "width": 1024, "height": 768, "num_inference_steps": 28, "seed": 1234567,
                  "cfg": 3.5, "strength": 0.75, "controlnet_type": None,
                  "loras": [{"name": n, "weight": wt} for n, wt in loras]}
    deadline = time.time() + 300.0
    task_id = "3f1c2a9e-7b4d-4e1a-9c2f-8d5e6a7b9c01"
    owner = "key:9f86d081884c7d65"
    submit_new = w.Submit(req=41, task=TaskSpec("flux1-dev", "img2img", 0, params_new), owner=owner,
                          images=["input_image"], watch=True, deadline=deadline)
    submit_old = {"task": {"model_id": "flux1-dev", "mode": "img2img", "priority": 0, "params": params_old},
                  "owner": owner, "images": ["input_image"], "watch": True, "req": 41, "deadline": deadline}
    job_new = w.Job(task_id, "flux1-dev", "img2img", params_new, ["input_image"], 1)
    job_old = {"task_id": task_id, "model_id": "flux1-dev", "mode": "img2img", "params": params_old,
               "images": ["input_image"], "attempt": 1}
    meta = {"generation_time": 12.3456, "width": 1024, "height": 768, "seed": 1234567, "cfg": 3.5, "steps": 28,
            "device": "cuda:0"}
    result_new = w.Result(task_id, w.ResultMeta(**meta))
    result_old = {"task_id": task_id, "meta": meta}
    return [
        {"name": "SUBMIT", "command": old.SUBMIT, "old": submit_old, "new": submit_new, "blobs": [input_png]},
        {"name": "JOB", "command": old.JOB, "old": job_old, "new": job_new, "blobs": [input_png]},
        {"name": "RESULT", "command": old.RESULT, "old": result_old, "new": result_new, "blobs": [result_png]},
    ]


def field_diff(old: Any, new: Any, at: str = "") -> tuple[list[str], list[str]]:
    """Header fields only in the old map and only in the new one; values of shared fields must be equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        only_old = [f"{at}{k}" for k in old if k not in new]
        only_new = [f"{at}{k}" for k in new if k not in old]
        for k in old.keys() & new.keys():
            o, n = field_diff(old[k], new[k], f"{at}{k}.")
            only_old += o
            only_new += n
        return only_old, only_new
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        only_old, only_new = [], []
        for i, (o, n) in enumerate(zip(old, new)):
            a, b = field_diff(o, n, f"{at}{i}.")
            only_old += a
            only_new += b
        return only_old, only_new
    assert old == new, f"{at.rstrip('.')}: {old!r} != {new!r}"
    return [], []


def check_same(old: ModuleType, m: dict[str, Any]) -> tuple[list[bytes], list[bytes], list[str], list[str]]:
    """Frames of both designs, their header fields only on one side, after checking the rest is the same."""
    old_frames = old.encode(m["command"], m["old"], m["blobs"])
    new_frames = w.encode(m["new"], m["blobs"])
    assert old_frames[1] == new_frames[1] and old_frames[3:] == new_frames[3:]
    only_old, only_new = field_diff(msgpack.unpackb(old_frames[2]), msgspec.msgpack.decode(new_frames[2]))
    assert old.decode(old_frames).header == m["old"]
    assert w.decode(new_frames).header == m["new"]
    return old_frames, new_frames, sorted(only_old), sorted(only_new)


def calibrate(fn: Callable[[], Any], sample_s: float) -> int:
    """Calls per sample so that one sample takes about sample_s."""
    number = 1
    while True:
        took = timeit.timeit(fn, number=number)
        if took >= sample_s / 5:
            return max(1, round(number * sample_s / took))
        number *= 4


def measure(cases: dict[str, Callable[[], Any]], repeats: int, sample_s: float) -> dict[str, float]:
    """Median seconds per call of each case, samples interleaved across cases."""
    numbers = {name: calibrate(fn, sample_s) for name, fn in cases.items()}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            samples[name].append(timeit.timeit(cases[name], number=numbers[name]) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    """Run the measurements and print (and optionally record) the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision whose broker/protocol.py is the old side")
    ap.add_argument("--old-protocol", type=Path, help="the old protocol.py as a file (instead of --old-rev)")
    ap.add_argument("--repeats", type=int, default=9, help="samples per figure (median taken)")
    ap.add_argument("--sample-s", type=float, default=0.1, help="seconds per sample")
    ap.add_argument("--write", type=Path, help="append the result section to this markdown file")
    args = ap.parse_args()
    started = time.perf_counter()
    old, where = load_old_protocol(args.old_rev, args.old_protocol)
    rows, diffs = [], []
    for m in messages(old):
        old_frames, new_frames, only_old, only_new = check_same(old, m)
        diffs += [f"{m['name']} `{f}` only in the old header" for f in only_old]
        diffs += [f"{m['name']} `{f}` only in the new header" for f in only_new]
        command, header_old, header_new, blobs = m["command"], m["old"], m["new"], m["blobs"]
        cases = {
            "old encode": lambda: old.encode(command, header_old, blobs),
            "new encode": lambda: w.encode(header_new, blobs),
            "old decode": lambda: old.decode(old_frames),
            "new decode": lambda: w.decode(new_frames),
        }
        t = measure(cases, args.repeats, args.sample_s)
        rows.append((m["name"], len(old_frames[2]), len(new_frames[2]), sum(map(len, blobs)), t))
    elapsed = time.perf_counter() - started

    lines = [
        f"### Wire micro-benchmark ({time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/wire_micro.py', *sys.argv[1:]])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared VM), no GPU, {platform.platform()}, "
        f"Python {platform.python_version()}, msgpack {'.'.join(map(str, msgpack.version))}, "
        f"msgspec {msgspec.__version__}. Old: {where} (msgpack-python on dicts); new: `genserve.wire` "
        f"(msgspec Structs). Median of {args.repeats} interleaved samples of ~{args.sample_s:g} s each; "
        f"{elapsed:.0f} s in all.",
        "",
        "| message | header bytes old / new | blob bytes | encode µs old / new | ratio new/old "
        "| decode µs old / new | ratio new/old |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bytes_old, bytes_new, blob_bytes, t in rows:
        lines.append(
            f"| {name} | {bytes_old} / {bytes_new} | {blob_bytes:,} "
            f"| {t['old encode'] * 1e6:.2f} / {t['new encode'] * 1e6:.2f} | {t['new encode'] / t['old encode']:.2f} "
            f"| {t['old decode'] * 1e6:.2f} / {t['new decode'] * 1e6:.2f} | {t['new decode'] / t['old decode']:.2f} |")
    lines += [
        "",
        "Encode starts from a built header (dict or Struct) and ends with the frame list; decode starts "
        "from the frame list and ends with a Message; blob frames are the same objects on both sides. "
        "Header fields and values are the same on both sides (the script checks before timing) except: "
        f"{'; '.join(diffs) or 'none'}. (The new Structs omit header fields left at their defaults, "
        "e.g. JOB's `attempt` of 1; `GenerationParams` does not omit its defaults.)",
        "The new decode also does what the old did not: it checks the header against its command's "
        "declared type (every field's type, required fields present, nested TaskSpec/GenerationParams/LoraRef "
        "and ResultMeta; unknown fields refused in front requests and task specs), and hands back typed "
        "Structs; the old "
        "decode checked only that the header was a msgpack map, leaving every field to be checked, or not, "
        "where it was read.",
        "",
    ]
    emit(lines, args.write)


if __name__ == "__main__":
    main()
