"""Multi-GPU runs on one host with several raylets (``ray start`` twice = two simulated nodes).

    python bench/gpu_multi.py --part tp --out bench/results/     # 2+ GPUs: TP=2 (Ray executor) == TP=1
    python bench/gpu_multi.py --part app --out bench/results/    # 4 GPUs: two TP=2 replicas, one per raylet

``tp``: tiny fp32 Qwen3, steered greedy tokens of a TP=2 replica on vLLM's Ray executor (its own placement
group, made by steer_actors.control.replicas) against a TP=1 replica.
``app``: the Serve app with two TP=2 replicas (8B shape by default: GPU-bound, as served; the 0.6B shape
at TP=2 is bound by the host, which two replicas on one host share) pinned to raylets A and B: version
atomicity under concurrent readers and writers, a capture made on B fetched by this driver (on A), and
throughput of two replicas against one in the same run. It starts its own Ray cluster (port 6400) and
stops it at the end (``ray stop --force``): run it on a host where no other Ray cluster runs.
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

REPO = Path(__file__).resolve().parents[1]
PORT = 6400
sys.path.insert(0, str(REPO / "bench"))
from results_io import emit  # noqa: E402
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def start_raylets(gpus_a: str, gpus_b: str | None) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus_a}
    n_a = len(gpus_a.split(","))
    subprocess.run(["ray", "start", "--head", f"--port={PORT}", f"--num-gpus={n_a}", "--num-cpus=8",
                    "--resources", json.dumps({"raylet_a": 1}), "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True)
    if gpus_b:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus_b}
        subprocess.run(["ray", "start", f"--address=127.0.0.1:{PORT}", f"--num-gpus={len(gpus_b.split(','))}",
                        "--num-cpus=8", "--resources", json.dumps({"raylet_b": 1})], env=env, check=True,
                       capture_output=True)


def pin(raylet: str) -> dict:
    return {"actor_options": {"resources": {raylet: 0.01}}}


def part_tp(res: dict) -> dict:
    import ray
    import torch

    from steer_actors.config import VLLMSteeringConfig
    from steer_actors.control.replicas import start_replicas, stop_replicas
    from steer_actors.specs import AddSpec, AblationSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
    from steer_actors.testing import build_tiny_model

    start_raylets("0,1", "2" if torch.cuda.device_count() > 2 else None)
    ray.init(address=f"127.0.0.1:{PORT}", log_to_driver=True)  # engine start failures show their cause
    path = build_tiny_model("qwen3")
    base = dict(model_name=path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                enforce_eager=True)  # the check is TP=2 == TP=1; graphs are covered by the parity step
    tp2 = start_replicas(VLLMSteeringConfig(**base, tensor_parallel_size=2, distributed_executor_backend="ray",
                                            **pin("raylet_a")), "tp2")
    one_raylet = torch.cuda.device_count() <= 2
    g = torch.Generator().manual_seed(3)
    v = lambda: torch.randn(256, generator=g)  # noqa: E731
    L = lambda *ops: LayerSteeringSpec(operations=list(ops))  # noqa: E731
    spec = SteeringSpec(layers={1: L(AddSpec(vector=v(), scale=1.5), AblationSpec(vector=v(), scale=0.0)),
                                2: L(ProjectionCapSpec(vector=v(), max=0.0))})
    prompts = [[5, 6, 7, 8, 9, 10], [100, 200, 300], list(range(40, 70))]
    sp = dict(max_tokens=16, temperature=0.0, ignore_eos=True)

    def tokens(handle):
        ray.get(handle.apply_spec.remote(spec.to_wire()))
        steered = [r["token_ids"] for r in ray.get(handle.generate.remote(prompts, sp))]
        per_req = [r["token_ids"] for r in ray.get(handle.generate.remote(prompts, sp, None, [None, spec.to_wire(),
                                                                                             None]))]
        return steered, per_req, ray.get(handle.worker_state.remote())

    t = time.perf_counter()
    a_steered, a_req, a_ranks = tokens(tp2[0].handle)
    res.update(tp2_start_and_run_s=time.perf_counter() - t, tp2_ranks=len(a_ranks))
    if one_raylet:
        stop_replicas(tp2)
        _wait_gpus_free()
    tp1 = start_replicas(VLLMSteeringConfig(**base, **pin("raylet_a" if one_raylet else "raylet_b")), "tp1")
    b_steered, b_req, _ = tokens(tp1[0].handle)
    res.update(tp2_equals_tp1=a_steered == b_steered, tp2_equals_tp1_per_request=a_req == b_req,
               steered=a_steered, tp1=b_steered, per_request_tp2=a_req, per_request_tp1=b_req)
    stop_replicas(tp1 + ([] if one_raylet else tp2))
    return res


def _wait_gpus_free(limit_s: float = 90.0) -> None:
    """Until the visible GPUs hold < 2 GiB (a stopped replica's workers take a moment to exit)."""
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")
    end = time.time() + limit_s
    while time.time() < end:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        used = {i.strip(): int(m) for i, m in (ln.split(",") for ln in out.strip().splitlines())}
        if all(used.get(i, 0) < 2048 for i in ids):
            return
        time.sleep(1.0)


async def _timed(calls) -> float:
    t = time.perf_counter()
    await asyncio.gather(*calls)
    return time.perf_counter() - t


def part_app(res: dict, shape: str = "8b") -> dict:
    import ray
    import torch
    from ray import serve

    from gpu_common import build_checkpoint, token_prompts

    from steer_actors.serve.app import build_app
    from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
    from steer_actors.specs import AddSpec, LayerSteeringSpec, SteeringSpec

    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                    f"import gpu_common; gpu_common.build_checkpoint({shape!r})"], check=True)
    model = build_checkpoint(shape)  # built above, in a process of its own (no CUDA context here)
    res["model"] = shape
    start_raylets("0,1", "2,3")
    ray.init(address=f"127.0.0.1:{PORT}", log_to_driver=True)  # a failed engine start shows its cause
    t = time.perf_counter()
    cfg = dict(model_name=model, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.85,
               tensor_parallel_size=2, distributed_executor_backend="ray", placement_strategy="STRICT_PACK",
               num_replicas=2, replica_overrides=[pin("raylet_a"), pin("raylet_b")],
               # vLLM 0.26 fuses all-reduce + RMSNorm through FlashInfer's "mnnvl" workspace, which needs NVSwitch
               # multicast; where multicast is off the engine cores fail in cublasCreate, so the fusion stays off
               engine_kwargs={"skip_tokenizer_init": True,
                              "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}})
    app = serve.run(build_app(cfg), name="steer", route_prefix="/steer")
    res["app_start_s"] = time.perf_counter() - t
    engines = [ray.get_actor(f"steer-engine-{i}", namespace="steer_actors") for i in range(2)]
    nodes = {n["NodeID"]: ("A" if "raylet_a" in n["Resources"] else "B") for n in ray.nodes() if n["Alive"]}
    res["replica_raylets"] = [nodes[ray.get(e.info.remote())["node_id"]] for e in engines]
    res["driver_raylet"] = nodes[ray.get_runtime_context().get_node_id()]
    res["ranks_per_replica"] = [len(ray.get(e.worker_state.remote())) for e in engines]
    hidden, n_layers = ray.get(engines[0].info.remote())["hidden_size"], ray.get(engines[0].info.remote())["num_layers"]
    g = torch.Generator().manual_seed(5)
    specs = [SteeringSpec(layers={k: LayerSteeringSpec(operations=[AddSpec(vector=torch.randn(hidden, generator=g),
                                                                           scale=0.5)]) for k in (3 + i, 20 - i)})
             for i in range(4)]
    sp = dict(max_tokens=32, temperature=0.0, ignore_eos=True, detokenize=False)

    async def atomicity():
        seen, committed = [], {}

        # Readers come back several times and writers space their changes out, so responses run on both sides
        # of changes (one burst of readers can all finish before the first change and see one version).
        async def reader(k):
            for j in range(4):
                out = await app.generate.remote(token_prompts(2, seed=1000 * j + k), sp)
                seen.extend((r["spec_version"], r["spec_fingerprint"]) for r in out)

        async def writer(k):
            await asyncio.sleep(0.1 * k)
            for j in range(4):
                st = await app.edit.remote({"action": "replace", "spec": specs[(k + j) % 4].to_wire()})
                committed[st["spec_version"]] = st["spec_fingerprint"]
                await asyncio.sleep(0.3)

        await asyncio.gather(*(reader(k) for k in range(48)), *(writer(k) for k in range(3)))
        return seen, committed

    seen, committed = asyncio.run(atomicity())
    ranks = [r for rep in ray.get(engines[0].worker_state.remote()) + ray.get(engines[1].worker_state.remote())
             for r in [rep]]
    final = app.get_spec.remote().result()
    res["atomicity"] = {
        "responses": len(seen), "versions_committed": len(committed),
        "versions_seen": len({v for v, _ in seen}),
        "every_response_names_a_committed_version": all(v == 0 or committed.get(v) == fp for v, fp in seen),
        "all_ranks_on_final_version": all(r["version"] == final["spec_version"] for r in ranks),
    }
    # capture on replica B, fetched here (raylet A)
    outs = ray.get(engines[1].generate.remote(token_prompts(16, seed=7), dict(sp, max_tokens=64), list(range(n_layers))))
    handles = [CaptureHandle.from_wire(o["captures"]) for o in outs]
    t = time.perf_counter()
    fetch_captures_batch(handles)
    dt = time.perf_counter() - t
    ref = ray.get(engines[0].generate.remote(token_prompts(16, seed=7)[:1], dict(sp, max_tokens=64), [0, n_layers - 1]))
    ref_h = fetch_captures_batch([CaptureHandle.from_wire(ref[0]["captures"])])[0]
    # bf16 random weights: another batch shape can flip a near-tied argmax, after which the two sequences (and
    # their rows) differ; compare the rows of the positions whose tokens agree
    full_b, full_a = token_prompts(16, seed=7)[0] + outs[0]["token_ids"], token_prompts(16, seed=7)[0] + ref[0]["token_ids"]
    agree = next((i for i, (x, y) in enumerate(zip(full_b, full_a)) if x != y), len(full_b))
    agree = min(agree, len(full_b) - 1)  # rows are prompt + generated - 1
    got, want = handles[0].captures[0][0]["hidden"][:agree], ref_h.captures[0][0]["hidden"][:agree]
    res["capture_cross_raylet"] = {
        "handles": 16, "bytes": sum(h.nbytes for h in handles), "seconds": dt,
        "GB_s": sum(h.nbytes for h in handles) / dt / 1e9,
        "rows_ok": all(h.captures[0][0]["hidden"].shape[0] == 128 + 64 - 1 for h in handles),
        "tokens_agree_rows": agree, "generated_equal": outs[0]["token_ids"] == ref[0]["token_ids"],
        "max_diff_vs_replica_A_layer0": (got - want).abs().max().item(),
        "rel_diff_vs_replica_A_layer0": ((got - want).abs().max() / want.abs().max()).item(),
        # the same rows against another prompt's: what "wrong rows" would look like
        "rel_diff_other_prompt_layer0": ((handles[1].captures[0][0]["hidden"][:128] - want[:128]).abs().max()
                                         / want.abs().max()).item(),
    }
    ray.get([e.release_captures.remote([h.capture_id]) for e, h in [(engines[1], h) for h in handles]])
    # throughput: the same load per replica (512 prompts x 128/256 in flight, 8 per call) on one replica,
    # then on both (1024): scaling out, not a batch split across more engines
    app.edit.remote({"action": "clear"}).result()
    big = dict(max_tokens=256, temperature=0.0, ignore_eos=True, detokenize=False)

    def chunks(seed, n):
        ps = token_prompts(n, seed=seed)
        return [ps[i:i + 8] for i in range(0, len(ps), 8)]

    async def one_replica(seed):
        return 512 * 256 / await _timed([engines[0].generate.remote(c, big) for c in chunks(seed, 512)])

    async def two_direct(seed):
        # each replica's own finish time too: a slower one shows apart from a shared bottleneck
        cs = chunks(seed, 1024)
        t = time.perf_counter()
        done = await asyncio.gather(*(_timed([engines[r].generate.remote(c, big) for c in cs[r::2]]) for r in (0, 1)))
        res.setdefault("two_direct_per_replica_s", []).append(done)
        return 1024 * 256 / (time.perf_counter() - t)

    async def two_app(seed):
        return 1024 * 256 / await _timed([app.generate.remote(c, big) for c in chunks(seed, 1024)])

    async def throughput():
        await two_direct(1)  # warm-up both
        out = res["throughput_runs"] = {"one_replica": [], "two_replicas_direct": [], "two_replicas_app": []}
        for r in range(2):
            out["one_replica"].append(await one_replica(10 + r))
            out["two_replicas_direct"].append(await two_direct(20 + r))
            out["two_replicas_app"].append(await two_app(30 + r))
        return {k: max(v) for k, v in out.items()}

    tps = asyncio.run(throughput())
    res["throughput_tok_s"] = tps
    res["scaling_direct"] = tps["two_replicas_direct"] / tps["one_replica"]
    res["scaling_app"] = tps["two_replicas_app"] / tps["one_replica"]
    serve.delete("steer")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["tp", "app"], required=True)
    ap.add_argument("--shape", default="8b", choices=["0.6b", "8b"], help="app: the checkpoint shape (bench/gpu.py)")
    ap.add_argument("--out", help="a file, or a directory (ending in /) for the standard name")
    args = ap.parse_args()
    import torch

    import signal

    class StepTimeout(BaseException):  # not an Exception: asyncio must not swallow it in a callback
        pass

    def on_term(*_):  # `timeout` ends a step with SIGTERM: write what was measured before going
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one must not interrupt the writing
        raise StepTimeout("step timed out (SIGTERM)")

    signal.signal(signal.SIGTERM, on_term)
    t = time.perf_counter()
    res: dict = {}  # filled as each phase ends: a later failure keeps what was measured
    try:
        part_tp(res) if args.part == "tp" else part_app(res, args.shape)
    except (Exception, StepTimeout) as e:
        import traceback

        res.update(error=repr(e), trace=traceback.format_exc()[-4000:])
    res["wall_s"] = time.perf_counter() - t
    emit(res, args.out, card=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
         shape="tiny-fp32" if args.part == "tp" else args.shape,
         measurement="tp2-parity" if args.part == "tp" else "multi-replica")
    import ray

    ray.shutdown()
    subprocess.run(["ray", "stop", "--force"], capture_output=True)


if __name__ == "__main__":
    main()
