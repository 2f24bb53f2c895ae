"""Deterministic tiny Qwen3 / Llama checkpoints with a locally trained byte-level BPE tokenizer.

No model hub: the tokenizer is trained on text shipped with Python, the weights come from a fixed
seed, and both are cached on disk under ``$STEER_ACTORS_CACHE`` (default ``~/.cache/steer_actors``).
head_dim is 64 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

VOCAB_SIZE = 1024
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # Larger than HF's 0.02 so greedy decoding has clear margins (no near-ties between HF and vLLM).
    initializer_range=0.08,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_MODELS: dict[str, dict] = {
    "qwen3": dict(arch="Qwen3ForCausalLM", config=dict(_COMMON, rope_theta=1_000_000.0), seed=1234),
    "llama": dict(arch="LlamaForCausalLM", config=dict(_COMMON, rope_theta=10_000.0), seed=4321),
}


def _corpus() -> list[str]:
    import codecs
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    texts = [codecs.decode(this.s, "rot13")]
    for obj in (str, list, dict, set, int, float, bytes, tuple, range, open, print, sorted, zip, map, len):
        if obj.__doc__:
            texts.append(obj.__doc__)
    texts += [
        "The quick brown fox jumps over the lazy dog. Steering vectors move a model along a concept direction.",
        "Once upon a time there was a small model that liked to talk about the weather, the sea and cats.",
    ]
    return texts


def _cache_root() -> Path:
    return Path(os.environ.get("STEER_ACTORS_CACHE", Path.home() / ".cache" / "steer_actors"))


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_tiny_model(name: str = "qwen3") -> str:
    """Build (once) and return the local path of tiny model ``name`` ("qwen3" or "llama")."""
    import torch
    import transformers

    spec = TINY_MODELS[name]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + b"v1").hexdigest()[:10]
    out = _cache_root() / f"tiny-{name}-{key}"
    if (out / ".complete").exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".tiny-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build it once
        if (out / ".complete").exists():
            return str(out)
        out.mkdir(exist_ok=True)
        _build_tokenizer(out)
        cls = getattr(transformers, spec["arch"])
        config = getattr(transformers, spec["arch"].replace("ForCausalLM", "Config"))(**spec["config"])
        config.dtype = "float32"
        torch.manual_seed(spec["seed"])
        model = cls(config).to(torch.float32)
        model.save_pretrained(out, safe_serialization=True)
        (out / ".complete").touch()
    return str(out)
