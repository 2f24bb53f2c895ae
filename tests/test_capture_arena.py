"""The capture arena's allocator on its own (no vLLM): first fit, coalescing, reuse of warm rows,
new segments when full, shared-memory files vs host memory, and the fallback when shared memory is full."""

import os

import numpy as np
import pytest
import torch

from steer_actors.worker.capture.arena import Arena, is_segment_path

H = 4
ROW = H * 4


def arena(rows=100):
    return Arena(H, segment_bytes=rows * ROW)


def test_first_fit_free_coalesces_and_reuses_the_same_rows():
    a = arena()
    r1, r2, r3 = a.alloc(10), a.alloc(20), a.alloc(30)
    assert [(r.base, r.n_rows) for r in (r1, r2, r3)] == [(0, 10), (10, 20), (30, 30)]
    assert len({r.id for r in (r1, r2, r3)}) == 3 and len(a.segments) == 1
    seg = a.segments[0]
    assert a.free(r2.id) and seg.free == [[10, 20], [60, 40]]
    assert a.free(r1.id) and seg.free == [[0, 30], [60, 40]]  # merged with the next range
    assert a.free(r3.id) and seg.free == [[0, 100]]  # and with both neighbours
    assert not a.free(r3.id) and not a.free(12345)  # a stale or unknown id frees nothing
    r4 = a.alloc(25)
    assert r4.base == 0 and r4.id not in (r1.id, r2.id, r3.id)  # same rows, new id
    assert a.stats()["regions_in_use"] == 1 and a.stats()["rows_in_use"] == 25


def test_first_fit_takes_the_lowest_hole_that_fits():
    a = arena()
    rs = [a.alloc(10) for _ in range(5)]
    a.free(rs[1].id)
    a.free(rs[3].id)
    assert a.alloc(15).base == 50  # neither 10-row hole fits
    assert a.alloc(10).base == 10
    assert a.alloc(5).base == 30 and a.alloc(5).base == 35
    assert a.segments[0].free == [[65, 35]]


def test_a_full_segment_starts_another_and_a_big_region_gets_a_segment_of_its_size():
    a = arena()
    r1 = a.alloc(80)
    r2 = a.alloc(30)  # 20 rows left in the first: a second segment
    assert (r2.segment.index, r2.base) == (1, 0) and len(a.segments) == 2
    big = a.alloc(250)
    assert big.segment.n_rows == 250 and big.segment.index == 2
    assert a.alloc(20).segment is r1.segment  # first fit looks at the older segments first
    for r in list(a.regions.values()):
        a.free(r.id)
    assert a.stats()["regions_in_use"] == 0 and len(a.segments) == 3  # segments are kept (warm pages)


def test_region_views_are_disjoint_and_writes_stay_in_place():
    a = arena()
    r1, r2 = a.alloc(3), a.alloc(2)
    r1.view().fill_(1.0)
    r2.view().fill_(2.0)
    seg = a.segments[0].rows
    assert seg[:3].eq(1).all() and seg[3:5].eq(2).all()
    seg.index_copy_(0, torch.tensor([4, 0]), torch.tensor([[7.0] * H, [8.0] * H]))
    assert r1.view()[0, 0] == 8 and r2.view()[1, 0] == 7


def test_file_segments_are_sparse_reserve_as_used_and_leave_no_name_behind(tmp_path):
    a = arena()
    r = a.alloc(10, str(tmp_path))
    # reached through this process's descriptor: the name is gone at once, so a killed worker leaves no file
    assert r.path == f"/proc/{os.getpid()}/fd/{a.segments[0].fd}" and list(tmp_path.iterdir()) == []
    target = os.readlink(r.path)
    assert target.startswith(str(tmp_path) + "/steer-capture-") and target.endswith(".f32 (deleted)")
    assert is_segment_path(r.path, str(tmp_path))
    assert os.path.getsize(r.path) == 100 * ROW  # the whole segment is addressable ...
    assert a.stats()["shared_bytes"] == 10 * ROW  # ... but only what regions reached is reserved
    r.view().copy_(torch.arange(10 * H, dtype=torch.float32).reshape(10, H))
    on_disk = np.fromfile(r.path, dtype=np.float32).reshape(100, H)
    assert on_disk[:10].ravel().tolist() == list(range(10 * H))  # the same pages another process maps
    r2 = a.alloc(5, str(tmp_path))
    assert r2.path == r.path and r2.base == 10 and a.stats()["shared_bytes"] == 15 * ROW
    a.free(r.id)
    assert a.alloc(10, str(tmp_path)).base == 0 and a.stats()["shared_bytes"] == 15 * ROW  # reuse: no growth
    assert a.alloc(3).path is None  # no directory: host memory, a segment of its own kind
    assert a.stats()["file_segments"] == 1 and a.stats()["segments"] == 2
    a.close()
    assert not os.path.exists(r.path)


def test_a_killed_worker_leaves_no_shared_memory_behind(tmp_path):
    """SIGKILL runs no exit hook: the segment must not need one."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from steer_actors.worker.capture.arena import Arena; a = Arena(4); "
            f"r = a.alloc(8, {str(tmp_path)!r}); r.view().fill_(1.0); print(r.path, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    path = proc.stdout.readline().strip()
    assert np.fromfile(path, dtype=np.float32)[:32].tolist() == [1.0] * 32  # another process reads the rows
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.iterdir()) == [] and not os.path.exists(path)


def test_full_shared_memory_falls_back_to_host_memory(tmp_path, monkeypatch):
    a = arena()
    r1 = a.alloc(10, str(tmp_path))

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    r2 = a.alloc(20, str(tmp_path))  # would grow the reserved part of the file: it cannot
    assert r2.path is None and r2.view().shape == (20, H)
    assert a.segments[0].free == [[10, 90]]  # the rows it tried are free again
    monkeypatch.undo()
    a.free(r1.id)
    assert a.alloc(10, str(tmp_path)).path == r1.path  # reserved rows are reused without reserving more
    assert a.alloc(1, str(tmp_path) + "/missing").path is None  # cannot create a file there
    a.close()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        arena().alloc(0)


def test_segment_path_check(tmp_path):
    a = arena()
    assert is_segment_path(a.alloc(4, str(tmp_path)).path, str(tmp_path))
    assert not is_segment_path(a.alloc(4, str(tmp_path)).path)  # made elsewhere than /dev/shm
    other = tmp_path / "steer-capture-1-2-ab.f32"
    other.write_bytes(b"\0" * 64)
    with open(other, "rb") as f:  # an open file of the right name that is not a segment of ours
        assert not is_segment_path(f"/proc/{os.getpid()}/fd/{f.fileno()}", "/dev/shm")
    for path in ("/dev/shm/steer-capture-1-2-ab.f32", str(other), "/proc/self/fd/0", "/proc/1/fd/../environ",
                 f"/proc/{os.getpid()}/fd/999999"):
        assert not is_segment_path(path, str(tmp_path))
    a.close()


def test_shared_memory_stays_within_its_cap_and_the_rest_goes_to_host_memory(tmp_path):
    """The object store lives in the same tmpfs: the arena must not take its room."""
    a = arena()
    r1 = a.alloc(10, str(tmp_path), shared_cap_bytes=15 * ROW)
    assert r1.path is not None
    r2 = a.alloc(10, str(tmp_path), shared_cap_bytes=15 * ROW)  # 20 rows would pass the cap
    assert r2.path is None and a.stats()["shared_bytes"] == 10 * ROW
    assert a.segments[0].free == [[10, 90]]  # the rows it tried are free again
    a.free(r1.id)
    assert a.alloc(10, str(tmp_path), shared_cap_bytes=15 * ROW).path == r1.path  # reserved rows cost nothing new
    a.close()


def test_a_new_shared_segment_is_as_large_as_the_cap_allows(tmp_path):
    """A step writes one run per segment its captures are in: under a cap larger than the default segment, the
    captures share one (sparse) segment, and nothing past the cap is ever reserved."""
    a = Arena(H, segment_bytes=10 * ROW)  # segments of 10 rows unless the cap allows more
    regions = [a.alloc(8, str(tmp_path), shared_cap_bytes=100 * ROW) for _ in range(5)]
    assert {r.segment.index for r in regions} == {0} and a.segments[0].n_rows == 100
    assert a.stats()["shared_bytes"] == 40 * ROW
    b = Arena(H, segment_bytes=10 * ROW)
    assert len({b.alloc(8, str(tmp_path)).segment.index for _ in range(3)}) == 3  # no cap: default segments
    a.close()
    b.close()


def test_a_mapped_segment_keeps_row_0_for_the_scatter_and_maps_what_it_reserves(tmp_path):
    """Direct writes (capture_direct): row 0 of every segment takes the rows a step drops, so no region
    starts there; a file segment is registered page by page as its rows are reserved, never beyond."""
    import mmap

    from steer_actors.worker.capture.device_write import HostMapper

    H = 256  # 1 KiB rows: four to a page
    a = Arena(H, segment_bytes=100 * H * 4, mapper=HostMapper(torch.device("cpu")))
    r = a.alloc(10, str(tmp_path))
    seg = r.segment
    assert r.base == 1 and seg.device_rows is not None and seg.reserved == 11
    assert seg.mapped == -(-11 * H * 4 // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages, up to row 11
    assert a.alloc(5).base == 1  # a host segment too
    a.free(r.id)
    assert seg.free == [[1, 99]]
    a.close()


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_the_bounded_scatter_kernel_writes_what_index_copy_writes(interpret):
    """The device scatter of captured rows (capture_direct): the Triton kernel (few programs, each looping
    over rows; here under Triton's interpreter) and the torch form give the same segment, skipped rows
    (a layer the request does not capture, a position past its max_rows) untouched by the kernel."""
    import subprocess
    import sys

    code = """
import numpy as np, torch
from steer_actors.worker.capture import device_write as cd
torch.manual_seed(0)
L, n, H = 3, 7, 40
snap = torch.randn(L, n, H)
pos = torch.tensor([0, 1, 2, 5, 6, 3, 9], dtype=torch.int64)
a = 2  # the run: tokens 2..6
off = torch.tensor([[10, 10, 30, 30, -1], [20, 20, 40, 40, 50], [-1, -1, 60, 60, 70]], dtype=torch.int64)
maxr = torch.tensor([8, 8, 6, 6, 8], dtype=torch.int64)  # step token 5 (pos 3 < 6) kept, 4 (pos 6) and 6 (pos 9) not
outs = []
for kernel in (True, False):
    dest = torch.full((100, H), -7.0)
    cd.scatter_rows(dest, snap, pos, a, a + 5, off, maxr, 0, kernel=kernel)
    outs.append(dest)
import os
if os.environ.get("TRITON_INTERPRET") == "1":
    assert cd.kernel_usable(snap)
    dest = outs[0]
    assert torch.equal(dest[1:], outs[1][1:]) and (dest[0] == -7.0).all()  # no trash write
    assert torch.equal(dest[10 + 2], snap[0, 2]) and torch.equal(dest[60 + 3], snap[2, 5])
else:
    assert torch.equal(outs[0], outs[1])  # both the torch form on a CPU without the interpreter
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": interpret, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_mapped_arena_fits_a_region_as_large_as_a_segment(tmp_path):
    """Row 0 of a mapped segment is the scatter's: a region of a whole segment's rows (or more) still gets a
    segment of its own, in shared memory and in host memory, and no failed attempt leaves a segment behind."""
    from steer_actors.worker.capture.device_write import HostMapper

    a = Arena(H, segment_bytes=32 * ROW, mapper=HostMapper(torch.device("cpu")))
    for rows, where in ((32, None), (40, None), (32, str(tmp_path))):
        r = a.alloc(rows, where)
        assert r.base == 1 and r.n_rows == rows and r.segment.n_rows == rows + 1 and (r.path is None) == (where is None)
    assert len(a.segments) == 3
    a.close()


def test_the_scatter_kernel_compiles_for_an_h100():
    """No GPU here: the kernel only runs under Triton's interpreter above. Compiling it for sm_90 (this
    Triton's own ptxas) catches what the interpreter lets through (types, loops with a program-id start)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from steer_actors.worker.capture import device_write as cd

    sig = {"snap_ptr": "*fp32", "pos_ptr": "*i64", "off_ptr": "*i64", "maxr_ptr": "*i64", "dest_ptr": "*fp32",
           "a": "i32", "n_run": "i32", "n_step": "i32", "n_items": "i32", "H": "i32", "BLOCK_H": "constexpr"}
    src = ASTSource(fn=cd._scatter_kernel, signature=sig, constexprs={"BLOCK_H": 4096})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:  # a Triton without the NVIDIA backend's tools
        if "ptxas" in str(e) or "backend" in str(e).lower():
            pytest.skip(f"no CUDA compiler in this Triton: {e}")
        raise
    assert "cubin" in compiled.asm and "st.global" in compiled.asm["ptx"]


def test_write_run_lands_rows_counts_and_tokens_and_sends_the_rest_to_row_0():
    """The direct path's per-run write (device_write.write_run, here on the CPU where the "device" views are
    the host arrays): every kept (layer, position) row at its region's place, a count of 1 (2 once the same
    position lands again: recomputed) and its token beside it; a layer a request does not capture and a
    position past its max_rows touch nothing but row 0."""
    from steer_actors.worker.capture import device_write as cd

    class Reg:
        def __init__(self, base):
            self.base = base

    class Pend:
        def __init__(self, base, max_rows, layers):
            self.region, self.max_rows, self.layers = Reg(base), max_rows, layers

    torch.manual_seed(0)
    L, Hd, n_rows = 3, 8, 200
    step_layers = [0, 1, 2]
    a_req, b_req = Pend(10, 5, [0, 1, 2]), Pend(40, 4, [1])  # b captures layer 1 only
    run = [(a_req, 0, 2), (b_req, 2, 5)]  # a: 2 tokens, b: 3 tokens
    off, maxr, base = cd.dest_offsets(run, step_layers, False)
    assert (off[0, 2:] == cd.NOT_KEPT).all() and (off[2, 2:] == cd.NOT_KEPT).all()
    p = torch.tensor([3, 4, 1, 2, 4])  # b's position 4 is past its max_rows (4): not kept
    tok = torch.tensor([7, 8, 9, 10, 11], dtype=torch.int32)
    snap = torch.randn(L, 5, Hd)
    dest = torch.full((n_rows, Hd), -7.0)
    counts, tokens = torch.zeros(n_rows, dtype=torch.int32), torch.full((n_rows,), -1, dtype=torch.int32)
    args = (torch.from_numpy(np.vstack([off, base[None]])), torch.from_numpy(maxr), False)
    cd.write_run(dest, counts, tokens, snap, p, tok, 0, 5, *args)
    for j in range(L):  # a: layer slot j at base + j * max_rows + position
        for t in (0, 1):
            assert torch.equal(dest[10 + j * 5 + int(p[t])], snap[j, t])
    for t in (2, 3):  # b: its only layer (step layer 1) in slot 0
        assert torch.equal(dest[40 + int(p[t])], snap[1, t])
    written = {10 + j * 5 + q for j in range(L) for q in (3, 4)} | {41, 42}
    untouched = [r for r in range(1, n_rows) if r not in written]
    assert (dest[untouched] == -7.0).all()
    assert counts[[13, 14, 41, 42]].tolist() == [1, 1, 1, 1] and tokens[[13, 14, 41, 42]].tolist() == [7, 8, 9, 10]
    assert int(counts[1:].sum()) == 4 and counts[44] == 0  # position 4 of b: not kept, nothing beside it
    cd.write_run(dest, counts, tokens, snap, p, tok, 0, 5, *args)  # the same positions again: recomputed
    assert counts[[13, 14, 41, 42]].tolist() == [2, 2, 2, 2]
