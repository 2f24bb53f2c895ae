"""Two copies of every layer's global steering rows, and which one the forwards read.

A change is written into the copy no forward reads and named pending; the runner's thread makes the
pending copy current at the start of its next forward, with one 4-byte device write ordered after the
change's copies. So a change never waits for a forward's launch (on the H100, piecewise-graph launches of
mixed prefill/decode steps held the forward lock up to ~20 ms), and a forward never sees half a change:
each of its layers reads the copy selected before its first layer ran. The copy a change overwrites was
last read by forwards enqueued before the switch away from it, so on the same stream the overwrite runs
after them; an event orders the switch after the copies whatever stream they were made on.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch


class Selector:
    def __init__(self) -> None:
        self.sel: torch.Tensor | None = None  # [1] int32 on the device: the copy forwards read
        self.current = 0  # what ``sel`` holds for forwards enqueued from now on (runner's view)
        self.pending = 0  # the copy to switch to at the next forward's start
        self._ready: Any = None  # CUDA event: the pending copy's writes are done
        self._mutex = threading.Lock()  # a change's writes and the switch never interleave

    def buffer(self) -> torch.Tensor:
        """The shared selector, created on the current (construction-time) device on first use."""
        if self.sel is None:
            self.sel = torch.zeros(1, dtype=torch.int32)
        return self.sel

    def write(self, fn: Callable[[int], Any]) -> Any:
        """``fn(copy)`` writes a change into ``copy``, which no forward reads; forwards starting after
        this returns read it. Call on the stream ``fn`` writes on (the switch waits for an event there)."""
        with self._mutex:
            target = 1 - self.current
            if self._ready is not None:  # an earlier change to ``target``, maybe on another stream: after it
                torch.cuda.current_stream().wait_event(self._ready)
            out = fn(target)
            if self.sel is not None and self.sel.is_cuda:
                self._ready = torch.cuda.Event()
                self._ready.record()  # on the stream ``fn`` used
            self.pending = target
            return out

    def at_forward_start(self) -> None:
        """The runner's thread, before it enqueues a forward (on the forwards' stream)."""
        if self.pending == self.current:
            return
        with self._mutex:
            if self.pending == self.current or self.sel is None:
                return
            if self._ready is not None:
                torch.cuda.current_stream().wait_event(self._ready)
                self._ready = None
            self.sel.fill_(self.pending)
            self.current = self.pending

