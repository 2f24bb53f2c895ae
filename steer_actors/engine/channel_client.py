"""The engine actor's end of the worker side channel (:mod:`steer_actors.worker.channel`): one REQ socket per
TP rank, driven from the actor's event loop. Messages: :mod:`steer_actors.worker.protocol`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from steer_actors.worker import protocol


class _Replies:
    """One exchange's replies, read by a reader callback on each rank's socket as they arrive. ZMQ's
    descriptor only says "look at the socket's events" (edge-triggered), so each callback, and one call now
    for a reply that came before the readers did, reads the events."""

    def __init__(self, loop: Any, socks: list[Any], method: str):
        import zmq

        self.loop, self.socks, self.method = loop, socks, method
        self.replies: list[Any] = [None] * len(socks)
        self.fut = loop.create_future()
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
                self.replies[i] = protocol.decode_reply(self.method, data)
        except Exception as e:
            self.stop(e)
            return
        if all(r is not None for r in self.replies):
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
        self.last_timing: list[Any] = []  # per rank, the last change's (build, wait, copy) ms: see worker.channel

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
        payload = protocol.encode_request(method, args)
        lock = self._turn(loop)
        await lock.acquire()  # no wait (and no yield) unless another call on this client is in flight
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
            ex = self._current = _Replies(loop, self._socks, method)
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
        finally:
            if not handed_off:
                self._settle(ex)
                lock.release()
        for reply in replies:
            if reply.err is not None:
                raise (ValueError if reply.err in ("ValueError", "TypeError") else RuntimeError)(reply.msg)
        if any(r.timing is not None for r in replies):
            self.last_timing = [r.timing for r in replies]
        return [r.ok for r in replies]

    def close(self) -> None:
        """From the loop's thread (or once no loop runs). A call in flight fails at once."""
        self._closed = True
        if self._current is not None:
            self._current.stop(RuntimeError("the steering channel is closed"))
        for sock in self._socks:
            sock.close()
        self._socks = []
