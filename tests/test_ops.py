"""Pure math: the fused slot form equals the reference form op by op, and the ops do what they say."""

import math

import pytest
import torch

from steer_actors.ops.rows import Op, apply_reference, apply_slots, neutral_rows, ops_to_rows


def _unit(seed, h=32):
    v = torch.randn(h, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _slots(s, rows):
    return apply_slots(s, rows.add, rows.unit, rows.lo, rows.hi, rows.gamma)


def test_neutral_slots_are_identity():
    s = torch.randn(5, 32)
    assert torch.equal(_slots(s, neutral_rows(4, 32)), s)


@pytest.mark.parametrize("ops", [
    [Op("add", torch.randn(32), scale=2.5)],
    [Op("cap", _unit(1), min=-0.1, max=0.2)],
    [Op("cap", _unit(2), max=-1.0)],
    [Op("cap", _unit(3), min=3.0)],
    [Op("ablation", _unit(4), scale=0.0)],
    [Op("ablation", _unit(5), scale=3.0)],
    [Op("add", torch.randn(32), scale=1.0), Op("cap", _unit(6), min=0.5, max=0.6), Op("ablation", _unit(7), scale=0.2),
     Op("add", torch.randn(32), scale=-2.0)],
])
def test_slots_match_reference(ops):
    s = torch.randn(7, 32)
    want = apply_reference(s, ops)
    got = _slots(s, ops_to_rows(ops, 4, 32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_op_semantics():
    s = torch.randn(6, 32) * 3
    u = _unit(9)
    assert torch.allclose(apply_reference(s, [Op("ablation", u, scale=0.0)]) @ u, torch.zeros(6), atol=1e-5)
    assert torch.allclose(apply_reference(s, [Op("ablation", u, scale=2.0)]) @ u, 2 * (s @ u), atol=1e-5)
    capped = apply_reference(s, [Op("cap", u, min=-0.5, max=0.5)]) @ u
    assert torch.allclose(capped, (s @ u).clamp(-0.5, 0.5), atol=1e-5)
    # the orthogonal complement is untouched by cap and ablation
    perp = lambda x: x - (x @ u)[:, None] * u  # noqa: E731
    torch.testing.assert_close(perp(apply_reference(s, [Op("cap", u, max=0.0)])), perp(s), rtol=1e-5, atol=1e-5)


def test_too_many_ops_for_slots():
    with pytest.raises(ValueError, match="slots"):
        ops_to_rows([Op("add", torch.ones(4))] * 3, 2, 4)


def test_open_bounds_are_infinite():
    rows = ops_to_rows([Op("cap", _unit(1, 4), max=1.0)], 1, 4)
    assert rows.lo[0] == -math.inf and rows.hi[0] == 1.0


def test_several_layers_pack_as_each_alone():
    """pack_flat lays several layers (compact rows, a flat array, none) out in one array, each exactly as
    ops_to_flat lays that layer out alone."""
    import numpy as np

    from steer_actors.ops.rows import CompactRows, ops_to_compact, ops_to_flat, pack_flat, rows_from_flat

    g = torch.Generator().manual_seed(5)
    u = lambda: (lambda v: v / v.norm())(torch.randn(8, generator=g))  # noqa: E731
    layers = [[Op("add", torch.randn(8, generator=g), scale=0.5), Op("cap", u(), max=1.0)],
              [],
              [Op("ablation", u(), scale=0.25), Op("cap", u(), min=-2.0), Op("add", torch.randn(8, generator=g))]]
    compact = []
    for ops in layers:
        vectors = np.empty((len(ops), 8), dtype=np.float32)
        compact.append(CompactRows(ops_to_compact(ops, vectors), vectors) if ops else None)
    compact[1] = ops_to_flat([Op("add", torch.ones(8), scale=2.0)], 3, 8)  # an already flat layer
    want = np.concatenate([ops_to_flat(layers[0], 3, 8), compact[1], ops_to_flat(layers[2], 3, 8)])
    assert np.array_equal(pack_flat(compact, 3, 8), want)
    rows = rows_from_flat(pack_flat([compact[2]], 3, 8), 3, 8)
    assert rows.gamma.tolist() == [0.25, 1.0, 1.0] and rows.lo.tolist() == [-math.inf, -2.0, -math.inf]
    assert torch.equal(rows.add[2], layers[2][2].vector) and torch.equal(rows.unit[1], layers[2][1].vector)
    with pytest.raises(ValueError, match="slots"):
        pack_flat(compact, 2, 8)


def test_engine_payload_rows_equal_op_by_op_rows_at_full_width():
    """The engine builds every layer's rows in a few numpy calls; at the 8B width (4096) and 36 layers they
    equal, bit for bit, what each op gives alone (the unit of a direction does not depend on its neighbours)."""
    import numpy as np

    from steer_actors.ops.change import rows_payload
    from steer_actors.ops.rows import ops_to_compact
    from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    H, L = 4096, 36
    g = torch.Generator().manual_seed(5)
    v = lambda: torch.randn(H, generator=g) * 3  # noqa: E731
    spec = SteeringSpec(layers={i: LayerSteeringSpec(operations=[
        AddSpec(vector=v(), scale=0.1 * i - 1.7), ProjectionCapSpec(vector=v(), min=-1.0, max=2.0),
        AblationSpec(vector=v(), scale=0.3)][i % 3:]) for i in range(L)})
    payload = rows_payload(spec, list(range(L)), 4, H)
    got = np.frombuffer(payload.vectors, dtype=np.float32).reshape(-1, H)
    want, params = [], []
    for i in range(L):
        ops = spec.layers[i].to_ops()
        rows = np.empty((len(ops), H), dtype=np.float32)
        params.append(ops_to_compact(ops, rows))
        want.append(rows)
    assert got.tobytes() == np.concatenate(want).tobytes()
    assert [payload.layers[i][1] for i in range(L)] == params
    u = spec.layers[1].operations[0].unit()
    assert abs(float(u.norm()) - 1.0) < 1e-6

