"""bench/gpu_check.py end to end on the CPU at reduced depth and width (the GPU run is recorded in docs/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import STAGES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_every_stage_runs_on_the_cpu_and_the_report_renders(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    # aot_eager: the same dynamo graphs and recompile guards as inductor, without C++ code generation.
    subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--backend", "aot_eager", "--out",
                    str(out)], cwd=ROOT, check=True, timeout=240, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in rows if r["name"] == "error"]
    assert not errors, errors
    value = {(r["stage"], r["name"]): r["value"] for r in rows}
    assert {r["stage"] for r in rows} == {"setup", *STAGES}
    assert value[("compile", "graphs compiled by the first request")] == 2  # one per kind of block
    assert value[("compile", "graphs compiled after a new size and cache toggles")] == 0
    assert value[("lora", "graphs compiled across LoRA changes")] == 0
    assert value[("fp8", "fp8")] == "skipped"
    assert value[("cache", "full passes per image at 1.0")] < 2  # the cache skipped the later passes
    assert isinstance(value[("bf16", "bf16")], float) and value[("bf16", "bf16")] > 0
    kernels = [r for r in rows if r["stage"] == "profile" and r["unit"] == "ms"]
    assert kernels and all(r["value"] >= 0 and "% in" in r["note"] for r in kernels)
    report = tmp_path / "report.md"
    subprocess.run([sys.executable, "-m", "bench.gpu_check", "--report", str(out), "--write", str(report)],
                   cwd=ROOT, check=True, timeout=120, capture_output=True)
    text = report.read_text()
    assert "## GPU check on" in text and "| compile | compile |" in text and "not on an H100" in text
