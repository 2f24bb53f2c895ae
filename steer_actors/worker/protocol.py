"""The worker channel's protocol: its lanes and methods, each method's argument and reply types, and the
messages on the wire (msgpack through msgspec: typed, compact, never pickle; bytes stay bytes).

A request is ``[method, [args...]]``; the worker decodes the arguments by the method's own types
(:data:`ARGS`), so a malformed call is refused before it reaches the method. A reply is a :class:`Reply`:
``ok`` (decoded by the method's reply type, :data:`REPLIES`) or an error's type name and message. The same
argument objects also travel through vLLM's ``collective_rpc`` (the fallback where the channel cannot open).
"""

from __future__ import annotations

from typing import Any, Generic, Optional, TypeVar, Union

import msgspec

from steer_actors.ops.change import ChangeRows

# Two lanes per worker, each a socket and thread of its own, so that a steering change never queues
# behind a capture's bookkeeping (registering a request's shared-memory region, taking a finished one).
# Per-request calls share the requests lane: a new request's slot load can wait for a finished
# request's take (which waits for that request's last rows to be copied).
LANES = {
    "steer": frozenset({"steer_info", "steer_stage", "steer_commit", "steer_apply", "steer_abort"}),
    "requests": frozenset({"steer_slot_load", "steer_route", "steer_unroute", "steer_capture_register",
                           "steer_capture_take", "steer_capture_drop", "steer_capture_free",
                           "steer_capture_stats"}),
}
ALLOWED = LANES["steer"] | LANES["requests"]
LANE_OF = {m: lane for lane, methods in LANES.items() for m in methods}


class CaptureRequest(msgspec.Struct, array_like=True, frozen=True):
    """A request to capture: its id, the layers (sorted) and its rows at most (prompt + max_tokens)."""

    request_id: str
    layers: list[int]
    max_rows: int


class CaptureTaken(msgspec.Struct, omit_defaults=True):
    """A finished request's capture as the worker hands it over: positions (sorted) with their input tokens,
    and the rows either in a region of a shared-memory segment on the engine's host (``file``, ``offset_rows``,
    ``shape`` [layers, max_rows, H] layer-major, ``dtype``, ``region`` to free) or inline (``layers``: each
    layer's rows as :func:`steer_actors.wire.encode_tensor` gives them); or why it failed (``error``)."""

    positions: list[int] = []
    token_ids: list[int] = []
    recomputed: int = 0  # rows that arrived more than once (preemption by recompute)
    layer_ids: list[int] = []
    file: Optional[str] = None
    offset_rows: int = 0
    shape: Optional[list[int]] = None
    dtype: str = "float32"
    region: Optional[int] = None
    layers: Optional[dict[str, dict[str, Any]]] = None
    error: Optional[str] = None


SpecWire = dict[str, Any]  # a spec's wire form (SteeringSpec.to_wire), validated by the worker

ARGS: dict[str, Any] = {
    "steer_info": tuple[()],
    "steer_stage": tuple[int, Union[ChangeRows, SpecWire]],
    "steer_commit": tuple[int],
    "steer_apply": tuple[int, Union[ChangeRows, SpecWire]],
    "steer_abort": tuple[int],
    "steer_slot_load": tuple[int, SpecWire],
    "steer_route": tuple[list[tuple[str, int]]],
    "steer_unroute": tuple[list[str]],
    "steer_capture_register": tuple[list[CaptureRequest], Optional[str], Optional[int]],
    "steer_capture_take": tuple[list[str]],
    "steer_capture_drop": tuple[list[str]],
    "steer_capture_free": tuple[list[int]],
    "steer_capture_stats": tuple[()],
}

REPLIES: dict[str, Any] = {
    "steer_stage": str, "steer_commit": str, "steer_apply": str,
    "steer_capture_register": Optional[dict[str, str]],
    "steer_capture_take": Optional[dict[str, Optional[CaptureTaken]]],
}

T = TypeVar("T")


class Request(msgspec.Struct, array_like=True):
    method: str
    args: tuple


class _RawRequest(msgspec.Struct, array_like=True):
    method: str
    args: msgspec.Raw


class Reply(msgspec.Struct, Generic[T], omit_defaults=True):
    ok: Optional[T] = None
    err: Optional[str] = None  # the error's type name
    msg: str = ""
    timing: Optional[tuple[float, float, float]] = None  # see steer_actors.worker.channel


_encoder = msgspec.msgpack.Encoder()
_raw_request = msgspec.msgpack.Decoder(_RawRequest)
_arg_decoders = {m: msgspec.msgpack.Decoder(t) for m, t in ARGS.items()}
_reply_decoders = {m: msgspec.msgpack.Decoder(Reply[REPLIES.get(m, Any)]) for m in ALLOWED}
_any_reply = msgspec.msgpack.Decoder(Reply[Any])


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def encode_request(method: str, args: tuple) -> bytes:
    return _encoder.encode(Request(method, args))


def decode_request(data: bytes, lane: str) -> tuple[str, tuple]:
    """(method, its arguments) of a request for a method of ``lane``; ValueError for anything else."""
    try:
        req = _raw_request.decode(data)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed request: {e}") from None
    if req.method not in LANES[lane]:
        raise ValueError(f"unknown steering method {req.method!r} on the {lane!r} lane")
    try:
        return req.method, _arg_decoders[req.method].decode(req.args)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed arguments for {req.method}: {e}") from None


def decode_reply(method: str, data: bytes) -> Reply:
    try:
        return _reply_decoders.get(method, _any_reply).decode(data)
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed msgpack body: {e}") from None
