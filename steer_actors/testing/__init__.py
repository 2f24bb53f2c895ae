"""Test and demo helpers: tiny random-weight checkpoints built locally, and the HF oracle."""

from steer_actors.testing.tiny_models import TINY_MODELS, build_tiny_model

__all__ = ["TINY_MODELS", "build_tiny_model"]
