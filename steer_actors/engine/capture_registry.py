"""Engine-side home of finished captures: tensors in the Ray object store, owned by the engine actor.

A per-engine byte budget is checked before a capture request runs (a clear ``ValueError``, never an
OOM or a silent drop); entries live until released or until their TTL passes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steer_actors import row_dtype


@dataclass
class _Entry:
    ref: Any  # one object per capture: [layers, >= rows, H] of dtype's storage (one object, not one per layer: each
    # object-store entry costs about a millisecond to create, a layer's rows far less to copy)
    layer_ids: list[int]
    rows: int  # the capture's rows are [:, :rows]
    positions: list[int]
    token_ids: list[int]
    nbytes: int
    created: float
    dtype: str  # see row_dtype: bfloat16 rows travel as int16


class CaptureRegistry:
    def __init__(self, budget_bytes: int, ttl_s: float):
        self.budget, self.ttl = int(budget_bytes), float(ttl_s)
        self.entries: dict[str, _Entry] = {}
        self.used = 0
        self.reserved = 0
        self._lock = threading.Lock()  # puts run on a thread of their own (off the actor's event loop)

    def prune(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [c for c, e in self.entries.items() if now - e.created > self.ttl]
        self.release(expired)

    def reserve(self, nbytes: int) -> None:
        self.prune()
        with self._lock:
            if self.used + self.reserved + nbytes > self.budget:
                raise ValueError(
                    f"capture budget exceeded: this request needs up to {nbytes} bytes, {self.used + self.reserved} "
                    f"of {self.budget} are in use; release captures or raise capture_budget_bytes")
            self.reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self.reserved = max(0, self.reserved - nbytes)

    def put(self, capture_id: str, layers: dict[int, torch.Tensor], positions: list[int],
            token_ids: list[int]) -> dict[str, Any]:
        import ray

        ids = sorted(layers)
        rows = len(positions)
        dtype = layers[ids[0]].dtype if ids else torch.float32
        ref = ray.put(np.stack([row_dtype.as_storage(layers[i][:rows]) for i in ids]) if ids
                      else np.zeros((0, rows, 0), row_dtype.storage(dtype)))
        nbytes = sum(layers[i][:rows].numel() * layers[i].element_size() for i in ids)
        return self.put_ref(capture_id, ref, ids, rows, positions, token_ids, nbytes, row_dtype.name(dtype))

    def put_ref(self, capture_id: str, ref: Any, layer_ids: list[int], rows: int, positions: list[int],
                token_ids: list[int], nbytes: int, dtype: str = "float32") -> dict[str, Any]:
        """Register an object made elsewhere (e.g. the return of a task still copying it):
        ``[len(layer_ids), >= rows, H]`` of ``dtype``'s storage, the capture being its first ``rows`` rows."""
        with self._lock:
            self.entries[capture_id] = _Entry(ref, list(layer_ids), int(rows), positions, token_ids, nbytes,
                                              time.monotonic(), dtype)
            self.used += nbytes
        return {"capture_id": capture_id, "ref": ref, "layers": list(layer_ids), "rows": int(rows),
                "positions": positions, "token_ids": token_ids, "nbytes": nbytes, "dtype": dtype,
                "owner": current_actor()}

    async def get(self, capture_id: str) -> dict[str, Any]:
        """Awaited, never a blocking ``ray.get``: the refs may be the returns of a task of this same
        actor, which needs the event loop to run."""
        self.prune()
        e = self.entries.get(capture_id)
        if e is None:
            raise ValueError(f"unknown capture {capture_id!r} (released, expired, or never made here)")
        arr = await e.ref
        return {"positions": e.positions, "token_ids": e.token_ids,
                "layers": {layer: row_dtype.as_tensor(np.array(arr[i, :e.rows]), e.dtype)
                           for i, layer in enumerate(e.layer_ids)}}

    def release(self, capture_ids: list[str]) -> int:
        n = 0
        with self._lock:
            for cid in capture_ids:
                e = self.entries.pop(cid, None)
                if e is not None:
                    self.used -= e.nbytes
                    n += 1
        return n

    def stats(self) -> dict[str, int]:
        return {"captures": len(self.entries), "used_bytes": self.used, "reserved_bytes": self.reserved,
                "budget_bytes": self.budget}


_ME: list[Any] = []


def current_actor() -> Any:
    """This process's own actor handle, or None when it runs in-process (no actor to queue tasks on). Made
    once: Ray builds a new handle at every ``current_actor`` (on the H100, an eighth of the engine actor's
    samples while 512 requests captured)."""
    if _ME:
        return _ME[0]
    import ray

    if not ray.is_initialized():
        return None
    try:
        me = ray.get_runtime_context().current_actor
    except RuntimeError:  # not inside an actor
        return None
    _ME.append(me)
    return me
