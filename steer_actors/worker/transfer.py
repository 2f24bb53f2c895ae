"""Host arrays onto the device from the thread that launches forwards, without making it wait."""

from __future__ import annotations

import numpy as np
import torch


def h2d(dst: torch.Tensor, src: np.ndarray) -> None:
    """Host array into a device buffer without stalling the host: a pinned copy, whose block the
    caching host allocator keeps until the async copy has run."""
    t = torch.from_numpy(src)
    if dst.is_cuda:
        dst.copy_(t.pin_memory(), non_blocking=True)
    else:
        dst.copy_(t)


def to_device(src: np.ndarray, device: torch.device) -> torch.Tensor:
    """A new device tensor from a host array, without waiting for the stream (see :func:`h2d`)."""
    t = torch.from_numpy(src)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
