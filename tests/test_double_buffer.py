"""Global rows in two copies (steer_actors.worker.double_buffer) on real layer modules and the real op (CPU
path): a change written while a forward runs waits for nothing, that forward reads one version on every
layer, and the next forward reads the change."""

from __future__ import annotations

import threading

import torch

from steer_actors.ops.rows import Op, ops_to_flat
from steer_actors.worker.layer_patch import LayerSteerer, pack_rows
from steer_actors.worker.runtime import WorkerRuntime

H, L = 16, 3


def make_layers():
    rt = WorkerRuntime()
    return [LayerSteerer(rt, i, H, 2, max_tokens=8, num_layers=L) for i in range(L)]


def write(layers, rows, active):
    rt = layers[0].runtime
    rt.selector.write(lambda copy: rt.staging.load(pack_rows([(layer, rows, active) for layer in layers],
                                                             ("global", copy))))


def commit(layers, v):
    write(layers, ops_to_flat([Op("add", v, scale=1.0)], 2, H), True)


def forward(layers, x, after_first_layer=None):
    layers[0].runtime.selector.at_forward_start()  # what the runner hook does before it enqueues a forward
    for i, layer in enumerate(layers):
        d = torch.zeros_like(x)
        layer(d, x)
        x = d + x
        if i == 0 and after_first_layer is not None:
            after_first_layer()
    return x


def test_a_change_during_a_forward_lands_whole_at_the_next_one():
    layers = make_layers()
    g = torch.Generator().manual_seed(0)
    v1, v2, v3 = (torch.randn(H, generator=g) for _ in range(3))
    x = torch.randn(2, H, generator=g)
    commit(layers, v1)
    torch.testing.assert_close(forward(layers, x), x + L * v1)
    # written while layer 0 of this forward has run and layers 1-2 have not: they still read v1
    out = forward(layers, x, after_first_layer=lambda: commit(layers, v2))
    torch.testing.assert_close(out, x + L * v1)
    torch.testing.assert_close(forward(layers, x), x + L * v2)
    # two changes between forwards: the later wins, whole
    commit(layers, v3)
    commit(layers, v1)
    torch.testing.assert_close(forward(layers, x), x + L * v1)
    # an empty change turns every layer off in the copy it writes
    write(layers, ops_to_flat([], 2, H), False)
    torch.testing.assert_close(forward(layers, x), x)


def test_a_writer_never_waits_for_a_forward_being_enqueued():
    """The runner holds its forward lock while it enqueues; a change does not need that lock."""
    layers = make_layers()
    v = torch.randn(H, generator=torch.Generator().manual_seed(1))
    done = threading.Event()
    with layers[0].runtime.gate.lock:  # a forward being enqueued, for as long as it takes
        th = threading.Thread(target=lambda: (commit(layers, v), done.set()), daemon=True)
        th.start()
        assert done.wait(5), "the change waited for the forward lock"
    x = torch.zeros(1, H)
    torch.testing.assert_close(forward(layers, x), x + L * v)


def test_engine_rows_land_as_the_workers_own_build():
    """What the engine actor sends for a change (one row per op, :func:`change_rows.rows_payload`), read by a
    worker and packed, equals the K-slot rows the worker would build from the spec itself, byte for byte;
    a payload that does not fit the worker's layers is refused whole."""
    import pytest

    import msgspec

    from steer_actors.ops.change import rows_payload
    from steer_actors.worker import protocol
    from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec
    from steer_actors.worker.extension import SteerWorkerExtension

    layers = make_layers()
    g = torch.Generator().manual_seed(3)
    v = lambda: torch.randn(H, generator=g)  # noqa: E731
    spec = SteeringSpec(layers={
        0: LayerSteeringSpec(operations=[AddSpec(vector=v(), scale=0.3), ProjectionCapSpec(vector=v(), max=0.5)]),
        2: LayerSteeringSpec(operations=[AblationSpec(vector=v(), scale=0.25)])})
    worker = SteerWorkerExtension()
    worker._steer_layer_cache = dict(enumerate(layers))
    # as the channel carries it
    req = protocol.encode_request("steer_stage", (1, rows_payload(spec, list(range(L)), 2, H)))
    _, (_, payload) = protocol.decode_request(req, "steer")
    assert len(payload.vectors) == 3 * H * 4  # one row per op, not 2 slots x 2 rows per layer
    fp, rows = worker._rows_from_engine(payload)
    assert fp == spec.fingerprint() and rows[1] == ("", None)
    assert {i: rows[i][0] for i in (0, 2)} == {i: spec.layers[i].fingerprint() for i in (0, 2)}
    got = pack_rows([(layers[i], rows[i][1], bool(rows[i][0])) for i in range(L)], ("global", 0))
    want = [ops_to_flat(spec.layers[i].to_ops() if i in spec.layers else [], 2, H) for i in range(L)]
    assert torch.equal(got.flat[:-L], torch.from_numpy(__import__("numpy").concatenate(want)))
    assert got.flat[-L:].tolist() == [1.0, 0.0, 1.0]  # each layer's active flag, in the same buffer

    edit = msgspec.structs.replace
    bad = [(edit(payload, vectors=payload.vectors[:-4 * H]), "vectors for"),
           (edit(payload, steerable=[0, 1]), "this worker steers"),
           (edit(payload, hidden=H * 2), "hidden"),
           (edit(payload, layers={**payload.layers, 0: (payload.layers[0][0], [["add"], ["bogus"]])}), "malformed op")]
    for change, msg in bad:
        with pytest.raises(ValueError, match=msg):
            worker._rows_from_engine(change)
