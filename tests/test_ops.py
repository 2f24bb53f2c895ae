"""Pure math: the fused slot form equals the reference form op by op, and the ops do what they say."""

import math

import pytest
import torch

from steer_actors.ops import Op, apply_reference, apply_slots, neutral_rows, ops_to_rows


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


def test_rows_travel_as_bytes_exactly():
    """The engine actor builds rows once and ships them as float32 bytes; the worker rebuilds them."""
    from steer_actors.ops import rows_from_bytes, rows_to_bytes

    v = torch.randn(32, generator=torch.Generator().manual_seed(4))
    u = v / v.norm()
    rows = ops_to_rows([Op("add", v, scale=1.5), Op("cap", u, min=-1.0), Op("ablation", u, scale=0.0)], 4, 32)
    back = rows_from_bytes(rows_to_bytes(rows), 4, 32)
    for name in ("add", "unit", "lo", "hi", "gamma"):
        assert torch.equal(getattr(rows, name), getattr(back, name)), name
    with pytest.raises(ValueError, match="do not fit 4 slots x hidden 16"):
        rows_from_bytes(rows_to_bytes(rows), 4, 16)
