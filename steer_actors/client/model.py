"""``VLLMSteerModel``: the researcher's Python client, embedded or attached to a running cluster.

Embedded (``VLLMSteerModel(cfg)``) starts a local Ray and the Serve app; ``VLLMSteerModel.connect``
attaches to an app already running (e.g. from a ``ray job submit`` script). Both talk to the app's
ingress through a Serve handle, the same methods the HTTP routes use, so semantics are identical.

The methods keep chatspace's names, argument names and meanings (its code runs unchanged or fails
with a clear error); where they differ, the method's docstring says how.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, NamedTuple, Sequence

import torch

from steer_actors.client.calls import (ExportedSteeringSpec, blocking, call_blocking, capture_layer_list,
                                       layer_index, sampling_dict, unwrap)
from steer_actors.client.handles import CaptureBatch, CaptureHandle, fetch_captures_batch
from steer_actors.config import VLLMSteeringConfig
from steer_actors.results import GenerationResult
from steer_actors.specs import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec

DEFAULT_APP = "steer"
_BACKGROUND: set = set()  # tasks that must outlive their caller (asyncio keeps only weak references)


class CapturedGeneration(NamedTuple):
    """What ``generate(..., capture_layers=...)`` returns: always exactly these two lists, so chatspace's
    ``results, handles = await model.generate(...)`` unpacks right for any number of prompts.
    ``results[i].captures`` is ``handles[i]`` too."""

    results: list[GenerationResult]
    handles: list[CaptureHandle]


def embedded_config(cfg: VLLMSteeringConfig | dict[str, Any], bootstrap_layers: Sequence[int] | None = None,
                    options: dict[str, Any] | None = None) -> VLLMSteeringConfig:
    """The config an embedded :class:`VLLMSteerModel` starts: ``cfg`` with ``bootstrap_layers`` and each
    option set as the config field of that name, or else passed to vLLM in ``engine_kwargs``."""
    cfg = VLLMSteeringConfig.model_validate(cfg)
    update: dict[str, Any] = {}
    if bootstrap_layers is not None:
        update["bootstrap_layers"] = sorted({layer_index(x, "bootstrap_layers") for x in bootstrap_layers})
    options = options or {}
    update.update({k: v for k, v in options.items() if k in VLLMSteeringConfig.model_fields})
    extra = {k: v for k, v in options.items() if k not in VLLMSteeringConfig.model_fields}
    if extra:
        update["engine_kwargs"] = {**cfg.engine_kwargs, **extra}
    return VLLMSteeringConfig.model_validate({**cfg.model_dump(), **update})


class VLLMSteerModel:
    def __init__(self, cfg: VLLMSteeringConfig | dict[str, Any] | None = None, *,
                 bootstrap_layers: Sequence[int] | None = None, app_name: str = DEFAULT_APP,
                 http_port: int | None = None, _handle: Any = None, **engine_kwargs: Any):
        """Start the app embedded: a local Ray (or the one this process is connected to), the Serve app
        ``app_name`` and its engines; returns once they serve.

        ``bootstrap_layers``: the layers the engines can steer (fixed at start; None = all). Unlike
        chatspace, where they were only set up ahead of time, steering another layer later is refused
        with a ``ValueError``. Other keywords (chatspace's ``**vllm_kwargs``) set the config field of that
        name (e.g. ``enforce_eager``; steering works compiled too, so False is honoured) or else go to
        vLLM's engine arguments (``engine_kwargs``). ``http_port``: Serve's HTTP port (default 8000)."""
        from ray import serve

        self._owns_app = _handle is None
        self.app_name = app_name
        if _handle is None:
            import ray

            if cfg is None:
                raise ValueError("VLLMSteerModel needs a VLLMSteeringConfig (or use VLLMSteerModel.connect)")
            cfg = embedded_config(cfg, bootstrap_layers, engine_kwargs)
            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=False)
            from steer_actors.serve import build_app

            def deploy() -> Any:
                serve.start(http_options={"host": "127.0.0.1", "port": http_port or 8000})
                return serve.run(build_app(cfg), name=app_name, route_prefix=f"/{app_name}")

            _handle = blocking(deploy)  # chatspace's Quick Start constructs the model inside its event loop
        elif engine_kwargs or bootstrap_layers is not None:
            raise ValueError("engine options apply only to an embedded model (VLLMSteerModel(cfg, ...))")
        self._handle = _handle
        self.config = cfg
        self._info = call_blocking(_handle.info)
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
        """Tear the app (and its engines) down if this client started it (embedded); else do nothing."""
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
        """Model facts (hidden size, layers, steerable layers) and the global spec's version."""
        return await unwrap(self._handle.info.remote())

    # ---- generation ------------------------------------------------------------------------
    async def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], sampling_params: Any = None,
                       capture_layers: int | Sequence[int] | None = None,
                       steering_spec: SteeringSpec | Sequence[SteeringSpec | None] | None = None,
                       **sampling: Any) -> list[GenerationResult] | CapturedGeneration:
        """Generate for one prompt or many (texts or token-id lists); returns one
        :class:`GenerationResult` per prompt (``print(r)`` prints its text; ``r.outputs`` holds all ``n``
        completions, see :mod:`steer_actors.results`).

        ``sampling_params``: a ``vllm.SamplingParams`` or a dict; keywords override its fields.
        ``capture_layers`` (one index or several): returns ``CapturedGeneration(results, handles)``, as
        chatspace's ``results, handles = await model.generate(...)``; fetch with
        :meth:`fetch_captures_batch` or ``await handle.fetch()``. ``n > 1`` is refused with capture.
        ``steering_spec`` steers these requests only (one spec for all, or one per prompt), after the
        global spec at each layer."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        layers = capture_layer_list(capture_layers)
        if isinstance(steering_spec, SteeringSpec):
            per_request: Any = steering_spec.to_wire()
        elif steering_spec is not None:
            per_request = [s.to_wire() if s is not None else None for s in steering_spec]
        else:
            per_request = None
        out = await unwrap(self._handle.generate.remote(prompts, sampling_dict(sampling_params, sampling), layers,
                                                        per_request))
        results = [GenerationResult.from_dict(r) for r in out]
        if not layers:
            return results
        for r in results:
            r.captures = CaptureHandle.from_wire(r.captures)
        return CapturedGeneration(results, [r.captures for r in results])

    @staticmethod
    def fetch_captures_batch(handles: Sequence[CaptureHandle], timeout_s: float = 300.0) -> CaptureBatch:
        """Fetch many handles' tensors with one batched object-store get, now; fills each
        ``handle.captures`` and returns the handles. The result may also be awaited, as chatspace's
        ``await model.fetch_captures_batch(handles)`` (the fetch is already done then)."""
        return fetch_captures_batch(list(handles), timeout_s)

    async def release_captures(self, handles: Sequence[CaptureHandle]) -> int:
        """Free the handles' tensors in the cluster now (else they go after ``capture_ttl_s``)."""
        return await unwrap(self._handle.release_captures.remote([h.capture_id for h in handles]))

    async def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], sampling_params: Any = None,
                   chat_template_kwargs: dict[str, Any] | None = None, **sampling: Any) -> list[GenerationResult]:
        """Generate a reply to one conversation (a list of ``{"role", "content"}`` messages) or to each of
        several, through the model's chat template; one :class:`GenerationResult` per conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        out = await unwrap(self._handle.chat.remote(conversations, sampling_dict(sampling_params, sampling),
                                                    chat_template_kwargs))
        return [GenerationResult.from_dict(r) for r in out]

    # ---- steering: setters ------------------------------------------------------------------
    # Each is one atomic change of the global spec (it waits for in-flight generations) and returns
    # the new state: {"spec_version", "spec_fingerprint", "stack_depth"}.
    async def _edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        return await unwrap(self._handle.edit.remote(edit))

    async def _set(self, layer_idx: Any, op: AddSpec | ProjectionCapSpec | AblationSpec) -> dict[str, Any]:
        wire_op = {**op.model_dump(exclude={"vector"}), "vector": op.vector.tolist()}
        return await self._edit({"action": "set", "layer": layer_index(layer_idx), "op": wire_op})

    async def _clear(self, layer_idx: Any, kind: str | None = None) -> dict[str, Any]:
        edit = {"action": "clear", "layer": layer_index(layer_idx)}
        return await self._edit(edit if kind is None else {**edit, "kind": kind})

    async def set_layer_vector(self, layer_idx: int, vector: torch.Tensor | Sequence[float] | None,
                               scale: float = 1.0) -> dict[str, Any]:
        """Add ``scale * vector`` at layer ``layer_idx`` (replacing that layer's add op, keeping its cap
        and ablation). ``vector=None`` clears the whole layer, as in chatspace. A zero vector is an add of
        zero (chatspace cleared the layer instead)."""
        if vector is None:
            return await self.clear_layer_vector(layer_idx)
        return await self._set(layer_idx, AddSpec(vector=vector, scale=scale))

    def set_target_layer(self, layer_idx: int) -> None:
        """Choose the layer :meth:`set_vector` writes to."""
        i = layer_index(layer_idx)
        if i >= self.layer_count:
            raise ValueError(f"layer {i} out of range: the model has {self.layer_count} layers")
        self._target_layer = i

    async def set_vector(self, vector: torch.Tensor | Sequence[float] | None, scale: float = 1.0) -> dict[str, Any]:
        """:meth:`set_layer_vector` on the layer chosen by :meth:`set_target_layer`."""
        if self._target_layer is None:
            raise ValueError("call set_target_layer(layer_idx) before set_vector")
        return await self.set_layer_vector(self._target_layer, vector, scale)

    async def set_layer_projection_cap(self, layer_idx: int, vector: torch.Tensor | Sequence[float],
                                       min: float | None = None, max: float | None = None) -> dict[str, Any]:
        """Clamp the projection on ``vector``'s direction (normalised here) into ``[min, max]`` (one may be
        None) at layer ``layer_idx``, after its add op."""
        return await self._set(layer_idx, ProjectionCapSpec(vector=vector, min=min, max=max))

    async def set_layer_ablation(self, layer_idx: int, vector: torch.Tensor | Sequence[float],
                                 scale: float) -> dict[str, Any]:
        """Scale the component along ``vector``'s direction by ``scale`` at layer ``layer_idx``
        (0 removes it, 0.1 keeps 10%, 2 doubles it); ``scale`` is required, as in chatspace."""
        return await self._set(layer_idx, AblationSpec(vector=vector, scale=scale))

    async def clear_layer_vector(self, layer_idx: int) -> dict[str, Any]:
        """Clear ALL steering of layer ``layer_idx`` (add, cap and ablation), as chatspace's does.
        To drop only the add op use :meth:`clear_layer_add`."""
        return await self._clear(layer_idx)

    async def clear_layer_add(self, layer_idx: int) -> dict[str, Any]:
        """Drop only layer ``layer_idx``'s add op (its cap and ablation stay)."""
        return await self._clear(layer_idx, "add")

    async def clear_layer_projection_cap(self, layer_idx: int) -> dict[str, Any]:
        """Drop only layer ``layer_idx``'s projection cap."""
        return await self._clear(layer_idx, "cap")

    async def clear_layer_ablation(self, layer_idx: int) -> dict[str, Any]:
        """Drop only layer ``layer_idx``'s ablation."""
        return await self._clear(layer_idx, "ablation")

    async def clear_all_vectors(self) -> dict[str, Any]:
        """Clear ALL global steering (every layer, every op kind), as chatspace's does; the same as
        :meth:`clear_all`. The steering stack is kept."""
        return await self._edit({"action": "clear"})

    async def clear_all(self) -> dict[str, Any]:
        """Clear all global steering (every layer, every op kind); the steering stack is kept."""
        return await self._edit({"action": "clear"})

    # ---- steering: whole specs ---------------------------------------------------------------
    async def apply_steering_spec(self, spec: SteeringSpec, *, clear_missing: bool = True) -> dict[str, Any]:
        """Make ``spec`` the global spec in one atomic change. ``clear_missing=False`` (chatspace's option)
        keeps the layers ``spec`` does not name; each layer it names is replaced whole."""
        action = "replace" if clear_missing else "merge"
        return await self._edit({"action": action, "spec": spec.to_wire()})

    def export_steering_spec(self) -> ExportedSteeringSpec:
        """The current global spec (a short blocking call, as chatspace's was synchronous). The spec may
        also be awaited: ``await model.export_steering_spec()`` works too."""
        return ExportedSteeringSpec.from_wire(call_blocking(self._handle.get_spec)["spec"])

    async def steering_state(self) -> dict[str, Any]:
        """Version, fingerprint and stack depth of the global spec."""
        state = await unwrap(self._handle.get_spec.remote())
        return {k: v for k, v in state.items() if k != "spec"}

    async def push_steering_spec(self, spec: SteeringSpec) -> dict[str, Any]:
        """Make ``spec`` current, keeping what it replaces; the reply's ``push_id`` ends this push alone."""
        return await unwrap(self._handle.push.remote(spec.to_wire()))

    async def pop_steering_spec(self, push_id: int | None = None) -> dict[str, Any]:
        """End the newest push, or the one ``push_id`` names (see :meth:`SteeringCoordinator.pop`);
        ``ValueError`` if the stack is empty (chatspace raised ``RuntimeError``)."""
        return await unwrap(self._handle.pop.remote(push_id))

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
