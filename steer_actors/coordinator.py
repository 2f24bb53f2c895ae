"""``SteeringCoordinator``: the one owner of the global steering state of an app.

It holds the readers-writer lock (generate/chat read; changes write), the current spec, the spec
stack, a monotonic version and the spec's content fingerprint, and the engine replicas. A change is
staged on every replica (every TP rank) and committed only if all staged; otherwise all abort and
the caller gets the error, so no replica ever runs a version the others do not.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from .config import VLLMSteeringConfig
from .engine import engine_actor_class
from .rwlock import AsyncRWLock
from .specs import SteeringSpec, apply_edit


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


def _spec_layers(steering_spec: Any) -> set[int]:
    """Layers a per-request spec (wire form, or a list of them) touches."""
    specs = steering_spec if isinstance(steering_spec, list) else [steering_spec]
    out: set[int] = set()
    for s in specs:
        if isinstance(s, dict) and isinstance(s.get("layers"), dict):
            out |= {int(k) for k in s["layers"] if str(k).lstrip("-").isdigit()}
    return out


class SteeringCoordinator:
    def __init__(self, config: dict[str, Any] | VLLMSteeringConfig, engines: list[Any] | None = None):
        import ray

        self.config = cfg = VLLMSteeringConfig.model_validate(config)
        if engines is None:
            actor_cls = engine_actor_class()
            engines = [actor_cls.remote(cfg.for_replica(i).model_dump()) for i in range(cfg.num_replicas)]
        self.engines = engines
        infos = ray.get([e.info.remote() for e in engines])  # blocks until every engine is up
        self._layers = [set(i["steerable_layers"]) for i in infos]
        # advertise what every replica can do, so a request never depends on where it lands
        common = sorted(set.intersection(*self._layers))
        self._info = {**infos[0], "steerable_layers": common}
        self.lock = AsyncRWLock()
        self.spec = SteeringSpec()
        self.version = 0
        self.fingerprint = self.spec.fingerprint()
        self.stack: list[SteeringSpec] = []
        self._in_flight = [0] * len(engines)
        self._rr = itertools.count()

    # ---- reads -------------------------------------------------------------------------------
    def _pick_engine(self, layers: set[int]) -> int:
        start = next(self._rr)
        n = len(self.engines)
        able = [(start + k) % n for k in range(n) if layers <= self._layers[(start + k) % n]]
        if not able:
            raise ValueError(f"no replica can steer or capture layers {sorted(layers)}")
        return min(able, key=lambda i: self._in_flight[i])

    async def _call_engine(self, method: str, *args: Any, layers: set[int] = frozenset()) -> tuple[int, Any]:
        import ray

        async with self.lock.read():
            i = self._pick_engine(set(layers))
            self._in_flight[i] += 1
            ref = getattr(self.engines[i], method).remote(*args)
            fut = asyncio.ensure_future(ref)
            try:
                return i, await asyncio.shield(fut)
            except asyncio.CancelledError:
                # The caller went away. Abort the generation and keep the read lock until the engine
                # has stopped, so no steering change lands under a request still computing KV.
                ray.cancel(ref)
                await asyncio.wait([fut], timeout=60)
                raise
            finally:
                self._in_flight[i] -= 1

    @staticmethod
    def _tag_captures(i: int, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Capture ids name their replica ("<replica>.<id>") so downloads find the owner."""
        for r in results:
            if r.get("captures"):
                r["captures"]["capture_id"] = f"{i}.{r['captures']['capture_id']}"
        return results

    async def generate(self, prompts: list[Any], sampling: dict[str, Any] | None = None,
                       capture_layers: list[int] | None = None, steering_spec: Any = None) -> list[dict[str, Any]]:
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        layers = set(capture_layers or []) | _spec_layers(steering_spec)
        i, results = await self._call_engine("generate", prompts, sampling, capture_layers, steering_spec,
                                             layers=layers)
        return self._tag_captures(i, results)

    async def chat(self, conversations: list[list[dict[str, str]]], sampling: dict[str, Any] | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("conversations must be a non-empty list of message lists")
        return (await self._call_engine("chat", conversations, sampling, chat_template_kwargs))[1]

    def _owner(self, capture_id: str) -> tuple[Any, str]:
        replica, _, cid = str(capture_id).partition(".")
        if not replica.isdigit() or int(replica) >= len(self.engines) or not cid:
            raise ValueError(f"unknown capture {capture_id!r}")
        return self.engines[int(replica)], cid

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        engine, cid = self._owner(capture_id)
        return await engine.get_capture.remote(cid)

    async def release_captures(self, capture_ids: list[str]) -> int:
        counts = [await e.release_captures.remote([cid]) for e, cid in map(self._owner, capture_ids)]
        return sum(counts)

    async def info(self) -> dict[str, Any]:
        return {**self._info, **self._state(), "num_replicas": len(self.engines)}

    def _state(self) -> dict[str, Any]:
        return {"spec_version": self.version, "spec_fingerprint": self.fingerprint, "stack_depth": len(self.stack)}

    async def get_spec(self) -> dict[str, Any]:
        return {"spec": self.spec.to_wire(), **self._state()}

    async def replica_states(self) -> list[list[dict[str, Any]]]:
        """What every TP rank of every replica has committed (for tests and health checks)."""
        return list(await asyncio.gather(*(e.worker_state.remote() for e in self.engines)))

    # ---- writes ------------------------------------------------------------------------------
    async def _commit_all(self, spec: SteeringSpec) -> None:
        """Stage on every replica, then commit on every replica; caller holds the write lock."""
        version, wire = self.version + 1, spec.to_wire()
        staged = await asyncio.gather(*(e.stage.remote(version, wire) for e in self.engines),
                                      return_exceptions=True)
        failed = [(i, _cause(r)) for i, r in enumerate(staged) if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(e.abort.remote(version) for e in self.engines), return_exceptions=True)
            i, err = failed[0]
            msg = f"replica {i} rejected the change: {err}" if len(self.engines) > 1 else str(err)
            raise (ValueError if isinstance(err, ValueError) else RuntimeError)(msg)
        committed = await asyncio.gather(*(e.commit.remote(version) for e in self.engines), return_exceptions=True)
        bad = [i for i, r in enumerate(committed) if isinstance(r, BaseException)]
        if len(bad) < len(self.engines):  # the change is live somewhere: it is the current state
            self.spec, self.version, self.fingerprint = spec, version, spec.fingerprint()
        if bad:
            raise RuntimeError(f"replicas {bad} failed to commit version {version}: {_cause(committed[bad[0]])}")

    async def _write(self, change) -> dict[str, Any]:
        """Run ``change`` under the write lock, shielded: a caller that disconnects mid-change must
        not leave the engines committed and the coordinator's state behind."""
        async def locked() -> dict[str, Any]:
            async with self.lock.write():
                await change()
                return self._state()

        return await asyncio.shield(locked())

    async def edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        return await self._write(lambda: self._commit_all(apply_edit(self.spec, edit)))

    async def push(self, spec_wire: dict[str, Any]) -> dict[str, Any]:
        spec = SteeringSpec.from_wire(spec_wire)

        async def change() -> None:
            previous = self.spec
            await self._commit_all(spec)
            self.stack.append(previous)

        return await self._write(change)

    async def pop(self) -> dict[str, Any]:
        async def change() -> None:
            if not self.stack:
                raise ValueError("steering stack is empty: pop without a matching push")
            await self._commit_all(self.stack[-1])
            self.stack.pop()

        return await self._write(change)
