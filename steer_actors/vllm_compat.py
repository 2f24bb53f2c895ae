"""Everything that depends on the vLLM version, in one place (CPU: vLLM 0.32 V1 runner; GPU: 0.26 V2 runner).

The rest of the package talks to vLLM only through these functions.
"""

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


def steering_config_at_construction() -> dict[str, Any] | None:
    """The ``additional_config[CONFIG_KEY]`` of the model being built, or None for a stock engine."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:  # older layout
        from vllm.config.vllm import get_current_vllm_config_or_none
    cfg = get_current_vllm_config_or_none()
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


def worker_model(worker: Any) -> torch.nn.Module:
    """The nn.Module a worker runs, unwrapped from CUDA-graph / ubatch wrappers (V1 and V2 runners)."""
    model = worker.model_runner.get_model()
    while not isinstance(model, torch.nn.Module) and hasattr(model, "unwrap"):
        model = model.unwrap()
    if not isinstance(model, torch.nn.Module):
        model = getattr(model, "runnable", model)
    return model


def tp_rank_at_construction() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # parallel state not initialised (single process)
        return 0


def tp_rank(worker: Any) -> int:
    return int(getattr(worker, "rank", 0))


def engine_args(**kwargs: Any) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**kwargs)


def keep_off_multicast(env: Any = None) -> None:
    """A host that turns NVLink multicast off (``NCCL_NVLS_ENABLE=0``; on shared GPU hosts multicast can take
    every card out of service) must not get it through vLLM either: with TP > 1 and compilation, vLLM 0.26
    fuses all-reduce + RMSNorm through FlashInfer and picks its multicast ("mnnvl") workspace by itself
    (seen on an H100 host, whose engines then failed in ``cublasCreate``). Name the IPC backend unless the
    user chose one; Ray-executor workers inherit the engine's environment."""
    import os

    env = os.environ if env is None else env
    if env.get("NCCL_NVLS_ENABLE") == "0":
        env.setdefault("VLLM_FLASHINFER_ALLREDUCE_BACKEND", "trtllm")


def make_async_llm(args: Any, placement_group: Any = None) -> Any:
    """``AsyncLLM`` from engine args; with ``placement_group``, vLLM's Ray executor places its workers
    in it (the engine core runs in a subprocess that is not a Ray task, so it cannot find the group
    on its own)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor import Executor

    import os

    import ray

    keep_off_multicast()
    if args.distributed_executor_backend == "ray" and ray.is_initialized():
        # The engine core subprocess joins Ray as a driver of its own; without an address it takes the
        # cluster last started on this host, which need not be the one holding the placement group.
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if placement_group is None:
        return AsyncLLM.from_engine_args(args)
    vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    pc = vllm_config.parallel_config
    pc.placement_group = placement_group
    if pc.data_parallel_size == 1 and not pc.data_parallel_master_port:
        # vLLM 0.26's Ray executor puts the TCPStore at data_parallel_master_port + 100 (+ a 32-port
        # window): with no DP that is port 100 for every engine of a host, and two TP engines starting
        # together fail with EADDRINUSE (seen on a 4-GPU host). A free base port per engine avoids it.
        from vllm.utils.network_utils import get_open_port

        pc.data_parallel_master_port = get_open_port()
    return AsyncLLM(vllm_config=vllm_config, executor_class=Executor.get_class(vllm_config),
                    log_requests=args.enable_log_requests, log_stats=not args.disable_log_stats,
                    start_engine_loop=True, usage_context=UsageContext.ENGINE_CONTEXT)


def install_step_probe(worker: Any, listener: Any = None) -> None:
    """Hook the model runner once: every forward is enqueued under :data:`steer_actors.channel.LOCK`
    (so request-slot loads land between forwards) after switching to the newest committed copy of the
    global rows (:mod:`steer_actors.double_buffer`), and ``listener`` learns the batch layout of each
    forward: ``begin_step(req_ids, query_start_loc, positions, input_ids, num_padded)`` after the
    runner built its inputs, ``end_step()`` once the forward is enqueued.

    * V1 runner (vLLM 0.32 CPU; 0.26 GPU with the V1 runner): ``_model_forward`` is the hook point
      vLLM documents for subclasses; the batch is ``input_batch`` + ``query_start_loc``.
    * V2 GPU runner (vLLM 0.26 default): ``prepare_inputs`` returns the step's ``InputBatch`` (request
      order, query start locations, device positions and input ids, padded size); ``execute_model``
      runs the forward (eager, piecewise or full graph) and returns before sampling.
    """
    runner = worker.model_runner
    listeners = runner.__dict__.get("_steer_listeners")
    if listeners is None:
        if hasattr(runner, "_model_forward") and hasattr(runner, "query_start_loc"):
            wrap = _probe_v1
        elif hasattr(runner, "prepare_inputs") and hasattr(runner, "execute_model"):
            wrap = _probe_v2
        else:
            raise RuntimeError(f"steer_actors does not know this model runner ({type(runner)})")
        listeners = runner._steer_listeners = []
        wrap(runner, listeners)
    if listener is not None and listener not in listeners:
        listeners.append(listener)


def _end(listeners: list) -> None:
    for lst in listeners:
        lst.end_step()


def _probe_v1(runner: Any, listeners: list) -> None:
    from .channel import LOCK, note_forward_stream, run_pending
    from .double_buffer import SELECTOR

    orig = runner._model_forward

    def probed(*args: Any, **kwargs: Any) -> Any:
        with LOCK:
            note_forward_stream()
            run_pending()  # changes waiting for a gap between forwards land before this one
            SELECTOR.at_forward_start()  # the newest committed copy of the global rows
            n = runner.input_batch.num_reqs
            req_ids = list(runner.input_batch.req_ids[:n])
            qsl = runner.query_start_loc.np[: n + 1]
            positions, input_ids = kwargs.get("positions"), kwargs.get("input_ids")
            padded = positions.shape[-1] if positions is not None else None
            for lst in listeners:
                lst.begin_step(req_ids, qsl, positions, input_ids, padded)
            try:
                return orig(*args, **kwargs)
            finally:
                _end(listeners)

    runner._model_forward = probed


def _probe_v2(runner: Any, listeners: list) -> None:
    """The lock is taken once the step's inputs are prepared and released when the forward is enqueued:
    the rest of ``execute_model`` (request bookkeeping, which may wait for the previous step's results
    under async scheduling) runs without it, so a change waits for a forward's launch, not for a step."""
    from .channel import LOCK, note_forward_stream, run_pending
    from .double_buffer import SELECTOR

    orig_prepare, orig_execute = runner.prepare_inputs, runner.execute_model

    def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
        batch = orig_prepare(*args, **kwargs)
        LOCK.acquire()
        runner._steer_locked = True
        note_forward_stream()
        run_pending()  # changes waiting for a gap between forwards land before this one
        SELECTOR.at_forward_start()  # the newest committed copy of the global rows
        n = batch.num_reqs
        for lst in listeners:
            lst.begin_step(list(batch.req_ids[:n]), batch.query_start_loc_np[: n + 1], batch.positions,
                           batch.input_ids, batch.num_tokens_after_padding)
        return batch

    def execute_model(*args: Any, **kwargs: Any) -> Any:
        try:
            return orig_execute(*args, **kwargs)
        finally:
            try:
                _end(listeners)
            finally:
                if runner.__dict__.pop("_steer_locked", False):
                    LOCK.release()

    runner.prepare_inputs, runner.execute_model = prepare_inputs, execute_model


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


def client_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions vLLM raises for bad requests (0.26: ValueError subclasses; 0.32: VLLMClientError)."""
    try:
        from vllm.exceptions import VLLMClientError

        return (TypeError, ValueError, VLLMClientError)
    except ImportError:
        return (TypeError, ValueError)
