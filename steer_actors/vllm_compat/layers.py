"""What a patched decoder layer learns from vLLM while the model is built: which classes to patch, the layer
index, the steering settings in ``additional_config``, sizes and the TP rank."""

from __future__ import annotations

import importlib
import logging
import re
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

# Key under ``VllmConfig.additional_config``. vLLM hashes additional_config into the compile-cache key
# (``VllmConfig.compute_hash``), so anything we put here also keys torch.compile artifacts: a graph
# compiled by stock vLLM (no key) can never be loaded for a patched model, and vice versa.
CONFIG_KEY = "steer_actors"

# (module, class) of decoder layers whose forward returns ``(delta, residual)``. Subclasses that do
# not override ``forward`` (Mistral -> Llama, ...) are covered by their base.
DECODER_LAYERS: list[tuple[str, str]] = [
    ("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
    ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"),
    ("vllm.model_executor.models.qwen3", "Qwen3DecoderLayer"),
    ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeDecoderLayer"),
    ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeDecoderLayer"),
    ("vllm.model_executor.models.mistral", "MistralDecoderLayer"),
]

_WARNED: set[tuple[str, str]] = set()
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")


def decoder_layer_classes() -> Iterator[type]:
    for mod_name, cls_name in DECODER_LAYERS:
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except AttributeError as e:  # model absent in this vLLM build
            log.debug("steer_actors: skip %s.%s: %s", mod_name, cls_name, e)
            continue
        except ImportError as e:  # never silent: that model's layers would run unsteered
            if (mod_name, cls_name) not in _WARNED:
                _WARNED.add((mod_name, cls_name))
                log.warning("steer_actors: cannot patch %s.%s: %r", mod_name, cls_name, e)
            continue
        yield cls


def layer_index_from_prefix(prefix: str) -> int | None:
    m = _LAYER_RE.search(prefix or "")
    return int(m.group(1)) if m else None


def vllm_config_at_construction() -> Any:
    """The ``VllmConfig`` the model being built is built under (None outside a construction)."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # older layout
        from vllm.config.vllm import get_current_vllm_config_or_none
    return get_current_vllm_config_or_none()


def steering_config_at_construction() -> dict[str, Any] | None:
    """The ``additional_config[CONFIG_KEY]`` of the model being built, or None for a stock engine."""
    cfg = vllm_config_at_construction()
    if cfg is None:
        return None
    extra = cfg.additional_config
    return extra.get(CONFIG_KEY) if isinstance(extra, dict) else None


def hidden_size_at_construction(layer: torch.nn.Module) -> int:
    size = getattr(layer, "hidden_size", None)
    if size is None:
        from vllm.config import get_current_vllm_config

        size = get_current_vllm_config().model_config.get_hidden_size()
    return int(size)


def tp_rank_at_construction() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # parallel state not initialised (single process)
        return 0


def num_layers_at_construction() -> int:
    from vllm.config import get_current_vllm_config

    return int(get_current_vllm_config().model_config.hf_text_config.num_hidden_layers)


def scheduler_tokens_at_construction() -> int:
    """Most tokens one forward can hold (the scheduler's per-step budget)."""
    from vllm.config import get_current_vllm_config

    return int(get_current_vllm_config().scheduler_config.max_num_batched_tokens)


def max_batched_tokens_at_construction() -> int:
    from vllm.config import get_current_vllm_config

    sched = get_current_vllm_config().scheduler_config
    return int(max(sched.max_num_batched_tokens, getattr(sched, "max_num_seqs", 0), 8192)) + 512
