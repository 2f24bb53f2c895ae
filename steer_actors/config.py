"""``VLLMSteeringConfig``: the one config object that describes an engine (and, in Serve, the app)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class VLLMSteeringConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(description="HF model name or local checkpoint path")
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = Field(
        default=False, description="False: torch.compile, and CUDA graphs on GPU (steering is graph-safe). "
                                   "True: eager, ~2x faster engine start")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bootstrap_layers: list[int] | None = Field(
        default=None, description="decoder layers that can be steered, fixed at engine start; None = all")
    max_ops_per_layer: int = Field(default=4, ge=1, le=64)
    max_steering_slots: int = Field(
        default=8, ge=0, le=256, description="distinct per-request specs resident at once; more wait their turn")
    # CPU only: KV cache size and OpenMP binding (TP=2 on 2 cores needs "0|1").
    cpu_kvcache_space_gib: int = 1
    cpu_omp_threads_bind: str | None = None
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vLLM AsyncEngineArgs")
    capture_budget_bytes: int = Field(default=2 << 30, description="per engine; captures beyond it are refused")
    capture_ttl_s: float = Field(default=3600.0, description="captures not released are dropped after this")
    capture_rows_per_step: int | None = Field(
        default=None, ge=0, description="device capture buffer, in tokens per forward (every layer): "
                                        "None = max_num_batched_tokens (never overflows); 0 = capture off, no buffer")
    worker_switch_interval_s: float | None = Field(
        default=None, ge=1e-5, le=1.0, description="GIL switch interval of the vLLM worker processes (None: "
                                                   "Python's 5 ms); lower shortens a change's wait for the GIL "
                                                   "while the runner's thread runs Python")
    capture_dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        default="model", description="what captured rows are stored as: the model's dtype (its residual stream "
                                     "is held in it between layers; half of float32's bytes for bf16) or float32")
    env: dict[str, str] = Field(default_factory=dict, description="environment for the engine's processes")

    # ---- serving (Ray Serve app) ----
    num_replicas: int = Field(default=1, ge=1, description="engine replicas behind one coordinator")
    replica_overrides: list[dict[str, Any]] = Field(
        default_factory=list, description="per-replica changes to the engine fields above, by replica index")
    actor_options: dict[str, Any] = Field(
        default_factory=dict, description="Ray options for the engine actor (e.g. resources to pin it to a node); "
                                          "per replica through replica_overrides")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK", description="placement group of a Ray-executor (TP on GPU) replica: engine + TP bundles")
    max_ongoing_requests: int = Field(
        default=1024, description="Serve's per-replica cap for ingress and coordinator (Serve's default of 5 "
                                  "would throttle an LLM; the engine does its own batching and queueing)")
    max_body_bytes: int = Field(default=64 << 20, description="largest HTTP body accepted (413 beyond)")

    @field_validator("bootstrap_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0):
            raise ValueError("bootstrap_layers must be None (all) or a non-empty list of indices >= 0")
        return sorted(set(v)) if v is not None else None

    SERVING_FIELDS: ClassVar[frozenset[str]] = frozenset({"num_replicas", "replica_overrides", "max_ongoing_requests", "max_body_bytes"})

    def engine_hash(self) -> str:
        """What an engine was started with (serving-only fields left out): engines found by name are
        reused only if this matches."""
        import hashlib

        return hashlib.sha256(self.model_dump_json(exclude=set(self.SERVING_FIELDS)).encode()).hexdigest()[:16]

    def for_replica(self, index: int) -> "VLLMSteeringConfig":
        if index < len(self.replica_overrides) and self.replica_overrides[index]:
            # validated, so an override is checked like any field and hashes like the engine's own copy
            return type(self).model_validate({**self.model_dump(), **self.replica_overrides[index]})
        return self

    def resolved_model(self) -> str:
        """``tiny:qwen3`` / ``tiny:llama`` name the locally built tiny models; anything else goes to vLLM."""
        if self.model_name.startswith("tiny:"):
            from steer_actors.testing import build_tiny_model

            return build_tiny_model(self.model_name.split(":", 1)[1])
        return self.model_name

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        # vLLM's platform probe (NVML), not torch.cuda: initialising CUDA here would poison vLLM's
        # forked workers ("Cannot re-initialize CUDA in forked subprocess").
        from vllm.platforms import current_platform

        return "cuda" if current_platform.is_cuda_alike() else "cpu"
