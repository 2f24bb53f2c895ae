"""Batched capture fetch from a separate Ray driver: 64 handles, one ``ray.get``, bytes/s.

    python bench/capture_fetch.py --address 127.0.0.1:6390 --app steer --out bench/results/cpu-capture-fetch.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time


async def run(address: str, app: str, n: int, layers: list[int], max_tokens: int) -> dict:
    from steer_actors import VLLMSteerModel

    model = VLLMSteerModel.connect(address=address, app=app)
    prompts = [[(7 * i + j) % 900 + 10 for j in range(32 + i % 16)] for i in range(n)]
    _, handles = await model.generate(prompts, capture_layers=layers, max_tokens=max_tokens, temperature=0.0,
                                      ignore_eos=True)
    t = time.perf_counter()
    model.fetch_captures_batch(handles)
    dt = time.perf_counter() - t
    nbytes = sum(h.nbytes for h in handles)
    shapes_ok = all(h.captures[layer][0]["hidden"].shape[0] == len(p) + max_tokens - 1
                    for h, p in zip(handles, prompts) for layer in layers)
    await model.release_captures(handles)
    return {"handles": n, "layers": layers, "bytes": nbytes, "seconds": dt, "bytes_per_s": nbytes / dt,
            "shapes_ok": shapes_ok, "machine": f"{platform.machine()} 2-core CPU dev box, driver and engine on one node"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="auto")
    ap.add_argument("--app", default="steer")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--out")
    args = ap.parse_args()
    res = asyncio.run(run(args.address, args.app, args.n, [int(x) for x in args.layers.split(",")], args.max_tokens))
    print("RESULT=" + json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
