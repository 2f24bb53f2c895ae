"""CPU benchmark: tokens/s of a mixed batch of per-request specs and of a global all-layer spec against
unsteered, eager and compiled, on the tiny Qwen3 (absolute numbers are comparable only within one run).

    python bench/cpu_steering.py --out bench/results/
    python bench/cpu_steering.py --n 8 --gen 8          (a quick check that it runs)
"""

from __future__ import annotations

import argparse
import asyncio
import time

from results_io import emit


def _specs(hidden: int):
    import torch

    from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    g = torch.Generator().manual_seed(0)
    v = lambda: torch.randn(hidden, generator=g)  # noqa: E731
    L = lambda *ops: LayerSteeringSpec(operations=list(ops))  # noqa: E731
    per_request = [None] + [SteeringSpec(layers={i: L(AddSpec(vector=v(), scale=1.0), ProjectionCapSpec(vector=v(), max=1.0))
                                                 for i in range(4)}) for _ in range(3)]
    global_all = SteeringSpec(layers={i: L(AddSpec(vector=v(), scale=0.5), AblationSpec(vector=v(), scale=0.5))
                                      for i in range(4)})
    return per_request, global_all


async def measure(eager: bool, n: int, gen: int) -> dict:
    from steer_actors.engine.actor import SteerEngine
    from steer_actors.specs import SteeringSpec
    from steer_actors.testing import build_tiny_model

    eng = SteerEngine(dict(model_name=build_tiny_model("qwen3"), dtype="float32", max_model_len=512,
                           enforce_eager=eager, max_steering_slots=4))
    per_request, global_all = _specs(eng.hidden_size)
    sampling = dict(max_tokens=gen, temperature=0.0, ignore_eos=True)
    seed = iter(range(10_000))

    def prompts():
        s = next(seed)
        return [[(s * 131 + i * 7 + j) % 1000 + 3 for j in range(24)] for i in range(n)]

    async def tok_s(specs=None, reps=2):
        best = 0.0
        for _ in range(reps):
            p = prompts()
            t = time.perf_counter()
            await eng.generate(p, sampling, None, specs)
            best = max(best, n * gen / (time.perf_counter() - t))
        return best

    await tok_s()  # warm-up
    res = {"unsteered": await tok_s()}
    res["mixed_4_specs"] = await tok_s([per_request[i % 4] and per_request[i % 4].to_wire() for i in range(n)])
    await eng.apply_spec(global_all.to_wire())
    res["global_all_layers"] = await tok_s()
    await eng.apply_spec(SteeringSpec().to_wire())
    res["unsteered_again"] = await tok_s()
    eng.engine.shutdown()
    res["ratio_mixed"] = res["mixed_4_specs"] / max(res["unsteered"], res["unsteered_again"])
    res["ratio_global"] = res["global_all_layers"] / max(res["unsteered"], res["unsteered_again"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    args = ap.parse_args()
    out = {"model": "tiny Qwen3 (4 layers, hidden 256), fp32", "prompts": args.n, "prompt_len": 24, "gen_len": args.gen}
    for mode, eager in (("eager", True), ("compiled", False)):
        out[mode] = asyncio.run(measure(eager, args.n, args.gen))
        print(mode, out[mode], flush=True)
    emit(out, args.out, shape="tiny", measurement="steering")


if __name__ == "__main__":
    main()
