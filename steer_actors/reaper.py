"""Kills an engine's vLLM processes when the Ray actor that owns them dies.

vLLM's EngineCore and workers outlive a SIGKILLed parent (Ray kills actors that way, e.g. when a
Serve replica that owns them goes away); without this they keep their memory until the machine
reboots. ``python -m steer_actors.reaper PARENT PID...`` polls PARENT and kills the PIDs after it.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def watch(parent: int, pids: list[int], interval: float = 1.0) -> None:
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        time.sleep(interval)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_for_children() -> None:
    """Spawn a detached reaper for every current descendant of this process."""
    import subprocess

    import psutil

    pids = [str(p.pid) for p in psutil.Process().children(recursive=True)]
    if pids:
        subprocess.Popen([sys.executable, "-m", "steer_actors.reaper", str(os.getpid()), *pids],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
