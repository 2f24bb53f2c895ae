"""Pydantic request bodies of the HTTP API (JSON form; msgpack bodies carry the same fields)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictInt


class GenerateRequest(BaseModel):
    prompts: list[str | list[int]] = Field(min_length=1, description="texts or token-id lists")
    sampling: dict[str, Any] | None = Field(default=None, description="vLLM SamplingParams fields")
    capture_layers: list[StrictInt] | None = Field(default=None, description="layers whose h + r to capture")
    steering_spec: Any = Field(default=None, description="per-request spec (applied after the global one), "
                                                         "or a list with one spec or null per prompt")


class ChatRequest(BaseModel):
    conversations: list[list[dict[str, str]]] = Field(min_length=1, description="one message list per request")
    sampling: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class OpBody(BaseModel):
    """One op's fields; ``vector`` as a JSON list or, in msgpack, ``{data: f32 LE bytes, shape, dtype}``."""

    vector: Any
    scale: float | None = None
    min: float | None = None
    max: float | None = None


class SpecBody(BaseModel):
    layers: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description='{"<layer>": {"operations": [{"kind": "add"|"cap"|"ablation", ...}]}}')


class PopBody(BaseModel):
    push_id: StrictInt | None = Field(default=None, description="the push to end (its reply's push_id); "
                                                          "none: the newest")
