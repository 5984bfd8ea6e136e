"""`genserve-node`: one process per device, connected to the broker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from genserve import logs
from gpu_node.catalog import resolve_model_paths, servable_modes
from gpu_node.config import NodeConfig

log = logging.getLogger(__name__)


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
    ap.add_argument("--png-level", type=int, default=int(env.get("GENSERVE_PNG_LEVEL", d.png_compress_level)),
                    help="zlib level for result PNGs, 0-9 (env GENSERVE_PNG_LEVEL)")
    ap.add_argument("--max-sequence-length", type=int,
                    default=int(env.get("GENSERVE_MAX_SEQUENCE_LENGTH", d.max_sequence_length)))
    ap.add_argument("--curve-secret", default=env.get("GENSERVE_CURVE_SECRET"),
                    help="this node's secret key file (env GENSERVE_CURVE_SECRET)")
    ap.add_argument("--curve-server", default=env.get("GENSERVE_CURVE_SERVER"),
                    help="the broker's public key file (env GENSERVE_CURVE_SERVER)")
    ap.add_argument("--log-level", default=env.get("LOG_LEVEL", "INFO"))
    ap.add_argument("--log-format", choices=logs.FORMATS, default=env.get("GENSERVE_LOG_FORMAT", "text").lower(),
                    help="text lines or JSON lines with task_id/node_id/key_id fields (env GENSERVE_LOG_FORMAT)")
    a = ap.parse_args(argv)
    if a.log_format not in logs.FORMATS:  # argparse checks choices on the command line only
        ap.error(f"GENSERVE_LOG_FORMAT must be one of {list(logs.FORMATS)}")
    logs.setup(a.log_level, a.log_format, "node")
    device = a.device
    if device == "cuda" and a.device_index is not None:
        device = f"cuda:{a.device_index}"
    only = tuple(m.strip() for m in a.models.split(",") if m.strip())
    paths = resolve_model_paths(Path(a.models_dir) if a.models_dir else None, env, device, only)
    return NodeConfig(
        broker=a.broker, device=device, model_paths=paths,
        lora_dir=Path(a.lora_dir) if a.lora_dir else None, node_id=a.node_id,
        heartbeat_interval=a.heartbeat, liveness=a.liveness, shutdown_grace=a.shutdown_grace,
        preload=tuple(m.strip() for m in a.preload.split(",") if m.strip()),
        memory_budget=int(a.memory_budget_gb * (1 << 30)), png_compress_level=a.png_level,
        lora_cache_bytes=int(a.lora_cache_gb * (1 << 30)),
        max_sequence_length=a.max_sequence_length,
        curve_secret_file=Path(a.curve_secret) if a.curve_secret else None,
        curve_server_public_file=Path(a.curve_server) if a.curve_server else None,
    )


def build(config: NodeConfig):
    """Import torch, build cache, LoRA library and generator; returns (Node, Generator)."""
    import torch

    from gpu_node.generate import Generator
    from gpu_node.loras import LoraLibrary, scan
    from gpu_node.node import Capabilities, Node
    from gpu_node.pipeline_cache import PipelineCache

    cuda = config.device.startswith("cuda")
    if cuda:
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        default_budget = int(total * 0.9)
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        default_budget = total // 2
    dtype = torch.bfloat16 if cuda else torch.float32
    cache = PipelineCache(config.model_paths, config.device, dtype, config.memory_budget or default_budget)
    loras = LoraLibrary(config.lora_dir, config.lora_cache_bytes)
    generator = Generator(cache, loras, config.png_compress_level, config.max_sequence_length)
    modes = servable_modes(config.model_paths)

    def memory_free() -> int:
        if cuda:
            return int(torch.cuda.mem_get_info(torch.device(config.device))[0])
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def capabilities(full: bool) -> Capabilities:
        return Capabilities(modes, int(total), memory_free(), list(cache.loaded),
                            scan(config.lora_dir) if full else None, cache.loads, cache.load_seconds,
                            cache.evictions)

    for model_id in config.preload:
        if model_id == "flux1-redux-dev":
            cache.redux()
        else:
            cache.base(model_id)
    return Node(config, generator.run, capabilities), generator


def main(argv: list[str] | None = None) -> None:
    """Run one node until SIGTERM/SIGINT (the running step finishes, its task is re-queued)."""
    config = parse_config(argv)
    if not config.model_paths:
        raise SystemExit("genserve-node: no model folders found (use --models-dir or FLUX_MODEL_PATH)")
    node, _ = build(config)
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    log.info("node %s on %s serving %s", node.node_id, config.device, sorted(config.model_paths))
    node.run()


if __name__ == "__main__":
    main()
