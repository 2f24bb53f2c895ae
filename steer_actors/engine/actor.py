"""``SteerEngine``: one vLLM ``AsyncLLM`` with steering, run as a Ray actor (``EngineActor``).

Steering changes reach every TP rank's :class:`steer_actors.worker.extension.SteerWorkerExtension` through
the workers' side channel (:mod:`steer_actors.worker.channel`; ``collective_rpc`` opens it, and is the fallback), as
stage-then-commit so a coordinator can make a change atomic across replicas. Every result carries
the spec version and fingerprint it ran under.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import ray

from steer_actors import row_dtype, vllm_compat
from steer_actors.config import VLLMSteeringConfig
from steer_actors.engine import launch as engine_start
from steer_actors.engine.capture import CONCURRENCY_GROUPS, STORE_GROUP, EngineCapture
from steer_actors.engine.slot_pool import SlotPool
from steer_actors.ops.change import rows_payload
from steer_actors.results import GenerationResult, result_from_output
from steer_actors.specs import SteeringSpec, apply_edit


class StaleReplicaError(RuntimeError):
    """This engine does not run the spec version its caller expects (it was restarted)."""


class SteerEngine:
    def __init__(self, config: dict[str, Any] | VLLMSteeringConfig):
        self.config = cfg = VLLMSteeringConfig.model_validate(config)
        device = cfg.resolved_device()
        self.engine = engine_start.start_async_llm(cfg, device)
        mc = self.engine.vllm_config.model_config
        self.hidden_size = mc.get_hidden_size()
        self.capture_dtype = row_dtype.resolve(cfg.capture_dtype, mc.dtype)  # as the workers resolve it
        self.num_layers = mc.get_num_layers(self.engine.vllm_config.parallel_config)
        self.spec = SteeringSpec()
        self.version = 0
        self.fingerprint = self.spec.fingerprint()
        self._tokenizer = None
        self._layers: list[int] | None = None
        self._max_ops = cfg.max_ops_per_layer
        self._worker_switch_interval_s = cfg.worker_switch_interval_s
        self._device = device
        self.capture = EngineCapture(self._workers, self._steerable_layers,
                                     lambda text: len(self.tokenizer()(text).input_ids), mc.max_model_len,
                                     self.hidden_size, self.capture_dtype, cfg.capture_budget_bytes, cfg.capture_ttl_s)
        self._channel: Any = None  # {lane: ChannelClient} once opened, False if it cannot be
        self._channel_lock = asyncio.Lock()
        self.slots = SlotPool(cfg.max_steering_slots, self._load_slot)
        engine_start.freeze_gc_heap()

    async def _side_channel(self, lane: str = "steer") -> Any:
        """The workers' side channel for ``lane`` (opened on first use), or False where it cannot open."""
        if self._channel is None:
            async with self._channel_lock:
                if self._channel is None:
                    try:
                        from steer_actors.worker.protocol import LANES
                        from steer_actors.engine.channel_client import ChannelClient

                        ranks = await self.engine.collective_rpc("steer_channel_open",
                                                                 args=(self._worker_switch_interval_s,))
                        self._channel = {lane: ChannelClient([r[lane] for r in ranks]) for lane in LANES}
                    except Exception as e:  # e.g. no zmq: slower, same semantics
                        import logging

                        logging.getLogger(__name__).warning("steer side channel unavailable (%s)", e)
                        self._channel = False
        return self._channel and self._channel[lane]

    async def _workers(self, method: str, *args: Any, same_step: bool = False) -> list[Any]:
        """``method`` on every TP rank: over its lane of the side channel, or collective_rpc where that
        cannot open. ``same_step``: with several ranks, each rank's channel would land the call before
        whichever forward it is at, so a change could split one forward across versions; collective_rpc
        runs it on every rank between the same two steps."""
        from steer_actors.worker.protocol import LANE_OF

        channel = await self._side_channel(LANE_OF[method])
        if channel and not (same_step and len(channel.addresses) > 1):
            return await channel.call(method, *args)
        return await self.engine.collective_rpc(method, args=args)

    # ---- introspection -------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        if self._layers is None:
            ranks = await self._workers("steer_info")
            self._layers = ranks[0]["layers"]
        return {
            "model": self.config.model_name,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "steerable_layers": self._layers,
            "max_ops_per_layer": self._max_ops,
            "capture_dtype": row_dtype.name(self.capture_dtype),
            "spec_version": self.version,
            "spec_fingerprint": self.fingerprint,
            "node_id": _node_id(),
            "config_hash": self.config.engine_hash(),
        }

    async def _steerable_layers(self) -> list[int]:
        return (await self.info())["steerable_layers"]

    async def worker_state(self) -> list[dict[str, Any]]:
        """Per-rank view (version and fingerprint each TP rank has committed)."""
        return await self._workers("steer_info")

    # ---- steering: two-phase, driven by the coordinator (or by ``apply_spec`` alone) -----------
    async def _validated(self, spec_wire: dict[str, Any]) -> SteeringSpec:
        """Check on the actor side first, so bad input never reaches (or changes) the workers."""
        spec = SteeringSpec.from_wire(spec_wire)
        info = await self.info()
        spec.validate_for(self.hidden_size, self.num_layers, info["steerable_layers"], self._max_ops)
        return spec

    def _rows_payload(self, spec: SteeringSpec) -> dict[str, Any]:
        return rows_payload(spec, self._layers, self._max_ops, self.hidden_size)

    async def stage(self, version: int, spec_wire: dict[str, Any]) -> str:
        spec = await self._validated(spec_wire)
        fps = await self._workers("steer_stage", int(version), self._rows_payload(spec))
        self._staged = (int(version), spec)
        return fps[0]

    async def commit(self, version: int) -> str:
        staged = getattr(self, "_staged", None)
        if staged is None or staged[0] != int(version):
            raise ValueError(f"version {version} was not staged on this engine")
        fps = await self._workers("steer_commit", int(version), same_step=True)
        self.version, self.spec, self.fingerprint, self._staged = int(version), staged[1], fps[0], None
        return self.fingerprint

    async def abort(self, version: int) -> None:
        self._staged = None
        await self._workers("steer_abort", int(version))

    async def apply_spec(self, spec_wire: dict[str, Any], version: int | None = None) -> dict[str, Any]:
        """Change this engine alone (no coordinator): validate, then stage+commit in one RPC."""
        v = self.version + 1 if version is None else int(version)
        spec = await self._validated(spec_wire)
        channel = await self._side_channel()
        payload = self._rows_payload(spec)
        if channel and len(channel.addresses) == 1:  # one round trip: rows built, then copied
            fps = await channel.call("steer_apply", v, payload)
        else:
            await self._workers("steer_stage", v, payload)  # no wait for any forward
            fps = await self._workers("steer_commit", v, same_step=True)
        self.version, self.spec, self.fingerprint = v, spec, fps[0]
        return {"spec_version": self.version, "spec_fingerprint": self.fingerprint}

    async def edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        """Apply one setter-style edit (see :func:`steer_actors.specs.apply_edit`) to the current spec."""
        return await self.apply_spec(apply_edit(self.spec, edit).to_wire())

    async def export_spec(self) -> dict[str, Any]:
        return {"spec": self.spec.to_wire(), "spec_version": self.version, "spec_fingerprint": self.fingerprint}

    # ---- generation ----------------------------------------------------------------------------
    async def _load_slot(self, slot: int, spec_wire: Any) -> None:
        await self._workers("steer_slot_load", slot, spec_wire)

    async def _route(self, ids: list[str], specs: list[dict[str, Any] | None]) -> list[tuple[str, int, str]]:
        """Give each request with its own spec a slot; returns (request id, slot, spec fingerprint)."""
        want, wires = [], {}
        for rid, wire_spec in zip(ids, specs):
            if wire_spec is None:
                continue
            spec = await self._validated(wire_spec)
            if not spec.is_empty():
                fp = spec.fingerprint()
                wires[fp] = spec.to_wire()
                want.append((rid, fp))
        if not want:
            return []
        if len(wires) > self.slots.capacity:
            raise ValueError(f"{len(wires)} distinct request specs in one call; this engine holds "
                             f"{self.slots.capacity} at once (max_steering_slots)")
        got: dict[str, int] = {}
        try:
            # A call needing several slots takes them one caller at a time: two callers each holding
            # some while waiting for more would wait forever.
            async with (self.slots.multi if len(wires) > 1 else contextlib.nullcontext()):
                for fp, wire_spec in wires.items():
                    got[fp] = await self.slots.acquire(fp, wire_spec)
            routed = [(rid, got[fp], fp) for rid, fp in want]
            await self._workers("steer_route", [(rid, slot) for rid, slot, _ in routed])
        except BaseException:
            await asyncio.gather(*(self.slots.release(slot) for slot in got.values()))
            raise
        return routed

    def _expect(self, expected: tuple[int, str] | None) -> None:
        if expected is not None and (self.version, self.fingerprint) != tuple(expected):
            raise StaleReplicaError(f"engine runs spec version {self.version}, the coordinator expects "
                                    f"{expected[0]} (restarted?)")

    async def generate(self, prompts: list[str] | list[list[int]], sampling: dict[str, Any] | None = None,
                       capture_layers: list[int] | None = None,
                       steering_spec: dict[str, Any] | list[dict[str, Any] | None] | None = None,
                       expected: tuple[int, str] | None = None) -> list[dict[str, Any]]:
        """``steering_spec``: one spec (wire form) for every prompt, or one per prompt (None = none).
        A request's own ops run after the global ops at each layer. ``expected`` = the (version,
        fingerprint) the caller believes is live: a restarted engine refuses rather than run unsteered."""
        from vllm import SamplingParams

        self._expect(expected)

        try:
            params = SamplingParams(**(sampling or {}))
        except vllm_compat.client_error_types() as e:
            raise ValueError(f"invalid sampling parameters: {e}") from None
        specs = steering_spec if isinstance(steering_spec, list) else [steering_spec] * len(prompts)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(specs)} steering specs for {len(prompts)} prompts")
        if params.n > 1 and (capture_layers or any(s is not None for s in specs)):
            raise ValueError("n > 1 is not supported with capture or per-request steering; repeat the prompt")
        version, fp = self.version, self.fingerprint
        ids = [uuid.uuid4().hex for _ in prompts]
        routed = await self._route(ids, specs)
        request_fp = {rid: rfp for rid, _, rfp in routed}
        reserved = 0

        async def one(prompt: str | list[int], rid: str) -> GenerationResult:
            inp = {"prompt_token_ids": list(prompt)} if isinstance(prompt, list) else {"prompt": prompt}
            # KV computed under one steering must never serve another: the prefix cache is salted by
            # what steers the request (unsteered requests keep sharing); a capture must see every
            # prompt position, so it never reads the cache.
            steer_key = "+".join(k for k in (None if self.spec.is_empty() else fp, request_fp.get(rid)) if k)
            if capture_layers:
                inp["cache_salt"] = rid
            elif steer_key:
                inp["cache_salt"] = steer_key
            final, completions = None, {}
            try:
                async for out in self.engine.generate(inp, params, request_id=rid):
                    # with n > 1 each streamed output carries only the completion that moved (cumulative):
                    # the last one seen of each index is that completion whole
                    final = out
                    completions.update((c.index, c) for c in out.outputs)
            except vllm_compat.client_error_types() as e:
                raise ValueError(str(e)) from None
            final.outputs = [completions[k] for k in sorted(completions)]
            res = result_from_output(final, version, fp)
            res.request_spec_fingerprint = request_fp.get(rid)
            return res

        try:
            if capture_layers:
                reserved = await self.capture.start(prompts, params.max_tokens, capture_layers, ids)
            tasks = [asyncio.ensure_future(one(p, rid)) for p, rid in zip(prompts, ids)]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                # siblings of a failed (or cancelled) request must not run on after their slots and
                # routes are gone: cancelling the stream aborts the request in vLLM
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            if capture_layers:
                await self.capture.finish(results, ids)
        except BaseException:
            if capture_layers:  # the caller gets no ids: nothing stored for this call may outlive it
                self.capture.release(ids)
            raise
        finally:
            self.capture.unreserve(reserved)
            # Shielded, and run to its end if the caller is cancelled meanwhile: a drop that never reached
            # the workers would leave its requests' regions theirs for good, an unrouted slot its spec.
            end = asyncio.ensure_future(self._end_requests(ids if capture_layers else [], routed))
            self.capture.background(end)
            try:
                await asyncio.shield(end)
            except BaseException:
                if capture_layers:
                    self.capture.release(ids)
                raise
        return [r.to_dict() for r in results]

    async def _end_requests(self, capture_ids: list[str], routed: list) -> None:
        """After a generate call: drop what the workers still hold for its requests (captures never taken,
        routes) and release its slots."""
        try:
            if capture_ids:
                await self.capture.drop(capture_ids)
        finally:
            if routed:
                try:
                    await self._workers("steer_unroute", [rid for rid, _, _ in routed])
                finally:
                    # one slot reference per distinct spec, however many prompts shared it
                    await asyncio.gather(*(self.slots.release(s) for s in {s for _, s, _ in routed}))

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            # the one vLLM runs (a ``tokenizer`` or revision in engine_kwargs): capture regions are sized by
            # its token counts, and a region sized short fails its request as incomplete
            mc = self.engine.vllm_config.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer or self.config.resolved_model(),
                                                            revision=mc.tokenizer_revision,
                                                            trust_remote_code=mc.trust_remote_code)
        return self._tokenizer

    async def chat(self, conversations: list[list[dict[str, str]]], sampling: dict[str, Any] | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None,
                   expected: tuple[int, str] | None = None) -> list[dict[str, Any]]:
        self._expect(expected)
        tok = self.tokenizer()
        prompts = [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True,
                                           **(chat_template_kwargs or {})) for c in conversations]
        prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
        return await self.generate(prompts, sampling)

    # ---- captures (see engine.capture) ------------------------------------------------------------
    @ray.method(concurrency_group=STORE_GROUP)
    async def materialize_capture(self, path: str, offset_rows: int, shape: list[int], rows: int,
                                  dtype: str = "float32") -> Any:
        """One finished capture's rows into the object store: this task's return value is its entry (see
        :meth:`EngineCapture.materialize`); runs in its own concurrency group, off the main event loop."""
        return await self.capture.materialize(path, offset_rows, shape, rows, dtype)

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        return await self.capture.get(capture_id)

    async def release_captures(self, capture_ids: list[str]) -> int:
        return self.capture.release(capture_ids)

    async def capture_stats(self) -> dict[str, Any]:
        return self.capture.stats()

    async def capture_arena_stats(self) -> dict[str, int]:
        """The capturing worker's arena: segments, regions in use (0 once every capture is stored and
        nothing is running), bytes of shared memory reserved (its peak: segments are kept)."""
        return await self.capture.arena_stats()

    async def shutdown(self) -> None:
        for channel in (self._channel or {}).values():
            channel.close()
        self.engine.shutdown()


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def engine_actor_class(num_cpus: float = 0, num_gpus: float = 0):
    """The Ray actor class for :class:`SteerEngine` (GPUs are claimed by vLLM's own workers)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, concurrency_groups=CONCURRENCY_GROUPS)(SteerEngine)
