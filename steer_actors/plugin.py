"""vLLM general-plugin entry point (``vllm.general_plugins``): runs in every vLLM process."""

from __future__ import annotations


def register() -> None:
    import os

    from .patch import install

    if os.environ.get("STEER_ACTORS_DUMP_STACKS"):  # `kill -USR1 <pid>`: every thread's stack to stderr
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)
    install()
