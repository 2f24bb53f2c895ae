"""Two simulated nodes (``ray.cluster_utils.Cluster``): replicas pinned to different nodes, one spec
version across them, a capture made on node B fetched on node A, a replica killed under load, the
coordinator killed and restored from GCS.

Runs in a pytest process of its own (``tests/test_multinode.py`` starts it): the two-node cluster needs
this process's Ray driver, and the main pytest process's engine handles would not survive a reconnect."""

from __future__ import annotations

import asyncio

import pytest

from steer_actors.client.handles import CaptureHandle, fetch_captures_batch
from steer_actors.specs import AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
from steer_actors.testing.engines import rand_vec
from steer_actors.testing.waits import wait_until

pytestmark = pytest.mark.engine

APP = "mn"
SAMPLING = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(30, 45)), list(range(300, 309))]
_pin = lambda node: {"actor_options": {"resources": {node: 0.01}}}  # noqa: E731
APP_CONFIG = dict(dtype="float32", enforce_eager=True, max_model_len=512, num_replicas=2, max_steering_slots=2,
                  replica_overrides=[_pin("node_a"), _pin("node_b")])


@pytest.fixture(scope="module")
def cluster(qwen3_path):
    """Head = node A, one worker = node B; this test process is a driver attached to node A."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1},
                                                      "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture(scope="module")
def app(cluster, qwen3_path):
    from ray import serve

    from steer_actors.serve.app import build_app

    APP_CONFIG.update(model_name=qwen3_path)
    handle = serve.run(build_app(APP_CONFIG), name=APP, route_prefix=f"/{APP}")
    yield handle
    serve.delete(APP)


def engine(i: int):
    import ray

    return ray.get_actor(f"{APP}-engine-{i}", namespace="steer_actors")


def node_of_engine(i: int) -> str:
    import ray

    return ray.get(engine(i).info.remote())["node_id"]


def node_ids(cluster) -> dict[str, str]:
    import ray

    return {("node_a" if "node_a" in n["Resources"] else "node_b"): n["NodeID"] for n in ray.nodes() if n["Alive"]}


def spec_a() -> SteeringSpec:
    return SteeringSpec(layers={
        1: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(81), scale=4.0)]),
        2: LayerSteeringSpec(operations=[ProjectionCapSpec(vector=rand_vec(82), min=-0.3, max=0.3)]),
    })


def hf_tokens(oracle, spec):
    return [oracle.greedy(p, SAMPLING["max_tokens"], spec).token_ids for p in PROMPTS]


def direct_tokens(i: int) -> list[list[int]]:
    import ray

    return [r["token_ids"] for r in ray.get(engine(i).generate.remote(PROMPTS, SAMPLING), timeout=300)]


def test_replicas_on_two_nodes_and_one_change_steers_both(cluster, app, oracles):
    nodes = node_ids(cluster)
    assert node_of_engine(0) == nodes["node_a"] and node_of_engine(1) == nodes["node_b"]
    state = app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    ranks = app.replica_states.remote().result()
    assert [[r["version"] for r in rep] for rep in ranks] == [[state["spec_version"]]] * 2
    want = hf_tokens(oracles["qwen3"], spec_a())
    assert want != hf_tokens(oracles["qwen3"], None)  # the spec changes the tokens
    assert direct_tokens(0) == want and direct_tokens(1) == want


def test_capture_made_on_node_b_is_fetched_on_node_a(cluster, app, oracles):
    import ray

    assert ray.get_runtime_context().get_node_id() == node_ids(cluster)["node_a"]
    results = ray.get(engine(1).generate.remote(PROMPTS, SAMPLING, [0, 3]), timeout=300)
    handles = fetch_captures_batch([CaptureHandle.from_wire(r["captures"]) for r in results])
    spec = SteeringSpec.from_wire(app.get_spec.remote().result()["spec"])
    for prompt, res, h in zip(PROMPTS, results, handles):
        full = prompt + res["token_ids"]
        ref = oracles["qwen3"].hidden_states(full[:-1], spec)
        assert h.positions == list(range(len(full) - 1))
        for layer in (0, 3):
            got = h.captures[layer][0]["hidden"]
            assert (got - ref[layer]).abs().max().item() <= 1e-5 * max(1.0, ref[layer].abs().max().item())


def test_replica_killed_under_load_fails_clearly_and_comes_back_current(cluster, app, oracles):
    import ray

    from steer_actors.control.coordinator import ReplicaUnavailableError

    state = app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    long = dict(SAMPLING, max_tokens=200)
    want = [oracles["qwen3"].greedy(p, 200, spec_a()).token_ids for p in PROMPTS]

    def regions_in_use() -> int:  # a capturing request holds regions of its worker's arena while it runs
        return ray.get(engine(1).capture_arena_stats.remote(), timeout=30)["regions_in_use"]

    wait_until(lambda: regions_in_use() == 0, timeout_s=60, every=0.1)  # earlier captures' regions are freed

    async def load():
        # every call captures one layer, so replica 1 shows when requests run on it
        calls = [app.generate.remote([PROMPTS[k % 2]], long, [0]) for k in range(20)]
        await asyncio.to_thread(wait_until, lambda: regions_in_use() > 0, 120, 0.05)
        ray.kill(engine(1), no_restart=False)  # Ray restarts it in place, empty
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=240)

    outcomes = asyncio.run(load())
    ok = errors = 0
    for k, out in enumerate(outcomes):
        if isinstance(out, BaseException):
            assert isinstance(out, ReplicaUnavailableError) and "died" in str(out), repr(out)
            errors += 1
        else:
            assert out[0]["token_ids"] == want[k % 2]
            ok += 1
    assert ok >= 10, (ok, errors)  # the survivor took the retries
    assert app.info.remote().result()["replica_failures"] >= 1  # the kill did land under requests
    wait_until(lambda: app.info.remote().result()["healthy_replicas"] == 2)
    ranks = app.replica_states.remote().result()
    assert ranks[1][0]["version"] == state["spec_version"]
    assert ranks[1][0]["fingerprint"] == spec_a().fingerprint()
    assert direct_tokens(1) == hf_tokens(oracles["qwen3"], spec_a())


def test_replica_restarted_while_idle_never_serves_a_stale_spec(cluster, app, oracles):
    """Nothing is in flight when replica 1 dies, so no call fails; Ray restarts it empty. It must refuse
    requests until it runs the current version (they go to replica 0), then come back current."""
    import ray

    state = app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    failures = app.info.remote().result()["replica_failures"]
    ray.kill(engine(1), no_restart=False)
    wait_until(lambda: ray.get(engine(1).info.remote(), timeout=5)["spec_version"] == 0, timeout_s=300)
    want = hf_tokens(oracles["qwen3"], spec_a())
    for _ in range(4):  # round-robin reaches the restarted replica
        out = app.generate.remote(PROMPTS, SAMPLING).result(timeout_s=300)
        assert [r["token_ids"] for r in out] == want
        assert {r["spec_version"] for r in out} == {state["spec_version"]}
    assert app.info.remote().result()["replica_failures"] > failures  # it refused, it was not trusted
    wait_until(lambda: app.info.remote().result()["healthy_replicas"] == 2)
    assert direct_tokens(1) == want


def test_coordinator_killed_comes_back_with_spec_stack_and_version(cluster, app, oracles):
    import ray

    app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    pushed = SteeringSpec(layers={0: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(83), scale=3.0)])})
    before = app.push.remote(pushed.to_wire()).result()
    spec_before = app.get_spec.remote().result()
    coord = [a for a in ray.util.list_named_actors(all_namespaces=True) if "SteeringCoordinator" in a["name"]]
    assert len(coord) == 1
    ray.kill(ray.get_actor(coord[0]["name"], namespace=coord[0]["namespace"]), no_restart=True)

    def restored():
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SteeringCoordinator" in a["name"]]
        return names and names[0] != coord[0]["name"] and app.get_spec.remote().result(timeout_s=30)

    after = wait_until(restored, timeout_s=300)
    assert after["spec_version"] == before["spec_version"] and after["stack_depth"] == 1
    assert SteeringSpec.from_wire(after["spec"]).fingerprint() == SteeringSpec.from_wire(spec_before["spec"]).fingerprint()
    out = app.generate.remote(PROMPTS, SAMPLING).result(timeout_s=300)
    assert [r["token_ids"] for r in out] == hf_tokens(oracles["qwen3"], pushed)
    popped = app.pop.remote().result()  # the stack came back too
    assert popped["stack_depth"] == 0 and popped["spec_version"] == before["spec_version"] + 1
    assert [r["token_ids"] for r in app.generate.remote(PROMPTS, SAMPLING).result()] == hf_tokens(oracles["qwen3"], spec_a())


def test_redeploy_with_another_engine_config_replaces_engines_and_keeps_the_spec(cluster, app, oracles):
    """Serve replaces the coordinator; engines found by name but started with another config are
    replaced, the spec and version survive (the app was never deleted), and the new engines run it."""
    from ray import serve

    from steer_actors.serve.app import build_app

    state = app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    old_ids = [engine(i)._actor_id for i in (0, 1)]
    handle = serve.run(build_app({**APP_CONFIG, "max_steering_slots": 3}), name=APP, route_prefix=f"/{APP}")
    new_ids = [engine(i)._actor_id for i in (0, 1)]
    assert all(n != o for n, o in zip(new_ids, old_ids))
    after = handle.get_spec.remote().result()
    assert after["spec_version"] == state["spec_version"]
    assert [r["token_ids"] for r in handle.generate.remote(PROMPTS, SAMPLING).result()] == hf_tokens(oracles["qwen3"], spec_a())
    assert direct_tokens(0) == direct_tokens(1) == hf_tokens(oracles["qwen3"], spec_a())


def test_deleting_the_app_stops_its_engines_and_forgets_its_state(cluster, app):
    """Engines are detached (they outlive a coordinator crash), so the app's deletion must stop them."""
    from ray import serve

    from steer_actors.control.state_store import StateStore

    app.edit.remote({"action": "replace", "spec": spec_a().to_wire()}).result()
    assert StateStore(APP).load() is not None
    serve.delete(APP)

    def gone():
        left = 0
        for i in (0, 1):
            try:
                engine(i)
                left += 1
            except ValueError:
                pass
        return left == 0

    wait_until(gone, timeout_s=120)
    assert StateStore(APP).load() is None
