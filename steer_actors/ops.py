"""Pure math of the steering ops on the residual stream ``s = h + r`` (fp32, no vLLM).

Two forms of the same ops:

* the reference form (``add``, ``cap``, ``ablate``, ``apply_reference``): one readable function per op,
  used by the HF oracle and as the definition the fused form is tested against;
* the slot form (``apply_slots``): a fixed number of op slots per layer, each a branch-free
  ``s += a; p = s·u; s += (clamp(p, lo, hi) - p + (g - 1) p) u``. A neutral slot (a = u = 0,
  lo = -inf, hi = +inf, g = 1) is the identity, so the same code runs whatever is set, which is what
  lets torch.compile and CUDA graphs keep one graph while the buffers change in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

OpKind = Literal["add", "cap", "ablation"]


@dataclass(frozen=True)
class Op:
    """One validated op, fp32 CPU tensors. ``vector`` is raw for add, unit-norm otherwise."""

    kind: OpKind
    vector: torch.Tensor
    scale: float = 1.0
    min: float | None = None
    max: float | None = None


def add(s: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return s + scale * v


def cap(s: torch.Tensor, u: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    p = s @ u
    c = torch.clamp(p, min=lo, max=hi)
    return s + (c - p).unsqueeze(-1) * u


def ablate(s: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    return s + (scale - 1.0) * (s @ u).unsqueeze(-1) * u


def apply_reference(s: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Apply ``ops`` in order to ``s`` (``[..., H]``), in fp32, returning a new tensor."""
    out = s.float()
    for op in ops:
        v = op.vector.to(out.device)
        if op.kind == "add":
            out = add(out, v, op.scale)
        elif op.kind == "cap":
            out = cap(out, v, op.min, op.max)
        else:
            out = ablate(out, v, op.scale)
    return out


@dataclass
class SlotRows:
    """Host-side rows for the K slots of one layer, ready to copy into the device buffers."""

    add: torch.Tensor  # [K, H]
    unit: torch.Tensor  # [K, H]
    lo: torch.Tensor  # [K]
    hi: torch.Tensor  # [K]
    gamma: torch.Tensor  # [K]


def neutral_rows(num_slots: int, hidden: int) -> SlotRows:
    return rows_from_flat(ops_to_flat([], num_slots, hidden), num_slots, hidden)


def ops_to_flat(ops: list[Op], num_slots: int, hidden: int) -> np.ndarray:
    """One layer's rows as one float32 array: add, unit (K x H each), then lo, hi, gamma (K each). Built in
    numpy: every torch call lets go of the GIL, and a worker's thread must win it back from the runner."""
    K, H = num_slots, hidden
    if len(ops) > K:
        raise ValueError(f"{len(ops)} ops on one layer, but the engine has {K} slots per layer")
    flat = np.zeros(2 * K * H + 3 * K, dtype=np.float32)
    add, unit = flat[:K * H].reshape(K, H), flat[K * H:2 * K * H].reshape(K, H)
    lo, hi, gamma = flat[2 * K * H:2 * K * H + K], flat[2 * K * H + K:2 * K * H + 2 * K], flat[2 * K * H + 2 * K:]
    lo[:], hi[:], gamma[:] = -np.inf, np.inf, 1.0
    for k, op in enumerate(ops):
        v = op.vector.numpy()
        if op.kind == "add":
            np.multiply(v, np.float32(op.scale), out=add[k])
        elif op.kind == "cap":
            unit[k] = v
            lo[k] = -np.inf if op.min is None else op.min
            hi[k] = np.inf if op.max is None else op.max
        else:
            unit[k] = v
            gamma[k] = op.scale
    return flat


def rows_from_flat(flat: np.ndarray, num_slots: int, hidden: int) -> SlotRows:
    K, H = num_slots, hidden
    t = torch.from_numpy(flat)
    return SlotRows(add=t[:K * H].view(K, H), unit=t[K * H:2 * K * H].view(K, H), lo=t[2 * K * H:2 * K * H + K],
                    hi=t[2 * K * H + K:2 * K * H + 2 * K], gamma=t[2 * K * H + 2 * K:])


def ops_to_rows(ops: list[Op], num_slots: int, hidden: int) -> SlotRows:
    return rows_from_flat(ops_to_flat(ops, num_slots, hidden), num_slots, hidden)


def rows_to_bytes(rows: SlotRows) -> bytes:
    """One layer's rows as little-endian float32 bytes (the layout of :func:`ops_to_flat`)."""
    return np.concatenate([t.reshape(-1).float().numpy() for t in (rows.add, rows.unit, rows.lo, rows.hi, rows.gamma)]
                          ).astype("<f4", copy=False).tobytes()


def flat_from_bytes(data: bytes, num_slots: int, hidden: int) -> np.ndarray:
    """Read-only float32 view of one layer's rows as :func:`ops_to_flat` lays them out."""
    K, H = num_slots, hidden
    flat = np.frombuffer(data, dtype="<f4")
    if flat.size != 2 * K * H + 3 * K:
        raise ValueError(f"steering rows of {flat.size} floats do not fit {K} slots x hidden {H}")
    return flat


def rows_from_bytes(data: bytes, num_slots: int, hidden: int) -> SlotRows:
    return rows_from_flat(flat_from_bytes(data, num_slots, hidden).astype(np.float32), num_slots, hidden)


def apply_slots(
    s: torch.Tensor,
    add_: torch.Tensor,
    unit: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Fused form over K slots: ``s`` is ``[T, H]`` fp32; slot tensors as in :class:`SlotRows`."""
    for k in range(add_.shape[0]):
        s = s + add_[k]
        p = s @ unit[k]
        c = torch.clamp(p, min=lo[k], max=hi[k])
        s = s + ((c - p) + (gamma[k] - 1.0) * p).unsqueeze(-1) * unit[k]
    return s
