"""What a generation returns, as dataclasses inside and a msgpack-safe dict on the wire.

One :class:`GenerationResult` per prompt. Its ``outputs`` hold every completion the request sampled
(``n`` of them, in vLLM's order). ``text``, ``token_ids``, ``logprobs`` and ``finish_reason`` read the
one completion of an ``n = 1`` request; with ``n > 1`` they raise instead of answering with the first
completion, so no completion is lost unnoticed. The dict form (HTTP, engine replies) always carries
``outputs``; the four flat keys are present only when there is exactly one completion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # logprob of each generated token, if requested (``logprobs=0`` or more)
    finish_reason: str | None


_FLAT = ("text", "token_ids", "logprobs", "finish_reason")


@dataclass
class GenerationResult:
    """One prompt's generation. ``print(result)`` prints its text (as chatspace's string results did)."""

    outputs: list[Completion]
    prompt_token_ids: list[int]
    spec_version: int  # the global spec this request ran under
    spec_fingerprint: str
    captures: Any = field(default=None)  # a CaptureHandle on the client when capture_layers was given
    request_spec_fingerprint: str | None = None  # the request's own spec, if it had one

    def _only(self) -> Completion:
        if len(self.outputs) != 1:
            raise ValueError(f"this request sampled {len(self.outputs)} completions (n > 1): read "
                             f"result.outputs[k].text / .token_ids / .logprobs for each")
        return self.outputs[0]

    @property
    def text(self) -> str:
        return self._only().text

    @property
    def token_ids(self) -> list[int]:
        return self._only().token_ids

    @property
    def logprobs(self) -> list[float] | None:
        return self._only().logprobs

    @property
    def finish_reason(self) -> str | None:
        return self._only().finish_reason

    def __str__(self) -> str:
        if len(self.outputs) == 1:
            return self.outputs[0].text
        return "\n".join(f"[{k}] {c.text}" for k, c in enumerate(self.outputs))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if len(self.outputs) == 1:
            d.update(asdict(self.outputs[0]))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationResult":
        return cls(outputs=[Completion(**c) for c in d["outputs"]], prompt_token_ids=list(d["prompt_token_ids"]),
                   spec_version=d["spec_version"], spec_fingerprint=d["spec_fingerprint"],
                   captures=d.get("captures"), request_spec_fingerprint=d.get("request_spec_fingerprint"))


def result_from_output(out: Any, version: int, fingerprint: str) -> GenerationResult:
    """A vLLM ``RequestOutput`` (final) -> :class:`GenerationResult` with every completion in it."""
    completions = []
    for comp in sorted(out.outputs, key=lambda c: c.index):
        lps = None
        if comp.logprobs is not None:
            lps = [float(pos[tok].logprob) for pos, tok in zip(comp.logprobs, comp.token_ids)]
        completions.append(Completion(text=comp.text, token_ids=list(comp.token_ids), logprobs=lps,
                                      finish_reason=comp.finish_reason))
    return GenerationResult(
        outputs=completions,
        prompt_token_ids=list(out.prompt_token_ids or []),
        spec_version=version,
        spec_fingerprint=fingerprint,
    )
