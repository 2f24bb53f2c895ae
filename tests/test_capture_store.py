"""Worker-side CaptureStore on synthetic batch layouts, written through the real steering op as a
patched layer would (the engine tests cover the real runner): slicing by query start locations,
accumulation across steps, dedupe after recompute, overflow of the per-step buffer."""

import numpy as np
import pytest
import torch

from steer_actors.capture import CaptureStore
from steer_actors.kernels import steer_residual_
from steer_actors.ops import neutral_rows


def layer0(store, hidden, residual):
    """Layer 0's op with no steering: only the capture part runs."""
    H = hidden.shape[1]
    r = neutral_rows(1, H)
    buf, dst, on, any_on = store.buf, store.dst, store.layer_on, store.any_on
    off = torch.zeros(1, dtype=torch.int32)
    steer_residual_(hidden, residual, r.add, r.unit, r.lo, r.hi, r.gamma, off, r.add[None], r.unit[None], r.lo[None],
                    r.hi[None], r.gamma[None], dst, off, buf[0], dst, on[0:1], any_on)


def step(store, req_ids, counts, positions, hidden, padded=0):
    qsl = np.concatenate([[0], np.cumsum(counts)])
    pos = torch.tensor(positions + [0] * padded)
    hidden = torch.cat([hidden, torch.full((padded, hidden.shape[1]), -99.0)])
    store.begin_step(req_ids, qsl, pos, pos + 1000, len(pos))
    layer0(store, hidden, torch.zeros_like(hidden))
    store.end_step()


def make_store(rows=16, H=4):
    store = CaptureStore()
    store.buffers(num_layers=2, rows=rows, hidden=H, max_tokens=32)
    return store


def test_slices_accumulates_and_dedupes():
    store = make_store()
    store.register("a", [0], 8)
    store.register("b", [0], 8)
    H = 4
    row = lambda p, who: torch.full((H,), float(p) + (0.5 if who == "b" else 0.0))  # noqa: E731
    # step 1: a prefills positions 0-2, an uncaptured request x has 2 tokens, b prefills 0-1 (chunked)
    step(store, ["a-1234", "x-9", "b-5678"], [3, 2, 2], [0, 1, 2, 0, 1, 0, 1],
         torch.stack([row(0, "a"), row(1, "a"), row(2, "a"), row(9, "x"), row(9, "x"), row(0, "b"), row(1, "b")]))
    # step 2 (batch reordered): b finishes its prompt (2-3), a decodes position 3
    step(store, ["b-5678", "a-1234"], [2, 1], [2, 3, 3], torch.stack([row(2, "b"), row(3, "b"), row(3, "a")]),
         padded=5)  # graph padding rows are never captured
    # step 3: a was preempted and recomputes positions 2-4; the newest copy wins
    step(store, ["a-1234"], [3], [2, 3, 4], torch.stack([row(20, "a"), row(30, "a"), row(4, "a")]))
    a, b = store.take("a"), store.take("b")
    from steer_actors.wire import decode_tensor

    assert a["positions"] == [0, 1, 2, 3, 4] and a["token_ids"] == [1000, 1001, 1002, 1003, 1004]
    assert decode_tensor(a["layers"]["0"])[:, 0].tolist() == [0, 1, 20, 30, 4]
    assert b["positions"] == [0, 1, 2, 3]
    assert decode_tensor(b["layers"]["0"])[:, 0].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert store.take("a") is None and not store.wanted


def test_step_larger_than_the_buffer_is_a_clear_error_not_a_silent_drop():
    store = make_store(rows=4)
    store.register("a", [0], 8)
    store.register("b", [0], 8)
    H = 4
    step(store, ["a-1", "b-2"], [3, 3], [0, 1, 2, 0, 1, 2], torch.arange(6.0)[:, None].expand(6, H).contiguous())
    a = store.take("a")
    assert a["positions"] == [0, 1, 2]
    with pytest.raises(ValueError, match="capture_rows_per_step=4"):
        store.take("b")


def test_capture_off_refuses_registration():
    store = CaptureStore()
    store.buffers(num_layers=2, rows=0, hidden=4, max_tokens=8)
    with pytest.raises(ValueError, match="capture disabled"):
        store.register("a", [0], 8)


def test_rows_go_to_a_file_by_position_and_drop_removes_it(tmp_path):
    store = make_store()
    store.register("a", [0], 4, str(tmp_path))
    store.register("b", [0], 4, str(tmp_path))
    H = 4
    # positions past prompt + max_tokens (e.g. rejected drafts) never enter the capture
    step(store, ["a-1", "b-2"], [3, 1], [0, 1, 2, 0], torch.arange(4.0)[:, None].expand(4, H).contiguous())
    step(store, ["a-1"], [2], [3, 4], torch.tensor([[7.0] * H, [8.0] * H]))
    a = store.take("a")
    assert a["positions"] == [0, 1, 2, 3] and a["recomputed"] == 0 and "layers" not in a
    rows = np.fromfile(a["file"], dtype=np.float32).reshape(a["shape"])
    assert a["shape"] == [1, 4, H] and rows[0, :, 0].tolist() == [0.0, 1.0, 2.0, 7.0]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    store.drop("b")
    assert [p.name for p in tmp_path.iterdir()] == [a["file"].rsplit("/", 1)[1]]


def test_a_step_whose_every_request_overflows_captures_nothing_and_says_so():
    store = make_store(rows=4)
    store.register("a", [0], 16)
    H = 4
    step(store, ["a-1"], [6], list(range(6)), torch.arange(6.0)[:, None].expand(6, H).contiguous())
    with pytest.raises(ValueError, match="capture_rows_per_step=4"):
        store.take("a")


def test_sweep_removes_only_old_files_of_dead_processes_in_this_pid_namespace(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from steer_actors.capture import _pid_namespace, sweep_orphan_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    ns = _pid_namespace()
    old = time.time() - 3600

    def make(name, age=old):
        p = tmp_path / name
        p.write_bytes(b"x" * 16)
        os.utime(p, (age, age))
        return p

    orphan = make(f"steer-capture-{ns}-{dead.pid}-aa.f32")
    mine = make(f"steer-capture-{ns}-{os.getpid()}-bb.f32")  # a live writer
    fresh = make(f"steer-capture-{ns}-{dead.pid}-cc.f32", age=time.time())  # may still be on its way out
    other_ns = make(f"steer-capture-{ns + 1}-{dead.pid}-dd.f32")  # another container's pid space
    unrelated = make("something-else.f32")
    assert sweep_orphan_files(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists() and all(p.exists() for p in (mine, fresh, other_ns, unrelated))
    assert sweep_orphan_files(str(tmp_path / "missing")) == []  # best effort, never raises
