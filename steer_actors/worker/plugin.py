"""vLLM general-plugin entry point (``vllm.general_plugins``): runs in every vLLM process."""

from __future__ import annotations


def register() -> None:
    from steer_actors.worker.layer_patch import install

    dump_stacks_on_signal()
    install()


def dump_stacks_on_signal() -> None:
    """With ``STEER_ACTORS_DUMP_STACKS`` set, ``kill -USR1 <pid>`` writes every thread's stack to stderr
    (what a hung engine process is doing, where no debugger can attach)."""
    from steer_actors import envs

    if envs.STEER_ACTORS_DUMP_STACKS:
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)
