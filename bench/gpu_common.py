"""What every GPU benchmark shares: the random-weight checkpoints of the 0.6B and 8B shapes (built on the
GPU, no download), fresh token-id prompts, and throughput over them."""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072),
    "8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288),
}
N_PROMPTS, PROMPT_LEN, GEN_LEN = 512, 128, 256
VOCAB = 151936
# BENCH_SMOKE=1: the same code on a tiny model and a few prompts, on the CPU, so a change to a benchmark is run
# before it spends device time
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
if SMOKE:
    SHAPES = {k: dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      intermediate_size=512) for k in SHAPES}
    N_PROMPTS, PROMPT_LEN, GEN_LEN, VOCAB = 8, 16, 8, 2048


def build_checkpoint(shape: str, device: str = "cpu" if SMOKE else "cuda") -> str:
    out = Path(f"/tmp/bench-qwen3-{shape}{'-smoke' if SMOKE else ''}")
    if (out / "config.json").exists():
        return str(out)
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False,
                      **SHAPES[shape])
    cfg.dtype = "bfloat16"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # another step may look for it meanwhile
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.rename(out)
    except OSError:  # built by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(out)


def token_prompts(n=N_PROMPTS, length=PROMPT_LEN, seed=0):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, VOCAB - 100) for _ in range(length)] for _ in range(n)]


_SEEDS = iter(range(1000))
# Greedy tokens of a few fixed prompts, for checks beside the timings (prompt seed never used by throughput)
PROBE = dict(n=8, seed=5000, sp=dict(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False))


async def throughput(generate, n=N_PROMPTS, gen_len=GEN_LEN, reps=2, runs: list | None = None) -> float:
    """Best of ``reps`` (each appended to ``runs``: the spread tells what a ratio can resolve); every
    measurement gets prompts never seen before (no prefix-cache hits)."""
    best = 0.0
    for rep in range(reps):
        prompts = token_prompts(n, seed=next(_SEEDS))
        t = time.perf_counter()
        outs = await generate(prompts, dict(max_tokens=gen_len, temperature=0.0, ignore_eos=True, detokenize=False))
        dt = time.perf_counter() - t
        assert all(len(o) == gen_len for o in outs)
        best = max(best, n * gen_len / dt)
        if runs is not None:
            runs.append(round(n * gen_len / dt, 1))
    return best


def engine_facts(llm) -> dict:
    """What bounds an engine's batch: the KV cache it got (our capture buffer is allocated at model
    construction, so it comes out of the KV cache) and the scheduler's limits."""
    vc = llm.vllm_config
    return {"num_gpu_blocks": vc.cache_config.num_gpu_blocks, "block_size": vc.cache_config.block_size,
            "max_num_seqs": vc.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens}


def profile_processes(engine_pid: int, out_dir: str, seconds: int = 8) -> list:
    """py-spy (raw stacks per thread, 100 Hz, ``--nonblocking`` so the sampled run is not slowed) of the engine
    actor and of every vLLM process below it (the engine core and its workers run the GPU's forwards), for
    ``seconds``. Returns the samplers to wait for; none where py-spy is not installed."""
    import shutil
    import subprocess

    import psutil

    if shutil.which("py-spy") is None:
        print("profile: py-spy is not installed (pip install py-spy); running unprofiled", flush=True)
        return []
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    procs = [psutil.Process(engine_pid), *psutil.Process(engine_pid).children(recursive=True)]
    out = []
    for i, p in enumerate(procs):
        name = "engine" if i == 0 else f"vllm_{p.pid}"
        out.append(subprocess.Popen(["py-spy", "record", "-p", str(p.pid), "-d", str(seconds), "-r", "100", "-t",
                                     "--nonblocking", "-f", "raw", "-o", str(Path(out_dir) / f"prof_{name}.txt")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out
