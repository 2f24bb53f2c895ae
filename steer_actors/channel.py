"""Side channel to the workers: steering RPCs that do not wait for the engine core's step boundary.

vLLM's ``collective_rpc`` travels through the engine core's input queue, which is read between steps,
so under load a change waits for the step in flight and often the next one (H100, 512 running
requests: p99 52 ms). Each worker also serves its ``steer_*`` methods on a ZMQ socket from a thread.
That thread and the model runner share one lock, held while the runner enqueues a forward; a change
is copied (from pinned memory, asynchronously) onto the forward's CUDA stream under the lock, so it
lands between two forwards, never inside one, and is acknowledged as soon as it is ordered before
every later forward. Payloads are msgpack (no pickle on the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from . import wire

log = logging.getLogger(__name__)

LOCK = threading.RLock()  # held by the runner while it enqueues a forward, and by every steer_* call
_forward_stream: Any = None  # the CUDA stream forwards run on (seen by the runner hook)

ALLOWED = frozenset({
    "steer_info", "steer_stage", "steer_commit", "steer_apply", "steer_abort", "steer_slot_load", "steer_route",
    "steer_unroute", "steer_capture_register", "steer_capture_take", "steer_capture_drop",
})


# Methods that only touch host state of their own (validation, building rows): no lock.
UNLOCKED = frozenset({"steer_info", "steer_stage", "steer_abort", "steer_capture_take"})


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
    """Serves one worker's ``steer_*`` methods (thread + REP socket)."""

    def __init__(self, worker: Any):
        import zmq

        self.worker = worker
        self.sock = zmq.Context.instance().socket(zmq.REP)
        host = _bind_host()
        self.address = f"tcp://{host}:{self.sock.bind_to_random_port(f'tcp://{host}')}"
        self.thread = threading.Thread(target=self._serve, name="steer-channel", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import torch

        device = getattr(self.worker, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)
        while True:
            try:
                msg = wire.unpackb(self.sock.recv())
                method, args = msg.get("m"), msg.get("a", [])
                if method not in ALLOWED:
                    raise ValueError(f"unknown steering method {method!r}")
                if method in UNLOCKED:  # host-side only: never waits for a forward
                    reply = {"ok": getattr(self.worker, method)(*args)}
                elif method == "steer_apply":  # validate and build rows outside the lock, copy under it
                    self.worker.steer_stage(*args)
                    with LOCK, on_forward_stream():
                        reply = {"ok": self.worker.steer_commit(args[0])}
                else:
                    with LOCK, on_forward_stream():
                        reply = {"ok": getattr(self.worker, method)(*args)}
            except Exception as e:  # every error goes back to the caller, the thread lives on
                reply = {"err": type(e).__name__, "msg": str(e)}
            try:
                self.sock.send(wire.packb(reply))
            except Exception as e:
                log.error("steer channel: cannot reply: %s", e)


class ChannelClient:
    """Engine-actor side: one REQ socket per TP rank; a call goes to every rank concurrently."""

    def __init__(self, addresses: list[str], timeout_s: float = 120.0):
        self.addresses, self.timeout_s = addresses, timeout_s
        self._socks = [self._connect(a) for a in addresses]
        self._locks = [asyncio.Lock() for _ in addresses]

    @staticmethod
    def _connect(address: str):
        import zmq
        import zmq.asyncio

        sock = zmq.asyncio.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        return sock

    async def _one(self, i: int, payload: bytes) -> Any:
        async with self._locks[i]:
            sock = self._socks[i]
            try:
                await sock.send(payload)
                if not await sock.poll(int(self.timeout_s * 1000)):
                    raise RuntimeError(f"steering worker {i} did not answer in {self.timeout_s:.0f} s")
                reply = wire.unpackb(await sock.recv())
            except BaseException:
                # timed out, cancelled or failed mid-exchange: a REQ socket that missed its reply can
                # never send again, so this rank gets a fresh one
                sock.close()
                self._socks[i] = self._connect(self.addresses[i])
                raise
        if "err" in reply:
            raise (ValueError if reply["err"] in ("ValueError", "TypeError") else RuntimeError)(reply["msg"])
        return reply["ok"]

    async def call(self, method: str, *args: Any) -> list[Any]:
        payload = wire.packb({"m": method, "a": list(args)})
        return list(await asyncio.gather(*(self._one(i, payload) for i in range(len(self._socks)))))
