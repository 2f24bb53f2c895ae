"""The engine's own share of a global change: decoding and validating a spec, building every layer's rows
and fingerprints (what :meth:`SteerEngine.apply_spec` does before any worker sees it), for an all-layer
add + cap spec at the 0.6B shape. It runs on the engine actor's event loop, so it counts against the update
latency target (p99 <= 20 ms) on any machine.

    python bench/spec_build.py --out bench/results/cpu-spec-build-<date>.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from steer_actors.ops.change import rows_payload
from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from results_io import emit

H, L, K = 1024, 28, 4


def pct(f, n=100) -> dict:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1000)
    ts.sort()
    return {"p50_ms": ts[n // 2], "p99_ms": ts[int(n * 0.99) - 1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out")
    args = ap.parse_args()
    global H, L
    H, L = args.hidden, args.layers
    g = torch.Generator().manual_seed(0)
    spec = SteeringSpec(layers={i: LayerSteeringSpec(operations=[
        AddSpec(vector=torch.randn(H, generator=g), scale=0.5),
        ProjectionCapSpec(vector=torch.randn(H, generator=g), max=1.0)]) for i in range(L)})
    wire = spec.to_wire()

    def build():  # as SteerEngine._validated + _rows_payload
        s = SteeringSpec.from_wire(wire)
        s.validate_for(H, L, list(range(L)), K)
        return rows_payload(s, list(range(L)), K, H)

    res = {"hidden": H, "layers": L, "ops_per_layer": 2, "cpus": os.cpu_count(),
           "decode_and_validate": pct(lambda: SteeringSpec.from_wire(wire)),
           # the rows alone, of a spec decoded once (fingerprints cached, as they are after the first build)
           "rows": pct(lambda s=SteeringSpec.from_wire(wire): rows_payload(s, list(range(L)), K, H)),
           "whole": pct(build)}
    emit(res, args.out)


if __name__ == "__main__":
    main()
