"""Greedy tokens on the GPU runner, tiny fp32 Qwen3 (run by ``bench/gpu.py --runs parity_eager,parity_graphs``):
global specs, a mixed batch of per-request specs and each request alone, and captured rows against HF. Run
once eager and once with CUDA graphs; ``bench/gpu.py`` compares the two."""

from __future__ import annotations


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

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # never a cluster already up
    path = build_tiny_model("qwen3")
    eng = SteerEngine(dict(model_name=path, dtype="float32", enforce_eager=eager, max_model_len=512,
                           gpu_memory_utilization=0.3, max_steering_slots=64))
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
    # 64 distinct per-request specs in one batch (every slot of the pool in use), eager against graphs
    many = [SteeringSpec(layers={k % 4: L(AddSpec(vector=v(), scale=1.0))}).to_wire() for k in range(64)]
    out["specs64"] = [r["token_ids"] for r in await eng.generate([prompts[k % 3] for k in range(64)], sp, None, many)]
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
