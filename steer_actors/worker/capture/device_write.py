"""Captured rows written by the GPU straight into the capture arena's host pages.

The host path (device -> pinned staging -> a host thread scattering rows into the arena) costs the
worker's host a copy of every captured byte, on a thread that contends for the GIL with the one that
launches forwards: on an H100 with 512 all-layer captures in flight it ran at a tenth of stock speed.
Here the arena's pages are registered with CUDA (pinned, mapped into the device's address space), and a
scatter on a side stream writes each captured row from the step's device snapshot to its place in the
request's region over PCIe, and beside the rows which positions landed and their tokens
(:func:`write_run`): the host keeps no books per step.

Mapped writes need the device to address host memory at the host's own addresses (unified addressing
with ``canUseHostPointerForRegisteredMem``); a mapper that cannot check that, or whose self-test write
does not land, reports itself unavailable and the arena stays on the host path. A row is only ever
written where the segment is registered: registration follows the segment's reserved rows, and a step
whose segments are not all mapped takes the host path.
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import numpy as np
import torch

from steer_actors import envs, row_dtype

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91  # CUdevice_attribute
_PORTABLE_MAPPED = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def enabled(device: torch.device, mode: str) -> bool:
    """Whether captures on ``device`` take the direct path, under ``mode`` (``envs.STEER_CAPTURE_DIRECT``): on a
    GPU unless ``0`` (the host path); ``always`` runs the same logic on a CPU engine too (tests)."""
    return mode == "always" or (device.type == "cuda" and mode != "0")


class HostMapper:
    """Registers host ranges with one device and gives device tensors over them. On a CPU device (tests)
    the "device" tensor is the host memory itself, so the scatter logic runs unchanged."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ok = (not self.cuda) or _host_pointers_usable(self.device)

    def register(self, ptr: int, nbytes: int) -> bool:
        """Pin and map ``[ptr, ptr + nbytes)`` (page-aligned by the caller). False if the driver refused."""
        if not self.cuda or nbytes <= 0:
            return True
        with torch.cuda.device(self.device):
            err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, _PORTABLE_MAPPED)
        if int(err) != 0:
            log.warning("capture arena: cudaHostRegister of %d bytes failed (%s); captures take the host path",
                        nbytes, err)
            return False
        return True

    def view(self, array: np.ndarray) -> torch.Tensor:
        """A tensor on the device over ``array``'s memory (whose first page must be registered)."""
        if not self.cuda:
            return torch.from_numpy(array)
        ptr = array.ctypes.data
        iface = {"shape": tuple(array.shape), "typestr": array.dtype.str, "data": (ptr, False), "version": 3,
                 "strides": None}
        holder = type("MappedRows", (), {"__cuda_array_interface__": iface, "array": array})()
        with torch.cuda.device(self.device):
            return torch.as_tensor(holder, device=self.device)

    def self_test(self, rows: torch.Tensor, array: np.ndarray, row: int) -> bool:
        """Write a row from the device and read it on the host: the mapping works end to end."""
        if not self.cuda:
            return True
        probe = torch.arange(rows.shape[1], dtype=rows.dtype, device=self.device) + 0.5
        try:
            rows[row].copy_(probe)
            torch.cuda.synchronize(self.device)
            good = bool(np.array_equal(array[row], row_dtype.as_storage(probe.cpu())))
        except RuntimeError as e:
            log.warning("capture arena: device write into host memory failed (%s); captures take the host path", e)
            return False
        if not good:
            log.warning("capture arena: a device write did not reach host memory; captures take the host path")
        return good


def _host_pointers_usable(device: torch.device) -> bool:
    """The device addresses registered host memory at its host address (so one tensor spans every
    registration of a segment)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        dev, val = ctypes.c_int(), ctypes.c_int()
        torch.cuda.init()
        if lib.cuDeviceGet(ctypes.byref(dev), device.index or 0) != 0:
            return False
        rc = lib.cuDeviceGetAttribute(ctypes.byref(val), _CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, dev)
        return rc == 0 and val.value == 1
    except (OSError, AttributeError, RuntimeError):
        return False


def page_end(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


NOT_KEPT = -(1 << 40)  # an offset that stays negative whatever position is added to it


def dest_offsets(run: list, layers: list[int], same: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the requests of ``run`` ((pend, first token, end token) each, tokens consecutive): the segment row
    of position 0 of each (step layer, token), :data:`NOT_KEPT` where that request does not capture that layer
    ([len(layers), tokens] int64), and each token's request's ``max_rows`` and region base ([tokens])."""
    counts = np.fromiter((b - a for _, a, b in run), np.int64, len(run))
    base = np.repeat(np.fromiter((p.region.base for p, _, _ in run), np.int64, len(run)), counts)
    maxr = np.repeat(np.fromiter((p.max_rows for p, _, _ in run), np.int64, len(run)), counts)
    if same:  # every request captures every layer of the step: layer-major regions
        return base[None, :] + np.arange(len(layers), dtype=np.int64)[:, None] * maxr[None, :], maxr, base
    off = np.full((len(layers), int(counts.sum())), NOT_KEPT, dtype=np.int64)
    slot_of = {layer: j for j, layer in enumerate(layers)}
    t0 = run[0][1]
    for pend, a, b in run:
        for s, layer in enumerate(pend.layers):
            off[slot_of[layer], a - t0:b - t0] = pend.region.base + s * pend.max_rows
    return off, maxr, base


def scatter_rows(dest: torch.Tensor, snap: torch.Tensor, pos: torch.Tensor, a: int, b: int, off: torch.Tensor,
                 maxr: torch.Tensor, trash: int, kernel: bool = True, programs: int = 8) -> None:
    """``dest[off + pos] = snap[:, a:b]`` for the step's tokens ``a:b`` by the bounded Triton kernel below
    (``kernel``, where Triton runs: see :func:`kernel_usable`), else torch's ``index_copy_``; rows a request
    does not keep (a layer it does not capture, a position past its ``max_rows``) are not written (the torch
    form sends them to the segment's ``trash`` row). Everything stays on the device: no sync, nothing the host
    waits for.

    Not the runtime's write (:func:`write_run` uses ``index_copy_``): in a serving engine on an H100 (0.6B,
    all-layer captures, 128 prompts) the 8-program kernel gave 0.63 of uncaptured throughput against 0.69 for
    ``index_copy_``, its Python launch path costing the runner's thread more than the torch ops do. It is kept
    for benchmarks of the scatter alone, where it slows a busy GPU least.

    ``programs``: few. Its stores go over PCIe and stall when the link is full; a kernel with a program per row
    holds every SM while it waits, and the next forward with it. Measured on an H100 (a matmul beside the
    scatter): index_copy_ slowed it 1.9x (decode step) / 3.5x (8192-token prefill step), 32 programs 1.05x /
    2.0x, 8 programs 1.14x / 1.12x at 25-30 GB/s, several times what capturing every layer of a full batch
    needs."""
    if kernel and kernel_usable(snap):
        n_items = off.numel()
        if n_items:
            grid = (min(n_items, max(1, programs)),)
            _scatter_kernel[grid](snap, pos, off, maxr, dest, a, off.shape[1], snap.shape[1], n_items,
                                  snap.shape[2], BLOCK_H=triton.next_power_of_2(snap.shape[2]), num_warps=4)
        return
    p = pos[a:b]
    idx = off + p[None, :]
    keep = (off >= 0) & (p < maxr)[None, :]
    idx = torch.where(keep, idx, trash)
    dest.index_copy_(0, idx.reshape(-1), snap[:, a:b].reshape(-1, snap.shape[-1]))


def write_run(dest: torch.Tensor, counts: torch.Tensor, tokens: torch.Tensor, snap: torch.Tensor, p: torch.Tensor,
              tok: torch.Tensor, a: int, b: int, offb: torch.Tensor, maxr: torch.Tensor, same: bool) -> None:
    """Tokens ``a:b`` of a step (a run of requests in one segment): their rows and, beside them, each kept
    position's count and input token (int32 both; see :class:`~steer_actors.worker.capture.arena.Segment`).
    ``offb``: [layers + 1, b - a], :func:`dest_offsets`' offsets then the region bases (one add places
    both). Rows a request does not keep (a layer it does not capture, a position past its ``max_rows``) go to
    row 0, the segment's trash row. Each (request, position) is in a step once, so the count's read-add-write
    needs no atomics (mapped host memory has none to offer). A handful of launches: this runs on the thread
    that launches forwards, every step."""
    pr = p[a:b]
    t = torch.where(pr < maxr, offb + pr, 0)
    if not same:
        t.clamp_(min=0)  # NOT_KEPT offsets
    idx, m = t[:-1], t[-1]
    src = snap if a == 0 and b == snap.shape[1] else snap[:, a:b]
    dest.index_copy_(0, idx.reshape(-1), src.reshape(-1, snap.shape[-1]))
    counts.index_copy_(0, m, counts.index_select(0, m) + 1)
    tokens.index_copy_(0, m, tok[a:b])


_INTERPRET = envs.TRITON_INTERPRET  # read once: Triton's interpreter runs the kernel on a CPU (tests)


def kernel_usable(snap: torch.Tensor) -> bool:
    """Triton is installed and can run the kernel on ``snap``'s device (a GPU, or a CPU under its
    interpreter)."""
    return triton is not None and (snap.is_cuda or _INTERPRET)


if triton is not None:

    # the step's sizes change every step: specializing on them (==1, divisible by 16) would compile up to 81
    # variants, each on the runner's thread mid-serving
    @triton.jit(do_not_specialize=["a", "n_run", "n_step", "n_items"])
    def _scatter_kernel(snap_ptr, pos_ptr, off_ptr, maxr_ptr, dest_ptr, a, n_run, n_step, n_items, H,
                        BLOCK_H: tl.constexpr):
        """Item ``i`` = (step layer ``i // n_run``, run token ``i % n_run``): its row of the snapshot
        ([layers, n_step, H]) to segment row ``off + pos`` when kept."""
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        for i in range(tl.program_id(0), n_items, tl.num_programs(0)):
            j = i // n_run
            t = i - j * n_run
            o = tl.load(off_ptr + i)
            p = tl.load(pos_ptr + a + t)
            if (o >= 0) & (p < tl.load(maxr_ptr + t)):
                src = (j.to(tl.int64) * n_step + a + t) * H
                row = tl.load(snap_ptr + src + cols, mask=mask)
                tl.store(dest_ptr + (o + p) * H + cols, row, mask=mask)
