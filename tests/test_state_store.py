"""The coordinator's durable state and its replica check (pure: no engine)."""

from steer_actors import wire
from steer_actors.control.coordinator import runs
from steer_actors.specs import AddSpec, LayerSteeringSpec, SteeringSpec
from steer_actors.control.state_store import StackEntry, SteeringState


def _spec(x: float) -> SteeringSpec:
    return SteeringSpec(layers={1: LayerSteeringSpec(operations=[AddSpec(vector=[x, 1.0], scale=2.0)])})


def test_state_round_trips_with_push_ids():
    state = SteeringState(_spec(3.0), 7, [StackEntry(4, SteeringSpec()), StackEntry(7, _spec(1.0))])
    back = SteeringState.from_bytes(state.to_bytes())
    assert back.version == 7 and back.spec.fingerprint() == _spec(3.0).fingerprint()
    assert [(e.push_id, e.previous.fingerprint()) for e in back.stack] == [
        (4, SteeringSpec().fingerprint()), (7, _spec(1.0).fingerprint())]


def test_state_saved_before_push_ids_still_loads():
    old = wire.packb({"version": 2, "spec": _spec(3.0).to_wire(), "stack": [SteeringSpec().to_wire()]})
    back = SteeringState.from_bytes(old)
    assert [(e.push_id, e.previous.fingerprint()) for e in back.stack] == [(0, SteeringSpec().fingerprint())]


def test_a_replica_runs_a_version_only_if_every_rank_does():
    want = (5, "fp5")
    info = {"spec_version": 5, "spec_fingerprint": "fp5"}
    assert runs(info, [{"version": 5, "fingerprint": "fp5"}] * 2, want)
    # a commit that switched rank 0 and failed on rank 1: the engine's own record still says 5
    assert not runs(info, [{"version": 6, "fingerprint": "fp6"}, {"version": 5, "fingerprint": "fp5"}], want)
    assert not runs({"spec_version": 4, "spec_fingerprint": "fp4"}, [{"version": 5, "fingerprint": "fp5"}], want)
