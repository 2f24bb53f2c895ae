"""Shared fixtures: one local Ray, tiny models, and engine actors shared across tests (an engine
start costs ~30 s on this 2-core machine)."""

from __future__ import annotations

import os
import subprocess

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test cluster listens on loopback only; every driver (pytest, `serve run`, job-style scripts)
# inherits this, so none needs Ray's token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from steer_actors.testing.engines import RAY_ADDRESS, RAY_PORT, engine_lifetime  # noqa: E402


# tests/multinode runs in a pytest process of its own (see test_multinode.py)
collect_ignore = [] if os.environ.get("STEER_MULTINODE") else ["multinode"]


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


@pytest.fixture(scope="session")
def qwen3_engine(ray_local, qwen3_path):
    yield from engine_lifetime(ray_local, model_name=qwen3_path)


@pytest.fixture(scope="session")
def oracles(qwen3_path, llama_path):
    from steer_actors.testing.hf_oracle import HFOracle

    return {"qwen3": HFOracle(qwen3_path), "llama": HFOracle(llama_path)}



@pytest.fixture(scope="session")
def deep_qwen3_path(qwen3_path, tmp_path_factory) -> str:
    """The tiny Qwen3 made 10 layers deep (chatspace's examples steer layers up to 8)."""
    from steer_actors.testing.chatspace import build_deep_tiny_qwen3

    return build_deep_tiny_qwen3(qwen3_path, str(tmp_path_factory.mktemp("deep-qwen3")))


@pytest.fixture(scope="session")
def deep_oracle(deep_qwen3_path):
    from steer_actors.testing.hf_oracle import HFOracle

    return HFOracle(deep_qwen3_path)
