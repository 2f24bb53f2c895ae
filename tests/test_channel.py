"""The worker side channel as a transport: real ZMQ sockets and threads, a plain object standing in for the
worker's ``steer_*`` methods (the engine tests drive it with real vLLM workers)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from steer_actors import channel


class Worker:
    def __init__(self, rank: int):
        self.rank, self.staged, self.committed = rank, {}, []
        self.gate = threading.Event()
        self.gate.set()

    def steer_info(self):
        return {"rank": self.rank}

    def steer_stage(self, version, spec):
        if spec.get("bad"):
            raise ValueError("bad spec")
        self.staged[version] = spec
        return f"fp{version}"

    def steer_commit(self, version):
        self.gate.wait()
        self.committed.append(version)
        return f"fp{version}-r{self.rank}"

    def steer_capture_take(self, ids, host=None):
        time.sleep(float(ids[0]))
        return {"slept": ids[0]}


@pytest.fixture
def ranks():
    workers = [Worker(0), Worker(1)]
    chans = [channel.WorkerChannel(w) for w in workers]
    client = channel.ChannelClient([c.address for c in chans], timeout_s=1.0)
    yield workers, client
    client.close()


def test_call_reaches_every_rank_and_reports_where_time_went(ranks):
    workers, client = ranks
    out = asyncio.run(client.call("steer_apply", 3, {"x": 1}))
    assert out == ["fp3-r0", "fp3-r1"]
    assert [w.committed for w in workers] == [[3], [3]]
    assert len(client.last_timing) == 2 and all(len(t) == 3 and min(t) >= 0 for t in client.last_timing)


def test_errors_come_back_typed_and_change_nothing(ranks):
    workers, client = ranks
    with pytest.raises(ValueError, match="bad spec"):
        asyncio.run(client.call("steer_apply", 4, {"bad": True}))
    with pytest.raises(ValueError, match="unknown steering method"):
        asyncio.run(client.call("shutdown"))
    assert [w.committed for w in workers] == [[], []]
    assert asyncio.run(client.call("steer_info")) == [{"rank": 0}, {"rank": 1}]


def test_cancelled_caller_leaves_sockets_in_step(ranks):
    workers, client = ranks

    async def main():
        for w in workers:
            w.gate.clear()
        task = asyncio.create_task(client.call("steer_apply", 5, {}))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for w in workers:
            w.gate.set()
        # the cancelled exchange finished in the client's thread; the next call gets its own replies
        return await client.call("steer_info")

    assert asyncio.run(main()) == [{"rank": 0}, {"rank": 1}]
    assert [w.committed for w in workers] == [[5], [5]]


def test_timeout_names_the_rank_and_the_channel_recovers(ranks):
    workers, client = ranks
    with pytest.raises(RuntimeError, match="did not answer"):
        asyncio.run(client.call("steer_capture_take", ["1.5"]))
    time.sleep(0.6)  # the workers finish the late call; their replies go to the closed sockets
    assert asyncio.run(client.call("steer_info")) == [{"rank": 0}, {"rank": 1}]


def test_loop_stays_free_while_a_call_waits(ranks):
    """The exchange runs off the event loop: other coroutines keep running while a rank holds the call."""
    workers, client = ranks

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        await client.call("steer_capture_take", ["0.3"])
        t.cancel()
        return ticks

    assert asyncio.run(main()) >= 15
