"""Steering specs: the pydantic models researchers write, their validation and their wire forms.

A :class:`SteeringSpec` maps decoder-layer index -> :class:`LayerSteeringSpec`, an ordered list of
operations applied to the residual stream ``s = h + r`` after that layer:

* :class:`AddSpec`: ``s += scale * vector``
* :class:`ProjectionCapSpec`: ``p = s·û; s += (clamp(p, min, max) - p) û``
* :class:`AblationSpec`: ``s += (scale - 1)(s·û) û`` (0 removes the direction, > 1 amplifies it)

A layer's ops are written either as a list (``operations=[...]``, any order, several of a kind) or
in chatspace's form (``add=``, ``projection_cap=``, ``ablation=``, applied in that order); both build
the same model, with the same wire form and fingerprint. Every model refuses unknown fields.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from steer_actors import wire
from steer_actors.ops.rows import Op, unit_rows
from steer_actors.spec_values import Vector, finite as _finite, plain_value_errors

__all__ = ["AddSpec", "ProjectionCapSpec", "AblationSpec", "LayerSteeringSpec", "SteeringSpec", "apply_edit",
           "check_capture_layers", "is_index", "plain_value_errors"]


class _OpBase(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")
    vector: Vector


class AddSpec(_OpBase):
    """Add ``scale * vector`` (the vector as given, not normalised)."""

    kind: Literal["add"] = "add"
    scale: float = 1.0

    _check_scale = field_validator("scale")(classmethod(lambda cls, v: _finite("scale", v)))

    @model_validator(mode="after")
    def _product_finite(self) -> "AddSpec":
        with np.errstate(over="ignore"):
            if not np.isfinite(np.float32(self.scale) * self.vector.numpy()).all():
                raise ValueError("scale * vector overflows float32; use a smaller scale or vector")
        return self

    def to_op(self) -> Op:
        return Op("add", self.vector, scale=self.scale)


class _DirectionSpec(_OpBase):
    @field_validator("vector")
    @classmethod
    def _nonzero(cls, v: torch.Tensor) -> torch.Tensor:
        # the squared norm as :func:`unit_rows` computes it (float32): past the range it is inf and the unit
        # row would be all zeros, an op that silently does nothing
        x = v.numpy()
        with np.errstate(over="ignore", under="ignore"):
            sq = float(np.add.reduce(x * x))
        if sq == 0.0:
            raise ValueError("direction vector has zero norm (or its squares underflow float32; rescale it)")
        if not math.isfinite(sq):
            raise ValueError("direction vector's norm overflows float32; rescale it")
        return v

    def unit(self) -> torch.Tensor:
        return torch.from_numpy(unit_rows(self.vector.numpy()[None])[0])


class ProjectionCapSpec(_DirectionSpec):
    """Clamp the projection of ``s`` on ``vector``'s direction into ``[min, max]``."""

    kind: Literal["cap"] = "cap"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "ProjectionCapSpec":
        _finite("min", self.min), _finite("max", self.max)
        if self.min is None and self.max is None:
            raise ValueError("projection cap needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"projection cap min ({self.min}) > max ({self.max})")
        return self

    def to_op(self) -> Op:
        return Op("cap", self.unit(), min=self.min, max=self.max)


class AblationSpec(_DirectionSpec):
    """Scale the component of ``s`` along ``vector``'s direction by ``scale``: 0 removes it, 0.1 keeps 10%,
    2 doubles it. The default, 1.0, changes nothing (as in chatspace): give the scale you mean."""

    kind: Literal["ablation"] = "ablation"
    scale: float = 1.0

    _check_scale = field_validator("scale")(classmethod(lambda cls, v: _finite("scale", v)))

    def to_op(self) -> Op:
        return Op("ablation", self.unit(), scale=self.scale)


SteeringOpSpec = Annotated[Union[AddSpec, ProjectionCapSpec, AblationSpec], Field(discriminator="kind")]


def _map_header(n: int) -> bytes:
    import msgpack

    packer = msgpack.Packer()
    return packer.pack_map_header(n)


_CHATSPACE_SLOTS = {"add": "add", "projection_cap": "cap", "ablation": "ablation"}  # field -> kind, in order


class LayerSteeringSpec(BaseModel):
    """The ops of one decoder layer, applied in order to ``s = h + r`` after the layer.

    Two ways to write it (not both at once: that is a ``ValueError``, since no order between the two
    would be obvious):

    * ``LayerSteeringSpec(operations=[AddSpec(...), AblationSpec(...), ...])``: any order, any number;
    * ``LayerSteeringSpec(add=AddSpec(...), projection_cap=ProjectionCapSpec(...), ablation=AblationSpec(...))``
      (chatspace's form, each optional): applied in the order add, projection cap, ablation.

    The second is stored as the first (``operations``), so both have one wire form and one fingerprint.
    ``.add`` / ``.projection_cap`` / ``.ablation`` read the layer's op of that kind (None if it has none).
    Over HTTP/msgpack, ``{"add": {"vector": [...], "scale": 2.0}}`` is accepted the same way.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    operations: list[SteeringOpSpec] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _chatspace_form(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not (_CHATSPACE_SLOTS.keys() & data.keys()):
            return data
        data = dict(data)
        if data.get("operations"):
            named = sorted(_CHATSPACE_SLOTS.keys() & data.keys())
            raise ValueError(f"give either operations=[...] or {', '.join(named)}=..., not both")
        ops = []
        for name, kind in _CHATSPACE_SLOTS.items():
            op = data.pop(name, None)
            if op is None:
                continue
            want = _OP_TYPES[kind]
            if isinstance(op, dict):
                try:
                    with plain_value_errors():
                        op = want.model_validate({"kind": kind, **op})
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            elif not isinstance(op, want):
                raise ValueError(f"{name} must be an {want.__name__} (or its fields as a map), "
                                 f"got {type(op).__name__}")
            ops.append(op)
        data["operations"] = ops
        return data

    def _only(self, kind: str) -> Any:
        found = [o for o in self.operations if o.kind == kind]
        if len(found) > 1:
            raise ValueError(f"this layer has {len(found)} {kind} operations; read .operations")
        return found[0] if found else None

    @property
    def add(self) -> "AddSpec | None":
        return self._only("add")

    @property
    def projection_cap(self) -> "ProjectionCapSpec | None":
        return self._only("cap")

    @property
    def ablation(self) -> "AblationSpec | None":
        return self._only("ablation")

    def is_empty(self) -> bool:
        return not self.operations

    def to_ops(self) -> list[Op]:
        return [o.to_op() for o in self.operations]

    def to_wire(self) -> dict[str, Any]:
        return {"operations": [{**o.model_dump(exclude={"vector"}), "vector": wire.encode_tensor(o.vector)}
                               for o in self.operations]}

    @functools.cached_property
    def packed(self) -> bytes:
        """msgpack of :meth:`to_wire`, made once (frozen model)."""
        return wire.packb(self.to_wire())

    @functools.cached_property
    def digest(self) -> bytes:
        """sha256 of the ops' parameters, then of each vector's float32 bytes, hashed in place: a change's
        fingerprints never re-encode its vectors (an all-layer change at 8B carries 72 of 16 KB)."""
        h = hashlib.sha256(wire.packb([o.model_dump(exclude={"vector"}) for o in self.operations]))
        for o in self.operations:
            h.update(np.ascontiguousarray(o.vector.numpy(), dtype="<f4"))
        return h.digest()

    def fingerprint(self) -> str:
        return self.digest.hex()[:16]


class SteeringSpec(BaseModel):
    """Ops per decoder layer. Layers absent or with no operations are unsteered (and left out of
    ``layers``). Two specs are equal when their fingerprints are (same ops, same float32 bytes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layers: dict[int, LayerSteeringSpec] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _layer_indices(cls, layers: dict[int, LayerSteeringSpec]) -> dict[int, LayerSteeringSpec]:
        bad = [i for i in layers if i < 0]
        if bad:
            raise ValueError(f"layer indices must be >= 0, got {bad}")
        return {i: layers[i] for i in sorted(layers) if layers[i].operations}

    def is_empty(self) -> bool:
        return not self.layers

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, SteeringSpec):
            return NotImplemented
        return self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    # ---- wire forms ------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """msgpack-safe dict: vectors as float32 little-endian bytes + shape."""
        return {"layers": {str(i): ls.to_wire() for i, ls in self.layers.items()}}

    @classmethod
    def from_wire(cls, payload: Any) -> "SteeringSpec":
        if not isinstance(payload, dict):
            raise ValueError("steering spec payload must be a map")
        with plain_value_errors():
            return cls.model_validate(payload)

    def to_msgpack(self) -> bytes:
        return self.packed

    @functools.cached_property
    def packed(self) -> bytes:
        """Same bytes as ``packb(to_wire())``, assembled from each layer's cached bytes (msgpack is
        compositional), so fingerprinting a spec does not re-encode its vectors."""
        out = [wire.packb({"layers": {}})[:-1], _map_header(len(self.layers))]
        for i, ls in self.layers.items():
            out += [wire.packb(str(i)), ls.packed]
        return b"".join(out)

    @classmethod
    def from_msgpack(cls, data: bytes) -> "SteeringSpec":
        return cls.from_wire(wire.unpackb(data))

    @functools.cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256(b"steering-spec")
        for i, ls in self.layers.items():
            h.update(i.to_bytes(4, "little"))
            h.update(ls.digest)
        return h.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Content hash: equal specs (same ops, same float32 bytes) give equal fingerprints."""
        return self._fingerprint

    # ---- checks against an engine ------------------------------------------------------------
    def validate_for(self, hidden_size: int, num_layers: int, steerable_layers: list[int] | None = None,
                     max_ops_per_layer: int | None = None) -> None:
        """Raise ``ValueError`` naming the problem if this spec cannot run on the engine described."""
        for i, ls in self.layers.items():
            if i >= num_layers:
                raise ValueError(f"layer {i} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
            if steerable_layers is not None and i not in steerable_layers:
                raise ValueError(f"layer {i} is not steerable on this engine (bootstrap_layers={steerable_layers})")
            if max_ops_per_layer is not None and len(ls.operations) > max_ops_per_layer:
                raise ValueError(f"layer {i} has {len(ls.operations)} operations; "
                                 f"the engine allows {max_ops_per_layer} (max_ops_per_layer)")
            for o in ls.operations:
                if o.vector.numel() != hidden_size:
                    raise ValueError(f"layer {i} {o.kind} vector has dimension {o.vector.numel()}, "
                                     f"the model's hidden size is {hidden_size}")

    # ---- edits (return new specs; specs are immutable) ---------------------------------------
    def with_layer(self, layer: int, ops: list[Any]) -> "SteeringSpec":
        layers = dict(self.layers)
        layers[layer] = LayerSteeringSpec(operations=ops)
        return SteeringSpec(layers=layers)

    def with_layer_op(self, layer: int, op: AddSpec | ProjectionCapSpec | AblationSpec) -> "SteeringSpec":
        """Replace this layer's op of the same kind (keeping its place) or append it."""
        ops = list(self.layers.get(layer, LayerSteeringSpec()).operations)
        idx = next((k for k, o in enumerate(ops) if o.kind == op.kind), None)
        if idx is None:
            ops.append(op)
        else:
            ops[idx] = op
        return self.with_layer(layer, ops)

    def without_layer_kind(self, layer: int, kind: str | None = None) -> "SteeringSpec":
        ops = self.layers.get(layer, LayerSteeringSpec()).operations
        return self.with_layer(layer, [o for o in ops if kind is not None and o.kind != kind])

    def without_kind(self, kind: str) -> "SteeringSpec":
        return SteeringSpec(layers={i: LayerSteeringSpec(operations=[o for o in ls.operations if o.kind != kind])
                                    for i, ls in self.layers.items()})


_OP_TYPES = {"add": AddSpec, "cap": ProjectionCapSpec, "ablation": AblationSpec}


def is_index(x: Any) -> bool:
    """A layer index: an int (numpy's too), never a bool (an int to Python, not a layer to anyone) or a
    float (2.0 equals layer 2 in a set)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_capture_layers(layers: Any) -> list[int]:
    """Layer indices to capture: a list of integers, or one integer."""
    if is_index(layers):
        return [int(layers)]
    if not isinstance(layers, (list, tuple)) or not all(is_index(x) for x in layers):
        raise ValueError(f"capture_layers must be a list of layer indices (integers), got {layers!r}")
    return [int(x) for x in layers]


def apply_edit(spec: SteeringSpec, edit: dict[str, Any]) -> SteeringSpec:
    """One setter as data, so the engine and the coordinator share it. ``edit["action"]`` is

    * ``set``: ``layer``, ``op`` (an op dict with ``kind``): replace that layer's op of the same kind or append;
    * ``clear``: optional ``layer`` and ``kind``: drop matching ops (no layer = every layer; no kind = all kinds);
    * ``replace``: ``spec`` (wire or dict form): the whole spec;
    * ``merge``: ``spec``: each layer it names replaces that layer; other layers are kept.
    """
    if not isinstance(edit, dict):
        raise ValueError("edit must be a map")
    action = edit.get("action")
    if action == "replace":
        if not isinstance(edit.get("spec"), dict):
            raise ValueError("replace needs a steering spec map (use clear to remove all steering)")
        return SteeringSpec.from_wire(edit["spec"])
    if action == "merge":
        if not isinstance(edit.get("spec"), dict):
            raise ValueError("merge needs a steering spec map")
        return SteeringSpec(layers={**spec.layers, **SteeringSpec.from_wire(edit["spec"]).layers})
    if action == "set":
        layer, op = edit.get("layer"), edit.get("op")
        if not is_index(layer) or not isinstance(op, dict) or op.get("kind") not in _OP_TYPES:
            raise ValueError("set edit needs an integer 'layer' and an 'op' with kind add, cap or ablation")
        if layer < 0:
            raise ValueError(f"layer indices must be >= 0, got {layer}")
        with plain_value_errors():
            return spec.with_layer_op(layer, _OP_TYPES[op["kind"]].model_validate(op))
    if action == "clear":
        layer, kind = edit.get("layer"), edit.get("kind")
        if kind is not None and kind not in _OP_TYPES:
            raise ValueError(f"unknown op kind {kind!r}; use add, cap or ablation")
        if layer is None:
            return spec.without_kind(kind) if kind else SteeringSpec()
        if not is_index(layer) or layer < 0:
            raise ValueError(f"layer indices must be integers >= 0, got {layer!r}")
        return spec.without_layer_kind(layer, kind)
    raise ValueError(f"unknown edit action {action!r}; use set, clear, replace or merge")
