"""AsyncRWLock under real asyncio concurrency (pure asyncio, no mocks needed)."""

import asyncio
import random

import pytest

from steer_actors.control.rwlock import AsyncRWLock
from steer_actors.testing.waits import until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_readers_share_writers_exclude_and_no_overlap():
    async def main():
        lock, log, state = AsyncRWLock(), [], {"r": 0, "w": 0, "max_r": 0}

        async def reader(i):
            await asyncio.sleep(random.random() * 0.01)
            async with lock.read():
                state["r"] += 1
                state["max_r"] = max(state["max_r"], state["r"])
                assert state["w"] == 0
                await asyncio.sleep(random.random() * 0.01)
                state["r"] -= 1

        async def writer(i):
            await asyncio.sleep(random.random() * 0.01)
            async with lock.write():
                assert state["w"] == 0 and state["r"] == 0
                state["w"] += 1
                log.append(i)
                await asyncio.sleep(0.002)
                state["w"] -= 1

        random.seed(0)
        await asyncio.gather(*[reader(i) for i in range(32)], *[writer(i) for i in range(8)])
        assert sorted(log) == list(range(8)) and state["max_r"] > 1

    run(main())


def test_waiting_writer_blocks_new_readers():
    async def main():
        lock, order = AsyncRWLock(), []
        await lock.acquire_read()
        w = asyncio.create_task(lock.acquire_write())
        await until(lambda: lock.writers_waiting == 1)

        async def late_reader():
            async with lock.read():
                order.append("reader")

        r = asyncio.create_task(late_reader())
        await until(lambda: lock.readers_waiting == 1)  # it reached the lock and queues behind the writer
        assert order == [] and not w.done() and lock.readers == 1
        await lock.release_read()
        await w
        order.append("writer")
        await lock.release_write()
        await r
        assert order == ["writer", "reader"]

    run(main())


@pytest.mark.parametrize("kind", ["read", "write"])
def test_cancelled_waiter_leaves_lock_consistent(kind):
    async def main():
        lock = AsyncRWLock()
        await lock.acquire_write()
        waiter = asyncio.create_task(lock.acquire_read() if kind == "read" else lock.acquire_write())
        await until(lambda: (lock.readers_waiting if kind == "read" else lock.writers_waiting) == 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert lock.readers_waiting == 0 and lock.writers_waiting == 0  # the cancelled waiter counts no more
        await lock.release_write()
        assert lock.readers == 0 and lock.writers_waiting == 0 and not lock.writer_active
        async with lock.read():
            pass
        async with lock.write():
            pass

    run(main())


def test_cancelled_writer_unblocks_readers():
    async def main():
        lock = AsyncRWLock()
        await lock.acquire_read()
        w = asyncio.create_task(lock.acquire_write())
        await until(lambda: lock.writers_waiting == 1)
        r = asyncio.create_task(lock.acquire_read())
        await until(lambda: lock.readers_waiting == 1)
        assert not r.done()
        w.cancel()
        await asyncio.wait_for(r, 1)  # the reader proceeds once the writer gave up
        assert lock.readers == 2 and lock.readers_waiting == 0 and lock.writers_waiting == 0

    run(main())
