"""Starting the vLLM engine a :class:`~steer_actors.engine.actor.SteerEngine` wraps: the engine arguments one
:class:`~steer_actors.config.VLLMSteeringConfig` gives (the data plane's settings travel to the workers in
``additional_config``), the environment its processes need, and the clean-up of engines that died here."""

from __future__ import annotations

import logging
import os
from typing import Any

from steer_actors import vllm_compat
from steer_actors.config import VLLMSteeringConfig

log = logging.getLogger(__name__)

# what the workers run of ours: their hash goes into vLLM's compile-cache key
_DATA_PLANE = ("ops", "worker", "vllm_compat")


def data_plane_hash() -> str:
    """Hash of the data-plane sources: it goes into vLLM's compile-cache key (via additional_config),
    so graphs compiled by stock vLLM or by another version of the patch are never reused."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).parent.parent
    h = hashlib.sha256()
    for pkg in _DATA_PLANE:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def engine_kwargs(cfg: VLLMSteeringConfig, device: str) -> dict[str, Any]:
    """vLLM's engine arguments for ``cfg``; ``engine_kwargs`` of the config win."""
    kwargs: dict[str, Any] = dict(
        model=cfg.resolved_model(),
        tensor_parallel_size=cfg.tensor_parallel_size,
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        worker_extension_cls="steer_actors.worker.extension.SteerWorkerExtension",
        additional_config={vllm_compat.CONFIG_KEY: {
            "patch": data_plane_hash(),
            "layers": cfg.bootstrap_layers,
            "max_ops_per_layer": cfg.max_ops_per_layer,
            "request_slots": cfg.max_steering_slots,
            "capture_rows": cfg.capture_rows_per_step,
            "capture_dtype": cfg.capture_dtype,
        }},
    )
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    kwargs["distributed_executor_backend"] = cfg.distributed_executor_backend or (
        "ray" if device == "cuda" and cfg.tensor_parallel_size > 1 else "mp")
    kwargs.update(cfg.engine_kwargs)
    return kwargs


def set_environment(cfg: VLLMSteeringConfig, device: str) -> None:
    os.environ.update(cfg.env)
    if device == "cuda":  # never fork a process that may already hold a CUDA context
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_space_gib))
        if cfg.cpu_omp_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_omp_threads_bind


def start_async_llm(cfg: VLLMSteeringConfig, device: str) -> Any:
    """Sweep what engines that died here left behind, then start vLLM's ``AsyncLLM`` for ``cfg`` (under the
    Ray executor, in the placement group this actor was scheduled in, if any)."""
    set_environment(cfg, device)
    kwargs = engine_kwargs(cfg, device)
    pg = None
    if kwargs["distributed_executor_backend"] == "ray":  # the group the coordinator scheduled this actor in
        import ray

        pg = ray.util.get_current_placement_group()
    from steer_actors.engine import reaper
    from steer_actors.worker.capture.arena import sweep_orphan_files

    swept = sweep_orphan_files()  # files of an engine that died here before it handed its captures on
    if swept:
        log.warning("removed %d capture files of dead engines", len(swept))
    swept = reaper.sweep_dead_engines()
    if swept:
        log.warning("removed %d shared-memory files of dead engines", len(swept))
    engine = vllm_compat.make_async_llm(vllm_compat.engine_args(**kwargs), pg)
    reaper.start_for_children()
    try:
        reaper.note_shared_memory()
    except Exception as e:  # best effort: cleanup after a crash, never a reason not to serve
        log.warning("could not note the engine's shared memory: %s", e)
    return engine


def freeze_gc_heap() -> None:
    """What vLLM's own API server does once its engine is up: move the startup heap (the engine, its model
    config, Ray's and torch's modules) out of the collector's sight, so a full collection while serving walks
    only what serving made. Full collections of the whole heap are a suspect in the 8B update latency's
    spikes (the engine actor's event loop runs the change's build)."""
    try:
        from vllm.utils.gc_utils import freeze_gc_heap as freeze
    except ImportError:
        import gc

        gc.collect()
        freeze = gc.freeze
    freeze()
