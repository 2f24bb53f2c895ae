"""Pydantic request bodies of the HTTP API (JSON form; msgpack bodies carry the same fields).

Unknown fields are refused (400), never ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt

_STRICT = ConfigDict(extra="forbid")


class GenerateRequest(BaseModel):
    model_config = _STRICT
    prompts: list[str | list[int]] = Field(min_length=1, description="texts or token-id lists")
    sampling: dict[str, Any] | None = Field(
        default=None, description="vLLM SamplingParams fields; with n > 1 each result's outputs hold all n "
                                  "completions (and its flat text/token_ids are left out)")
    capture_layers: StrictInt | list[StrictInt] | None = Field(
        default=None, description="layer (or layers) whose h + r to capture")
    steering_spec: Any = Field(default=None, description="per-request spec (applied after the global one), "
                                                         "or a list with one spec or null per prompt")


class ChatRequest(BaseModel):
    model_config = _STRICT
    conversations: list[list[dict[str, str]]] = Field(min_length=1, description="one message list per request")
    sampling: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class OpBody(BaseModel):
    """One op's fields; ``vector`` as a JSON list or, in msgpack, ``{data: f32 LE bytes, shape, dtype}``."""

    model_config = _STRICT

    vector: Any
    scale: float | None = None
    min: float | None = None
    max: float | None = None


class SpecBody(BaseModel):
    model_config = _STRICT
    layers: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description='{"<layer>": {"operations": [{"kind": "add"|"cap"|"ablation", ...}]}} or, '
                    'chatspace\'s form, {"<layer>": {"add": {...}, "projection_cap": {...}, "ablation": {...}}}')


class PopBody(BaseModel):
    model_config = _STRICT
    push_id: StrictInt | None = Field(default=None, description="the push to end (its reply's push_id); "
                                                          "none: the newest")
