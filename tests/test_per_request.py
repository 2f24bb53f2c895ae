"""Per-request steering in mixed batches: each request equals itself run alone and HF with its
spec; global ops compose before request ops; more distinct specs than slots all complete; compiled
mode; prefix-cache isolation."""

from __future__ import annotations

import pytest

from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.testing.engines import engine_lifetime, rand_vec
from steer_actors.testing.hf_oracle import combine

pytestmark = pytest.mark.engine

SAMPLING = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
L = lambda *ops: LayerSteeringSpec(operations=list(ops))  # noqa: E731


def request_specs() -> list[SteeringSpec | None]:
    return [
        None,
        SteeringSpec(layers={1: L(AddSpec(vector=rand_vec(201), scale=6.0))}),
        SteeringSpec(layers={2: L(ProjectionCapSpec(vector=rand_vec(202), min=1.0, max=1.5))}),
        SteeringSpec(layers={0: L(AblationSpec(vector=rand_vec(203), scale=4.0)),
                             3: L(AddSpec(vector=rand_vec(204), scale=-5.0))}),
    ]


def run_concurrently(ray, engine, prompts, specs):
    refs = [engine.generate.remote([p], SAMPLING, None, s.to_wire() if s else None) for p, s in zip(prompts, specs)]
    return [r[0] for r in ray.get(refs)]


def prompts_for(oracle, n):
    base = ["Hello world, the sea", "Beautiful is better than ugly.", "Once upon a time there was",
            "Namespaces are one honking great idea"]
    return [oracle.tokenizer(base[i % len(base)]).input_ids + [100 + i] for i in range(n)]


@pytest.mark.parametrize("with_global", [False, True])
def test_mixed_batch_matches_alone_and_hf(ray_local, qwen3_engine, oracles, with_global):
    oracle = oracles["qwen3"]
    g = SteeringSpec(layers={1: L(AddSpec(vector=rand_vec(300), scale=3.0))}) if with_global else None
    ray_local.get(qwen3_engine.apply_spec.remote((g or SteeringSpec()).to_wire()))
    try:
        prompts = prompts_for(oracle, 8)
        specs = [request_specs()[i % 4] for i in range(8)]
        mixed = run_concurrently(ray_local, qwen3_engine, prompts, specs)
        for p, s, out in zip(prompts, specs, mixed):
            alone = ray_local.get(qwen3_engine.generate.remote([p], SAMPLING, None, s.to_wire() if s else None))[0]
            assert out["token_ids"] == alone["token_ids"]
            assert out["token_ids"] == oracle.greedy(p, SAMPLING["max_tokens"], combine(g, s)).token_ids
            assert out["request_spec_fingerprint"] == (s.fingerprint() if s else None)
        # the request specs really change tokens (or parity above proves nothing)
        assert sum(mixed[i]["token_ids"] != oracle.greedy(prompts[i], SAMPLING["max_tokens"], g).token_ids
                   for i in range(8) if specs[i]) >= 4
    finally:
        ray_local.get(qwen3_engine.apply_spec.remote(SteeringSpec().to_wire()))


@pytest.fixture(scope="module")
def two_slot_compiled(ray_local, qwen3_path):
    yield from engine_lifetime(ray_local, model_name=qwen3_path, enforce_eager=False, max_steering_slots=2,
                               enable_prefix_caching=True)


def test_three_times_more_specs_than_slots_compiled(ray_local, two_slot_compiled, oracles):
    oracle = oracles["qwen3"]
    prompts = prompts_for(oracle, 6)
    specs = [SteeringSpec(layers={1 + i % 3: L(AddSpec(vector=rand_vec(400 + i), scale=6.0))}) for i in range(6)]
    outs = run_concurrently(ray_local, two_slot_compiled, prompts, specs)
    for p, s, out in zip(prompts, specs, outs):
        assert out["token_ids"] == oracle.greedy(p, SAMPLING["max_tokens"], s).token_ids


def test_prefix_cache_never_serves_kv_of_other_steering(ray_local, two_slot_compiled, oracles):
    oracle = oracles["qwen3"]
    prompt = list(range(300, 348))  # 48 tokens: several full KV blocks to reuse
    spec = SteeringSpec(layers={0: L(AddSpec(vector=rand_vec(500), scale=6.0))})
    plain = ray_local.get(two_slot_compiled.generate.remote([prompt], SAMPLING))[0]
    per_request = ray_local.get(two_slot_compiled.generate.remote([prompt], SAMPLING, None, spec.to_wire()))[0]
    ray_local.get(two_slot_compiled.apply_spec.remote(spec.to_wire()))
    try:
        global_ = ray_local.get(two_slot_compiled.generate.remote([prompt], SAMPLING))[0]
    finally:
        ray_local.get(two_slot_compiled.apply_spec.remote(SteeringSpec().to_wire()))
    want = oracle.greedy(prompt, SAMPLING["max_tokens"], spec).token_ids
    assert plain["token_ids"] == oracle.greedy(prompt, SAMPLING["max_tokens"]).token_ids
    assert per_request["token_ids"] == want and global_["token_ids"] == want


def test_bad_request_spec_is_clear(ray_local, qwen3_engine, oracles):
    bad = {"layers": {"1": {"operations": [{"kind": "add", "vector": [1.0] * 3}]}}}
    with pytest.raises(ValueError, match="hidden size"):
        ray_local.get(qwen3_engine.generate.remote([[1, 2, 3]], SAMPLING, None, bad))
    out = ray_local.get(qwen3_engine.generate.remote([[1, 2, 3]], SAMPLING))
    assert out[0]["token_ids"] == oracles["qwen3"].greedy([1, 2, 3], SAMPLING["max_tokens"]).token_ids


def test_one_call_with_more_distinct_specs_than_slots_is_refused_not_hung(ray_local, two_slot_compiled, oracles):
    specs = [SteeringSpec(layers={1: L(AddSpec(vector=rand_vec(600 + i), scale=6.0))}) for i in range(3)]
    wires = [s.to_wire() for s in specs]
    with pytest.raises(ValueError, match="max_steering_slots"):
        ray_local.get(two_slot_compiled.generate.remote([[1, 2, 3]] * 3, SAMPLING, None, wires), timeout=60)
    out = ray_local.get(two_slot_compiled.generate.remote([[1, 2, 3]] * 2, SAMPLING, None, wires[:2]), timeout=120)
    want = [oracles["qwen3"].greedy([1, 2, 3], SAMPLING["max_tokens"], s).token_ids for s in specs[:2]]
    assert [o["token_ids"] for o in out] == want and want[0] != want[1]


def test_one_call_mixing_specs_across_its_prompts(ray_local, qwen3_engine, oracles):
    """A single generate call whose prompts repeat specs: shared slots, each prompt steered by its own."""
    oracle = oracles["qwen3"]
    prompts = prompts_for(oracle, 8)
    specs = [request_specs()[i % 4] for i in range(8)]
    for _ in range(2):  # twice: the slots must come back after the first call
        outs = ray_local.get(qwen3_engine.generate.remote(prompts, SAMPLING, None,
                                                          [s.to_wire() if s else None for s in specs]), timeout=120)
        for p, s, out in zip(prompts, specs, outs):
            assert out["token_ids"] == oracle.greedy(p, SAMPLING["max_tokens"], s).token_ids
