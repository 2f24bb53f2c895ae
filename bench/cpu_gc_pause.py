"""A full garbage collection in a process that hosts a SteerEngine (vLLM's AsyncLLM, Ray, torch): how many
objects it walks and how long the pause is, with the startup heap frozen (what the engine does once up, as
vLLM's own API server does) and without. A pause there stops the event loop that streams every request's
outputs and builds every steering change. Tiny Qwen3 on this CPU box; each variant in its own process.

    python bench/cpu_gc_pause.py --out bench/results/cpu-gc-pause-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time


async def child(freeze: bool) -> dict:
    import steer_actors.engine.actor as engine
    import steer_actors.engine.launch as engine_start
    from steer_actors.testing import build_tiny_model

    if not freeze:
        engine_start.freeze_gc_heap = lambda: None
    eng = engine.SteerEngine(dict(model_name=build_tiny_model("qwen3"), dtype="float32", max_model_len=256,
                                  enforce_eager=True))
    await eng.generate([[5, 6, 7, 8]], dict(max_tokens=4, temperature=0.0))
    tracked = len(gc.get_objects())
    pauses = []
    for _ in range(5):
        t = time.perf_counter()
        gc.collect(2)
        pauses.append((time.perf_counter() - t) * 1e3)
    eng.engine.shutdown()
    return {"tracked_objects": tracked, "frozen_objects": gc.get_freeze_count(),
            "full_collection_ms_median": round(sorted(pauses)[2], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["0", "1"])
    args = ap.parse_args()
    if args.child:
        print("RESULT=" + json.dumps(asyncio.run(child(args.child == "1"))), flush=True)
        return
    from results_io import emit

    res = {}
    for name, flag in (("not_frozen", "0"), ("frozen", "1")):
        p = subprocess.run([sys.executable, __file__, "--child", flag], capture_output=True, text=True, timeout=600)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT=")]
        res[name] = json.loads(line[-1][7:]) if line else {"error": p.stderr[-600:]}
    emit(res, args.out)


if __name__ == "__main__":
    main()
