"""Side channel to the workers: steering RPCs that do not wait for the engine core's step boundary.

vLLM's ``collective_rpc`` travels through the engine core's input queue, which is read between steps,
so under load a change waits for the step in flight and often the next one (H100, 512 running
requests: p99 52 ms). Each worker also serves its ``steer_*`` methods on ZMQ sockets from threads (one
per lane). A global change is written into the copy of the rows no forward reads and the runner switches
copies at its next forward's start (:mod:`.double_buffer`): it waits for no forward. A request slot's rows
are copied where no forward is being enqueued (the model runner holds :data:`LOCK` while it enqueues one),
by the channel thread when the lock is free or by the runner at its next forward's start
(:func:`between_forwards`). Payloads are msgpack (no pickle on the network).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from steer_actors import wire

log = logging.getLogger(__name__)

LOCK = threading.RLock()  # held by the runner while it enqueues a forward, and around every change's copy
_forward_stream: Any = None  # the CUDA stream forwards run on (seen by the runner hook)

# Two lanes per worker, each a socket and thread of its own, so that a steering change never queues
# behind a capture's bookkeeping (registering a request's shared-memory region, taking a finished one).
# Per-request calls share the requests lane: a new request's slot load can wait for a finished
# request's take (which waits for that request's last rows to be copied).
LANES = {
    "steer": frozenset({"steer_info", "steer_stage", "steer_commit", "steer_apply", "steer_abort"}),
    "requests": frozenset({"steer_slot_load", "steer_route", "steer_unroute", "steer_capture_register",
                           "steer_capture_take", "steer_capture_drop", "steer_capture_free",
                           "steer_capture_stats"}),
}
ALLOWED = LANES["steer"] | LANES["requests"]
LANE_OF = {m: lane for lane, methods in LANES.items() for m in methods}


# Methods that only touch host state of their own (validation, building rows), that write what no
# forward reads (a global change goes into the unread copy, see double_buffer), or that take the lock
# themselves for just the moment they need it (capture bookkeeping): no lock around the call.
UNLOCKED = frozenset({"steer_info", "steer_stage", "steer_commit", "steer_abort", "steer_capture_register",
                      "steer_capture_take", "steer_capture_drop", "steer_capture_free", "steer_capture_stats"})


class _Job:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn):
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None


# One queue per process: vLLM runs one worker (one runner thread) per process.
_jobs: list[_Job] = []
_jobs_mutex = threading.Lock()


def between_forwards(fn, timeout_s: float = 60.0):
    """Run ``fn()`` where no forward is being enqueued, and return its result (or raise its error).

    Whichever comes first runs it: this thread, whenever it finds :data:`LOCK` free, or the runner's
    thread at the start of its next forward (:func:`run_pending`, called with the lock held). Under
    load the runner releases the lock and takes it again within microseconds, and a waiting thread
    must also win the GIL to get it, so waiting for the lock alone could miss several steps; the
    runner picking the job up bounds the wait by one forward's launch."""
    job = _Job(fn)
    with _jobs_mutex:
        _jobs.append(job)
    deadline = time.monotonic() + timeout_s
    while not job.done.is_set():
        if LOCK.acquire(blocking=False):  # no forward being enqueued (an idle runner never comes)
            try:
                run_pending()
            finally:
                LOCK.release()
        elif job.done.wait(0.002):
            break
        elif time.monotonic() > deadline:
            with _jobs_mutex:
                if job in _jobs:  # never started: withdraw it, so it cannot land after the caller gave up
                    _jobs.remove(job)
                    raise RuntimeError(f"no gap between forwards in {timeout_s:.0f} s (is the runner stuck?)")
    if job.error is not None:
        raise job.error
    return job.result


def run_pending() -> None:
    """Run the queued :func:`between_forwards` jobs; the caller holds :data:`LOCK`."""
    if not _jobs:
        return
    with _jobs_mutex:
        jobs = _jobs[:]
        _jobs.clear()
    for i, job in enumerate(jobs):
        try:
            with on_forward_stream():
                job.result = job.fn()
        except Exception as e:  # goes back to the caller's thread
            job.error = e
        except BaseException:  # the runner is being stopped: the jobs not yet run wait for the next taker
            with _jobs_mutex:
                _jobs[:0] = jobs[i + 1:]
            job.error = RuntimeError("the worker stopped while applying this change")
            job.done.set()
            raise
        job.done.set()


def note_forward_stream() -> None:
    """Called by the runner hook (main thread) before each forward."""
    global _forward_stream
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        _forward_stream = torch.cuda.current_stream()


@contextlib.contextmanager
def on_forward_stream():
    if _forward_stream is None:
        yield
        return
    import torch

    with torch.cuda.stream(_forward_stream):
        yield


def _bind_host() -> str:
    try:
        import ray

        if ray.is_initialized():  # a Ray-executor worker, maybe on another node than the engine actor
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"  # mp / in-process workers share the engine actor's node


class WorkerChannel:
    """Serves one lane of a worker's ``steer_*`` methods (thread + REP socket)."""

    def __init__(self, worker: Any, lane: str = "steer"):
        import zmq

        self.worker, self.lane, self.methods = worker, lane, LANES[lane]
        self.sock = zmq.Context.instance().socket(zmq.REP)
        host = _bind_host()
        self.address = f"tcp://{host}:{self.sock.bind_to_random_port(f'tcp://{host}')}"
        self.thread = threading.Thread(target=self._serve, name=f"steer-channel-{lane}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import torch

        device = getattr(self.worker, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)
        while True:
            try:
                raw = self.sock.recv()
                t_in = time.perf_counter()
                msg = wire.unpackb(raw)
                method, args = msg.get("m"), msg.get("a", [])
                if method not in self.methods:
                    raise ValueError(f"unknown steering method {method!r} on the {self.lane!r} lane")
                if method == "steer_apply":  # stage, then commit into the unread copy: no forward to wait for
                    t0 = t_in  # "building" includes unpacking the message
                    self.worker.steer_stage(*args)
                    t1 = time.perf_counter()
                    reply = {"ok": self.worker.steer_commit(args[0])}
                    # where a change's latency goes: building rows, waiting for a forward (none), copying
                    reply["t"] = [round((t1 - t0) * 1e3, 3), 0.0, round((time.perf_counter() - t1) * 1e3, 3)]
                elif method in UNLOCKED:  # no lock around the call (capture calls hold it only briefly)
                    reply = {"ok": getattr(self.worker, method)(*args)}
                else:
                    # between two forwards: a request slot's rows (validated and built here: the runner may be
                    # the one running the copy, and nothing slower than the copy belongs in the job), routes
                    t0 = time.perf_counter()
                    if method == "steer_slot_load":
                        method, args = "_slot_write", [args[0], self.worker._slot_build(*args)]
                    t1 = time.perf_counter()
                    call = getattr(self.worker, method)
                    ran: list[float] = []

                    def job(call=call, args=args, ran=ran):
                        t = time.perf_counter()
                        try:
                            return call(*args)
                        finally:
                            ran.append(time.perf_counter() - t)

                    reply = {"ok": between_forwards(job)}
                    copy_s = ran[0] if ran else 0.0
                    # where a change's latency goes: building rows, waiting for a gap between forwards, copying
                    reply["t"] = [round((t1 - t0) * 1e3, 3), round((time.perf_counter() - t1 - copy_s) * 1e3, 3),
                                  round(copy_s * 1e3, 3)]
            except Exception as e:  # every error goes back to the caller, the thread lives on
                reply = {"err": type(e).__name__, "msg": str(e)}
            try:
                self.sock.send(wire.packb(reply))
            except Exception as e:
                log.error("steer channel: cannot reply: %s", e)
