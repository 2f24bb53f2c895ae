"""For the tests that run chatspace's README examples: a deeper tiny model (the examples steer layers
up to 8) and HF's text as vLLM returns it."""

from __future__ import annotations

from typing import Any


def build_deep_tiny_qwen3(tokenizer_from: str, out: str, num_layers: int = 10, context: int = 4096) -> str:
    """The tiny Qwen3's widths, seed and tokenizer (copied from ``tokenizer_from``) with ``num_layers``
    layers and a ``context``-token window, written to ``out``; returns ``out``."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from steer_actors.testing.tiny_models import TINY_MODELS

    spec = TINY_MODELS["qwen3"]
    config = Qwen3Config(**{**spec["config"], "num_hidden_layers": num_layers, "max_position_embeddings": context})
    config.dtype = "float32"
    torch.manual_seed(spec["seed"])
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out


def oracle_text(oracle: Any, prompt: str, max_tokens: int, steering: Any = None) -> str:
    """HF's greedy text for ``prompt``, ending where vLLM stops (at EOS, which it leaves out)."""
    toks = oracle.greedy(oracle.tokenizer(prompt).input_ids, max_tokens, steering).token_ids
    eos = oracle.tokenizer.eos_token_id
    return oracle.tokenizer.decode(toks[:toks.index(eos)] if eos in toks else toks, skip_special_tokens=True)
