"""The host side of a capture step: which positions of which requests arrived (and their tokens) and, on
the host write path, the rows themselves into each request's region (see :mod:`.store`; on the direct
path the device wrote the rows already).

Which positions arrived and their tokens go to each segment's ``counts``/``tokens`` (one entry per segment
row of a region's first ``max_rows`` rows; see :class:`~steer_actors.worker.capture.arena.Segment`)."""

from __future__ import annotations

import numpy as np
import torch

from steer_actors import row_dtype
from steer_actors.worker.capture.arena import Segment


def write_step(layout: list, layers: list[int], rows: np.ndarray | torch.Tensor | None, pos: np.ndarray,
               tok: np.ndarray) -> None:
    """The host part of a step: ``rows`` [len(layers), n, H] for the requests of ``layout`` (each a
    consecutive range of the n tokens, requests of one segment consecutive); None where the device
    wrote them already, leaving only positions and tokens. Per segment: one numpy
    scatter of whole rows (it copies rows with memcpy and without the GIL, which the thread launching
    forwards needs; torch's ``index_copy_`` copies element by element), the bookkeeping vectorized."""
    rows = row_dtype.as_storage(rows) if isinstance(rows, torch.Tensor) else rows
    pends = [pend for pend, _, _ in layout]
    k, n, n_layers = len(pends), pos.shape[0], len(layers)
    counts = np.fromiter((b - a for _, a, b in layout), np.int64, k)
    base = np.repeat(np.fromiter((q.region.base for q in pends), np.int64, k), counts)
    maxr = np.repeat(np.fromiter((q.max_rows for q in pends), np.int64, k), counts)
    keep = pos < maxr  # past prompt + max_tokens (rejected drafts); the engine checks that every
    # position of the sequence arrived
    # every request's layers are a subset of the step's: the same count means the same layers
    same = all(len(q.layers) == n_layers for q in pends)
    starts = np.concatenate([[0], np.cumsum(counts)])
    q0 = 0
    while q0 < k:  # runs of consecutive requests in one segment
        segment = pends[q0].region.segment
        q1 = q0 + 1
        while q1 < k and pends[q1].region.segment is segment:
            q1 += 1
        a, b = int(starts[q0]), int(starts[q1])
        _write_run(segment, layout[q0:q1], layers, rows, pos, tok, base, maxr, keep, a, b, same, n)
        q0 = q1

def _write_run(segment: Segment, run: list, layers: list[int], rows: np.ndarray | None, pos: np.ndarray,
               tok: np.ndarray, base: np.ndarray, maxr: np.ndarray, keep: np.ndarray, a: int, b: int, same: bool,
               n: int) -> None:
    """Tokens ``a:b`` of the step (the requests of ``run``, all in ``segment``)."""
    cols = keep[a:b]
    if not cols.any():
        return
    whole = bool(cols.all())
    m = base[a:b] + pos[a:b]  # segment row of each token's first layer
    mk = m if whole else m[cols]
    segment.counts[mk] += 1  # a step holds a position of a request once: no repeated index
    segment.tokens[mk] = tok[a:b] if whole else tok[a:b][cols]
    if rows is None:
        return
    dest = segment.array
    if same:  # [layer, token]: layer-major regions
        idx = m[None, :] + np.arange(len(layers))[:, None] * maxr[None, a:b]
        src = rows[:, a:b]
        if whole:
            dest[idx] = src
        else:  # rare: a copy of the kept columns
            dest[idx[:, cols]] = src[:, cols]
    else:
        src_idx, idx = _pieces(run, layers, cols, pos, a, n)
        dest[idx] = rows.reshape(-1, rows.shape[-1])[src_idx]


def _pieces(run: list, layers: list[int], cols: np.ndarray, pos: np.ndarray, a: int,
            n: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows (of the step's flat [(layer, token), H]) and segment rows where requests capture
    different layer sets: a small index per request."""
    slot_of = {layer: j for j, layer in enumerate(layers)}
    src, dst = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for pend, lo, hi in run:
        t = np.arange(lo, hi)[cols[lo - a:hi - a]]
        if t.size:
            j = np.fromiter((slot_of[layer] for layer in pend.layers), np.int64, len(pend.layers))
            src.append((j[:, None] * n + t).reshape(-1))
            dst.append((pend.region.base + np.arange(j.size)[:, None] * pend.max_rows + pos[t]).reshape(-1))
    return np.concatenate(src), np.concatenate(dst)
