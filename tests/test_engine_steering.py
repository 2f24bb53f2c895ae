"""A real vLLM engine in a Ray actor steers exactly as HF transformers with the ops written out by the
oracle (fp32). Engines are shared per pytest session or module; every assertion is on tokens or logprobs.
"""

from __future__ import annotations

import pytest
import torch

from steer_actors.specs import AddSpec, LayerSteeringSpec, SteeringSpec
from steer_actors.testing.engines import engine_lifetime, rand_vec
from steer_actors.testing.parity import MAX_TOKENS, PROMPTS, SAMPLING, apply, generate, parity_specs

pytestmark = pytest.mark.engine

LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def llama_engine(ray_local, llama_path):
    # Only layers 1 and 2 are patched: the others must cost nothing and refuse steering.
    yield from engine_lifetime(ray_local, model_name=llama_path, bootstrap_layers=[1, 2])


@pytest.fixture(scope="module")
def engines(qwen3_engine, llama_engine):
    return {"qwen3": qwen3_engine, "llama": llama_engine}


@pytest.mark.parametrize("model", ["qwen3", "llama"])
def test_hf_parity_per_op(ray_local, engines, oracles, model):
    engine, oracle = engines[model], oracles[model]
    prompt_ids = [oracle.tokenizer(p).input_ids for p in PROMPTS]
    baseline = [oracle.greedy(ids, MAX_TOKENS) for ids in prompt_ids]
    for name, spec in parity_specs(oracle, prompt_ids).items():
        apply(ray_local, engine, spec)
        got = generate(ray_local, engine, prompt_ids)
        for ids, g, base in zip(prompt_ids, got, baseline):
            want = oracle.greedy(ids, MAX_TOKENS, spec)
            assert g["token_ids"] == want.token_ids, f"{model}/{name}: tokens differ from HF"
            err = max(abs(a - b) for a, b in zip(g["logprobs"], want.logprobs))
            assert err < LOGPROB_TOL, f"{model}/{name}: logprob error {err:.2e}"
        # the op must actually change something, or parity proves nothing
        changed = any(g["token_ids"] != b.token_ids for g, b in zip(got, baseline))
        assert changed, f"{model}/{name}: steering had no effect on tokens"
    apply(ray_local, engine, None)


def test_clear_restores_unsteered_exactly(ray_local, qwen3_engine, oracles):
    before = generate(ray_local, qwen3_engine, PROMPTS)
    ids = [oracles["qwen3"].tokenizer(p).input_ids for p in PROMPTS]
    spec = parity_specs(oracles["qwen3"], ids)["combo"]
    apply(ray_local, qwen3_engine, spec)
    steered = generate(ray_local, qwen3_engine, PROMPTS)
    assert [s["token_ids"] for s in steered] != [b["token_ids"] for b in before]
    for clear in ({"action": "clear"}, {"action": "clear", "layer": 1}):
        apply(ray_local, qwen3_engine, spec)
        ray_local.get(qwen3_engine.edit.remote(clear))
        if clear.get("layer") == 1:
            ray_local.get(qwen3_engine.edit.remote({"action": "clear", "layer": 2}))
        after = generate(ray_local, qwen3_engine, PROMPTS)
        assert [a["token_ids"] for a in after] == [b["token_ids"] for b in before]
        assert [a["logprobs"] for a in after] == [b["logprobs"] for b in before]
        assert all(a["text"] == b["text"] for a, b in zip(after, before))


def test_setters_edit_in_place_and_versions_advance(ray_local, qwen3_engine):
    apply(ray_local, qwen3_engine, None)
    v0 = ray_local.get(qwen3_engine.info.remote())["spec_version"]
    add = {"kind": "add", "vector": rand_vec(7).tolist(), "scale": 4.0}
    r1 = ray_local.get(qwen3_engine.edit.remote({"action": "set", "layer": 3, "op": add}))
    state = ray_local.get(qwen3_engine.worker_state.remote())
    assert r1["spec_version"] == v0 + 1 and all(s["version"] == v0 + 1 for s in state)
    exported = SteeringSpec.from_wire(ray_local.get(qwen3_engine.export_spec.remote())["spec"])
    assert list(exported.layers) == [3] and torch.equal(exported.layers[3].operations[0].vector, rand_vec(7))
    out = generate(ray_local, qwen3_engine, PROMPTS[:1])[0]
    assert out["spec_version"] == v0 + 1 and out["spec_fingerprint"] == r1["spec_fingerprint"]
    apply(ray_local, qwen3_engine, None)


BAD_EDITS = {
    "wrong dimension": ({"action": "set", "layer": 1, "op": {"kind": "add", "vector": [1.0] * 255}}, "hidden size"),
    "NaN": ({"action": "set", "layer": 1, "op": {"kind": "add", "vector": [float("nan")] * 256}}, "NaN"),
    "Inf": ({"action": "set", "layer": 1, "op": {"kind": "cap", "vector": [float("inf")] * 256, "max": 1.0}}, "Inf"),
    "zero direction": ({"action": "set", "layer": 1, "op": {"kind": "ablation", "vector": [0.0] * 256}}, "zero norm"),
    "layer out of range": ({"action": "set", "layer": 4, "op": {"kind": "add", "vector": [1.0] * 256}}, "out of range"),
    "negative layer": ({"action": "set", "layer": -1, "op": {"kind": "add", "vector": [1.0] * 256}}, ">= 0"),
    "min > max": ({"action": "set", "layer": 1, "op": {"kind": "cap", "vector": [1.0] * 256, "min": 1, "max": 0}},
                  "min"),
    "cap without bound": ({"action": "set", "layer": 1, "op": {"kind": "cap", "vector": [1.0] * 256}}, "needs min"),
    "too many ops": ({"action": "replace", "spec": {"layers": {"1": {"operations": [
        {"kind": "add", "vector": [1.0] * 256}] * 5}}}}, "max_ops_per_layer"),
}


def test_bad_inputs_raise_and_change_nothing(ray_local, qwen3_engine):
    spec = SteeringSpec(layers={2: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(5), scale=5.0)])})
    state = apply(ray_local, qwen3_engine, spec)
    before = generate(ray_local, qwen3_engine, PROMPTS)
    for name, (edit, message) in BAD_EDITS.items():
        with pytest.raises(ValueError, match=message):
            ray_local.get(qwen3_engine.edit.remote(edit))
        info = ray_local.get(qwen3_engine.info.remote())
        assert (info["spec_version"], info["spec_fingerprint"]) == (state["spec_version"], state["spec_fingerprint"])
    assert all(s["version"] == state["spec_version"] for s in ray_local.get(qwen3_engine.worker_state.remote()))
    after = generate(ray_local, qwen3_engine, PROMPTS)
    assert [(a["token_ids"], a["logprobs"]) for a in after] == [(b["token_ids"], b["logprobs"]) for b in before]
    apply(ray_local, qwen3_engine, None)


def test_unpatched_layer_refuses_steering(ray_local, llama_engine):
    info = ray_local.get(llama_engine.info.remote())
    assert info["steerable_layers"] == [1, 2]
    with pytest.raises(ValueError, match="not steerable"):
        ray_local.get(llama_engine.edit.remote(
            {"action": "set", "layer": 0, "op": {"kind": "add", "vector": [1.0] * 256}}))


def test_chat_applies_template_and_steers(ray_local, qwen3_engine, oracles):
    conv = [[{"role": "user", "content": "Tell me about the sea"}]]
    tok = oracles["qwen3"].tokenizer
    ids = tok.apply_chat_template(conv[0], tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    spec = SteeringSpec(layers={1: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(11), scale=6.0)])})
    apply(ray_local, qwen3_engine, spec)
    out = ray_local.get(qwen3_engine.chat.remote(conv, SAMPLING))[0]
    assert out["prompt_token_ids"] == ids
    assert out["token_ids"] == oracles["qwen3"].greedy(ids, MAX_TOKENS, spec).token_ids
    apply(ray_local, qwen3_engine, None)
