"""The Serve app end to end: `serve run` a 2-replica app, then drive it over HTTP, through a handle
in this process and from a separate Ray driver process, checking tokens against HF."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import torch

from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, SteeringSpec
from steer_actors.testing.engines import RAY_ADDRESS, rand_vec

pytestmark = pytest.mark.engine

BASE = "http://127.0.0.1:8000/steer"
PROMPT = "Once upon a time there was"
SAMPLING = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
REPO = Path(__file__).resolve().parents[1]


def add_spec(seed: int, layer: int = 1, scale: float = 6.0) -> SteeringSpec:
    return SteeringSpec(layers={layer: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(seed), scale=scale)])})


@pytest.fixture(scope="module")
def served_app(ray_local, qwen3_path, tmp_path_factory):
    """`serve run` of a config with two replicas; replica 1 patches only layers 0-2."""
    cfg = tmp_path_factory.mktemp("serve") / "app.yaml"
    cfg.write_text(json.dumps({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [{
            "name": "steer", "route_prefix": "/steer", "import_path": "steer_actors.serve.app:build_app",
            "args": {"model_name": qwen3_path, "dtype": "float32", "max_model_len": 512, "num_replicas": 2,
                     "enforce_eager": True,
                     "replica_overrides": [{}, {"bootstrap_layers": [0, 1, 2]}], "max_body_bytes": 1 << 20},
        }],
    }))  # JSON is YAML
    proc = subprocess.Popen(["serve", "run", "--address", RAY_ADDRESS, str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"{BASE}/v1/info", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, "serve run did not come up"
        time.sleep(2)
    yield BASE
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def client(served_app):
    from steer_actors import VLLMSteerModel

    return VLLMSteerModel.connect(address=RAY_ADDRESS, app="steer")


@pytest.fixture(scope="module")
def oracle_tokens(oracles):
    o = oracles["qwen3"]
    ids = o.tokenizer(PROMPT).input_ids
    cache: dict[str, list[int]] = {}

    def tokens(spec: SteeringSpec) -> list[int]:
        fp = spec.fingerprint()
        if fp not in cache:
            cache[fp] = o.greedy(ids, SAMPLING["max_tokens"], spec if not spec.is_empty() else None).token_ids
        return cache[fp]

    return tokens


def run(coro):
    return asyncio.run(coro)


async def lock_until(client, cond, running: asyncio.Task | None = None, timeout_s: float = 120.0) -> dict:
    """Poll the coordinator's lock (``info()["lock"]``) until ``cond(lock)`` holds and return it; fails once
    ``running`` (a request the wanted state needs in flight) has ended, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not cond(lock := (await client.info())["lock"]):
        assert running is None or not running.done(), f"the request ended first; lock {lock}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"lock state not reached in {timeout_s} s; last {lock}")
        await asyncio.sleep(0.01)
    return lock


def test_lock_semantics_under_concurrency(client, oracle_tokens):
    """32 readers and 8 writers at once: versions are consecutive, each response's tokens are those
    of the spec its version names (HF), on both replicas."""
    specs = [add_spec(100 + k) for k in range(8)]
    by_fp = {s.fingerprint(): s for s in specs} | {SteeringSpec().fingerprint(): SteeringSpec()}

    async def main():
        await client.clear_all()
        v0 = (await client.steering_state())["spec_version"]

        async def reader(i):
            await asyncio.sleep(0.05 * (i % 8))
            return (await client.generate([PROMPT], **SAMPLING))[0]

        async def writer(k):
            await asyncio.sleep(0.07 * k)
            return await client.apply_steering_spec(specs[k])

        res = await asyncio.gather(*[reader(i) for i in range(32)], *[writer(k) for k in range(8)])
        return v0, res[:32], res[32:]

    v0, reads, writes = run(main())
    assert sorted(w["spec_version"] for w in writes) == list(range(v0 + 1, v0 + 9))  # one at a time, no gaps
    version_fp = {w["spec_version"]: w["spec_fingerprint"] for w in writes}
    for r in reads:
        if r.spec_version in version_fp:
            assert r.spec_fingerprint == version_fp[r.spec_version]
        assert r.token_ids == oracle_tokens(by_fp[r.spec_fingerprint])
    assert len({r.spec_version for r in reads}) > 1  # the readers really interleaved with the writers


def test_writer_waits_for_in_flight_and_later_readers_see_new_spec(client, oracle_tokens):
    new = add_spec(7)

    async def main():
        await client.clear_all()
        v0 = (await client.steering_state())["spec_version"]
        done = {}

        async def timed(name, coro):
            out = await coro
            done[name] = time.monotonic()
            return out

        long_gen = asyncio.create_task(timed("long", client.generate([PROMPT], max_tokens=300, temperature=0.0,
                                                                      ignore_eos=True)))
        await lock_until(client, lambda lock: lock["readers"] == 1, long_gen)  # it runs
        write = asyncio.create_task(timed("write", client.apply_steering_spec(new)))
        await lock_until(client, lambda lock: lock["writers_waiting"] == 1, long_gen)  # the change waits for it
        late = asyncio.create_task(timed("late", client.generate([PROMPT], **SAMPLING)))
        await lock_until(client, lambda lock: lock["readers_waiting"] == 1, long_gen)  # queued behind the change
        return v0, done, await long_gen, await write, await late

    v0, done, long_out, write, late = run(main())
    assert done["long"] <= done["write"] <= done["late"]
    assert long_out[0].spec_version == v0 and write["spec_version"] == v0 + 1
    assert late[0].spec_version == v0 + 1 and late[0].token_ids == oracle_tokens(new)
    # all done: nothing holds or waits for the lock, and HTTP shows it as the handle does
    idle = {"readers": 0, "writer_active": False, "writers_waiting": 0, "readers_waiting": 0}
    assert httpx.get(f"{BASE}/v1/info", timeout=30).json()["lock"] == idle


def test_steering_context_and_stack(client, oracle_tokens):
    a, b = add_spec(21), add_spec(22, layer=2)

    async def main():
        await client.apply_steering_spec(a)
        async with client.steering(b):
            inner = (await client.generate([PROMPT], **SAMPLING))[0]
            assert (await client.steering_state())["stack_depth"] == 1
        with pytest.raises(RuntimeError, match="boom"):
            async with client.steering(b):
                raise RuntimeError("boom")
        after = (await client.generate([PROMPT], **SAMPLING))[0]
        exported = await client.export_steering_spec()
        await client.push_steering_spec(b)
        await client.push_steering_spec(SteeringSpec())
        depth2 = (await client.steering_state())["stack_depth"]
        await client.pop_steering_spec()
        mid = await client.export_steering_spec()
        await client.pop_steering_spec()
        with pytest.raises(ValueError, match="stack is empty"):
            await client.pop_steering_spec()
        return inner, after, exported, depth2, mid

    inner, after, exported, depth2, mid = run(main())
    assert inner.token_ids == oracle_tokens(b)
    assert after.token_ids == oracle_tokens(a)
    assert exported.fingerprint() == a.fingerprint() and mid.fingerprint() == b.fingerprint() and depth2 == 2


def test_interleaved_contexts_each_end_their_own_push(client, oracle_tokens):
    """Two clients' contexts interleave (A enters, B enters, A leaves): B's spec stays current until B leaves,
    and then the spec from before both comes back."""
    a, b = add_spec(71), add_spec(72, layer=2)

    async def main():
        await client.clear_all()
        base = await client.steering_state()
        ctx_a, ctx_b = client.steering(a), client.steering(b)
        await ctx_a.__aenter__()
        await ctx_b.__aenter__()
        await ctx_a.__aexit__(None, None, None)
        mid = (await client.generate([PROMPT], **SAMPLING))[0]
        mid_state = await client.steering_state()
        await ctx_b.__aexit__(None, None, None)
        end = await client.steering_state()
        pushed = await client.push_steering_spec(a)
        with pytest.raises(ValueError, match="not on the steering stack"):
            await client.pop_steering_spec(pushed["push_id"] + 1000)
        await client.pop_steering_spec(pushed["push_id"])
        return base, mid, mid_state, end

    base, mid, mid_state, end = run(main())
    assert mid.token_ids == oracle_tokens(b) and mid_state["stack_depth"] == 1
    assert mid_state["spec_fingerprint"] == b.fingerprint()
    assert end["spec_fingerprint"] == base["spec_fingerprint"] and end["stack_depth"] == 0


def test_cancelled_steering_context_leaves_nothing_behind(client, oracle_tokens):
    """A context cancelled while its push waits for the write lock (long generations in flight): the
    coordinator still lands the push, and the context ends it, so the spec and the stack are as before."""
    b = add_spec(73)

    async def attempt():
        await client.clear_all()
        base = await client.steering_state()
        long_gen = asyncio.create_task(client.generate([PROMPT] * 4, max_tokens=480, temperature=0.0,
                                                       ignore_eos=True))
        await lock_until(client, lambda lock: lock["readers"] == 1, long_gen)  # the generations run
        entered = asyncio.Event()

        async def body():
            async with client.steering(b):
                entered.set()

        enter = asyncio.create_task(body())
        await lock_until(client, lambda lock: lock["writers_waiting"] == 1 or enter.done() or long_gen.done())
        # the case under test: the push is still waiting for the generations (else try again, longer)
        waiting = not long_gen.done() and not enter.done() and not entered.is_set()
        enter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await enter
        long_out = (await long_gen)[0]
        end = await client.steering_state()
        after = (await client.generate([PROMPT], **SAMPLING))[0]
        return waiting, base, long_out, end, after

    async def main():
        for _ in range(3):
            got = await attempt()
            if got[0]:
                return got
        return got

    waiting, base, long_out, end, after = run(main())
    assert waiting, "the push never waited for the generations: nothing was tested"
    assert long_out.spec_version == base["spec_version"]  # the push waited for it
    assert end["spec_version"] == base["spec_version"] + 2  # the push landed, then its undo
    assert end["stack_depth"] == 0 and end["spec_fingerprint"] == base["spec_fingerprint"]
    assert after.token_ids == oracle_tokens(SteeringSpec())


def test_two_replicas_steer_and_fail_atomically(client, oracle_tokens):
    spec = add_spec(31)

    async def main():
        await client.apply_steering_spec(spec)
        outs = await asyncio.gather(*[client.generate([PROMPT], **SAMPLING) for _ in range(6)])
        before = await client.steering_state()
        # replica 1 does not patch layer 3: the change must fail there and commit nowhere
        bad = SteeringSpec(layers={3: LayerSteeringSpec(operations=[AddSpec(vector=rand_vec(32), scale=6.0)])})
        with pytest.raises(ValueError, match="replica 1 .*not steerable"):
            await client.apply_steering_spec(bad)
        after = await client.steering_state()
        states = await client._handle.replica_states.remote()
        again = await asyncio.gather(*[client.generate([PROMPT], **SAMPLING) for _ in range(6)])
        return outs, before, after, states, again

    outs, before, after, states, again = run(main())
    assert all(o[0].token_ids == oracle_tokens(spec) for o in outs + again)
    assert before == after
    ranks = [r for replica in states for r in replica]
    assert len(states) == 2 and {(r["version"], r["fingerprint"]) for r in ranks} == {
        (before["spec_version"], before["spec_fingerprint"])}


def _http_scenario(base: str) -> list[list[int]]:
    """Clear, steer layer 1 with add (msgpack body), cap layer 2 (JSON), generate; returns tokens."""
    with httpx.Client(base_url=base, timeout=120) as c:
        assert c.delete("/v1/steering").status_code == 200
        vec = rand_vec(41).numpy().astype("<f4")
        body = msgpack.packb({"vector": {"data": vec.tobytes(), "shape": [256], "dtype": "float32"}, "scale": 6.0})
        r = c.put("/v1/steering/layers/1/add", content=body, headers={"content-type": "application/msgpack"})
        assert r.status_code == 200, r.text
        r = c.put("/v1/steering/layers/2/cap", json={"vector": rand_vec(42).tolist(), "max": 0.0})
        assert r.status_code == 200, r.text
        r = c.post("/v1/generate", json={"prompts": [PROMPT, "Hello world, the sea"], "sampling": SAMPLING})
        assert r.status_code == 200, r.text
        return [x["token_ids"] for x in r.json()["results"]]


HANDLE_SCENARIO = f"""
import asyncio, json
from steer_actors.testing.engines import rand_vec
from steer_actors import VLLMSteerModel
async def main():
    m = VLLMSteerModel.connect(address={RAY_ADDRESS!r}, app="steer")
    await m.clear_all()
    await m.set_layer_vector(1, rand_vec(41), scale=6.0)
    await m.set_layer_projection_cap(2, rand_vec(42), max=0.0)
    out = await m.generate([{PROMPT!r}, "Hello world, the sea"], max_tokens=8, temperature=0.0, ignore_eos=True)
    print("TOKENS=" + json.dumps([o.token_ids for o in out]))
asyncio.run(main())
"""


def test_http_handle_and_separate_driver_agree(served_app, client, oracles):
    http_tokens = _http_scenario(served_app)
    proc = subprocess.run([sys.executable, "-c", HANDLE_SCENARIO], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS=")]
    assert line, proc.stderr[-3000:]
    driver_tokens = json.loads(line[0][len("TOKENS="):])
    spec = client.export_steering_spec()
    o = oracles["qwen3"]
    want = [o.greedy(o.tokenizer(p).input_ids, 8, spec).token_ids for p in [PROMPT, "Hello world, the sea"]]
    assert http_tokens == driver_tokens == want
    assert [op.kind for op in spec.layers[1].operations] == ["add"] and spec.layers[2].operations[0].kind == "cap"
    run(client.clear_all())


@pytest.mark.parametrize("method, path, kwargs, status, message", [
    ("post", "/v1/generate", dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid"),
    ("post", "/v1/generate", dict(content=b"\xc1\xc1", headers={"content-type": "application/msgpack"}), 400,
     "msgpack"),
    ("post", "/v1/generate", dict(json={"prompts": []}), 400, "prompts"),
    ("post", "/v1/generate", dict(content=b"x", headers={"content-type": "text/plain"}), 415, "content type"),
    ("put", "/v1/steering/layers/1/add", dict(json={"vector": [1.0] * 3}), 400, "hidden size"),
    ("put", "/v1/steering/layers/1/add", dict(json={"vector": [1.0, "x"]}), 400, "vector"),
    ("put", "/v1/steering/layers/9/add", dict(json={"vector": [1.0] * 256}), 400, "out of range"),
    ("put", "/v1/steering/layers/1/cap", dict(json={"vector": [0.0] * 256, "max": 1.0}), 400, "zero norm"),
    ("put", "/v1/steering/layers/1/cap", dict(json={"vector": [1.0] * 256, "min": 2.0, "max": 1.0}), 400, "min"),
    ("put", "/v1/steering/layers/1/warp", dict(json={"vector": [1.0] * 256}), 400, "kind"),
    ("put", "/v1/steering/layers/1/add", dict(content=msgpack.packb({"vector": {"data": b"\x00" * 7, "shape": [256],
                                                                                "dtype": "float32"}}),
                                              headers={"content-type": "application/msgpack"}), 400, "bytes"),
    ("put", "/v1/steering", dict(content=b"0" * (1 << 20 + 1), headers={"content-type": "application/json"}), 413,
     "exceeds"),
    ("post", "/v1/steering/pop", {}, 400, "stack is empty"),
    ("post", "/v1/steering/pop", dict(json={"push_id": "first"}), 400, "push_id"),
    ("post", "/v1/generate", dict(json={"prompts": ["hi"], "capture_layers": ["x"]}), 400, "capture_layers"),
    ("post", "/v1/generate", dict(content=b"[" * 100_000, headers={"content-type": "application/json"}), 400,
     "invalid"),
    # chunked: no Content-Length to refuse it by
    ("put", "/v1/steering", dict(content=iter([b"0" * 65536] * 20), headers={"content-type": "application/json"}),
     413, "exceeds"),
    ("post", "/v1/generate", dict(json={"prompts": ["hi"], "sampling": {"temperature": -1.0}}), 400, "temperature"),
    ("post", "/v1/generate", dict(json={"prompts": ["hi"], "sampling": {"bogus_knob": 1}}), 400, "sampling"),
    ("delete", "/v1/steering/layers/-1", {}, 400, ">= 0"),
    ("put", "/v1/steering", dict(content=b"null", headers={"content-type": "application/json"}), 400, "spec map"),
])
def test_malformed_http_is_4xx_and_changes_nothing(served_app, client, method, path, kwargs, status, message):
    run(client.apply_steering_spec(add_spec(51)))
    before = httpx.get(f"{served_app}/v1/steering").json()
    r = getattr(httpx, method)(f"{served_app}{path}", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    after = httpx.get(f"{served_app}/v1/steering").json()
    assert after == before
    ok = httpx.post(f"{served_app}/v1/generate", json={"prompts": [PROMPT], "sampling": SAMPLING}, timeout=60)
    assert ok.status_code == 200 and ok.json()["results"][0]["spec_version"] == before["spec_version"]


def test_msgpack_spec_round_trip_over_http(served_app):
    spec = SteeringSpec(layers={0: LayerSteeringSpec(operations=[AblationSpec(vector=rand_vec(61), scale=0.5)])})
    r = httpx.put(f"{served_app}/v1/steering", content=spec.to_msgpack(),
                  headers={"content-type": "application/msgpack", "accept": "application/msgpack"})
    assert r.status_code == 200
    got = httpx.get(f"{served_app}/v1/steering", headers={"accept": "application/msgpack"})
    back = msgpack.unpackb(got.content, raw=False)
    assert SteeringSpec.from_wire(back["spec"]).fingerprint() == spec.fingerprint()
    assert back["spec_fingerprint"] == spec.fingerprint()
    assert np.frombuffer(back["spec"]["layers"]["0"]["operations"][0]["vector"]["data"], "<f4").shape == (256,)
    httpx.delete(f"{served_app}/v1/steering")
    doc = httpx.get(f"{served_app}/openapi.json")
    assert doc.status_code == 200 and "/v1/generate" in doc.json()["paths"]


def test_capture_through_app_and_batched_fetch_from_separate_driver(served_app, client, oracles, tmp_path):
    """64 capture handles made and fetched (one batched get) by a separate Ray driver process."""
    out = tmp_path / "fetch.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "capture_fetch.py"), "--address", RAY_ADDRESS,
                           "--layers", "0,1,2",  # replica 1 patches only layers 0-2
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.exists(), proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["handles"] == 64 and res["shapes_ok"] and res["bytes"] > 0 and res["bytes_per_s"] > 0


def test_capture_http_download_and_release(served_app, client, oracles):
    from safetensors.torch import load

    run(client.clear_all())
    ids = oracles["qwen3"].tokenizer(PROMPT).input_ids
    r = httpx.post(f"{served_app}/v1/generate", json={"prompts": [ids], "sampling": SAMPLING,
                                                      "capture_layers": [1, 2]}, timeout=120)
    assert r.status_code == 200, r.text
    cap = r.json()["results"][0]["captures"]
    full = ids + r.json()["results"][0]["token_ids"]
    ref = oracles["qwen3"].hidden_states(full[:-1])
    mp = msgpack.unpackb(httpx.get(f"{served_app}/v1/captures/{cap['capture_id']}").content, raw=False)
    st = load(httpx.get(f"{served_app}/v1/captures/{cap['capture_id']}", params={"format": "safetensors"}).content)
    from steer_actors.wire import decode_tensor

    for layer in (1, 2):
        got = decode_tensor(mp["layers"][str(layer)])
        assert torch.equal(got, st[f"layer_{layer}"])
        assert (got - ref[layer]).abs().max().item() <= 1e-5 * max(1.0, ref[layer].abs().max().item())
    assert mp["token_ids"] == full[:-1] == st["token_ids"].tolist()
    assert httpx.delete(f"{served_app}/v1/captures/{cap['capture_id']}").status_code == 200
    gone = httpx.get(f"{served_app}/v1/captures/{cap['capture_id']}")
    assert gone.status_code == 404 and "unknown capture" in gone.json()["error"]


def test_per_request_spec_through_client_and_http(served_app, client, oracle_tokens):
    """A request's own spec rides along with the global one (global ops first) on either replica."""
    g, r = add_spec(71), add_spec(72, layer=2)
    both = SteeringSpec(layers={1: g.layers[1], 2: r.layers[2]})

    async def main():
        await client.apply_steering_spec(g)
        outs = await asyncio.gather(*[client.generate([PROMPT], steering_spec=r if i % 2 else None, **SAMPLING)
                                      for i in range(6)])
        return [o[0] for o in outs]

    outs = run(main())
    http = httpx.post(f"{served_app}/v1/generate", json={"prompts": [PROMPT], "sampling": SAMPLING,
                                                         "steering_spec": r.model_dump(mode="json")}, timeout=120)
    run(client.clear_all())
    for i, o in enumerate(outs):
        assert o.token_ids == oracle_tokens(both if i % 2 else g)
    assert http.status_code == 200 and http.json()["results"][0]["token_ids"] == oracle_tokens(both)
