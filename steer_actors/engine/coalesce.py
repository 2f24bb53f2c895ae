"""Per-request worker calls, coalesced: calls made while one is in flight go out together as the next one.

Every capturing request registers its region with the worker before it starts and takes its rows when it
ends. 512 requests arriving at once meant 512 round trips to a worker whose main thread is busy launching
forwards (each call waits for that process's GIL), and a request starts only once registered: admission
trickled over the first seconds of a batch. Batched, they cost a few round trips, and no timer delays a
lone call (the first one goes out at once).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


@dataclass(eq=False)
class _Pending:
    keys: list[str]
    items: list[Any]
    done: asyncio.Future


@dataclass
class Coalescer:
    """``send(items)`` runs one call for a list of items and returns what every rank answered. Where a rank
    answered a dict keyed by request id, each caller gets the entries of its own keys only; any other
    answer (None, a count) reaches every caller as it is."""

    send: Callable[[list[Any]], Awaitable[list[Any]]]
    _queue: list[_Pending] = field(default_factory=list)
    _running: bool = False
    _loop: Any = None
    _task: Any = None
    calls: int = 0  # round trips made (tests, stats)

    async def __call__(self, keys: list[str], items: list[Any]) -> list[dict[str, Any] | None]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an engine used from successive event loops: nothing of a closed one waits
            self._loop, self._queue, self._running = loop, [], False
        done = loop.create_future()
        pending = _Pending(list(keys), list(items), done)
        self._queue.append(pending)
        self._start()
        try:
            return await done
        except asyncio.CancelledError:
            # Not yet sent: it never will be. (A queued register must not reach the worker after the
            # caller's cleanup dropped it, or its region would be the worker's forever.) Once sent, the
            # caller's later calls queue behind it anyway.
            if pending in self._queue:
                self._queue.remove(pending)
            raise

    def _start(self) -> None:
        if not self._running and self._queue:
            self._running = True
            self._task = asyncio.ensure_future(self._drain())  # referenced: a pending task may be collected

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.calls += 1
                try:
                    ranks = await self.send([x for p in batch for x in p.items])
                except BaseException as e:  # everyone in this call learns why
                    for p in batch:
                        if not p.done.done():
                            p.done.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                    if not isinstance(e, Exception):
                        raise
                    continue
                for p in batch:
                    if not p.done.done():
                        p.done.set_result([{k: r[k] for k in p.keys if k in r} if isinstance(r, dict) else r
                                           for r in ranks])
        finally:
            self._running = False
            self._start()  # a drain cancelled mid-call leaves later callers queued: the next one takes them
