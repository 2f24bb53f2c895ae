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

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from . import wire

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


class _Replies:
    """One exchange's replies, read by a reader callback on each rank's socket as they arrive. ZMQ's
    descriptor only says "look at the socket's events" (edge-triggered), so each callback, and one call now
    for a reply that came before the readers did, reads the events."""

    def __init__(self, loop: Any, socks: list[Any]):
        import zmq

        self.loop, self.socks = loop, socks
        self.replies: list[Any] = [None] * len(socks)
        self.fut = loop.create_future()
        self.done_at: float | None = None
        self._fds: dict[int, int] = {}  # rank -> descriptor still watched
        try:
            for i, sock in enumerate(socks):
                self._fds[i] = sock.getsockopt(zmq.FD)
                loop.add_reader(self._fds[i], self._check, i)
            for i in range(len(socks)):
                self._check(i)
        except BaseException:
            self.stop()
            raise

    def _check(self, i: int) -> None:
        import zmq

        if self.fut.done() or self.replies[i] is not None:
            return
        try:
            sock = self.socks[i]
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                data = sock.recv(zmq.NOBLOCK)
                self._unwatch(i)  # its socket has its reply: nothing more to read there
                self.replies[i] = wire.unpackb(data)
        except Exception as e:
            self.stop(e)
            return
        if all(r is not None for r in self.replies):
            self.done_at = time.perf_counter()
            self.stop()

    def _unwatch(self, i: int) -> None:
        fd = self._fds.pop(i, None)
        if fd is not None:
            self.loop.remove_reader(fd)

    def missing(self) -> list[int]:
        return [i for i, r in enumerate(self.replies) if r is None]

    def stop(self, error: BaseException | None = None) -> None:
        """Stop watching now (before any of these sockets is closed: a loop must not watch a closed
        descriptor) and end the future: the replies, ``error``, or cancelled."""
        for i in list(self._fds):
            self._unwatch(i)
        if not self.fut.done():
            if error is not None:
                self.fut.set_exception(error)
            elif not self.missing():
                self.fut.set_result(self.replies)
            else:
                self.fut.cancel()


class ChannelClient:
    """Engine-actor side: one REQ socket per TP rank, driven from the event loop without a thread.

    The call sends on the loop's own thread (which holds the GIL already) and the replies are read by a
    reader callback on each socket's file descriptor: a call costs the loop one wake-up and no thread ever
    waits to win the GIL. An exchange thread did (H100, 8B under load: its start p99 6.4 ms and its reading
    of the replies several ms more, each a wait of up to one switch interval while the loop ran Python).
    Calls on one client run one at a time (a REQ socket has one request in flight). A caller that is
    cancelled leaves its exchange to finish in the background, so no REQ socket ever loses step; a socket
    whose reply never came (timeout, error) is replaced, since a REQ socket that missed its reply can never
    send again.
    """

    def __init__(self, addresses: list[str], timeout_s: float = 120.0):
        self.addresses, self.timeout_s = addresses, timeout_s
        self._socks: list[Any] = []  # used by the event loop's thread only
        self._lock: asyncio.Lock | None = None
        self._loop: Any = None  # the loop ``_lock`` and the readers belong to
        self._inflight = False  # an exchange has sent and not yet read every reply
        self._current: _Replies | None = None
        self._tasks: set[Any] = set()  # exchanges finishing for callers that went
        self._closed = False
        self.last_timing: list[Any] = []  # per rank, from the last locked call: [build, wait, commit] ms
        self.last_exchange_ms: dict[str, float] = {}  # this side's share of the last call, see call()

    def _connect(self, address: str):
        import zmq

        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    def _reset(self, ranks: Any) -> None:
        for i in ranks:
            if i < len(self._socks):  # none after close()
                self._socks[i].close()
                self._socks[i] = self._connect(self.addresses[i])

    def _turn(self, loop: Any) -> asyncio.Lock:
        if self._loop is not loop:  # a new event loop (tests run several): one left mid-exchange never ends
            if self._inflight:
                self._reset(range(len(self._socks)))
                self._inflight = False
            self._lock, self._loop = asyncio.Lock(), loop
        assert self._lock is not None
        return self._lock

    def _settle(self, ex: _Replies | None) -> None:
        """After an exchange, whatever became of it: no readers left, and every socket able to send."""
        if ex is not None:
            ex.stop()
        if self._inflight:  # it did not end with every reply: those still owed will never be read
            self._reset(ex.missing() if ex is not None else range(len(self._socks)))
            self._inflight = False
        self._current = None

    async def _finish_in_background(self, ex: _Replies, lock: asyncio.Lock, deadline: float) -> None:
        """A cancelled caller's exchange: read (and drop) its replies, then give the turn on."""
        try:
            await asyncio.wait_for(asyncio.shield(ex.fut), max(0.0, deadline - time.monotonic()))
            self._inflight = False
        except asyncio.CancelledError:
            raise
        except Exception:  # timed out or failed: _settle replaces what is owed
            pass
        finally:
            self._settle(ex)
            lock.release()

    async def call(self, method: str, *args: Any) -> list[Any]:
        import zmq

        if self._closed:
            raise RuntimeError("the steering channel is closed")
        loop = asyncio.get_running_loop()
        marks = [time.perf_counter()]
        payload = wire.packb({"m": method, "a": list(args)})
        marks.append(time.perf_counter())
        lock = self._turn(loop)
        await lock.acquire()  # no wait (and no yield) unless another call on this client is in flight
        marks.append(time.perf_counter())
        ex: _Replies | None = None
        handed_off = False
        try:
            if self._closed:
                raise RuntimeError("the steering channel is closed")
            if not self._socks:
                self._socks = [self._connect(a) for a in self.addresses]
            deadline = time.monotonic() + self.timeout_s
            for i, sock in enumerate(self._socks):
                try:
                    sock.send(payload, zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    self._reset(range(i + 1))  # those ranks have this call (or a socket in a bad state)
                    raise RuntimeError(f"cannot send to steering worker {i}: {e}") from None
            self._inflight = True
            marks.append(time.perf_counter())
            ex = self._current = _Replies(loop, self._socks)
            try:
                replies = await asyncio.wait_for(asyncio.shield(ex.fut), self.timeout_s)
            except asyncio.CancelledError:
                if not ex.fut.done():
                    handed_off = True
                    task = loop.create_task(self._finish_in_background(ex, lock, deadline))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                raise
            except asyncio.TimeoutError:
                raise RuntimeError(f"steering worker(s) {ex.missing()} did not answer in {self.timeout_s:g} s") from None
            self._inflight = False
            marks.append(ex.done_at or time.perf_counter())
        finally:
            if not handed_off:
                self._settle(ex)
                lock.release()
        marks.append(time.perf_counter())
        # where the exchange's time went (benchmarks read it): packing, waiting for this client's turn,
        # sending, the replies (until the loop ran the reader that read the last), then the loop resuming
        # this call
        self.last_exchange_ms = dict(zip(("pack", "turn", "send", "replies", "to_loop"),
                                         (round((b - a) * 1e3, 3) for a, b in zip(marks, marks[1:]))))
        for reply in replies:
            if "err" in reply:
                raise (ValueError if reply["err"] in ("ValueError", "TypeError") else RuntimeError)(reply["msg"])
        if any("t" in r for r in replies):
            self.last_timing = [r.get("t") for r in replies]
        return [r["ok"] for r in replies]

    def close(self) -> None:
        """From the loop's thread (or once no loop runs). A call in flight fails at once."""
        self._closed = True
        if self._current is not None:
            self._current.stop(RuntimeError("the steering channel is closed"))
        for sock in self._socks:
            sock.close()
        self._socks = []
