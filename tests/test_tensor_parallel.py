"""TP=2 on CPU (mp executor, one OpenMP thread per rank), compiled (torch.compile, as served), steers
exactly like TP=1 eager: every rank commits each change into the graph's buffers."""

import pytest

from steer_actors.testing.engines import engine_lifetime
from steer_actors.testing.parity import against_reference

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tp2_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-cache-tp2")


@pytest.fixture(scope="module")
def qwen3_tp2(ray_local, qwen3_path, tp2_cache):
    yield from engine_lifetime(ray_local, model_name=qwen3_path, tensor_parallel_size=2, enforce_eager=False,
                               cpu_omp_threads_bind="0|1", env={"VLLM_CACHE_ROOT": str(tp2_cache)})


def test_tp2_matches_tp1_under_steering(ray_local, qwen3_tp2, qwen3_engine, oracles, tp2_cache):
    compiled = {p.name for p in (tp2_cache / "torch_compile_cache").rglob("rank_*")}
    assert {"rank_0_0", "rank_1_0"} <= compiled, compiled  # each rank runs a compiled graph
    for name, _, _, tp2, tp1 in against_reference(ray_local, oracles["qwen3"], qwen3_tp2, qwen3_engine):
        assert [r["token_ids"] for r in tp2] == [r["token_ids"] for r in tp1], name
        ranks = ray_local.get(qwen3_tp2.worker_state.remote())
        assert sorted(r["rank"] for r in ranks) == [0, 1]
        assert len({(r["version"], r["fingerprint"]) for r in ranks}) == 1
