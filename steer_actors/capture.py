"""Worker-side activation capture: ``h + r`` (after this layer's steering) for requested layers and
requests, labelled by absolute position and input token.

Graph-safe: the steering op itself writes captured rows into a buffer allocated at construction
(``[num_layers, rows_per_step, hidden]`` fp32), steered by a per-token destination index and per-layer
flags that the host fills before each forward. A CUDA graph replay runs the same kernel, so capture
works with graphs on. After the forward, the step's rows are gathered on the device (stream-ordered,
before the next step overwrites the buffer) and copied to host by a copy thread on a stream of its
own, so the copy overlaps the next step and the runner never waits for it.

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


@dataclass
class _Step:
    """One forward's captured rows for every capturing request in it (host tensors, maybe in flight)."""
    layers: list[int]
    rows: torch.Tensor  # [len(layers), n, H]
    positions: torch.Tensor  # [n]
    token_ids: torch.Tensor  # [n]
    pending: Any = None  # future of the device-to-host copy (GPU)

    def wait(self) -> None:
        if self.pending is not None:
            self.rows, self.positions, self.token_ids = self.pending.result()
            self.pending = None


@dataclass
class _Pending:
    layers: frozenset[int]
    parts: list[tuple[_Step, int, int]] = field(default_factory=list)  # (step, first row, end row)
    error: str | None = None


class CaptureStore:
    def __init__(self) -> None:
        self.wanted: dict[str, _Pending] = {}  # external request id -> what it accumulated
        # Device buffers shared by every layer (created on the construction-time device).
        self.buf: torch.Tensor | None = None  # [num_layers, rows, H] fp32
        self.dst: torch.Tensor | None = None  # [max_tokens] int32: row of buf for each token, -1 = none
        self.layer_on: torch.Tensor | None = None  # [num_layers] int32: capture this layer in this step
        self.any_on: torch.Tensor | None = None  # [1] int32: 0 = nothing captured in this step
        self._last_on = False
        self._step: tuple | None = None
        self._side: Any = None

    @property
    def rows_per_step(self) -> int:
        return 0 if self.buf is None else self.buf.shape[1]

    def buffers(self, num_layers: int, rows: int, hidden: int, max_tokens: int):
        if self.buf is None:
            self.buf = torch.zeros(num_layers, rows, hidden, dtype=torch.float32)
            self.dst = torch.full((max_tokens,), -1, dtype=torch.int32)
            self.layer_on = torch.zeros(num_layers, dtype=torch.int32)
            self.any_on = torch.zeros(1, dtype=torch.int32)
        return self.buf, self.dst, self.layer_on, self.any_on

    def register(self, request_id: str, layers: list[int]) -> None:
        if self.rows_per_step == 0:
            raise ValueError("this engine was started with capture disabled (capture_rows_per_step=0)")
        self.wanted[request_id] = _Pending(frozenset(int(x) for x in layers))

    def _match(self, internal_id: str) -> str | None:
        if internal_id in self.wanted:
            return internal_id
        # vLLM appends "-<random>" to the caller's request id
        base = internal_id.rsplit("-", 1)[0]
        return base if base in self.wanted else None

    def _off(self) -> None:
        if self._last_on:
            self.any_on.fill_(0)
            self._last_on = False

    def begin_step(self, req_ids: list[str], query_start_loc: np.ndarray, positions: torch.Tensor | None,
                   input_ids: torch.Tensor | None, num_padded: int | None = None) -> None:
        """Route this forward's tokens: which rows of the flat batch go to which buffer row."""
        self._step = None
        if not self.wanted or positions is None or self.buf is None:
            return self._off()
        picked, layout, n, cap = [], [], 0, self.rows_per_step
        for i, rid in enumerate(req_ids):
            ext = self._match(rid)
            if ext is None:
                continue
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            if n + end - start > cap:  # never silent: the request's take() reports it
                self.wanted[ext].error = (f"a step held more captured tokens than capture_rows_per_step={cap}; "
                                          f"raise it or lower max_num_batched_tokens")
                continue
            picked.append(np.arange(start, end))
            layout.append((ext, n, n + end - start))
            n += end - start
        if not picked:
            return self._off()
        rows = np.concatenate(picked)
        pos = positions.reshape(-1, positions.shape[-1])[-1] if positions.dim() > 1 else positions
        total = int(num_padded if num_padded is not None else pos.shape[0])
        dst = np.full(total, -1, dtype=np.int32)
        dst[rows] = np.arange(n, dtype=np.int32)
        h2d(self.dst[:total], dst)
        layers = sorted(set().union(*(self.wanted[ext].layers for ext, _, _ in layout)))
        on = np.zeros(self.layer_on.shape[0], dtype=np.int32)
        on[layers] = 1
        h2d(self.layer_on, on)
        if not self._last_on:
            self.any_on.fill_(1)
            self._last_on = True
        self._step = (layout, layers, to_device(rows, pos.device), pos, input_ids)

    def end_step(self) -> None:
        """After the forward is enqueued: snapshot the rows (device gather, stream-ordered before the next
        step's writes) and start their copy to host."""
        if self._step is None:
            return
        layout, layers, rows, pos, input_ids = self._step
        self._step = None
        n = rows.shape[0]
        snap = self.buf[to_device(np.asarray(layers, dtype=np.int64), self.buf.device), :n]
        p = pos[rows].to(torch.int64)
        t = input_ids[rows].to(torch.int64) if input_ids is not None else torch.full_like(p, -1)
        if snap.is_cuda:
            step = self._copy_async(layers, snap, p, t)
        else:
            step = _Step(layers, snap, p, t)
        for ext, a, b in layout:
            pend = self.wanted.get(ext)
            if pend is not None:
                pend.parts.append((step, a, b))

    def _copy_async(self, layers, snap, p, t) -> _Step:
        """Copy the snapshot to host on a copy thread and stream of its own: the runner's thread never
        waits for it, and the copy overlaps the next forward."""
        import torch

        if self._side is None:
            from concurrent.futures import ThreadPoolExecutor

            self._side = (torch.cuda.Stream(), ThreadPoolExecutor(1, thread_name_prefix="steer-capture-d2h"))
        stream, pool = self._side
        ready = torch.cuda.Event()
        ready.record()
        for x in (snap, p, t):
            x.record_stream(stream)  # the allocator keeps them until the copy stream is done

        def to_host():
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                out = tuple(x.to("cpu") for x in (snap, p, t))
            return out

        step = _Step(layers, snap, p, t)
        step.pending = pool.submit(to_host)
        return step

    def take(self, request_id: str, to_dir: str | None = None) -> dict[str, Any] | None:
        """Everything captured for ``request_id``, one row per absolute position (last copy wins),
        sorted by position; msgpack-safe. With ``to_dir`` (shared memory on the engine actor's node)
        the rows go to one file there, ``[layers, rows, hidden]`` fp32, and only its path travels."""
        from .channel import LOCK

        with LOCK:  # the runner's thread reads ``wanted`` every step; the rest is host-only work
            pend = self.wanted.pop(request_id, None)
        if pend is None:
            return None
        if pend.error:
            raise ValueError(f"capture of request {request_id} is incomplete: {pend.error}")
        if not pend.parts:
            return {"positions": [], "token_ids": [], "layers": {}, "recomputed": 0}
        for step, _, _ in pend.parts:
            step.wait()
        parts = pend.parts
        pos = torch.cat([s.positions[a:b] for s, a, b in parts]).numpy()
        toks = torch.cat([s.token_ids[a:b] for s, a, b in parts]).numpy()
        ids = sorted(pend.layers)
        in_order = bool(np.all(np.diff(pos) > 0))  # no position recomputed (preemption): rows go as they are
        if in_order:
            order = np.arange(len(pos))
        else:  # dedupe: a recomputed position keeps its newest row
            last = {int(p): i for i, p in enumerate(pos)}
            order = np.asarray([last[p] for p in sorted(last)], dtype=np.int64)
        out = {"positions": pos[order].tolist(), "token_ids": toks[order].tolist(),
               "recomputed": int(len(pos) - len(order))}
        shape = (len(ids), len(order), self.buf.shape[2] if self.buf is not None else parts[0][0].rows.shape[2])
        path = None
        if to_dir is not None:
            import os
            import uuid

            path = os.path.join(to_dir, f"steer-capture-{os.getpid()}-{uuid.uuid4().hex}.f32")
        try:
            # Rows go straight into their destination (the shared-memory file, else one array): one copy.
            arr = _shared_array(path, shape) if path and shape[1] else np.empty(shape, dtype=np.float32)
            if in_order:
                off = 0
                for s, a, b in parts:
                    rows = s.rows.numpy()
                    sel = [s.layers.index(layer) for layer in ids]
                    arr[:, off:off + b - a] = rows[:, a:b] if sel == list(range(rows.shape[0])) else rows[sel, a:b]
                    off += b - a
            else:
                for li, layer in enumerate(ids):
                    arr[li] = torch.cat([s.rows[s.layers.index(layer), a:b] for s, a, b in parts])[order].numpy()
            if path and shape[1]:
                del arr  # unmapped: the pages stay in the file
                out.update(file=path, layer_ids=ids, shape=list(shape))
                return out
        except OSError:  # shared memory full (containers often get 64 MB): send the bytes instead
            import os

            if path and os.path.exists(path):
                os.unlink(path)
            arr = np.empty(shape, dtype=np.float32)
            for li, layer in enumerate(ids):
                arr[li] = torch.cat([s.rows[s.layers.index(layer), a:b] for s, a, b in parts])[order].numpy()
        out["layers"] = {str(layer): wire.encode_tensor(torch.from_numpy(arr[i])) for i, layer in enumerate(ids)}
        return out

    def drop(self, request_id: str) -> None:
        self.wanted.pop(request_id, None)


def _shared_array(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array mapped on a new file, its space reserved first: a full tmpfs then raises
    ``OSError`` here rather than SIGBUS at the first write into a page it cannot back."""
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, int(np.prod(shape)) * 4)
    finally:
        os.close(fd)
    return np.memmap(path, dtype=np.float32, mode="r+", shape=shape)


STORE = CaptureStore()
