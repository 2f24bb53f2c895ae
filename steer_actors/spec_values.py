"""Values inside steering specs: vectors (tensor, array, list or encoded bytes -> float32 tensor) and
scalars that must stay finite in the float32 the math runs in; and the short error form of pydantic's
ValidationError that every caller (Python, Ray, HTTP) sees."""

from __future__ import annotations

import contextlib
import math
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BeforeValidator, PlainSerializer, ValidationError

from steer_actors import wire


@contextlib.contextmanager
def plain_value_errors():
    """Re-raise pydantic's ValidationError as a short plain ValueError.

    Ray cannot re-raise ValidationError on the caller's side (it cannot be subclassed), and HTTP
    clients want the message, not a dump of a 4096-float input.
    """
    try:
        yield
    except ValidationError as e:
        parts = []
        for err in e.errors(include_url=False, include_input=False):
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        raise ValueError("; ".join(parts)) from None


def _to_vector(value: Any) -> torch.Tensor:
    owned = False  # a tensor of our own already (no copy needed to stop the caller's edits reaching it)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", torch.float32)
    elif wire.is_encoded_tensor(value):  # the hot path: every change over the wire, every layer
        t, owned = wire.decode_tensor(value).to(torch.float32), True
    elif isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"vector must be numbers: {e}") from None
        if arr.dtype.kind not in "fiu":  # numpy would turn "1" into 1.0 and True into 1.0: a client bug
            raise ValueError(f"vector must be numbers, got {arr.dtype.kind!r} values like {arr.flat[0]!r}"
                             if arr.size else "vector must be 1-D and non-empty, got shape [0]")
        with np.errstate(over="ignore"):  # past float32's range becomes inf, refused just below
            t = torch.as_tensor(arr.astype(np.float32))
    else:
        raise ValueError(f"vector must be a tensor, array, list of floats or encoded tensor, not {type(value).__name__}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"vector must be 1-D and non-empty, got shape {list(t.shape)}")
    if not np.isfinite(t.numpy()).all():  # numpy: a fraction of torch's per-call cost at this size
        raise ValueError("vector contains NaN or Inf (or values past float32's range)")
    return t if owned and t.is_contiguous() else t.contiguous().clone()


Vector = Annotated[
    torch.Tensor,
    BeforeValidator(_to_vector),
    PlainSerializer(lambda t: t.tolist(), return_type=list[float], when_used="json"),
]


_F32_MAX = float(np.finfo(np.float32).max)


def finite(name: str, v: float | None) -> float | None:
    """The math runs in float32: a value finite in float64 but past float32's range would become inf there."""
    if v is not None and not (math.isfinite(v) and abs(v) <= _F32_MAX):
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {_F32_MAX:.4g}), got {v}")
    return v
