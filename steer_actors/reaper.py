"""Kills an engine's vLLM processes when the Ray actor that owns them dies.

vLLM's EngineCore and workers outlive a SIGKILLed parent (Ray kills actors that way, e.g. when a
Serve replica that owns them goes away); without this they keep their memory until the machine
reboots. ``python -m steer_actors.reaper PARENT PID...`` polls PARENT and kills the PIDs after it.

Processes killed that way cannot remove their shared memory either: vLLM's message queues live in
``/dev/shm/psm_*`` files (tmpfs: memory) that nothing would ever free. The reaper notes the files each
process maps just before killing it and removes those that no living process maps afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def shm_files(pid: int | str, directory: str = "/dev/shm") -> set[str]:
    """The files of ``directory`` that process ``pid`` maps (still named: unlinked ones are gone already)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:  # gone, or not ours to read
        return set()
    found = set()
    for line in lines:
        path = line.split(None, 5)[5] if len(line.split(None, 5)) == 6 else ""
        if path.startswith(directory + "/") and not path.endswith(" (deleted)"):
            found.add(path)
    return found


def _mapped_by_others() -> set[str]:
    found: set[str] = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            found |= shm_files(name)
    return found


def watch(parent: int, pids: list[int], interval: float = 1.0) -> list[str]:
    """Returns the shared-memory files it removed."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            break
        if _zombie(parent):  # dead, not yet collected by its own parent
            break
        time.sleep(interval)
    files: set[str] = set()
    for pid in pids:
        files |= shm_files(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = []
    for path in sorted(files - _mapped_by_others()):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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
