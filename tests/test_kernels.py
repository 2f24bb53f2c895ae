"""The custom op equals the reference ops: torch path here, and the Triton kernel under Triton's CPU
interpreter (the same kernel runs on the GPU, where bench/gpu.py checks it again)."""

import os
import subprocess
import sys

import pytest
import torch

from steer_actors.ops.rows import Op, apply_reference, neutral_rows, ops_to_rows

CHECK = r"""
import os, sys, torch
from steer_actors.ops.kernel import steer_residual_
from steer_actors.ops.rows import Op, apply_reference, ops_to_rows
g = torch.Generator().manual_seed(0)
H = 96
u = lambda: (lambda v: v / v.norm())(torch.randn(H, generator=g))
ops = [Op("add", torch.randn(H, generator=g), scale=2.0), Op("cap", u(), min=-0.2, max=0.3),
       Op("ablation", u(), scale=0.0), Op("ablation", u(), scale=2.5)]
rows = ops_to_rows(ops, 4, H)
# the global rows come in two copies, ``sel`` names the one read: the ops sit in copy 1, copy 0 is neutral
neutral = ops_to_rows([], 4, H)
two = {n: torch.stack([getattr(neutral, n), getattr(rows, n)]) for n in ("add", "unit", "lo", "hi", "gamma")}
G = (two["add"], two["unit"], two["lo"], two["hi"], two["gamma"])
sel1 = torch.ones(1, dtype=torch.int32)
# request slots: 0 = none, 1 and 2 hold their own ops, applied after the global ones
req_ops = {1: [Op("add", torch.randn(H, generator=g), scale=1.0)], 2: [Op("ablation", u(), scale=0.0), Op("cap", u(), max=0.0)]}
table = [ops_to_rows([], 4, H)] + [ops_to_rows(req_ops[k], 4, H) for k in (1, 2)]
radd, runit = torch.stack([t.add for t in table]), torch.stack([t.unit for t in table])
rlo, rhi, rgamma = torch.stack([t.lo for t in table]), torch.stack([t.hi for t in table]), torch.stack([t.gamma for t in table])
slot_of_row = [0, 1, 2, 1, 0]
slot_idx = torch.tensor(slot_of_row + [0] * 11, dtype=torch.int32)
one, zero = torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
on2, off2 = torch.tensor([0.0, 1.0]), torch.zeros(2)  # active flags: float32, as the layers hold them
no_buf, no_dst = torch.zeros(0, H), torch.full((16,), -1, dtype=torch.int32)
cap_dst = torch.tensor([2, -1, 0, -1, 1] + [-1] * 11, dtype=torch.int32)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
    delta, resid = torch.randn(5, H, generator=g).to(dtype), torch.randn(5, H, generator=g).to(dtype)
    for glob, per_req in ((on2, zero), (off2, one), (on2, one)):
        want = torch.stack([apply_reference((delta[i].float() + resid[i].float())[None],
                                            (ops if glob.any() else []) + (req_ops.get(slot_of_row[i], []) if per_req else []))[0]
                            for i in range(5)])
        d = delta.clone()
        steer_residual_(d, resid, *G, glob, sel1, radd, runit, rlo, rhi,
                        rgamma, slot_idx, per_req, no_buf, no_dst, zero, zero)
        err = ((d.float() + resid.float()) - want).abs().max().item()
        assert err < tol * max(1.0, want.abs().max().item()), (dtype, int(glob.any()), int(per_req), err)
        # capture: rows 0, 2, 4 land in buffer rows 2, 0, 1 as the stream the next layer sees
        buf = torch.full((4, H), 7.0)
        d2 = delta.clone()
        steer_residual_(d2, resid, *G, glob, sel1, radd, runit, rlo, rhi,
                        rgamma, slot_idx, per_req, buf, cap_dst, one, one)
        assert torch.equal(d2, d)
        seen = d.float() + resid.float()
        assert torch.equal(buf[[2, 0, 1]], seen[[0, 2, 4]]) and torch.equal(buf[3], torch.full((H,), 7.0))
        buf.fill_(7.0)  # layer flag off: nothing written
        steer_residual_(d2, resid, *G, glob, sel1, radd, runit, rlo, rhi,
                        rgamma, slot_idx, per_req, buf, cap_dst, zero, one)
        assert torch.equal(buf, torch.full((4, H), 7.0))
        # a buffer of the model's dtype (capture_dtype="model") holds the same rows, rounded once: to nearest
        # (torch, and Triton on a GPU); Triton's CPU interpreter may round toward zero, one unit in the last place
        low = torch.full((4, H), 7.0, dtype=torch.bfloat16)
        steer_residual_(delta.clone(), resid, *G, glob, sel1, radd, runit, rlo, rhi,
                        rgamma, slot_idx, per_req, low, cap_dst, one, one)
        want_low = seen[[0, 2, 4]].to(torch.bfloat16)
        assert torch.equal(low[[2, 0, 1]], want_low) or (
            os.environ.get("TRITON_INTERPRET") == "1"
            and ((low[[2, 0, 1]].float() - want_low.float()).abs() <= want_low.float().abs() * 2 ** -7).all())
    d = delta.clone()
    steer_residual_(d, resid, *G, off2, sel1, radd, runit, rlo, rhi, rgamma,
                    slot_idx, zero, no_buf, no_dst, zero, zero)
    assert torch.equal(d, delta)
    d = delta.clone()  # copy 1 holds the ops and is on, but copy 0 is selected: nothing happens
    steer_residual_(d, resid, *G, on2, zero, radd, runit, rlo, rhi, rgamma, slot_idx, zero, no_buf, no_dst, zero, zero)
    assert torch.equal(d, delta)
    buf = torch.zeros(4, H)  # nothing steered, capture on: rows copied, delta untouched
    steer_residual_(d, resid, *G, off2, sel1, radd, runit, rlo, rhi, rgamma,
                    slot_idx, zero, buf, cap_dst, one, one)
    assert torch.equal(d, delta) and torch.equal(buf[[2, 0, 1]], (delta.float() + resid.float())[[0, 2, 4]])
print("OK")
"""


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_custom_op_matches_reference(interpret):
    env = {**os.environ, "TRITON_INTERPRET": interpret}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_custom_op_compiles_with_inplace_buffer_updates():
    """torch.compile keeps reading the buffers: rows written into the unread copy, then the selector
    switched in place after compiling, take effect (and switching back undoes them)."""
    from steer_actors.ops.kernel import steer_residual_

    H = 32
    rows = neutral_rows(2, H)
    G = [torch.stack([t, t]).contiguous() for t in (rows.add, rows.unit, rows.lo, rows.hi, rows.gamma)]
    active, sel = torch.zeros(2), torch.zeros(1, dtype=torch.int32)  # active: float32, as the layers hold it
    req = neutral_rows(2, H)
    table = [t[None] for t in (req.add, req.unit, req.lo, req.hi, req.gamma)]
    slot_idx, any_bound = torch.zeros(8, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)

    @torch.compile(fullgraph=True, dynamic=True)
    def f(d, r):
        d = d * 1.0
        steer_residual_(d, r, *G, active, sel, *table, slot_idx, any_bound, torch.zeros(0, H), slot_idx, any_bound,
                        any_bound)
        return d + r

    d, r = torch.randn(3, H), torch.randn(3, H)
    torch.testing.assert_close(f(d, r), d + r)
    v = torch.randn(H)
    new = ops_to_rows([Op("add", v, scale=3.0)], 2, H)
    for t, name in zip(G, ("add", "unit", "lo", "hi", "gamma")):
        t[1].copy_(getattr(new, name))
    active[1] = 1
    torch.testing.assert_close(f(d, r), d + r)  # written, not yet selected
    sel.fill_(1)
    torch.testing.assert_close(f(d, r), apply_reference(d + r, [Op("add", v, scale=3.0)]))
    sel.fill_(0)
    torch.testing.assert_close(f(d, r), d + r)
