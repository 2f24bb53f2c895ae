"""The reaper on real processes: an engine's processes die with their owner, and the shared memory they
mapped (vLLM's message queues) goes with them, but never a file another living process still maps."""

import subprocess
import sys
import time
from multiprocessing import shared_memory

from steer_actors import reaper

# as vLLM's message queues: no resource tracker that would unlink the file when the holder dies
HOLD = ("import sys, time; from multiprocessing import resource_tracker, shared_memory; "
        "m = shared_memory.SharedMemory(name=sys.argv[1], create=sys.argv[2] == '1', size=4096); "
        "resource_tracker.unregister(m._name, 'shared_memory'); print('ready', flush=True); time.sleep(120)")


def hold(name: str, create: bool) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, name, "1" if create else "0"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_killed_children_leave_no_shared_memory_but_shared_files_stay():
    tag = f"steer-reaper-test-{time.time_ns()}"
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    own = hold(f"{tag}-own", True)  # mapped by the engine process alone
    shared = hold(f"{tag}-shared", True)  # also mapped by a process that lives on
    survivor = hold(f"{tag}-shared", False)
    try:
        assert f"/dev/shm/{tag}-own" in reaper.shm_files(own.pid)
        proc = subprocess.Popen([sys.executable, "-c", "import sys, json; from steer_actors import reaper; "
                                 "print(json.dumps(reaper.watch(int(sys.argv[1]), [int(x) for x in sys.argv[2:]], 0.05)))",
                                 str(parent.pid), str(own.pid), str(shared.pid)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        assert own.poll() is None  # nothing happens while the owner lives
        parent.kill()
        out, _ = proc.communicate(timeout=30)
        assert own.wait(10) == -9 and shared.wait(10) == -9
        assert f"/dev/shm/{tag}-own" in out and f"{tag}-shared" not in out
        import os

        assert not os.path.exists(f"/dev/shm/{tag}-own") and os.path.exists(f"/dev/shm/{tag}-shared")
    finally:
        for p in (parent, own, shared, survivor):
            p.kill()
        try:
            shared_memory.SharedMemory(name=f"{tag}-shared").unlink()
        except FileNotFoundError:
            pass
