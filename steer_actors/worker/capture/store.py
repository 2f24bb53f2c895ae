"""Worker-side activation capture: ``h + r`` (after this layer's steering) for requested layers and
requests, labelled by absolute position and input token.

Graph-safe: the steering op itself writes captured rows into a buffer allocated at construction
(``[num_layers, rows_per_step, hidden]``, of the capture dtype: see :mod:`.row_dtype`), steered by a per-token destination index and per-layer
flags that the host fills before each forward. A CUDA graph replay runs the same kernel, so capture
works with graphs on. After the forward, the step's rows are gathered on the device (stream-ordered,
before the next step overwrites the buffer). On a GPU whose arena pages are registered with it
(:mod:`.device_write`), a scatter on a side stream then writes every captured row straight into its
request's region of the capture arena (:mod:`.arena`: recycled shared memory on the engine actor's
host, else host memory), with which positions landed and their tokens (:mod:`.step`). Otherwise a copy thread (own
CUDA stream, pinned host memory) brings the rows to host and scatters them there with numpy. Either way
the copy overlaps the next step, the runner never waits for it, and a finished request has nothing left
to assemble: only the segment's path and the region's place travel.

The flat batch is sliced per request from the model runner's own batch order and query start
locations (never ``len(prompt)``); rows accumulate by absolute position across chunked-prefill steps,
and positions recomputed after a preemption overwrite the earlier copy. Only TP rank 0 captures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import time

import numpy as np
import torch

from steer_actors import envs, row_dtype, wire
from steer_actors.worker.capture.arena import DEFAULT_SEGMENT_BYTES, DEFAULT_SHARED_SEGMENT_BYTES, Arena, Region, stored_rows
from steer_actors.worker.capture.step import Plan, launch_direct, launch_host
from steer_actors.worker.capture.host_write import write_step
from steer_actors.worker.protocol import CaptureTaken
from steer_actors.worker.transfer import h2d, to_device


@dataclass(eq=False)
class _Pending:
    """One capturing request: its rows land in ``region`` by absolute position as steps complete, so
    nothing is left to assemble when it finishes (the newest copy of a recomputed position wins).
    Layer-major: layer slot ``i``, position ``p`` is region row ``i * max_rows + p``, so each layer's rows
    are contiguous. How many times each position arrived, and its token, sit in the segment's ``counts`` and
    ``tokens`` at segment row ``region.base + p``."""
    layers: list[int]  # sorted
    region: Region
    max_rows: int
    last: Any = None  # the newest write into ``region`` (one copy thread / one side stream: earlier ones are done)
    error: str | None = None


class CaptureStore:
    def __init__(self, forward_lock: Any, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 shared_segment_bytes: int | None = None, direct: bool | None = None) -> None:
        """``forward_lock``: the lock the runner holds while it enqueues a forward (the runtime's, see
        :class:`~steer_actors.worker.runtime.ForwardGate`); what the runner's thread reads each step is changed
        under it. ``direct``: the device writes rows into the arena itself (:mod:`.device_write`); None: where
        the buffers are on a GPU and ``STEER_CAPTURE_DIRECT`` is not 0 (True runs the same logic on the CPU)."""
        self._lock = forward_lock
        self._direct = direct
        self.wanted: dict[str, _Pending] = {}  # external request id -> what it accumulated
        # Device buffers shared by every layer (created on the construction-time device).
        self.buf: torch.Tensor | None = None  # [num_layers, rows, H] of the capture dtype
        self.dst: torch.Tensor | None = None  # [max_tokens] int32: row of buf for each token, -1 = none
        self.layer_on: torch.Tensor | None = None  # [num_layers] int32: capture this layer in this step
        self.any_on: torch.Tensor | None = None  # [1] int32: 0 = nothing captured in this step
        self._last_on = False
        self._resolved: dict[str, _Pending | None] = {}  # internal request id -> capture; reset when wanted changes
        self._step: tuple | None = None
        self._side: Any = None
        self._segment_bytes = int(segment_bytes)
        # tests shrink both; the default makes shared segments large (sparse: only address space)
        self._shared_segment_bytes = shared_segment_bytes or (DEFAULT_SHARED_SEGMENT_BYTES if segment_bytes ==
                                                              DEFAULT_SEGMENT_BYTES else segment_bytes)
        self.arena: Arena | None = None  # where the rows land on this host (see arena)
        self._ctl: torch.Tensor | None = None  # layer_on, any_on and dst in one buffer: one copy per step
        self._layer_index: dict[tuple, torch.Tensor | None] = {}  # step layers -> their index on the device
        self._plan: Plan | None = None  # the last step's (reset whenever ``wanted`` changes)
        self._host_steps = 0  # steps that took the host path (their copies may still run when a direct one follows)
        # Host time capture costs per forward, by thread (ns): the runner's (begin_step + end_step, which
        # delay the next launch) and the copy thread's (bookkeeping; GIL it takes from the runner).
        self._cost = {"steps": 0, "runner_ns": 0, "copy_thread_ns": 0}
        # Regions take() handed to the engine (region id -> when), until it frees them. One whose free never
        # comes (the take's reply was lost: a failed or timed-out RPC) is reclaimed after the lease; the
        # engine frees a region as soon as the object store holds its copy, seconds after the take.
        self.handed: dict[int, float] = {}
        self.handed_lease_s = 600.0

    @property
    def rows_per_step(self) -> int:
        return 0 if self.buf is None else self.buf.shape[1]

    def buffers(self, num_layers: int, rows: int, hidden: int, max_tokens: int, dtype: torch.dtype = torch.float32):
        if self.buf is None:
            self.buf = torch.zeros(num_layers, rows, hidden, dtype=dtype)
            self._ctl = torch.zeros(num_layers + 1 + max_tokens, dtype=torch.int32)
            self.layer_on, self.any_on = self._ctl[:num_layers], self._ctl[num_layers:num_layers + 1]
            self.dst = self._ctl[num_layers + 1:]
            self.dst.fill_(-1)
            self.arena = Arena(hidden, self._segment_bytes, self._shared_segment_bytes, self._mapper(self.buf.device),
                               dtype)
        return self.buf, self.dst, self.layer_on, self.any_on

    def _mapper(self, device: torch.device):
        from steer_actors.worker.capture import device_write

        want = self._direct if self._direct is not None else device_write.enabled(device, envs.STEER_CAPTURE_DIRECT)
        if not want:
            return None
        mapper = device_write.HostMapper(device)
        return mapper if mapper.ok else None

    def register(self, request_id: str, layers: list[int], max_rows: int, to_dir: str | None = None,
                 shared_cap_bytes: int | None = None) -> None:
        """``max_rows``: prompt + max_tokens (positions past it are never part of the sequence).
        ``to_dir``: shared memory on the engine actor's host, where the rows then go straight to a file
        the engine maps (else, or when it is full, host memory here)."""
        if self.rows_per_step == 0:
            raise ValueError("this engine was started with capture disabled (capture_rows_per_step=0)")
        self._reclaim()
        ids = sorted({int(x) for x in layers})
        max_rows = int(max_rows)
        region = self.arena.alloc(len(ids) * max_rows, to_dir, shared_cap_bytes)  # the arena's lock, never the forward's
        seg = region.segment  # the region's rows were last written before it was freed (take/discard wait)
        seg.counts[region.base:region.base + max_rows] = 0
        seg.tokens[region.base:region.base + max_rows] = -1
        pend = _Pending(ids, region, max_rows)
        with self._lock:  # made outside the lock, published under it
            old = self.wanted.pop(request_id, None)
            self.wanted[request_id] = pend
            self._forget(request_id)
        if old is not None:
            self._discard(old)

    def _forget(self, request_id: str) -> None:
        """``request_id`` starts or stops capturing (the caller holds the forward lock): forget what was
        looked up, and the kept plan if that request is in its batch. Requests come and go all the time
        while others decode, and a plan for a batch without them still holds: dropping the plan at every
        register and take makes up to one step in five rebuild it (H100, 512 captures 128 at a time), and
        building plans costs the runner's thread."""
        self._resolved.clear()
        plan = self._plan
        if plan is not None and plan.key is not None and any(
                i == request_id or i.rsplit("-", 1)[0] == request_id for i in plan.key[0]):
            self._plan = None

    def _lookup(self, internal_id: str) -> _Pending | None:
        """The capture an engine-internal request id belongs to (memoized: this runs for every request
        of every step, on the thread that launches forwards)."""
        try:
            return self._resolved[internal_id]
        except KeyError:
            ext = self._match(internal_id)
            pend = self._resolved[internal_id] = self.wanted.get(ext) if ext is not None else None
            return pend

    def _match(self, internal_id: str) -> str | None:
        if internal_id in self.wanted:
            return internal_id
        # vLLM appends "-<random>" to the caller's request id
        base = internal_id.rsplit("-", 1)[0]
        return base if base in self.wanted else None

    def _off(self) -> None:
        if self._last_on:
            self.any_on.fill_(0)
            self._last_on = False

    def begin_step(self, req_ids: list[str], query_start_loc: np.ndarray, positions: torch.Tensor | None,
                   input_ids: torch.Tensor | None, num_padded: int | None = None) -> None:
        """Route this forward's tokens: which rows of the flat batch go to which buffer row."""
        self._step = None
        if not self.wanted:
            return self._off()
        t0 = time.perf_counter_ns()
        try:
            self._begin(req_ids, query_start_loc, positions, input_ids, num_padded)
        finally:
            self._cost["runner_ns"] += time.perf_counter_ns() - t0

    def _begin(self, req_ids: list[str], query_start_loc: np.ndarray, positions: torch.Tensor | None,
               input_ids: torch.Tensor | None, num_padded: int | None) -> None:
        if not self.wanted or positions is None or self.buf is None:
            return self._off()
        pos = positions.reshape(-1, positions.shape[-1])[-1] if positions.dim() > 1 else positions
        total = int(num_padded if num_padded is not None else pos.shape[0])
        # Decode steps repeat the batch of the step before (same requests, one token each): its plan, and
        # the buffers the forward reads, still hold; nothing to copy to the device.
        key = (tuple(req_ids), query_start_loc[:len(req_ids) + 1].tobytes(), total)
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._plan = self._make_plan(key, req_ids, query_start_loc, total)
            if plan is None:
                return self._off()
        elif not self._last_on:
            self.any_on.fill_(1)
        self._last_on = True
        self._step = (plan, pos, input_ids)

    def _make_plan(self, key: tuple, req_ids: list[str], query_start_loc: np.ndarray, total: int) -> Plan | None:
        """Which rows of the flat batch are captured, for whom, and where they go; the forward's buffers
        (layers on, destination row of each token) set for it."""
        found = [(i, pend) for i, pend in enumerate(map(self._lookup, req_ids)) if pend is not None]
        if not found:
            return None
        # Buffer rows grouped by destination segment (stable): each segment's rows are one run with one
        # scatter, however many segments a step touches.
        found.sort(key=lambda f: f[1].region.segment.index)
        idx = np.fromiter((i for i, _ in found), dtype=np.int64, count=len(found))
        starts = query_start_loc[idx].astype(np.int64)
        counts = query_start_loc[idx + 1].astype(np.int64) - starts
        ends = np.cumsum(counts)
        cap = self.rows_per_step
        if ends[-1] > cap:  # rare: keep whole requests while they fit; the others' take() reports it
            keep = np.zeros(len(found), dtype=bool)
            n = 0
            for k, c in enumerate(counts.tolist()):
                if n + c <= cap:
                    keep[k], n = True, n + c
                else:
                    found[k][1].error = (f"a step held more captured tokens than capture_rows_per_step={cap}; "
                                         f"raise it or lower max_num_batched_tokens")
            found = [f for f, k in zip(found, keep.tolist()) if k]
            if not found:
                return None
            starts, counts = starts[keep], counts[keep]
            ends = np.cumsum(counts)
            key = None  # set errors: never repeated without looking again
        n = int(ends[-1])
        firsts = ends - counts
        rows = np.repeat(starts - firsts, counts) + np.arange(n)  # batch row of each captured row
        layout = [(pend, a, b) for (_, pend), a, b in zip(found, firsts.tolist(), ends.tolist())]
        layers = sorted(set().union(*(pend.layers for pend, _, _ in layout)))
        n_layers = self.layer_on.shape[0]
        ctl = np.full(n_layers + 1 + total, -1, dtype=np.int32)  # layer_on, any_on, dst[:total]
        ctl[:n_layers + 1] = 0
        ctl[layers] = 1
        ctl[n_layers] = 1
        ctl[n_layers + 1 + rows] = np.arange(n, dtype=np.int32)
        h2d(self._ctl[:ctl.shape[0]], ctl)
        same = all(len(pend.layers) == len(layers) for pend, _, _ in layout)
        segments = list({id(pend.region.segment): pend.region.segment for pend, _, _ in layout}.values())
        return Plan(key, layout, layers, rows, same, segments)

    def end_step(self) -> None:
        """After the forward is enqueued: snapshot the rows (device gather, stream-ordered before the next
        step's writes). Then either the device scatters them into each request's region itself (mapped
        arena, :mod:`.device_write`) on a side stream, or a thread of its own copies them to host and
        into each request's region; either way the copy overlaps the next forward, and a finished request
        has nothing left to assemble."""
        if self._step is None:
            return
        t0 = time.perf_counter_ns()
        plan = self._step[0]
        try:
            self._end()
        except Exception as e:  # e.g. no device memory for the snapshot: these captures fail, the forward goes on
            for pend, _, _ in plan.layout:
                pend.error = pend.error or f"capturing a step failed: {type(e).__name__}: {e}"
        finally:
            self._step = None
            self._cost["steps"] += 1
            self._cost["runner_ns"] += time.perf_counter_ns() - t0

    def _end(self) -> None:
        plan, pos, input_ids = self._step
        self._step = None
        # each segment's device views, read once: the channel thread may take a segment off the direct path
        # (a failed registration) meanwhile; the rows of this step's regions were registered before them
        maps = {id(seg): (seg.device_rows, seg.device_counts, seg.device_tokens) for seg in plan.segments}
        snap = self._snapshot(plan.layers, plan.rows.shape[0])
        if all(m[0] is not None for m in maps.values()):
            stream, _, ready, done = self._stream()
            launch_direct(plan, pos, input_ids, snap, maps, (stream, ready, done) if stream is not None else None,
                          self._host_steps)
        else:
            self._host_steps += 1
            stream, pool, _, _ = self._stream()
            launch_host(plan.layout, plan.layers, plan.rows, pos, input_ids, snap, stream, pool, self._cost)

    def _snapshot(self, layers: list[int], n: int) -> torch.Tensor:
        """The step's captured rows ([len(layers), n, H]), copied on the forward's stream before the next step
        overwrites the buffer."""
        key = tuple(layers)
        if key not in self._layer_index:
            if len(self._layer_index) > 64:
                self._layer_index.clear()
            self._layer_index[key] = (None if len(layers) == self.buf.shape[0] else
                                      to_device(np.asarray(layers, dtype=np.int64), self.buf.device))
        idx = self._layer_index[key]
        return self.buf[:, :n].clone() if idx is None else self.buf[idx, :n]

    def _stream(self) -> tuple:
        """(side stream, copy thread, ready event, done event); the events are recorded again every step."""
        if self._side is None:
            from concurrent.futures import ThreadPoolExecutor

            cuda = self.buf.is_cuda
            self._side = (torch.cuda.Stream() if cuda else None,
                          ThreadPoolExecutor(1, thread_name_prefix="steer-capture-copy"),
                          torch.cuda.Event() if cuda else None, torch.cuda.Event() if cuda else None)
        return self._side

    def write_step(self, layout: list, layers: list[int], rows: np.ndarray | torch.Tensor | None, pos: np.ndarray,
                   tok: np.ndarray) -> None:
        """The host part of a step (see :func:`.host_write.write_step`)."""
        write_step(layout, layers, rows, pos, tok)

    def take(self, request_id: str) -> CaptureTaken | None:
        """Everything captured for ``request_id``, one row per absolute position, sorted by position. Rows in a shared-memory segment stay there: the segment's path, the region's first
        row and id travel, and the region is the engine's until it frees it (:meth:`free`)."""
        with self._lock:  # the runner's thread reads ``wanted`` every step (and adds copies under the lock)
            pend = self.wanted.pop(request_id, None)
            self._forget(request_id)
        if pend is None:
            return None
        try:
            if pend.last is not None:
                pend.last.result()
        except Exception as e:  # the host path's copy thread failed (its message is in pend.error too)
            self._discard(pend)
            raise ValueError(f"capture of request {request_id} is incomplete: {pend.error or e}") from e
        if pend.error:
            self._discard(pend)
            raise ValueError(f"capture of request {request_id} is incomplete: {pend.error}")
        region, maxr = pend.region, pend.max_rows
        seg = region.segment
        counts = seg.counts[region.base:region.base + maxr]
        positions = np.flatnonzero(counts)
        out = CaptureTaken(positions=positions.tolist(), token_ids=seg.tokens[region.base + positions].tolist(),
                           recomputed=int(counts[positions].sum()) - positions.size, layer_ids=pend.layers)
        if region.path is not None:
            # The engine may store the whole region (see stored_rows): rows this request never wrote hold an
            # earlier capture's activations, maybe another user's, and must not travel with it.
            used = int(positions[-1]) + 1 if positions.size else 0
            if stored_rows(used, maxr) == maxr and used < maxr:
                # one call for every layer: each call lets go of the GIL, which the runner's thread then holds
                # (H100: 29 calls per take were a fifth of this thread's samples)
                region.view()[:len(pend.layers) * maxr].view(len(pend.layers), maxr, -1)[:, used:].zero_()
            out.file, out.offset_rows, out.region = region.path, region.base, region.id
            out.shape, out.dtype = [len(pend.layers), maxr, self.arena.hidden], row_dtype.name(self.arena.dtype)
            self.handed[region.id] = time.monotonic()
            return out
        try:
            view, idx = region.view(), torch.from_numpy(positions)
            out.layers = {str(layer): wire.encode_tensor(view[i * maxr:(i + 1) * maxr][idx])
                             for i, layer in enumerate(pend.layers)}
        finally:
            self.arena.free(region.id)
        return out

    def drop(self, request_id: str) -> None:
        with self._lock:
            pend = self.wanted.pop(request_id, None)
            self._forget(request_id)
        if pend is not None:
            self._discard(pend)

    def free(self, region_ids: list[int]) -> int:
        """Regions :meth:`take` handed over, once their rows are copied out: the next captures reuse them."""
        for r in region_ids:
            self.handed.pop(int(r), None)
        return sum(self.arena.free(r) for r in region_ids) if self.arena is not None else 0

    def _reclaim(self) -> None:
        """Free the handed regions whose lease ran out (see ``handed``); the engine's late free of one then
        frees nothing (region ids are never reused)."""
        late = [r for r, t in self.handed.items() if time.monotonic() - t > self.handed_lease_s]
        if late:
            import logging

            logging.getLogger(__name__).warning("capture: reclaiming %d regions the engine never freed", len(late))
            self.free(late)

    def stats(self) -> dict[str, int]:
        c = self._cost
        per_step = {k[:-3] + "_us_per_step": round(c[k] / 1e3 / max(1, c["steps"]), 1) for k in ("runner_ns", "copy_thread_ns")}
        return {**(self.arena.stats() if self.arena is not None else {}), "captures_pending": len(self.wanted),
                "regions_handed": len(self.handed),
                "capture_steps": c["steps"], **per_step}

    def _discard(self, pend: _Pending) -> None:
        if pend.last is not None:
            try:
                pend.last.result()  # the region must not be written after another request got it
            except BaseException:
                pass
        self.arena.free(pend.region.id)

