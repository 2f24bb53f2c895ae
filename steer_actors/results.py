"""What a generation returns, as a dataclass inside and a msgpack-safe dict on the wire."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    logprobs: list[float] | None  # logprob of each generated token, if requested
    finish_reason: str | None
    spec_version: int
    spec_fingerprint: str
    captures: dict[str, Any] | None = field(default=None)
    request_spec_fingerprint: str | None = None  # the request's own spec, if it had one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def result_from_output(out: Any, version: int, fingerprint: str) -> GenerationResult:
    comp = out.outputs[0]
    lps = None
    if comp.logprobs is not None:
        lps = [float(pos[tok].logprob) for pos, tok in zip(comp.logprobs, comp.token_ids)]
    return GenerationResult(
        text=comp.text,
        token_ids=list(comp.token_ids),
        prompt_token_ids=list(out.prompt_token_ids or []),
        logprobs=lps,
        finish_reason=comp.finish_reason,
        spec_version=version,
        spec_fingerprint=fingerprint,
    )
