"""``WorkerRuntime``: the steering state one vLLM worker shares between its decoder layers, its model runner's
step probe and its ``steer_*`` methods. It holds

* the forward gate (:class:`ForwardGate`): the lock the runner holds while it enqueues a forward, the jobs
  waiting for a gap between two forwards, and the stream forwards run on;
* the selector of the global rows' copy forwards read (:class:`~.double_buffer.Selector`);
* the router of per-request slots (:class:`~.routing.Router`);
* the capture store (:class:`~.capture.store.CaptureStore`);
* the staging buffers changes are copied through (:class:`Staging`).

How layers find it: a decoder layer is built inside vLLM's model constructor, which hands it nothing of ours,
so the runtime is keyed by the ``VllmConfig`` being built (:func:`for_config`, which vLLM makes current for the
whole construction). Every patched layer of a model built under one config gets the same runtime: exactly one
per worker, since a worker builds its models (a draft model too) under its one config. Each layer keeps it
(``LayerSteerer.runtime``), and the worker extension takes it from the layers, so after construction nothing
looks the table up. The table holds the config weakly (an entry whose config is gone is dropped at the next
lookup). The runtime is not stored on the config itself, which vLLM may copy or pickle (it holds locks and
device tensors).
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from typing import Any, Callable

import torch

from steer_actors.worker.capture.store import CaptureStore
from steer_actors.worker.double_buffer import Selector
from steer_actors.worker.routing import Router


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


class ForwardGate:
    """Where work meets the runner's forwards. The runner holds :attr:`lock` while it enqueues a forward (see
    :func:`steer_actors.vllm_compat.install_step_probe`); a request slot's rows are copied where no forward is
    being enqueued (:meth:`between_forwards`)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._jobs: list[_Job] = []
        self._jobs_mutex = threading.Lock()
        self._forward_stream: Any = None  # the CUDA stream forwards run on (seen by the runner hook)

    def between_forwards(self, fn: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """Run ``fn()`` where no forward is being enqueued, and return its result (or raise its error).

        Whichever comes first runs it: this thread, whenever it finds :attr:`lock` free, or the runner's
        thread at the start of its next forward (:meth:`run_pending`, called with the lock held). Under
        load the runner releases the lock and takes it again within microseconds, and a waiting thread
        must also win the GIL to get it, so waiting for the lock alone could miss several steps; the
        runner picking the job up bounds the wait by one forward's launch."""
        job = _Job(fn)
        with self._jobs_mutex:
            self._jobs.append(job)
        deadline = time.monotonic() + timeout_s
        while not job.done.is_set():
            if self.lock.acquire(blocking=False):  # no forward being enqueued (an idle runner never comes)
                try:
                    self.run_pending()
                finally:
                    self.lock.release()
            elif job.done.wait(0.002):
                break
            elif time.monotonic() > deadline:
                with self._jobs_mutex:
                    if job in self._jobs:  # never started: withdraw it, so it cannot land after the caller gave up
                        self._jobs.remove(job)
                        raise RuntimeError(f"no gap between forwards in {timeout_s:.0f} s (is the runner stuck?)")
        if job.error is not None:
            raise job.error
        return job.result

    def run_pending(self) -> None:
        """Run the queued :meth:`between_forwards` jobs; the caller holds :attr:`lock`."""
        if not self._jobs:
            return
        with self._jobs_mutex:
            jobs = self._jobs[:]
            self._jobs.clear()
        for i, job in enumerate(jobs):
            try:
                with self.on_forward_stream():
                    job.result = job.fn()
            except Exception as e:  # goes back to the caller's thread
                job.error = e
            except BaseException:  # the runner is being stopped: the jobs not yet run wait for the next taker
                with self._jobs_mutex:
                    self._jobs[:0] = jobs[i + 1:]
                job.error = RuntimeError("the worker stopped while applying this change")
                job.done.set()
                raise
            job.done.set()

    def note_forward_stream(self) -> None:
        """Called by the runner hook (the runner's thread) before each forward."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._forward_stream = torch.cuda.current_stream()

    @contextlib.contextmanager
    def on_forward_stream(self):
        if self._forward_stream is None:
            yield
            return
        with torch.cuda.stream(self._forward_stream):
            yield


class Staging:
    """Per kind of table ("global", "request"), a device buffer every change of that kind is copied into in one
    copy, and its views cut once per set of destinations, so a change costs two torch calls: each lets go of the
    GIL, which the runner's thread may then hold for a whole switch interval. Changes of one kind never overlap
    (global ones hold the selector's lock, request slots the forward lock) and are enqueued on the forwards'
    stream, so a change overwrites the buffer only after the copies that read the last one."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}
        self.cuts: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def sources(self, kind: str, dsts: list[torch.Tensor], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        buf = self.bufs.get(kind)
        if buf is None or buf.numel() < n or buf.device != dsts[0].device:
            buf = self.bufs[kind] = torch.empty(n, dtype=torch.float32, device=dsts[0].device)
            self.cuts = {k: v for k, v in self.cuts.items() if k[0] != kind}
        key = (kind, *map(id, dsts))  # the entry holds ``dsts``: no id is reused while it lives
        got = self.cuts.get(key)
        if got is None:
            if len(self.cuts) >= 64:
                self.cuts.clear()
            got = self.cuts[key] = (dsts, list(buf[:n].split([d.shape[0] for d in dsts])))
        return buf[:n], got[1]

    @torch.inference_mode()
    def load(self, packed: Any) -> None:
        """A :class:`~.layer_patch.PackedRows` (or None: nothing) into its layers' tables: one host-to-device
        copy and one multi-tensor device copy, whatever the number of layers (per-layer copies cost six CUDA
        calls per layer)."""
        if packed is None:
            return
        views = [layer.flat_views(packed.table) for layer in packed.targets]
        dsts = [v for vs in views for v in vs[:5]] + [vs[5] for vs in views if len(vs) > 5]
        staging, srcs = self.sources(packed.table[0], dsts, packed.flat.shape[0])
        staging.copy_(packed.flat, non_blocking=True)  # stream-ordered; the pinned block is kept until done
        torch._foreach_copy_(dsts, srcs)


class WorkerRuntime:
    """One worker's shared steering state (see the module docstring)."""

    def __init__(self, capture_direct: bool | None = None) -> None:
        self.gate = ForwardGate()
        self.selector = Selector()
        self.router = Router()
        self.store = CaptureStore(self.gate.lock, direct=capture_direct)
        self.staging = Staging()


_BY_CONFIG: dict[int, tuple[weakref.ref, WorkerRuntime]] = {}


def for_config(config: Any) -> WorkerRuntime:
    """The runtime of the models built under ``config`` (a ``VllmConfig``), made on first use."""
    got = _BY_CONFIG.get(id(config))
    if got is not None and got[0]() is config:
        return got[1]
    for key in [k for k, (ref, _) in _BY_CONFIG.items() if ref() is None]:
        del _BY_CONFIG[key]
    runtime = WorkerRuntime()
    _BY_CONFIG[id(config)] = (weakref.ref(config), runtime)
    return runtime
