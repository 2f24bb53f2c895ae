"""Smoke check: does steering change what the model says? Baseline vs steered text for one prompt.

    python -m steer_actors.smoke --model-name Qwen/Qwen3-0.6B --layer 2 --scale 5000 --max-tokens 32
    python -m steer_actors.smoke --model-name tiny:qwen3 --layer 1 --scale 50 --max-tokens 16

Starts the app embedded (attaching to the Ray cluster ``ray.init()`` finds, or a new local one),
generates greedily without steering, then with ``scale * v`` added at ``--layer`` (``v`` a random unit
vector from ``--seed``), prints both texts, and exits 1 if they are the same (steering did nothing),
0 otherwise. The app is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import torch


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m steer_actors.smoke", description=__doc__.split("\n")[0])
    ap.add_argument("--model-name", required=True, help="HF name, local checkpoint path, or tiny:qwen3 / tiny:llama")
    ap.add_argument("--layer", type=int, required=True, help="decoder layer to steer")
    ap.add_argument("--scale", type=float, required=True, help="norm of the added vector")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="Question: What is the capital of France? Answer:")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random steering direction")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile (and CUDA graphs on GPU); "
                                                            "default eager, which starts faster")
    ap.add_argument("--app-name", default="steer-smoke", help="Serve app name (deleted at the end)")
    return ap.parse_args(argv)


async def _run(model, args: argparse.Namespace) -> tuple[str, str]:
    sampling = dict(temperature=0.0, max_tokens=args.max_tokens)
    baseline = (await model.generate(args.prompt, **sampling))[0]
    g = torch.Generator().manual_seed(args.seed)
    v = torch.randn(model.hidden_size, generator=g)
    await model.set_layer_vector(args.layer, v / v.norm(), scale=args.scale)
    try:
        steered = (await model.generate(args.prompt, **sampling))[0]
    finally:
        await model.clear_all_vectors()
    return baseline.text, steered.text


def main(argv: list[str] | None = None) -> int:
    from steer_actors import VLLMSteerModel, VLLMSteeringConfig

    args = _args(argv)
    cfg = VLLMSteeringConfig(model_name=args.model_name, dtype=args.dtype, max_model_len=args.max_model_len,
                             tensor_parallel_size=args.tensor_parallel_size, enforce_eager=not args.compile)
    model = VLLMSteerModel(cfg, app_name=args.app_name)
    try:
        baseline, steered = asyncio.run(_run(model, args))
    finally:
        model.close()
    print(f"baseline: {baseline!r}")
    print(f"steered (layer {args.layer}, scale {args.scale:g}): {steered!r}")
    if steered == baseline:
        print("FAIL: the steered text equals the baseline (steering changed nothing)", file=sys.stderr)
        return 1
    print("OK: steering changed the output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
