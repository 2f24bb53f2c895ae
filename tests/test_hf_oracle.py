"""The HF oracle itself: its three formulas on hand-computed values, its reading of both spec forms, its
hook point (the output of decoder layer L), and its independence from the code it checks. No Ray, no vLLM."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from steer_actors.testing import hf_oracle
from steer_actors.testing.hf_oracle import apply_ops, combine, steering_plan

S = torch.tensor([[5.0, 0.0]])
V = torch.tensor([3.0, 4.0])  # |V| = 5, direction (0.6, 0.8); S·û = 3


def run(*ops):
    return apply_ops(S, steering_plan({0: list(ops)})[0])


@pytest.mark.parametrize("ops, want", [
    ([("add", V, 2.0)], [11.0, 8.0]),  # the vector as given, not normalised
    ([("add", V, -1.0)], [2.0, -4.0]),
    ([("cap", V, None, 1.0)], [3.8, -1.6]),  # p = 3 clamped to 1: s - 2û
    ([("cap", V, 4.0, None)], [5.6, 0.8]),  # p = 3 raised to 4: s + û
    ([("cap", V, -10.0, 10.0)], [5.0, 0.0]),  # inside the bounds: unchanged
    ([("cap", V * 1000, None, 1.0)], [3.8, -1.6]),  # the direction's length does not matter
    ([("ablation", V, 0.0)], [3.2, -2.4]),  # component along û removed
    ([("ablation", V, 2.0)], [6.8, 2.4]),  # doubled
    ([("ablation", V, 1.0)], [5.0, 0.0]),
    ([("add", V, 1.0), ("ablation", V, 0.0)], [3.2, -2.4]),  # order: the add is then removed with the rest
    ([("ablation", V, 0.0), ("add", V, 1.0)], [6.2, 1.6]),
])
def test_formulas_on_hand_computed_values(ops, want):
    torch.testing.assert_close(run(*ops), torch.tensor([want]), rtol=0, atol=1e-6)


def test_ops_run_in_fp32_and_leave_the_input_alone():
    s = S.double()
    out = apply_ops(s, steering_plan({0: [("add", V, 1.0)]})[0])
    assert out.dtype == torch.float32 and torch.equal(s, S.double())


def test_reads_a_spec_in_both_forms_by_its_public_fields():
    from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    ops = [AddSpec(vector=V, scale=2.0), ProjectionCapSpec(vector=V, max=1.0), AblationSpec(vector=V, scale=0.5)]
    listed = steering_plan(SteeringSpec(layers={3: LayerSteeringSpec(operations=ops)}))
    assert list(listed) == [3] and [op[0] for op in listed[3]] == ["add", "cap", "ablation"]
    # chatspace's form: named fields, applied add -> cap -> ablation whatever the keyword order
    named = steering_plan(NS(layers={3: NS(ablation=NS(vector=V, scale=0.5), add=NS(vector=V, scale=2.0),
                                           projection_cap=NS(vector=V, min=None, max=1.0))}))
    assert [op[0] for op in named[3]] == ["add", "cap", "ablation"]
    torch.testing.assert_close(apply_ops(S, named[3]), apply_ops(S, listed[3]), rtol=0, atol=0)
    real = steering_plan(SteeringSpec(layers={3: LayerSteeringSpec(
        ablation=AblationSpec(vector=V, scale=0.5), projection_cap=ProjectionCapSpec(vector=V, max=1.0),
        add=AddSpec(vector=V, scale=2.0))}))
    torch.testing.assert_close(apply_ops(S, real[3]), apply_ops(S, listed[3]), rtol=0, atol=0)
    twice = steering_plan(SteeringSpec(layers={0: LayerSteeringSpec(operations=ops[:1] * 2)}))
    assert [op[0] for op in twice[0]] == ["add", "add"]  # two ops of a kind: `operations` is the whole truth
    # named fields that mirror `operations` are read once; ones that differ are refused
    mirrored = NS(layers={3: NS(operations=ops, add=NS(vector=V, scale=2.0), projection_cap=None, ablation=None)})
    assert len(steering_plan(mirrored)[3]) == 3
    with pytest.raises(ValueError, match="both operations"):
        steering_plan(NS(layers={3: NS(operations=ops, add=NS(vector=V, scale=3.0))}))


def test_plain_data_is_checked_and_combined_in_order():
    with pytest.raises(ValueError, match="bad op"):
        steering_plan({0: [("cap", V, 1.0)]})
    with pytest.raises(ValueError, match="bad op"):
        steering_plan({0: [("scale", V, 1.0)]})
    assert steering_plan({0: [], 2: [("add", [1.0, 2.0], 1.0)]}).keys() == {2}
    both = combine({1: [("add", V, 1.0)]}, None, {1: [("ablation", V, 0.0)], 2: [("add", V, 1.0)]})
    assert [op[0] for op in both[1]] == ["add", "ablation"] and list(both) == [1, 2]


def test_oracle_imports_nothing_of_the_project():
    """Independence is the point: the oracle must not reuse the op code or spec conversion it checks."""
    tree = ast.parse(Path(hf_oracle.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("steer_actors")], names


def test_hook_is_the_output_of_decoder_layer_L(oracles):
    """Unsteered, the oracle's layer L is HF's hidden_states[L + 1]; an add at layer L moves exactly that
    output by scale * v and nothing before it."""
    oracle = oracles["qwen3"]
    ids = oracle.tokenizer("Hello world, the sea").input_ids
    with torch.no_grad():
        hf = oracle.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    plain = oracle.hidden_states(ids)
    for layer in range(len(plain) - 1):  # HF's last entry is after the final norm
        torch.testing.assert_close(plain[layer], hf[layer + 1][0], rtol=0, atol=0)
    v = torch.linspace(-1, 1, plain[0].shape[-1])
    steered = oracle.hidden_states(ids, {2: [("add", v, 3.0)]})
    for layer in (0, 1):
        assert torch.equal(steered[layer], plain[layer])
    torch.testing.assert_close(steered[2] - plain[2], (3.0 * v).expand_as(plain[2]), rtol=0, atol=1e-5)
    assert not torch.allclose(steered[3], plain[3])
