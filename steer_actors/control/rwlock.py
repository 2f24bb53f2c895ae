"""An asyncio readers-writer lock, writer-preferring and cancellation-safe.

Readers (generate/chat) share it; a writer (a steering change) waits for the readers in flight and
excludes everyone while it holds it. Once a writer is waiting, new readers queue behind it, so a
stream of generations cannot starve a change, and generations that arrive after a change was
requested run under the new spec.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class AsyncRWLock:
    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._readers_waiting = 0

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writer_active(self) -> bool:
        return self._writer

    @property
    def writers_waiting(self) -> int:
        return self._writers_waiting

    @property
    def readers_waiting(self) -> int:
        """Readers blocked behind a writer (held or waiting); one that enters at once is never counted."""
        return self._readers_waiting

    async def acquire_read(self) -> None:
        async with self._cond:
            # counted only while it waits (wait_for returns without yielding when it may enter), and
            # uncounted however it stops waiting, cancellation included
            self._readers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            finally:
                self._readers_waiting -= 1
            self._readers += 1

    async def release_read(self) -> None:
        async with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    async def acquire_write(self) -> None:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                # Cancelled or not, this waiter no longer blocks readers; wake them to re-check.
                self._writers_waiting -= 1
                self._cond.notify_all()
            self._writer = True

    async def release_write(self) -> None:
        async with self._cond:
            self._writer = False
            self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        await self.acquire_read()
        try:
            yield
        finally:
            await asyncio.shield(self.release_read())

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        await self.acquire_write()
        try:
            yield
        finally:
            await asyncio.shield(self.release_write())
