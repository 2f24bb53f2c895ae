"""Capture checks shared by the engine suites: capture on an engine and compare every row with the HF
oracle's layer outputs (steered or not).

``ray`` and ``engine`` are passed in, so this module loads without Ray or vLLM.
"""

from __future__ import annotations

from typing import Any

from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
from steer_actors.specs import SteeringSpec

PROMPTS = [list(range(10, 50)), list(range(100, 107)), list(range(200, 270))]  # 40, 7 and 70 tokens
SAMPLING = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
LAYERS = [0, 2, 3]
HIDDEN = 256  # the tiny models' hidden size


def capture(ray: Any, engine: Any, prompts: list = PROMPTS, layers: list[int] = LAYERS,
            sampling: dict = SAMPLING) -> tuple[list[dict], list[CaptureHandle]]:
    results = ray.get(engine.generate.remote(prompts, sampling, layers))
    handles = fetch_captures_batch([CaptureHandle.from_wire(r["captures"]) for r in results])
    return results, handles


def assert_matches_hf(oracle: Any, prompts: list, results: list[dict], handles: list[CaptureHandle],
                      steering: Any = None, layers: list[int] = LAYERS) -> None:
    """Each capture holds one row per position (prompt + generated - 1) equal to the oracle's output of
    each layer under ``steering``."""
    for prompt, res, h in zip(prompts, results, handles):
        full = prompt + res["token_ids"]
        assert h.positions == list(range(len(full) - 1))
        assert h.token_ids == full[:-1]
        assert h.layer_indices == layers
        ref = oracle.hidden_states(full[:-1], steering)
        for layer in layers:
            got = h.captures[layer][0]["hidden"]
            assert got.shape == (len(full) - 1, HIDDEN)
            # 1e-5 relative to the stream's scale (|h + r| reaches ~17 here): what remains is fp32 matmul
            # accumulation order between vLLM's CPU kernels and HF's
            diff = (got - ref[layer]).abs()
            err = diff.max().item()
            worst_row = int(diff.max(dim=1).values.argmax())
            assert err <= 1e-5 * max(1.0, ref[layer].abs().max().item()), (
                f"layer {layer}: max error {err:.2e} at position {h.positions[worst_row]} of {len(full) - 1}")


def assert_steered_capture_matches_hf(ray: Any, engine: Any, oracle: Any, spec: SteeringSpec) -> None:
    """Under a global ``spec``, captured rows equal HF run with the same ops; the spec is cleared after."""
    ray.get(engine.apply_spec.remote(spec.to_wire()))
    try:
        results, handles = capture(ray, engine)
        assert_matches_hf(oracle, PROMPTS, results, handles, spec)
    finally:
        ray.get(engine.apply_spec.remote(SteeringSpec().to_wire()))
