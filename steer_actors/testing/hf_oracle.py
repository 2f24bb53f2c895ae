"""The numerical oracle: HF transformers on the same weights, with the steering ops written out here.

The oracle is independent of the code it checks: it never imports ``steer_actors.ops`` or
``steer_actors.specs``, and it builds the ops from the raw vectors itself, in fp32, from their
definitions:

* add: ``s += scale * v`` (``v`` as given, not normalised)
* cap: ``û = v / |v|``, ``p = s·û``, ``s += (clamp(p, min, max) - p) û`` (either bound may be ``None``)
* ablation: ``s += (gamma - 1)(s·û) û``

applied in the listed order to the residual stream after decoder layer ``L``: the output of
``model.model.layers[L]`` (HF's ``hidden_states[L + 1]``). A sign or normalisation bug in the project's
ops therefore shows as a parity failure instead of being reproduced by the reference.

Steering is plain data, ``{layer: [("add", v, scale), ("cap", v, min, max), ("ablation", v, gamma)]}``;
:func:`steering_plan` also reads a spec object through its public fields only (duck-typed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Plan = dict[int, list[tuple]]
KINDS = ("add", "cap", "ablation")


@dataclass
class OracleRun:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each generated token


def _vector(v: Any) -> torch.Tensor:
    t = v.detach().to("cpu", torch.float32) if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float32)
    if t.dim() != 1:
        raise ValueError(f"oracle: a steering vector must be 1-D, got shape {list(t.shape)}")
    return t


def _check_op(op: tuple) -> tuple:
    kind = op[0]
    size = {"add": 3, "cap": 4, "ablation": 3}.get(kind)
    if size is None or len(op) != size:
        raise ValueError(f"oracle: bad op {op[:1]!r}+{len(op) - 1} fields; use ('add', v, scale), "
                         "('cap', v, min, max) or ('ablation', v, gamma)")
    return (kind, _vector(op[1]), *op[2:])


def _op_from_object(o: Any, kind: str | None = None) -> tuple:
    """One op of a spec, read by its public fields (``kind``, ``vector``, ``scale``, ``min``, ``max``);
    ``kind`` given when the field holding the op names it (chatspace's op classes need not carry one)."""
    kind = kind or getattr(o, "kind", None)
    if kind == "add":
        return ("add", o.vector, o.scale)
    if kind == "cap":
        return ("cap", o.vector, o.min, o.max)
    if kind == "ablation":
        return ("ablation", o.vector, o.scale)
    raise ValueError(f"oracle: unknown op kind {kind!r}")


NAMED_FIELDS = (("add", "add"), ("projection_cap", "cap"), ("ablation", "ablation"))  # chatspace's order


def _layer_ops(ls: Any) -> list[tuple]:
    """A layer's ops from either form: ``operations=[...]`` in order, or chatspace's named fields
    ``add`` / ``projection_cap`` / ``ablation`` (applied in that order). Named fields that only mirror ops
    already in ``operations`` are read once, in ``operations``' order; ops in both forms that differ have no
    order the oracle can know, so they are refused."""
    listed = [_op_from_object(o) for o in (getattr(ls, "operations", None) or [])]
    if not listed:
        return [_op_from_object(o, kind) for field, kind in NAMED_FIELDS if (o := getattr(ls, field, None)) is not None]
    named = [_op_from_object(o, kind) for field, kind in NAMED_FIELDS if (o := _mirror(ls, field)) is not None]
    if all(any(_same_op(n, op) for op in listed) for n in named):
        return listed
    raise ValueError("oracle: a layer sets both operations=[...] and add/projection_cap/ablation with different ops")


def _mirror(ls: Any, field: str) -> Any:
    """A named field beside ``operations``: a spec may expose it as a view of ``operations`` that refuses
    (ValueError) when the layer holds several ops of that kind; such a view mirrors ``operations``."""
    try:
        return getattr(ls, field, None)
    except ValueError:
        return None


def _same_op(x: tuple, y: tuple) -> bool:
    return x[0] == y[0] and x[2:] == y[2:] and torch.equal(_vector(x[1]), _vector(y[1]))


def steering_plan(steering: Any) -> Plan:
    """Plain data for ``steering``: ``None``, a plan (``{layer: [op tuples]}``) or a spec object with
    ``.layers`` (``{layer: layer spec}``). Vectors become fp32 tensors; layers without ops are dropped."""
    if steering is None:
        return {}
    if isinstance(steering, dict):
        layers = {int(i): [_check_op(tuple(op)) for op in ops] for i, ops in steering.items()}
    else:
        layers = {int(i): [_check_op(op) for op in _layer_ops(ls)] for i, ls in getattr(steering, "layers").items()}
    return {i: ops for i, ops in sorted(layers.items()) if ops}


def combine(*steerings: Any) -> Plan:
    """One plan applying each argument's ops in turn at every layer (global ops, then a request's)."""
    out: Plan = {}
    for s in steerings:
        for i, ops in steering_plan(s).items():
            out.setdefault(i, []).extend(ops)
    return out


def apply_ops(s: torch.Tensor, ops: list[tuple]) -> torch.Tensor:
    """``ops`` (checked op tuples) applied in order to ``s`` (``[..., H]``) in fp32; returns a new tensor."""
    out = s.float()
    for op in ops:
        kind, v = op[0], op[1].to(out.device)
        if kind == "add":
            out = out + float(op[2]) * v
            continue
        u = v / torch.linalg.vector_norm(v)
        p = (out * u).sum(-1, keepdim=True)
        if kind == "cap":
            lo, hi = op[2], op[3]
            target = torch.clamp(p, min=None if lo is None else float(lo), max=None if hi is None else float(hi))
            out = out + (target - p) * u
        else:
            out = out + (float(op[2]) - 1.0) * p * u
    return out


class HFOracle:
    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def _hooks(self, steering: Any) -> list:
        handles = []
        for idx, ops in steering_plan(steering).items():
            def hook(_mod, _inp, out, ops=ops):
                if isinstance(out, tuple):
                    return (apply_ops(out[0], ops).to(out[0].dtype),) + tuple(out[1:])
                return apply_ops(out, ops).to(out.dtype)

            handles.append(self.model.model.layers[idx].register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int, steering: Any = None) -> OracleRun:
        """Greedy decoding with a full forward per step (no KV cache: the simplest correct reference).
        ``steering``: anything :func:`steering_plan` reads."""
        handles = self._hooks(steering)
        try:
            ids = list(prompt_ids)
            out_ids, lps = [], []
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids])).logits[0, -1].float()
                lp = torch.log_softmax(logits, -1)
                tok = int(torch.argmax(lp))
                out_ids.append(tok)
                lps.append(float(lp[tok]))
                ids.append(tok)
            return OracleRun(out_ids, lps)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def hidden_states(self, token_ids: list[int], steering: Any = None) -> list[torch.Tensor]:
        """Output of each decoder layer after its steering (``[seq, H]``), read by hooks placed after the
        steering hooks: HF's own ``hidden_states[-1]`` is after the final norm."""
        handles = self._hooks(steering)
        outs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.model.model.layers):
            def grab(_m, _i, out, i=i):
                outs[i] = (out[0] if isinstance(out, tuple) else out)[0].clone()
            handles.append(layer.register_forward_hook(grab))
        try:
            self.model(torch.tensor([token_ids]))
            return [outs[i] for i in range(len(self.model.model.layers))]
        finally:
            for h in handles:
                h.remove()
