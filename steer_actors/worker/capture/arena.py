"""Where captured rows live on the worker's host: a few large segments of rows (see :mod:`.row_dtype`), mapped once for the
worker's life, handed out as row ranges (regions) and recycled.

A capture writes one row per (layer, position); a fresh file per request meant a page fault for nearly
every row written (a decode step of 128 requests x 28 layers touched 3584 new pages, ~12 ms on the host,
twice a GPU decode step). A freed region's pages stay mapped, so once the arena has grown to its working
set, writes fault nothing.

A segment is a file in a shared-memory directory (the engine actor maps the same file and reads the rows
without another copy) or anonymous host memory (no directory, or the directory is full). File segments
are sparse: space is reserved (``posix_fallocate``) as regions first reach it, so a full tmpfs raises
``OSError`` at allocation, never SIGBUS at a write, and the file holds what was ever in use at once.
Segments are never shrunk while the worker lives (a freed region is the next one's warm pages):
shared-memory use stays at its peak, which the engine's ``capture_budget_bytes`` bounds (it reserves a
request's rows before registering it).

A segment's name is removed as soon as it is mapped; it is reached as ``/proc/<worker pid>/fd/<fd>``
(same host and pid namespace only: the engine checks both before it asks for shared memory). So its
memory goes back to the system when the last of the worker's descriptor and the engine's mapping goes,
however the worker ends: a worker killed with SIGKILL (the reaper's way) leaves nothing in /dev/shm.
"""

from __future__ import annotations

import atexit
import bisect
import mmap
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steer_actors import row_dtype

DEFAULT_SEGMENT_BYTES = 1 << 30
# Shared segments are sparse (reserved region by region), so a large one costs only address space (and 8
# bytes of pinned books per row), and a step writes one run of rows per segment it touches (each run ~8 device
# launches on the runner's thread): a new one is made as large as the engine's cap on shared memory allows
# (up to MAX_SHARED_SEGMENT_BYTES), so its captures share one segment. 16 GB segments gave the 0.6B engine
# with 512 all-layer captures in flight (22 GB) two runs per step on the H100.
DEFAULT_SHARED_SEGMENT_BYTES = 16 << 30
MAX_SHARED_SEGMENT_BYTES = 256 << 30
MAX_SHARED_SEGMENT_ROWS = 1 << 24  # its books: 128 MB of counts and tokens


@dataclass(eq=False)
class Segment:
    index: int
    directory: str | None  # None: anonymous host memory
    path: str | None
    rows: torch.Tensor  # [n_rows, H] of the arena's dtype, over the whole mapping
    free: list[list[int]]  # sorted, disjoint, never adjacent: [start, length]
    fd: int | None = None
    reserved: int = 0  # rows [0, reserved) of the file are backed (fallocated)
    _map: Any = field(default=None, repr=False)  # keeps the mapping alive as long as ``rows``
    array: Any = field(default=None, repr=False)  # ``rows`` as numpy (the host write scatters with numpy)
    # Direct writes (see device_write): ``rows`` as a device tensor, None where the segment is not
    # mapped; the first ``mapped`` bytes are registered. Row 0 is the scatter's trash row, never handed out.
    device_rows: Any = field(default=None, repr=False)
    mapped: int = 0
    # Per segment row (only the first ``max_rows`` rows of a region are used): how many times that position
    # landed (more than once: recomputed after a preemption) and its input token. On a mapped segment the
    # device writes them beside the rows (``device_counts``/``device_tokens``: views of the same pages).
    counts: Any = field(default=None, repr=False)
    tokens: Any = field(default=None, repr=False)
    device_counts: Any = field(default=None, repr=False)
    device_tokens: Any = field(default=None, repr=False)
    _meta: Any = field(default=None, repr=False)  # [2, n_rows] int32 (counts, tokens) of a mapped segment

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]


@dataclass(frozen=True, eq=False)
class Region:
    id: int
    segment: Segment
    base: int
    n_rows: int

    @property
    def path(self) -> str | None:
        return self.segment.path

    def view(self) -> torch.Tensor:
        return self.segment.rows[self.base:self.base + self.n_rows]


class Arena:
    def __init__(self, hidden: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES, shared_segment_bytes: int | None = None,
                 mapper: Any = None, dtype: torch.dtype = torch.float32):
        """``segment_bytes``: a host-memory segment; ``shared_segment_bytes`` (default the same): a file one.
        ``mapper`` (a :class:`~steer_actors.worker.capture.device_write.HostMapper`): segments are registered with its
        device as their rows are reserved, so the device can write rows in place."""
        self.mapper = mapper
        self.hidden = int(hidden)
        self.dtype = dtype
        self.row_bytes = self.hidden * row_dtype.itemsize(dtype)
        self.segment_rows = max(1, int(segment_bytes) // self.row_bytes)
        self.shared_segment_rows = max(1, int(shared_segment_bytes or segment_bytes) // self.row_bytes)
        self.segments: list[Segment] = []
        self.regions: dict[int, Region] = {}
        self._next_id = 1  # never reused: a stale id frees nothing
        self._lock = threading.Lock()  # separate from the forward lock: registering never stalls a forward
        self._exit_hook = False
        self._cap: int | None = None  # shared bytes this allocation may take in all (see alloc)

    def alloc(self, n_rows: int, directory: str | None = None, shared_cap_bytes: int | None = None) -> Region:
        """``n_rows`` rows, in a file segment of ``directory`` when there is room (a new segment if no
        free range fits) and the shared memory reserved stays within ``shared_cap_bytes``, else in host
        memory. The cap keeps the arena from taking the room of the Ray object store, which lives in the
        same tmpfs and only finds out at a write that it is gone."""
        n_rows = int(n_rows)
        if n_rows <= 0:
            raise ValueError(f"a region needs at least one row, not {n_rows}")
        with self._lock:
            if directory is not None:
                self._cap = shared_cap_bytes
                try:
                    return self._alloc(n_rows, directory)
                except OSError:  # shared memory full (containers often get 64 MB), or the cap: rows stay here
                    pass
            return self._alloc(n_rows, None)

    def _alloc(self, n_rows: int, directory: str | None) -> Region:
        for seg in self.segments:
            if seg.directory == directory:
                base = _first_fit(seg.free, n_rows)
                if base is not None:
                    return self._publish(seg, base, n_rows)
        # a mapped segment keeps row 0 for the scatter (see _map_new): room for it too
        need = n_rows + (1 if self.mapper is not None else 0)
        size = self.segment_rows
        if directory is not None:
            size = max(self.shared_segment_rows,
                       min(min(self._cap or 0, MAX_SHARED_SEGMENT_BYTES) // self.row_bytes, MAX_SHARED_SEGMENT_ROWS))
        seg = self._new_segment(max(need, size), directory)
        base = _first_fit(seg.free, n_rows)
        assert base is not None, (n_rows, seg.free)
        return self._publish(seg, base, n_rows)

    def _publish(self, seg: Segment, base: int, n_rows: int) -> Region:
        end = base + n_rows
        if seg.fd is not None and end > seg.reserved:
            shared = sum(x.reserved for x in self.segments if x.fd is not None) + end - seg.reserved
            if self._cap is not None and shared * self.row_bytes > self._cap:
                _release(seg.free, base, n_rows)
                raise OSError(f"capture arena: {shared * self.row_bytes} bytes of shared memory would pass its cap "
                              f"of {self._cap}")
            try:
                os.posix_fallocate(seg.fd, seg.reserved * self.row_bytes, (end - seg.reserved) * self.row_bytes)
            except OSError:
                _release(seg.free, base, n_rows)
                raise
            seg.reserved = end
        if seg.device_rows is not None:
            self._map(seg, end)
        region = Region(self._next_id, seg, base, n_rows)
        self._next_id += 1
        self.regions[region.id] = region
        return region

    def _new_segment(self, n_rows: int, directory: str | None) -> Segment:
        nbytes = n_rows * self.row_bytes
        fd = path = None
        if directory is None:
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if self.mapper is not None and hasattr(mmap, "MADV_DONTFORK"):
                mm.madvise(mmap.MADV_DONTFORK)  # pinned private pages must not turn copy-on-write in a child
        else:
            path = os.path.join(directory, segment_name())
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)  # sparse: space is reserved region by region (see _publish)
                mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            except OSError:
                os.close(fd)
                raise
            finally:
                _unlink(path)  # the descriptor and the mappings keep it (see the module's doc)
            path = f"/proc/{os.getpid()}/fd/{fd}"
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True
        array = np.frombuffer(mm, dtype=row_dtype.storage(self.dtype)).reshape(n_rows, self.hidden)
        seg = Segment(len(self.segments), directory, path, row_dtype.as_tensor(array, self.dtype), [[0, n_rows]], fd,
                      _map=mm, array=array)
        if self.mapper is None:  # zero pages until used (calloc)
            seg.counts, seg.tokens = np.zeros(n_rows, dtype=np.int32), np.zeros(n_rows, dtype=np.int32)
        else:  # page-aligned, for the device to write (registered in _map_new)
            meta = mmap.mmap(-1, 8 * n_rows, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hasattr(mmap, "MADV_DONTFORK"):
                meta.madvise(mmap.MADV_DONTFORK)
            seg._meta = np.frombuffer(meta, dtype=np.int32).reshape(2, n_rows)
            seg.counts, seg.tokens = seg._meta[0], seg._meta[1]
        if self.mapper is not None and n_rows > 1:
            self._map_new(seg)
        self.segments.append(seg)
        return seg

    def _map_new(self, seg: Segment) -> None:
        """Register row 0 (the trash row; its page backed first for a file) and make the device view."""
        if seg.fd is not None:
            try:
                os.posix_fallocate(seg.fd, 0, self.row_bytes)
            except OSError:
                return
            seg.reserved = 1
        seg.free = [[1, seg.n_rows - 1]]
        from steer_actors.worker.capture.device_write import page_end

        end = page_end(self.row_bytes)
        if not self.mapper.register(seg.array.ctypes.data, end):
            return
        seg.mapped = end
        rows = self.mapper.view(seg.array).view(self.dtype)
        if not self.mapper.self_test(rows, seg.array, 0):
            return
        if not self.mapper.register(seg._meta.ctypes.data, seg._meta.nbytes):
            return
        meta = self.mapper.view(seg._meta)
        seg.device_counts, seg.device_tokens = meta[0], meta[1]
        seg.device_rows = rows

    def _map(self, seg: Segment, end_row: int) -> None:
        """Registered up to row ``end_row`` (whole pages); on failure the segment leaves the direct path."""
        from steer_actors.worker.capture.device_write import page_end

        end = min(page_end(end_row * self.row_bytes), seg.n_rows * self.row_bytes)
        if end > seg.mapped:
            if self.mapper.register(seg.array.ctypes.data + seg.mapped, end - seg.mapped):
                seg.mapped = end
            else:
                seg.device_rows = None

    def free(self, region_id: int) -> bool:
        """Give a region's rows back (its pages stay mapped for the next one). False if it was not in use."""
        with self._lock:
            region = self.regions.pop(int(region_id), None)
            if region is None:
                return False
            _release(region.segment.free, region.base, region.n_rows)
            return True

    def get(self, region_id: int) -> Region | None:
        return self.regions.get(int(region_id))

    def stats(self) -> dict[str, int]:
        with self._lock:
            files = [s for s in self.segments if s.path is not None]
            return {"segments": len(self.segments), "file_segments": len(files),
                    "mapped_segments": sum(s.device_rows is not None for s in self.segments),
                    "regions_in_use": len(self.regions),
                    "rows_in_use": sum(r.n_rows for r in self.regions.values()),
                    "shared_bytes": sum(s.reserved for s in files) * self.row_bytes,
                    "host_bytes": sum(s.n_rows for s in self.segments if s.path is None) * self.row_bytes}

    def close(self) -> None:
        """Close the segments' descriptors (at exit). Mappings stay valid for whoever still holds one."""
        for seg in self.segments:
            if seg.fd is not None:
                try:
                    os.close(seg.fd)
                except OSError:
                    pass
                seg.fd = None


def _first_fit(free: list[list[int]], n: int) -> int | None:
    for i, (start, length) in enumerate(free):
        if length >= n:
            if length == n:
                del free[i]
            else:
                free[i] = [start + n, length - n]
            return start
    return None


def _release(free: list[list[int]], start: int, n: int) -> None:
    """Put [start, start + n) back, merged with the free ranges it touches."""
    i = bisect.bisect_left(free, [start, 0])
    end = start + n
    if i < len(free) and free[i][0] == end:  # merge with the next range
        end += free[i][1]
        del free[i]
    if i > 0 and free[i - 1][0] + free[i - 1][1] == start:  # and with the previous one
        free[i - 1][1] = end - free[i - 1][0]
    else:
        free.insert(i, [start, end - start])


def stored_rows(keep: int, max_rows: int) -> int:
    """Rows of a region (per layer) that go to the object store: all of them (a contiguous view, one copy)
    when the request used nearly all (it ran to max_tokens), else just its own (an early stop must not pin a
    region sized for max_tokens, e.g. the model's whole length). The worker zeroes the unused tail of a
    region stored whole."""
    return max_rows if max_rows - keep <= max_rows // 8 else keep


def segment_name() -> str:
    """``steer-capture-<pid namespace>-<pid>-<uuid>.f32``: what :func:`sweep_orphan_files` recognises."""
    return f"steer-capture-{pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex}.f32"


def is_segment_path(path: str, directory: str = "/dev/shm") -> bool:
    """``/proc/<pid>/fd/<fd>`` of a process of this host and pid namespace, open on a capture segment that
    was made in ``directory`` (and unlinked since)."""
    import re

    if not re.fullmatch(r"/proc/[0-9]+/fd/[0-9]+", path):
        return False
    try:
        target = os.readlink(path)
    except OSError:
        return False
    target = target.removesuffix(" (deleted)")
    name = os.path.basename(target)
    return os.path.dirname(target) == directory and name.startswith("steer-capture-") and name.endswith(".f32")


def shared_memory_key() -> str:
    """Where shared-memory segments can be shared: the same running kernel (boot id: host names repeat
    across machines) and pid namespace (``/proc/<pid>``; the initial namespace has the same number on
    every host)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}:{boot}:{pid_namespace()}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def pid_namespace() -> int:
    """Containers sharing /dev/shm (``--ipc=host``) need not share pids: a file's pid means something only
    in the namespace that wrote it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def sweep_orphan_files(directory: str = "/dev/shm", min_age_s: float = 600.0) -> list[str]:
    """Remove capture files whose writing process is gone (an engine that died with captures in flight):
    tmpfs is memory, and nothing else would ever free them. Only files of this pid namespace, untouched
    for ``min_age_s`` (a dead worker's last files may still be on their way into the object store).
    Best effort: returns the paths removed, never raises."""
    import time

    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    ns, now = str(pid_namespace()), time.time()
    for name in names:
        parts = name.split("-")
        if not (name.startswith("steer-capture-") and name.endswith(".f32") and len(parts) == 5 and parts[2] == ns):
            continue
        path = os.path.join(directory, name)
        try:
            os.kill(int(parts[3]), 0)
            continue  # its process lives: the file may be in use
        except ProcessLookupError:
            pass
        except (ValueError, OSError):  # not a pid, or another user's process
            continue
        try:
            if now - os.stat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone meanwhile, or another user's file (sticky /dev/shm)
            pass
    return removed
