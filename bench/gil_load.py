"""A stand-in for vLLM's runner thread in host-side benchmarks: a thread that keeps the GIL busy with Python
and small torch calls, as the thread launching forwards does. Work on another thread of the same process
then pays for every time it lets go of the GIL (each torch call does)."""

from __future__ import annotations

import threading

import torch


def busy_runner(stop: threading.Event) -> None:
    x = torch.zeros(64)
    while not stop.is_set():
        for _ in range(200):
            x.add_(1.0)
        sum(range(2000))


def python_runner(stop: threading.Event) -> None:
    """The worst case: long stretches of Python that never let go of the GIL by themselves, so another thread
    waits a whole switch interval each time it needs the GIL back."""
    while not stop.is_set():
        sum(range(300000))


class Load:
    def __init__(self, target=busy_runner) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=target, args=(self._stop,), daemon=True, name="gil-load")
        self._thread.start()

    def stop(self) -> None:
        """Stop and join: a daemon thread still inside a torch call at exit aborts the interpreter."""
        self._stop.set()
        self._thread.join()


def start(target=busy_runner) -> Load:
    return Load(target)
