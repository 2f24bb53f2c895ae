"""Test and demo helpers: tiny random-weight checkpoints built locally, the HF oracle (which writes the
steering ops out itself, independent of the project's op code), engine fixtures' bodies and shared checks.
None of these modules needs Ray or vLLM to import."""

from steer_actors.testing.tiny_models import TINY_MODELS, build_tiny_model

__all__ = ["TINY_MODELS", "build_tiny_model"]
