"""The worker side channel as a transport: real ZMQ sockets and threads, a plain object standing in for the
worker's ``steer_*`` methods (the engine tests drive it with real vLLM workers)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from steer_actors.engine import channel_client
from steer_actors.testing.waits import until
from steer_actors.worker import channel
from steer_actors.worker.protocol import CaptureTaken
from steer_actors.worker.runtime import ForwardGate


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request, monkeypatch):
    """Every test under asyncio's own loop and under uvloop (Ray runs actors, the engine's home, on uvloop:
    libuv watches descriptors its own way, e.g. it must not watch one that is closed)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")

        def run(coro):
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)

        monkeypatch.setattr(asyncio, "run", run)
    return request.param


class Worker:
    def __init__(self, rank: int):
        self.rank, self.staged, self.committed = rank, {}, []
        self.gate = threading.Event()
        self.gate.set()
        # what the tests wait on: a commit has reached the gate, a capture take has started / returned
        self.committing, self.taking, self.took = threading.Event(), threading.Event(), threading.Event()

    def steer_info(self):
        return {"rank": self.rank}

    def steer_stage(self, version, spec):
        if spec.get("bad"):
            raise ValueError("bad spec")
        self.staged[version] = spec
        return f"fp{version}"

    def steer_commit(self, version):
        self.committing.set()
        self.gate.wait()
        self.committed.append(version)
        return f"fp{version}-r{self.rank}"

    def steer_capture_take(self, ids, host=None):
        self.taking.set()
        time.sleep(float(ids[0]))
        self.took.set()
        return {ids[0]: CaptureTaken(positions=[self.rank])}


def _lanes(workers, timeout_s=1.0):
    chans = {lane: [channel.WorkerChannel(w, ForwardGate(), lane) for w in workers] for lane in channel.LANES}
    return {lane: channel_client.ChannelClient([c.address for c in cs], timeout_s=timeout_s) for lane, cs in chans.items()}


@pytest.fixture
def ranks():
    workers = [Worker(0), Worker(1)]
    clients = _lanes(workers)
    yield workers, clients["steer"]
    for c in clients.values():
        c.close()


@pytest.fixture
def lanes():
    workers = [Worker(0), Worker(1)]
    clients = _lanes(workers)
    yield workers, clients
    for c in clients.values():
        c.close()


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
        await until(lambda: all(w.committing.is_set() for w in workers))  # every rank holds the exchange
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for w in workers:
            w.gate.set()
        # the cancelled exchange finished in the background; the next call gets its own replies
        return await client.call("steer_info")

    assert asyncio.run(main()) == [{"rank": 0}, {"rank": 1}]
    assert [w.committed for w in workers] == [[5], [5]]


def test_concurrent_calls_take_turns_and_each_gets_its_own_replies(ranks):
    """Calls on one client queue for the REQ sockets (one request in flight each); the loop thread sends
    and a reader callback reads, so every caller must still get the replies to its own request."""
    workers, client = ranks

    async def main():
        for w in workers:
            w.gate.clear()
        calls = [asyncio.create_task(client.call("steer_apply", v, {})) for v in range(10, 20)]
        await until(lambda: all(w.committing.is_set() for w in workers))  # the first is held, the rest queue
        for w in workers:
            w.gate.set()
        return await asyncio.gather(*calls)

    out = asyncio.run(main())
    assert out == [[f"fp{v}-r0", f"fp{v}-r1"] for v in range(10, 20)]
    assert [w.committed for w in workers] == [list(range(10, 20))] * 2


def test_timeout_names_the_rank_and_the_channel_recovers(lanes):
    workers, clients = lanes
    client = clients["requests"]
    with pytest.raises(RuntimeError, match="did not answer"):
        asyncio.run(client.call("steer_capture_take", ["1.5"]))
    # the workers finish the late call; their replies go to the closed sockets
    assert all(w.took.wait(5) for w in workers)
    assert asyncio.run(client.call("steer_capture_take", ["0"])) == [{"0": CaptureTaken(positions=[r])} for r in (0, 1)]


def test_loop_stays_free_while_a_call_waits(lanes):
    """Waiting for the replies leaves the event loop free: other coroutines run while a rank holds the call."""
    workers, clients = lanes
    client = clients["requests"]

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


def test_a_change_does_not_queue_behind_capture_calls(lanes):
    """A slow capture take on the requests lane leaves the steering lane free."""
    workers, clients = lanes

    async def main():
        slow = asyncio.create_task(clients["requests"].call("steer_capture_take", ["0.5"]))
        await until(lambda: all(w.taking.is_set() for w in workers))  # every rank is inside the slow take
        t = time.perf_counter()
        out = await clients["steer"].call("steer_apply", 7, {})
        took = time.perf_counter() - t
        await slow
        return out, took

    out, took = asyncio.run(main())
    assert out == ["fp7-r0", "fp7-r1"] and took < 0.3


def test_busy_runner_picks_a_change_up_at_its_next_forward():
    """A runner that releases the forward lock and takes it again at once (as under load) still lets a
    change land within about one forward, never inside one: the runner runs it at its next step start."""
    stop, inside, log = threading.Event(), threading.Event(), []
    gate = ForwardGate()

    def runner():
        while not stop.is_set():
            with gate.lock:
                gate.run_pending()
                inside.set()
                time.sleep(0.01)  # a forward being enqueued
                inside.clear()
            # released for only a moment: a thread waiting for the lock rarely wins it here

    def change():
        log.append(("ran", inside.is_set(), threading.current_thread().name))
        return 42

    th = threading.Thread(target=runner, name="runner", daemon=True)
    th.start()
    assert inside.wait(5)  # the runner is forwarding
    waits = []
    for _ in range(20):
        t = time.perf_counter()
        assert gate.between_forwards(change) == 42
        waits.append(time.perf_counter() - t)
    stop.set()
    th.join()
    assert len(log) == 20 and not any(was_inside for _, was_inside, _ in log)
    assert max(waits) < 0.05, waits  # at most about one forward (10 ms) plus scheduling


def test_idle_runner_change_runs_at_once_and_errors_come_back():
    def bad():
        raise ValueError("nope")

    gate = ForwardGate()
    t = time.perf_counter()
    assert gate.between_forwards(lambda: threading.current_thread().name) == threading.current_thread().name
    assert time.perf_counter() - t < 0.05
    with pytest.raises(ValueError, match="nope"):
        gate.between_forwards(bad)


def test_a_change_that_finds_no_gap_is_withdrawn_not_applied_late():
    ran, held, release = [], threading.Event(), threading.Event()
    gate = ForwardGate()

    def stuck_runner():
        with gate.lock:
            held.set()
            release.wait(5)

    th = threading.Thread(target=stuck_runner, daemon=True)
    th.start()
    held.wait(5)
    with pytest.raises(RuntimeError, match="no gap between forwards"):
        gate.between_forwards(lambda: ran.append(1), timeout_s=0.1)
    release.set()
    th.join()
    with gate.lock:
        gate.run_pending()  # the next forward: nothing left to land
    assert ran == []


def _rep_server(replies):
    """A bare REP socket answering its n-th request with ``replies(n)``: (delay s or an event to wait for,
    raw bytes). Returns its ``address`` and the events ``received`` (a request arrived) and ``replied`` (a
    reply was sent)."""
    import zmq

    from steer_actors import wire

    sock = zmq.Context.instance().socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    srv = SimpleNamespace(address=f"tcp://127.0.0.1:{port}", received=threading.Event(), replied=threading.Event())

    def serve():
        n = 0
        while True:
            sock.recv()
            srv.received.set()
            delay, raw = replies(n)
            if isinstance(delay, threading.Event):
                delay.wait(10)
            else:
                time.sleep(delay)
            sock.send(raw if raw is not None else wire.packb({"ok": n}))
            srv.replied.set()
            n += 1

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_a_malformed_reply_fails_one_call_and_the_next_gets_fresh_sockets():
    """The rank still owing its reply gets a new socket (its REQ socket could never send again)."""
    servers = [_rep_server(lambda n: (0, b"\xc1" if n == 0 else None)),
               _rep_server(lambda n: (0.2 if n == 0 else 0, None))]
    client = channel_client.ChannelClient([s.address for s in servers], timeout_s=2)

    async def main():
        with pytest.raises(ValueError, match="malformed msgpack"):
            await client.call("steer_info")
        await until(servers[1].replied.is_set)  # the slow rank answered the failed call, to its old socket
        return await client.call("steer_info")

    assert asyncio.run(main()) == [1, 1]
    client.close()


def test_a_call_right_after_a_timeout_hears_every_rank():
    """The timed-out exchange stops watching its sockets before the next call watches them (a deferred
    removal would take the healthy rank's new reader with it)."""
    late = threading.Event()  # rank 1 answers the first call only once it has timed out
    servers = [_rep_server(lambda n: (0, None)), _rep_server(lambda n: (late if n == 0 else 0, None))]
    client = channel_client.ChannelClient([s.address for s in servers], timeout_s=0.3)

    async def main():
        with pytest.raises(RuntimeError, match=r"worker\(s\) \[1\] did not answer in 0.3 s"):
            await client.call("steer_info")
        late.set()  # no step of the loop: rank 1 is free for the next call, which must hear both ranks
        return await client.call("steer_info")  # at once, in the same step of the loop

    assert asyncio.run(main()) == [1, 1]
    client.close()


def test_close_fails_a_call_in_flight_at_once():
    server = _rep_server(lambda n: (0.5, None))
    client = channel_client.ChannelClient([server.address], timeout_s=5)

    async def main():
        call = asyncio.create_task(client.call("steer_info"))
        await until(server.received.is_set)  # in flight: the rank has the request
        t = time.perf_counter()
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            await call
        took = time.perf_counter() - t
        with pytest.raises(RuntimeError, match="closed"):
            await client.call("steer_info")
        return took

    assert asyncio.run(main()) < 0.1
