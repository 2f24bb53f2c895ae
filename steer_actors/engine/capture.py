"""The engine actor's side of activation capture: registering requests with the workers, taking their
rows when they finish, and handing them to the object store (see :mod:`steer_actors.worker.capture.store` for the
worker side). Mixed into :class:`steer_actors.engine.actor.SteerEngine`, whose state it uses."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import ray

from steer_actors import row_dtype
from steer_actors.worker.capture.arena import is_segment_path, stored_rows
from steer_actors.engine.capture_registry import current_actor
from steer_actors.results import GenerationResult
from steer_actors.specs import check_capture_layers

# The object store's copy of a finished capture (tens of MB, Ray's parallel memcpy when the task's return is
# stored) runs on this group's own thread and event loop: on the default one it held up vLLM's output
# handling and every other call of the engine (an H100 profile, session 8: a third of that loop's busy samples).
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


class EngineCaptureMixin:
    async def _start_capture(self, prompts, params, layers: list[int], ids: list[str]) -> int:
        layers = check_capture_layers(layers)
        info = await self.info()
        bad = sorted(set(layers) - set(info["steerable_layers"]))
        if bad:
            raise ValueError(f"cannot capture layers {bad}: capturable layers are {info['steerable_layers']}")
        n_tokens = [len(p) if isinstance(p, list) else len(self.tokenizer()(p).input_ids) for p in prompts]
        # rows a request can have: prompt + max_tokens (vLLM runs an unset max_tokens to the model's length)
        max_len = int(self.engine.vllm_config.model_config.max_model_len)
        rows = [min(max_len, n + params.max_tokens) if params.max_tokens else max(max_len, n) for n in n_tokens]
        need = sum(rows) * len(set(layers)) * self.hidden_size * row_dtype.itemsize(self.capture_dtype)
        self.captures.reserve(need)
        try:
            ranks = await self._coalesced("steer_capture_register")(ids, [(rid, sorted(set(layers)), r)
                                                                          for rid, r in zip(ids, rows)])
            failed = {rid: why for r in ranks if r for rid, why in r.items()}
            if failed:  # the generate call's cleanup drops the others of this call
                raise ValueError(f"capture could not start: {next(iter(failed.values()))}")
        except BaseException:
            self.captures.unreserve(need)
            raise
        return need

    def _coalesced(self, method: str) -> Any:
        """One :class:`~steer_actors.engine.coalesce.Coalescer` per per-request worker method (see there)."""
        from steer_actors.worker.capture.arena import shared_memory_key
        from steer_actors.engine.coalesce import Coalescer

        table = self.__dict__.setdefault("_coalescers", {})
        if method not in table:
            if method == "steer_capture_register":
                send = lambda items: self._workers(method, items, shared_memory_key(), self.captures.budget)  # noqa: E731
            else:
                send = lambda items: self._workers(method, items)  # noqa: E731
            table[method] = Coalescer(send)
        return table[method]

    async def _finish_capture(self, results: list[GenerationResult], ids: list[str]) -> None:
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
                data = taken.get(rid) or {"error": f"capture of request {rid} was never registered on the worker"}
                if "error" in data:
                    raise ValueError(data["error"])
                self._recomputed_rows += data.get("recomputed", 0)
                # rows past prompt + generated - 1 (e.g. rejected speculative drafts) are not the sequence
                expected = len(res.prompt_token_ids) + len(res.token_ids) - 1
                keep = sum(p < expected for p in data["positions"])
                positions, tokens = data["positions"][:keep], data["token_ids"][:keep]
                if positions != list(range(expected)):  # never a silently short capture
                    raise ValueError(f"capture of request {rid} is incomplete: {keep} of {expected} positions "
                                     f"were captured")
                if me is None or "file" not in data:
                    eager.append((res, rid, data, keep))
                    continue
                # A task of this actor copies the rows into the object store: its refs exist now, so the
                # response does not wait for the copy (all-layer captures are tens of MB per request),
                # and a fetch waits only for its own rows.
                layer_ids = data["layer_ids"]
                rows = stored_rows(keep, int(data["shape"][1]))
                dtype = data.get("dtype", "float32")
                ref = me.materialize_capture.remote(data["file"], data["offset_rows"], data["shape"], rows, dtype)
                handed.append(data["region"])
                pending.append(ref)
                # what the object store holds
                nbytes = len(layer_ids) * rows * int(data["shape"][2]) * row_dtype.itemsize(row_dtype.DTYPES[dtype])
                res.captures = self.captures.put_ref(rid, ref, layer_ids, keep, positions, tokens, nbytes, dtype)
                stored.append(rid)

            def store() -> None:  # copies into the object store: off the event loop, which serves every request
                for res, rid, data, keep in eager:
                    layers = {layer: t[:keep] for layer, t in _capture_layers(data, self._segment_maps()).items()}
                    res.captures = self.captures.put(rid, layers, data["positions"][:keep], data["token_ids"][:keep])
                    stored.append(rid)

            if eager:
                await _uncancelled(asyncio.ensure_future(asyncio.to_thread(store)))
        except BaseException:
            self.captures.release(stored)  # the call fails whole: no entry of it lingers against the budget
            raise
        finally:
            if pending:
                self._background(self._free_when_stored(pending, handed))
            rest = [data["region"] for data in taken.values() if data and "region" in data and data["region"] not in handed]
            if rest:  # read here (eager), never handed on, or the call failed: the worker may reuse them
                self._background(self._free_regions(rest))

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
            import logging

            logging.getLogger(__name__).warning("could not free %d capture regions: %s", len(regions), e)

    def _free_taken(self, take: asyncio.Future) -> None:
        if take.cancelled() or take.exception() is not None:
            return
        regions = [data["region"] for rank in take.result() for data in (rank or {}).values() if data and "region" in data]
        if regions:
            self._background(self._free_regions(regions))

    def _background(self, coro: Any) -> None:
        tasks = self.__dict__.setdefault("_capture_tasks", set())  # a task nobody references may be collected
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _segment_maps(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_capture_segments", {})

    @ray.method(concurrency_group=STORE_GROUP)
    async def materialize_capture(self, path: str, offset_rows: int, shape: list[int], rows: int,
                                  dtype: str = "float32") -> Any:
        """The first ``rows`` rows of each layer of one region (``shape``: [layers, max_rows, H], layer-major)
        of a capture segment, as one array: this task's return value is the capture's object-store entry.
        The whole region is a contiguous view of the mapping, which Ray's put copies with its parallel copy;
        fewer rows (see :func:`~steer_actors.worker.capture.arena.stored_rows`) cost one more copy here. The engine frees the region once
        it is stored."""
        if not is_segment_path(path):
            raise ValueError(f"not a capture file: {path!r}")
        import numpy as np

        n_layers, max_rows, hidden = (int(x) for x in shape)
        offset_rows, rows = int(offset_rows), int(rows)
        if dtype not in row_dtype.DTYPES:
            raise ValueError(f"unknown capture dtype {dtype!r}")
        flat = _segment(self._segment_maps(), path, dtype)
        start, end = offset_rows * hidden, (offset_rows + n_layers * max_rows) * hidden
        if min(n_layers, max_rows, hidden) <= 0 or offset_rows < 0 or end > flat.shape[0] or not 0 <= rows <= max_rows:
            raise ValueError(f"region {offset_rows}+{shape} (rows {rows}) is not inside {path!r}")
        # a plain ndarray view (not the memmap subclass, which would travel as one)
        region = np.asarray(flat[start:end]).reshape(n_layers, max_rows, hidden)
        if rows == max_rows:
            return region
        # tens of MB: off the event loop, which serves every request (numpy copies without the GIL)
        return await asyncio.to_thread(np.ascontiguousarray, region[:, :rows])

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        return await self.captures.get(capture_id)

    async def release_captures(self, capture_ids: list[str]) -> int:
        return self.captures.release(capture_ids)

    async def capture_stats(self) -> dict[str, int]:
        self.captures.prune()
        # rows computed twice (preemption by recompute) and deduplicated by position
        return {**self.captures.stats(), "recomputed_rows": self._recomputed_rows,
                # round trips to the workers per per-request method (requests arriving together share one)
                "worker_calls": {m: c.calls for m, c in self.__dict__.get("_coalescers", {}).items()}}

    async def capture_arena_stats(self) -> dict[str, int]:
        """The capturing worker's arena: segments, regions in use (0 once every capture is stored and
        nothing is running), bytes of shared memory reserved (its peak: segments are kept)."""
        ranks = await self._workers("steer_capture_stats")
        return next((r for r in ranks if r is not None), {})


def _segment(maps: dict[Any, Any], path: str, dtype: str) -> Any:
    """A capture segment mapped once per engine (flat, of ``dtype``'s storage: see :mod:`.row_dtype`): its pages
    fault once, not once per capture. Keyed by the file itself too: a ``/proc/<pid>/fd/<fd>`` path names
    another file once that worker is gone."""
    import numpy as np

    key = (path, os.stat(path).st_ino, dtype)
    arr = maps.get(key)
    if arr is None:
        arr = maps[key] = np.memmap(path, dtype=row_dtype.storage(row_dtype.DTYPES[dtype]), mode="r")
    return arr


def _capture_layers(data: dict[str, Any], maps: dict[str, Any]) -> dict[int, Any]:
    """A worker's capture payload: inline tensors, or a region of a shared-memory segment
    ([layer, position, hidden], layer-major)."""
    import warnings

    from steer_actors.wire import decode_tensor

    if "file" in data:
        # rows by absolute position, mapped rather than read: the object store's put is the one copy here
        dtype = data.get("dtype", "float32")
        arr = _segment(maps, data["file"], dtype).reshape(-1, int(data["shape"][2]))
        off, max_rows, n = int(data["offset_rows"]), int(data["shape"][1]), len(data["positions"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only mapping: nobody writes through these tensors
            return {int(layer): row_dtype.as_tensor(arr[off + i * max_rows:off + i * max_rows + n], dtype)
                    for i, layer in enumerate(data["layer_ids"])}
    return {int(k): decode_tensor(v) for k, v in data["layers"].items()}
