"""Client-side capture handles and the batched fetch from the Ray object store."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from typing import Any, Generator

from steer_actors import row_dtype


@dataclass
class CaptureHandle:
    """One request's captured residual stream. ``captures[layer][0]["hidden"]`` is ``[seq_len, H]``
    with ``seq_len = prompt + generated - 1``, once fetched (``await handle.fetch()``, or
    :func:`fetch_captures_batch` for many at once), of ``dtype``: the engine's ``capture_dtype`` (by default
    the model's). Reading ``captures`` before a fetch raises ``RuntimeError``. ``ref``'s array holds
    bfloat16 rows as int16 bits (numpy has no bfloat16): the fetch gives them back as bfloat16 tensors.

    ``captures[layer]`` is a list of one entry (chatspace kept one per TP worker; here the ranks' rows
    are one tensor) with ``hidden``, ``positions`` and ``token_ids``."""

    capture_id: str
    layer_indices: list[int]
    positions: list[int]
    token_ids: list[int]
    nbytes: int
    ref: Any = field(repr=False)  # one object-store entry: [layers, >= rows, H] (see row_dtype)
    owner: Any = field(default=None, repr=False)  # the engine actor that owns the tensors
    _captures: dict[int, list[dict[str, Any]]] | None = field(default=None, repr=False)
    dtype: str = "float32"

    @property
    def captures(self) -> dict[int, list[dict[str, Any]]]:
        if self._captures is None:
            raise RuntimeError(f"captures of {self.capture_id} are not fetched yet: await handle.fetch() or "
                               f"model.fetch_captures_batch(handles)")
        return self._captures

    @property
    def fetched(self) -> bool:
        return self._captures is not None

    async def fetch(self, timeout_s: float = 300.0) -> dict[int, list[dict[str, Any]]]:
        """Fetch this handle's tensors (once; later calls return them again) without blocking the event
        loop; returns ``captures``."""
        if self._captures is None:
            await asyncio.to_thread(fetch_captures_batch, [self], timeout_s)
        return self.captures

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "CaptureHandle":
        return cls(d["capture_id"], [int(k) for k in d["layers"]], list(d["positions"]), list(d["token_ids"]),
                   int(d["nbytes"]), d["ref"], d.get("owner"), dtype=d.get("dtype", "float32"))


class CaptureBatch(list):
    """The handles of a finished :func:`fetch_captures_batch`: a list that may also be awaited (chatspace's
    ``await model.fetch_captures_batch(handles)``); awaiting it returns it at once."""

    def __await__(self) -> Generator[Any, None, "CaptureBatch"]:
        return self
        yield  # pragma: no cover  (makes this a generator: awaiting it finishes at once)


def fetch_captures_batch(handles: list[CaptureHandle], timeout_s: float = 300.0) -> CaptureBatch:
    """Resolve every handle's tensors with one batched ``ray.get``, now (this call blocks until they are
    here); fills each ``handle.captures``. The returned list of the same handles may also be awaited."""
    import ray

    # A capture lives as long as its engine: a copy that happens to survive on this node after the
    # owner died is not served, so the answer never depends on where the bytes were cached.
    owners = {h.owner._actor_id: h.owner for h in handles if h.owner is not None}
    timed_out = TimeoutError(f"fetching {len(handles)} captures took longer than {timeout_s}s")
    try:
        ray.get([o.__ray_ready__.remote() for o in owners.values()], timeout=timeout_s)
    except ray.exceptions.ActorUnavailableError:  # not dead: unreachable for now (restarting, network)
        raise
    except ray.exceptions.RayActorError:
        raise RuntimeError("capture is gone: the engine replica that owned it died") from None
    except ray.exceptions.GetTimeoutError:
        raise timed_out from None
    try:
        arrays = ray.get([h.ref for h in handles], timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.ObjectFetchTimedOutError):  # the latter: a lost kind
        raise timed_out from None
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError) as e:
        raise RuntimeError(f"capture is gone: the engine replica that owned it died ({type(e).__name__})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # object-store arrays are read-only; we never write to them
        for h, arr in zip(handles, arrays):
            rows = len(h.positions)  # views of the object-store buffer: no copy
            h._captures = {layer: [{"hidden": row_dtype.as_tensor(arr[i, :rows], h.dtype), "positions": h.positions,
                                   "token_ids": h.token_ids}] for i, layer in enumerate(h.layer_indices)}
    return CaptureBatch(handles)
