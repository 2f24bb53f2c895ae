"""Engine actors and inputs for tests, demos and benchmarks on a local Ray.

Ray and vLLM are imported only when an engine starts, so this module loads without them.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch

# The test cluster's head: `ray start` on loopback, so other driver processes (`serve run`, job-style
# scripts) can attach to the same cluster as the tests.
RAY_PORT = int(os.environ.get("STEER_TEST_RAY_PORT", "6390"))
RAY_ADDRESS = f"127.0.0.1:{RAY_PORT}"


def rand_vec(seed: int, hidden: int = 256, norm: float = 1.0) -> torch.Tensor:
    """A reproducible random direction of length ``norm``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    return v / v.norm() * norm


def start_engine(ray: Any, env: dict | None = None, **config: Any) -> Any:
    """An engine actor for ``config`` (fp32, eager, 512 tokens unless given), started and answering.
    ``env``: environment of the engine actor and so of its vLLM workers."""
    from steer_actors.engine.actor import engine_actor_class

    config.setdefault("dtype", "float32")
    config.setdefault("enforce_eager", True)  # compiled mode has its own tests; eager starts twice as fast
    config.setdefault("max_model_len", 512)
    cls = engine_actor_class()
    if env:
        cls = cls.options(runtime_env={"env_vars": env})
    actor = cls.remote(config)
    ray.get(actor.info.remote())
    return actor


def engine_lifetime(ray: Any, **config: Any) -> Iterator[Any]:
    """Body of an engine fixture: ``yield from engine_lifetime(ray_local, model_name=...)``. The
    engine's vLLM processes go with its actor (see steer_actors.engine.reaper)."""
    actor = start_engine(ray, **config)
    try:
        yield actor
    finally:
        ray.kill(actor)
