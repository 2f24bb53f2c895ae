"""Starting ``AsyncLLM`` and reading its errors: engine arguments, the Ray executor's placement group and
ports, and the exceptions vLLM raises for bad requests."""

from __future__ import annotations

from typing import Any


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

    from steer_actors import envs

    env = os.environ if env is None else env
    if envs.VARIABLES["NCCL_NVLS_ENABLE"].read(env) == "0":
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


def client_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions vLLM raises for bad requests (0.26: ValueError subclasses; 0.32: VLLMClientError)."""
    try:
        from vllm.exceptions import VLLMClientError

        return (TypeError, ValueError, VLLMClientError)
    except ImportError:
        return (TypeError, ValueError)
