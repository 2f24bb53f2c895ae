"""Worker-side CaptureStore on synthetic batch layouts (pure data logic; the engine tests cover the
real runner): slicing by query start locations, accumulation across steps, dedupe after recompute."""

import numpy as np
import torch

from steer_actors.capture import CaptureStore


def step(store, req_ids, counts, positions, hidden):
    qsl = np.concatenate([[0], np.cumsum(counts)])
    pos = torch.tensor(positions)
    store.begin_step(req_ids, qsl, pos, pos + 1000)
    zero = torch.zeros_like(hidden)
    store.record(0, hidden, zero)
    store.end_step()


def test_slices_accumulates_and_dedupes():
    store = CaptureStore()
    store.register("a", [0])
    store.register("b", [0])
    H = 4
    row = lambda p, who: torch.full((H,), float(p) + (0.5 if who == "b" else 0.0))  # noqa: E731
    # step 1: a prefills positions 0-2, an uncaptured request x has 2 tokens, b prefills 0-1 (chunked)
    step(store, ["a-1234", "x-9", "b-5678"], [3, 2, 2], [0, 1, 2, 0, 1, 0, 1],
         torch.stack([row(0, "a"), row(1, "a"), row(2, "a"), row(9, "x"), row(9, "x"), row(0, "b"), row(1, "b")]))
    # step 2 (batch reordered): b finishes its prompt (2-3), a decodes position 3
    step(store, ["b-5678", "a-1234"], [2, 1], [2, 3, 3], torch.stack([row(2, "b"), row(3, "b"), row(3, "a")]))
    # step 3: a was preempted and recomputes positions 2-4; the newest copy wins
    step(store, ["a-1234"], [3], [2, 3, 4], torch.stack([row(20, "a"), row(30, "a"), row(4, "a")]))
    a, b = store.take("a"), store.take("b")
    from steer_actors.wire import decode_tensor

    assert a["positions"] == [0, 1, 2, 3, 4] and a["token_ids"] == [1000, 1001, 1002, 1003, 1004]
    assert decode_tensor(a["layers"]["0"])[:, 0].tolist() == [0, 1, 20, 30, 4]
    assert b["positions"] == [0, 1, 2, 3]
    assert decode_tensor(b["layers"]["0"])[:, 0].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert store.take("a") is None and not store.wanted
