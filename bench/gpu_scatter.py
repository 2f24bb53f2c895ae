"""GPU micro-benchmark of the capture write path alone (no vLLM, no Ray: runs on the bare GPU image):
captured rows scattered by the device into a registered shared-memory arena (steer_actors.worker.capture.device_write).

* correctness: every kept row lands at its request's (layer, position) row, seen from the host;
* the scatter alone: ms and GB/s for a decode-like step (512 requests x 28 layers x 1024) and a
  prefill-like one (8192 tokens), Triton with N programs vs torch ``index_copy_``;
* what it costs a concurrent "forward" (a matmul loop on the main stream) while it runs on a side stream.

    python bench/gpu_scatter.py --out $OUT/scatter.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import numpy as np
import torch

# the package's __init__ pulls in pydantic (absent on the GPU image); these modules need none of it
_pkg = types.ModuleType("steer_actors")
_pkg.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "steer_actors")]
sys.modules.setdefault("steer_actors", _pkg)

from steer_actors.worker.capture import device_write as cd  # noqa: E402
from steer_actors.worker.capture.arena import Arena  # noqa: E402

L, H = 28, 1024


class _Pend:  # what dest_offsets reads of a capture
    def __init__(self, region, max_rows):
        self.region, self.max_rows, self.layers = region, max_rows, list(range(L))


def setup(n_req: int, max_rows: int, dev: torch.device = torch.device("cuda", 0)):
    mapper = cd.HostMapper(dev)
    assert mapper.ok, "device cannot use host pointers for registered memory"
    arena = Arena(H, shared_segment_bytes=16 << 30, mapper=mapper)  # as the worker's CaptureStore
    pends = [_Pend(arena.alloc(L * max_rows, "/dev/shm"), max_rows) for _ in range(n_req)]
    seg = pends[0].region.segment
    assert all(p.region.segment is seg for p in pends) and seg.device_rows is not None
    return dev, arena, seg, pends


def step_args(dev, pends, tokens_per_req: int, pos0: int):
    run = [(p, i * tokens_per_req, (i + 1) * tokens_per_req) for i, p in enumerate(pends)]
    n = len(pends) * tokens_per_req
    off, maxr, _ = cd.dest_offsets(run, list(range(L)), True)
    pos = torch.tensor(np.tile(np.arange(pos0, pos0 + tokens_per_req), len(pends)), dtype=torch.int64, device=dev)
    snap = torch.randn(L, n, H, device=dev)
    return snap, pos, torch.from_numpy(off).to(dev), torch.from_numpy(maxr).to(dev), n


def scatter(seg, snap, pos, off, maxr, n, mode: str, programs: int):
    os.environ["STEER_CAPTURE_SCATTER"] = "torch" if mode == "torch" else "triton"
    os.environ["STEER_CAPTURE_SCATTER_PROGRAMS"] = str(programs)
    cd.scatter_rows(seg.device_rows, snap, pos, 0, n, off, maxr, 0)


def sample(pends, tokens_per_req, pos0):
    """(request index, layer, token, host row) of a few requests' rows: what the checks read."""
    for i in (0, len(pends) // 2, len(pends) - 1):
        p = pends[i]
        for layer in (0, L - 1):
            for t in range(tokens_per_req):
                yield i, layer, t, p.region.base + layer * p.max_rows + pos0 + t


def check(seg, pends, snap, tokens_per_req, pos0) -> float:
    """Max abs difference between what the host sees and the snapshot, over the sampled rows."""
    ref = snap.cpu().numpy()
    return max(float(np.abs(seg.array[row] - ref[layer, i * tokens_per_req + t]).max())
               for i, layer, t, row in sample(pends, tokens_per_req, pos0))


def clear(seg, pends, tokens_per_req, pos0) -> None:
    for _, _, _, row in sample(pends, tokens_per_req, pos0):
        seg.array[row] = np.nan


def timed(fn, reps: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def forward_ms_beside(fwd, side, scatter_once, n_scatter: int, n_fwd: int = 10) -> float:
    """The forward's own time (events on its stream) while scatters run on the side stream."""
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        for _ in range(n_scatter):
            scatter_once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n_fwd):
        fwd()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n_fwd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name(0), "layers": L, "hidden": H}
    t = time.perf_counter()
    dev, arena, seg, pends = setup(512, 192)  # 11 GB of regions in one registered shared-memory segment
    res["setup_s"] = round(time.perf_counter() - t, 2)
    res["arena"] = arena.stats()
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    fwd = lambda: torch.mm(a, a)  # noqa: E731  (stands in for a forward on the main stream)
    timed(fwd, 5)
    res["forward_alone_ms"] = round(timed(fwd, 20), 3)
    for name, tpr, pos0 in (("decode_512", 1, 150), ("prefill_8192", 16, 0)):
        snap, pos, off, maxr, n = step_args(dev, pends, tpr, pos0)
        nbytes = L * n * H * 4
        out: dict = {"bytes": nbytes}
        for mode, programs in (("triton", 8), ("triton", 32), ("triton", 128), ("torch", 0)):
            key = f"{mode}{programs or ''}"
            once = lambda: scatter(seg, snap, pos, off, maxr, n, mode, programs)  # noqa: E731
            clear(seg, pends, tpr, pos0)
            once()
            torch.cuda.synchronize()
            err = check(seg, pends, snap, tpr, pos0)
            ms = timed(once, 10)
            n_sc = int(res["forward_alone_ms"] * 10 / ms) + 2  # the scatters outlast the forwards
            f_ms = forward_ms_beside(fwd, side, once, n_sc)
            out[key] = {"max_abs_err": err, "scatter_ms": round(ms, 3), "GB_s": round(nbytes / ms / 1e6, 2),
                        "forward_ms_beside": round(f_ms, 3),
                        "forward_slowdown": round(f_ms / res["forward_alone_ms"], 3)}
            print(name, key, out[key], flush=True)
        res[name] = out
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
