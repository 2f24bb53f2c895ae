"""CPU benchmark: latency of a global steering change on an engine actor (as served), idle and while it
streams many concurrent requests, on the tiny Qwen3. On a CPU the forward in flight runs under the lock a
change takes, so under load this measures mostly the host's cores; the GPU figure is ``bench/gpu.py``'s.

    python bench/cpu_update_latency.py --out bench/results/
    python bench/cpu_update_latency.py --requests 16 --gen 64 --updates 10      (a quick check that it runs)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from results_io import emit


async def run(n_requests: int, gen: int, n_updates: int) -> dict:
    import ray
    import torch

    from steer_actors.engine.actor import engine_actor_class
    from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
    from steer_actors.testing import build_tiny_model

    eng = engine_actor_class().remote(dict(model_name=build_tiny_model("qwen3"), dtype="float32",
                                           max_model_len=512, enforce_eager=True))
    info = await eng.info.remote()
    g = torch.Generator().manual_seed(0)
    v = lambda: torch.randn(info["hidden_size"], generator=g)  # noqa: E731
    specs = [SteeringSpec(layers={i: LayerSteeringSpec(operations=[
        AddSpec(vector=v(), scale=0.1), ProjectionCapSpec(vector=v(), min=-4.0, max=4.0)]) for i in range(4)})
        for _ in range(2)]
    wires = [s.to_wire() for s in specs]
    sp = dict(max_tokens=gen, temperature=0.0, ignore_eos=True)
    await eng.apply_spec.remote(wires[0])  # warm-up of the update path
    idle = []
    for i in range(10):
        t = time.perf_counter()
        await eng.apply_spec.remote(wires[i % 2])
        idle.append((time.perf_counter() - t) * 1000)
    load = [eng.generate.remote([[(k * 7 + j) % 900 + 5 for j in range(16)]], sp) for k in range(n_requests)]
    await asyncio.sleep(3.0)
    busy, probe = [], []
    for i in range(n_updates):
        t = time.perf_counter()
        await eng.apply_spec.remote(wires[i % 2])
        busy.append((time.perf_counter() - t) * 1000)
        # a worker round trip that takes no lock: actor + channel transport, without the forward wait
        t = time.perf_counter()
        await eng.worker_state.remote()
        probe.append((time.perf_counter() - t) * 1000)
        await asyncio.sleep(0.05)
    done_before = sum(1 for r in load if r.future().done()) if hasattr(load[0], "future") else None
    await asyncio.gather(*load)
    ray.kill(eng)

    def pct(xs):
        xs = sorted(xs)
        return {"p50": round(xs[len(xs) // 2], 2), "p99": round(xs[max(0, int(len(xs) * 0.99) - 1)], 2),
                "max": round(xs[-1], 2)}

    return {"idle_ms": pct(idle), "under_load_ms": pct(busy), "unlocked_round_trip_under_load_ms": pct(probe), "concurrent_requests": n_requests, "gen_len": gen,
            "updates": n_updates, "requests_done_before_last_update": done_before}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--gen", type=int, default=400)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    args = ap.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res = asyncio.run(run(args.requests, args.gen, args.updates))
    ray.shutdown()
    res["model"] = "tiny Qwen3 (4 layers, hidden 256), fp32, eager"
    emit(res, args.out, shape="tiny", measurement="update-latency")


if __name__ == "__main__":
    main()
