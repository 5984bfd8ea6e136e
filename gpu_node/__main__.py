"""`genserve-node`: one process per device, connected to the broker."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from genserve import logs
from genserve.wire import MAX_BATCH
from gpu_node.catalog import resolve_model_paths, servable_modes
from gpu_node.config import CACHES, QUANTIZE, NodeConfig, SpeedError, SpeedOptions

log = logging.getLogger(__name__)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"1024x1024,768x1344" -> ((1024, 1024), (768, 1344))."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        width, sep, height = item.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise SpeedError(f"warm-up size {item!r} is not WIDTHxHEIGHT")
        out.append((int(width), int(height)))
    return tuple(out)


def parse_config(argv: list[str] | None = None, env: dict[str, str] | None = None) -> NodeConfig:
    """Flags win over environment variables (legacy FLUX_* names included)."""
    env = dict(os.environ if env is None else env)
    d = NodeConfig()
    ap = argparse.ArgumentParser(prog="genserve-node", description=__doc__)
    ap.add_argument("--broker", default=env.get("GENSERVE_BROKER_BACKEND_URL", d.broker),
                    help="broker backend endpoint (env GENSERVE_BROKER_BACKEND_URL)")
    ap.add_argument("--device", default=env.get("GENSERVE_DEVICE", d.device),
                    help="cpu or cuda:N (env GENSERVE_DEVICE)")
    ap.add_argument("--device-index", type=int, default=None,
                    help="with --device cuda: use cuda:N (supervisord passes its process_num)")
    ap.add_argument("--models-dir", default=env.get("GENSERVE_MODELS_DIR"),
                    help="folder with one diffusers folder per model id (env GENSERVE_MODELS_DIR);"
                         " FLUX_MODEL_PATH, FLUX_FILL_MODEL_PATH, ... override single models")
    ap.add_argument("--models", default=env.get("GENSERVE_MODELS", ""),
                    help="comma list restricting which model ids this node serves (env GENSERVE_MODELS)")
    ap.add_argument("--lora-dir", default=env.get("LORA_BASE_PATH"), help="LoRA folder (env LORA_BASE_PATH)")
    ap.add_argument("--node-id", default=env.get("GENSERVE_NODE_ID", ""), help="name shown to operators")
    ap.add_argument("--heartbeat", type=float, default=float(env.get("GENSERVE_HEARTBEAT", d.heartbeat_interval)))
    ap.add_argument("--liveness", type=int, default=int(env.get("GENSERVE_LIVENESS", d.liveness)))
    ap.add_argument("--shutdown-grace", type=float,
                    default=float(env.get("GENSERVE_SHUTDOWN_GRACE", d.shutdown_grace)),
                    help="on SIGTERM, most seconds to wait for the running step (env GENSERVE_SHUTDOWN_GRACE)")
    ap.add_argument("--preload", default=env.get("GENSERVE_PRELOAD", ""),
                    help="comma list of model ids to load before registering (env GENSERVE_PRELOAD)")
    ap.add_argument("--memory-budget-gb", type=float, default=float(env.get("GENSERVE_MEMORY_BUDGET_GB", 0)),
                    help="weights kept loaded before LRU eviction; 0 = 90%% of GPU / 50%% of RAM")
    ap.add_argument("--lora-cache-gb", type=float, default=float(env.get("GENSERVE_LORA_CACHE_GB", 2)),
                    help="LoRA tensors kept in memory before LRU eviction (env GENSERVE_LORA_CACHE_GB)")
    ap.add_argument("--prefetch", type=int, choices=(0, 1), default=int(env.get("GENSERVE_PREFETCH", d.prefetch)),
                    help="1: take the next job while one runs, so it starts while the last image is encoded;"
                         " 0: one job at a time (env GENSERVE_PREFETCH)")
    ap.add_argument("--batch", type=int, default=int(env.get("GENSERVE_BATCH", d.batch)),
                    help="most queued text2img tasks with equal model, size, steps, cfg, speed and LoRAs run in"
                         " one pipeline call; 1: each alone (env GENSERVE_BATCH)")
    ap.add_argument("--batch-max-pixels", type=int,
                    default=int(env.get("GENSERVE_BATCH_MAX_PIXELS", d.batch_pixels)),
                    help="only images of at most this many pixels run batched; 0: any size"
                         " (env GENSERVE_BATCH_MAX_PIXELS)")
    ap.add_argument("--png-level", type=int, default=int(env.get("GENSERVE_PNG_LEVEL", d.png_compress_level)),
                    help="zlib level for result PNGs, 0-9 (env GENSERVE_PNG_LEVEL)")
    ap.add_argument("--max-sequence-length", type=int,
                    default=int(env.get("GENSERVE_MAX_SEQUENCE_LENGTH", d.max_sequence_length)))
    ap.add_argument("--curve-secret", default=env.get("GENSERVE_CURVE_SECRET"),
                    help="this node's secret key file (env GENSERVE_CURVE_SECRET)")
    ap.add_argument("--curve-server", default=env.get("GENSERVE_CURVE_SERVER"),
                    help="the broker's public key file (env GENSERVE_CURVE_SERVER)")
    ap.add_argument("--compile", action="store_true", default=_truthy(env.get("GENSERVE_COMPILE")),
                    help="compile the transformer's repeated blocks, dynamic shapes (env GENSERVE_COMPILE=1)")
    ap.add_argument("--compile-backend", default=env.get("GENSERVE_COMPILE_BACKEND", "inductor"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--compile-cache", default=env.get("GENSERVE_COMPILE_CACHE"),
                    help="folder for compiled kernels, reused by the next start; on a persistent volume, a restart "
                         "skips most compiling (env GENSERVE_COMPILE_CACHE; default: torch's, under /tmp)")
    ap.add_argument("--warmup-sizes", default=env.get("GENSERVE_WARMUP_SIZES", "1024x1024"),
                    help="with --compile: WIDTHxHEIGHT list run once at start (env GENSERVE_WARMUP_SIZES)")
    ap.add_argument("--quantize", choices=QUANTIZE, default=env.get("GENSERVE_QUANTIZE", "none"),
                    help="fp8: torchao float8 weights and activations; CUDA 8.9+ only (env GENSERVE_QUANTIZE)")
    ap.add_argument("--cache", choices=CACHES, default=env.get("GENSERVE_CACHE", "none"),
                    help="step cache when a request does not choose its speed (env GENSERVE_CACHE)")
    ap.add_argument("--cache-threshold", type=float, default=float(env.get("GENSERVE_CACHE_THRESHOLD", 0.12)),
                    help="First Block Cache threshold; higher skips more (env GENSERVE_CACHE_THRESHOLD)")
    ap.add_argument("--lora-slots-rank", type=int, default=int(env.get("GENSERVE_LORA_SLOTS_RANK", 0)),
                    help="resident LoRA slot rank for hot-swapping; 0 = load per job (env GENSERVE_LORA_SLOTS_RANK)")
    ap.add_argument("--host-memory-gb", type=float, default=float(env.get("GENSERVE_HOST_MEMORY_GB", 0)),
                    help="pinned host memory for transformers parked off the GPU (env GENSERVE_HOST_MEMORY_GB)")
    ap.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=logs.FORMATS, default=env.get("GENSERVE_LOG_FORMAT", "text").lower(),
                    help="text lines or JSON lines with task_id/node_id/key_id fields (env GENSERVE_LOG_FORMAT)")
    a = ap.parse_args(argv)
    if a.log_format not in logs.FORMATS:  # argparse checks choices on the command line only
        ap.error(f"GENSERVE_LOG_FORMAT must be one of {list(logs.FORMATS)}")
    logs.setup(a.log_level, a.log_format, "node")
    if not 1 <= a.batch <= MAX_BATCH:
        ap.error(f"--batch must be in 1..{MAX_BATCH}")
    if a.batch_max_pixels < 0:
        ap.error("--batch-max-pixels must be >= 0")
    try:
        speed = SpeedOptions(compile=a.compile, compile_backend=a.compile_backend, quantize=a.quantize,
                             cache=a.cache, cache_threshold=a.cache_threshold, lora_rank=a.lora_slots_rank,
                             warmup=_sizes(a.warmup_sizes) if a.compile else ())
    except SpeedError as exc:
        ap.error(str(exc))
    device = a.device
    if device == "cuda" and a.device_index is not None:
        device = f"cuda:{a.device_index}"
    only = tuple(m.strip() for m in a.models.split(",") if m.strip())
    paths = resolve_model_paths(Path(a.models_dir) if a.models_dir else None, env, device, only)
    return NodeConfig(
        broker=a.broker, device=device, model_paths=paths,
        lora_dir=Path(a.lora_dir) if a.lora_dir else None, node_id=a.node_id,
        heartbeat_interval=a.heartbeat, liveness=a.liveness, shutdown_grace=a.shutdown_grace, prefetch=a.prefetch,
        batch=a.batch, batch_pixels=a.batch_max_pixels,
        preload=tuple(m.strip() for m in a.preload.split(",") if m.strip()),
        memory_budget=int(a.memory_budget_gb * (1 << 30)), png_compress_level=a.png_level,
        lora_cache_bytes=int(a.lora_cache_gb * (1 << 30)),
        max_sequence_length=a.max_sequence_length,
        curve_secret_file=Path(a.curve_secret) if a.curve_secret else None,
        curve_server_public_file=Path(a.curve_server) if a.curve_server else None,
        speed=speed, host_memory_budget=int(a.host_memory_gb * (1 << 30)),
        compile_cache=Path(a.compile_cache).expanduser() if a.compile_cache else None,
    )


def use_compile_cache(folder: Path | None, compiling: bool = True) -> None:
    """Point inductor's cache (and Triton's, unless TRITON_CACHE_DIR is set) at `folder`, before anything compiles.

    Inductor keys its entries by graph, torch, Triton, CUDA version and GPU name, so one folder may
    serve every node of a machine, and a node started again reuses what its last run compiled.
    Compiled code from the folder runs in this process, so a folder that another user owns, or
    that group or others may write, is refused, as are folders a compile could not use.
    """
    if folder is None:
        return
    folder = folder.absolute()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
        if info.st_uid != os.geteuid():
            raise SpeedError(f"--compile-cache {folder}: owned by another user (uid {info.st_uid}); compiled code "
                             "read from there would run in this node")
        if info.st_mode & 0o022:
            raise SpeedError(f"--compile-cache {folder}: group or others may write there (mode "
                             f"{info.st_mode & 0o777:o}); compiled code read from there would run in this node")
        if os.statvfs(folder).f_flag & os.ST_NOEXEC:
            raise SpeedError(f"--compile-cache {folder}: mounted noexec; compiled kernels could not be loaded")
        for sub, _, _ in os.walk(folder):  # inductor writes into the subfolders an earlier start made
            if not os.access(sub, os.W_OK | os.X_OK):
                raise SpeedError(f"--compile-cache {folder}: {sub} is not writable by this node")
        fd, probe = tempfile.mkstemp(prefix=".genserve-write-check-", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise SpeedError(f"--compile-cache {folder}: cannot use it ({exc.strerror or exc})") from exc
    free = shutil.disk_usage(folder).free
    if free < 2 << 30:
        log.warning("compile cache %s: only %.1f GiB free; inductor never deletes old entries", folder,
                    free / (1 << 30))
    if not compiling:
        log.warning("--compile-cache is set but --compile is not: nothing will be compiled into %s", folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    log.info("compile cache: %s", folder)


def build(config: NodeConfig):
    """Import torch, build cache, LoRA library and generator; returns (Node, Generator)."""
    import torch

    from gpu_node.generate import Generator
    from gpu_node.loras import LoraLibrary, scan
    from gpu_node.node import Capabilities, Node
    from gpu_node.pipeline_cache import PipelineCache
    from gpu_node.speed import check_device, prepare

    check_device(config.speed, config.device)
    if config.speed.quantize == "fp8" and config.host_memory_budget:
        raise SpeedError("--host-memory-gb cannot park FP8 weights (torchao tensors); use one or the other")
    cuda = config.device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        default_budget = int(total * 0.9)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        default_budget = total // 2
    dtype = torch.bfloat16 if cuda else torch.float32
    cache = PipelineCache(config.model_paths, config.device, dtype, config.memory_budget or default_budget,
                          config.host_memory_budget, lambda pipe: prepare(pipe, config.speed))
    loras = LoraLibrary(config.lora_dir, config.lora_cache_bytes)
    generator = Generator(cache, loras, config.png_compress_level, config.max_sequence_length, config.speed)
    modes = servable_modes(config.model_paths)

    def memory_free() -> int:
        if cuda:
            return int(torch.cuda.mem_get_info(torch.device(config.device))[0])
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def capabilities(full: bool) -> Capabilities:
        loaded = list(cache.loaded)
        sets = {model: key for model, key in generator.lora_sets.items() if model in loaded}
        return Capabilities(modes, int(total), memory_free(), loaded, scan(config.lora_dir) if full else None,
                            sets, cache.loads, cache.load_seconds, cache.evictions)

    for model_id in config.preload:
        if model_id == "flux1-redux-dev":
            cache.redux()
        else:
            cache.base(model_id)
    if config.speed.compile and config.speed.warmup:
        seconds = generator.warm([m for m in config.preload if m in cache.loaded], config.speed.warmup,
                                 config.batch, config.batch_pixels)
        log.info("warm-up at %s took %.1f s", config.speed.warmup, seconds)
    return Node(config, generator.render, capabilities, batch_runner=generator.render_batch), generator


def main(argv: list[str] | None = None) -> None:
    """Run one node until SIGTERM/SIGINT (the running step finishes, its task is re-queued)."""
    config = parse_config(argv)
    if not config.model_paths:
        raise SystemExit("genserve-node: no model folders found (use --models-dir or FLUX_MODEL_PATH)")
    try:
        use_compile_cache(config.compile_cache, config.speed.compile)
        node, _ = build(config)
    except SpeedError as exc:
        raise SystemExit(f"genserve-node: {exc}") from exc
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    log.info("node %s on %s serving %s", node.node_id, config.device, sorted(config.model_paths))
    node.run()


if __name__ == "__main__":
    main()
