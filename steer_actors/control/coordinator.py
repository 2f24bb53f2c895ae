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

from steer_actors.config import VLLMSteeringConfig
from steer_actors.engine.actor import StaleReplicaError
from steer_actors.control.replicas import Replica, replace_replica, start_replicas, stop_replicas
from steer_actors.control.rwlock import AsyncRWLock
from steer_actors.specs import SteeringSpec, apply_edit, check_capture_layers
from steer_actors.control.state_store import StackEntry, StateStore, SteeringState


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


def runs(info: dict[str, Any], ranks: list[dict[str, Any]], want: tuple[int, str]) -> bool:
    """Whether an engine and every TP rank of it run ``want`` (version, fingerprint). A commit that failed
    part-way (one rank switched, another raised) leaves ranks apart while the engine's record is unchanged."""
    return ((info["spec_version"], info["spec_fingerprint"]) == want
            and all((k["version"], k["fingerprint"]) == want for k in ranks))


EXPECTED = object()  # placeholder for the (version, fingerprint) a call expects its replica to run


class ReplicaUnavailableError(RuntimeError):
    """An engine replica died under the request, or none is serving: retry (HTTP 503)."""


def _serve_app_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # not inside a Serve replica
        return None


def _app_is_going_away(app: str) -> bool:
    try:
        from ray import serve

        status = serve.status().applications.get(app)
    except Exception:  # no Serve (in-process use) or no answer: this coordinator was the app
        return True
    return status is None or str(getattr(status.status, "value", status.status)).upper() in ("DELETING",
                                                                                          "NOT_STARTED")


class SteeringCoordinator:
    def __init__(self, config: dict[str, Any] | VLLMSteeringConfig, app: str | None = None):
        import ray

        self.config = cfg = VLLMSteeringConfig.model_validate(config)
        self.app = app or _serve_app_name() or "steer"
        self.store = StateStore(self.app)
        state = self.store.load() or SteeringState()  # a restarted coordinator resumes where it was
        self.spec, self.version, self.stack = state.spec, state.version, state.stack
        self.fingerprint = self.spec.fingerprint()
        self.lock = AsyncRWLock()
        self.replicas = start_replicas(cfg, self.app)
        infos = ray.get([r.handle.info.remote() for r in self.replicas])  # blocks until every engine is up
        # Engines left by an earlier deployment of this app with another engine config are replaced.
        for k, (r, i) in enumerate(zip(self.replicas, infos)):
            if i.get("config_hash") != cfg.for_replica(r.index).engine_hash():
                self.replicas[k] = replace_replica(cfg, self.app, r)
                infos[k] = ray.get(self.replicas[k].handle.info.remote())
        # Engines found by name may hold another version (restarted, or changed by a coordinator that
        # died mid-change): each loads the current one before it takes traffic.
        ranks = ray.get([r.handle.worker_state.remote() for r in self.replicas])
        stale = [r for r, i, k in zip(self.replicas, infos, ranks) if not runs(i, k, (self.version, self.fingerprint))]
        ray.get([r.handle.apply_spec.remote(self.spec.to_wire(), self.version) for r in stale])
        for r, i in zip(self.replicas, infos):
            r.layers, r.healthy = set(i["steerable_layers"]), True
        # advertise what every replica can do, so a request never depends on where it lands
        common = sorted(set.intersection(*(r.layers for r in self.replicas)))
        self._info = {**{k: v for k, v in infos[0].items() if k != "node_id"}, "steerable_layers": common}
        self._rr = itertools.count()
        self.replica_failures = 0  # calls that found their replica dead (retried or failed)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica gracefully (not when the process is killed). Only
        # when the app itself is going away do the detached engines and the persisted state go with it;
        # a replica replaced while the app lives leaves them for its successor.
        try:
            if _app_is_going_away(self.app):
                stop_replicas(self.replicas)
                self.store.delete()
        except Exception:
            pass

    # ---- replica health ------------------------------------------------------------------------
    def _lost(self, r: Replica) -> None:
        self.replica_failures += 1
        r.healthy = False
        if r.recovering is None:
            r.recovering = asyncio.get_running_loop().create_task(self._recover(r))

    async def _recover(self, r: Replica) -> None:
        """Wait for Ray to restart the engine, load the current spec, then put it back in rotation.
        Every failure on the way (still restarting, died again, channel timeout) is retried with backoff."""
        import logging

        log = logging.getLogger(__name__)
        delay = 1.0
        try:
            while True:
                try:
                    await asyncio.wait_for(asyncio.ensure_future(r.handle.info.remote()), timeout=900)
                    async with self.lock.read():  # no change can land while the replica catches up
                        info, ranks = await asyncio.wait_for(asyncio.gather(r.handle.info.remote(),
                                                                            r.handle.worker_state.remote()), 120)
                        if not runs(info, ranks, (self.version, self.fingerprint)):
                            await r.handle.apply_spec.remote(self.spec.to_wire(), self.version)
                        # one step: a _lost() in the lock's release below must see no recovery running
                        r.layers, r.healthy, r.recovering = set(info["steerable_layers"]), True, None
                    return
                except Exception as e:
                    log.warning("replica %d not back yet (%s: %s); retrying in %.0f s", r.index,
                                type(e).__name__, e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            if r.recovering is asyncio.current_task():
                r.recovering = None

    async def wait_healthy(self, timeout_s: float = 600.0) -> list[bool]:
        """Wait until no replica is recovering (tests, rolling operations); health per replica."""
        tasks = [r.recovering for r in self.replicas if r.recovering is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        return [r.healthy for r in self.replicas]

    # ---- reads -------------------------------------------------------------------------------
    def _pick(self, layers: set[int], exclude: set[int]) -> Replica:
        start = next(self._rr)
        n = len(self.replicas)
        order = [self.replicas[(start + k) % n] for k in range(n)]
        able = [r for r in order if layers <= r.layers]
        if not able:
            raise ValueError(f"no replica can steer or capture layers {sorted(layers)}")
        live = [r for r in able if r.healthy and r.index not in exclude]
        if not live:
            raise ReplicaUnavailableError("no engine replica is serving right now (restarting); retry shortly")
        return min(live, key=lambda r: r.in_flight)

    async def _call_engine(self, method: str, *args: Any, layers: set[int] = frozenset()) -> tuple[int, Any]:
        """One call on a healthy replica; if that replica dies under it, once more on another."""
        import ray

        tried: set[int] = set()
        while True:
            async with self.lock.read():
                r = self._pick(set(layers), tried)
                r.in_flight += 1
                # under the read lock the live version cannot change: a replica that does not run it
                # (restarted while idle) refuses, and is restored
                call_args = [(self.version, self.fingerprint) if a is EXPECTED else a for a in args]
                ref = getattr(r.handle, method).remote(*call_args)
                fut = asyncio.ensure_future(ref)
                try:
                    return r.index, await asyncio.shield(fut)
                except asyncio.CancelledError:
                    # The caller went away. Abort the generation and keep the read lock until the engine
                    # has stopped, so no steering change lands under a request still computing KV.
                    ray.cancel(ref)
                    await asyncio.wait([fut], timeout=60)
                    raise
                except (ray.exceptions.RayActorError, StaleReplicaError) as e:
                    self._lost(r)
                    tried.add(r.index)
                    if len(tried) > 1 or not any(x.healthy for x in self.replicas):
                        raise ReplicaUnavailableError(
                            f"engine replica {r.index} died during the request ({type(e).__name__}); "
                            f"it is being restarted, retry") from None
                finally:
                    r.in_flight -= 1

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
        layers = set(check_capture_layers(capture_layers) if capture_layers else []) | _spec_layers(steering_spec)
        i, results = await self._call_engine("generate", prompts, sampling, capture_layers, steering_spec,
                                             EXPECTED, layers=layers)
        return self._tag_captures(i, results)

    async def chat(self, conversations: list[list[dict[str, str]]], sampling: dict[str, Any] | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("conversations must be a non-empty list of message lists")
        return (await self._call_engine("chat", conversations, sampling, chat_template_kwargs, EXPECTED))[1]

    def _owner(self, capture_id: str) -> tuple[Any, str]:
        replica, _, cid = str(capture_id).partition(".")
        if not replica.isdigit() or int(replica) >= len(self.replicas) or not cid:
            raise ValueError(f"unknown capture {capture_id!r}")
        return self.replicas[int(replica)].handle, cid

    async def get_capture(self, capture_id: str) -> dict[str, Any]:
        engine, cid = self._owner(capture_id)
        return await engine.get_capture.remote(cid)

    async def release_captures(self, capture_ids: list[str]) -> int:
        counts = [await e.release_captures.remote([cid]) for e, cid in map(self._owner, capture_ids)]
        return sum(counts)

    async def info(self) -> dict[str, Any]:
        lock = self.lock  # shown so an operator (or a test) sees requests queued behind a change
        return {**self._info, **self._state(), "num_replicas": len(self.replicas),
                "healthy_replicas": sum(r.healthy for r in self.replicas), "replica_failures": self.replica_failures,
                "lock": {"readers": lock.readers, "writer_active": lock.writer_active,
                         "writers_waiting": lock.writers_waiting, "readers_waiting": lock.readers_waiting}}

    def _state(self) -> dict[str, Any]:
        return {"spec_version": self.version, "spec_fingerprint": self.fingerprint, "stack_depth": len(self.stack)}

    async def get_spec(self) -> dict[str, Any]:
        return {"spec": self.spec.to_wire(), **self._state()}

    async def replica_states(self) -> list[list[dict[str, Any]]]:
        """What every TP rank of every replica has committed (for tests and health checks)."""
        return list(await asyncio.gather(*(r.handle.worker_state.remote() for r in self.replicas)))

    # ---- writes ------------------------------------------------------------------------------
    async def _commit_all(self, spec: SteeringSpec) -> None:
        """Stage on every serving replica, then commit on all; caller holds the write lock. A replica
        that dies meanwhile drops out of rotation and loads the result when it comes back."""
        import ray

        targets = [r for r in self.replicas if r.healthy]
        if not targets:
            raise ReplicaUnavailableError("no engine replica is serving right now (restarting); change not applied")
        version, wire = self.version + 1, spec.to_wire()
        staged = await asyncio.gather(*(r.handle.stage.remote(version, wire) for r in targets),
                                      return_exceptions=True)
        dead = [r for r, x in zip(targets, staged) if isinstance(x, ray.exceptions.RayActorError)]
        failed = [(r, _cause(x)) for r, x in zip(targets, staged)
                  if isinstance(x, BaseException) and r not in dead]
        for r in dead:
            self._lost(r)
        live = [r for r in targets if r not in dead]
        if failed or not live:
            await asyncio.gather(*(r.handle.abort.remote(version) for r in live), return_exceptions=True)
            if not failed:
                raise ReplicaUnavailableError("every serving replica died during the change; not applied")
            r, err = failed[0]
            msg = f"replica {r.index} rejected the change: {err}" if len(self.replicas) > 1 else str(err)
            raise (ValueError if isinstance(err, ValueError) else RuntimeError)(msg)
        committed = await asyncio.gather(*(r.handle.commit.remote(version) for r in live), return_exceptions=True)
        bad = [r for r, x in zip(live, committed) if isinstance(x, BaseException)]
        if len(bad) < len(live):  # the change is live somewhere: it is the current state
            self.spec, self.version, self.fingerprint = spec, version, spec.fingerprint()
        for r in bad:  # out of rotation until it has reloaded the current version
            self._lost(r)
        if len(bad) == len(live):
            raise RuntimeError(f"no replica committed version {version}: {_cause(committed[0])}")

    async def _write(self, change) -> dict[str, Any]:
        """Run ``change`` under the write lock, shielded: a caller that disconnects mid-change must
        not leave the engines committed and the coordinator's state behind. The result is persisted
        before the lock is released, so a restarted coordinator resumes from it."""
        async def locked() -> dict[str, Any]:
            async with self.lock.write():
                try:
                    await change()
                finally:
                    self.store.save(SteeringState(self.spec, self.version, list(self.stack)))
                return self._state()

        return await asyncio.shield(locked())

    async def edit(self, edit: dict[str, Any]) -> dict[str, Any]:
        return await self._write(lambda: self._commit_all(apply_edit(self.spec, edit)))

    async def push(self, spec_wire: dict[str, Any]) -> dict[str, Any]:
        """Make ``spec`` current, keeping what it replaces; the reply's ``push_id`` names this push for
        :meth:`pop`."""
        spec = SteeringSpec.from_wire(spec_wire)
        pushed: dict[str, int] = {}

        async def change() -> None:
            previous = self.spec
            await self._commit_all(spec)
            self.stack.append(StackEntry(self.version, previous))
            pushed["push_id"] = self.version

        return {**await self._write(change), **pushed}

    async def pop(self, push_id: int | None = None) -> dict[str, Any]:
        """End a push: the top one, or the one ``push_id`` names. Pushes by clients that do not know of each
        other interleave, so the named one may be below the top: then the push above it keeps its spec
        current and, when it ends, restores what the named push had found."""
        if push_id is not None and (isinstance(push_id, bool) or not isinstance(push_id, int)):
            raise ValueError(f"push_id must be an integer, got {push_id!r}")

        async def change() -> None:
            if not self.stack:
                raise ValueError("steering stack is empty: pop without a matching push")
            ids = [e.push_id for e in self.stack]
            if push_id is not None and push_id not in ids:
                raise ValueError(f"push {push_id} is not on the steering stack (popped already?)")
            i = len(ids) - 1 if push_id is None else ids.index(push_id)
            if i == len(ids) - 1:
                await self._commit_all(self.stack[-1].previous)
                self.stack.pop()
            else:
                self.stack[i + 1].previous = self.stack[i].previous
                del self.stack[i]

        return await self._write(change)
