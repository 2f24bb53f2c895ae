"""Compiled mode (torch.compile, enforce_eager=False) steers exactly like eager, changes take effect
without recompiling, and a compile cache written by stock vLLM is never reused for the patched model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from steer_actors.specs import AddSpec, LayerSteeringSpec, SteeringSpec
from steer_actors.testing import captures
from steer_actors.testing.engines import engine_lifetime, rand_vec
from steer_actors.testing.parity import SAMPLING, against_reference, apply, generate, parity_specs

pytestmark = pytest.mark.engine

STOCK_COMPILE = r"""
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=False)
out = llm.generate(["Hello world, the sea"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
print("STOCK=" + ",".join(map(str, out[0].outputs[0].token_ids)))
"""


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory, qwen3_path):
    """Stock vLLM (our plugin disabled) compiles the model first, into the cache the runtime will use."""
    root = tmp_path_factory.mktemp("vllm-cache")
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CACHE_ROOT": str(root), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", STOCK_COMPILE, qwen3_path], env=env, capture_output=True,
                          text=True, timeout=600)
    stock = [ln for ln in proc.stdout.splitlines() if ln.startswith("STOCK=")]
    assert stock, proc.stderr[-3000:]
    assert any((root / "torch_compile_cache").iterdir()), "stock run wrote no compile cache"
    return root, [int(t) for t in stock[0][6:].split(",")]


@pytest.fixture(scope="module")
def compiled_engine(ray_local, qwen3_path, compile_cache):
    root, _ = compile_cache
    yield from engine_lifetime(ray_local, model_name=qwen3_path, enforce_eager=False,
                               env={"VLLM_CACHE_ROOT": str(root)})


def test_compiled_equals_eager_and_hf(ray_local, compiled_engine, qwen3_engine, oracles):
    oracle = oracles["qwen3"]
    for name, spec, ids, compiled, eager in against_reference(ray_local, oracle, compiled_engine, qwen3_engine):
        assert [r["token_ids"] for r in compiled] == [r["token_ids"] for r in eager], name
        for r, p in zip(compiled, ids):
            assert r["token_ids"] == oracle.greedy(p, SAMPLING["max_tokens"], spec).token_ids, name


def test_stock_compile_cache_does_not_disable_steering(ray_local, compiled_engine, compile_cache, oracles):
    """The runtime compiled into the cache dir stock vLLM filled; steering still bites, and unsteered
    tokens still equal stock's."""
    _, stock_tokens = compile_cache
    oracle = oracles["qwen3"]
    ids = oracle.tokenizer("Hello world, the sea").input_ids
    spec = parity_specs(oracle, [ids])["add"]
    apply(ray_local, compiled_engine, None)
    plain = generate(ray_local, compiled_engine, [ids], dict(SAMPLING, max_tokens=8))[0]["token_ids"]
    apply(ray_local, compiled_engine, spec)
    steered = generate(ray_local, compiled_engine, [ids], dict(SAMPLING, max_tokens=8))[0]["token_ids"]
    apply(ray_local, compiled_engine, None)
    assert plain == stock_tokens
    assert steered != stock_tokens and steered == oracle.greedy(ids, 8, spec).token_ids


def test_capture_in_compiled_mode_matches_hf(ray_local, compiled_engine, oracles):
    """Capture is written by the steering op itself (graph-safe), so a compiled engine captures the
    same rows as HF, steered or not."""
    results, handles = captures.capture(ray_local, compiled_engine)
    captures.assert_matches_hf(oracles["qwen3"], captures.PROMPTS, results, handles)
    spec = SteeringSpec(layers={2: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(5), scale=3.0)])})
    captures.assert_steered_capture_matches_hf(ray_local, compiled_engine, oracles["qwen3"], spec)
