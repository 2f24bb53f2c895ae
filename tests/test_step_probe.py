"""The V2-runner hook's contract, on a stand-in with the V2 runner's call shape (vLLM 0.26's V2 runner
is GPU-only, so the engine tests here exercise the V1 hook; bench/gpu.py checks V2 on the GPU): the
listener sees each step's layout, side-channel work is locked out between input preparation and the
forward's launch, and a dummy run (no prepared inputs) neither takes nor releases the lock."""

import threading
from types import SimpleNamespace

import numpy as np

from steer_actors import vllm_compat
from steer_actors.worker.runtime import WorkerRuntime


class V2Shaped:
    """``execute_model`` prepares inputs (real steps only), then launches the forward."""

    def __init__(self, lock):
        self.lock, self.seen_locked = lock, []

    def prepare_inputs(self, sched, desc):
        return SimpleNamespace(num_reqs=2, req_ids=["a-1", "b-2"], query_start_loc_np=np.array([0, 3, 4, 4]),
                               positions="P", input_ids="I", num_tokens_after_padding=8)

    def execute_model(self, sched, dummy=False):
        if not dummy:
            self.prepare_inputs(sched, None)
        self.seen_locked.append(_locked_elsewhere(self.lock))
        return "out"


def _locked_elsewhere(lock) -> bool:
    """Would the side channel's thread have to wait?"""
    got = []

    def try_lock():
        ok = lock.acquire(timeout=0.05)
        got.append(ok)
        if ok:
            lock.release()

    t = threading.Thread(target=try_lock)
    t.start()
    t.join()
    return not got[0]


class Listener:
    def __init__(self):
        self.calls = []

    def begin_step(self, *args):
        self.calls.append(("begin", args[0], list(args[1]), args[2], args[3], args[4]))

    def end_step(self):
        self.calls.append(("end",))


def test_v2_hook_locks_only_from_prepared_inputs_to_launch():
    rt = WorkerRuntime()
    lock = rt.gate.lock
    runner = V2Shaped(lock)
    lst = Listener()
    vllm_compat.install_step_probe(SimpleNamespace(model_runner=runner), rt, lst)
    assert runner.execute_model("s") == "out"
    assert lst.calls == [("begin", ["a-1", "b-2"], [0, 3, 4], "P", "I", 8), ("end",)]
    assert runner.seen_locked == [True] and not _locked_elsewhere(lock)
    runner.execute_model("s", dummy=True)  # no prepared inputs: no lock, listeners still closed
    assert runner.seen_locked[-1] is False and lst.calls[-1] == ("end",) and not _locked_elsewhere(lock)
