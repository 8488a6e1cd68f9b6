"""Streaming a store's rows in batches: the epoch's order, large contiguous reads, read-ahead in the background.

Order (``EpochPlan``). The store is cut into *chunks*: ``CHUNK_BYTES`` of consecutive rows inside one
shard. Shuffling deals the chunks into *windows* of about ``window_rows`` rows (the memory bound), each
window taking one random chunk from each of as many equal strata of the store (``_stratified_windows``),
so every window samples the whole store evenly. Inside a window the chunks are cut into *pieces* of
``piece_rows`` rows (``batch_size / PIECES_PER_BATCH``, at least ``MIN_PIECE_BYTES``, at most
``batch_size / MIN_PIECES_PER_BATCH``) and the pieces are permuted. Batches are consecutive positions of that order: a store sorted by class gives batches whose
class mix is close to iid, while the disk is still read in whole chunks. Without shuffling the order is
the store's own. Every window's order is a function of (seed, window number) alone, so a stream can start
at any batch.

Reads (``_submit_window``). A window's chunks are read with ``os.preadv`` straight into their places in
the window's buffer (one syscall per contiguous run of the file, scattered over the pieces' slots), in
the store's dtype: the rows are copied once from the page cache, and once more when converted. Under
torchrun (``rank``/``size``) a process reads only the positions of its own share of every global batch
(``distributed.shard`` of each batch): the batches are the same whatever the number of processes.

Read-ahead (``stream``). One thread queues each window's reads in a pool of ``READ_THREADS`` threads that
lives as long as the stream, and queues the next window's reads before the current one is finished
(``READ_AHEAD_WINDOWS``), so reads stay in flight across window ends instead of draining at each; at most
one finished window waits. A second thread cuts windows into batches and converts each (``convert``, e.g.
to a checked float32 tensor) into a bounded queue; the caller only takes finished batches. The threads
spend their time in syscalls and numpy/torch copies, which release the GIL.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VitatlasError

CHUNK_BYTES = 1 << 20  # contiguous bytes read per chunk: large enough for disk speed, small enough to mix
PIECES_PER_BATCH = 1024  # a batch is up to this many runs of consecutive rows (pieces) from distinct chunks
MIN_PIECE_BYTES = 4096  # but pieces of at least this many bytes
MIN_PIECES_PER_BATCH = 8  # and, however narrow the rows, at least this many pieces per batch
PREFETCH_BATCHES = 4  # finished batches waiting in the queue
READ_THREADS = 8  # reads in flight at once (a VM disk serves random 1 MB reads in parallel: 470 MB/s at 1, 700 at 4 here)
MAX_WINDOWS = 4  # window buffers alive at once: being read, waiting, or being cut into batches
READ_AHEAD_WINDOWS = 2  # windows whose reads are queued at once: the next one's reads start before this one ends
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


@dataclass(frozen=True)
class ShardFile:
    path: Path
    offset: int  # bytes before the first row (the .npy header)
    rows: int


@dataclass
class Window:
    """Rows of one window that this process needs, in order: ``parts[b] = (lo, hi)`` rows of ``data``
    hold batch b's positions inside this window."""

    number: int
    data: np.ndarray
    parts: dict[int, tuple[int, int]]
    buffer: np.ndarray | None = None  # the recycled flat buffer ``data`` lives in


class EpochPlan:
    """Where each position of one epoch's order comes from (see the module docstring)."""

    def __init__(self, shards: list[ShardFile], d: int, dtype: np.dtype, batch_size: int, *, shuffle: bool,
                 seed: int, window_rows: int, drop_last: bool = False, chunk_bytes: int | None = None,
                 piece_bytes: int | None = None):
        if batch_size <= 0:
            raise VitatlasError(f"batch size must be positive, got {batch_size}")
        self.shards, self.d, self.dtype = shards, d, np.dtype(dtype)
        self.row_bytes = d * self.dtype.itemsize
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.n_rows = sum(s.rows for s in shards)
        self.n_batches = self.n_rows // batch_size if drop_last else -(-self.n_rows // batch_size)
        self.chunk_rows = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // self.row_bytes)
        starts = [np.arange(0, s.rows, self.chunk_rows, dtype=np.int64) for s in shards]
        empty = np.zeros(0, np.int64)
        self.chunk_shard = np.concatenate([np.full(len(a), i, np.int64) for i, a in enumerate(starts)] or [empty])
        self.chunk_start = np.concatenate(starts or [empty])
        rows = np.array([s.rows for s in shards], np.int64)
        self.chunk_len = np.minimum(self.chunk_rows, rows[self.chunk_shard] - self.chunk_start)
        per_window = max(1, -(-max(window_rows, batch_size) // self.chunk_rows))
        self.windows = _stratified_windows(len(self.chunk_len), per_window, seed) if shuffle else \
            [np.arange(i, min(i + per_window, len(self.chunk_len))) for i in range(0, len(self.chunk_len), per_window)]
        self.window_start = np.cumsum([0] + [int(self.chunk_len[w].sum()) for w in self.windows])
        # without shuffling a whole chunk is one piece; with it, pieces small enough for ~PIECES_PER_BATCH per
        # batch, but at least MIN_PIECE_BYTES (each piece costs a Python-level iovec); with narrow rows 4 KB
        # outgrows a batch (170 rows of 6-d float32), so a batch always gathers MIN_PIECES_PER_BATCH pieces
        least = max(1, (MIN_PIECE_BYTES if piece_bytes is None else piece_bytes) // self.row_bytes)
        self.piece_rows = min(self.chunk_rows, max(least, batch_size // PIECES_PER_BATCH),
                              max(1, batch_size // MIN_PIECES_PER_BATCH)) if shuffle else self.chunk_rows

    def batch_range(self, b: int, rank: int = 0, size: int = 1) -> tuple[int, int]:
        """Positions of batch b in the epoch's order (this rank's share of them when ``size`` > 1)."""
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.n_rows)
        base, extra = divmod(hi - lo, size)  # the same split as distributed.shard
        start = lo + rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def window_of(self, position: int) -> int:
        return int(np.searchsorted(self.window_start, position, side="right")) - 1

    def pieces(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, first row in the shard, rows) of window w's pieces, in the window's order."""
        chunks = self.windows[w]
        lens = self.chunk_len[chunks]
        counts = -(-lens // self.piece_rows)
        chunk_of = np.repeat(np.arange(len(chunks)), counts)
        k = np.arange(len(chunk_of)) - np.repeat(np.cumsum(counts) - counts, counts)  # piece number in its chunk
        start = self.chunk_start[chunks][chunk_of] + k * self.piece_rows
        n = np.minimum(self.piece_rows, lens[chunk_of] - k * self.piece_rows)
        shard = self.chunk_shard[chunks][chunk_of]
        if self.shuffle:
            perm = np.random.default_rng([self.seed, w + 1]).permutation(len(n))
            shard, start, n = shard[perm], start[perm], n[perm]
        return shard, start, n


def _stratified_windows(n_chunks: int, per_window: int, seed: int) -> list[np.ndarray]:
    """Chunk numbers of each window: the store is cut into ``per_window`` strata of consecutive chunks
    and every window takes one random chunk of each stratum, so each window samples the whole store evenly
    (a class-sorted store gives windows with the store's class mix, not a random few classes)."""
    rng = np.random.default_rng(seed)
    n_windows = max(1, -(-n_chunks // per_window))
    grid = np.arange(per_window)[:, None] * n_windows + rng.permuted(np.tile(np.arange(n_windows), (per_window, 1)),
                                                                    axis=1)
    return [col[col < n_chunks] for col in grid.T]


class _PendingWindow:
    """A window whose reads are queued in the I/O pool; ``wait`` hands it over once they are all done."""

    def __init__(self, window: Window, futures: list, fds: dict[int, int]):
        self.window, self.futures, self.fds = window, futures, fds

    def wait(self, counter: list[int] | None = None) -> Window:
        try:
            total = sum(f.result() for f in self.futures)
        finally:
            self.close()
        if counter is not None:
            counter[0] += total
        return self.window

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        for f in self.futures:
            if not f.cancelled():
                f.exception()  # a read in flight still writes into its buffer and uses its file: let it end
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _submit_window(plan: EpochPlan, w: int, batches: range, rank: int, size: int, buffer: np.ndarray | None,
                   pool: ThreadPoolExecutor) -> _PendingWindow:
    """Queue the reads of the positions of window w that belong to ``batches`` (this rank's shares of them),
    into ``buffer`` (flat, in the store's dtype) when it is large enough, in ``pool``, and return at once:
    the reads of the next window queue behind them and the disk never waits at a window's end."""
    ws, we = int(plan.window_start[w]), int(plan.window_start[w + 1])
    first = max(batches.start, ws // plan.batch_size)
    last = min(batches.stop, -(-we // plan.batch_size))
    ranges, parts, total = [], {}, 0
    for b in range(first, last):
        lo, hi = plan.batch_range(b, rank, size)
        lo, hi = max(lo, ws), min(hi, we)
        if hi > lo:
            ranges.append((lo - ws, hi - ws))
            parts[b] = (total, total + hi - lo)
            total += hi - lo
    if buffer is None or buffer.size < total * plan.d:
        buffer = np.empty(total * plan.d, plan.dtype)
    data = buffer[:total * plan.d].reshape(total, plan.d)
    window = Window(w, data, parts, buffer)
    if not total:
        return _PendingWindow(window, [], {})
    shard, start, n = plan.pieces(w)
    pos = np.concatenate([[0], np.cumsum(n)])
    # the slices of pieces that fall in the wanted ranges: (shard, source row, rows, destination row)
    sel_shard, sel_src, sel_n, sel_dst = [], [], [], []
    dst = 0
    for a, z in ranges:
        i, j = int(np.searchsorted(pos, a, side="right")) - 1, int(np.searchsorted(pos, z, side="left"))
        p_lo, p_hi = np.maximum(pos[i:j], a), np.minimum(pos[i + 1:j + 1], z)
        sel_shard.append(shard[i:j])
        sel_src.append(start[i:j] + (p_lo - pos[i:j]))
        sel_n.append(p_hi - p_lo)
        sel_dst.append(dst + np.concatenate([[0], np.cumsum(p_hi - p_lo)[:-1]]))
        dst += z - a
    s_shard, s_src, s_n, s_dst = (np.concatenate(x) for x in (sel_shard, sel_src, sel_n, sel_dst))
    keep = s_n > 0
    s_shard, s_src, s_n, s_dst = s_shard[keep], s_src[keep], s_n[keep], s_dst[keep]
    order = np.lexsort((s_src, s_shard))
    return _queue_runs(plan, data, s_shard[order], s_src[order], s_n[order], s_dst[order], window, pool)


def _queue_runs(plan: EpochPlan, data: np.ndarray, shard, src, n, dst, window: Window,
                pool: ThreadPoolExecutor) -> _PendingWindow:
    """Queue one preadv per run of consecutive source rows, into the slices it fills, in file order; the
    pool's ``READ_THREADS`` threads keep that many reads in flight (a cold SSD serves them in parallel)."""
    rb = plan.row_bytes
    out = memoryview(data.reshape(-1).view(np.uint8))
    # a new run wherever the shard changes or the next slice does not continue the previous one
    breaks = np.flatnonzero((shard[1:] != shard[:-1]) | (src[1:] != src[:-1] + n[:-1])) + 1
    bounds = np.concatenate([[0], breaks, [len(n)]])
    tasks = [(int(shard[c]), c, min(int(bounds[r + 1]), c + _IOV_MAX))
             for r in range(len(bounds) - 1) for c in range(int(bounds[r]), int(bounds[r + 1]), _IOV_MAX)]
    # Python ints up front: a view per piece is the stream's main Python cost (numpy scalars: 15x slower)
    lo, hi, at = (dst * rb).tolist(), ((dst + n) * rb).tolist(), (src * rb).tolist()
    fds: dict[int, int] = {}

    def run(task: tuple[int, int, int]) -> int:
        s, c, stop = task
        f = plan.shards[s]
        views = [out[a:z] for a, z in zip(lo[c:stop], hi[c:stop])]
        want = sum(z - a for a, z in zip(lo[c:stop], hi[c:stop]))
        got = os.preadv(fds[s], views, f.offset + at[c])
        if got != want:
            raise VitatlasError(f"{f.path} is truncated (read {got} of {want} bytes at row {at[c] // rb}); "
                                f"run `vitatlas store verify {f.path.parent}` and re-extract")
        return got

    pending = _PendingWindow(window, [], fds)
    try:
        for s in np.unique(shard):
            fds[int(s)] = _open(plan.shards[int(s)])
        pending.futures = [pool.submit(run, t) for t in tasks]
    except BaseException:
        pending.close()
        raise
    return pending


def _open(f: ShardFile) -> int:
    try:
        return os.open(f.path, os.O_RDONLY)
    except OSError as exc:
        raise VitatlasError(f"cannot read {f.path} ({exc.strerror}): the store is damaged; run "
                            f"`vitatlas store verify {f.path.parent}`") from None


_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def stream(plan: EpochPlan, convert: Callable[[np.ndarray, int, int], object], *, start_batch: int = 0,
           rank: int = 0, size: int = 1, prefetch: int = PREFETCH_BATCHES,
           counter: list[int] | None = None) -> Iterator:
    """``convert(rows, b, first_position)`` of each batch b from ``start_batch`` on (this rank's share of it),
    read and converted ahead in background threads. ``rows`` lives in a recycled window buffer: ``convert``
    must copy what it keeps (any conversion does). ``counter[0]`` accumulates the bytes read."""
    batches = range(max(0, start_batch), plan.n_batches)
    if not len(batches):
        return
    stop = threading.Event()
    windows: queue.Queue = queue.Queue(maxsize=1)
    out: queue.Queue = queue.Queue(maxsize=max(1, prefetch))

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(q: queue.Queue):
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    # window buffers are recycled: a new 128 MB buffer per window costs its page faults (~30% of a cached read)
    free: queue.Queue = queue.Queue()
    capacity = int(np.diff(plan.window_start).max()) * plan.d
    allocated = 0

    def reader():
        nonlocal allocated
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="vitatlas-io")
        pending: deque[_PendingWindow] = deque()  # windows whose reads are queued, oldest first

        def deliver() -> bool:
            return put(windows, pending.popleft().wait(counter))

        try:
            first = plan.window_of(plan.batch_range(batches.start)[0])
            last = plan.window_of(plan.batch_range(batches.stop - 1)[1] - 1)
            for w in range(first, last + 1):
                try:
                    buffer = free.get_nowait()
                except queue.Empty:
                    buffer = None
                if buffer is None and allocated < MAX_WINDOWS:
                    buffer, allocated = np.empty(capacity, plan.dtype), allocated + 1
                if buffer is None:
                    while pending:  # hand over what is read before waiting for a buffer the caller frees
                        if not deliver():
                            return
                    buffer = get(free)
                    if buffer is _DONE:
                        return
                pending.append(_submit_window(plan, w, batches, rank, size, buffer, pool))
                # the next window's reads are queued behind this one's before this one is handed over
                while len(pending) > READ_AHEAD_WINDOWS:
                    if not deliver():
                        return
            while pending:
                if not deliver():
                    return
            put(windows, _DONE)
        except BaseException as exc:  # handed to the caller, who re-raises it
            put(windows, _Failed(exc))
        finally:
            for p in pending:
                p.close()
            pool.shutdown(wait=True, cancel_futures=True)

    def assembler():
        try:
            held: list[Window] = []
            for b in batches:
                lo, hi = plan.batch_range(b, rank, size)
                need = plan.window_of(max(hi - 1, lo, 0))
                while not held or held[-1].number < need:
                    item = get(windows)
                    if item is _DONE or isinstance(item, _Failed):
                        if isinstance(item, _Failed):
                            put(out, item)
                        return
                    held.append(item)
                for h in held[:-1]:
                    if not any(k >= b for k in h.parts):
                        free.put(h.buffer)  # back to the reader
                held = [h for h in held if h is held[-1] or any(k >= b for k in h.parts)]
                pieces = [h.data[h.parts[b][0]:h.parts[b][1]] for h in held if b in h.parts]
                rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces \
                    else np.empty((0, plan.d), plan.dtype)
                if not put(out, convert(rows, b, lo)):
                    return
            put(out, _DONE)
        except BaseException as exc:
            put(out, _Failed(exc))

    threads = [threading.Thread(target=reader, name="vitatlas-read", daemon=True),
               threading.Thread(target=assembler, name="vitatlas-batches", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


def drop_cache(paths) -> None:
    """Ask the kernel to drop the page cache of ``paths`` (for cold-cache measurements; Linux)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
