"""How fast an engine actor can hand captured rows to the object store: one entry per layer (what the
GPU run of session 5 measured: ~1 GB/s) against one entry per capture, from a shared-memory segment as
``materialize_capture`` does. ``python bench/capture_put.py --out bench/results/cpu-capture-put-<date>.json``"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import ray
from results_io import emit

L, R, H, N = 28, 384, 1024, 32  # the 0.6B shape, all layers, 128 + 256 rows; 32 requests (1.4 GB)


@ray.remote
class Engine:
    def __init__(self):
        self.path = f"/dev/shm/steer-bench-put-{os.getpid()}.f32"
        a = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(N * L * R * H,))
        a[:] = 1.0
        self.arr = np.memmap(self.path, dtype=np.float32, mode="r", shape=(N, L, R, H))
        os.unlink(self.path)  # the mapping stays

    async def per_layer(self, i):
        return tuple(np.asarray(self.arr[i, layer]) for layer in range(L))

    async def per_capture(self, i):
        return np.asarray(self.arr[i])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, object_store_memory=8 << 30, include_dashboard=False)
    eng = Engine.remote()
    ray.get(eng.__ray_ready__.remote())
    size = N * L * R * H * 4
    res = {"requests": N, "layers": L, "rows": R, "hidden": H, "bytes": size, "cpus": os.cpu_count(),
           "per_layer_GB_s": [], "per_capture_GB_s": []}
    for _ in range(args.reps):
        for name, n_ret in (("per_layer", L), ("per_capture", 1)):
            t = time.perf_counter()
            refs = [getattr(eng, name).options(num_returns=n_ret).remote(i) for i in range(N)]
            flat = [r for rs in refs for r in (rs if isinstance(rs, list) else [rs])]
            ray.wait(flat, num_returns=len(flat), fetch_local=False)
            res[f"{name}_GB_s"].append(size / (time.perf_counter() - t) / 1e9)
            del refs, flat
    res["best"] = {k: max(res[f"{k}_GB_s"]) for k in ("per_layer", "per_capture")}
    emit(res, args.out)


if __name__ == "__main__":
    main()
