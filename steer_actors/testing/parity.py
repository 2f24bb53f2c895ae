"""Parity checks shared by the engine suites: the specs every engine variant must run exactly as the HF
oracle does (one per op, along directions that bite), and running them on two engines side by side.

``ray`` and ``engine`` are passed in, so this module loads without Ray or vLLM.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.testing.engines import rand_vec

PROMPTS = ["Hello world, the sea", "Beautiful is better than ugly.", "Once upon a time there was"]
MAX_TOKENS = 12
SAMPLING = dict(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)


def _mean_direction(oracle: Any, prompt_ids: list[list[int]], layer: int) -> torch.Tensor:
    return torch.cat([oracle.hidden_states(ids)[layer] for ids in prompt_ids]).mean(0)


def parity_specs(oracle: Any, prompt_ids: list[list[int]]) -> dict[str, SteeringSpec]:
    """One spec per op type (cap and ablation along the residual's dominant direction, so they bite)."""
    d1, d2 = _mean_direction(oracle, prompt_ids, 1), _mean_direction(oracle, prompt_ids, 2)
    p2 = float(d2.norm())  # typical projection on its own direction
    L = lambda *ops: LayerSteeringSpec(operations=list(ops))  # noqa: E731
    return {
        "add": SteeringSpec(layers={1: L(AddSpec(vector=rand_vec(1), scale=6.0))}),
        "cap": SteeringSpec(layers={2: L(ProjectionCapSpec(vector=d2, min=-0.1 * p2, max=0.1 * p2))}),
        "ablation_suppress": SteeringSpec(layers={1: L(AblationSpec(vector=d1, scale=0.0))}),
        "ablation_amplify": SteeringSpec(layers={2: L(AblationSpec(vector=d2, scale=3.0))}),
        "combo": SteeringSpec(layers={
            1: L(AddSpec(vector=rand_vec(2), scale=3.0), ProjectionCapSpec(vector=rand_vec(3), max=0.0),
                 AblationSpec(vector=d1, scale=0.5)),
            2: L(AblationSpec(vector=d2, scale=0.0), AddSpec(vector=rand_vec(4), scale=2.0)),
        }),
    }


def generate(ray: Any, engine: Any, prompts: list, sampling: dict = SAMPLING) -> list[dict]:
    return ray.get(engine.generate.remote(prompts, sampling))


def apply(ray: Any, engine: Any, spec: SteeringSpec | None) -> dict:
    """Make ``spec`` (``None``: no steering) the engine's global spec; returns its version and fingerprint."""
    return ray.get(engine.apply_spec.remote((spec or SteeringSpec()).to_wire()))


def against_reference(ray: Any, oracle: Any, engine: Any, reference: Any) -> Iterator[tuple]:
    """For each parity spec applied to both engines: (name, spec, prompt ids, engine's results,
    reference's results); both engines are left unsteered afterwards."""
    ids = [oracle.tokenizer(p).input_ids for p in PROMPTS]
    try:
        for name, spec in parity_specs(oracle, ids).items():
            for e in (engine, reference):
                apply(ray, e, spec)
            yield name, spec, ids, generate(ray, engine, ids), generate(ray, reference, ids)
    finally:
        for e in (engine, reference):
            apply(ray, e, None)
