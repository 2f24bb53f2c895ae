"""The engine actor's side of activation capture (:class:`EngineCapture`): registering requests with the
workers, taking their rows when they finish, and handing them to the object store (see
:mod:`steer_actors.worker.capture.store` for the worker side). The engine actor holds one and calls it;
what it needs from the engine is passed in at construction (:class:`EngineCapture`'s arguments)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from steer_actors import row_dtype
from steer_actors.engine.capture_registry import CaptureRegistry, current_actor
from steer_actors.engine.coalesce import Coalescer
from steer_actors.results import GenerationResult
from steer_actors.specs import check_capture_layers
from steer_actors.worker.capture.arena import is_segment_path, shared_memory_key, stored_rows
from steer_actors.worker.protocol import CaptureRequest, CaptureTaken

log = logging.getLogger(__name__)

# The object store's copy of a finished capture (tens of MB, Ray's parallel memcpy when the task's return is
# stored) runs on this group's own thread and event loop: on the default one it held up vLLM's output
# handling and every other call of the engine (a third of that loop's busy samples in an H100 profile).
# The engine actor's ``materialize_capture`` runs in it.
STORE_GROUP = "capture_store"
CONCURRENCY_GROUPS = {STORE_GROUP: 2}


async def _uncancelled(fut: "asyncio.Future[Any]") -> Any:
    """Await ``fut`` to its end, then raise a cancellation that came meanwhile: a thread cannot be stopped,
    and what it stores and the regions it reads are released only once it has finished."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.cancelled():
                raise
            if fut.done():
                result = fut.result()
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class EngineCapture:
    """Captures of one engine. ``workers(method, *args)``: a ``steer_*`` call on every TP rank (a list, one
    answer per rank); ``steerable_layers()``: the layers the workers steer (and so capture); ``count_tokens``:
    a text prompt's length in the tokens vLLM runs; ``max_model_len``, ``hidden_size``, ``dtype``: the model's,
    as the workers' capture rows are sized; ``budget_bytes`` and ``ttl_s``: see
    :class:`~steer_actors.engine.capture_registry.CaptureRegistry`."""

    def __init__(self, workers: Callable[..., Awaitable[list[Any]]],
                 steerable_layers: Callable[[], Awaitable[list[int]]], count_tokens: Callable[[str], int],
                 max_model_len: int, hidden_size: int, dtype: torch.dtype, budget_bytes: int, ttl_s: float) -> None:
        self._workers, self._steerable_layers, self._count_tokens = workers, steerable_layers, count_tokens
        self.max_model_len, self.hidden_size, self.dtype = int(max_model_len), int(hidden_size), dtype
        self.registry = CaptureRegistry(budget_bytes, ttl_s)
        self.recomputed_rows = 0  # rows computed twice (preemption by recompute), deduplicated by position
        self._coalescers: dict[str, Coalescer] = {}
        self._segments: dict[Any, Any] = {}  # capture segments mapped by this engine (see _segment)
        self._tasks: set[asyncio.Task] = set()  # background work: a task nobody references may be collected

    async def start(self, prompts: list[Any], max_tokens: int | None, layers: Any, ids: list[str]) -> int:
        """Register the requests ``ids`` (of ``prompts``, each to run up to ``max_tokens``) with the capturing
        worker, before they run; returns the bytes reserved for them (:meth:`unreserve` once they ended)."""
        layers = check_capture_layers(layers)
        steerable = await self._steerable_layers()
        bad = sorted(set(layers) - set(steerable))
        if bad:
            raise ValueError(f"cannot capture layers {bad}: capturable layers are {steerable}")
        n_tokens = [len(p) if isinstance(p, list) else self._count_tokens(p) for p in prompts]
        # rows a request can have: prompt + max_tokens (vLLM runs an unset max_tokens to the model's length)
        max_len = self.max_model_len
        rows = [min(max_len, n + max_tokens) if max_tokens else max(max_len, n) for n in n_tokens]
        need = sum(rows) * len(set(layers)) * self.hidden_size * row_dtype.itemsize(self.dtype)
        self.registry.reserve(need)
        try:
            ranks = await self._coalesced("steer_capture_register")(ids, [CaptureRequest(rid, sorted(set(layers)), r)
                                                                          for rid, r in zip(ids, rows)])
            failed = {rid: why for r in ranks if r for rid, why in r.items()}
            if failed:  # the generate call's cleanup drops the others of this call
                raise ValueError(f"capture could not start: {next(iter(failed.values()))}")
        except BaseException:
            self.registry.unreserve(need)
            raise
        return need

    def unreserve(self, nbytes: int) -> None:
        self.registry.unreserve(nbytes)

    def release(self, capture_ids: list[str]) -> int:
        """Drop stored captures (and their share of the budget)."""
        return self.registry.release(capture_ids)

    async def drop(self, request_ids: list[str]) -> None:
        """Whatever the worker still holds for these requests (captures never taken)."""
        await self._coalesced("steer_capture_drop")(request_ids, request_ids)

    def _coalesced(self, method: str) -> Any:
        """One :class:`~steer_actors.engine.coalesce.Coalescer` per per-request worker method (see there)."""
        table = self._coalescers
        if method not in table:
            if method == "steer_capture_register":
                send = lambda items: self._workers(method, items, shared_memory_key(), self.registry.budget)  # noqa: E731
            else:
                send = lambda items: self._workers(method, items)  # noqa: E731
            table[method] = Coalescer(send)
        return table[method]

    async def finish(self, results: list[GenerationResult], ids: list[str]) -> None:
        """Take the finished requests' rows from the worker and store them (each result's ``captures``)."""
        take = asyncio.ensure_future(self._coalesced("steer_capture_take")(ids, ids))
        try:
            ranks = await asyncio.shield(take)
        except asyncio.CancelledError:  # the regions the take hands over still need an owner: nobody wants them
            take.add_done_callback(self._free_taken)
            raise
        taken = next(t for t in ranks if t is not None)
        me = current_actor()
        handed: list[int] = []  # regions a materialize task now reads (freed once its copies are stored)
        pending: list[Any] = []  # that task's returns
        eager = []
        stored: list[str] = []
        try:
            for res, rid in zip(results, ids):
                data = taken.get(rid) or CaptureTaken(error=f"capture of request {rid} was never registered on the "
                                                            f"worker")
                if data.error is not None:
                    raise ValueError(data.error)
                self.recomputed_rows += data.recomputed
                # rows past prompt + generated - 1 (e.g. rejected speculative drafts) are not the sequence
                expected = len(res.prompt_token_ids) + len(res.token_ids) - 1
                keep = sum(p < expected for p in data.positions)
                positions, tokens = data.positions[:keep], data.token_ids[:keep]
                if positions != list(range(expected)):  # never a silently short capture
                    raise ValueError(f"capture of request {rid} is incomplete: {keep} of {expected} positions "
                                     f"were captured")
                if me is None or data.file is None:
                    eager.append((res, rid, data, keep))
                    continue
                # A task of this actor copies the rows into the object store: its refs exist now, so the
                # response does not wait for the copy (all-layer captures are tens of MB per request),
                # and a fetch waits only for its own rows.
                layer_ids, dtype = data.layer_ids, data.dtype
                rows = stored_rows(keep, int(data.shape[1]))
                ref = me.materialize_capture.remote(data.file, data.offset_rows, data.shape, rows, dtype)
                handed.append(data.region)
                pending.append(ref)
                # what the object store holds
                nbytes = len(layer_ids) * rows * int(data.shape[2]) * row_dtype.itemsize(row_dtype.DTYPES[dtype])
                res.captures = self.registry.put_ref(rid, ref, layer_ids, keep, positions, tokens, nbytes, dtype)
                stored.append(rid)

            def store() -> None:  # copies into the object store: off the event loop, which serves every request
                for res, rid, data, keep in eager:
                    layers = {layer: t[:keep] for layer, t in _capture_layers(data, self._segments).items()}
                    res.captures = self.registry.put(rid, layers, data.positions[:keep], data.token_ids[:keep])
                    stored.append(rid)

            if eager:
                await _uncancelled(asyncio.ensure_future(asyncio.to_thread(store)))
        except BaseException:
            self.registry.release(stored)  # the call fails whole: no entry of it lingers against the budget
            raise
        finally:
            if pending:
                self.background(self._free_when_stored(pending, handed))
            rest = [data.region for data in taken.values()
                    if data is not None and data.region is not None and data.region not in handed]
            if rest:  # read here (eager), never handed on, or the call failed: the worker may reuse them
                self.background(self._free_regions(rest))

    async def _free_when_stored(self, refs: list[Any], regions: list[int]) -> None:
        """A region may be reused only once the object store holds its copy (the task's return is ready).
        Each is freed as soon as its own copy is stored, those ready together in one call: a batch's regions
        do not wait for its slowest copy, so the arena recycles warm rows instead of growing onto new ones."""

        async def stored(ref: Any) -> None:
            try:
                await ref
            except Exception:  # the copy failed: nothing reads the region any more either
                pass

        waiting = {asyncio.ensure_future(stored(ref)): region for ref, region in zip(refs, regions)}
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            await self._free_regions([waiting.pop(d) for d in done])

    async def _free_regions(self, regions: list[int]) -> None:
        try:
            await self._coalesced("steer_capture_free")([], regions)
        except Exception as e:  # the worker is gone (and its regions with it), or the channel failed
            log.warning("could not free %d capture regions: %s", len(regions), e)

    def _free_taken(self, take: asyncio.Future) -> None:
        if take.cancelled() or take.exception() is not None:
            return
        regions = [data.region for rank in take.result() for data in (rank or {}).values()
                   if data is not None and data.region is not None]
        if regions:
            self.background(self._free_regions(regions))

    def background(self, coro: Any) -> None:
        """Run ``coro`` to its end whatever becomes of the call that started it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def materialize(self, path: str, offset_rows: int, shape: list[int], rows: int,
                          dtype: str = "float32") -> Any:
        """The first ``rows`` rows of each layer of one region (``shape``: [layers, max_rows, H], layer-major)
        of a capture segment, as one array: this task's return value is the capture's object-store entry.
        The whole region is a contiguous view of the mapping, which Ray's put copies with its parallel copy;
        fewer rows (see :func:`~steer_actors.worker.capture.arena.stored_rows`) cost one more copy here. The engine frees the region once
        it is stored."""
        if not is_segment_path(path):
            raise ValueError(f"not a capture file: {path!r}")
        n_layers, max_rows, hidden = (int(x) for x in shape)
        offset_rows, rows = int(offset_rows), int(rows)
        if dtype not in row_dtype.DTYPES:
            raise ValueError(f"unknown capture dtype {dtype!r}")
        flat = _segment(self._segments, path, dtype)
        start, end = offset_rows * hidden, (offset_rows + n_layers * max_rows) * hidden
        if min(n_layers, max_rows, hidden) <= 0 or offset_rows < 0 or end > flat.shape[0] or not 0 <= rows <= max_rows:
            raise ValueError(f"region {offset_rows}+{shape} (rows {rows}) is not inside {path!r}")
        # a plain ndarray view (not the memmap subclass, which would travel as one)
        region = np.asarray(flat[start:end]).reshape(n_layers, max_rows, hidden)
        if rows == max_rows:
            return region
        # tens of MB: off the event loop, which serves every request (numpy copies without the GIL)
        return await asyncio.to_thread(np.ascontiguousarray, region[:, :rows])

    async def get(self, capture_id: str) -> dict[str, Any]:
        return await self.registry.get(capture_id)

    def stats(self) -> dict[str, Any]:
        self.registry.prune()
        return {**self.registry.stats(), "recomputed_rows": self.recomputed_rows,
                # round trips to the workers per per-request method (requests arriving together share one)
                "worker_calls": {m: c.calls for m, c in self._coalescers.items()}}

    async def arena_stats(self) -> dict[str, int]:
        """The capturing worker's arena: segments, regions in use (0 once every capture is stored and
        nothing is running), bytes of shared memory reserved (its peak: segments are kept)."""
        ranks = await self._workers("steer_capture_stats")
        return next((r for r in ranks if r is not None), {})



def _segment(maps: dict[Any, Any], path: str, dtype: str) -> Any:
    """A capture segment mapped once per engine (flat, of ``dtype``'s storage: see :mod:`steer_actors.row_dtype`): its pages
    fault once, not once per capture. Keyed by the file itself too: a ``/proc/<pid>/fd/<fd>`` path names
    another file once that worker is gone."""
    key = (path, os.stat(path).st_ino, dtype)
    arr = maps.get(key)
    if arr is None:
        arr = maps[key] = np.memmap(path, dtype=row_dtype.storage(row_dtype.DTYPES[dtype]), mode="r")
    return arr


def _capture_layers(data: CaptureTaken, maps: dict[str, Any]) -> dict[int, Any]:
    """A worker's capture payload: inline tensors, or a region of a shared-memory segment
    ([layer, position, hidden], layer-major)."""
    import warnings

    from steer_actors.wire import decode_tensor

    if data.file is not None:
        # rows by absolute position, mapped rather than read: the object store's put is the one copy here
        dtype = data.dtype
        arr = _segment(maps, data.file, dtype).reshape(-1, int(data.shape[2]))
        off, max_rows, n = int(data.offset_rows), int(data.shape[1]), len(data.positions)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only mapping: nobody writes through these tensors
            return {int(layer): row_dtype.as_tensor(arr[off + i * max_rows:off + i * max_rows + n], dtype)
                    for i, layer in enumerate(data.layer_ids)}
    return {int(k): decode_tensor(v) for k, v in data.layers.items()}
