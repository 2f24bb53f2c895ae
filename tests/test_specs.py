"""Spec models: validation errors name the problem; msgpack and JSON round trips are exact."""

import math

import msgpack
import pytest
import torch

from steer_actors.specs import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SteeringSpec, apply_edit
from steer_actors import wire


def _spec():
    g = torch.Generator().manual_seed(0)
    return SteeringSpec(layers={
        2: LayerSteeringSpec(operations=[AddSpec(vector=torch.randn(8, generator=g), scale=1.5),
                                         ProjectionCapSpec(vector=torch.randn(8, generator=g), min=-1.0, max=2.0)]),
        0: LayerSteeringSpec(operations=[AblationSpec(vector=torch.randn(8, generator=g), scale=0.25)]),
    })


def test_msgpack_and_json_round_trip():
    s = _spec()
    via_msgpack = SteeringSpec.from_msgpack(s.to_msgpack())
    via_json = SteeringSpec.model_validate_json(s.model_dump_json())
    for other in (via_msgpack, via_json):
        assert other.fingerprint() == s.fingerprint()
        for i in s.layers:
            for a, b in zip(s.layers[i].operations, other.layers[i].operations):
                assert torch.equal(a.vector, b.vector) and a.model_dump(exclude={"vector"}) == b.model_dump(
                    exclude={"vector"})
    assert list(s.layers) == [0, 2]  # canonical order, so fingerprints do not depend on insertion order


def test_wire_is_plain_msgpack_with_float32_bytes():
    raw = msgpack.unpackb(_spec().to_msgpack(), raw=False)
    vec = raw["layers"]["2"]["operations"][0]["vector"]
    assert vec["dtype"] == "float32" and vec["shape"] == [8] and len(vec["data"]) == 32


@pytest.mark.parametrize("make, message", [
    (lambda: AddSpec(vector=[1.0, float("nan")]), "NaN or Inf"),
    (lambda: AddSpec(vector=[1.0, math.inf]), "NaN or Inf"),
    (lambda: AddSpec(vector=[1.0, 2.0], scale=math.nan), "finite"),
    (lambda: ProjectionCapSpec(vector=[0.0, 0.0], max=1.0), "zero norm"),
    (lambda: AblationSpec(vector=[0.0, 0.0]), "zero norm"),
    (lambda: ProjectionCapSpec(vector=[1.0, 0.0], min=2.0, max=1.0), "min .* > max"),
    (lambda: ProjectionCapSpec(vector=[1.0, 0.0]), "needs min, max or both"),
    (lambda: AddSpec(vector=[[1.0, 2.0]]), "1-D"),
    (lambda: SteeringSpec(layers={-1: LayerSteeringSpec(operations=[AddSpec(vector=[1.0])])}), ">= 0"),
    (lambda: AddSpec(vector={"data": b"\x00" * 3, "shape": [1], "dtype": "float32"}), "bytes"),
    # finite in float64, not in the float32 the math runs in
    (lambda: AddSpec(vector=[1.0, 0.0], scale=1e39), "finite in float32"),
    (lambda: AddSpec(vector=[1e30, 0.0], scale=1e10), "overflows float32"),
    (lambda: AddSpec(vector=[1e39, 0.0]), "NaN or Inf"),
    (lambda: AblationSpec(vector=[1.0, 0.0], scale=-1e39), "finite in float32"),
    (lambda: ProjectionCapSpec(vector=[1.0, 0.0], min=-1e39), "finite in float32"),
    (lambda: ProjectionCapSpec(vector=[3e19, 4e19], min=1.0, max=1.0), "norm overflows"),
    (lambda: AblationSpec(vector=[1e-30, 0.0]), "zero norm"),
    # numpy would read these as numbers
    (lambda: AddSpec(vector=["1", "2"]), "must be numbers"),
    (lambda: AddSpec(vector=[True, False]), "must be numbers"),
])
def test_invalid_specs_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_large_but_representable_values_still_steer():
    """The float32 checks refuse only what float32 cannot hold: a big direction still gives a unit row."""
    u = ProjectionCapSpec(vector=[3e18, 4e18], min=1.0, max=1.0).unit()
    assert torch.allclose(u, torch.tensor([0.6, 0.8])) and AddSpec(vector=[1e30, 0.0], scale=1e8).scale == 1e8


def test_validate_for_engine():
    s = _spec()
    s.validate_for(hidden_size=8, num_layers=4)
    with pytest.raises(ValueError, match="hidden size is 16"):
        s.validate_for(hidden_size=16, num_layers=4)
    with pytest.raises(ValueError, match="out of range"):
        s.validate_for(hidden_size=8, num_layers=2)
    with pytest.raises(ValueError, match="not steerable"):
        s.validate_for(hidden_size=8, num_layers=4, steerable_layers=[2])
    with pytest.raises(ValueError, match="max_ops_per_layer"):
        s.validate_for(hidden_size=8, num_layers=4, max_ops_per_layer=1)


def test_edits_keep_order_and_replace_same_kind():
    s = apply_edit(SteeringSpec(), {"action": "set", "layer": 1, "op": {"kind": "add", "vector": [1.0, 0.0]}})
    s = apply_edit(s, {"action": "set", "layer": 1, "op": {"kind": "ablation", "vector": [0.0, 1.0]}})
    s = apply_edit(s, {"action": "set", "layer": 1, "op": {"kind": "add", "vector": [2.0, 0.0], "scale": 3.0}})
    ops = s.layers[1].operations
    assert [o.kind for o in ops] == ["add", "ablation"] and ops[0].scale == 3.0 and ops[0].vector[0] == 2.0
    assert [o.kind for o in apply_edit(s, {"action": "clear", "kind": "add"}).layers[1].operations] == ["ablation"]
    assert apply_edit(s, {"action": "clear", "layer": 1}).is_empty()
    assert apply_edit(s, {"action": "clear"}).is_empty()
    with pytest.raises(ValueError, match="unknown edit action"):
        apply_edit(s, {"action": "explode"})
    with pytest.raises(ValueError, match="integer 'layer'"):
        apply_edit(s, {"action": "set", "layer": True, "op": {"kind": "add", "vector": [1.0, 0.0]}})
    with pytest.raises(ValueError, match="integers >= 0"):
        apply_edit(s, {"action": "clear", "layer": False})


def test_malformed_msgpack():
    with pytest.raises(ValueError, match="malformed msgpack"):
        SteeringSpec.from_msgpack(b"\xc1\xff\x00")
    with pytest.raises(ValueError):
        SteeringSpec.from_wire(wire.unpackb(wire.packb([1, 2, 3])))


def _vecs(n=3, dim=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(dim, generator=g) for _ in range(n)]


def test_chatspace_layer_form_is_the_operations_form():
    """add=/projection_cap=/ablation= build the same layer as operations=[add, cap, ablation], whatever the
    keyword order: same ops, fingerprint, msgpack bytes and wire form; the wire form reads back as either."""
    v, d, e = _vecs()
    add, cap, abl = AddSpec(vector=v, scale=3.0), ProjectionCapSpec(vector=d, min=-1.0, max=1.0), AblationSpec(
        vector=e, scale=0.1)
    chat = SteeringSpec(layers={4: LayerSteeringSpec(ablation=abl, add=add, projection_cap=cap)})
    ops = SteeringSpec(layers={4: LayerSteeringSpec(operations=[add, cap, abl])})
    assert [o.kind for o in chat.layers[4].operations] == ["add", "cap", "ablation"]
    assert chat.fingerprint() == ops.fingerprint() and chat.to_msgpack() == ops.to_msgpack()
    assert wire.packb(chat.to_wire()) == wire.packb(ops.to_wire()) == chat.to_msgpack()
    assert SteeringSpec.from_msgpack(chat.to_msgpack()).fingerprint() == ops.fingerprint()
    ls = chat.layers[4]
    assert ls.add.scale == 3.0 and ls.projection_cap.max == 1.0 and ls.ablation.scale == 0.1
    assert torch.equal(ls.add.vector, v)
    only_cap = LayerSteeringSpec(projection_cap=cap)
    assert only_cap.add is None and only_cap.ablation is None and [o.kind for o in only_cap.operations] == ["cap"]
    # JSON / msgpack bodies in chatspace's form (no "kind"), as HTTP clients send them
    body = {"layers": {"4": {"add": {"vector": v.tolist(), "scale": 3.0},
                             "projection_cap": {"vector": d.tolist(), "min": -1.0, "max": 1.0},
                             "ablation": {"vector": e.tolist(), "scale": 0.1}}}}
    assert SteeringSpec.from_wire(body).fingerprint() == ops.fingerprint()
    assert SteeringSpec.model_validate_json(chat.model_dump_json()).fingerprint() == ops.fingerprint()
    assert chat == ops and hash(chat) == hash(ops) and chat != SteeringSpec()


@pytest.mark.parametrize("make, message", [
    (lambda v: LayerSteeringSpec(add=AddSpec(vector=v), operations=[AddSpec(vector=v)]), "not both"),
    (lambda v: LayerSteeringSpec(add=AblationSpec(vector=v)), "add must be an AddSpec"),
    (lambda v: LayerSteeringSpec(projection_cap=AddSpec(vector=v)), "must be an ProjectionCapSpec"),
    (lambda v: AddSpec(vector=v, scal=2.0), "scal"),
    (lambda v: ProjectionCapSpec(vector=v, max=1.0, maximum=2.0), "maximum"),
    (lambda v: AblationSpec(vector=v, scale=0.0, strength=1.0), "strength"),
    (lambda v: LayerSteeringSpec(adds=AddSpec(vector=v)), "adds"),
    (lambda v: SteeringSpec(layer={1: LayerSteeringSpec()}), "layer"),
    (lambda v: SteeringSpec.from_wire({"layers": {"1": {"ad": {"vector": v.tolist()}}}}), "layers.1.ad"),
    (lambda v: SteeringSpec.from_wire({"layers": {"1": {"add": {"vector": v.tolist(), "scal": 2}}}}), "add: scal"),
    (lambda v: SteeringSpec.from_wire({"layers": {"1": {"add": {"kind": "cap", "vector": v.tolist(), "max": 1}}}}),
     "add"),
    (lambda v: SteeringSpec.from_wire({"layers": {"1": {"operations": [{"kind": "add", "vector": v.tolist(),
                                                                        "bogus": 1}]}}}), "bogus"),
])
def test_unknown_or_mixed_fields_are_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make(_vecs(1)[0])


def test_chatspace_defaults_and_merge_edit():
    v, d, _ = _vecs()
    assert AblationSpec(vector=d).scale == 1.0  # chatspace's default: a no-op until a scale is given
    base = SteeringSpec(layers={1: LayerSteeringSpec(add=AddSpec(vector=v)), 2: LayerSteeringSpec(
        ablation=AblationSpec(vector=d, scale=0.0))})
    new = SteeringSpec(layers={2: LayerSteeringSpec(add=AddSpec(vector=d, scale=2.0)), 3: LayerSteeringSpec(
        add=AddSpec(vector=v))})
    merged = apply_edit(base, {"action": "merge", "spec": new.to_wire()})
    assert merged == SteeringSpec(layers={1: base.layers[1], 2: new.layers[2], 3: new.layers[3]})
    assert apply_edit(base, {"action": "replace", "spec": new.to_wire()}) == new
    with pytest.raises(ValueError, match="merge needs"):
        apply_edit(base, {"action": "merge"})


def test_capture_layers_accepts_one_index():
    from steer_actors.specs import check_capture_layers

    assert check_capture_layers(3) == [3] and check_capture_layers([1, 2]) == [1, 2]
    for bad in (True, 2.0, "1", [1, "2"]):
        with pytest.raises(ValueError, match="capture_layers"):
            check_capture_layers(bad)
