"""A worker's share of a global change, on the host, while another thread holds the GIL as the runner
thread does (small torch calls, or in the worst case long stretches of pure Python): unpacking the engine's message and checking its rows, packing every layer's K slots, and the
copy into the layer buffers (CPU tensors here: on a GPU the copies are asynchronous and the host cost is the
calls), at Python's 5 ms GIL switch interval and at 0.5 ms. All-layer change (add + cap on every layer) at
the 8B shape by default.

    PYTHONPATH=. python bench/worker_update.py [--hidden 4096 --layers 36] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gil_load
import numpy as np
import torch

from steer_actors import wire
from steer_actors.ops.change import rows_payload
from steer_actors.worker.layer_patch import LayerSteerer, load_packed, pack_rows
from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.worker.extension import SteerWorkerExtension
from results_io import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    H, L, K = args.hidden, args.layers, args.slots
    layers = [LayerSteerer(i, H, K, request_slots=2, max_tokens=64, num_layers=L) for i in range(L)]
    worker = SteerWorkerExtension()
    worker._steer_layer_cache = dict(enumerate(layers))
    g = torch.Generator().manual_seed(0)
    v = lambda: torch.randn(H, generator=g)  # noqa: E731
    specs = [SteeringSpec(layers={i: LayerSteeringSpec(operations=[AddSpec(vector=v(), scale=0.5),
                                                                   ProjectionCapSpec(vector=v(), max=1.0)])
                                  for i in range(L)}) for _ in range(2)]
    # what arrives over the channel: the engine's payload, msgpack'd (unpacking counts as the worker's)
    messages = [wire.packb({"m": "steer_apply", "a": [1, rows_payload(s, list(range(L)), K, H)]}) for s in specs]

    def stage(message):
        return worker._rows_from_engine(wire.unpackb(message)["a"][1])[1]

    def pack(rows):
        return pack_rows([(layers[i], r, bool(key)) for i, (key, r) in rows.items()], ("global", 1))

    res = {"hidden": H, "layers": L, "slots": K, "cpus": os.cpu_count(), "bytes": len(messages[0])}
    for interval in (0.005, 0.0005):
        sys.setswitchinterval(interval)
        for contended in (False, True, "python"):
            load = None if not contended else gil_load.start(
                gil_load.python_runner if contended == "python" else gil_load.busy_runner)
            ts, tp, tl = [], [], []
            for i in range(args.n):
                t0 = time.perf_counter()
                rows = stage(messages[i % 2])
                t1 = time.perf_counter()
                packed = pack(rows)
                t2 = time.perf_counter()
                load_packed(packed)
                t3 = time.perf_counter()
                ts.append((t1 - t0) * 1e3)
                tp.append((t2 - t1) * 1e3)
                tl.append((t3 - t2) * 1e3)
            if load is not None:
                load.stop()
            who = {False: "alone", True: "busy_runner", "python": "python_runner"}[contended]
            res[f"{who}_switch_{interval * 1e3:g}ms"] = {
                "stage_ms_p50": float(np.median(ts)), "pack_ms_p50": float(np.median(tp)), "pack_ms_max": max(tp),
                "load_ms_p50": float(np.median(tl)), "load_ms_max": max(tl),
                "total_ms_p99": float(np.percentile(np.add(np.add(ts, tp), tl), 99))}
    # the last change's add row of layer 0 is in place (copy 1 of the double-buffered rows)
    want = specs[(args.n - 1) % 2].layers[0].to_ops()[0]
    assert torch.equal(layers[0].add[1][0], want.vector * want.scale)
    emit(res, args.out)


if __name__ == "__main__":
    main()
