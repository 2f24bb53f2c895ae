"""Activation capture on a real engine: rows equal HF layer outputs at every position, under chunked
prefill, prefix caching and steering; object-store handles; budget; owner death."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.testing.captures import (LAYERS, PROMPTS, SAMPLING, assert_matches_hf,
                                           assert_steered_capture_matches_hf, capture)
from steer_actors.testing.engines import engine_lifetime, rand_vec

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def capture_engine(ray_local, qwen3_path):
    # 32 batched tokens force chunked prefill of the 40- and 70-token prompts. Rows take the GPU's write
    # path (capture_direct: a device scatter into the mapped arena), here over host memory; the engines of
    # the other suites take the host path.
    yield from engine_lifetime(ray_local, model_name=qwen3_path, max_num_batched_tokens=32,
                               enable_prefix_caching=True, capture_budget_bytes=4 << 20,
                               env={"STEER_CAPTURE_DIRECT": "always"})


def test_capture_matches_hf_under_chunked_prefill(ray_local, capture_engine, oracles, qwen3_path):
    results, handles = capture(ray_local, capture_engine)
    assert_matches_hf(oracles["qwen3"], PROMPTS, results, handles)
    assert ray_local.get(capture_engine.capture_arena_stats.remote())["mapped_segments"] >= 1  # the direct path
    # Why the bound scales with |h + r|: against the exact (fp64) computation, HF's own fp32 run is off by
    # as much as our rows are (2-3e-5 at |h + r| ~ 17), so an absolute 1e-5 is below fp32's precision here.
    # The rows are as close to exact as HF fp32 is (within 2x, measured 1.0-1.2x).
    from steer_actors.testing.hf_oracle import HFOracle

    exact = HFOracle(qwen3_path, torch.float64)
    for prompt, res, h in zip(PROMPTS, results, handles):
        full = (prompt + res["token_ids"])[:-1]
        r64, r32 = exact.hidden_states(full), oracles["qwen3"].hidden_states(full)
        for layer in LAYERS:
            ours = (h.captures[layer][0]["hidden"].double() - r64[layer]).abs().max().item()
            hf32 = (r32[layer].double() - r64[layer]).abs().max().item()
            assert ours <= 2 * hf32 + 1e-7, (layer, ours, hf32)


def test_rows_in_a_batch_of_16_equal_each_request_captured_alone(ray_local, capture_engine):
    """A row landing in another request's region (the batch's order, its segments, chunked prefill) would
    show here: each request's rows from a 16-request batch capturing every layer equal the same request's
    rows captured alone for two layers (fp32 CPU: the same numbers, whatever the batch)."""
    import random

    rng = random.Random(7)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(8, 40))] for _ in range(16)]
    sp = dict(max_tokens=5, temperature=0.0, ignore_eos=True)
    _, batch = capture(ray_local, capture_engine, prompts, [0, 1, 2, 3], sp)
    for k in (0, 7, 15):
        _, (alone,) = capture(ray_local, capture_engine, prompts[k:k + 1], [1, 3], sp)
        for layer in (1, 3):
            a, b = batch[k].captures[layer][0]["hidden"], alone.captures[layer][0]["hidden"]
            assert torch.equal(a, b), (k, layer, (a - b).abs().max().item())


def test_requests_arriving_together_register_and_take_in_shared_round_trips(ray_local, capture_engine):
    """16 generate calls of one capturing request each, sent at once: their registrations (a request starts
    only once registered) and takes share round trips to the worker instead of one each; rows stay exact."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(5, 500) for _ in range(12)] for _ in range(16)]
    sp = dict(max_tokens=3, temperature=0.0, ignore_eos=True)
    before = ray_local.get(capture_engine.capture_stats.remote())["worker_calls"]
    results = ray_local.get([capture_engine.generate.remote([p], sp, [1]) for p in prompts])
    after = ray_local.get(capture_engine.capture_stats.remote())["worker_calls"]
    calls = {m: after[m] - before.get(m, 0) for m in ("steer_capture_register", "steer_capture_take")}
    assert all(0 < n < 16 for n in calls.values()), calls
    handles = fetch_captures_batch([CaptureHandle.from_wire(r[0]["captures"]) for r in results])
    _, alone = capture(ray_local, capture_engine, prompts[5:6], [1], sp)
    assert torch.equal(handles[5].captures[1][0]["hidden"], alone[0].captures[1][0]["hidden"])
    ray_local.get(capture_engine.release_captures.remote([h.capture_id for h in handles + alone]))


def test_capture_sees_prompt_positions_already_in_prefix_cache(ray_local, capture_engine, oracles):
    ray_local.get(capture_engine.generate.remote(PROMPTS, SAMPLING))  # fills the prefix cache
    results, handles = capture(ray_local, capture_engine)
    assert_matches_hf(oracles["qwen3"], PROMPTS, results, handles)


def test_capture_with_steering_equals_hf_with_hooks(ray_local, capture_engine, oracles):
    spec = SteeringSpec(layers={
        0: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(3), scale=4.0)]),
        2: LayerSteeringSpec(operations=[ProjectionCapSpec(vector=rand_vec(4), min=-0.2, max=0.2)]),
    })
    assert_steered_capture_matches_hf(ray_local, capture_engine, oracles["qwen3"], spec)


def test_budget_overflow_is_clear_and_engine_keeps_serving(ray_local, capture_engine, oracles):
    def stats():  # less the round-trip counters (the failed call's cleanup is one)
        return {k: v for k, v in ray_local.get(capture_engine.capture_stats.remote()).items() if k != "worker_calls"}

    stats0 = stats()
    big = [list(range(1, 400))] * 4
    with pytest.raises(ValueError, match="capture budget exceeded"):
        ray_local.get(capture_engine.generate.remote(big, dict(max_tokens=100), [0, 1, 2, 3]))
    assert stats() == stats0
    out = ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING))
    assert out[0]["token_ids"] == oracles["qwen3"].greedy(PROMPTS[0], SAMPLING["max_tokens"]).token_ids


def test_release_frees_budget_and_unknown_capture_is_clear(ray_local, capture_engine):
    results, handles = capture(ray_local, capture_engine, prompts=PROMPTS[:1])
    before = ray_local.get(capture_engine.capture_stats.remote())
    cid = results[0]["captures"]["capture_id"]
    data = ray_local.get(capture_engine.get_capture.remote(cid))
    torch.testing.assert_close(data["layers"][0], handles[0].captures[0][0]["hidden"])
    assert ray_local.get(capture_engine.release_captures.remote([cid])) == 1
    after = ray_local.get(capture_engine.capture_stats.remote())
    assert after["used_bytes"] == before["used_bytes"] - handles[0].nbytes
    with pytest.raises(ValueError, match="unknown capture"):
        ray_local.get(capture_engine.get_capture.remote(cid))
    with pytest.raises(ValueError, match="cannot capture layers"):
        ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING, [7]))


def test_capture_layers_must_be_layer_indices(ray_local, capture_engine):
    # 2.0 and True would pass as layers 2 and 1 in a set
    for bad in ([2.5], [2.0], [True], [None], 2.0, True, "2"):
        with pytest.raises(ValueError, match="capture_layers must be"):
            ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING, bad))
    with pytest.raises(ValueError, match=r"cannot capture layers \[5\]"):
        ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING, 5))
    # one int is one layer
    one = ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING, 2))
    (h,) = fetch_captures_batch([CaptureHandle.from_wire(one[0]["captures"])])
    listed = ray_local.get(capture_engine.generate.remote(PROMPTS[:1], SAMPLING, [2]))
    (ref,) = fetch_captures_batch([CaptureHandle.from_wire(listed[0]["captures"])])
    assert h.layer_indices == [2] and torch.equal(h.captures[2][0]["hidden"], ref.captures[2][0]["hidden"])
    ray_local.get(capture_engine.release_captures.remote([h.capture_id, ref.capture_id]))


def test_cancelled_capturing_call_leaves_nothing_held(ray_local, capture_engine):
    """A capturing call cancelled while its requests run (what the coordinator does when a client goes away):
    the worker's regions go back to its arena, nothing counts against the budget, and the engine serves on."""
    def held():
        arena = ray_local.get(capture_engine.capture_arena_stats.remote())
        stats = ray_local.get(capture_engine.capture_stats.remote())
        return arena["regions_in_use"], stats["used_bytes"], stats["reserved_bytes"]

    deadline = time.monotonic() + 30
    while (base := held())[0]:  # earlier tests' regions are freed in the background, once stored
        assert time.monotonic() < deadline, base
        time.sleep(0.1)
    # one prompt and layer: earlier tests of this engine hold most of its 4 MiB capture budget
    ref = capture_engine.generate.remote(PROMPTS[:1], dict(SAMPLING, max_tokens=440), [0])
    deadline = time.monotonic() + 60
    while held()[0] == 0:  # registered: its regions are out
        assert not ray_local.wait([ref], timeout=0)[0], ray_local.get(ref)  # it must not end (or fail) first
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ray_local.cancel(ref)
    with pytest.raises((ray_local.exceptions.TaskCancelledError, ray_local.exceptions.RayTaskError)):
        ray_local.get(ref, timeout=60)
    deadline = time.monotonic() + 30
    while held() != base:
        assert time.monotonic() < deadline, held()
        time.sleep(0.1)
    results, handles = capture(ray_local, capture_engine, prompts=PROMPTS[:1])
    assert handles[0].positions == list(range(len(PROMPTS[0]) + SAMPLING["max_tokens"] - 1))
    ray_local.get(capture_engine.release_captures.remote([h.capture_id for h in handles]))


def test_no_region_outlives_its_capture(ray_local, capture_engine):
    """Rows travel from the worker to the object store through a region of a /dev/shm segment that the
    worker keeps for its life (warm pages); the engine frees the region once the object store holds the
    copy, so a fetched capture leaves no region in use, and the next capture reuses the segment."""
    import glob

    def settled():  # the free follows the copy into the object store, in the background
        deadline = time.monotonic() + 30
        while (stats := ray_local.get(capture_engine.capture_arena_stats.remote()))["regions_in_use"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        return stats

    before = set(glob.glob("/dev/shm/steer-capture-*"))
    seen = []
    for _ in range(2):
        results = ray_local.get(capture_engine.generate.remote(PROMPTS, SAMPLING, LAYERS))
        handles = fetch_captures_batch([CaptureHandle.from_wire(r["captures"]) for r in results])
        assert all(h.captures[LAYERS[0]][0]["hidden"].shape[0] == len(h.positions) > 0 for h in handles)
        stats = settled()
        assert stats["file_segments"] >= 1 and stats["captures_pending"] == 0  # through shared memory
        seen.append((stats["segments"], stats["shared_bytes"]))
        ray_local.get(capture_engine.release_captures.remote([h.capture_id for h in handles]))
    assert seen[1] == seen[0]  # the same segment, reused: no growth
    assert set(glob.glob("/dev/shm/steer-capture-*")) <= before  # no name: nothing to leak if a worker is killed


def test_unset_max_tokens_captures_the_whole_sequence(ray_local, capture_engine):
    """vLLM runs an unset max_tokens to the model's length: the capture must cover every position then too
    (sized for max_model_len), never come back silently short."""
    sp = dict(temperature=0.0, ignore_eos=True, max_tokens=None)
    out = ray_local.get(capture_engine.generate.remote(PROMPTS[1:2], sp, [3]))[0]
    h = fetch_captures_batch([CaptureHandle.from_wire(out["captures"])])[0]
    n = len(PROMPTS[1]) + len(out["token_ids"]) - 1
    assert len(out["token_ids"]) > 16 and h.positions == list(range(n))
    assert h.captures[3][0]["hidden"].shape == (n, 256) and torch.isfinite(h.captures[3][0]["hidden"]).all()
    ray_local.get(capture_engine.release_captures.remote([h.capture_id]))


def test_captures_expire_after_their_ttl(ray_local, monkeypatch):
    """The registry on its own, on a clock the test moves: an entry lives through its TTL, is dropped
    past it, and its bytes return to the budget."""
    from types import SimpleNamespace

    from steer_actors.engine import capture_registry

    now = [1000.0]
    monkeypatch.setattr(capture_registry, "time", SimpleNamespace(monotonic=lambda: now[0]))
    reg = capture_registry.CaptureRegistry(budget_bytes=1 << 20, ttl_s=5.0)
    handle = reg.put("c1", {0: torch.ones(4, 8)}, [0, 1, 2, 3], [5, 6, 7, 8])
    now[0] += 5.0  # at the TTL: still there
    got = asyncio.run(reg.get("c1"))
    assert reg.stats()["used_bytes"] == 128 and torch.equal(got["layers"][0], torch.ones(4, 8))
    now[0] += 0.01
    with pytest.raises(ValueError, match="unknown capture"):
        asyncio.run(reg.get("c1"))
    assert reg.stats()["used_bytes"] == 0 and handle["nbytes"] == 128


def test_fetch_after_owner_died_fails_fast(ray_local, capture_engine):
    # > 100 KiB per layer, so the tensors live in the owner's store (Ray inlines smaller objects)
    results = ray_local.get(capture_engine.generate.remote(PROMPTS[2:], dict(SAMPLING, max_tokens=60), LAYERS))
    fresh = [CaptureHandle.from_wire(r["captures"]) for r in results]  # not fetched yet
    assert fresh[0].nbytes > 3 * (100 << 10)
    ray_local.kill(capture_engine)
    # ray.kill goes through the GCS while a call goes straight to the actor, so a call made right after
    # the kill can still be served: poll until the actor is gone
    deadline = time.monotonic() + 60
    with pytest.raises(ray_local.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray_local.get(capture_engine.capture_stats.remote(), timeout=60)
            time.sleep(0.2)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="engine replica that owned it died"):
        fetch_captures_batch(fresh, timeout_s=60)
    assert time.monotonic() - t < 60


@pytest.fixture(scope="module")
def tight_kv_engine(ray_local, qwen3_path):
    # 6 KV blocks of 128 tokens for three requests that grow to 3 blocks each: the scheduler must
    # preempt (recompute) while the requests decode
    yield from engine_lifetime(ray_local, model_name=qwen3_path, engine_kwargs={"num_gpu_blocks_override": 6},
                               enable_prefix_caching=False)


def test_capture_is_exact_through_a_real_preemption(ray_local, tight_kv_engine, oracles):
    prompts = [list(range(10, 110)), list(range(200, 320)), list(range(400, 540))]
    sampling = dict(max_tokens=240, temperature=0.0, ignore_eos=True)
    results, handles = capture(ray_local, tight_kv_engine, prompts=prompts, sampling=sampling)
    assert ray_local.get(tight_kv_engine.capture_stats.remote())["recomputed_rows"] > 0  # it was preempted
    for prompt, res in zip(prompts, results):
        assert res["token_ids"] == oracles["qwen3"].greedy(prompt, 240).token_ids
    assert_matches_hf(oracles["qwen3"], prompts, results, handles)


@pytest.fixture(scope="module")
def bf16_engine(ray_local, qwen3_path):
    yield from engine_lifetime(ray_local, model_name=qwen3_path, dtype="bfloat16", max_num_batched_tokens=32)


def test_bf16_model_captures_bf16_rows_equal_to_hf(ray_local, bf16_engine, qwen3_path):
    """``capture_dtype="model"``: a bf16 model's rows come back as bf16, half of fp32's bytes, through the
    shared segment and the object store, and equal HF's bf16 layer outputs up to bf16 kernel differences."""
    from steer_actors.testing.hf_oracle import HFOracle

    assert ray_local.get(bf16_engine.info.remote())["capture_dtype"] == "bfloat16"
    results, handles = capture(ray_local, bf16_engine)
    oracle = HFOracle(qwen3_path, dtype=torch.bfloat16)
    for prompt, res, h in zip(PROMPTS, results, handles):
        full = prompt + res["token_ids"]
        # the object store holds the whole region (prompt + max_tokens rows; one unused): 2 bytes a value
        assert h.dtype == "bfloat16" and h.nbytes == len(LAYERS) * len(full) * 256 * 2
        ref = oracle.hidden_states(full[:-1])
        for layer in LAYERS:
            got = h.captures[layer][0]["hidden"]
            assert got.dtype == torch.bfloat16 and got.shape == (len(full) - 1, 256)
            scale = ref[layer].float().abs().max().item()
            err = (got.float() - ref[layer].float()).abs().max().item()
            assert err <= 2e-2 * scale, f"layer {layer}: max error {err:.3g} of scale {scale:.3g}"
    # what the HTTP route serves: the same rows, from the engine's registry
    got = ray_local.get(bf16_engine.get_capture.remote(handles[0].capture_id))
    assert got["layers"][LAYERS[0]].dtype == torch.bfloat16
    assert torch.equal(got["layers"][LAYERS[0]], handles[0].captures[LAYERS[0]][0]["hidden"])
