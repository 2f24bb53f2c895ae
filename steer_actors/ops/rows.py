"""Pure math of the steering ops on the residual stream ``s = h + r`` (fp32, no vLLM).

:data:`OP_KINDS` is the one table of op kinds: each kind's numbers, and where its vector and numbers go in a
slot. Two forms of the same ops:

* the reference form (``add``, ``cap``, ``ablate``, ``apply_reference``): one readable function per op,
  the definition the fused form is tested against;
* the slot form (``apply_slots``): a fixed number of op slots per layer, each a branch-free
  ``s += a; p = s·u; s += (clamp(p, lo, hi) - p + (g - 1) p) u``. A neutral slot (a = u = 0,
  lo = -inf, hi = +inf, g = 1) is the identity, so the same code runs whatever is set, which is what
  lets torch.compile and CUDA graphs keep one graph while the buffers change in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch

OpKindName = Literal["add", "cap", "ablation"]


@dataclass(frozen=True)
class Op:
    """One validated op, fp32 CPU tensors. ``vector`` is raw for add, unit-norm otherwise."""

    kind: OpKindName
    vector: torch.Tensor
    scale: float = 1.0
    min: float | None = None
    max: float | None = None


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row of ``vectors`` (``[n, H]`` float32) over its norm. Every unit direction is made here, one
    vector or many at once: each row's result does not depend on the others (numpy reduces each row alone),
    so rows the engine builds for all layers in one call equal those a worker builds op by op, bit for bit."""
    return vectors / np.sqrt(np.add.reduce(vectors * vectors, axis=1))[:, None]


def add(s: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return s + scale * v


def cap(s: torch.Tensor, u: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    p = s @ u
    c = torch.clamp(p, min=lo, max=hi)
    return s + (c - p).unsqueeze(-1) * u


def ablate(s: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    return s + (scale - 1.0) * (s @ u).unsqueeze(-1) * u


@dataclass(frozen=True)
class OpKind:
    """One kind of op. ``numbers``: the op's fields that travel as numbers beside its row, in order (a
    change's ``[kind, *numbers]``); ``slots``: the slot parameter each number sets (``lo``, ``hi``: the cap's
    bounds, None = unbounded; ``gamma``: the ablation's scale). ``direction``: its row is a unit direction (the
    slot's ``unit`` row), else ``scale·v`` (the slot's ``add`` row). ``reference``: ``(s, op) -> s'``."""

    name: OpKindName
    numbers: tuple[str, ...]
    slots: tuple[str, ...]
    direction: bool
    reference: Callable[[torch.Tensor, Any], torch.Tensor]


OP_KINDS: dict[str, OpKind] = {k.name: k for k in (
    OpKind("add", (), (), False, lambda s, op: add(s, op.vector.to(s.device), op.scale)),
    OpKind("cap", ("min", "max"), ("lo", "hi"), True, lambda s, op: cap(s, op.vector.to(s.device), op.min, op.max)),
    OpKind("ablation", ("scale",), ("gamma",), True, lambda s, op: ablate(s, op.vector.to(s.device), op.scale)),
)}


def op_numbers(op: Any) -> list:
    """``[kind, *numbers]`` of an op (an :class:`Op` or an op spec): what travels beside its row."""
    return [op.kind, *(getattr(op, n) for n in OP_KINDS[op.kind].numbers)]


def apply_reference(s: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Apply ``ops`` in order to ``s`` (``[..., H]``), in fp32, returning a new tensor."""
    out = s.float()
    for op in ops:
        out = OP_KINDS[op.kind].reference(out, op)
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


@dataclass(frozen=True)
class CompactRows:
    """One layer's ops as they travel: one row of H floats per op (add: ``scale·v``; cap and ablation: the
    unit direction) and each op's numbers (:func:`op_numbers`: ``["add"]``, ``["cap", lo, hi]``,
    ``["ablation", gamma]``).
    :func:`ops_to_flat`'s K slots hold two rows per slot, most of them zero: 4 slots x 2 rows against the 2
    rows an add + cap layer needs."""

    params: list[list]
    vectors: np.ndarray  # [n ops, H] float32

    def __post_init__(self) -> None:  # a worker refuses a malformed change when it stages it, not at commit
        if self.vectors.ndim != 2 or len(self.vectors) != len(self.params):
            raise ValueError(f"{len(self.vectors)} rows for {len(self.params)} ops")
        for p in self.params:
            kind = OP_KINDS.get(p[0]) if isinstance(p, (list, tuple)) and p and isinstance(p[0], str) else None
            if kind is None or len(p) != 1 + len(kind.numbers) or not all(
                    x is None or isinstance(x, (int, float)) for x in p[1:]):
                raise ValueError(f"malformed op parameters {p!r}")


def ops_to_compact(ops: list[Op], out: np.ndarray) -> list[list]:
    """Write each op's row into ``out`` (``[len(ops), H]`` float32) and return their numbers."""
    for k, op in enumerate(ops):
        v = op.vector.numpy()
        if OP_KINDS[op.kind].direction:
            out[k] = v
        else:
            np.multiply(v, np.float32(op.scale), out=out[k])
    return [op_numbers(op) for op in ops]


def pack_flat(rows: list, num_slots: int, hidden: int, tail: int = 0) -> np.ndarray:
    """Several layers' rows, each as :func:`ops_to_flat` lays them out, one after another in one float32 array;
    each given as such a flat array, as compact rows, or as None (the identity); then ``tail`` zeros.

    A worker packs while the runner's thread launches forwards, and every numpy call on a large array lets go of
    the GIL, which that thread may then keep for a whole switch interval. So the big moves here hold the GIL
    instead: the buffer is zeroed by ``bytearray`` and rows are copied through memoryviews, a memcpy each (an
    all-layer change at 8B: 72 rows of 16 KB, about 0.1 ms). Under a Python-bound runner, numpy's zeroing and
    scatter (and a concatenation, one release per layer) took 60-90 ms to pack 36 layers."""
    K, H = num_slots, hidden
    F = 2 * K * H + 3 * K
    slot_at = {"lo": 2 * K * H, "hi": 2 * K * H + K, "gamma": 2 * K * H + 2 * K}  # each parameter's K values
    unbounded = {"lo": -np.inf, "hi": np.inf}  # a bound given as None
    whole = np.frombuffer(bytearray(4 * (len(rows) * F + tail)), dtype=np.float32)
    out = whole[:len(rows) * F].reshape(len(rows), F)
    out[:, 2 * K * H:2 * K * H + K] = -np.inf  # 3K values a layer: too few for numpy to let go of the GIL
    out[:, 2 * K * H + K:2 * K * H + 2 * K] = np.inf
    out[:, 2 * K * H + 2 * K:] = 1.0
    dest = memoryview(whole).cast("B")
    row_bytes = 4 * H
    cells, values = [], []
    for i, r in enumerate(rows):
        if isinstance(r, np.ndarray):
            if r.shape != (F,):
                raise ValueError(f"steering rows of {r.size} floats do not fit {K} slots x hidden {H}")
            dest[4 * i * F:4 * (i + 1) * F] = memoryview(np.ascontiguousarray(r, dtype=np.float32)).cast("B")
        elif r is not None and r.params:
            if len(r.params) > K or r.vectors.shape[1] != H:
                raise ValueError(f"{len(r.params)} ops of hidden {r.vectors.shape[1]} for {K} slots of hidden {H}")
            src = memoryview(np.ascontiguousarray(r.vectors, dtype=np.float32)).cast("B")
            for k, p in enumerate(r.params):
                kind = OP_KINDS[p[0]]
                at = 4 * (i * F + (K + k if kind.direction else k) * H)  # add rows 0..K-1, unit rows K..2K-1
                dest[at:at + row_bytes] = src[k * row_bytes:(k + 1) * row_bytes]
                for slot, x in zip(kind.slots, p[1:]):
                    cells.append(i * F + slot_at[slot] + k)
                    values.append(unbounded[slot] if x is None else x)
    if cells:
        whole[cells] = values
    return whole


def ops_to_flat(ops: list[Op], num_slots: int, hidden: int) -> np.ndarray:
    """One layer's rows as one float32 array: add, unit (K x H each), then lo, hi, gamma (K each). Built in
    numpy: every torch call lets go of the GIL, and a worker's thread must win it back from the runner."""
    K, H = num_slots, hidden
    if len(ops) > K:
        raise ValueError(f"{len(ops)} ops on one layer, but the engine has {K} slots per layer")
    vectors = np.empty((len(ops), H), dtype=np.float32)
    return pack_flat([CompactRows(ops_to_compact(ops, vectors), vectors)], K, H)


def rows_from_flat(flat: np.ndarray, num_slots: int, hidden: int) -> SlotRows:
    K, H = num_slots, hidden
    t = torch.from_numpy(flat)
    return SlotRows(add=t[:K * H].view(K, H), unit=t[K * H:2 * K * H].view(K, H), lo=t[2 * K * H:2 * K * H + K],
                    hi=t[2 * K * H + K:2 * K * H + 2 * K], gamma=t[2 * K * H + 2 * K:])


def ops_to_rows(ops: list[Op], num_slots: int, hidden: int) -> SlotRows:
    return rows_from_flat(ops_to_flat(ops, num_slots, hidden), num_slots, hidden)


def apply_slots(s: torch.Tensor, add_: torch.Tensor, unit: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                gamma: torch.Tensor) -> torch.Tensor:
    """Fused form over K slots, the one torch loop over slots: ``s`` is ``[T, H]`` fp32. Slot tensors as in
    :class:`SlotRows` (``add``/``unit`` [K, H], ``lo``/``hi``/``gamma`` [K]: every row the same ops), or with a
    leading [T] (each row its own ops: per-request slots)."""
    for k in range(add_.shape[-2]):
        u = unit[..., k, :]
        s = s + add_[..., k, :]
        p = s @ u if u.dim() == 1 else (s * u).sum(-1)  # one direction for all rows: a matrix-vector product
        c = torch.clamp(p, min=lo[..., k], max=hi[..., k])
        s = s + ((c - p) + (gamma[..., k] - 1.0) * p).unsqueeze(-1) * u
    return s
