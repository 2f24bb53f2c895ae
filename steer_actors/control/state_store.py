"""The coordinator's durable state (spec, stack, version) in Ray's GCS key-value store.

Written under the write lock after every committed change, read once when a coordinator starts: a
coordinator that Serve restarts after a crash resumes with the same spec, stack and version. GCS is
the cluster's own fault-tolerant store (Serve keeps its checkpoints there too). Values are msgpack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steer_actors import wire
from steer_actors.specs import SteeringSpec

NAMESPACE = "steer_actors"


@dataclass
class StackEntry:
    push_id: int  # the version its push committed: its pop names it
    previous: SteeringSpec  # what its pop restores


@dataclass
class SteeringState:
    spec: SteeringSpec = field(default_factory=SteeringSpec)
    version: int = 0
    stack: list[StackEntry] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return wire.packb({"version": self.version, "spec": self.spec.to_wire(),
                           "stack": [{"push_id": e.push_id, "previous": e.previous.to_wire()} for e in self.stack]})

    @classmethod
    def from_bytes(cls, data: bytes) -> "SteeringState":
        obj = wire.unpackb(data)
        # entries saved before pushes had ids are bare specs: id 0, popped only by an unnamed pop
        stack = [StackEntry(int(e["push_id"]), SteeringSpec.from_wire(e["previous"])) if "previous" in e else
                 StackEntry(0, SteeringSpec.from_wire(e)) for e in obj["stack"]]
        return cls(SteeringSpec.from_wire(obj["spec"]), int(obj["version"]), stack)


class StateStore:
    def __init__(self, app: str):
        self.key = f"{app}/steering-state".encode()

    def load(self) -> SteeringState | None:
        from ray.experimental.internal_kv import _internal_kv_get

        data = _internal_kv_get(self.key, namespace=NAMESPACE)
        return SteeringState.from_bytes(data) if data else None

    def save(self, state: SteeringState) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, state.to_bytes(), overwrite=True, namespace=NAMESPACE)

    def delete(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.key, namespace=NAMESPACE)
