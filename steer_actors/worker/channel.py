"""Side channel to the workers: steering RPCs that do not wait for the engine core's step boundary.

vLLM's ``collective_rpc`` travels through the engine core's input queue, which is read between steps,
so under load a change waits for the step in flight and often the next one (H100, 512 running
requests: p99 52 ms). Each worker also serves its ``steer_*`` methods on ZMQ sockets from threads (one
per lane). A global change is written into the copy of the rows no forward reads and the runner switches
copies at its next forward's start (:mod:`.double_buffer`): it waits for no forward. A request slot's rows
are copied where no forward is being enqueued (the model runner holds the forward lock while it enqueues one),
by the channel thread when the lock is free or by the runner at its next forward's start
(:meth:`~steer_actors.worker.runtime.ForwardGate.between_forwards`). Messages: :mod:`.protocol`.
A change's reply says where its time went on the worker (``Reply.timing``, ms): building its rows, waiting for
a gap between forwards, copying.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from steer_actors.worker import protocol
from steer_actors.worker.protocol import LANES, Reply

log = logging.getLogger(__name__)

# Methods that only touch host state of their own (validation, building rows), that write what no
# forward reads (a global change goes into the unread copy, see double_buffer), or that take the lock
# themselves for just the moment they need it (capture bookkeeping): no lock around the call.
UNLOCKED = frozenset({"steer_info", "steer_stage", "steer_commit", "steer_abort", "steer_capture_register",
                      "steer_capture_take", "steer_capture_drop", "steer_capture_free", "steer_capture_stats"})


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _bind_host() -> str:
    try:
        import ray

        if ray.is_initialized():  # a Ray-executor worker, maybe on another node than the engine actor
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"  # mp / in-process workers share the engine actor's node


class WorkerChannel:
    """Serves one lane of a worker's ``steer_*`` methods (thread + REP socket)."""

    def __init__(self, worker: Any, gate: Any, lane: str = "steer"):
        """``gate``: the worker's :class:`~steer_actors.worker.runtime.ForwardGate`."""
        import zmq

        self.worker, self.gate, self.lane, self.methods = worker, gate, lane, LANES[lane]
        self.sock = zmq.Context.instance().socket(zmq.REP)
        host = _bind_host()
        self.address = f"tcp://{host}:{self.sock.bind_to_random_port(f'tcp://{host}')}"
        self.thread = threading.Thread(target=self._serve, name=f"steer-channel-{lane}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import torch

        device = getattr(self.worker, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)
        while True:
            try:
                raw = self.sock.recv()
                t0 = time.perf_counter()  # "building" includes decoding the message
                method, args = protocol.decode_request(raw, self.lane)
                if method == "steer_apply":  # stage, then commit into the unread copy: no forward to wait for
                    self.worker.steer_stage(*args)
                    t1 = time.perf_counter()
                    ok = self.worker.steer_commit(args[0])
                    reply = Reply(ok, timing=(_ms(t1 - t0), 0.0, _ms(time.perf_counter() - t1)))
                elif method in UNLOCKED:  # no lock around the call (capture calls hold it only briefly)
                    reply = Reply(getattr(self.worker, method)(*args))
                else:
                    # between two forwards: a request slot's rows (validated and built here: the runner may be
                    # the one running the copy, and nothing slower than the copy belongs in the job), routes
                    if method == "steer_slot_load":
                        method, args = "_slot_write", (args[0], self.worker._slot_build(*args))
                    t1 = time.perf_counter()
                    call = getattr(self.worker, method)
                    ran: list[float] = []

                    def job(call=call, args=args, ran=ran):
                        t = time.perf_counter()
                        try:
                            return call(*args)
                        finally:
                            ran.append(time.perf_counter() - t)

                    ok = self.gate.between_forwards(job)
                    copy_s = ran[0] if ran else 0.0
                    reply = Reply(ok, timing=(_ms(t1 - t0), _ms(time.perf_counter() - t1 - copy_s), _ms(copy_s)))
            except Exception as e:  # every error goes back to the caller, the thread lives on
                reply = Reply(err=type(e).__name__, msg=str(e))
            try:
                self.sock.send(protocol.encode(reply))
            except Exception as e:
                log.error("steer channel: cannot reply: %s", e)
