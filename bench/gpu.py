"""GPU benchmark: steer-actors against stock vLLM on the same card, in the same run, as ratios.

    python bench/gpu.py --shape 8b --runs stock,ours --out bench/results/        steering ratios + update latency
    python bench/gpu.py --shape 8b --runs update --out bench/results/            update latency alone
    python bench/gpu.py --shape 0.6b --runs capture --out bench/results/         capture ratio + fetch GB/s
    python bench/gpu.py --shape 0.6b --runs stock,hooks --out bench/results/     eager forward hooks on stock vLLM
    python bench/gpu.py --runs parity_eager,parity_graphs --out bench/results/   eager == graphs, tiny fp32

Each run is a fresh subprocess in its own session (killed whole after ``--child-timeout``, so no engine keeps
the GPU for the next run). Prompts are random token ids with ``ignore_eos`` so every mode does the same work;
throughput = generated tokens / wall time. Every mode runs ``--rounds`` times, the steered modes in rounds
over the modes so drift hits each alike; ratios are best/best and mean/mean against stock. ``--out`` names
a file, or a directory where the result gets ``<date>_<card>_<shape>_<measurement>.json``.
``BENCH_SMOKE=1`` runs the same code on a tiny model on the CPU (a check before spending GPU time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from gpu_capture import run_capture
from gpu_common import (GEN_LEN, N_PROMPTS, PROBE, PROMPT_LEN, REPO, SMOKE, build_checkpoint, engine_facts,
                        throughput, token_prompts)
from results_io import emit


def _engine_kwargs(model: str, eager: bool) -> dict:
    return dict(model=model, dtype="bfloat16", enforce_eager=eager, skip_tokenizer_init=True, max_model_len=1024,
                gpu_memory_utilization=0.85, seed=0)


async def run_stock(model: str, eager: bool, hooks: bool, rounds: int) -> dict:
    """Stock vLLM (our plugin disabled by VLLM_PLUGINS in the parent); ``hooks`` = the seed's hooks."""
    import uuid

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kw = _engine_kwargs(model, eager)
    if hooks:
        kw["worker_extension_cls"] = "bench.hooks_ext.HookExtension"
    t0 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
    start_s = time.perf_counter() - t0
    if hooks:
        await llm.collective_rpc("bench_install_hooks", args=(0.5,))

    async def generate(prompts, sp):
        params = SamplingParams(**sp)

        async def one(p):
            final = None
            async for out in llm.generate({"prompt_token_ids": p}, params, request_id=uuid.uuid4().hex):
                final = out
            return final.outputs[0].token_ids

        return await asyncio.gather(*(one(p) for p in prompts))

    await throughput(generate, reps=1)  # warm-up, as for the steered engine
    try:
        probe = [list(t) for t in await generate(token_prompts(PROBE["n"], seed=PROBE["seed"]), PROBE["sp"])]
    except Exception as e:  # a failed check must not cost the timings
        probe = repr(e)[:500]
    runs: list = []  # as many runs as each steered mode gets, so best-of compares like with like
    tps = await throughput(generate, reps=rounds, runs=runs)
    llm.shutdown()
    return {"tok_s": tps, "runs": runs, "start_s": start_s, "engine": engine_facts(llm), "probe_tokens": probe}


def _specs(hidden: int, layers: int):
    import torch

    from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    g = torch.Generator().manual_seed(0)
    v = lambda: torch.randn(hidden, generator=g)  # noqa: E731
    one = SteeringSpec(layers={layers // 2: LayerSteeringSpec(operations=[AddSpec(vector=v(), scale=0.5)])})
    all_layers = SteeringSpec(layers={i: LayerSteeringSpec(operations=[
        AddSpec(vector=v(), scale=0.1), ProjectionCapSpec(vector=v(), min=-4.0, max=4.0)]) for i in range(layers)})
    return one, all_layers


def _request_specs(hidden: int, layers: int, n: int) -> list:
    """``n`` distinct per-request specs, each add + cap on two layers."""
    import torch

    from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    g = torch.Generator().manual_seed(1)
    v = lambda: torch.randn(hidden, generator=g)  # noqa: E731
    return [SteeringSpec(layers={(k + d) % layers: LayerSteeringSpec(operations=[
        AddSpec(vector=v(), scale=0.1), ProjectionCapSpec(vector=v(), min=-4.0, max=4.0)]) for d in (0, layers // 2)})
        for k in range(n)]


def _pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(xs[len(xs) // 2], 3), "p99": round(xs[max(0, int(len(xs) * 0.99) - 1)], 3),
            "max": round(xs[-1], 3)}


async def update_series(eng, one, all_layers, generate) -> dict:
    """100 global changes, alternating one layer and all layers, while 1,024 requests decode; where each
    change's time went (the engine's and the workers' timers, where the runtime keeps them) and the garbage
    collector's pauses in this process meanwhile."""
    import gc

    from steer_actors.specs import SteeringSpec

    await eng.apply_spec(SteeringSpec().to_wire())
    bg = asyncio.create_task(generate(token_prompts(2 * N_PROMPTS, seed=9), dict(
        max_tokens=2 * GEN_LEN, ignore_eos=True, detokenize=False, temperature=0.0)))  # outlasts the changes
    await asyncio.sleep(1.5)
    lat, parts, exch, pauses, started = [], [], [], [], {}

    def gc_timer(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((info["generation"], (time.perf_counter() - started.pop("t")) * 1e3))

    channel = (getattr(eng, "_channel", None) or {}).get("steer")
    gc.callbacks.append(gc_timer)
    for i in range(100):
        t = time.perf_counter()
        await eng.apply_spec((one if i % 2 == 0 else all_layers).to_wire())
        lat.append((time.perf_counter() - t) * 1000)
        parts.append(((getattr(channel, "last_timing", None) or [None])[0], getattr(eng, "last_apply_ms", None)))
        exch.append(dict(getattr(channel, "last_exchange_ms", None) or {}))
        await asyncio.sleep(0.02)
    gc.callbacks.remove(gc_timer)
    running = not bg.done()  # the changes must all have landed while the batch was decoding
    await bg
    out = {"ms": {**_pct(lat), "n": len(lat), "all_while_decoding": running}, "all_layer_ms": _pct(lat[1::2]),
           # a full collection walks every object of the process (vLLM's too): a pause stops the event loop
           "gc_pauses": {f"gen{g}": {"n": sum(1 for x, _ in pauses if x == g),
                                     "max_ms": round(max([d for x, d in pauses if x == g], default=0.0), 2)}
                         for g in (0, 1, 2)}}
    if all(w for w, _ in parts):  # the first worker's share: building rows, waiting for the lock, copying
        out["worker_ms"] = {k: _pct([w[j] for w, _ in parts]) for j, k in enumerate(["build", "lock_wait", "copy"])}
    if all(e for _, e in parts):  # the engine's: validating + building rows, the whole exchange with the workers
        out["engine_ms"] = {k: _pct([e[j] for _, e in parts]) for j, k in enumerate(["build", "exchange"])}
    if all(exch):  # the exchange on the engine's side: packing, waiting for its turn, sending, the workers'
        # replies, then the event loop resuming the call
        out["exchange_ms"] = {k: _pct([e[k] for e in exch]) for k in exch[0]}
    return out


async def run_ours(model: str, eager: bool, measure: list[str], rounds: int, n_specs: list[int]) -> dict:
    from steer_actors.engine.actor import SteerEngine
    from steer_actors.specs import SteeringSpec

    t0 = time.perf_counter()
    eng = SteerEngine(dict(model_name=model, dtype="bfloat16", enforce_eager=eager, max_model_len=1024,
                           gpu_memory_utilization=0.85, max_steering_slots=max([16, *n_specs]),
                           engine_kwargs={"skip_tokenizer_init": True}))
    res: dict = {"start_s": time.perf_counter() - t0, "engine": engine_facts(eng.engine)}
    info = await eng.info()
    one, all_layers = _specs(info["hidden_size"], info["num_layers"])
    request_specs: list = []  # set per mode: [] = none, else one of N specs per prompt, in turn

    async def generate(prompts, sp):
        specs = [request_specs[i % len(request_specs)] for i in range(len(prompts))] if request_specs else None
        return [r["token_ids"] for r in await eng.generate(prompts, sp, None, specs)]

    modes = [("idle", SteeringSpec(), []), ("one_layer", one, []), ("all_layers", all_layers, [])]
    modes += [(f"specs{n}", SteeringSpec(), [s.to_wire() for s in _request_specs(info["hidden_size"],
                                                                                info["num_layers"], n)])
              for n in n_specs]
    modes = [m for m in modes if m[0] in measure or (m[0].startswith("specs") and "specs" in measure)]
    if modes:
        await throughput(generate, reps=1)  # warm-up: first-use kernels and allocator growth
        # the change paths on this runner: a spec applied globally and the same spec per request (the two
        # kinds of table, loaded by the same code), against the unsteered tokens
        try:  # a failed check must not cost the timings
            probeprompts = token_prompts(PROBE["n"], seed=PROBE["seed"])
            res["probe_idle"] = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            await eng.apply_spec(one.to_wire())
            steered_global = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            await eng.apply_spec(SteeringSpec().to_wire())
            request_specs[:] = [one.to_wire()]
            steered_request = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            # bf16 random weights: a greedy argmax can flip with the batch alone, so how many prompts agree
            # says more than one boolean (the exact check is the fp32 parity run)
            same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
            res["probe_checks"] = {"prompts_global_eq_request": same(steered_global, steered_request),
                                   "prompts_global_eq_idle": same(steered_global, res["probe_idle"]),
                                   "of": len(probeprompts)}
        except Exception as e:
            res["probe_checks"] = {"error": repr(e)[:500]}
        request_specs[:] = []
    # Rounds over the modes (not one mode after another), so drift over time hits every mode alike.
    for _ in range(rounds):
        for name, spec, rs in modes:
            await eng.apply_spec(spec.to_wire())
            request_specs[:] = rs
            res[name] = max(res.get(name, 0.0), await throughput(generate, reps=1,
                                                                   runs=res.setdefault("runs", {}).setdefault(name, [])))
        print("RESULT=" + json.dumps(res), flush=True)  # partial results survive a timeout
    request_specs[:] = []
    if "update" in measure:
        res["update"] = await update_series(eng, one, all_layers, generate)
    eng.engine.shutdown()
    return res


def child(args) -> None:
    import torch

    try:
        if args.child == "stock":
            res = asyncio.run(run_stock(build_checkpoint(args.shape), args.eager, args.hooks, args.rounds))
        elif args.child == "ours":
            res = asyncio.run(run_ours(build_checkpoint(args.shape), args.eager, args.measure.split(","), args.rounds,
                                       [int(n) for n in args.specs.split(",")]))
        elif args.child == "capture":
            res = run_capture(build_checkpoint(args.shape), args.capture_dtype, args.rounds, args.profile)
        else:
            from gpu_parity import run_parity

            res = asyncio.run(run_parity(args.eager))
    except Exception as e:  # after partial RESULT lines, the error must be the last word
        import traceback

        print("RESULT=" + json.dumps({"error": repr(e)[:2000], "trace": traceback.format_exc()[-3000:]}), flush=True)
        raise
    res["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print("RESULT=" + json.dumps(res), flush=True)  # the parent keeps the last RESULT line


def spawn(name: str, argv: list[str], timeout_s: float, plugins: bool = True) -> dict:
    """One mode in a fresh process (its own session: on a timeout the whole tree goes, so no engine is
    left holding the GPU for the next mode)."""
    import signal

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # stock vLLM: the steering plugin is not loaded
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        partial = [ln for ln in out.splitlines() if ln.startswith("RESULT=")]  # children report as they go
        return {**(json.loads(partial[-1][7:]) if partial else {}),
                "error": f"timed out after {timeout_s:.0f} s", "stderr_tail": err[-1500:]}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers (engine cores, workers)
        except ProcessLookupError:
            pass
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT=")]
    if not line:
        print(out[-3000:], err[-6000:], file=sys.stderr)
        return {"error": err[-1500:]}
    res = json.loads(line[-1][7:])
    res["wall_s"] = time.perf_counter() - t
    print(name, json.dumps(res)[:600], flush=True)
    return res


# run name -> (child arguments, stock vLLM?, measurement it belongs to)
RUNS = {
    "stock": (["--child", "stock"], True, "steering"),
    "ours": (["--child", "ours", "--measure", "idle,one_layer,all_layers,specs,update"], False, "steering"),
    "update": (["--child", "ours", "--measure", "update"], False, "update-latency"),
    "capture": (["--child", "capture"], False, "capture"),
    "hooks": (["--child", "stock", "--eager", "--hooks"], True, "seed-hooks"),
    "parity_eager": (["--child", "parity", "--eager"], False, "parity"),
    "parity_graphs": (["--child", "parity"], False, "parity"),
}


def summarize(results: dict) -> None:
    """Ratios against stock (best/best, mean/mean over every stock run of this benchmark run) and the eager
    against graphs comparison, beside the raw runs."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    stock = [x for k, v in results.items() if k.startswith("stock") and isinstance(v, dict) for x in v.get("runs", [])]
    if stock:
        results["stock_runs"] = stock
        ratios = {}
        for k, v in results.items():
            if k.startswith("ours") and isinstance(v, dict):
                ratios.update({m: {"best": round(max(r) / max(stock), 3), "mean": round(mean(r) / mean(stock), 3),
                                   "runs": r} for m, r in v.get("runs", {}).items() if r})
            if k == "hooks" and v.get("runs"):
                ratios["seed_hooks_eager"] = {"best": round(max(v["runs"]) / max(stock), 3),
                                              "mean": round(mean(v["runs"]) / mean(stock), 3), "runs": v["runs"]}
        results["ratios"] = ratios
        ours = results.get("ours", {})
        if isinstance(results["stock"].get("probe_tokens"), list) and isinstance(ours.get("probe_idle"), list):
            # informational: random bf16 weights leave argmax fragile, and graphs differ around the steering op
            pairs = list(zip(results["stock"]["probe_tokens"], ours["probe_idle"]))
            results["probe_idle_vs_stock"] = {"prompts_equal": sum(a == b for a, b in pairs), "of": len(pairs)}
    e, g = results.get("parity_eager", {}), results.get("parity_graphs", {})
    if "global" in e and "global" in g:
        results["parity"] = {
            "tokens_eager_eq_graphs": all(e[k] == g[k] for k in ("global", "mixed", "alone", "specs64")),
            "tokens_eq_hf": all(r["global"] == r["hf"] for r in (e, g)),
            "mixed_batch_eq_alone": all(r["mixed"] == r["alone"] for r in (e, g)),
            "specs64_eager_eq_graphs": e["specs64"] == g["specs64"],
            "capture_err_vs_hf": {"eager": e["capture_err"], "graphs": g["capture_err"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="stock,ours", help=f"comma-separated, in order: {', '.join(RUNS)}")
    ap.add_argument("--shape", default="8b", choices=["0.6b", "8b"], help="random-weight Qwen3 shape")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every mode (alternating, in the steered engine)")
    ap.add_argument("--specs", default="16", help="distinct per-request spec counts measured by `ours`, e.g. 16,64")
    ap.add_argument("--capture-dtype", default="model", help="`capture`: the rows' dtype (model = the model's)")
    ap.add_argument("--profile", help="`capture`: py-spy the engine and its worker into this directory")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per run (one engine)")
    ap.add_argument("--measurement", help="the result's name (default: from the runs)")
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    ap.add_argument("--child")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--hooks", action="store_true")
    ap.add_argument("--measure", default="")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    parity_only = all(r.startswith("parity") for r in runs)
    shape = ("tiny-fp32" if parity_only else args.shape) + ("-smoke" if SMOKE else "")
    measurement = args.measurement or "+".join(dict.fromkeys(RUNS[r][2] for r in runs))
    passed = ["--shape", args.shape, "--rounds", str(args.rounds), "--specs", args.specs,
              "--capture-dtype", args.capture_dtype, *(["--profile", args.profile] if args.profile else [])]
    results: dict = {"workload": {"prompts": N_PROMPTS, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                                  "rounds": args.rounds, "smoke": SMOKE}}
    for run in runs:
        key = run if run not in results else f"{run}_again"  # stock,ours,stock brackets drift
        argv, stock, _ = RUNS[run]
        results[key] = spawn(f"{run}-{shape}", [*argv, *passed], args.child_timeout, plugins=not stock)
        summarize(results)
        card = next((v["card"] for v in results.values() if isinstance(v, dict) and "card" in v), "unknown")
        emit(dict(results), args.out, card=card, shape=shape, measurement=measurement)


if __name__ == "__main__":
    main()
