"""Host side of all-layer capture, per decode step: where the copy thread's time goes once the rows are
on the host. 128 requests x 28 layers x H=1024 (14.7 MB a step), one new position per request a step.

* ``files``: the previous design, one new shared-memory file per request ([layers, max_rows, H]) and a
  Python loop writing each request's rows (re-implemented here: the code is gone from the package).
* ``arena-first``: :meth:`CaptureStore.write_step` into a fresh arena (pages reserved at register,
  mapped on first write).
* ``arena-reused``: the same after the first round's regions were freed: the steady state.

    PYTHONPATH=. python bench/capture_host.py [--requests 128 --layers 28 --hidden 1024 --steps 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def old_files(args, rows: torch.Tensor, directory: str) -> list[float]:
    from steer_actors.worker.capture.arena import segment_name

    R, L, H, max_rows = args.requests, args.layers, args.hidden, args.prompt + args.steps
    reqs = []
    for _ in range(R):
        path = os.path.join(directory, segment_name())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.posix_fallocate(fd, 0, L * max_rows * H * 4)
        os.close(fd)
        reqs.append((path, np.memmap(path, dtype=np.float32, mode="r+", shape=(L, max_rows, H)),
                     np.zeros(max_rows, bool), np.full(max_rows, -1, np.int64)))
    times = []
    try:
        for s in range(args.steps):
            t0 = time.perf_counter()
            host = rows.numpy()
            pos = np.full(R, args.prompt + s, np.int64)
            for k, (_, dest, seen, tokens) in enumerate(reqs):  # what _Pending.scatter did per request
                p = pos[k:k + 1]
                keep = p < seen.shape[0]
                if not keep.all():
                    p = p[keep]
                int(seen[p].sum())
                seen[p] = True
                tokens[p] = p
                dest[:, p[0]:p[-1] + 1] = host[:, k:k + 1]
            times.append(time.perf_counter() - t0)
    finally:
        for path, *_ in reqs:
            os.unlink(path)
    return times


def arena_rounds(args, rows: torch.Tensor, directory: str) -> tuple[list[float], list[float], dict]:
    from steer_actors.worker.capture.store import CaptureStore

    R, L, H, max_rows = args.requests, args.layers, args.hidden, args.prompt + args.steps
    store = CaptureStore()
    store.buffers(num_layers=L, rows=R, hidden=H, max_tokens=R)
    layers = list(range(L))
    rounds, register_s = [], []
    try:
        for rnd in range(2):
            t0 = time.perf_counter()
            for k in range(R):
                store.register(f"r{rnd}-{k}", layers, max_rows, directory)
            register_s.append(time.perf_counter() - t0)
            layout = [(store.wanted[f"r{rnd}-{k}"], k, k + 1) for k in range(R)]
            times = []
            for s in range(args.steps):
                t0 = time.perf_counter()
                pos = np.full(R, args.prompt + s, np.int64)
                store.write_step(layout, layers, rows, pos, pos)
                times.append(time.perf_counter() - t0)
            rounds.append(times)
            regions = [store.take(f"r{rnd}-{k}")["region"] for k in range(R)]
            store.free(regions)
        stats = store.stats()
    finally:
        store.arena.close()
    return rounds[0], rounds[1], {"register_ms_first": register_s[0] * 1e3, "register_ms_reused": register_s[1] * 1e3,
                                  "shared_bytes": stats["shared_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--busy", action="store_true", help="a thread holding the GIL as the runner does")
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    from gil_load import start

    load = start() if args.busy else None
    rows = torch.rand(args.layers, args.requests, args.hidden)  # a step's gathered rows, on the host
    res = {"requests": args.requests, "layers": args.layers, "hidden": args.hidden, "steps": args.steps,
           "step_mb": rows.numel() * 4 / 1e6, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()}-core CPU"}
    ms = lambda ts: {"p50": float(np.median(ts)) * 1e3, "mean": float(np.mean(ts)) * 1e3}  # noqa: E731
    res["busy_runner_thread"] = args.busy
    if not args.skip_files:
        res["files"] = ms(old_files(args, rows, args.dir))
    first, reused, extra = arena_rounds(args, rows, args.dir)
    if load is not None:
        load.stop()
    res["arena_first"], res["arena_reused"] = ms(first), ms(reused)
    res.update(extra)
    res["GB_s_reused"] = res["step_mb"] / res["arena_reused"]["p50"]
    for k in [k for k in ("files", "arena_first", "arena_reused") if k in res]:
        print(f"{k:>13}: {res[k]['p50']:7.2f} ms/step p50, {res[k]['mean']:7.2f} mean")
    print("RESULT=" + json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
