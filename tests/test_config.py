"""Entry-point configuration: flags win over environment variables, which win over defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.__main__ import parse_config as broker_config
from gpu_node.__main__ import parse_config as node_config
from http_front.__main__ import parse_config as front_config


def test_broker_flags_over_env_over_defaults() -> None:
    env = {"GENSERVE_BROKER_FRONTEND": "tcp://10.0.0.1:1", "GENSERVE_TASK_TIMEOUT": "30"}
    c = broker_config(["--frontend", "tcp://127.0.0.1:7"], env)
    assert c.frontend == "tcp://127.0.0.1:7" and c.task_timeout == 30.0 and c.max_retries == 2
    assert c.node_timeout == c.heartbeat_interval * c.liveness == 3.0
    assert c.recovery_grace == 15.0 and c.lora_slack == 1.0
    assert broker_config(["--lora-slack", "-1"], {}).lora_slack is None  # off
    assert broker_config([], {"GENSERVE_RECOVERY_GRACE": "40"}).recovery_grace == 40.0


def test_node_device_index_models_and_legacy_paths(tiny_models: Path) -> None:
    c = node_config(["--device", "cuda", "--device-index", "3", "--models-dir", str(tiny_models),
                     "--models", "flux1-dev,flux1-fill-dev"], {"FLUX_FILL_GPUS": "1"})
    assert c.device == "cuda:3" and set(c.model_paths) == {"flux1-dev"}  # fill is pinned to GPU 1
    c = node_config([], {"GENSERVE_DEVICE": "cpu", "FLUX_MODEL_PATH": "/models/dev", "LORA_BASE_PATH": "/l",
                         "GENSERVE_LORA_CACHE_GB": "0.5"})
    assert c.model_paths == {"flux1-dev": "/models/dev"} and c.lora_dir == Path("/l")
    assert c.lora_cache_bytes == 1 << 29 and c.device == "cpu"


def test_front_legacy_environment_names() -> None:
    env = {"HOST": "127.0.0.1", "PORT": "9000", "MAX_PROMPT_LENGTH": "50", "MAX_IMAGE_SIZE": "1024",
           "DEFAULT_API_KEY": "mine", "API_KEYS_ENCRYPTION_KEY": "k" * 44}
    c = front_config(["--port", "9001"], env)
    assert (c.host, c.port, c.max_prompt_length, c.max_image_size) == ("127.0.0.1", 9001, 50, 1024)
    assert c.legacy_password == "mine" and c.encryption_key == "k" * 44 and c.rate_limit == 100


def test_node_speed_options_from_flags_and_environment() -> None:
    c = node_config(["--compile", "--warmup-sizes", "1024x1024, 768x1344", "--lora-slots-rank", "64"],
                    {"GENSERVE_CACHE": "first_block", "GENSERVE_CACHE_THRESHOLD": "0.2",
                     "GENSERVE_HOST_MEMORY_GB": "48"})
    s = c.speed
    assert (s.compile, s.cache, s.cache_threshold, s.lora_rank) == (True, "first_block", 0.2, 64)
    assert s.warmup == ((1024, 1024), (768, 1344)) and c.host_memory_budget == 48 << 30
    c = node_config([], {"GENSERVE_COMPILE": "yes", "GENSERVE_QUANTIZE": "fp8"})
    assert c.speed.compile and c.speed.quantize == "fp8"  # refused later, at start, off a float8 GPU
    assert node_config([], {}).speed.warmup == () and not node_config([], {}).speed.compile


def test_node_batching_flags() -> None:
    assert (node_config([], {}).batch, node_config([], {}).batch_pixels) == (1, 512 * 512)  # off by default
    c = node_config(["--batch", "2"], {"GENSERVE_BATCH_MAX_PIXELS": "0"})
    assert (c.batch, c.batch_pixels) == (2, 0)
    assert node_config([], {"GENSERVE_BATCH": "8"}).batch == 8


@pytest.mark.parametrize("argv, env", [(["--warmup-sizes", "big", "--compile"], {}), (["--quantize", "int4"], {}),
                                       ([], {"GENSERVE_CACHE": "turbo"}), (["--cache-threshold", "nan"], {}),
                                       (["--lora-slots-rank", "-4"], {}), (["--batch", "0"], {}),
                                       ([], {"GENSERVE_BATCH": "17"}), (["--batch-max-pixels", "-1"], {})])
def test_node_refuses_bad_speed_options(argv: list[str], env: dict[str, str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        node_config(argv, env)
    assert exc.value.code == 2 and "genserve-node" in capsys.readouterr().err


def test_broker_affinity_flags() -> None:
    assert broker_config([], {}).affinity_slack == 10.0
    assert broker_config(["--affinity-slack", "0"], {}).affinity_slack == 0.0  # ties only
    assert broker_config(["--affinity-slack", "-1"], {}).affinity_slack is None  # the window alone
    c = broker_config([], {"GENSERVE_LOAD_COST": "2.5", "GENSERVE_AFFINITY_WINDOW": "60"})
    assert (c.load_cost, c.affinity_window) == (2.5, 60.0)


@pytest.mark.parametrize("argv", [["--affinity-slack", "nan"], ["--load-cost", "-1"], ["--affinity-window", "inf"],
                                  ["--recovery-grace", "nan"], ["--recovery-grace", "-5"], ["--lora-slack", "nan"]])
def test_broker_refuses_bad_scheduling_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        broker_config(argv, {})


def test_node_compile_cache_folder_from_flag_or_environment(tmp_path: Path) -> None:
    assert node_config([], {}).compile_cache is None  # torch's own default folder
    assert node_config(["--compile-cache", str(tmp_path)], {}).compile_cache == tmp_path
    assert node_config([], {"GENSERVE_COMPILE_CACHE": "~/cc"}).compile_cache == Path("~/cc").expanduser()


@pytest.fixture
def no_cache_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """TORCHINDUCTOR_CACHE_DIR unset for the test and put back as it was afterwards."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "placeholder")  # records the original state for teardown
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    return monkeypatch


def test_the_compile_cache_points_inductor_at_a_private_folder(tmp_path: Path,
                                                               no_cache_env: pytest.MonkeyPatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from gpu_node.__main__ import use_compile_cache

    use_compile_cache(None)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    folder = tmp_path / "new" / "cache"
    use_compile_cache(folder)
    assert cache_dir() == str(folder) and folder.is_dir() and not list(folder.iterdir())  # no probe left
    assert folder.stat().st_mode & 0o777 == 0o700


def refused(folder: Path, match: str) -> None:
    from gpu_node.__main__ import use_compile_cache
    from gpu_node.config import SpeedError

    with pytest.raises(SpeedError, match=match):
        use_compile_cache(folder)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_compile_cache_refuses_folders_a_node_must_not_or_cannot_use(tmp_path: Path,
                                                                         no_cache_env: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(blocker / "cache", "cannot use it")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    refused(shared, "group or others may write")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    with no_cache_env.context() as m:
        m.setattr(os, "geteuid", lambda: os.stat(theirs).st_uid + 1)
        refused(theirs, "owned by another user")
    locked = tmp_path / "locked"
    (locked / "fxgraph").mkdir(parents=True, mode=0o700)
    locked.chmod(0o700)
    real_access = os.access
    with no_cache_env.context() as m:  # the tests run as root, for whom the mode bits grant everything
        m.setattr(os, "access", lambda p, mode: Path(p).name != "fxgraph" and real_access(p, mode))
        refused(locked, "fxgraph is not writable")


def test_the_node_points_inductor_at_the_folder_before_it_builds_anything(
        tiny_models: Path, tmp_path: Path, no_cache_env: pytest.MonkeyPatch) -> None:
    import gpu_node.__main__ as node_main
    from gpu_node.config import SpeedError

    seen = []

    def build(config: object) -> None:
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        raise SpeedError("stopped by the test")

    no_cache_env.setattr(node_main, "build", build)
    with pytest.raises(SystemExit, match="stopped by the test"):
        node_main.main(["--models-dir", str(tiny_models), "--compile", "--compile-cache", str(tmp_path / "cc")])
    assert seen == [str(tmp_path / "cc")]
    with pytest.raises(SystemExit, match="group or others may write"):
        (tmp_path / "open").mkdir(mode=0o777)
        (tmp_path / "open").chmod(0o777)
        node_main.main(["--models-dir", str(tiny_models), "--compile-cache", str(tmp_path / "open")])
    assert len(seen) == 1  # refused before building
