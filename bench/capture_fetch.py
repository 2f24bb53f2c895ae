"""Batched capture fetch from a separate Ray driver: 64 handles, one ``ray.get``, bytes/s.

    python bench/capture_fetch.py --address auto --app steer --out bench/results/

Run it as a job or driver beside a running app (``serve run examples/tiny_cpu.yaml``, or the GPU example);
the model's layers must include ``--layers``. The result's card is this driver's GPU, ``cpu`` without one.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from results_io import emit


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
    return {"handles": n, "layers": layers, "max_tokens": max_tokens, "bytes": nbytes, "seconds": dt,
            "bytes_per_s": nbytes / dt, "shapes_ok": shapes_ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", default="auto")
    ap.add_argument("--app", default="steer")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--shape", default="tiny", help="the served model, for the result's name")
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    args = ap.parse_args()
    res = asyncio.run(run(args.address, args.app, args.n, [int(x) for x in args.layers.split(",")], args.max_tokens))
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    emit(res, args.out, card=card, shape=args.shape, measurement="capture-fetch")


if __name__ == "__main__":
    main()
