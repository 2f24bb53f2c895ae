"""Waiting for a condition instead of sleeping for a guessed time: tests order their steps by what they
can observe (a task waiting on a lock, a request running on a replica), each wait bounded by a deadline."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


def wait_until(cond: Callable[[], Any], timeout_s: float = 300.0, every: float = 1.0) -> Any:
    """Poll ``cond`` until it returns a true value and return that value. Exceptions from ``cond`` count as
    not yet (a restarting actor refuses calls) until the deadline, where the last one is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s} s")
        time.sleep(every)


async def until(cond: Callable[[], Any], timeout_s: float = 5.0) -> Any:
    """In one event loop: yield to the other tasks until ``cond()`` is true (e.g. a task has reached the
    point where it waits), then return its value. Fails after ``timeout_s`` instead of hanging."""
    deadline = time.monotonic() + timeout_s
    turns = 0
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met in {timeout_s} s")
        # a few bare turns of the loop settle what other tasks do at once; after that the condition waits
        # on another thread or process, so stop spinning
        await asyncio.sleep(0 if turns < 100 else 0.001)
        turns += 1
    return value
