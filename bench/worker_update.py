"""A worker's share of a global change, on the host, while another thread holds the GIL as the runner
thread does: unpacking the engine's rows, packing the changed layers, and the copy into the layer buffers
(CPU tensors here: on a GPU the copies are asynchronous and the host cost is the calls). All-layer change
(add + cap on every layer) at the 8B shape by default.

    PYTHONPATH=. python bench/worker_update.py [--hidden 4096 --layers 36] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import time

import gil_load
import numpy as np
import torch

from steer_actors import ops
from steer_actors.patch import LayerSteerer, load_packed, pack_rows
from results_io import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--out")
    args = ap.parse_args()
    H, L, K = args.hidden, args.layers, args.slots
    layers = [LayerSteerer(i, H, K, request_slots=2, max_tokens=64, num_layers=L) for i in range(L)]
    g = torch.Generator().manual_seed(0)
    payloads = []
    for _ in range(2):
        layer_ops = [[ops.Op("add", torch.randn(H, generator=g), scale=0.5),
                      ops.Op("cap", torch.nn.functional.normalize(torch.randn(H, generator=g), dim=0), max=1.0)]
                     for _ in range(L)]
        payloads.append([ops.ops_to_flat(o, K, H).tobytes() if hasattr(ops, "ops_to_flat")
                         else ops.rows_to_bytes(ops.ops_to_rows(o, K, H)) for o in layer_ops])
    new_api = hasattr(ops, "ops_to_flat")

    def pack(payload):
        if new_api:
            return pack_rows([(layer, ops.flat_from_bytes(b, K, H), True) for layer, b in zip(layers, payload)],
                             ("global", 1))
        return pack_rows([(layer, ops.rows_from_bytes(b, K, H), True) for layer, b in zip(layers, payload)])

    load = None
    res = {"hidden": H, "layers": L, "slots": K, "cpus": os.cpu_count(), "code": "numpy rows" if new_api else "torch rows"}
    for contended in (False, True):
        if contended:
            load = gil_load.start()
        tp, tl = [], []
        for i in range(args.n):
            t0 = time.perf_counter()
            packed = pack(payloads[i % 2])
            t1 = time.perf_counter()
            load_packed(packed)
            tl.append((time.perf_counter() - t1) * 1e3)
            tp.append((t1 - t0) * 1e3)
        key = "busy_runner" if contended else "alone"
        res[key] = {"pack_ms_p50": float(np.median(tp)), "pack_ms_max": max(tp),
                    "load_ms_p50": float(np.median(tl)), "load_ms_max": max(tl)}
    load.stop()
    # the last change's add row of layer 0 is in place (copy 1 of the double-buffered rows; one copy before)
    last = torch.from_numpy(np.frombuffer(payloads[(args.n - 1) % 2][0], "<f4")[:H].copy())
    assert torch.equal(layers[0].add[1][0] if new_api else layers[0].add[0], last)
    emit(res, args.out)


if __name__ == "__main__":
    main()
