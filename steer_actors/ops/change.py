"""A global change as it travels from the engine actor to every TP rank: per steered layer its fingerprint
and its ops' numbers, and one float32 row per op in a single buffer (add: ``scale·v``; cap and ablation: the
unit direction). The engine builds it once for every rank (:func:`rows_payload`); a worker checks it against
its own layers and lays the rows into its K slots when it packs them (:func:`rows_from_payload`,
:func:`steer_actors.ops.rows.pack_flat`): its Python shares the GIL with the thread that launches forwards."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from steer_actors.ops.rows import OP_KINDS, CompactRows, op_numbers, unit_rows
from steer_actors.specs import SteeringSpec


class ChangeRows(msgspec.Struct, array_like=True, frozen=True):
    """A global change's rows for every TP rank (see the module docstring). Encoded as an array (compact, and
    told apart from a spec's wire form, a map, where a worker method takes either)."""

    fingerprint: str  # the spec's
    layers: dict[int, tuple[str, list[list[Any]]]]  # steered layer -> (its fingerprint, its ops' numbers)
    vectors: bytes  # float32 rows, one per op, layer by layer in ``layers``' order
    steerable: list[int]  # the layers the rows are for (a worker steering others refuses them)
    slots: int
    hidden: int


def rows_payload(spec: SteeringSpec, layers: Any, num_slots: int, hidden: int) -> ChangeRows:
    """``spec`` (validated) as the workers load it, for steerable ``layers`` of ``num_slots`` slots x ``hidden``.
    Bytes, not an array: the payload may also travel through vLLM's collective_rpc, which pickles. An
    all-layer add + cap change at 8B is 1.2 MB this way; the workers' K-slot layout would be 4.7 MB."""
    steered = [(idx, spec.layers[idx]) for idx in layers if idx in spec.layers]
    out = {}
    for idx, ls in steered:
        if len(ls.operations) > num_slots:
            raise ValueError(f"layer {idx} has {len(ls.operations)} operations; the engine allows {num_slots} "
                             f"(max_ops_per_layer)")
        out[idx] = (ls.fingerprint(), [op_numbers(o) for o in ls.operations])
    # every op's row in a few numpy calls for all layers (as ops_to_compact lays them out, bit for bit): this
    # runs on the engine actor's event loop, and op by op it would be most of an all-layer change's build
    ops = [o for _, ls in steered for o in ls.operations]
    vectors = np.stack([o.vector.numpy() for o in ops]) if ops else np.empty((0, hidden), dtype=np.float32)
    adds = [k for k, o in enumerate(ops) if not OP_KINDS[o.kind].direction]
    dirs = [k for k, o in enumerate(ops) if OP_KINDS[o.kind].direction]
    if adds:
        vectors[adds] *= np.array([ops[k].scale for k in adds], dtype=np.float32)[:, None]
    if dirs:
        vectors[dirs] = unit_rows(vectors[dirs])
    return ChangeRows(spec.fingerprint(), out, vectors.tobytes(), list(layers), num_slots, hidden)


def rows_from_payload(payload: ChangeRows, layers: dict[int, Any]) -> tuple[str, dict[int, tuple[str, Any]]]:
    """(fingerprint, {layer: (key, CompactRows, or ("", None) for none)}) for a worker whose steerable
    ``layers`` (index -> :class:`~steer_actors.worker.layer_patch.LayerSteerer`) must be exactly the payload's."""
    any_layer = next(iter(layers.values()))
    K, H = any_layer.num_slots, any_layer.hidden
    if (payload.slots, payload.hidden) != (K, H):
        raise ValueError(f"rows for {payload.slots} slots x hidden {payload.hidden}; this worker has {K} x {H}")
    if sorted(payload.steerable) != sorted(layers):
        raise ValueError(f"rows for layers {payload.steerable}; this worker steers {sorted(layers)}")
    data = payload.vectors
    if len(data) % (4 * H):
        raise ValueError(f"steering vectors must be float32 bytes in rows of hidden {H}")
    vectors = np.frombuffer(data, dtype="<f4").reshape(-1, H)
    entries = [(int(k), key, params) for k, (key, params) in payload.layers.items()]
    n_ops = sum(len(params) for _, _, params in entries)
    if n_ops != len(vectors):
        raise ValueError(f"{len(vectors)} steering vectors for {n_ops} ops")
    rows: dict[int, tuple[str, Any]] = {idx: ("", None) for idx in layers}
    at = 0
    for idx, key, params in entries:
        if idx not in layers or not params or len(params) > K:
            raise ValueError(f"layer {idx}: {len(params)} ops for a layer of {K} slots this worker steers")
        rows[idx] = (key, CompactRows(params, vectors[at:at + len(params)]))
        at += len(params)
    return payload.fingerprint, rows
