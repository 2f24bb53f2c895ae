"""SlotPool under real asyncio concurrency: sharing, waiting, loads, failure and cancellation."""

import asyncio

import pytest

from steer_actors.engine.slot_pool import SlotPool
from steer_actors.testing.waits import until


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_identical_specs_share_and_excess_waits():
    async def main():
        loads, active, peak = [], set(), [0]

        async def load(slot, spec):
            await asyncio.sleep(0.005)
            loads.append((slot, spec))

        pool = SlotPool(2, load)

        async def use(fp):
            s = await pool.acquire(fp, fp)
            active.add(fp)
            peak[0] = max(peak[0], len(active))
            await asyncio.sleep(0.01)
            active.discard(fp)
            await pool.release(s)
            return s

        slots = await asyncio.gather(*[use(f"spec{i % 6}") for i in range(18)])
        assert set(slots) <= {1, 2} and peak[0] <= 2
        # each load wrote the spec that then used the slot
        assert all(spec.startswith("spec") for _, spec in loads) and len(loads) >= 6

    run(main())


def test_failed_load_frees_the_slot_and_sharers_fail_too():
    async def main():
        async def load(slot, spec):
            await asyncio.sleep(0.01)
            if spec == "bad":
                raise ValueError("bad spec")

        pool = SlotPool(1, load)
        results = await asyncio.gather(pool.acquire("bad", "bad"), pool.acquire("bad", "bad"),
                                       return_exceptions=True)
        assert isinstance(results[0], ValueError) and isinstance(results[1], RuntimeError)
        s = await pool.acquire("good", "good")  # the only slot is usable again
        assert s == 1
        await pool.release(s)

    run(main())


def test_cancelled_sharer_drops_its_reference():
    async def main():
        gate, loading = asyncio.Event(), asyncio.Event()

        async def load(slot, spec):
            loading.set()
            await gate.wait()

        pool = SlotPool(1, load)
        first = asyncio.create_task(pool.acquire("a", "a"))
        await loading.wait()
        sharer = asyncio.create_task(pool.acquire("a", "a"))
        await until(lambda: pool._refs.get(1) == 2)  # the sharer holds its reference and waits for the load
        sharer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sharer
        gate.set()
        s = await first
        await pool.release(s)
        assert pool._refs == {}
        other = await asyncio.wait_for(pool.acquire("b", "b"), 1)  # evicts "a": nothing holds it
        assert other == 1

    run(main())
