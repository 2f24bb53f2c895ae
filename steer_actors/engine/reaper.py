"""Kills an engine's vLLM processes when the Ray actor that owns them dies.

vLLM's EngineCore and workers outlive a SIGKILLed parent (Ray kills actors that way, e.g. when a
Serve replica that owns them goes away); without this they keep their memory until the machine
reboots. ``python -m steer_actors.engine.reaper PARENT PID...`` polls PARENT and kills the PIDs after it.

Processes killed that way cannot remove their shared memory either: vLLM's message queues live in
``/dev/shm/psm_*`` files (tmpfs: memory) that nothing would ever free. The reaper notes the files each
process maps just before killing it and removes those that no living process maps afterwards. Ray 2.60
kills a dead actor's descendants itself (the reaper with them), so each engine also leaves a note of its
processes' files (:func:`note_shared_memory`), and the next engine on the host removes what a dead
engine's note names and nobody maps any more (:func:`sweep_dead_engines`).
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


NOTES = "/tmp/steer-actors-engines"


def _note_path(pid: int) -> str:
    from steer_actors.worker.capture.arena import pid_namespace

    return os.path.join(NOTES, f"{pid_namespace()}-{pid}.json")


def note_shared_memory() -> str | None:
    """Write down the shared-memory files this process's descendants map (an engine's vLLM processes,
    once started); returns the note's path."""
    import json

    import psutil

    files: set[str] = set()
    for child in psutil.Process().children(recursive=True):
        files |= shm_files(child.pid)
    files = {f for f in files if not os.path.basename(f).startswith("steer-capture-")}
    if not files:
        return None
    os.makedirs(NOTES, exist_ok=True)
    path = _note_path(os.getpid())
    with open(path + ".tmp", "w") as f:
        json.dump(sorted(files), f)
    os.replace(path + ".tmp", path)
    return path


def sweep_dead_engines() -> list[str]:
    """Remove the files named by notes of engines (of this pid namespace) that are gone, unless a living
    process maps them; best effort, never raises. Returns the files removed."""
    import json

    from steer_actors.worker.capture.arena import pid_namespace

    removed: list[str] = []
    try:
        names = os.listdir(NOTES)
    except OSError:
        return removed
    ns = str(pid_namespace())
    mapped = None
    for name in names:
        stem, _, ext = name.rpartition(".")
        owner_ns, _, pid = stem.partition("-")
        if ext != "json" or owner_ns != ns or not pid.isdigit():
            continue
        if os.path.exists(f"/proc/{pid}") and not _zombie(int(pid)):
            continue
        note = os.path.join(NOTES, name)
        try:
            with open(note) as f:
                files = [p for p in json.load(f) if isinstance(p, str) and p.startswith("/dev/shm/")
                         and "/" not in p[len("/dev/shm/"):]]
        except (OSError, ValueError):
            files = []
        mapped = _mapped_by_others() if mapped is None else mapped
        for path in files:
            if path in mapped:
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        try:
            os.unlink(note)
        except OSError:
            pass
    return removed


def start_for_children() -> None:
    """Spawn a detached reaper for every current descendant of this process."""
    import subprocess

    import psutil

    pids = [str(p.pid) for p in psutil.Process().children(recursive=True)]
    if pids:
        subprocess.Popen([sys.executable, "-m", "steer_actors.engine.reaper", str(os.getpid()), *pids],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), [int(p) for p in sys.argv[2:]])
