"""chatspace's README examples (steering specs, each steering method, capture, the context manager, the
stack, chat) run here with only the import path and the model changed (names the README leaves undefined
are defined first), and each one steers: its tokens differ from unsteered and equal HF's under the spec
the server reports. The model is the tiny Qwen3 made 10 layers deep, because the examples steer layers
up to 8. The Quick Start has its own module (it starts its own engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import io

import pytest
import torch

pytestmark = pytest.mark.engine

APP = "steer-compat"


@pytest.fixture(scope="module")
def model(ray_local, deep_qwen3_path):
    from steer_actors import VLLMSteerModel, VLLMSteeringConfig

    m = VLLMSteerModel(VLLMSteeringConfig(model_name=deep_qwen3_path, dtype="float32", max_model_len=512,
                                          enforce_eager=True), app_name=APP)
    yield m
    m.close()


PROMPTS = ["What is 2+2?", "What is the capital of France?"]
N = 8


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tools(model, deep_oracle):
    """Names the examples use without defining them, and HF's tokens for a prompt under a spec."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(7)
    H = model.hidden_size

    def rnd(norm: float) -> torch.Tensor:
        v = torch.randn(H, generator=g)
        return v / v.norm() * norm

    def hf(prompt: str, spec=None) -> list[int]:
        return deep_oracle.greedy(deep_oracle.tokenizer(prompt).input_ids, N, spec).token_ids

    return dict(sampling=SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True), rnd=rnd, hf=hf)


def tokens(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def test_spec_objects_apply_and_export(model, tools):
    """Core Concepts: a SteeringSpec of chatspace's layer form, applied atomically and exported."""
    from steer_actors import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    unit_vec, direction_vec = tools["rnd"](1.0), tools["rnd"](1.0)

    async def example():
        # Create a steering spec
        spec = SteeringSpec(layers={
            2: LayerSteeringSpec(
                add=AddSpec(vector=unit_vec, scale=50.0),
            ),
            4: LayerSteeringSpec(
                add=AddSpec(vector=unit_vec, scale=100.0),
                projection_cap=ProjectionCapSpec(
                    vector=direction_vec,
                    min=-10.0,
                    max=10.0,
                ),
            ),
        })

        # Apply spec (all steering updates happen atomically)
        await model.apply_steering_spec(spec)

        # Export current steering state
        current_spec = model.export_steering_spec()
        steered = await model.generate(PROMPTS[1], tools["sampling"])
        await model.clear_all_vectors()
        return spec, current_spec, steered

    spec, current_spec, steered = run(example())
    assert current_spec == spec and [o.kind for o in current_spec.layers[4].operations] == ["add", "cap"]
    assert tokens(steered) == [tools["hf"](PROMPTS[1], spec)] != [tools["hf"](PROMPTS[1])]


def test_additive_steering(model, tools):
    from steer_actors import AddSpec, LayerSteeringSpec, SteeringSpec

    seen = {}

    async def example():
        # Apply to specific layer
        steering_vec = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3)) * 50.0
        await model.set_layer_vector(layer_idx=4, vector=steering_vec)
        seen["layer_vector"] = (model.export_steering_spec(), await model.generate(PROMPTS[0], tools["sampling"]))

        # Or use the active layer (set via set_target_layer)
        model.set_target_layer(4)
        await model.set_vector(steering_vec)
        seen["set_vector"] = (model.export_steering_spec(), await model.generate(PROMPTS[0], tools["sampling"]))

        # Clear steering for a layer
        await model.clear_layer_vector(4)
        seen["cleared"] = (model.export_steering_spec(), await model.generate(PROMPTS[0], tools["sampling"]))
        return steering_vec

    vec = run(example())
    want = SteeringSpec(layers={4: LayerSteeringSpec(add=AddSpec(vector=vec))})
    for name in ("layer_vector", "set_vector"):
        assert seen[name][0] == want and tokens(seen[name][1]) == [tools["hf"](PROMPTS[0], want)], name
    assert seen["cleared"][0] == SteeringSpec() and tokens(seen["cleared"][1]) == [tools["hf"](PROMPTS[0])]
    assert tools["hf"](PROMPTS[0], want) != tools["hf"](PROMPTS[0])


def test_projection_capping_and_ablation(model, tools):
    """The cap and ablation examples as written, after an add along their direction at layer 5 (so the cap
    binds and the ablation has a component to scale): each changes the tokens."""
    from steer_actors import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    seen = {}
    torch.manual_seed(11)

    async def gen(name):
        seen[name] = (model.export_steering_spec(), (await model.generate(PROMPTS[1], tools["sampling"]))[0])

    async def example():
        # Define direction (will be normalized automatically)
        direction = torch.randn(model.hidden_size)
        await model.set_layer_vector(5, direction * 2.0)
        await gen("pushed")

        # Cap projection to [-10, 10] range
        await model.set_layer_projection_cap(
            layer_idx=6,
            vector=direction,
            min=-10.0,
            max=10.0,
        )
        await gen("capped")

        # Remove cap
        await model.clear_layer_projection_cap(6)

        # Suppress component (scale < 1.0)
        await model.set_layer_ablation(
            layer_idx=8,
            vector=direction,
            scale=0.1,  # Reduce to 10%
        )
        await gen("suppressed")

        # Amplify component (scale > 1.0)
        await model.set_layer_ablation(
            layer_idx=8,
            vector=direction,
            scale=2.0,  # Double the component
        )
        await gen("amplified")

        # Clear ablation
        await model.clear_layer_ablation(8)
        await gen("cleared")
        await model.clear_all_vectors()
        return direction

    d = run(example())
    base = {5: [AddSpec(vector=d * 2.0)]}
    want = {"pushed": base, "capped": {**base, 6: [ProjectionCapSpec(vector=d, min=-10.0, max=10.0)]},
            "suppressed": {**base, 8: [AblationSpec(vector=d, scale=0.1)]},
            "amplified": {**base, 8: [AblationSpec(vector=d, scale=2.0)]}, "cleared": base}
    for name, layers in want.items():
        spec = SteeringSpec(layers={i: LayerSteeringSpec(operations=ops) for i, ops in layers.items()})
        assert seen[name][0] == spec, name
        assert seen[name][1].token_ids == tools["hf"](PROMPTS[1], spec), name
    for name in ("capped", "suppressed", "amplified"):
        assert seen[name][1].token_ids != seen["pushed"][1].token_ids, f"{name} changed nothing"


def test_activation_capture(model, tools, deep_oracle):
    """The capture example and "Analyze steering effects", as written: rows are HF's, unsteered and steered."""
    from steer_actors import AddSpec, LayerSteeringSpec, SteeringSpec

    sampling, prompt = tools["sampling"], PROMPTS[1]
    steering_vec = tools["rnd"](30.0)
    printed = io.StringIO()

    async def example():
        # Capture activations from layers 2, 4, 6
        results, handles = await model.generate(
            ["What is 2+2?", "What is the capital of France?"],
            sampling,
            capture_layers=[2, 4, 6],
        )

        # Fetch captures (batched fetch is more efficient)
        await model.fetch_captures_batch(handles)

        # Access captures for each request
        for i, handle in enumerate(handles):
            print(f"\nPrompt {i}: {results[i]}")

            for layer_idx in handle.layer_indices:
                # Each layer has a list (one per TP worker)
                captures = handle.captures[layer_idx]
                hidden = captures[0]["hidden"]  # [seq_len, hidden_size]
                print(f"  Layer {layer_idx}: {hidden.shape}")

        # Capture without steering
        baseline_results, baseline_handles = await model.generate(
            prompt,
            sampling,
            capture_layers=[4],
        )
        await model.fetch_captures_batch(baseline_handles)
        baseline_acts = baseline_handles[0].captures[4][0]["hidden"]

        # Apply steering and capture again
        await model.set_layer_vector(4, steering_vec)
        steered_results, steered_handles = await model.generate(
            prompt,
            sampling,
            capture_layers=[4],
        )
        await model.fetch_captures_batch(steered_handles)
        steered_acts = steered_handles[0].captures[4][0]["hidden"]

        # Compare activations
        delta = steered_acts - baseline_acts
        print(f"Mean activation change: {delta.mean().item():.4f}")
        print(f"Max activation change: {delta.abs().max().item():.4f}")
        await model.clear_all_vectors()
        return results, handles, baseline_handles, steered_results, steered_handles, delta

    with contextlib.redirect_stdout(printed):
        results, handles, baseline_handles, steered_results, steered_handles, delta = run(example())
    spec = SteeringSpec(layers={4: LayerSteeringSpec(add=AddSpec(vector=steering_vec))})
    for h, r, s in [(handles[0], results[0], None), (handles[1], results[1], None),
                    (baseline_handles[0], None, None), (steered_handles[0], steered_results[0], spec)]:
        ref = deep_oracle.hidden_states(h.token_ids, s)
        for layer in h.layer_indices:
            got = h.captures[layer][0]["hidden"]
            assert got.shape == (len(h.token_ids), model.hidden_size)
            assert (got - ref[layer]).abs().max().item() <= 1e-5 * max(1.0, ref[layer].abs().max().item())
    assert tokens(results) == [tools["hf"](p) for p in PROMPTS]
    assert tokens(steered_results) == [tools["hf"](prompt, spec)] != [tools["hf"](prompt)]
    assert delta.abs().max().item() > 1.0
    text = printed.getvalue()
    assert f"Prompt 1: {results[1].text}" in text and f"Layer 6: {handles[1].captures[6][0]['hidden'].shape}" in text


def test_steering_context_manager(model, tools):
    from steer_actors import AddSpec, LayerSteeringSpec, SteeringSpec

    vec, prompts, sampling = tools["rnd"](1.0), PROMPTS, tools["sampling"]
    seen = {}

    async def example():
        before = model.export_steering_spec()
        # Save current steering state
        spec = SteeringSpec(layers={
            4: LayerSteeringSpec(add=AddSpec(vector=vec, scale=100.0))
        })

        async with model.steering(spec):
            # Steering active within this block
            results = await model.generate(prompts, sampling)
            # ...
            seen["inside"] = model.export_steering_spec()

        # Previous steering automatically restored after exiting block
        seen["after"] = await model.generate(prompts, sampling)
        return spec, before, results

    spec, before, results = run(example())
    assert seen["inside"] == spec and model.export_steering_spec() == before == SteeringSpec()
    assert tokens(results) == [tools["hf"](p, spec) for p in PROMPTS] != [tools["hf"](p) for p in PROMPTS]
    assert tokens(seen["after"]) == [tools["hf"](p) for p in PROMPTS]


def test_steering_stack(model, tools):
    from steer_actors import AblationSpec, AddSpec, LayerSteeringSpec, SteeringSpec

    prompts, sampling = PROMPTS, tools["sampling"]
    baseline_spec = SteeringSpec(layers={1: LayerSteeringSpec(add=AddSpec(vector=tools["rnd"](8.0)))})
    intervention_spec = SteeringSpec(layers={3: LayerSteeringSpec(add=AddSpec(vector=tools["rnd"](8.0)))})
    alternative_spec = SteeringSpec(layers={3: LayerSteeringSpec(
        add=AddSpec(vector=tools["rnd"](8.0)), ablation=AblationSpec(vector=tools["rnd"](1.0), scale=0.0))})

    async def example():
        # Save baseline
        await model.push_steering_spec(baseline_spec)

        # Apply intervention
        await model.apply_steering_spec(intervention_spec)
        results_1 = await model.generate(prompts, sampling)

        # Try different steering
        await model.apply_steering_spec(alternative_spec)
        results_2 = await model.generate(prompts, sampling)

        # Restore baseline
        await model.pop_steering_spec()
        results_baseline = await model.generate(prompts, sampling)
        return results_1, results_2, results_baseline

    results_1, results_2, results_baseline = run(example())
    unsteered = [tools["hf"](p) for p in PROMPTS]
    assert tokens(results_1) == [tools["hf"](p, intervention_spec) for p in PROMPTS] != unsteered
    assert tokens(results_2) == [tools["hf"](p, alternative_spec) for p in PROMPTS] != tokens(results_1)
    # pop restores what was current before the push (here: nothing), as in chatspace
    assert tokens(results_baseline) == unsteered and model.export_steering_spec() == SteeringSpec()


def test_chat(model, tools, deep_oracle):
    from steer_actors import AddSpec, LayerSteeringSpec, SteeringSpec

    sampling = tools["sampling"]
    spec = SteeringSpec(layers={2: LayerSteeringSpec(add=AddSpec(vector=tools["rnd"](8.0)))})
    printed = io.StringIO()

    async def example():
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]

        responses = await model.chat(
            messages,
            sampling_params=sampling,
        )
        print(responses[0])
        async with model.steering(spec):
            steered = await model.chat(messages, sampling_params=sampling)
        return messages, responses, steered

    with contextlib.redirect_stdout(printed):
        messages, responses, steered = run(example())
    ids = deep_oracle.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = deep_oracle.greedy(ids, N).token_ids
    assert responses[0].prompt_token_ids == ids and responses[0].token_ids == want
    assert printed.getvalue() == f"{responses[0].text}\n"
    assert steered[0].token_ids == deep_oracle.greedy(ids, N, spec).token_ids != want
