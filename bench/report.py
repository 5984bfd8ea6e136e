"""Shared by the benchmarks: print a markdown section and append it to docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], write: Path | None) -> None:
    """Print the section; append it to `write` when given."""
    text = "\n".join(lines)
    print(text)
    if write:
        with write.open("a") as f:
            f.write("\n" + text)
