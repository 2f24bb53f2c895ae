"""vLLM general-plugin entry point (``vllm.general_plugins``): runs in every vLLM process."""

from __future__ import annotations


def register() -> None:
    from .patch import install

    install()
