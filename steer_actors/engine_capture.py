"""The engine actor's side of activation capture: registering requests with the workers, taking their
rows when they finish, and handing them to the object store (see :mod:`steer_actors.capture` for the
worker side). Mixed into :class:`steer_actors.engine.SteerEngine`, whose state it uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from .results import GenerationResult


class EngineCaptureMixin:
    async def _start_capture(self, prompts, params, layers: list[int], ids: list[str]) -> int:
        info = await self.info()
        bad = sorted(set(layers) - set(info["steerable_layers"]))
        if bad:
            raise ValueError(f"cannot capture layers {bad}: capturable layers are {info['steerable_layers']}")
        n_tokens = [len(p) if isinstance(p, list) else len(self.tokenizer()(p).input_ids) for p in prompts]
        # rows a request can have: prompt + max_tokens (vLLM runs an unset max_tokens to the model's length)
        max_len = int(self.engine.vllm_config.model_config.max_model_len)
        rows = [min(max_len, n + params.max_tokens) if params.max_tokens else max(max_len, n) for n in n_tokens]
        need = sum(rows) * len(set(layers)) * self.hidden_size * 4
        self.captures.reserve(need)
        try:
            import socket

            await self._workers("steer_capture_register", [(rid, sorted(set(layers)), r)
                                                           for rid, r in zip(ids, rows)], socket.gethostname())
        except BaseException:
            self.captures.unreserve(need)
            raise
        return need

    async def _finish_capture(self, results: list[GenerationResult], ids: list[str]) -> None:
        take = asyncio.ensure_future(self._workers("steer_capture_take", ids))
        try:
            ranks = await asyncio.shield(take)
        except asyncio.CancelledError:  # the files the take hands over still need an owner: nobody wants them
            take.add_done_callback(_unlink_taken)
            raise
        taken = next(t for t in ranks if t is not None)
        me = _current_actor()
        handed: set[str] = set()  # files a materialize task now owns (and removes)
        eager = []
        stored: list[str] = []
        try:
            for res, rid in zip(results, ids):
                data = taken[rid]
                if "error" in data:
                    raise ValueError(data["error"])
                self._recomputed_rows += data.get("recomputed", 0)
                # rows past prompt + generated - 1 (e.g. rejected speculative drafts) are not the sequence
                expected = len(res.prompt_token_ids) + len(res.token_ids) - 1
                keep = sum(p < expected for p in data["positions"])
                positions, tokens = data["positions"][:keep], data["token_ids"][:keep]
                if positions != list(range(expected)):  # never a silently short capture
                    raise ValueError(f"capture of request {rid} is incomplete: {keep} of {expected} positions "
                                     f"were captured")
                if me is None or "file" not in data:
                    eager.append((res, rid, data, keep))
                    continue
                # A task of this actor copies the rows into the object store: its refs exist now, so the
                # response does not wait for the copy (all-layer captures are tens of MB per request),
                # and a fetch waits only for its own rows.
                layer_ids = data["layer_ids"]
                refs = me.materialize_capture.options(num_returns=len(layer_ids)).remote(
                    data["file"], data["shape"], positions)
                handed.add(data["file"])
                refs = [refs] if len(layer_ids) == 1 else list(refs)
                nbytes = len(layer_ids) * keep * int(data["shape"][2]) * 4
                res.captures = self.captures.put_refs(rid, dict(zip(layer_ids, refs)), positions, tokens, nbytes)
                stored.append(rid)

            def store() -> None:  # copies into the object store: off the event loop, which serves every request
                for res, rid, data, keep in eager:
                    layers = {layer: t[:keep] for layer, t in _capture_layers(data).items()}
                    res.captures = self.captures.put(rid, layers, data["positions"][:keep], data["token_ids"][:keep])
                    stored.append(rid)

            if eager:
                await asyncio.to_thread(store)
        except BaseException:
            self.captures.release(stored)  # the call fails whole: no entry of it lingers against the budget
            raise
        finally:
            for data in taken.values():
                if data.get("file") and data["file"] not in handed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(data["file"])

    async def materialize_capture(self, path: str, shape: list[int], positions: list[int]) -> Any:
        """The rows of one capture file as one array per layer (this task's return values are the
        capture's object-store entries); removes the file."""
        import numpy as np

        name = os.path.basename(path)
        if os.path.dirname(path) != "/dev/shm" or not (name.startswith("steer-capture-") and name.endswith(".f32")):
            raise ValueError(f"not a capture file: {path!r}")
        try:
            arr = np.memmap(path, dtype=np.float32, mode="r", shape=tuple(shape))
            rows = slice(0, len(positions)) if not positions or positions[-1] == len(positions) - 1 \
                else np.asarray(positions)
            out = tuple(np.asarray(arr[i, rows]) for i in range(shape[0]))  # views (contiguous rows); Ray's put copies
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # the mapping stays valid until the arrays are stored
        return out if len(out) > 1 else out[0]

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        return await self.captures.get(capture_id)

    async def release_captures(self, capture_ids: list[str]) -> int:
        return self.captures.release(capture_ids)

    async def capture_stats(self) -> dict[str, int]:
        self.captures.prune()
        # rows computed twice (preemption by recompute) and deduplicated by position
        return {**self.captures.stats(), "recomputed_rows": self._recomputed_rows}


def _capture_layers(data: dict[str, Any]) -> dict[int, Any]:
    """A worker's capture payload: inline tensors, or one shared-memory file of [layers, position, hidden]."""
    import numpy as np
    import torch

    from .wire import decode_tensor

    if "file" in data:
        # rows by absolute position, mapped rather than read: the object store's put is the one copy here
        arr = np.memmap(data["file"], dtype=np.float32, mode="r+", shape=tuple(data["shape"]))
        pos = data["positions"]
        rows = slice(0, len(pos)) if not pos or pos[-1] == len(pos) - 1 else np.asarray(pos)
        return {int(layer): torch.from_numpy(arr[i, rows]) for i, layer in enumerate(data["layer_ids"])}
    return {int(k): decode_tensor(v) for k, v in data["layers"].items()}


def _unlink_taken(take: asyncio.Future) -> None:
    if take.cancelled() or take.exception() is not None:
        return
    for rank in take.result():
        for data in (rank or {}).values():
            if data.get("file"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(data["file"])


def _current_actor() -> Any:
    """This engine's own actor handle, or None when it runs in-process (no actor to queue tasks on)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None
