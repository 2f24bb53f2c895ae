"""The engine's own share of a global change: decoding and validating a spec, building every layer's rows
and fingerprints (what :meth:`SteerEngine.apply_spec` does before any worker sees it), for an all-layer
add + cap spec. It runs on the engine actor's event loop on any machine, so it is the part of the update
latency a CPU measures as a GPU host would (the largest part of it at the 8B shape).

    python bench/spec_build.py --shape 8b --out bench/results/
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from results_io import emit

from steer_actors.ops.change import rows_payload
from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

SHAPES = {"0.6b": (1024, 28), "8b": (4096, 36)}  # hidden, layers
K = 4  # max_ops_per_layer, the default of VLLMSteeringConfig


def pct(f, n: int) -> dict:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1000)
    ts.sort()
    return {"p50_ms": ts[n // 2], "p99_ms": ts[int(n * 0.99) - 1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=list(SHAPES))
    ap.add_argument("--n", type=int, default=100, help="timed repetitions of each part")
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    args = ap.parse_args()
    H, L = SHAPES[args.shape]
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
           "decode_and_validate": pct(lambda: SteeringSpec.from_wire(wire), args.n),
           # the rows alone, of a spec decoded once (fingerprints cached, as they are after the first build)
           "rows": pct(lambda s=SteeringSpec.from_wire(wire): rows_payload(s, list(range(L)), K, H), args.n),
           "whole": pct(build, args.n)}
    emit(res, args.out, shape=args.shape, measurement="spec-build")


if __name__ == "__main__":
    main()
