"""Per-request steering: which request-spec slot each token of the flat batch uses.

Every steerable layer holds a table of request slots (slot 0 = identity) next to its global ops. A
per-token slot index, one buffer shared by all layers and allocated at construction, is filled on the
host before each forward from the model runner's own batch order, so one captured graph serves any
mix of requests.
"""

from __future__ import annotations

import numpy as np
import torch

from steer_actors.worker.transfer import h2d


class Router:
    def __init__(self) -> None:
        self.bindings: dict[str, int] = {}  # external request id -> slot
        self.slot_idx: torch.Tensor | None = None  # [max_tokens] int32, shared by every layer
        self.any_bound: torch.Tensor | None = None  # [1] int32: 0 = no token of this batch uses a slot
        self._last_any = False

    def buffers(self, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared buffers, created on the current (construction-time) device on first use."""
        if self.slot_idx is None:
            self.slot_idx = torch.zeros(max_tokens, dtype=torch.int32)
            self.any_bound = torch.zeros(1, dtype=torch.int32)
        return self.slot_idx, self.any_bound

    def bind(self, pairs: list[tuple[str, int]]) -> None:
        for rid, slot in pairs:
            self.bindings[rid] = int(slot)

    def unbind(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.bindings.pop(rid, None)

    def _slot(self, internal_id: str) -> int:
        slot = self.bindings.get(internal_id)
        if slot is None:  # vLLM appends "-<random>" to the caller's request id
            slot = self.bindings.get(internal_id.rsplit("-", 1)[0], 0)
        return slot

    def begin_step(self, req_ids: list[str], query_start_loc: np.ndarray, positions=None, input_ids=None,
                   num_padded=None) -> None:
        if self.slot_idx is None:
            return
        slots = np.array([self._slot(r) for r in req_ids], dtype=np.int32) if self.bindings else None
        if slots is None or not slots.any():
            if self._last_any:
                self.any_bound.fill_(0)
                self._last_any = False
            return
        per_token = np.repeat(slots, np.diff(query_start_loc[: len(req_ids) + 1]))
        if len(per_token) > self.slot_idx.numel():
            raise RuntimeError(f"batch of {len(per_token)} tokens exceeds the routing buffer")
        h2d(self.slot_idx[: len(per_token)], per_token)  # padding tokens keep stale slots: harmless
        if not self._last_any:
            self.any_bound.fill_(1)
            self._last_any = True

    def end_step(self) -> None:
        pass

