"""chatspace's README Quick Start runs as written, with only the import path and the model changed, on
its own engine (compiled, layers 2, 4, 6 steerable): its steered text is HF's and differs from its baseline.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from steer_actors.testing.chatspace import oracle_text

pytestmark = pytest.mark.engine

# chatspace's Quick Start; only the import and the model name (replaced by the test) differ
QUICK_START = '''
import torch
import asyncio
from vllm import SamplingParams
from steer_actors import (
    VLLMSteerModel,
    VLLMSteeringConfig,
)

async def main():
    # Initialize model
    cfg = VLLMSteeringConfig(
        model_name="Qwen/Qwen3-0.6B",
        tensor_parallel_size=1,
        gpu_memory_utilization=0.9,
        max_model_len=2048,
    )
    model = VLLMSteerModel(cfg, bootstrap_layers=(2, 4, 6))

    # Generate baseline
    sampling = SamplingParams(temperature=0.0, max_tokens=64)
    baseline = await model.generate(
        "Question: What is the capital of France? Answer:",
        sampling
    )
    print("Baseline:", baseline[0])

    # Apply steering vector to layer 4
    steering_vector = torch.randn(model.hidden_size) * 100.0
    await model.set_layer_vector(4, steering_vector)

    # Generate with steering
    steered = await model.generate(
        "Question: What is the capital of France? Answer:",
        sampling
    )
    print("Steered:", steered[0])

    # Clear steering
    await model.clear_all_vectors()

if __name__ == "__main__":
    asyncio.run(main())
'''


def test_quick_start(ray_local, deep_qwen3_path, deep_oracle):
    """Runs as written (its own engine: compiled, layers 2, 4, 6 steerable) and prints the model's texts.

    The example's ``dtype="auto"`` runs this float32 checkpoint in the platform's half precision (vLLM's
    rule for float32 checkpoints), where 64 unsteered greedy tokens meet near-ties (top-two logprobs 0.02
    apart) that HF's float32 run may decide the other way. So the steered text, which steering dominates,
    is checked against HF, and the baseline against the same engine's unsteered run after the example has
    cleared its steering."""
    from ray import serve

    from steer_actors import AddSpec, LayerSteeringSpec, SteeringSpec

    prompt = "Question: What is the capital of France? Answer:"
    code = QUICK_START.replace('"Qwen/Qwen3-0.6B"', repr(deep_qwen3_path))
    out = io.StringIO()
    torch.manual_seed(1234)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "chatspace-quick-start", "exec"), {"__name__": "__main__"})
        app = serve.get_app_handle("steer")
        state = app.get_spec.remote().result()
        again = app.generate.remote([prompt], {"temperature": 0.0, "max_tokens": 64}).result()[0]
    finally:
        serve.delete("steer")
    torch.manual_seed(1234)
    vec = torch.randn(256) * 100.0  # the example's steering_vector, drawn again from the same seed
    spec = SteeringSpec(layers={4: LayerSteeringSpec(add=AddSpec(vector=vec))})
    steered = oracle_text(deep_oracle, prompt, 64, spec)
    assert out.getvalue() == f"Baseline: {again['text']}\nSteered: {steered}\n"
    assert again["text"] != steered and again["spec_fingerprint"] == SteeringSpec().fingerprint()
    assert state["spec"] == {"layers": {}} and state["stack_depth"] == 0  # cleared at the end, as written
