"""Worker-side activation capture: copies ``h + r`` (after this layer's steering) for requested layers
and requests, labelled by absolute position and input token.

The flat batch is sliced per request from the model runner's own batch order and query start
locations (never ``len(prompt)``); rows accumulate by absolute position across chunked-prefill steps,
and positions recomputed after a preemption overwrite the earlier copy. Only TP rank 0 captures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import wire


@dataclass
class _Pending:
    layers: frozenset[int]
    positions: list[np.ndarray] = field(default_factory=list)
    token_ids: list[np.ndarray] = field(default_factory=list)
    rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)


class CaptureStore:
    def __init__(self) -> None:
        self.wanted: dict[str, _Pending] = {}  # external request id -> what it accumulated
        self.active = False
        self._rows: torch.Tensor | None = None  # rows of this step's flat batch that any capture wants
        self._layout: list[tuple[str, int, int]] = []  # (request id, start, end) into the selected rows
        self._step_layers: set[int] = set()
        self._step: dict[int, torch.Tensor] = {}
        self._positions: np.ndarray | None = None
        self._tokens: np.ndarray | None = None

    def register(self, request_id: str, layers: list[int]) -> None:
        self.wanted[request_id] = _Pending(frozenset(int(x) for x in layers))

    def _match(self, internal_id: str) -> str | None:
        if internal_id in self.wanted:
            return internal_id
        # vLLM appends "-<random>" to the caller's request id
        base = internal_id.rsplit("-", 1)[0]
        return base if base in self.wanted else None

    def begin_step(self, req_ids: list[str], query_start_loc: np.ndarray, positions: torch.Tensor | None,
                   input_ids: torch.Tensor | None) -> None:
        self.active = False
        if not self.wanted or positions is None:
            return
        picked, layout, n = [], [], 0
        for i, rid in enumerate(req_ids):
            ext = self._match(rid)
            if ext is None:
                continue
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            picked.append(np.arange(start, end))
            layout.append((ext, n, n + end - start))
            n += end - start
        if not picked:
            return
        rows = np.concatenate(picked)
        pos = positions.reshape(-1, positions.shape[-1])[-1] if positions.dim() > 1 else positions
        self._rows = torch.from_numpy(rows).to(pos.device)
        self._positions = pos[self._rows].cpu().numpy()
        self._tokens = input_ids[self._rows].cpu().numpy() if input_ids is not None else np.full(len(rows), -1)
        self._layout = layout
        self._step_layers = set().union(*(self.wanted[ext].layers for ext, _, _ in layout))
        self._step = {}
        self.active = True

    def record(self, layer: int, delta: torch.Tensor, residual: torch.Tensor) -> None:
        """Called inside the layer op, after steering: copy now, the next layer's fused add-norm
        overwrites both tensors in place."""
        if layer in self._step_layers:
            rows = self._rows
            self._step[layer] = (delta[rows].float() + residual[rows].float()).cpu()

    def end_step(self) -> None:
        if not self.active:
            return
        for ext, a, b in self._layout:
            pend = self.wanted.get(ext)
            if pend is None:
                continue
            pend.positions.append(self._positions[a:b])
            pend.token_ids.append(self._tokens[a:b])
            for layer in pend.layers:
                if layer in self._step:
                    pend.rows.setdefault(layer, []).append(self._step[layer][a:b])
        self.active, self._step, self._rows = False, {}, None

    def take(self, request_id: str) -> dict[str, Any] | None:
        """Everything captured for ``request_id``, one row per absolute position (last copy wins),
        sorted by position; msgpack-safe."""
        pend = self.wanted.pop(request_id, None)
        if pend is None:
            return None
        if not pend.positions:
            return {"positions": [], "token_ids": [], "layers": {}}
        pos = np.concatenate(pend.positions)
        toks = np.concatenate(pend.token_ids)
        last = {int(p): i for i, p in enumerate(pos)}  # dedupe: a recomputed position keeps its newest row
        order = [last[p] for p in sorted(last)]
        idx = torch.as_tensor(order, dtype=torch.long)
        layers = {str(layer): wire.encode_tensor(torch.cat(chunks)[idx]) for layer, chunks in pend.rows.items()}
        return {"positions": [int(pos[i]) for i in order], "token_ids": [int(toks[i]) for i in order],
                "layers": layers}

    def drop(self, request_id: str) -> None:
        self.wanted.pop(request_id, None)


STORE = CaptureStore()
