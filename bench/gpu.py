"""GPU benchmark: steering against stock vLLM on the same card, in the same session.

    python bench/gpu.py --runs parity_eager,parity_graphs --out $OUT/parity.json       (V2 runner checks, tiny fp32)
    python bench/gpu.py --model 0.6b --runs stock,ours,stock --out $OUT/b06.json      (stock twice brackets drift)
    python bench/gpu.py --model 0.6b --runs capture,hooks --out $OUT/b06b.json
    python bench/gpu.py --model 8b --runs stock,ours --out $OUT/b8.json

Each run is a fresh subprocess in its own session (killed whole on a timeout, so no engine keeps the GPU
for the next run; BENCH_CHILD_TIMEOUT_S). Prompts are random token ids with ``ignore_eos`` so every mode
does the same work; throughput = generated tokens / wall time. Budget: an engine start with graphs is
70-110 s at 0.6B; a device call may last 10 minutes, so put at most three runs in one call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_capture import run_capture
from gpu_common import (GEN_LEN, N_PROMPTS, PROBE, PROMPT_LEN, REPO, build_checkpoint, engine_facts,
                        throughput, token_prompts)


def _engine_kwargs(model: str, eager: bool) -> dict:
    return dict(model=model, dtype="bfloat16", enforce_eager=eager, skip_tokenizer_init=True, max_model_len=1024,
                gpu_memory_utilization=0.85, seed=0)


async def run_stock(model: str, eager: bool, hooks: bool) -> dict:
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
    # best of as many runs as each steered mode gets (sessions 6-7 ran ours best of 1 against stock best of 3)
    runs: list = []
    tps = await throughput(generate, reps=int(os.environ.get("BENCH_ROUNDS", "3")), runs=runs)
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


def _request_specs(hidden: int, layers: int, n: int = 16) -> list:
    """``n`` distinct per-request specs, each add + cap on two layers."""
    import torch

    from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec

    g = torch.Generator().manual_seed(1)
    v = lambda: torch.randn(hidden, generator=g)  # noqa: E731
    return [SteeringSpec(layers={(k + d) % layers: LayerSteeringSpec(operations=[
        AddSpec(vector=v(), scale=0.1), ProjectionCapSpec(vector=v(), min=-4.0, max=4.0)]) for d in (0, layers // 2)})
        for k in range(n)]


async def run_ours(model: str, eager: bool, measure: list[str]) -> dict:
    from steer_actors.engine.actor import SteerEngine
    from steer_actors.specs import SteeringSpec

    t0 = time.perf_counter()
    eng = SteerEngine(dict(model_name=model, dtype="bfloat16", enforce_eager=eager, max_model_len=1024,
                           gpu_memory_utilization=0.85, max_steering_slots=16,
                           engine_kwargs={"skip_tokenizer_init": True}))
    res: dict = {"start_s": time.perf_counter() - t0, "engine": engine_facts(eng.engine)}
    info = await eng.info()
    one, all_layers = _specs(info["hidden_size"], info["num_layers"])
    per_request = [s.to_wire() for s in _request_specs(info["hidden_size"], info["num_layers"])]
    request_specs: list = []  # set per mode: [] = none, else one of 16 specs per prompt

    async def generate(prompts, sp):
        specs = [request_specs[i % len(request_specs)] for i in range(len(prompts))] if request_specs else None
        return [r["token_ids"] for r in await eng.generate(prompts, sp, None, specs)]

    modes = [(n, sp, rs) for n, sp, rs in [("idle", SteeringSpec(), []), ("one_layer", one, []),
                                           ("all_layers", all_layers, []), ("specs16", SteeringSpec(), per_request)]
             if n in measure]
    if modes:
        await throughput(generate, reps=1)  # warm-up: first-use kernels and allocator growth
        # the change paths on this runner: a spec applied globally and the same spec per request (the two
        # kinds of table, loaded by the same code) give the same greedy tokens, and not the unsteered ones
        try:  # a failed check must not cost the timings
            probeprompts = token_prompts(PROBE["n"], seed=PROBE["seed"])
            res["probe_idle"] = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            await eng.apply_spec(one.to_wire())
            steered_global = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            await eng.apply_spec(SteeringSpec().to_wire())
            request_specs[:] = [one.to_wire()]
            steered_request = [list(t) for t in await generate(probeprompts, PROBE["sp"])]
            # bf16 random weights: a greedy argmax flips with the batch alone (session 12, 8B: the idle engine
            # matched stock on 1 of 8 prompts), so how many prompts agree says more than one boolean
            same = lambda a, b: sum(x == y for x, y in zip(a, b))  # noqa: E731
            res["probe_checks"] = {"global_equals_request": steered_global == steered_request,
                                   "steered_differs_from_idle": steered_global != res["probe_idle"],
                                   "prompts_global_eq_request": same(steered_global, steered_request),
                                   "prompts_global_eq_idle": same(steered_global, res["probe_idle"]),
                                   "of": len(probeprompts)}
        except Exception as e:
            res["probe_checks"] = {"error": repr(e)[:500]}
        request_specs[:] = []
    # Rounds over the modes (not one mode after another), so drift over time hits every mode alike.
    for _ in range(int(os.environ.get("BENCH_ROUNDS", "3"))):
        for name, spec, rs in modes:
            await eng.apply_spec(spec.to_wire())
            request_specs[:] = rs
            res[name] = max(res.get(name, 0.0), await throughput(generate, reps=1,
                                                                   runs=res.setdefault("runs", {}).setdefault(name, [])))
        print("RESULT=" + json.dumps(res), flush=True)  # partial results survive a timeout
    request_specs[:] = []
    if "update" in measure:
        await eng.apply_spec(SteeringSpec().to_wire())
        # load that outlasts the 100 updates below (~4x one throughput batch)
        bg = asyncio.create_task(generate(token_prompts(2 * N_PROMPTS, seed=9), dict(max_tokens=2 * GEN_LEN, ignore_eos=True,
                                                                                  detokenize=False, temperature=0.0)))
        await asyncio.sleep(1.5)

        def pct(xs):
            xs = sorted(xs)
            return {"p50": xs[len(xs) // 2], "p99": xs[max(0, int(len(xs) * 0.99) - 1)], "max": xs[-1]}

        async def series(worker_switch_s: float) -> dict:
            """100 changes, alternating one-layer and all-layer, with the worker processes' GIL switch interval
            at ``worker_switch_s``; the garbage collector's pauses in this process meanwhile."""
            import gc

            await eng.engine.collective_rpc("steer_switch_interval", args=(worker_switch_s,))
            lat, parts, exch, pauses, started = [], [], [], [], {}

            def gc_timer(phase, info):
                if phase == "start":
                    started["t"] = time.perf_counter()
                elif "t" in started:
                    pauses.append((info["generation"], (time.perf_counter() - started.pop("t")) * 1e3))

            gc.callbacks.append(gc_timer)
            for i in range(100):
                t = time.perf_counter()
                await eng.apply_spec((one if i % 2 == 0 else all_layers).to_wire())
                lat.append((time.perf_counter() - t) * 1000)
                worker = (eng._channel["steer"].last_timing or [None])[0] if eng._channel else None
                parts.append(None if worker is None else [*worker, *eng.last_apply_ms])
                exch.append(dict(eng._channel["steer"].last_exchange_ms) if eng._channel else {})
                await asyncio.sleep(0.02)
            gc.callbacks.remove(gc_timer)
            out = {"ms": {**pct(lat), "n": len(lat)}, "all_layer_ms": pct(lat[1::2]),
                   "worker_switch_interval_s": worker_switch_s,
                   # a full collection walks every object of the process (vLLM's too): a candidate for the spikes
                   "gc_pauses": {f"gen{g}": {"n": sum(1 for x, _ in pauses if x == g),
                                             "max_ms": round(max([d for x, d in pauses if x == g], default=0.0), 2)}
                                 for g in (0, 1, 2)}}
            if all(parts):  # worker side of each change: unpacking + building rows, waiting for the lock, copying
                out["worker_ms"] = {k: pct([p[j] for p in parts]) for j, k in enumerate(["build", "lock_wait", "copy"])}
                # the engine's share: validating + building rows, and the whole exchange with the worker (which
                # holds the worker's share and the wake-ups of the engine's event loop)
                out["engine_ms"] = {k: pct([p[3 + j] for p in parts]) for j, k in enumerate(["build", "exchange"])}
            if all(exch):  # the exchange on the engine's side: packing, waiting for the client's turn, sending,
                # the workers' replies (read by a reader callback on the loop), then the loop resuming the call
                out["exchange_ms"] = {k: pct([e[k] for e in exch]) for k in exch[0]}
            return out

        # Python's 5 ms in the workers (what ships), then 0.5 ms: session 9 saw the worker's copy wait for the
        # GIL (p50 0.22 ms, p99 6.3 ms); the engine side no longer hands the exchange to a thread
        upd = await series(0.005)
        res["update_worker_switch_0.5ms"] = await series(0.0005)
        await eng.engine.collective_rpc("steer_switch_interval", args=(0.005,))
        running = not bg.done()  # the updates must all have landed while the batch was decoding
        await bg
        res["update_ms"] = {**upd["ms"], "all_while_decoding": running}
        for k in ("worker_ms", "engine_ms", "exchange_ms", "all_layer_ms", "worker_switch_interval_s", "gc_pauses"):
            if k in upd:
                res["update_" + k] = upd[k]
        await eng.apply_spec(SteeringSpec().to_wire())
        # what 0.5 ms in the workers costs the runner: idle throughput, alternating with Python's 5 ms
        for r in range(int(os.environ.get("BENCH_SWITCH_ROUNDS", "2"))):
            for w in (0.0005, 0.005):
                await eng.engine.collective_rpc("steer_switch_interval", args=(w,))
                runs = res.setdefault("idle_by_worker_switch", {}).setdefault(f"{w * 1e3:g}ms", [])
                await throughput(generate, reps=1, runs=runs)
            print("RESULT=" + json.dumps(res), flush=True)
        await eng.engine.collective_rpc("steer_switch_interval", args=(0.005,))
    eng.engine.shutdown()
    return res


async def run_parity(eager: bool) -> dict:
    """fp32 tiny Qwen3 on the GPU runner: greedy tokens under global specs, a mixed batch of per-request
    specs (and each request alone), and captured rows (plain and steered) vs HF; run once eager and
    once with graphs, the parent compares."""
    import ray
    import torch

    from steer_actors.engine.actor import SteerEngine
    from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
    from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
    from steer_actors.testing import build_tiny_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # not a cluster of another step
    path = build_tiny_model("qwen3")
    eng = SteerEngine(dict(model_name=path, dtype="float32", enforce_eager=eager, max_model_len=512,
                           gpu_memory_utilization=0.3, max_steering_slots=4))
    g = torch.Generator().manual_seed(1)
    v = lambda: torch.randn(256, generator=g)  # noqa: E731
    L = lambda *ops: LayerSteeringSpec(operations=list(ops))  # noqa: E731
    specs = {"none": SteeringSpec(),
             "add": SteeringSpec(layers={1: L(AddSpec(vector=v(), scale=1.5))}),
             "cap": SteeringSpec(layers={2: L(ProjectionCapSpec(vector=v(), min=0.5, max=1.0))}),
             "ablation": SteeringSpec(layers={1: L(AblationSpec(vector=v(), scale=3.0))}),
             "combo": SteeringSpec(layers={1: L(AddSpec(vector=v(), scale=1.0), AblationSpec(vector=v(), scale=0.0)),
                                           2: L(ProjectionCapSpec(vector=v(), max=0.0))})}
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(40, 70))]
    sp = dict(max_tokens=16, temperature=0.0, ignore_eos=True)
    out: dict = {"global": {}}
    for name, spec in specs.items():
        await eng.apply_spec(spec.to_wire())
        out["global"][name] = [r["token_ids"] for r in await eng.generate(prompts, sp)]
    await eng.apply_spec(SteeringSpec().to_wire())
    names = ["none", "add", "cap", "combo", "ablation", "add"]
    mixedprompts = [prompts[i % 3] for i in range(len(names))]
    mixed_specs = [None if n == "none" else specs[n].to_wire() for n in names]
    out["mixed"] = [r["token_ids"] for r in await eng.generate(mixedprompts, sp, None, mixed_specs)]
    out["alone"] = [(await eng.generate([p], sp, None, s))[0]["token_ids"] for p, s in zip(mixedprompts, mixed_specs)]
    out["mixed_names"] = names
    # capture: every layer, plain and under the combo spec; max error vs HF per case
    layers = [0, 1, 2, 3]
    from steer_actors.testing.hf_oracle import HFOracle

    oracle = HFOracle(path)
    out["capture_err"] = {}
    for name in ("none", "combo"):
        await eng.apply_spec(specs[name].to_wire())
        rs = await eng.generate(prompts, dict(sp, max_tokens=8), layers)
        hs = fetch_captures_batch([CaptureHandle.from_wire(r["captures"]) for r in rs])
        worst = 0.0
        for p, r, h in zip(prompts, rs, hs):
            full = p + r["token_ids"]
            assert h.positions == list(range(len(full) - 1)) and h.token_ids == full[:-1]
            ref = oracle.hidden_states(full[:-1], None if name == "none" else specs[name])
            for layer in layers:
                got = h.captures[layer][0]["hidden"]
                worst = max(worst, (got - ref[layer]).abs().max().item() / max(1.0, ref[layer].abs().max().item()))
        out["capture_err"][name] = worst
    out["arena"] = await eng.capture_arena_stats()  # mapped_segments > 0: rows written by the GPU (capture_direct)
    out["hf"] = {name: [oracle.greedy(p, 16, spec if not spec.is_empty() else None).token_ids for p in prompts]
                 for name, spec in specs.items()}
    eng.engine.shutdown()
    return out


def child(args) -> None:
    import torch

    try:
        if args.child == "stock":
            res = asyncio.run(run_stock(build_checkpoint(args.model), args.eager, args.hooks))
        elif args.child == "ours":
            res = asyncio.run(run_ours(build_checkpoint(args.model), args.eager, args.measure.split(",")))
        elif args.child == "capture":
            res = run_capture(build_checkpoint(args.model))
        else:
            res = asyncio.run(run_parity(args.eager))
    except Exception as e:  # after partial RESULT lines, the error must be the last word
        import traceback

        print("RESULT=" + json.dumps({"error": repr(e)[:2000], "trace": traceback.format_exc()[-3000:]}), flush=True)
        raise
    res["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print("RESULT=" + json.dumps(res), flush=True)  # the parent keeps the last RESULT line


def spawn(name: str, argv: list[str], plugins: bool = True, timeout_s: float | None = None) -> dict:
    """One mode in a fresh process (its own session: on a timeout the whole tree goes, so no engine is
    left holding the GPU for the next mode)."""
    import signal

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if not plugins:
        env["VLLM_PLUGINS"] = ""
    timeout_s = timeout_s or float(os.environ.get("BENCH_CHILD_TIMEOUT_S", "1800"))
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


RUNS = {
    "stock": lambda m: spawn(f"stock-{m}", ["--child", "stock", "--model", m], plugins=False),
    "ours": lambda m: spawn(f"ours-{m}", ["--child", "ours", "--model", m,
                                          "--measure", "idle,one_layer,all_layers,specs16,update"]),
    "update_only": lambda m: spawn(f"update-{m}", ["--child", "ours", "--model", m, "--measure", "update"]),
    "ours_update": lambda m: spawn(f"ours-update-{m}", ["--child", "ours", "--model", m, "--measure", "idle,update"]),
    "capture": lambda m: spawn(f"capture-{m}", ["--child", "capture", "--model", m]),
    "stock_eager": lambda m: spawn(f"stock-eager-{m}", ["--child", "stock", "--model", m, "--eager"], plugins=False),
    "hooks": lambda m: spawn(f"hooks-{m}", ["--child", "stock", "--model", m, "--eager", "--hooks"], plugins=False),
    "ours_eager": lambda m: spawn(f"ours-eager-{m}", ["--child", "ours", "--model", m, "--eager", "--measure",
                                                       "all_layers"]),
    "parity_graphs": lambda m: spawn("parity-graphs", ["--child", "parity"]),
    "parity_eager": lambda m: spawn("parity-eager", ["--child", "parity", "--eager"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--model", default="0.6b")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--hooks", action="store_true")
    ap.add_argument("--measure", default="")
    ap.add_argument("--runs", default="")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    results = {"model": args.model, "nprompts": N_PROMPTS, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN}
    for run in args.runs.split(","):
        key = run if run not in results else f"{run}_again"
        results[key] = RUNS[run](args.model)
        stock, ours = results.get("stock", {}), results.get("ours", {})
        if isinstance(stock.get("probe_tokens"), list) and isinstance(ours.get("probe_idle"), list):
            # informational: random weights leave argmax fragile, and graphs differ around the steering op
            pairs = list(zip(stock["probe_tokens"], ours["probe_idle"]))
            results["probe_idle_vs_stock"] = {"prompts_equal": sum(a == b for a, b in pairs), "of": len(pairs)}
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
