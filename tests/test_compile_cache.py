"""`--compile-cache`: a node started again reuses what the last start compiled (real inductor on the CPU).

A restart is played in one process: dynamo's and inductor's in-memory caches are cleared and the
function is compiled again, so only the folder on disk can supply the compiled code. The same on
Flux blocks in separate processes is `bench/compile_cache.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def start(folder: Path) -> tuple[int, int, torch.Tensor]:
    """Compile and run a small function as a fresh start would: (cache hits, cache misses, output)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import clear_caches

    from gpu_node.__main__ import use_compile_cache

    torch._dynamo.reset()
    clear_caches()
    counters.clear()
    use_compile_cache(folder)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x * 2.0 + 1.0).sum(dim=-1)

    out = torch.compile(step, dynamic=True)(torch.arange(12.0).reshape(3, 4))
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"], out


def test_a_restart_reuses_what_was_compiled_into_the_cache_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor.utils import clear_caches

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")  # so that teardown restores the original state
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    folder = tmp_path / "compile-cache"
    try:
        hits, misses, first = start(folder)
        assert (hits, misses) == (0, 1)
        assert any(folder.iterdir())  # written where the flag said
        hits, misses, again = start(folder)
        assert (hits, misses) == (1, 0)  # read back, nothing compiled again
        assert torch.equal(first, again)
    finally:
        torch._dynamo.reset()
        clear_caches()  # nothing in torch keeps pointing at the test's folder
