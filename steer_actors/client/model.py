"""``VLLMSteerModel``: the researcher's Python client, embedded or attached to a running cluster.

Embedded (``VLLMSteerModel(cfg)``) starts a local Ray and the Serve app; ``VLLMSteerModel.connect``
attaches to an app already running (e.g. from a ``ray job submit`` script). Both talk to the app's
ingress through a Serve handle, the same methods the HTTP routes use, so semantics are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
from typing import Any, AsyncIterator, Sequence

import torch

from steer_actors.config import VLLMSteeringConfig
from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
from steer_actors.results import GenerationResult
from steer_actors.specs import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec

DEFAULT_APP = "steer"


def _sampling_dict(sampling_params: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    if sampling_params is None:
        base: dict[str, Any] = {}
    elif isinstance(sampling_params, dict):
        base = dict(sampling_params)
    else:  # a vllm.SamplingParams: keep the fields researchers set
        fields = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
                  "stop_token_ids", "ignore_eos", "logprobs", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
        base = {f: getattr(sampling_params, f) for f in fields if hasattr(sampling_params, f)}
    base.update(overrides)
    return base


_BACKGROUND: set = set()  # tasks that must outlive their caller (asyncio keeps only weak references)


def _layer_index(x: Any) -> int:
    if isinstance(x, bool):
        raise ValueError(f"capture_layers must be layer indices (integers), got {x!r}")
    try:
        return operator.index(x)  # 2 and np.int64(2), never 2.7 truncated or "2" parsed
    except TypeError:
        raise ValueError(f"capture_layers must be layer indices (integers), got {x!r}") from None


async def _unwrap(response: Any) -> Any:
    """Await a Serve response; user errors come back as the plain ValueError the app raised."""
    try:
        return await response
    except ValueError as e:
        cause = getattr(e, "cause", None)
        raise ValueError(str(cause if cause is not None else e)) from None


def _blocking(fn):
    """Run a blocking Serve call; from inside a running event loop (``await``-style scripts that
    construct the client) it runs on a helper thread, which Serve allows."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


class VLLMSteerModel:
    def __init__(self, cfg: VLLMSteeringConfig | dict[str, Any] | None = None, *,
                 bootstrap_layers: Sequence[int] | None = None, app_name: str = DEFAULT_APP,
                 http_port: int | None = None, _handle: Any = None):
        from ray import serve

        self._owns_app = _handle is None
        self.app_name = app_name
        if _handle is None:
            import ray

            if cfg is None:
                raise ValueError("VLLMSteerModel needs a VLLMSteeringConfig (or use VLLMSteerModel.connect)")
            cfg = VLLMSteeringConfig.model_validate(cfg)
            if bootstrap_layers is not None:
                cfg = cfg.model_copy(update={"bootstrap_layers": sorted(set(bootstrap_layers))})
            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=False)
            from steer_actors.serve import build_app

            serve.start(http_options={"host": "127.0.0.1", "port": http_port or 8000})
            _handle = serve.run(build_app(cfg), name=app_name, route_prefix=f"/{app_name}")
        self._handle = _handle
        self.config = cfg
        self._info = _blocking(lambda: _handle.info.remote().result())
        self._target_layer: int | None = None

    @classmethod
    def connect(cls, address: str = "auto", app: str = DEFAULT_APP) -> "VLLMSteerModel":
        """Attach to a Serve app already running on the cluster at ``address``."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        return cls(app_name=app, _handle=serve.get_app_handle(app))

    def close(self) -> None:
        """Tear the app down if this client started it (embedded mode)."""
        if self._owns_app:
            from ray import serve

            serve.delete(self.app_name)

    # ---- model facts -----------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self._info["hidden_size"])

    @property
    def layer_count(self) -> int:
        return int(self._info["num_layers"])

    async def info(self) -> dict[str, Any]:
        return await _unwrap(self._handle.info.remote())

    # ---- generation ------------------------------------------------------------------------
    async def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], sampling_params: Any = None,
                       capture_layers: Sequence[int] | None = None,
                       steering_spec: SteeringSpec | Sequence[SteeringSpec | None] | None = None,
                       **sampling: Any) -> list[GenerationResult]:
        """Generate; with ``capture_layers`` each result's ``captures`` is a :class:`CaptureHandle`
        (fetch its tensors with :meth:`fetch_captures_batch`). ``steering_spec`` steers these requests
        only (one spec for all, or one per prompt), after the global spec at each layer."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        layers = sorted({_layer_index(x) for x in capture_layers}) if capture_layers else None
        if isinstance(steering_spec, SteeringSpec):
            per_request: Any = steering_spec.to_wire()
        elif steering_spec is not None:
            per_request = [s.to_wire() if s is not None else None for s in steering_spec]
        else:
            per_request = None
        out = await _unwrap(self._handle.generate.remote(prompts, _sampling_dict(sampling_params, sampling), layers,
                                                         per_request))
        results = [GenerationResult(**r) for r in out]
        for r in results:
            if r.captures:
                r.captures = CaptureHandle.from_wire(r.captures)
        return results

    @staticmethod
    def fetch_captures_batch(handles: Sequence[CaptureHandle], timeout_s: float = 300.0) -> list[CaptureHandle]:
        """One batched object-store get for all handles; fills ``handle.captures``."""
        return fetch_captures_batch(list(handles), timeout_s)

    async def release_captures(self, handles: Sequence[CaptureHandle]) -> int:
        return await _unwrap(self._handle.release_captures.remote([h.capture_id for h in handles]))

    async def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], sampling_params: Any = None,
                   chat_template_kwargs: dict[str, Any] | None = None, **sampling: Any) -> list[GenerationResult]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        out = await _unwrap(self._handle.chat.remote(conversations, _sampling_dict(sampling_params, sampling),
                                                     chat_template_kwargs))
        return [GenerationResult(**r) for r in out]

    # ---- steering ------------------------------------------------------------------------------
    async def _edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        return await _unwrap(self._handle.edit.remote(edit))

    async def _set(self, layer: int, op: AddSpec | ProjectionCapSpec | AblationSpec) -> dict[str, Any]:
        wire_op = {**op.model_dump(exclude={"vector"}), "vector": op.vector.tolist()}
        return await self._edit({"action": "set", "layer": int(layer), "op": wire_op})

    async def set_layer_vector(self, layer: int, vector: torch.Tensor | Sequence[float], scale: float = 1.0):
        return await self._set(layer, AddSpec(vector=vector, scale=scale))

    async def clear_layer_vector(self, layer: int):
        return await self._edit({"action": "clear", "layer": int(layer), "kind": "add"})

    async def clear_all_vectors(self):
        return await self._edit({"action": "clear", "kind": "add"})

    def set_target_layer(self, layer: int) -> None:
        """Seed-style: the layer :meth:`set_vector` writes to."""
        self._target_layer = int(layer)

    async def set_vector(self, vector: torch.Tensor | Sequence[float] | None, scale: float = 1.0):
        if self._target_layer is None:
            raise ValueError("call set_target_layer(layer) before set_vector")
        if vector is None:
            return await self.clear_layer_vector(self._target_layer)
        return await self.set_layer_vector(self._target_layer, vector, scale)

    async def set_layer_projection_cap(self, layer: int, vector, min: float | None = None, max: float | None = None):
        return await self._set(layer, ProjectionCapSpec(vector=vector, min=min, max=max))

    async def clear_layer_projection_cap(self, layer: int):
        return await self._edit({"action": "clear", "layer": int(layer), "kind": "cap"})

    async def set_layer_ablation(self, layer: int, vector, scale: float = 0.0):
        return await self._set(layer, AblationSpec(vector=vector, scale=scale))

    async def clear_layer_ablation(self, layer: int):
        return await self._edit({"action": "clear", "layer": int(layer), "kind": "ablation"})

    async def clear_all(self):
        return await self._edit({"action": "clear"})

    async def apply_steering_spec(self, spec: SteeringSpec):
        return await self._edit({"action": "replace", "spec": spec.to_wire()})

    async def export_steering_spec(self) -> SteeringSpec:
        return SteeringSpec.from_wire((await _unwrap(self._handle.get_spec.remote()))["spec"])

    async def steering_state(self) -> dict[str, Any]:
        """Version, fingerprint and stack depth of the global spec."""
        state = await _unwrap(self._handle.get_spec.remote())
        return {k: v for k, v in state.items() if k != "spec"}

    async def push_steering_spec(self, spec: SteeringSpec):
        """Make ``spec`` current, keeping what it replaces; the reply's ``push_id`` ends this push alone."""
        return await _unwrap(self._handle.push.remote(spec.to_wire()))

    async def pop_steering_spec(self, push_id: int | None = None):
        """End the newest push, or the one ``push_id`` names (see :meth:`SteeringCoordinator.pop`)."""
        return await _unwrap(self._handle.pop.remote(push_id))

    @contextlib.asynccontextmanager
    async def steering(self, spec: SteeringSpec) -> AsyncIterator["VLLMSteerModel"]:
        """Run the body under ``spec``; what it replaced comes back even if the body raises or the task is
        cancelled. Contexts of other clients may interleave with this one: each ends its own push."""
        push = asyncio.ensure_future(self.push_steering_spec(spec))
        try:
            state = await asyncio.shield(push)
        except asyncio.CancelledError:
            # The coordinator finishes a change it has begun (a caller going away must not leave the
            # engines half-changed), so a push cancelled while it waits for the write lock still lands:
            # end it once it has. A second cancel leaves that to the background.
            undo = asyncio.ensure_future(self._end_when_landed(push))
            _BACKGROUND.add(undo)
            undo.add_done_callback(_BACKGROUND.discard)
            with contextlib.suppress(Exception):
                await asyncio.shield(undo)
            raise
        try:
            yield self
        finally:
            await self.pop_steering_spec(state["push_id"])

    async def _end_when_landed(self, push: "asyncio.Future[dict[str, Any]]") -> None:
        try:
            state = await push
        except Exception:
            return  # it did not land: nothing to end
        await self.pop_steering_spec(state["push_id"])
