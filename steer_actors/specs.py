"""Steering specs: the pydantic models researchers write, their validation and their wire forms.

A :class:`SteeringSpec` maps decoder-layer index -> :class:`LayerSteeringSpec`, an ordered list of
operations applied to the residual stream ``s = h + r`` after that layer:

* :class:`AddSpec`: ``s += scale * vector``
* :class:`ProjectionCapSpec`: ``p = s·û; s += (clamp(p, min, max) - p) û``
* :class:`AblationSpec`: ``s += (scale - 1)(s·û) û`` (0 removes the direction, > 1 amplifies it)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
from typing import Annotated, Any, Literal, Union

import numpy as np
import torch
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError,
                      field_validator, model_validator)

from steer_actors import wire
from steer_actors.ops.rows import Op, unit_rows


@contextlib.contextmanager
def plain_value_errors():
    """Re-raise pydantic's ValidationError as a short plain ValueError.

    Ray cannot re-raise ValidationError on the caller's side (it cannot be subclassed), and HTTP
    clients want the message, not a dump of a 4096-float input.
    """
    try:
        yield
    except ValidationError as e:
        parts = []
        for err in e.errors(include_url=False, include_input=False):
            loc = ".".join(str(x) for x in err["loc"])
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        raise ValueError("; ".join(parts)) from None


def _to_vector(value: Any) -> torch.Tensor:
    owned = False  # a tensor of our own already (no copy needed to stop the caller's edits reaching it)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", torch.float32)
    elif wire.is_encoded_tensor(value):  # the hot path: every change over the wire, every layer
        t, owned = wire.decode_tensor(value).to(torch.float32), True
    elif isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"vector must be numbers: {e}") from None
        if arr.dtype.kind not in "fiu":  # numpy would turn "1" into 1.0 and True into 1.0: a client bug
            raise ValueError(f"vector must be numbers, got {arr.dtype.kind!r} values like {arr.flat[0]!r}"
                             if arr.size else "vector must be 1-D and non-empty, got shape [0]")
        with np.errstate(over="ignore"):  # past float32's range becomes inf, refused just below
            t = torch.as_tensor(arr.astype(np.float32))
    else:
        raise ValueError(f"vector must be a tensor, array, list of floats or encoded tensor, not {type(value).__name__}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"vector must be 1-D and non-empty, got shape {list(t.shape)}")
    if not np.isfinite(t.numpy()).all():  # numpy: a fraction of torch's per-call cost at this size
        raise ValueError("vector contains NaN or Inf (or values past float32's range)")
    return t if owned and t.is_contiguous() else t.contiguous().clone()


Vector = Annotated[
    torch.Tensor,
    BeforeValidator(_to_vector),
    PlainSerializer(lambda t: t.tolist(), return_type=list[float], when_used="json"),
]


_F32_MAX = float(np.finfo(np.float32).max)


def _finite(name: str, v: float | None) -> float | None:
    """The math runs in float32: a value finite in float64 but past float32's range would become inf there."""
    if v is not None and not (math.isfinite(v) and abs(v) <= _F32_MAX):
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {_F32_MAX:.4g}), got {v}")
    return v


class _OpBase(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
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
    """Scale the component of ``s`` along ``vector``'s direction by ``scale`` (0 = remove)."""

    kind: Literal["ablation"] = "ablation"
    scale: float = 0.0

    _check_scale = field_validator("scale")(classmethod(lambda cls, v: _finite("scale", v)))

    def to_op(self) -> Op:
        return Op("ablation", self.unit(), scale=self.scale)


SteeringOpSpec = Annotated[Union[AddSpec, ProjectionCapSpec, AblationSpec], Field(discriminator="kind")]


def _map_header(n: int) -> bytes:
    import msgpack

    packer = msgpack.Packer()
    return packer.pack_map_header(n)


class LayerSteeringSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    operations: list[SteeringOpSpec] = Field(default_factory=list)

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
    """Ops per decoder layer. Layers absent or with no operations are unsteered."""

    model_config = ConfigDict(frozen=True)
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
    if not isinstance(layers, (list, tuple)) or not all(is_index(x) for x in layers):
        raise ValueError(f"capture_layers must be a list of layer indices (integers), got {layers!r}")
    return [int(x) for x in layers]


def apply_edit(spec: SteeringSpec, edit: dict[str, Any]) -> SteeringSpec:
    """One setter as data, so the engine and the coordinator share it. ``edit["action"]`` is

    * ``set``: ``layer``, ``op`` (an op dict with ``kind``): replace that layer's op of the same kind or append;
    * ``clear``: optional ``layer`` and ``kind``: drop matching ops (no layer = every layer; no kind = all kinds);
    * ``replace``: ``spec`` (wire or dict form): the whole spec.
    """
    if not isinstance(edit, dict):
        raise ValueError("edit must be a map")
    action = edit.get("action")
    if action == "replace":
        if not isinstance(edit.get("spec"), dict):
            raise ValueError("replace needs a steering spec map (use clear to remove all steering)")
        return SteeringSpec.from_wire(edit["spec"])
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
    raise ValueError(f"unknown edit action {action!r}; use set, clear or replace")
