"""Shared fixtures: one local Ray, tiny models, and engine actors shared across tests (an engine
start costs ~30 s on this 2-core machine)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test cluster listens on loopback only; every driver (pytest, `serve run`, job-style scripts)
# inherits this, so none needs Ray's token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# tests/multinode runs in a pytest process of its own (see test_multinode.py)
collect_ignore = [] if os.environ.get("STEER_MULTINODE") else ["multinode"]

RAY_PORT = int(os.environ.get("STEER_TEST_RAY_PORT", "6390"))
RAY_ADDRESS = f"127.0.0.1:{RAY_PORT}"


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray head started with `ray start`, so other driver processes (`serve run`, job-style
    scripts) can attach to the same cluster as the tests."""
    import ray

    subprocess.run(["ray", "stop", "--force"], capture_output=True)
    subprocess.run(["ray", "start", "--head", f"--port={RAY_PORT}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    ray.init(address=RAY_ADDRESS, log_to_driver=False)
    yield ray
    ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)


@pytest.fixture(scope="session")
def qwen3_path() -> str:
    from steer_actors.testing import build_tiny_model

    return build_tiny_model("qwen3")


@pytest.fixture(scope="session")
def llama_path() -> str:
    from steer_actors.testing import build_tiny_model

    return build_tiny_model("llama")


def start_engine(ray, env: dict | None = None, **config):
    """``env``: environment of the engine actor and so of its vLLM workers."""
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


def engine_lifetime(ray, **config):
    """Body of an engine fixture: ``yield from engine_lifetime(ray_local, model_name=...)``. The
    engine's vLLM processes go with its actor (see steer_actors.engine.reaper)."""
    actor = start_engine(ray, **config)
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="session")
def qwen3_engine(ray_local, qwen3_path):
    yield from engine_lifetime(ray_local, model_name=qwen3_path)


@pytest.fixture(scope="session")
def oracles(qwen3_path, llama_path):
    from steer_actors.testing.hf_oracle import HFOracle

    return {"qwen3": HFOracle(qwen3_path), "llama": HFOracle(llama_path)}


def rand_vec(seed: int, hidden: int = 256, norm: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(hidden, generator=g)
    return v / v.norm() * norm
