"""Generation results: every completion of an n > 1 request is kept, and the one-completion shortcuts
refuse to answer for one of several."""

import pytest

from steer_actors.results import Completion, GenerationResult


def _result(n: int) -> GenerationResult:
    outs = [Completion(text=f"t{k}", token_ids=[k, k + 1], logprobs=[-0.5, -float(k)], finish_reason="length")
            for k in range(n)]
    return GenerationResult(outputs=outs, prompt_token_ids=[7, 8], spec_version=3, spec_fingerprint="ab")


def test_one_completion_reads_flat_and_round_trips():
    r = _result(1)
    assert (r.text, r.token_ids, r.logprobs, r.finish_reason, str(r)) == ("t0", [0, 1], [-0.5, -0.0], "length", "t0")
    d = r.to_dict()
    assert d["token_ids"] == [0, 1] and d["text"] == "t0" and d["outputs"] == [
        {"text": "t0", "token_ids": [0, 1], "logprobs": [-0.5, -0.0], "finish_reason": "length"}]
    assert GenerationResult.from_dict(d) == r


def test_several_completions_are_all_kept_and_flat_reads_refuse():
    r = _result(3)
    for attr in ("text", "token_ids", "logprobs", "finish_reason"):
        with pytest.raises(ValueError, match="3 completions"):
            getattr(r, attr)
    d = r.to_dict()
    assert "token_ids" not in d and "text" not in d and [o["text"] for o in d["outputs"]] == ["t0", "t1", "t2"]
    assert GenerationResult.from_dict(d) == r and str(r) == "[0] t0\n[1] t1\n[2] t2"
