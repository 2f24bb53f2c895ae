"""Engine replicas of one app: where they run, how to find them again, whether they take traffic.

Engines are named, detached Ray actors with unlimited restarts, so that

* a coordinator that restarts (Serve replaces a dead replica) finds the same engines by name and
  neither loses nor duplicates them;
* an engine that dies is restarted by Ray in place (same name and handle), empty; the coordinator
  keeps it out of rotation until it has loaded the current spec version.

GPU engines on vLLM's Ray executor get one placement group each: a bundle for the engine actor and
one GPU bundle per TP rank (PACK by default, so TP stays inside a node); vLLM uses it instead of
creating its own. Other engines are spread across nodes unless their ``actor_options`` say otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from steer_actors.config import VLLMSteeringConfig
from steer_actors.engine.actor import engine_actor_class

log = logging.getLogger(__name__)
NAMESPACE = "steer_actors"


@dataclass
class Replica:
    index: int
    handle: Any
    name: str | None = None
    layers: set[int] = field(default_factory=set)
    healthy: bool = False  # in rotation: up, and committed to the coordinator's current version
    in_flight: int = 0
    recovering: Any = None  # asyncio task restoring this replica


def on_gpus(cfg: VLLMSteeringConfig) -> bool:
    """Decided from the cluster, not from this process: the coordinator may run on a CPU-only head."""
    if cfg.device != "auto":
        return cfg.device == "cuda"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def uses_ray_executor(cfg: VLLMSteeringConfig) -> bool:
    return (cfg.distributed_executor_backend or ("ray" if on_gpus(cfg) and cfg.tensor_parallel_size > 1
                                                 else "mp")) == "ray"


def _placement(cfg: VLLMSteeringConfig, name: str) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if not uses_ray_executor(cfg):
        return {"scheduling_strategy": "SPREAD"}
    pg_name = f"{name}-pg"
    try:
        pg = ray.util.get_placement_group(pg_name)  # left by an earlier coordinator
    except ValueError:
        # bundle 0 hosts the engine actor, so it carries the resources that pin the actor to a node
        pin = dict(cfg.actor_options.get("resources", {}))
        bundles = [{"CPU": 0.001, **pin}] + [{"GPU": 1.0}] * cfg.tensor_parallel_size
        pg = placement_group(bundles, strategy=cfg.placement_strategy, name=pg_name, lifetime="detached")
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def start_replica(cfg: VLLMSteeringConfig, app: str, i: int) -> Replica:
    """Create engine ``i`` of the app, or attach to the one an earlier coordinator created."""
    rcfg = cfg.for_replica(i)
    name = f"{app}-engine-{i}"
    # mp engines run their GPU workers in the actor's own process tree, so the actor claims the GPUs
    # (and Ray sets CUDA_VISIBLE_DEVICES); Ray-executor workers claim theirs in the placement group.
    gpus = rcfg.tensor_parallel_size if on_gpus(rcfg) and not uses_ray_executor(rcfg) else 0
    opts: dict[str, Any] = dict(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                max_restarts=-1, max_task_retries=0, num_cpus=0, num_gpus=gpus)
    opts.update(_placement(rcfg, name))
    opts.update(rcfg.actor_options)
    handle = engine_actor_class().options(**opts).remote(rcfg.model_dump())
    return Replica(i, handle, name)


def start_replicas(cfg: VLLMSteeringConfig, app: str) -> list[Replica]:
    return [start_replica(cfg, app, i) for i in range(cfg.num_replicas)]


def replace_replica(cfg: VLLMSteeringConfig, app: str, old: Replica, timeout_s: float = 120.0) -> Replica:
    """Stop an engine that was started with another config and start one with ``cfg`` under its name."""
    import time

    import ray

    stop_replicas([old])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the name is free once the old actor is gone
        try:
            ray.get_actor(old.name, namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    return start_replica(cfg, app, old.index)


def stop_replicas(replicas: list[Replica]) -> None:
    """Kill the named engines (and their placement groups): the app is going away."""
    import ray

    for r in replicas:
        if r.name is None:
            continue
        try:
            ray.kill(r.handle, no_restart=True)
        except Exception as e:  # already gone
            log.debug("kill %s: %s", r.name, e)
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(f"{r.name}-pg"))
        except Exception:
            pass
