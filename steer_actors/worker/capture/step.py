"""One step of a capture on the worker: its plan (which captured rows of the batch go to which request's
region, kept while the batch repeats) and the work that writes them: on the direct path a few launches on a
side stream (:mod:`.device_write`), else a copy thread (the host path). :mod:`.store` holds the store."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steer_actors import row_dtype
from steer_actors.worker.capture.device_write import dest_offsets, write_run
from steer_actors.worker.capture.host_write import write_step
from steer_actors.worker.transfer import to_device


@dataclass(eq=False)
class Plan:
    """A step's capture layout, kept while the batch repeats (see :meth:`.store.CaptureStore.begin_step`)."""
    key: tuple | None
    layout: list  # (pending, first, end) per capturing request: its tokens first..end-1 of the captured rows
    layers: list[int]  # every layer any of them captures
    rows: np.ndarray  # batch row of each captured row
    same: bool  # every request captures all of ``layers``
    segments: list  # the segments their regions are in
    staged: Any = None  # direct path: rows, and each run's (offsets, max_rows, base), on the device
    runs: list | None = None  # direct path: (segment, first, end, offsets + bases, max_rows) views of ``staged``
    landed: Any = None  # direct path: what its requests' take() waits for (the same object every step)
    host_steps: int = -1  # the store's count of host-path steps when ``landed`` was handed out


class Landed:
    """A direct step's writes, as :meth:`take` waits for them (a future's ``result``); ``prior``: host-path
    copies of the same requests still running (a segment that left the direct path)."""

    def __init__(self, event: Any, prior: list) -> None:
        self.event, self.prior = event, prior

    def result(self) -> None:
        for fut in self.prior:
            fut.result()
        if self.event is not None:
            self.event.synchronize()


def launch_direct(plan: Plan, pos: torch.Tensor, input_ids: Any, snap: torch.Tensor, maps: dict, side: Any,
                  host_steps: int) -> None:
    """The device writes the rows, and which positions arrived with their tokens, into the mapped segment
    (see :mod:`.device_write`): the host keeps no books per step, so no thread of ours competes with
    the runner's for the GIL. A plan's targets go to the device once; a repeated batch reuses them, and its
    requests' :class:`Landed` (one ``done`` event, recorded again each step: a wait is for its latest record).
    ``side``: (stream, ready event, done event), or None on a CPU."""
    if plan.landed is None or plan.host_steps != host_steps:
        # a host-path step of these requests (a segment that left the direct path) may still be copying
        prior = [pend.last for pend, _, _ in plan.layout if pend.last is not None and not isinstance(pend.last, Landed)]
        plan.landed, plan.host_steps = Landed(side[2] if side is not None else None, prior), host_steps
        for pend, _, _ in plan.layout:
            pend.last = plan.landed
    try:
        if plan.staged is None:
            stage(plan, snap.device, side[0] if side is not None else None)
        n = plan.rows.shape[0]
        rows_d = plan.staged[:n]
        p = pos[rows_d].to(torch.int64)
        tok = (input_ids[rows_d].to(torch.int32) if input_ids is not None else
               torch.full((n,), -1, dtype=torch.int32, device=snap.device))
        if side is not None:
            stream, ready, done = side
            ready.record()
            for x in (snap, p, tok):
                x.record_stream(stream)  # the allocator keeps them until the side stream is done
        with torch.cuda.stream(side[0]) if side is not None else contextlib.nullcontext():
            if side is not None:
                side[0].wait_event(ready)
            for segment, a, b, offb, maxr in plan.runs:
                dest, counts, tokens = maps[id(segment)]
                write_run(dest, counts, tokens, snap, p, tok, a, b, offb, maxr, plan.same)
    except Exception as e:  # this step's captures fail, clearly; the forward (everyone's) goes on
        for pend, _, _ in plan.layout:
            pend.error = pend.error or f"writing its rows failed: {type(e).__name__}: {e}"
    if side is not None:  # also after a failure: nobody frees a region that launched writes still write
        side[2].record(side[0])


def stage(plan: Plan, device: torch.device, stream: Any) -> None:
    """One host-to-device copy of the plan's targets: captured batch rows, then per run of requests in one
    segment its [layers, tokens] offsets, max_rows and region bases."""
    layout, parts, spans, at, q0 = plan.layout, [plan.rows.astype(np.int64)], [], plan.rows.shape[0], 0
    while q0 < len(layout):
        segment = layout[q0][0].region.segment
        q1 = q0 + 1
        while q1 < len(layout) and layout[q1][0].region.segment is segment:
            q1 += 1
        off, maxr, base = dest_offsets(layout[q0:q1], plan.layers, plan.same)
        spans.append((segment, layout[q0][1], layout[q1 - 1][2], off.shape, at))
        parts += [off.reshape(-1), base, maxr]  # the bases right after the offsets: one [layers + 1, tokens] view
        at += off.size + 2 * maxr.size
        q0 = q1
    staged = plan.staged = to_device(np.concatenate(parts), device)
    if stream is not None:  # read by the side stream for as long as the plan lasts: its block waits for it when freed
        staged.record_stream(stream)
    plan.runs = []
    for segment, a, b, (k, nr), at in spans:
        plan.runs.append((segment, a, b, staged[at:at + (k + 1) * nr].view(k + 1, nr),
                          staged[at + (k + 1) * nr:at + (k + 2) * nr]))


def launch_host(layout: list, layers: list[int], rows: np.ndarray, pos: torch.Tensor, input_ids: Any,
                snap: torch.Tensor, stream: Any, pool: Any, cost: dict) -> None:
    """The host path: a thread of its own (``pool``) copies the rows to host (``stream``, pinned memory) and
    into each request's region, with the positions and tokens; the copy overlaps the next forward. ``cost``:
    the store's time counters."""
    rows_d = to_device(rows, snap.device)
    p = pos[rows_d].to(torch.int64)
    pt = torch.stack([p, input_ids[rows_d].to(torch.int64) if input_ids is not None else torch.full_like(p, -1)])
    ready = None
    if stream is not None:
        ready = torch.cuda.Event()
        ready.record()
        for x in (snap, pt):
            x.record_stream(stream)

    def to_dest():
        # Few torch calls here: each one lets go of the GIL, and taking it back from the thread that
        # launches forwards can take a whole switch interval (H100: a third of this thread's time).
        try:
            if stream is not None:
                # pinned (the caching host allocator reuses its blocks): an async copy at full speed
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
                            for x in (snap, pt)]
                stream.synchronize()
            else:
                host = [snap, pt]
            t0 = time.perf_counter_ns()
            pos_tok = host[1].numpy()
            write_step(layout, layers, row_dtype.as_storage(host[0]), pos_tok[0], pos_tok[1].astype(np.int32))
            cost["copy_thread_ns"] += time.perf_counter_ns() - t0
        except BaseException as e:
            for pend, _, _ in layout:
                pend.error = pend.error or f"copying its rows to host failed: {type(e).__name__}: {e}"
            raise

    fut = pool.submit(to_dest)
    for pend, _, _ in layout:
        pend.last = fut
