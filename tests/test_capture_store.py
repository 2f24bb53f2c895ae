"""Worker-side CaptureStore on synthetic batch layouts, written through the real steering op as a
patched layer would (the engine tests cover the real runner): slicing by query start locations,
accumulation across steps, dedupe after recompute, overflow of the per-step buffer."""

import os
import sys
import threading

import numpy as np
import pytest
import torch

from steer_actors.worker.capture.store import CaptureStore
from steer_actors.ops.kernel import steer_residual_
from steer_actors.ops.rows import neutral_rows


@pytest.fixture(autouse=True, params=["host", "direct"])
def path(request, monkeypatch):
    """Every test on both write paths: the host scattering rows, and the device writing them into the
    mapped arena (:mod:`steer_actors.worker.capture.device_write`; on the CPU the same logic over host memory)."""
    monkeypatch.setattr(sys.modules[__name__], "DIRECT", request.param == "direct", raising=False)
    return request.param


DIRECT = False


def new_store(**kw):
    return CaptureStore(threading.RLock(), direct=DIRECT, **kw)


def file_rows(d, n, H=4):
    """Rows ``[0, n)`` of a taken capture's region, read from its (sparse, 16 GiB) segment file."""
    return np.fromfile(d.file, dtype=np.float32, count=n * H, offset=d.offset_rows * H * 4).reshape(n, H)


def layer0(store, hidden, residual, i=0):
    """Layer ``i``'s op with no steering: only the capture part runs."""
    H = hidden.shape[1]
    r = neutral_rows(1, H)
    buf, dst, on, any_on = store.buf, store.dst, store.layer_on, store.any_on
    off = torch.zeros(1, dtype=torch.int32)
    two = [torch.stack([t, t]) for t in (r.add, r.unit, r.lo, r.hi, r.gamma)]  # the two global copies
    steer_residual_(hidden, residual, *two, torch.zeros(2, dtype=torch.int32), off, r.add[None], r.unit[None],
                    r.lo[None], r.hi[None], r.gamma[None], dst, off, buf[i], dst, on[i:i + 1], any_on)


def step(store, req_ids, counts, positions, hidden, padded=0):
    qsl = np.concatenate([[0], np.cumsum(counts)])
    pos = torch.tensor(positions + [0] * padded)
    hidden = torch.cat([hidden, torch.full((padded, hidden.shape[1]), -99.0)])
    store.begin_step(req_ids, qsl, pos, pos + 1000, len(pos))
    layer0(store, hidden, torch.zeros_like(hidden))
    store.end_step()
    assert all((seg.device_rows is not None) == DIRECT for seg in store.arena.segments)  # the path under test


def make_store(rows=16, H=4):
    store = new_store()
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

    assert a.positions == [0, 1, 2, 3, 4] and a.token_ids == [1000, 1001, 1002, 1003, 1004]
    assert a.recomputed == 2 and b.recomputed == 0
    assert decode_tensor(a.layers["0"])[:, 0].tolist() == [0, 1, 20, 30, 4]
    assert b.positions == [0, 1, 2, 3]
    assert decode_tensor(b.layers["0"])[:, 0].tolist() == [0.5, 1.5, 2.5, 3.5]
    assert store.take("a") is None and not store.wanted


def test_step_larger_than_the_buffer_is_a_clear_error_not_a_silent_drop():
    store = make_store(rows=4)
    store.register("a", [0], 8)
    store.register("b", [0], 8)
    H = 4
    step(store, ["a-1", "b-2"], [3, 3], [0, 1, 2, 0, 1, 2], torch.arange(6.0)[:, None].expand(6, H).contiguous())
    a = store.take("a")
    assert a.positions == [0, 1, 2]
    with pytest.raises(ValueError, match="capture_rows_per_step=4"):
        store.take("b")


def test_capture_off_refuses_registration():
    store = new_store()
    store.buffers(num_layers=2, rows=0, hidden=4, max_tokens=8)
    with pytest.raises(ValueError, match="capture disabled"):
        store.register("a", [0], 8)


def test_rows_go_to_a_shared_segment_by_position_and_regions_are_freed_and_reused(tmp_path):
    store = make_store()
    store.register("a", [0], 4, str(tmp_path))
    store.register("b", [0], 4, str(tmp_path))
    H = 4
    # positions past prompt + max_tokens (e.g. rejected drafts) never enter the capture
    step(store, ["a-1", "b-2"], [3, 1], [0, 1, 2, 0], torch.arange(4.0)[:, None].expand(4, H).contiguous())
    step(store, ["a-1"], [2], [3, 4], torch.tensor([[7.0] * H, [8.0] * H]))
    a = store.take("a")
    assert a.positions == [0, 1, 2, 3] and a.recomputed == 0 and a.layers is None
    assert a.shape == [1, 4, H] and os.readlink(a.file).startswith(str(tmp_path))
    rows = file_rows(a, 4)
    assert rows[:, 0].tolist() == [0.0, 1.0, 2.0, 7.0]
    assert store.stats()["regions_in_use"] == 2  # a's region is the engine's until it frees it
    store.drop("b")
    assert store.stats()["regions_in_use"] == 1
    assert store.free([a.region]) == 1 and store.free([a.region]) == 0  # a stale id frees nothing
    assert store.stats()["regions_in_use"] == 0
    # one segment holds every region, and outlives them: the next capture reuses its warm rows (its name
    # is gone from the directory: it is reached through the worker's descriptor)
    assert list(tmp_path.iterdir()) == [] and len(store.arena.segments) == 1
    store.register("c", [0], 4, str(tmp_path))
    step(store, ["c-1"], [2], [0, 1], torch.tensor([[5.0] * H, [6.0] * H]))
    c = store.take("c")
    assert c.file == a.file and c.offset_rows == a.offset_rows
    assert c.positions == [0, 1] and c.token_ids == [1000, 1001]  # nothing of a's is seen again
    store.arena.close()


def test_requests_with_different_layer_sets_share_a_step():
    store = make_store()
    H = 4
    store.register("a", [0, 1], 4)
    store.register("b", [1], 4)
    hidden = torch.tensor([[1.0] * H, [2.0] * H, [3.0] * H])
    qsl = np.array([0, 2, 3])
    pos = torch.tensor([0, 1, 0])
    store.begin_step(["a-1", "b-2"], qsl, pos, pos + 1000, 3)
    layer0(store, hidden, torch.zeros_like(hidden))
    layer0(store, hidden * 10, torch.zeros_like(hidden), i=1)
    store.end_step()
    a, b = store.take("a"), store.take("b")
    from steer_actors.wire import decode_tensor

    assert a.layer_ids == [0, 1] and b.layer_ids == [1] and b.token_ids == [1000]
    assert decode_tensor(a.layers["0"])[:, 0].tolist() == [1.0, 2.0]
    assert decode_tensor(a.layers["1"])[:, 0].tolist() == [10.0, 20.0]
    assert decode_tensor(b.layers["1"])[:, 0].tolist() == [30.0]
    assert store.stats()["regions_in_use"] == 0  # host-memory regions are free once encoded


def test_one_step_across_segments_and_host_fallback(tmp_path):
    store = new_store(segment_bytes=6 * 4 * 4)  # a segment holds 6 rows of H=4: one request each
    store.buffers(num_layers=2, rows=16, hidden=4, max_tokens=32)
    H = 4
    for rid in "abc":
        store.register(rid, [0], 5, str(tmp_path) if rid != "c" else None)
    step(store, ["a-1", "b-2", "c-3"], [2, 3, 1], [0, 1, 0, 1, 2, 0],
         torch.arange(6.0)[:, None].expand(6, H).contiguous())
    a, b, c = store.take("a"), store.take("b"), store.take("c")
    assert a.file != b.file and c.file is None
    got = lambda d: file_rows(d, len(d.positions))[:, 0]  # noqa: E731
    assert got(a).tolist() == [0.0, 1.0] and got(b).tolist() == [2.0, 3.0, 4.0]
    from steer_actors.wire import decode_tensor

    assert decode_tensor(c.layers["0"])[:, 0].tolist() == [5.0]
    assert store.stats()["segments"] == 3
    store.arena.close()


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

    from steer_actors.worker.capture.arena import pid_namespace, sweep_orphan_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    ns = pid_namespace()
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


def test_a_region_stored_whole_carries_nothing_of_an_earlier_capture(tmp_path):
    """The engine stores a nearly full region whole (one contiguous copy): the rows this request never wrote
    must not hold the previous owner's activations."""
    store, H = make_store(), 4
    store.register("a", [0], 8, str(tmp_path))
    step(store, ["a-1"], [8], list(range(8)), torch.full((8, H), 9.0))
    a = store.take("a")
    assert store.free([a.region]) == 1
    store.register("b", [0], 8, str(tmp_path))  # the same rows again
    step(store, ["b-1"], [7], list(range(7)), torch.full((7, H), 5.0))  # stopped one row short of max_tokens
    b = store.take("b")
    assert (b.offset_rows, b.file) == (a.offset_rows, a.file)
    rows = file_rows(b, 8)
    assert rows[:7].tolist() == [[5.0] * H] * 7 and rows[7].tolist() == [0.0] * H
    store.arena.close()


def test_a_step_whose_writes_fail_fails_its_captures_clearly_and_the_forward_goes_on(monkeypatch):
    """A failure while capturing a step (here the device write, or the snapshot) must not reach the forward:
    end_step returns, that step's requests report it at take, and the next request captures normally."""
    store = make_store()
    store.register("a", [0], 8)
    H = 4

    def boom(*a, **k):
        raise RuntimeError("no room on the device")

    with monkeypatch.context() as m:
        m.setattr("steer_actors.worker.capture.step.write_run" if DIRECT else "steer_actors.worker.capture.host_write._write_run", boom)
        step(store, ["a-1"], [2], [0, 1], torch.ones(2, H))  # returns: the forward is not the capture's
    with pytest.raises(ValueError, match="no room on the device"):
        store.take("a")
    store.register("b", [0], 8)
    step(store, ["b-1"], [2], [0, 1], torch.ones(2, H))
    assert store.take("b").positions == [0, 1]


def test_a_repeated_batch_reuses_its_plan_and_a_new_request_gets_a_new_one():
    """Decode steps repeat the batch: the plan (and, on the direct path, its targets on the device) is kept,
    also while other requests start or stop capturing; a new batch, or taking a request of this one, makes the
    next step plan again, and the rows stay right throughout."""
    store = make_store()
    H = 4
    store.register("a", [0], 8)
    store.register("b", [0], 8)
    row = lambda p, who: torch.full((H,), float(p) + (0.5 if who == "b" else 0.0))  # noqa: E731
    step(store, ["a-1", "b-2"], [1, 1], [0, 0], torch.stack([row(0, "a"), row(0, "b")]))
    plan = store._plan
    step(store, ["a-1", "b-2"], [1, 1], [1, 1], torch.stack([row(1, "a"), row(1, "b")]))
    assert store._plan is plan
    store.register("c", [0], 8)  # not in this batch: its plan holds
    assert store._plan is plan
    step(store, ["a-1", "b-2", "c-3"], [1, 1, 1], [2, 2, 0], torch.stack([row(2, "a"), row(2, "b"), row(0, "c")]))
    assert store._plan is not plan
    b = store.take("b")  # in the batch: its rows must never be written again
    assert store._plan is None
    step(store, ["a-1", "c-3"], [1, 1], [3, 1], torch.stack([row(3, "a"), row(1, "c")]))
    plan = store._plan
    store.register("d", [0], 8)
    store.drop("d")
    assert store._plan is plan
    store.register("a", [0], 8)  # registered again while in the batch: the new region, not the plan's
    assert store._plan is None
    store.drop("a")
    store.register("a", [0], 8)
    step(store, ["a-1", "c-3"], [1, 1], [0, 2], torch.stack([row(0, "a"), row(2, "c")]))
    step(store, ["a-1", "c-3"], [1, 1], [1, 3], torch.stack([row(1, "a"), row(3, "c")]))
    step(store, ["a-1", "c-3"], [1, 1], [2, 4], torch.stack([row(2, "a"), row(4, "c")]))
    step(store, ["a-1", "c-3"], [1, 1], [3, 5], torch.stack([row(3, "a"), row(5, "c")]))
    a, c = store.take("a"), store.take("c")
    assert a.positions == [0, 1, 2, 3] and b.positions == [0, 1, 2] and c.positions == list(range(6))
    assert a.recomputed == b.recomputed == c.recomputed == 0
    if a.layers is not None:
        from steer_actors.wire import decode_tensor

        assert decode_tensor(a.layers["0"])[:, 0].tolist() == [0, 1, 2, 3]
        assert decode_tensor(b.layers["0"])[:, 0].tolist() == [0.5, 1.5, 2.5]
        assert decode_tensor(c.layers["0"])[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_a_region_the_engine_never_frees_is_reclaimed_after_its_lease(tmp_path):
    """take() hands a shared region to the engine, which frees it once the object store holds its copy. When
    that free never comes (the take's reply was lost), the worker takes the region back after the lease, and
    a late free of it frees nothing."""
    store, H = make_store(), 4
    store.register("a", [0], 8, str(tmp_path))
    step(store, ["a-1"], [2], [0, 1], torch.ones(2, H))
    a = store.take("a")
    assert store.stats()["regions_handed"] == 1 and store.arena.get(a.region) is not None
    store.register("b", [0], 8, str(tmp_path))  # within the lease: the region stays the engine's
    assert store.arena.get(a.region) is not None
    store.handed_lease_s = 0.0
    store.register("c", [0], 8, str(tmp_path))
    assert store.arena.get(a.region) is None and store.stats()["regions_handed"] == 0
    assert store.free([a.region]) == 0
    b = store.take("b")
    assert store.free([b.region]) == 1 and store.stats()["regions_handed"] == 0
    store.arena.close()


def test_a_region_stored_whole_carries_nothing_of_its_last_capture(tmp_path):
    """A reused region handed over whole (the request used nearly all of it) has the unused tail of every
    layer zeroed: those rows hold the previous capture's activations, maybe another user's."""
    store = make_store()
    H = 4

    def both_layers(ids, counts, positions, value):
        qsl = np.concatenate([[0], np.cumsum(counts)])
        pos = torch.tensor(positions)
        store.begin_step(ids, qsl, pos, pos + 1000, len(pos))
        for i in (0, 1):
            hidden = torch.full((len(positions), H), value + i)
            layer0(store, hidden, torch.zeros_like(hidden), i=i)
        store.end_step()

    store.register("a", [0, 1], 8, str(tmp_path))
    both_layers(["a-1"], [8], list(range(8)), 5.0)
    a = store.take("a")
    assert file_rows(a, 16)[:, 0].tolist() == [5.0] * 8 + [6.0] * 8
    store.free([a.region])
    store.register("c", [0, 1], 8, str(tmp_path))
    both_layers(["c-1"], [7], list(range(7)), 1.0)  # one row short: the region is still stored whole
    c = store.take("c")
    assert c.offset_rows == a.offset_rows and c.shape == [2, 8, H]
    assert file_rows(c, 16)[:, 0].tolist() == [1.0] * 7 + [0.0] + [2.0] * 7 + [0.0]
    store.arena.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_are_stored_in_the_capture_dtype(tmp_path, dtype):
    """A bf16 model's rows are kept as bf16 (half of fp32's bytes), rounded once from the fp32 sum h + r, as
    vLLM rounds the residual it hands the next layer; inline and through a shared segment alike."""
    from steer_actors import row_dtype
    from steer_actors.wire import decode_tensor

    H = 4
    store = new_store()
    store.buffers(num_layers=2, rows=16, hidden=H, max_tokens=32, dtype=dtype)
    assert store.arena.row_bytes == 2 * H
    store.register("a", [0], 4)  # host memory: rows come back inline
    store.register("b", [0], 4, str(tmp_path))  # a shared segment the engine maps
    exact = torch.tensor([[1 / 3, 2 / 3, 1e-3 + 1, -7 / 9]]).expand(4, H).contiguous()
    hidden = exact + torch.arange(4.0)[:, None] * 1000  # far from representable in 8 bits of mantissa
    step(store, ["a-1", "b-2"], [2, 2], [0, 1, 0, 1], hidden)
    want = hidden.to(dtype)
    a, b = store.take("a"), store.take("b")
    got_a = decode_tensor(a.layers["0"])
    assert got_a.dtype == dtype and torch.equal(got_a, want[:2])
    assert b.dtype == row_dtype.name(dtype)
    raw = np.fromfile(b.file, dtype=row_dtype.storage(dtype), count=2 * H, offset=b.offset_rows * H * 2)
    assert torch.equal(row_dtype.as_tensor(raw.reshape(2, H), b.dtype), want[2:])
    store.arena.close()
