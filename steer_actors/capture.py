"""Worker-side activation capture: ``h + r`` (after this layer's steering) for requested layers and
requests, labelled by absolute position and input token.

Graph-safe: the steering op itself writes captured rows into a buffer allocated at construction
(``[num_layers, rows_per_step, hidden]`` fp32), steered by a per-token destination index and per-layer
flags that the host fills before each forward. A CUDA graph replay runs the same kernel, so capture
works with graphs on. After the forward, the step's rows are gathered on the device (stream-ordered,
before the next step overwrites the buffer); a copy thread (own CUDA stream) brings them to host and
writes each request's rows at their positions in that request's destination: a shared-memory file on the
engine actor's host (else host memory). The copy overlaps the next step, the runner never waits for it,
and a finished request has nothing left to assemble: only the file's path travels.

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
class _Pending:
    """One capturing request: its rows land in ``dest`` by absolute position as steps complete, so
    nothing is left to assemble when it finishes (the newest copy of a recomputed position wins)."""
    layers: list[int]  # sorted
    dest: np.ndarray  # [len(layers), max_rows, H] fp32: a file in shared memory, or host memory
    path: str | None  # the file, when ``dest`` is one
    seen: np.ndarray  # [max_rows] bool
    tokens: np.ndarray  # [max_rows] int64
    recomputed: int = 0
    futures: list[Any] = field(default_factory=list)  # copies still writing into ``dest``
    error: str | None = None

    def scatter(self, step_layers: list[int], rows: np.ndarray, pos: np.ndarray, toks: np.ndarray) -> None:
        keep = pos < self.seen.shape[0]  # past prompt + max_tokens (rejected drafts); the engine checks
        # that every position of the sequence arrived
        if not keep.all():
            rows, pos, toks = rows[:, keep], pos[keep], toks[keep]
        if pos.size == 0:
            return
        self.recomputed += int(self.seen[pos].sum())
        self.seen[pos] = True
        self.tokens[pos] = toks
        if step_layers != self.layers:
            rows = rows[[step_layers.index(layer) for layer in self.layers]]
        if pos[-1] - pos[0] == pos.size - 1 and (pos.size == 1 or bool(np.all(np.diff(pos) == 1))):
            self.dest[:, pos[0]:pos[-1] + 1] = rows  # the usual case: consecutive positions, one slice
        else:
            self.dest[:, pos] = rows


class CaptureStore:
    def __init__(self) -> None:
        self.wanted: dict[str, _Pending] = {}  # external request id -> what it accumulated
        # Device buffers shared by every layer (created on the construction-time device).
        self.buf: torch.Tensor | None = None  # [num_layers, rows, H] fp32
        self.dst: torch.Tensor | None = None  # [max_tokens] int32: row of buf for each token, -1 = none
        self.layer_on: torch.Tensor | None = None  # [num_layers] int32: capture this layer in this step
        self.any_on: torch.Tensor | None = None  # [1] int32: 0 = nothing captured in this step
        self._last_on = False
        self._resolved: dict[str, _Pending | None] = {}  # internal request id -> capture; reset when wanted changes
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

    def register(self, request_id: str, layers: list[int], max_rows: int, to_dir: str | None = None) -> None:
        """``max_rows``: prompt + max_tokens (positions past it are never part of the sequence).
        ``to_dir``: shared memory on the engine actor's host, where the rows then go straight to a file."""
        if self.rows_per_step == 0:
            raise ValueError("this engine was started with capture disabled (capture_rows_per_step=0)")
        ids = sorted({int(x) for x in layers})
        shape = (len(ids), int(max_rows), self.buf.shape[2])
        dest, path = None, None
        if to_dir is not None:
            import os
            import uuid

            path = os.path.join(to_dir, f"steer-capture-{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex}.f32")
            try:
                dest = _shared_array(path, shape)
            except OSError:  # shared memory full (containers often get 64 MB): keep the rows here
                _unlink(path)
                dest, path = None, None
        if dest is None:
            dest = np.empty(shape, dtype=np.float32)
        pend = _Pending(ids, dest, path, np.zeros(shape[1], dtype=bool), np.full(shape[1], -1, dtype=np.int64))
        from .channel import LOCK

        with LOCK:  # made outside the lock (a file of many MB), published under it
            old = self.wanted.pop(request_id, None)
            self.wanted[request_id] = pend
            self._resolved.clear()
        if old is not None:
            self._discard(old)

    def _lookup(self, internal_id: str) -> _Pending | None:
        """The capture an engine-internal request id belongs to (memoized: this runs for every request
        of every step, on the thread that launches forwards)."""
        try:
            return self._resolved[internal_id]
        except KeyError:
            ext = self._match(internal_id)
            pend = self._resolved[internal_id] = self.wanted.get(ext) if ext is not None else None
            return pend

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
        found = [(i, pend) for i, pend in enumerate(map(self._lookup, req_ids)) if pend is not None]
        if not found:
            return self._off()
        idx = np.fromiter((i for i, _ in found), dtype=np.int64, count=len(found))
        starts = query_start_loc[idx].astype(np.int64)
        counts = query_start_loc[idx + 1].astype(np.int64) - starts
        ends = np.cumsum(counts)
        cap = self.rows_per_step
        if ends[-1] > cap:  # rare: keep whole requests while they fit; the others' take() reports it
            keep = np.zeros(len(found), dtype=bool)
            n = 0
            for k, c in enumerate(counts.tolist()):
                if n + c <= cap:
                    keep[k], n = True, n + c
                else:
                    found[k][1].error = (f"a step held more captured tokens than capture_rows_per_step={cap}; "
                                         f"raise it or lower max_num_batched_tokens")
            found = [f for f, k in zip(found, keep.tolist()) if k]
            if not found:
                return self._off()
            starts, counts = starts[keep], counts[keep]
            ends = np.cumsum(counts)
        n = int(ends[-1])
        firsts = ends - counts
        picked = np.repeat(starts - firsts, counts) + np.arange(n)  # batch row of each captured row
        layout = [(pend, a, b) for (_, pend), a, b in zip(found, firsts.tolist(), ends.tolist())]
        rows = picked
        pos = positions.reshape(-1, positions.shape[-1])[-1] if positions.dim() > 1 else positions
        total = int(num_padded if num_padded is not None else pos.shape[0])
        dst = np.full(total, -1, dtype=np.int32)
        dst[rows] = np.arange(n, dtype=np.int32)
        h2d(self.dst[:total], dst)
        layers = sorted(set().union(*(pend.layers for pend, _, _ in layout)))
        on = np.zeros(self.layer_on.shape[0], dtype=np.int32)
        on[layers] = 1
        h2d(self.layer_on, on)
        if not self._last_on:
            self.any_on.fill_(1)
            self._last_on = True
        self._step = (layout, layers, to_device(rows, pos.device), pos, input_ids)

    def end_step(self) -> None:
        """After the forward is enqueued: snapshot the rows (device gather, stream-ordered before the next
        step's writes); a thread of its own copies them to host and into each request's destination,
        so the copy overlaps the next forward and a finished request has nothing left to assemble."""
        if self._step is None:
            return
        layout, layers, rows, pos, input_ids = self._step
        self._step = None
        n = rows.shape[0]
        snap = self.buf[to_device(np.asarray(layers, dtype=np.int64), self.buf.device), :n]
        p = pos[rows].to(torch.int64)
        t = input_ids[rows].to(torch.int64) if input_ids is not None else torch.full_like(p, -1)
        if self._side is None:
            from concurrent.futures import ThreadPoolExecutor

            self._side = (torch.cuda.Stream() if snap.is_cuda else None,
                          ThreadPoolExecutor(1, thread_name_prefix="steer-capture-copy"))
        stream, pool = self._side
        ready = None
        if snap.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
            for x in (snap, p, t):
                x.record_stream(stream)  # the allocator keeps them until the copy stream is done

        def to_dest():
            if stream is not None:
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    host = [x.to("cpu") for x in (snap, p, t)]
            else:
                host = [snap, p, t]
            rows_np, pos_np, tok_np = (x.numpy() for x in host)
            for pend, a, b in layout:
                pend.scatter(layers, rows_np[:, a:b], pos_np[a:b], tok_np[a:b])

        fut = pool.submit(to_dest)
        for pend, _, _ in layout:
            pend.futures.append(fut)

    def take(self, request_id: str) -> dict[str, Any] | None:
        """Everything captured for ``request_id``, one row per absolute position, sorted by position;
        msgpack-safe. Rows kept in a shared-memory file stay there (only its path travels)."""
        from .channel import LOCK

        with LOCK:  # the runner's thread reads ``wanted`` every step (and adds copies under the lock)
            pend = self.wanted.pop(request_id, None)
            self._resolved.clear()
        if pend is None:
            return None
        try:
            for fut in pend.futures:
                fut.result()
        except BaseException:
            self._discard(pend)
            raise
        if pend.error:
            self._discard(pend)
            raise ValueError(f"capture of request {request_id} is incomplete: {pend.error}")
        positions = np.flatnonzero(pend.seen)
        out = {"positions": positions.tolist(), "token_ids": pend.tokens[positions].tolist(),
               "recomputed": pend.recomputed, "layer_ids": pend.layers}
        if pend.path is not None:
            pend.dest.flush()
            out.update(file=pend.path, shape=list(pend.dest.shape))
            return out
        out["layers"] = {str(layer): wire.encode_tensor(torch.from_numpy(pend.dest[i, positions]))
                         for i, layer in enumerate(pend.layers)}
        return out

    def drop(self, request_id: str) -> None:
        from .channel import LOCK

        with LOCK:
            pend = self.wanted.pop(request_id, None)
            self._resolved.clear()
        if pend is not None:
            self._discard(pend)

    @staticmethod
    def _discard(pend: _Pending) -> None:
        for fut in pend.futures:
            try:
                fut.result()  # the file must not be written after it is gone
            except Exception:
                pass
        if pend.path is not None:
            _unlink(pend.path)


def _unlink(path: str) -> None:
    import os

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_namespace() -> int:
    """Containers sharing /dev/shm (``--ipc=host``) need not share pids: a file's pid means something only
    in the namespace that wrote it."""
    import os

    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_orphan_files(directory: str = "/dev/shm", min_age_s: float = 600.0) -> list[str]:
    """Remove capture files whose writing process is gone (an engine that died with captures in flight):
    tmpfs is memory, and nothing else would ever free them. Only files of this pid namespace, untouched
    for ``min_age_s`` (a dead worker's last files may still be on their way into the object store).
    Best effort: returns the paths removed, never raises."""
    import os
    import time

    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    ns, now = str(_pid_namespace()), time.time()
    for name in names:
        parts = name.split("-")
        if not (name.startswith("steer-capture-") and name.endswith(".f32") and len(parts) == 5 and parts[2] == ns):
            continue
        path = os.path.join(directory, name)
        try:
            os.kill(int(parts[3]), 0)
            continue  # its process lives: the file may be in use
        except ProcessLookupError:
            pass
        except (ValueError, OSError):  # not a pid, or another user's process
            continue
        try:
            if now - os.stat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone meanwhile, or another user's file (sticky /dev/shm)
            pass
    return removed


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
