"""What a captured row is stored as: the model's own dtype by default (``capture_dtype="model"``), float32 on
request. A bf16 model's residual stream is bf16 between layers (vLLM's fused add + norm writes the residual
rounded), so its rows lose nothing in bf16, and half the bytes cross PCIe, fill shared memory and the object
store. numpy has no bfloat16: such rows are kept as int16 bit patterns on the host and in the object store,
and become bfloat16 tensors again where they are read (:func:`as_tensor`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"captures are stored as one of {sorted(DTYPES)}, not {dtype}")


def resolve(setting: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """``capture_dtype``: "model" (the model's dtype where it is a float type captures can hold, else
    float32) or a dtype's name."""
    if setting in (None, "model"):
        return model_dtype if model_dtype in DTYPES.values() else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"capture_dtype must be 'model' or one of {sorted(DTYPES)}, not {setting!r}")
    return DTYPES[setting]


def storage(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a row's host bytes."""
    return np.dtype(np.int16) if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def as_storage(t: torch.Tensor) -> np.ndarray:
    """A host tensor's bytes as numpy (a view, no copy)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def as_tensor(arr: Any, dtype: str | torch.dtype) -> torch.Tensor:
    """Host bytes (numpy, storage dtype) as a tensor of ``dtype`` (a view, no copy)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if np.dtype(arr.dtype) != storage(dtype):  # a view of other bytes would silently change the row length
        raise ValueError(f"{dtype} rows are stored as {storage(dtype)}, not {arr.dtype}")
    t = torch.from_numpy(arr)
    return t.view(dtype) if t.dtype != dtype else t
