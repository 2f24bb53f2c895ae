"""The reaper on real processes: an engine's processes die with their owner, and the shared memory they
mapped (vLLM's message queues) goes with them, but never a file another living process still maps."""

import subprocess
import sys
import time
from multiprocessing import shared_memory

from steer_actors.engine import reaper
from steer_actors.testing.waits import wait_until

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
        proc = subprocess.Popen([sys.executable, "-c", "import sys, json; from steer_actors.engine import reaper; "
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


ENGINE = ("import subprocess, sys, time; from steer_actors.engine import reaper; reaper.NOTES = sys.argv[1]; "
          "child = subprocess.Popen([sys.executable, '-c', sys.argv[2], sys.argv[3], '1'], stdout=subprocess.PIPE, text=True); "
          "child.stdout.readline(); print(reaper.note_shared_memory(), child.pid, flush=True); time.sleep(120)")


def test_the_next_engine_removes_what_a_killed_engine_left(tmp_path):
    """Ray kills a dead actor's descendants itself (the reaper with them): the shared memory they mapped
    is removed when the next engine starts, from the note the dead engine left."""
    import os
    import signal

    tag = f"steer-reaper-test-{time.time_ns()}"
    engine = subprocess.Popen([sys.executable, "-c", ENGINE, str(tmp_path), HOLD, f"{tag}-queue"],
                              stdout=subprocess.PIPE, text=True)
    note, child = engine.stdout.readline().split()
    try:
        assert os.path.dirname(note) == str(tmp_path) and f"/dev/shm/{tag}-queue" in open(note).read()
        original, reaper.NOTES = reaper.NOTES, str(tmp_path)
        try:
            assert reaper.sweep_dead_engines() == []  # its engine lives: nothing is touched
            for pid in (int(child), engine.pid):
                os.kill(pid, signal.SIGKILL)
            engine.wait(10)
            # the orphaned grandchild is dead (maybe a zombie not yet collected): it maps nothing any more
            wait_until(lambda: not reaper.shm_files(child), timeout_s=10, every=0.02)
            assert os.path.exists(f"/dev/shm/{tag}-queue")  # killed: nobody removed it
            assert reaper.sweep_dead_engines() == [f"/dev/shm/{tag}-queue"]
        finally:
            reaper.NOTES = original
        assert not os.path.exists(f"/dev/shm/{tag}-queue") and not os.path.exists(note)
    finally:
        engine.kill()
        try:
            shared_memory.SharedMemory(name=f"{tag}-queue").unlink()
        except FileNotFoundError:
            pass
