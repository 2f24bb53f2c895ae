"""The coalescer on its own (pure asyncio): calls made while one is in flight share the next round trip,
each caller sees its own entries only, a failure reaches exactly the callers of that round trip."""

import asyncio

import pytest

from steer_actors.engine.coalesce import Coalescer
from steer_actors.testing.waits import until


def test_calls_while_one_is_in_flight_share_the_next_round_trip():
    sent = []

    async def main():
        release = asyncio.Event()

        async def send(items):
            sent.append(list(items))
            await release.wait()
            return [{k: f"ok-{k}" for k in items}, None]  # rank 0 answers per key, rank 1 nothing

        c = Coalescer(send)
        first = asyncio.ensure_future(c(["r0"], ["r0"]))
        await until(lambda: sent)  # it is in flight
        later = asyncio.gather(*(c([f"r{i}"], [f"r{i}"]) for i in range(1, 10)))
        await until(lambda: len(c._queue) == 9)  # all nine wait for the next round trip
        release.set()
        return c, [await first] + await later

    c, outs = asyncio.run(main())
    assert sent == [["r0"], [f"r{i}" for i in range(1, 10)]]  # no timer: the first went out alone
    assert c.calls == 2
    assert outs[3] == [{"r3": "ok-r3"}, None]  # only its own entry


def test_a_failure_reaches_the_callers_of_its_round_trip_only_and_counts_pass_through():
    async def main():
        sent, release = [], asyncio.Event()

        async def send(items):
            sent.append(list(items))
            await release.wait()
            if "bad" in items:
                raise ValueError("no room")
            return [len(items)]

        c = Coalescer(send)
        first = asyncio.ensure_future(c([], ["bad"]))
        await until(lambda: sent)  # in flight
        later = [asyncio.ensure_future(c([], [i])) for i in range(3)]
        await until(lambda: len(c._queue) == 3)
        release.set()
        with pytest.raises(ValueError, match="no room"):
            await first
        return await asyncio.gather(*later), sent

    outs, sent = asyncio.run(main())
    assert outs == [[3], [3], [3]] and sent == [["bad"], [0, 1, 2]]  # one round trip of three; a count reaches everyone


def test_a_caller_cancelled_while_queued_is_never_sent():
    """Its cleanup (a drop) may already be on its way: a register sent after it would outlive it."""
    sent = []

    async def main():
        release = asyncio.Event()

        async def send(items):
            sent.append(list(items))
            await release.wait()
            return [{k: "ok" for k in items}]

        c = Coalescer(send)
        first = asyncio.ensure_future(c(["a"], ["a"]))
        await until(lambda: sent)  # in flight
        queued = asyncio.ensure_future(c(["b"], ["b"]))
        other = asyncio.ensure_future(c(["c"], ["c"]))
        await until(lambda: len(c._queue) == 2)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued  # it has left the queue
        release.set()
        return await first, await other

    assert asyncio.run(main()) == ([{"a": "ok"}], [{"c": "ok"}])
    assert sent == [["a"], ["c"]]
