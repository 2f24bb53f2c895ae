"""The per-layer steering op as one custom op: ``steer_actors::steer_residual_``.

It rewrites ``delta`` in place so that ``delta + residual`` is the steered stream. Being an opaque
custom op keeps torch.compile from tracing it (it is captured whole in CUDA graphs), and lets it skip
work when the layer has no ops: the ``active`` flag lives on the device and is read by the kernel, so
the decision is made at replay time, not frozen at capture time.

* CUDA: one Triton program per token row; all K slots in registers, one read of ``delta`` and
  ``residual`` and one write of ``delta``; an inactive layer's programs return after a few scalar
  loads. Captured rows are written to the capture buffer by the same program (graph-safe capture).
* elsewhere (CPU): the torch form of :func:`steer_actors.ops.rows.apply_slots`, skipped when inactive
  (CPU runs no graphs, so a host-side check is safe there).
"""

from __future__ import annotations

import torch

from steer_actors import envs
from steer_actors.ops.rows import apply_slots

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _apply_k(s, add_ptr, unit_ptr, lo_ptr, hi_ptr, gamma_ptr, cols, mask, H, K: tl.constexpr):
        for k in tl.static_range(K):
            a = tl.load(add_ptr + k * H + cols, mask=mask, other=0.0)
            u = tl.load(unit_ptr + k * H + cols, mask=mask, other=0.0)
            s = s + a
            p = tl.sum(s * u, axis=0)
            c = tl.minimum(tl.maximum(p, tl.load(lo_ptr + k)), tl.load(hi_ptr + k))
            s = s + ((c - p) + (tl.load(gamma_ptr + k) - 1.0) * p) * u
        return s

    @triton.jit
    def _steer_kernel(delta_ptr, resid_ptr, add_ptr, unit_ptr, lo_ptr, hi_ptr, gamma_ptr, active_ptr, sel_ptr,
                      radd_ptr, runit_ptr, rlo_ptr, rhi_ptr, rgamma_ptr, slot_ptr, any_ptr,
                      cap_buf_ptr, cap_dst_ptr, cap_on_ptr, cap_any_ptr,
                      stride_d, stride_r, H, K: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        b = tl.load(sel_ptr).to(tl.int64) & 1  # which copy of the global rows (see double_buffer)
        glob = tl.load(active_ptr + b) != 0
        slot = tl.load(slot_ptr + row).to(tl.int64) * (tl.load(any_ptr) != 0).to(tl.int64)
        cap = (tl.load(cap_any_ptr) != 0) & (tl.load(cap_on_ptr) != 0)
        dst = tl.where(cap, tl.load(cap_dst_ptr + row), -1).to(tl.int64)
        steered = glob | (slot != 0)
        if (not steered) and dst < 0:
            return
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        d = tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(resid_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = d + r
        if steered:
            if glob:
                s = _apply_k(s, add_ptr + b * K * H, unit_ptr + b * K * H, lo_ptr + b * K, hi_ptr + b * K,
                             gamma_ptr + b * K, cols, mask, H, K)
            if slot != 0:
                s = _apply_k(s, radd_ptr + slot * K * H, runit_ptr + slot * K * H, rlo_ptr + slot * K,
                             rhi_ptr + slot * K, rgamma_ptr + slot * K, cols, mask, H, K)
            out = (s - r).to(delta_ptr.dtype.element_ty)
            tl.store(delta_ptr + row * stride_d + cols, out, mask=mask)
            s = out.to(tl.float32) + r  # what the next layer sees: delta rounded to the model dtype
        if dst >= 0:
            tl.store(cap_buf_ptr + dst * H + cols, s.to(cap_buf_ptr.dtype.element_ty), mask=mask)


def _torch_impl(delta, residual, add, unit, lo, hi, gamma, active, sel, radd, runit, rlo, rhi, rgamma, slot_idx,
                any_bound, cap_buf, cap_dst, cap_on, cap_any) -> None:
    b = int(sel.reshape(-1)[0])
    glob = bool(active[b])
    per_request = bool(any_bound.reshape(-1)[0])
    cap = bool(cap_any.reshape(-1)[0]) and bool(cap_on.reshape(-1)[0])
    if not glob and not per_request and not cap:
        return
    T = delta.shape[0]
    r = residual.float()
    s = delta.float() + r
    if glob:
        s = apply_slots(s, add[b], unit[b], lo[b], hi[b], gamma[b])
    if per_request:
        sid = slot_idx[:T].long()
        rows = (sid != 0).nonzero().squeeze(-1)
        if rows.numel():
            g = sid[rows]
            s[rows] = apply_slots(s[rows], radd[g], runit[g], rlo[g], rhi[g], rgamma[g])
    if glob or per_request:
        delta.copy_((s - r).to(delta.dtype))
        s = delta.float() + r  # what the next layer sees: delta rounded to the model dtype
    if cap:
        dst = cap_dst[:T].long()
        rows = (dst >= 0).nonzero().squeeze(-1)
        cap_buf[dst[rows]] = s[rows].to(cap_buf.dtype)


_INTERPRET = envs.TRITON_INTERPRET  # read once (this runs every forward): Triton's interpreter on a CPU (tests)


def _use_triton(delta: torch.Tensor) -> bool:
    return triton is not None and (delta.is_cuda or _INTERPRET)


# ``cap_buf`` is written but not declared mutated, as vLLM's attention op does with the KV cache:
# nothing in the graph reads it, and a declared mutation of a large buffer invites functionalization
# to clone it every step.
@torch.library.custom_op("steer_actors::steer_residual_", mutates_args=("delta",))
def steer_residual_(delta: torch.Tensor, residual: torch.Tensor, add: torch.Tensor, unit: torch.Tensor,
                    lo: torch.Tensor, hi: torch.Tensor, gamma: torch.Tensor, active: torch.Tensor, sel: torch.Tensor,
                    radd: torch.Tensor, runit: torch.Tensor, rlo: torch.Tensor, rhi: torch.Tensor,
                    rgamma: torch.Tensor, slot_idx: torch.Tensor, any_bound: torch.Tensor, cap_buf: torch.Tensor,
                    cap_dst: torch.Tensor, cap_on: torch.Tensor, cap_any: torch.Tensor) -> None:
    """Global ops, then the token's request-slot ops (slot 0 = none), on ``delta + residual``; then
    the stream of tokens with ``cap_dst >= 0`` is copied to ``cap_buf[cap_dst]`` when ``cap_on``.
    Global rows come in two copies (``add`` [2, K, H], ``active`` [2], ...): ``sel`` names the one read."""
    if delta.numel() == 0:
        return
    args = (delta, residual, add, unit, lo, hi, gamma, active, sel, radd, runit, rlo, rhi, rgamma, slot_idx, any_bound,
            cap_buf, cap_dst, cap_on, cap_any)
    if not _use_triton(delta):
        _torch_impl(*args)
    else:
        _triton_impl(*args)


def _triton_impl(delta, residual, add, unit, lo, hi, gamma, active, sel, radd, runit, rlo, rhi, rgamma, slot_idx,
                 any_bound, cap_buf, cap_dst, cap_on, cap_any) -> None:
    H = delta.shape[-1]
    d2, r2 = delta.view(-1, H), residual.view(-1, H)
    assert d2.stride(-1) == 1 and r2.stride(-1) == 1
    _steer_kernel[(d2.shape[0],)](d2, r2, add, unit, lo, hi, gamma, active, sel, radd, runit, rlo, rhi, rgamma,
                                  slot_idx, any_bound, cap_buf, cap_dst, cap_on, cap_any, d2.stride(0), r2.stride(0), H,
                                  K=add.shape[1],
                                  BLOCK_H=triton.next_power_of_2(H), num_warps=4 if H <= 2048 else 8)


@steer_residual_.register_fake
def _(delta, residual, add, unit, lo, hi, gamma, active, sel, radd, runit, rlo, rhi, rgamma, slot_idx, any_bound,
      cap_buf, cap_dst, cap_on, cap_any) -> None:
    return None
