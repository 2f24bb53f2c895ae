"""Decoder-layer patch: installs a :class:`LayerSteerer` in each steerable layer at construction, and packs
changes to the layers' rows (:func:`pack_rows`).

The patch is inert for stock engines: a layer gets a steerer only when the engine was started with
``additional_config["steer_actors"]`` (see :mod:`steer_actors.vllm_compat`), and only for the layers
listed there, so unpatched layers and stock vLLM pay nothing. Every steerer of a worker shares one
:class:`~steer_actors.worker.runtime.WorkerRuntime` (found by the config being built, see there).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steer_actors import row_dtype, vllm_compat
from steer_actors.ops.kernel import steer_residual_
from steer_actors.ops.rows import pack_flat
from steer_actors.worker import runtime as worker_runtime
from steer_actors.worker.runtime import WorkerRuntime

_PATCHED_ATTR = "__steer_actors_patched__"


class LayerSteerer(nn.Module):
    """Per-layer steering state: K op slots in fp32 buffers allocated once and updated in place.

    Allocated at construction, never lazily, because torch.compile and CUDA graphs freeze tensors
    created inside the first forward; in-place ``copy_`` into these buffers is seen by both.
    """

    def __init__(self, runtime: WorkerRuntime, layer_idx: int, hidden: int, num_slots: int, request_slots: int = 0,
                 max_tokens: int = 8192, num_layers: int | None = None, capture_rows: int = 0,
                 capture_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.runtime = runtime  # a plain attribute: not a submodule, never moved with the layer's buffers
        self.layer_idx = layer_idx
        self.hidden = hidden
        self.num_slots = num_slots
        f32 = dict(dtype=torch.float32)
        # Global rows in two copies: a change is written into the one no forward reads, and the shared
        # selector switches at a forward's start (see double_buffer).
        self.register_buffer("add", torch.zeros(2, num_slots, hidden, **f32), persistent=False)
        self.register_buffer("unit", torch.zeros(2, num_slots, hidden, **f32), persistent=False)
        self.register_buffer("lo", torch.full((2, num_slots), -math.inf, **f32), persistent=False)
        self.register_buffer("hi", torch.full((2, num_slots), math.inf, **f32), persistent=False)
        self.register_buffer("gamma", torch.ones(2, num_slots, **f32), persistent=False)
        # 0 while the copy has no ops: the op then does no work (read on the device at replay time).
        # float32 (a flag, 0 or 1), so a change's flags travel in the same float32 buffer as its rows
        self.register_buffer("active", torch.zeros(2, dtype=torch.float32), persistent=False)
        self.register_buffer("sel", runtime.selector.buffer(), persistent=False)
        # Per-request specs: S = request_slots + 1 tables of K ops (slot 0 = identity), applied after the
        # global ops to the tokens the shared per-token slot index routes to them.
        S = request_slots + 1
        self.request_slots = request_slots
        self.register_buffer("radd", torch.zeros(S, num_slots, hidden, **f32), persistent=False)
        self.register_buffer("runit", torch.zeros(S, num_slots, hidden, **f32), persistent=False)
        self.register_buffer("rlo", torch.full((S, num_slots), -math.inf, **f32), persistent=False)
        self.register_buffer("rhi", torch.full((S, num_slots), math.inf, **f32), persistent=False)
        self.register_buffer("rgamma", torch.ones(S, num_slots, **f32), persistent=False)
        slot_idx, any_bound = runtime.router.buffers(max_tokens)
        self.register_buffer("slot_idx", slot_idx, persistent=False)
        self.register_buffer("any_bound", any_bound, persistent=False)
        # Capture: this layer's view of the shared capture buffer and flag (see steer_actors.worker.capture.store).
        buf, dst, layer_on, any_on = runtime.store.buffers(num_layers or layer_idx + 1, capture_rows, hidden,
                                                           max_tokens, capture_dtype)
        self.register_buffer("cap_buf", buf[layer_idx], persistent=False)
        self.register_buffer("cap_dst", dst, persistent=False)
        self.register_buffer("cap_on", layer_on[layer_idx:layer_idx + 1], persistent=False)
        self.register_buffer("cap_any", any_on, persistent=False)

    def forward(self, delta: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steer_residual_(delta, residual, self.add, self.unit, self.lo, self.hi, self.gamma, self.active, self.sel,
                        self.radd, self.runit, self.rlo, self.rhi, self.rgamma, self.slot_idx, self.any_bound,
                        self.cap_buf, self.cap_dst, self.cap_on, self.cap_any)
        return delta, residual

    _ROWS = ("add", "unit", "lo", "hi", "gamma")  # the order of ops.ops_to_flat

    def flat_views(self, table: tuple[str, int]) -> list[torch.Tensor]:
        """1-D views of a table's rows in the order of :func:`~steer_actors.ops.rows.ops_to_flat`, and last its
        active flag for a global copy: ``("global", copy)`` or ``("request", slot)``. Made once per table
        (every torch call here lets go of the GIL, which the runner's thread then holds), remade if the
        buffers ever moved."""
        cache = self.__dict__.setdefault("_flat_views", {})
        kind, i = table
        ptr = (self.add if kind == "global" else self.radd).data_ptr()
        got = cache.get(table)
        if got is None or got[0] != ptr:
            names = self._ROWS if kind == "global" else ["r" + n for n in self._ROWS]
            views = [getattr(self, n)[i].view(-1) for n in names]
            if kind == "global":
                views.append(self.active[i:i + 1])
            got = cache[table] = (ptr, views)
        return got[1]


@dataclass
class PackedRows:
    """A change to several layer tables, packed on the host (outside the forward lock) for a few copies."""

    targets: list[LayerSteerer]
    table: tuple[str, int]  # ("global", copy) or ("request", slot): see LayerSteerer.flat_views
    flat: torch.Tensor  # fp32, pinned on CUDA: each table's rows as ops.ops_to_flat lays them out, then (global
    # copies only) each layer's active flag


def pack_rows(items: list[tuple[LayerSteerer, Any, bool]], table: tuple[str, int]) -> PackedRows | None:
    """``items``: (layer, its rows: as :func:`~steer_actors.ops.rows.ops_to_flat` lays them out, compact
    (:class:`~steer_actors.ops.rows.CompactRows`) or None for none, active). Numpy until one tensor: the thread
    packing shares the GIL with the thread launching forwards."""
    if not items:
        return None
    n_flags = len(items) if table[0] == "global" else 0
    flat = pack_flat([rows for _, rows, _ in items], items[0][0].num_slots, items[0][0].hidden, tail=n_flags)
    if n_flags:
        flat[-n_flags:] = [float(a) for _, _, a in items]
    flat = torch.from_numpy(flat)
    if items[0][0].add.is_cuda:
        flat = flat.pin_memory()
    return PackedRows([layer for layer, _, _ in items], table, flat)


def _wrap_init(orig_init):
    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        cfg = vllm_compat.steering_config_at_construction()
        if cfg is None:
            return
        idx = vllm_compat.layer_index_from_prefix(kwargs.get("prefix", ""))
        layers = cfg.get("layers")
        if idx is None or (layers is not None and idx not in layers):
            return
        capture_rows = cfg.get("capture_rows")
        if capture_rows is None:  # a step never holds more tokens than the scheduler's budget
            capture_rows = vllm_compat.scheduler_tokens_at_construction()
        if vllm_compat.tp_rank_at_construction() != 0:  # only TP rank 0 captures: no buffer elsewhere
            capture_rows = 0
        runtime = worker_runtime.for_config(vllm_compat.vllm_config_at_construction())
        self.steerer = LayerSteerer(runtime, idx, vllm_compat.hidden_size_at_construction(self), int(cfg["max_ops_per_layer"]),
                                    int(cfg.get("request_slots", 0)), vllm_compat.max_batched_tokens_at_construction(),
                                    vllm_compat.num_layers_at_construction(), int(capture_rows),
                                    # vLLM builds the model under its dtype as torch's default
                                    row_dtype.resolve(cfg.get("capture_dtype"), torch.get_default_dtype()))

    return __init__


def _wrap_forward(orig_forward):
    @functools.wraps(orig_forward)
    def forward(self, *args, **kwargs):
        out = orig_forward(self, *args, **kwargs)
        steerer = self.__dict__.get("_modules", {}).get("steerer")
        # A patched subclass whose forward calls a patched base's forward steers once, at the outermost.
        if steerer is None or type(self).forward is not forward:
            return out
        return steerer(*out)

    return forward


def install() -> list[str]:
    """Patch every known decoder-layer class once per process; returns the names patched."""
    patched = []
    for cls in vllm_compat.decoder_layer_classes():
        if cls.__dict__.get(_PATCHED_ATTR):
            continue
        if "__init__" in cls.__dict__:
            cls.__init__ = _wrap_init(cls.__dict__["__init__"])
        if "forward" in cls.__dict__:
            cls.forward = _wrap_forward(cls.__dict__["forward"])
        setattr(cls, _PATCHED_ATTR, True)
        patched.append(cls.__qualname__)
    return patched


def steerers(model: nn.Module) -> dict[int, LayerSteerer]:
    return {m.layer_idx: m for m in model.modules() if isinstance(m, LayerSteerer)}
