"""msgpack-safe encoding of tensors and payloads: bytes + shape + dtype, never pickle."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import torch

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int32": np.int32, "int64": np.int64}


def encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return {"data": t.view(torch.int16).numpy().tobytes(), "shape": list(t.shape), "dtype": "bfloat16"}
    arr = t.numpy()
    return {"data": arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(), "shape": list(t.shape),
            "dtype": str(arr.dtype)}


def is_encoded_tensor(obj: Any) -> bool:
    return isinstance(obj, dict) and {"data", "shape", "dtype"} <= obj.keys()


def decode_tensor(obj: dict[str, Any]) -> torch.Tensor:
    try:
        dtype, shape, data = obj["dtype"], [int(d) for d in obj["shape"]], obj["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed tensor payload: {e}") from None
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError("tensor payload 'data' must be bytes")
    np_dtype = np.int16 if dtype == "bfloat16" else _DTYPES[dtype]
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if len(data) != expected:
        raise ValueError(f"tensor payload has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    arr = np.frombuffer(bytes(data), dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)
    t = torch.from_numpy(arr.astype(np_dtype, copy=True))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"malformed msgpack body: {e}") from None
