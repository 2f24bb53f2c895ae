"""Engine-side allocation of request-spec slots: identical specs share a slot (content hash), a
slot is reloaded only when it changes hands, and requests wait (never fail) while all are busy."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable


class SlotPool:
    def __init__(self, capacity: int, load: Callable[[int, object], Awaitable[None]]):
        self.capacity = capacity
        self._load = load  # (slot, spec) -> writes the spec into the slot on every rank
        self.multi = asyncio.Lock()  # one caller at a time may hold some slots while waiting for more
        self._cond = asyncio.Condition()
        self._refs: dict[int, int] = {}
        self._by_fp: dict[str, int] = {}
        self._idle: OrderedDict[int, str] = OrderedDict()  # loaded, unused: reusable as is, evictable LRU
        self._free = list(range(capacity, 0, -1))
        self._ready: dict[int, asyncio.Event] = {}  # set once the slot's spec is on every rank

    async def acquire(self, fingerprint: str, spec: object) -> int:
        """A slot holding the spec ``fingerprint``, loaded on every rank; waits while all are busy."""
        async with self._cond:
            while True:
                slot = self._by_fp.get(fingerprint)
                if slot is not None:  # same spec already in a slot (maybe still loading): share it
                    self._idle.pop(slot, None)
                    self._refs[slot] = self._refs.get(slot, 0) + 1
                    shared = self._ready[slot]
                    break
                if self._free or self._idle:
                    shared = None
                    if self._free:
                        slot = self._free.pop()
                    else:
                        slot, old_fp = self._idle.popitem(last=False)
                        del self._by_fp[old_fp]
                    self._refs[slot] = 1
                    self._by_fp[fingerprint] = slot
                    self._ready[slot] = asyncio.Event()
                    break
                await self._cond.wait()
        if shared is not None:
            try:
                await shared.wait()
            except BaseException:
                await self.release(slot)
                raise
            if self._by_fp.get(fingerprint) != slot:
                await self.release(slot)
                raise RuntimeError("loading this request's steering spec failed")
            return slot
        try:
            await self._load(slot, spec)
        except BaseException:
            async with self._cond:
                del self._by_fp[fingerprint]
            self._ready[slot].set()
            await self.release(slot)
            raise
        self._ready[slot].set()
        return slot

    async def release(self, slot: int) -> None:
        async with self._cond:
            self._refs[slot] -= 1
            if self._refs[slot] == 0:
                del self._refs[slot]
                fp = next((f for f, s in self._by_fp.items() if s == slot), None)
                if fp is None:  # its load failed: nothing to keep
                    self._free.append(slot)
                else:
                    self._idle[slot] = fp
                self._cond.notify_all()
