"""The embedded client (``VLLMSteerModel(cfg)``) and its app's HTTP routes: every setter and clear, chat,
logprobs, n > 1, the capture forms, chatspace-form specs over HTTP, unknown fields refused, and the
smoke script. Tokens are checked against the HF oracle under the spec the server reports."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import torch

from steer_actors.results import GenerationResult
from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.testing.engines import rand_vec

pytestmark = pytest.mark.engine

APP = "steer-client"
BASE = f"http://127.0.0.1:8000/{APP}"
PROMPT = "Once upon a time there was"
SAMPLING = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(ray_local, qwen3_path):
    from steer_actors import VLLMSteerModel, VLLMSteeringConfig

    m = VLLMSteerModel(VLLMSteeringConfig(model_name=qwen3_path, dtype="float32", max_model_len=512,
                                          enforce_eager=True), app_name=APP)
    yield m
    m.close()


@pytest.fixture(scope="module")
def oracle(oracles):
    return oracles["qwen3"]


@pytest.fixture(scope="module")
def want(oracle):
    """HF's greedy tokens for PROMPT (or given ids) under a spec."""
    def tokens(spec: SteeringSpec | None, ids: list[int] | None = None, n: int = SAMPLING["max_tokens"]):
        return oracle.greedy(ids or oracle.tokenizer(PROMPT).input_ids, n, spec).token_ids

    return tokens


def run(coro):
    return asyncio.run(coro)


def gen(model, **kw) -> GenerationResult:
    return run(model.generate(PROMPT, **{**SAMPLING, **kw}))[0]


def test_embedded_constructor(model, qwen3_path):
    from steer_actors.client.model import embedded_config

    info = run(model.info())
    assert (model.hidden_size, model.layer_count) == (256, 4) and info["steerable_layers"] == [0, 1, 2, 3]
    assert model.config.model_name == qwen3_path and model.app_name == APP
    assert httpx.get(f"{BASE}/v1/info", timeout=30).json()["hidden_size"] == 256  # its HTTP routes are up
    # chatspace's constructor keywords: bootstrap_layers, and vLLM options as config fields or engine_kwargs
    cfg = embedded_config(model.config, (6, 2, 4, 2), {"enforce_eager": False, "swap_space": 2})
    assert cfg.bootstrap_layers == [2, 4, 6] and cfg.enforce_eager is False and cfg.engine_kwargs == {"swap_space": 2}
    with pytest.raises(ValueError, match="bootstrap_layers"):
        embedded_config(model.config, (1.5,))


def test_every_setter_and_clear(model, want):
    """Each step's exported spec is the expected one and its tokens are HF's under it."""
    v1, v3, d1, d2 = rand_vec(1, norm=6.0), rand_vec(3, norm=6.0), rand_vec(11), rand_vec(12)
    add1, cap2 = AddSpec(vector=v1, scale=1.0), ProjectionCapSpec(vector=d2, max=0.0)
    abl1, add3 = AblationSpec(vector=d1, scale=0.0), AddSpec(vector=v3, scale=1.0)

    def spec(**layers) -> SteeringSpec:
        return SteeringSpec(layers={int(k[1:]): LayerSteeringSpec(operations=ops) for k, ops in layers.items()})

    async def main():
        steps = []

        async def step(name, expected, call):
            await call
            steps.append((name, expected, model.export_steering_spec(), (await model.generate(PROMPT, **SAMPLING))[0]))

        await step("clear_all", SteeringSpec(), model.clear_all())
        await step("set_layer_vector", spec(l1=[add1]), model.set_layer_vector(layer_idx=1, vector=v1))
        await step("cap", spec(l1=[add1], l2=[cap2]), model.set_layer_projection_cap(layer_idx=2, vector=d2, max=0.0))
        await step("ablation", spec(l1=[add1, abl1], l2=[cap2]),
                   model.set_layer_ablation(layer_idx=1, vector=d1, scale=0.0))
        model.set_target_layer(3)
        await step("set_vector", spec(l1=[add1, abl1], l2=[cap2], l3=[add3]), model.set_vector(v3))
        await step("clear_layer_ablation", spec(l1=[add1], l2=[cap2], l3=[add3]), model.clear_layer_ablation(1))
        await step("clear_layer_projection_cap", spec(l1=[add1], l3=[add3]), model.clear_layer_projection_cap(2))
        await model.set_layer_ablation(1, d1, 0.0)
        await step("clear_layer_add", spec(l1=[abl1], l3=[add3]), model.clear_layer_add(1))
        await model.set_layer_vector(1, v1)
        # chatspace: clearing a layer's vector clears everything on that layer
        await step("clear_layer_vector", spec(l3=[add3]), model.clear_layer_vector(1))
        await model.set_layer_projection_cap(3, d2, min=-1.0, max=1.0)
        await step("set_vector(None)", SteeringSpec(), model.set_vector(None))
        await model.set_layer_vector(0, v1, scale=0.5)
        await model.set_layer_projection_cap(2, d2, -1.0, 0.5)
        await step("clear_all_vectors", SteeringSpec(), model.clear_all_vectors())
        await model.set_layer_vector(1, v1)
        await step("apply(clear_missing=False)", spec(l1=[add1], l3=[add3]),
                   model.apply_steering_spec(spec(l3=[add3]), clear_missing=False))
        await step("apply", spec(l3=[add3]), model.apply_steering_spec(spec(l3=[add3])))
        await model.clear_all()
        return steps

    steps = run(main())
    baseline = want(None)
    assert steps[0][3].token_ids == baseline
    for name, expected, exported, result in steps:
        assert exported == expected, f"{name}: the server's spec is not the expected one"
        assert result.spec_fingerprint == expected.fingerprint(), name
        assert result.token_ids == want(expected), f"{name}: tokens differ from HF under the expected spec"
    changed = {name for name, expected, _, r in steps if r.token_ids != baseline}
    assert {"set_layer_vector", "set_vector", "clear_layer_add", "apply"} <= changed  # the steps really steered


def test_setter_errors_change_nothing(model):
    async def main():
        await model.set_layer_vector(1, rand_vec(5))
        before = await model.steering_state()
        from steer_actors import VLLMSteerModel

        fresh = VLLMSteerModel.connect(app=APP)
        with pytest.raises(ValueError, match="set_target_layer"):
            await fresh.set_vector(rand_vec(5))
        with pytest.raises(ValueError, match="out of range"):
            model.set_target_layer(4)
        with pytest.raises(ValueError, match="layer index"):
            await model.set_layer_vector(layer_idx=True, vector=rand_vec(5))
        with pytest.raises(ValueError, match="out of range"):
            await model.set_layer_vector(layer_idx=7, vector=rand_vec(5))
        with pytest.raises(TypeError, match="scale"):
            await model.set_layer_ablation(1, rand_vec(5))  # chatspace: the scale is required
        with pytest.raises(ValueError, match="min, max or both"):
            await model.set_layer_projection_cap(1, rand_vec(5))
        after = await model.steering_state()
        await model.clear_all()
        return before, after

    before, after = run(main())
    assert before == after


def test_logprobs_through_client(model, oracle):
    spec = SteeringSpec(layers={2: LayerSteeringSpec(add=AddSpec(vector=rand_vec(21, norm=6.0)))})
    run(model.apply_steering_spec(spec))
    got = gen(model, logprobs=0)
    run(model.clear_all())
    ref = oracle.greedy(oracle.tokenizer(PROMPT).input_ids, SAMPLING["max_tokens"], spec)
    assert got.token_ids == ref.token_ids and len(got.logprobs) == len(ref.logprobs)
    assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs)) < 1e-4
    assert gen(model).logprobs is None  # not asked for


def test_n_greater_than_one_returns_every_completion(model, want):
    spec = SteeringSpec(layers={1: LayerSteeringSpec(add=AddSpec(vector=rand_vec(31, norm=6.0)))})
    run(model.apply_steering_spec(spec))
    top1 = dict(n=3, temperature=1.0, top_k=1)  # sampled, but from the top token only: HF's greedy tokens
    greedy = gen(model, **top1)
    sampled = gen(model, n=3, temperature=1.0, seed=7)
    http = httpx.post(f"{BASE}/v1/generate", json={"prompts": [PROMPT, PROMPT], "sampling": {**SAMPLING, **top1}},
                      timeout=120)
    refused = httpx.post(f"{BASE}/v1/generate", json={"prompts": [PROMPT], "capture_layers": [1],
                                                      "sampling": {**SAMPLING, **top1}}, timeout=120)
    run(model.clear_all())
    assert [o.token_ids for o in greedy.outputs] == [want(spec)] * 3
    with pytest.raises(ValueError, match="3 completions"):
        greedy.token_ids  # never just the first of three
    assert len(sampled.outputs) == 3 and len({tuple(o.token_ids) for o in sampled.outputs}) > 1
    assert http.status_code == 200, http.text
    results = http.json()["results"]
    assert len(results) == 2 and all("token_ids" not in r for r in results)
    assert [[o["token_ids"] for o in r["outputs"]] for r in results] == [[want(spec)] * 3] * 2
    assert refused.status_code == 400 and "n > 1" in refused.json()["error"]


def test_chat_client_and_http(model, oracle, want):
    ids = oracle.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    spec = SteeringSpec(layers={1: LayerSteeringSpec(add=AddSpec(vector=rand_vec(41, norm=6.0)))})

    async def main():
        plain = (await model.chat(MESSAGES, sampling_params=SAMPLING))[0]
        async with model.steering(spec):
            steered = await model.chat([MESSAGES, MESSAGES], **SAMPLING)
            http = httpx.post(f"{BASE}/v1/chat", json={"conversations": [MESSAGES], "sampling": SAMPLING}, timeout=120)
        return plain, steered, http

    plain, steered, http = run(main())
    assert plain.prompt_token_ids == ids and plain.token_ids == want(None, ids)
    assert [r.token_ids for r in steered] == [want(spec, ids)] * 2 != [plain.token_ids] * 2
    assert http.status_code == 200 and http.json()["results"][0]["token_ids"] == want(spec, ids)


def test_capture_forms(model, oracle):
    """generate(capture_layers=...) returns (results, handles) for any number of prompts; handles fetch
    (awaited batch, synchronous batch, handle.fetch()) and their rows are HF's."""
    prompts = [PROMPT, "The sea is", "Beautiful is better than"]

    async def main():
        results, handles = await model.generate(prompts[:2], SAMPLING, capture_layers=1)
        with pytest.raises(RuntimeError, match="not fetched"):
            handles[0].captures
        fetched = await model.fetch_captures_batch(handles)
        out = await model.generate(prompts[2], SAMPLING, capture_layers=[2, 1])
        sync = model.fetch_captures_batch(out.handles)
        one, = (await model.generate(prompts[0], SAMPLING, capture_layers=[3])).handles
        rows = await one.fetch()
        await model.release_captures(list(handles) + out.handles + [one])
        return results, handles, fetched, out, sync, one, rows

    results, handles, fetched, out, sync, one, rows = run(main())
    assert len(results) == len(handles) == 2 and all(isinstance(r, GenerationResult) for r in results)
    assert list(fetched) == list(handles) and [r.captures for r in results] == list(handles)
    assert list(sync) == out.handles and out.handles[0].layer_indices == [1, 2] and rows is one.captures
    for r, h in zip(results + out.results, handles + out.handles):
        assert h.token_ids == (r.prompt_token_ids + r.token_ids)[:-1]  # the last token is never run
    for h in list(handles) + out.handles + [one]:
        ref = oracle.hidden_states(h.token_ids)
        for layer in h.layer_indices:
            got = h.captures[layer][0]["hidden"]
            assert got.shape == (len(h.token_ids), 256)
            assert (got - ref[layer]).abs().max().item() <= 1e-5 * max(1.0, ref[layer].abs().max().item())


def _spec_state():
    return httpx.get(f"{BASE}/v1/steering", timeout=30).json()


def test_http_chatspace_form_spec_steers(model, want):
    v, d = rand_vec(51, norm=6.0), rand_vec(52)
    body = {"layers": {"1": {"add": {"vector": v.tolist(), "scale": 1.0},
                             "ablation": {"vector": d.tolist(), "scale": 0.0}}}}
    expected = SteeringSpec(layers={1: LayerSteeringSpec(operations=[AddSpec(vector=v),
                                                                     AblationSpec(vector=d, scale=0.0)])})
    r = httpx.put(f"{BASE}/v1/steering", json=body, timeout=60)
    assert r.status_code == 200, r.text
    state = _spec_state()
    got = httpx.post(f"{BASE}/v1/generate", json={"prompts": [PROMPT], "sampling": SAMPLING}, timeout=60).json()
    httpx.delete(f"{BASE}/v1/steering", timeout=60)
    per_request = httpx.post(f"{BASE}/v1/generate", json={"prompts": [PROMPT], "sampling": SAMPLING,
                                                          "steering_spec": body}, timeout=60).json()
    assert state["spec_fingerprint"] == r.json()["spec_fingerprint"] == expected.fingerprint()
    assert [o["kind"] for o in state["spec"]["layers"]["1"]["operations"]] == ["add", "ablation"]
    assert got["results"][0]["token_ids"] == want(expected) != want(None)
    assert per_request["results"][0]["token_ids"] == want(expected)
    assert per_request["results"][0]["request_spec_fingerprint"] == expected.fingerprint()


V = [1.0] * 256


@pytest.mark.parametrize("method, path, body, message", [
    ("put", "/v1/steering", {"layers": {"1": {"ad": {"vector": V}}}}, "ad"),
    ("put", "/v1/steering", {"layers": {"1": {"add": {"vector": V, "scal": 2.0}}}}, "scal"),
    ("put", "/v1/steering", {"layers": {}, "version": 3}, "version"),
    ("put", "/v1/steering", {"layers": {"1": {"add": {"vector": V}, "operations": [{"kind": "add", "vector": V}]}}},
     "not both"),
    ("post", "/v1/steering/push", {"layers": {"1": {"operations": [{"kind": "add", "vector": V, "sign": 1}]}}},
     "sign"),
    ("put", "/v1/steering/layers/1/add", {"vector": V, "scal": 2.0}, "scal"),
    ("post", "/v1/generate", {"prompts": [PROMPT], "sampling": SAMPLING, "stream": True}, "stream"),
    ("post", "/v1/generate", {"prompts": [PROMPT], "steering_spec": {"layers": {"1": {"ad": {"vector": V}}}}}, "ad"),
    ("post", "/v1/chat", {"conversations": [MESSAGES], "template": "x"}, "template"),
    ("post", "/v1/steering/pop", {"push_id": 1, "all": True}, "all"),
])
def test_unknown_fields_are_400_and_change_nothing(model, method, path, body, message):
    run(model.set_layer_vector(1, rand_vec(61)))
    before = _spec_state()
    r = httpx.request(method.upper(), f"{BASE}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert _spec_state() == before


def test_http_capture_layers_may_be_one_index(model):
    r = httpx.post(f"{BASE}/v1/generate", json={"prompts": [PROMPT], "sampling": SAMPLING, "capture_layers": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    cap = r.json()["results"][0]["captures"]
    assert cap["layers"] == [2]
    assert httpx.delete(f"{BASE}/v1/captures/{cap['capture_id']}", timeout=60).status_code == 200


def _smoke(ray_local, path: str, scale: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, "-m", "steer_actors.smoke", "--model-name", path, "--layer", "1",
                           "--scale", str(scale), "--max-tokens", "8", "--dtype", "float32", "--max-model-len", "512"],
                          capture_output=True, text=True, timeout=400, env=env)


def test_smoke_script(ray_local, model, qwen3_path, oracle):
    """``python -m steer_actors.smoke`` prints HF's texts unsteered and steered; exits 1 when they match."""
    ok = _smoke(ray_local, qwen3_path, 50.0)
    same = _smoke(ray_local, qwen3_path, 0.0)
    assert ok.returncode == 0, ok.stderr[-3000:]
    ids = oracle.tokenizer("Question: What is the capital of France? Answer:").input_ids
    g = torch.Generator().manual_seed(0)
    v = torch.randn(256, generator=g)
    spec = SteeringSpec(layers={1: LayerSteeringSpec(add=AddSpec(vector=v / v.norm(), scale=50.0))})

    def text(steering):
        toks = oracle.greedy(ids, 8, steering).token_ids
        eos = oracle.tokenizer.eos_token_id
        return oracle.tokenizer.decode(toks[:toks.index(eos)] if eos in toks else toks, skip_special_tokens=True)

    lines = ok.stdout.splitlines()
    assert f"baseline: {text(None)!r}" in lines and f"steered (layer 1, scale 50): {text(spec)!r}" in lines
    assert text(None) != text(spec)
    assert same.returncode == 1 and "equals the baseline" in same.stderr
