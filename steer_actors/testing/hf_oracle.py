"""The numerical oracle: HF transformers on the same weights, fp32, with equivalent forward hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_actors.ops.rows import apply_reference
from steer_actors.specs import SteeringSpec


@dataclass
class OracleRun:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each generated token
    hidden_states: list[torch.Tensor] | None = None  # per layer output [seq, H] of the final forward


class HFOracle:
    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def _hooks(self, spec: SteeringSpec | None):
        handles = []
        if spec is None:
            return handles
        for idx, ls in spec.layers.items():
            ops = ls.to_ops()

            def hook(_mod, _inp, out, ops=ops):
                if isinstance(out, tuple):
                    return (apply_reference(out[0], ops).to(out[0].dtype),) + tuple(out[1:])
                return apply_reference(out, ops).to(out.dtype)

            handles.append(self.model.model.layers[idx].register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_tokens: int, spec: SteeringSpec | None = None) -> OracleRun:
        """Greedy decoding with a full forward per step (no KV cache: the simplest correct reference)."""
        handles = self._hooks(spec)
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
    def hidden_states(self, token_ids: list[int], spec: SteeringSpec | None = None) -> list[torch.Tensor]:
        """Output of each decoder layer after its steering (``[seq, H]`` fp32), read by hooks placed
        after the steering hooks: HF's own ``hidden_states[-1]`` is after the final norm."""
        handles = self._hooks(spec)
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
