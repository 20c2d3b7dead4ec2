"""The copy engine: extents in, bytes out. Resumable, throttled, no Temporal and no OpenStack.

Connections (a source handle and a writer each, 4 for large copies) are driven by THREADS
threads, each polling its share; a connection keeps a window of libnbd AIO reads over pieces
handed out in ascending order, topped up in bursts (REFILL_AT). A piece counts as done once
written, and ``offset`` is the end of the longest run of done pieces from the start, so
everything below it is on the target and a restart resumes exactly there. Zero extents are never read; on a fresh target they are not written
either, and data chunks that turn out to be all zeroes are skipped the same way. The target's
writeback starts while the copy runs (background NBD flushes, sync_file_range), so the flush that
ends a copy waits for the tail only. Buffers come from one pool per process with one budget
(see _Buf for why they are never freed).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count, islice

import nbd

from activities.transport.nbd import Extent, grow_own_send_buffer
from activities.transport.nbd import close as transport_close
from xms.errors import TargetOutOfSpace, TransientIOError
from xms.models import MiB, TargetEndpoint

CHUNK = 4 * MiB  # checksum chunk, and the largest request (QEMU's NBD server refuses > 32 MiB)
FILE_PIECE = 1 * MiB  # checksum_file's reads (a chunk's digest is fed piece by piece)
REQUEST = 512 * 1024  # copy request size (benchmarks/: 512 KiB x 64 in flight beat 1 MiB x 32 and 256 KiB x 128)
# to an NBD target, whose server reads each write before it takes the next: 256 KiB (NBD to NBD
# with our send buffer grown, benchmarks/: 604-616 MiB/s, 443 with 512 KiB, 518 with 128 KiB;
# file targets are faster with 512: a 4 GiB qcow2 1.75 s against 1.91)
REQUEST_NBD = 256 * 1024
DEPTH = 64  # requests in flight, over all connections
# a connection tops its reads up once half its window is free, in one burst, not one read per reply:
# the server then wakes once per burst. Read by read, a copy slower than its server (an
# incremental sync's scattered 64 KiB blocks, each also written) woke the server for every
# request, a context switch and a cross-CPU wake-up on both sides each time: per sync 16325 ->
# 6217 context switches, CPU -24 %, time -24 % (benchmarks/, qemu-nbd source).
REFILL_AT = 2  # 1/REFILL_AT of the window free
CONNECTIONS = 4
THREADS = 2  # threads driving the connections (each polls its share): one per core here
DRAIN_TIMEOUT_S = 120.0  # after an error, how long a connection waits for its outstanding replies
BUFFER_BUDGET = 96 * MiB  # copy and checksum buffers of a whole worker, shared (XMS_COPY_BUFFER_MIB)
# the target's writeback starts during the copy, so the flush that ends it waits for the tail only:
NBD_FLUSH_EVERY = 128 * MiB  # a background flush per connection (each is a full fdatasync on the server)
FILE_WRITEBACK_EVERY = 4 * MiB  # sync_file_range per writer, in its own thread (see FileWriter)
FILE_KEEP_CACHED = 32 * MiB  # per writer: 32-64 MiB of what it wrote last stays cached, older ranges are dropped
READ_RETRIES = 4  # a source read that fails (EIO from a flaky disk) is tried again this often, at once
ZEROES = bytes(CHUNK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 0x02
_SYNC_FILE_RANGE_WAIT_ALL = 0x01 | 0x02 | 0x04  # WAIT_BEFORE | WRITE | WAIT_AFTER
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


# --------------------------------------------------------------------------- writers


class FileWriter:
    """Raw file or block device on this host (local store volumes, os-brick attachments).

    Every FILE_WRITEBACK_EVERY bytes written, a thread of the writer's own starts writeback of the
    range written since (sync_file_range): submitting that I/O is CPU work (the page walk, the
    block layer), which inline held up the copy's reads; in its own thread (ctypes releases the
    GIL) it runs on the other core while the copy goes on, and the final fdatasync waits for the
    tail only. Drop-behind, as nbdcopy does: once more than twice FILE_KEEP_CACHED has been written
    back, the oldest ranges are waited for and dropped from the page cache (POSIX_FADV_DONTNEED)
    down to FILE_KEEP_CACHED, and fdatasync ends the same way (then sweeps the whole dropped span
    once more for pages that were busy when their range went), so a copy leaves at most 64 MiB per
    writer of the target cached. Nobody on this host reads a migrated disk back soon; a copy that
    kept it all took a fresh page for every byte it wrote and pushed out what the host does use. In a VM with free page reporting
    (virtio-balloon, as here) every fresh page is a fault in the hypervisor: a 2 GiB copy into a
    file took ~3x as long as with drop-behind, whose dropped pages the next writes reuse. Small
    copies (an incremental sync of a few dozen MiB) drop nothing and pay nothing for it."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.unstarted = 0  # bytes written since writeback was last asked for
        self.lo, self.hi = 1 << 63, 0  # the range they lie in
        self.ranges: deque[tuple[int, int, int]] = deque()  # for the thread: (lo, hi, bytes) to write back
        self.behind: deque[tuple[int, int, int]] = deque()  # written back, still cached: oldest first
        self.cached = 0  # bytes in ``behind``
        self.dropped = (1 << 63, 0)  # the span of every range dropped so far
        self.lock = threading.Lock()  # ranges move to ``behind`` and out under it (the thread, flush)
        self.kick = threading.Event()
        self.closing = False
        self.writeback: threading.Thread | None = None  # started with the first request

    def write(self, offset: int, data: bytearray | memoryview) -> None:
        n = os.pwrite(self.fd, data, offset)
        if n < len(data):  # a short write: the rest
            rest = memoryview(data)[n:]
            while rest:
                n = os.pwrite(self.fd, rest, offset + len(data) - len(rest))
                rest = rest[n:]
        self.unstarted += len(data)
        self.lo, self.hi = min(self.lo, offset), max(self.hi, offset + len(data))
        if self.unstarted >= FILE_WRITEBACK_EVERY:
            self._queue()
            if self.writeback is None:
                self.writeback = threading.Thread(target=self._write_back, name="xms-writeback", daemon=True)
                self.writeback.start()
            self.kick.set()

    def _queue(self) -> None:
        self.ranges.append((self.lo, self.hi, self.unstarted))
        self.unstarted, self.lo, self.hi = 0, 1 << 63, 0

    def _write_back(self) -> None:
        while True:
            self.kick.wait()
            self.kick.clear()
            if self.closing:
                return
            self._settle(start=True)

    def _settle(self, start: bool) -> None:
        """Start writeback of the queued ranges (``start``; after fdatasync they are on disk), then
        drop the oldest from the page cache once more than twice FILE_KEEP_CACHED is, down to
        FILE_KEEP_CACHED: wait for their writeback (started a while ago, so mostly done), then
        POSIX_FADV_DONTNEED."""
        with self.lock:
            while self.ranges:
                lo, hi, n = self.ranges.popleft()
                if start:
                    _libc.sync_file_range(self.fd, ctypes.c_long(lo), ctypes.c_long(hi - lo), _SYNC_FILE_RANGE_WRITE)
                self.behind.append((lo, hi, n))
                self.cached += n
            if self.cached <= 2 * FILE_KEEP_CACHED:  # dropping is costly (it drains every CPU's
                return                                # page lists): in batches of FILE_KEEP_CACHED
            lo, hi = 1 << 63, 0
            while self.cached > FILE_KEEP_CACHED:
                a, b, n = self.behind.popleft()
                self.cached -= n
                lo, hi = min(lo, a), max(hi, b)
            if hi:
                _libc.sync_file_range(self.fd, ctypes.c_long(lo), ctypes.c_long(hi - lo), _SYNC_FILE_RANGE_WAIT_ALL)
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                self.dropped = (min(lo, self.dropped[0]), max(hi, self.dropped[1]))

    def zero(self, offset: int, length: int) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
        for pos in range(offset, offset + length, CHUNK):  # no hole punching here: write zeroes
            self.write(pos, memoryview(ZEROES)[: min(CHUNK, offset + length - pos)])

    def flush(self) -> None:
        os.fdatasync(self.fd)  # the size never changes: the data and the block map are what matter
        if self.unstarted:
            self._queue()
        self._settle(start=False)  # at most 2 x FILE_KEEP_CACHED of it stays cached
        lo, hi = self.dropped
        if hi:  # a page busy when its range was dropped (~1 run in 10) stayed: all are clean now
            os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.writeback is not None:  # it must not touch the fd once closed (or reused)
            self.closing = True
            self.kick.set()
            self.writeback.join()
        os.close(self.fd)


class NbdWriter:
    """An NBD export (encrypted local volumes served by qemu-nbd, remote targets)."""

    def __init__(self, uri: str):
        self.h = nbd.NBD()
        try:
            self.h.connect_uri(uri)
        except nbd.Error as e:
            raise TransientIOError(f"cannot open target {uri}: {e.string or e}") from None
        grow_own_send_buffer(self.h)  # writes go out whole

    def write(self, offset: int, data: memoryview) -> None:
        self.h.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        for pos in range(offset, offset + length, 1 << 30):
            self.h.zero(min(1 << 30, offset + length - pos), pos)

    def flush(self) -> None:
        if self.h.can_flush():
            self.h.flush()

    def close(self) -> None:
        transport_close(self.h)


Writer = FileWriter | NbdWriter


def open_writer(target: TargetEndpoint) -> Writer:
    return FileWriter(target.path) if target.kind == "file" else NbdWriter(target.uri)


# --------------------------------------------------------------------------- throttling


class Throttle:
    """Token buckets for write bandwidth and IOPS (a volume type's QoS); 0 = unlimited."""

    def __init__(self, bytes_per_sec: int = 0, iops: int = 0, burst_s: float = 0.25):
        self.bps, self.iops, self.burst_s = bytes_per_sec, iops, burst_s
        self.t0 = time.monotonic()
        self.bytes = 0
        self.ops = 0
        self.lock = threading.Lock()

    def acquire(self, nbytes: int) -> None:
        if not (self.bps or self.iops):
            return
        with self.lock:  # shared by the copy's connections
            self.bytes += nbytes
            self.ops += 1
            due = max(
                self.bytes / self.bps if self.bps else 0.0,
                self.ops / self.iops if self.iops else 0.0,
            )
        wait = due - (time.monotonic() - self.t0) - self.burst_s
        if wait > 0:
            time.sleep(wait)  # rate limiting, not synchronisation


# --------------------------------------------------------------------------- copy


@dataclass
class CopyStats:
    offset: int  # resume point: everything below is on the target
    end: int
    started_from: int
    bytes_read: int = 0
    bytes_written: int = 0
    zero_bytes_skipped: int = 0
    zero_bytes_written: int = 0
    read_retries: int = 0  # failed source reads that were issued again
    data_bytes_total: int = 0  # data bytes in [started_from, end)
    t0: float = field(default_factory=time.monotonic)
    t1: float | None = None  # when the copy ended

    @property
    def elapsed(self) -> float:
        return max((self.t1 or time.monotonic()) - self.t0, 1e-9)

    @property
    def throughput(self) -> float:
        return self.bytes_read / self.elapsed

    @property
    def eta_s(self) -> float | None:
        left = self.data_bytes_total - self.bytes_read
        return left / self.throughput if self.throughput > 0 else None


def split(extents: Iterable[Extent], chunk: int = CHUNK) -> Iterable[Extent]:
    """Data extents cut at chunk-aligned boundaries (so requests stay small and aligned)."""
    for e in extents:
        if e.zero or e.start // chunk == (e.end - 1) // chunk:  # within one chunk: as it is
            yield e
            continue
        pos = e.start
        while pos < e.end:
            nxt = min(e.end, (pos // chunk + 1) * chunk)
            yield Extent(pos, nxt - pos, False)
            pos = nxt


class Stopped(Exception):
    """The caller asked the copy to stop (cancellation); progress so far is valid."""


class _Tracker:
    """Hands out pieces in ascending order to the connections and keeps the resume offset: the end
    of the longest run of pieces, from the first, that are all on the target."""

    def __init__(self, plan: list[Extent], stats: CopyStats, request: int = REQUEST):
        self.pieces = iter(split(plan, request))
        self.stats = stats
        self.lock = threading.Lock()
        self.issued = 0
        self.ends: dict[int, int] = {}
        self.finished: set[int] = set()
        self.next = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def take(self, n: int) -> list[tuple[int, Extent]]:
        """Up to ``n`` pieces, numbered; none once there are no more or the copy is stopped."""
        with self.lock:
            if self.stop.is_set():
                return []
            got = list(zip(count(self.issued), islice(self.pieces, n)))
            self.issued += len(got)
            self.ends.update((seq, e.end) for seq, e in got)
            return got

    def finish(self, seqs: Iterable[int], read: int = 0, written: int = 0, skipped: int = 0, zeroed: int = 0) -> None:
        """Pieces ``seqs`` are on the target (the byte counts are their sums)."""
        with self.lock:
            st = self.stats
            st.bytes_read += read
            st.bytes_written += written
            st.zero_bytes_skipped += skipped
            st.zero_bytes_written += zeroed
            self.finished.update(seqs)
            while self.next in self.finished:
                self.finished.remove(self.next)
                st.offset = self.ends.pop(self.next)
                self.next += 1


def _wait(handles: list[nbd.NBD]) -> None:
    """Block until one of the handles can make progress, then let it: libnbd reads the replies
    and runs the completion callbacks of the commands they finish, in this thread."""
    poller, by_fd = select.poll(), {}
    for h in handles:
        d = h.aio_get_direction()
        ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
        if ev:
            fd = h.aio_get_fd()
            poller.register(fd, ev)
            by_fd[fd] = h
    for fd, rev in poller.poll(1000):
        h = by_fd[fd]
        if rev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        elif rev & select.POLLOUT:
            h.aio_notify_write()


_ZERO_BUFFERS: dict[int, bytes] = {}


def _is_zero(buf: bytearray, n: int) -> bool:
    # bytearray == bytes is a memcmp; a memoryview comparison would walk element by element
    if n == len(buf):  # buffers come in a handful of sizes (_buffer_size)
        z = _ZERO_BUFFERS.get(n) or _ZERO_BUFFERS.setdefault(n, bytes(n))
        return buf == z
    return buf[:n] == ZEROES[:n]


def _retry_read(h: nbd.NBD, tries: int) -> bool:
    """Whether a failed read is worth issuing again: the server answered with an error (a flaky
    disk) and the connection still works; a dead connection fails the copy (and the attempt)."""
    return tries < READ_RETRIES and not (h.aio_is_dead() or h.aio_is_closed())


class _Buf:
    """A copy buffer and the nbd.Buffer views of it that requests use, one per length.

    libnbd 1.14's Python bindings (Debian bookworm's python3-libnbd) take a reference to the object
    behind every nbd.Buffer passed to aio_pread/aio_pwrite and never drop it: a fresh view per
    request leaks the view and keeps its buffer alive forever (measured: a worker that verified 8
    disks grew to 8 GiB). So views are made once per (buffer, length) and reused, and buffers live
    in a process-wide pool (_POOL) instead of being dropped after each copy: the leak is a
    reference count that grows, not memory."""

    __slots__ = ("data", "views")

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.views: dict[int, nbd.Buffer] = {}

    def __len__(self) -> int:
        return len(self.data)

    def view(self, n: int) -> nbd.Buffer:
        v = self.views.get(n)
        if v is None:
            v = self.views[n] = nbd.Buffer.from_buffer(self.data if n == len(self.data) else memoryview(self.data)[:n])
        return v


def _fitting(by_size: dict[int, list[_Buf]], size: int) -> list[_Buf] | None:
    """The non-empty list of the smallest size class >= ``size``. The pieces of a copy mostly
    share one size class: usually the first lookup, without sorting."""
    return by_size.get(size) or next((by_size[s] for s in sorted(by_size) if s > size and by_size[s]), None)


class _Pool:
    """The buffers of the process, idle ones by size, within a budget: concurrent copies and
    checksums share it, each keeping fewer requests in flight when many run, so a worker's memory
    does not grow with the number of migrations it runs at once."""

    def __init__(self, budget: int):
        self.lock = threading.Lock()
        self.budget = budget
        self.total = 0  # bytes of every buffer made (they are never freed: see _Buf)
        self.idle: dict[int, list[_Buf]] = {}
        self.users = 0  # copy connections running (counted by _drive)

    def count_users(self, n: int) -> None:
        with self.lock:
            self.users += n

    def share(self, size: int) -> int:
        """How many buffers of ``size`` one copy connection may hold: its part of the budget.
        Without it the first copies to start took buffers up to their whole window and those
        starting later, finding none idle, made new ones beyond the budget (a connection with
        nothing in flight always gets one): with 8 migrations at once the pool grew by ~9 MiB
        with every batch (96 -> 144 MiB over six), towards every window's worth (256 MiB)."""
        return max(2, self.budget // (size * max(1, self.users)))

    def get(self, size: int, must: bool = False) -> _Buf | None:
        """An idle buffer of at least ``size`` bytes (the smallest), or a new one if the budget
        allows; None if not. ``must``: the caller has nothing in flight that would give one back,
        so it gets a buffer even beyond the budget (every copy always makes progress)."""
        with self.lock:
            fits = _fitting(self.idle, size)
            if fits:
                return fits.pop()
            if self.total + size > self.budget and not must:
                return None
            self.total += size
        return _Buf(size)

    def put(self, bufs: Iterable[_Buf]) -> None:
        with self.lock:
            for b in bufs:
                self.idle.setdefault(len(b), []).append(b)

    def idle_bytes(self) -> int:
        with self.lock:
            return sum(len(b) for bs in self.idle.values() for b in bs)


_POOL = _Pool(BUFFER_BUDGET)


def set_buffer_budget(nbytes: int) -> None:
    """The budget of this process's copy and checksum buffers (a worker's XMS_COPY_BUFFER_MIB)."""
    with _POOL.lock:
        _POOL.budget = nbytes


def _idle(handles: Iterable[nbd.NBD]) -> bool:
    """No command of these handles can still touch a buffer (a dead handle has none in flight)."""
    try:
        return all(h.aio_in_flight() == 0 for h in handles)
    except nbd.Error:
        return True


def _buffer_size(n: int) -> int:
    """Buffers come in powers of two from 64 KiB up: an incremental sync of scattered 64 KiB
    blocks allocates (and touches) 64 KiB buffers, not request-sized ones."""
    return 1 << max(16, (n - 1).bit_length())


_READ, _WRITE, _FLUSH = 0, 1, 2


class _Conn:
    """One connection: a source handle and a writer with up to ``depth`` pieces in flight, each
    read (AIO) then written (AIO for NBD targets, pwrite for files). libnbd reports finished
    commands through completion callbacks, which run inside ``aio_notify_*`` in the driving thread
    and only queue the event, so nothing scans the commands in flight. Pieces finish in any
    order; the tracker keeps the offset exact. A read the server fails is issued again up to
    READ_RETRIES times before the copy fails."""

    def __init__(self, src: nbd.NBD, writer: Writer, t: _Tracker, *, fresh: bool, throttle: Throttle, depth: int):
        self.src, self.writer, self.t = src, writer, t
        self.fresh, self.throttle, self.depth = fresh, throttle, depth
        self.dst = writer.h if isinstance(writer, NbdWriter) else None
        self.handles = [src] if self.dst is None else [src, self.dst]
        self.held: list[_Buf] = []  # from _POOL on demand, at most ``depth``, sized to the pieces
        self.free: dict[int, list[_Buf]] = {}  # of the held ones, those not in use, by size
        self.in_flight = 0
        self.events: deque[tuple[int, int, Extent, _Buf, int, int]] = deque()  # kind, seq, e, buf, tries, errno
        self.more = True
        self.taken: deque[tuple[int, Extent]] = deque()  # pieces taken, not yet issued (waiting for a buffer)
        self.burst = max(1, depth // REFILL_AT)
        self.unflushed = 0  # bytes written to an NBD target since its last flush was issued
        self.flushing = False
        self.can_flush = self.dst is not None and bool(self.dst.can_flush())

    @property
    def finished(self) -> bool:
        return not self.more and not self.in_flight and not self.events and not self.taken

    def _buffer(self, n: int) -> _Buf | None:
        """A buffer for ``n`` bytes, or None: wait until one of this connection's comes back."""
        size = _buffer_size(n)
        fits = _fitting(self.free, size)
        if fits:
            return fits.pop()
        if self.in_flight and len(self.held) >= _POOL.share(size):
            return None  # our part of the budget is out: one of ours comes back first
        idle = [s for s, bs in self.free.items() if bs]
        if idle and (len(self.held) >= self.depth or self.in_flight == 0):
            small = self.free[min(idle)].pop()  # too small for this piece: swap it for a bigger one
            self.held.remove(small)
            _POOL.put([small])
        b = _POOL.get(size, must=self.in_flight == 0)
        if b is not None:
            self.held.append(b)
        return b

    def release(self) -> None:
        """Give the buffers back to the pool, unless a command may still use one (a connection
        that did not drain in time keeps them)."""
        if _idle(self.handles):
            _POOL.put(self.held)
        self.held, self.free = [], {}

    def _done_with(self, buf: _Buf) -> None:
        """A buffer no command uses any more: kept for our next piece, or given back to the pool
        when we hold more than our share (another copy started since we took it)."""
        if len(self.held) > _POOL.share(len(buf)):
            self.held.remove(buf)
            _POOL.put([buf])
        else:
            self.free.setdefault(len(buf), []).append(buf)

    def _read(self, seq: int, e: Extent, buf: _Buf, tries: int) -> None:
        def done(err, ev=self.events) -> int:
            ev.append((_READ, seq, e, buf, tries, err.value))
            return 1  # retire the command: its result is in the event

        self.src.aio_pread(buf.view(e.length), e.start, completion=done)
        self.in_flight += 1

    def _write(self, seq: int, e: Extent, buf: _Buf) -> None:
        def done(err, ev=self.events) -> int:
            ev.append((_WRITE, seq, e, buf, 0, err.value))
            return 1

        self.dst.aio_pwrite(buf.view(e.length), e.start, completion=done)
        self.in_flight += 1

    def _flush(self) -> None:
        """A flush in the background, every NBD_FLUSH_EVERY bytes: the server writes back what it
        holds while the copy goes on (writes are not held up), so the flush that ends the copy
        waits for the tail only, not for the whole disk."""
        def done(err, ev=self.events) -> int:
            ev.append((_FLUSH, -1, None, None, 0, err.value))
            return 1

        self.dst.aio_flush(completion=done)
        self.unflushed, self.flushing = 0, True
        self.in_flight += 1

    def fill(self) -> None:
        if self.in_flight > self.depth - self.burst:  # not yet: in one burst, once half the window is free
            return
        t, taken = self.t, self.taken
        if t.stop.is_set():  # stopped (cancelled, or another connection failed): nothing more goes out
            taken.clear()
            self.more = False
            return
        while self.in_flight < self.depth:
            if not taken:
                if self.more:  # as many as there are free slots: one lock for them all
                    taken.extend(t.take(self.depth - self.in_flight))
                if not taken:
                    self.more = False
                    return
            seq, e = taken[0]
            if e.zero:
                taken.popleft()
                if self.fresh:
                    t.finish((seq,))
                else:
                    self.throttle.acquire(0)
                    self.writer.zero(e.start, e.length)
                    t.finish((seq,), zeroed=e.length)
                continue
            buf = self._buffer(e.length)
            if buf is None:  # the worker's buffer budget is spent: one of ours comes back first
                return
            taken.popleft()
            self._read(seq, e, buf, 0)

    def handle_events(self) -> None:
        """The queued events, then one report to the tracker of the pieces they finished (also
        when one of them fails the copy: those before it are on the target)."""
        events = self.events
        done: list[int] = []
        read = written = skipped = zeroed = 0
        try:
            while events:
                kind, seq, e, buf, tries, err = events.popleft()
                self.in_flight -= 1
                if kind == _FLUSH:
                    if err:
                        raise nbd.Error(f"flush failed: {os.strerror(err)}", err)
                    self.flushing = False
                    continue
                n = e.length
                if kind == _WRITE:
                    if err:
                        raise nbd.Error(f"write at offset {e.start} failed: {os.strerror(err)}", err)
                    done.append(seq)
                    read += n
                    written += n
                    self._done_with(buf)
                    self.unflushed += n
                    if self.unflushed >= NBD_FLUSH_EVERY and self.can_flush and not self.flushing:
                        self._flush()
                    continue
                if err:  # the server failed the read: issue it again, or give up
                    if not _retry_read(self.src, tries):
                        raise nbd.Error(f"read at offset {e.start} failed: {os.strerror(err)}", err)
                    with self.t.lock:
                        self.t.stats.read_retries += 1
                    self._read(seq, e, buf, tries + 1)
                    continue
                data = buf.data
                if _is_zero(data, n):
                    if not self.fresh:
                        self.writer.zero(e.start, n)
                        zeroed += n
                    else:
                        skipped += n
                    done.append(seq)
                    read += n
                    self._done_with(buf)
                    continue
                self.throttle.acquire(n)
                if self.dst is not None:
                    self._write(seq, e, buf)
                    continue
                self.writer.write(e.start, data if n == len(data) else memoryview(data)[:n])
                done.append(seq)
                read += n
                written += n
                self._done_with(buf)
        finally:
            if done:
                self.t.finish(done, read, written, skipped, zeroed)


def _drive(conns: list[_Conn], t: _Tracker) -> None:
    """Run connections to the end in this thread: one poll over all their sockets."""
    _POOL.count_users(len(conns))  # their share of the buffer budget shrinks while these run
    try:
        for c in conns:
            c.fill()
        live = [c for c in conns if not c.finished]
        while live:
            if not any(c.events for c in live):
                handles = [h for c in live for h in c.handles]
                if len(handles) == 1:  # libnbd's own poll: no poll object to build per wake-up
                    handles[0].poll(1000)
                else:
                    _wait(handles)
            for c in live:
                c.handle_events()
                c.fill()
            live = [c for c in live if not c.finished]
        for c in conns:
            c.writer.flush()
    except BaseException as exc:  # noqa: BLE001 - the first error stops every connection
        with t.lock:
            t.error = t.error or exc
        t.stop.set()
    finally:  # never free a buffer libnbd may still use
        _POOL.count_users(-len(conns))
        for c in conns:
            for h in c.handles:
                _drain(h)
            c.release()


def _drain(h: nbd.NBD, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Wait (bounded) until no command of ``h`` awaits the server's reply. Not cookie by cookie:
    aio_command_completed answers False for a cookie it already retired (a read that failed
    while others were checked), and polling for that one would block forever."""
    deadline = time.monotonic() + timeout
    try:
        while h.aio_in_flight() > 0 and time.monotonic() < deadline:
            h.poll(1000)
    except nbd.Error:
        pass  # the connection is dead: nothing is in flight any more


def copy(
    src: nbd.NBD,
    plan: list[Extent],
    writer: Writer,
    *,
    fresh: bool,
    throttle: Throttle | None = None,
    on_progress: Callable[[CopyStats], None] = lambda s: None,
    should_stop: Callable[[], bool] = lambda: False,
    progress_interval: float = 0.5,
    depth: int = DEPTH,
    more: list[tuple[nbd.NBD, Writer]] = (),
    threads: int = THREADS,
    request: int | None = None,
) -> CopyStats:
    """Copy ``plan`` (extents in ascending order) from ``src`` to ``writer``; ``more`` adds
    connections (source handle, writer) that share the work. Progress reports and ``should_stop``
    run in the calling thread (the activity's own, so it can heartbeat). Requests are ``request``
    bytes at most: by default REQUEST_NBD to an NBD target, REQUEST to a file."""
    request = request or (REQUEST_NBD if isinstance(writer, NbdWriter) else REQUEST)
    start = plan[0].start if plan else 0
    stats = CopyStats(offset=start, end=plan[-1].end if plan else 0, started_from=start)
    stats.data_bytes_total = sum(e.length for e in plan if not e.zero)
    throttle = throttle or Throttle()
    t = _Tracker(plan, stats, request)
    pairs = [(src, writer), *more]
    per = max(2, depth // len(pairs))
    conns = [_Conn(s, w, t, fresh=fresh, throttle=throttle, depth=per) for s, w in pairs]
    n = max(1, min(threads, len(conns)))
    threads_ = [threading.Thread(target=_drive, args=(conns[i::n], t), name=f"xms-copy-{i}", daemon=True)
                for i in range(n)]
    for th in threads_:
        th.start()
    stopped = False
    while any(th.is_alive() for th in threads_):
        _join_all(threads_, progress_interval)
        on_progress(stats)
        if not stopped and should_stop():
            stopped = True
            t.stop.set()
    for th in threads_:
        th.join()
    if t.error is not None:
        if _out_of_space(t.error):
            raise TargetOutOfSpace(
                f"the target ran out of space (No space left on device) writing near offset {stats.offset} of "
                f"{stats.end}; free space on its backend or choose another volume type") from None
        if isinstance(t.error, nbd.Error):
            raise TransientIOError(f"I/O error near offset {stats.offset}: {t.error.string or t.error}") from None
        raise t.error
    if stopped and stats.offset < stats.end:
        raise Stopped(f"stopped at offset {stats.offset}")
    stats.t1 = time.monotonic()
    on_progress(stats)
    return stats


def _out_of_space(e: BaseException) -> bool:
    """ENOSPC or EDQUOT from a file target (OSError) or an NBD target (nbd.Error carries errnum)."""
    code = e.errnum if isinstance(e, nbd.Error) else getattr(e, "errno", None) if isinstance(e, OSError) else None
    return code in (errno.ENOSPC, errno.EDQUOT)


def connections_for(data_bytes: int) -> int:
    """Extra connections pay off only for larger copies (each may start a qemu-nbd)."""
    return CONNECTIONS if data_bytes > 256 * MiB else 1


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    """Wait until every thread has ended, or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- checksums


def reads_as_zero(h: nbd.NBD, extents: Iterable[Extent]) -> bool:
    """True if every byte of the extents is zero (zero extents are trusted, data extents are read)."""
    for e in (e for e in extents if not e.zero):
        for pos in range(e.start, e.end, CHUNK):
            n = min(CHUNK, e.end - pos)
            if h.pread(n, pos) != ZEROES[:n]:
                return False
    return True



def checksum(
    h: nbd.NBD, length: int, extents: Iterable[Extent], depth: int = 8,
    on_progress: Callable[[int], None] = lambda done: None, progress_every: int = 64,
) -> str:
    """sha256 over the sha256 of each 4 MiB chunk of [0, length): independent of layout, and
    chunks that lie wholly in zero extents are not read (their digest is precomputed)."""
    zero_digest = hashlib.sha256(ZEROES).digest()
    zero_chunks: set[int] = set()
    for e in extents:
        if e.zero:
            first = -(-e.start // CHUNK)
            last = min(e.end, length) // CHUNK
            zero_chunks.update(range(first, last))
    n = -(-length // CHUNK)
    out = hashlib.sha256()
    pending: deque[tuple[int, _Buf | None, int]] = deque()
    nxt = reads = 0
    bufs: list[_Buf] = []  # from _POOL; back to it when no read is in flight
    free: list[_Buf] = []

    def issue() -> None:  # up to ``depth`` reads in flight; zero chunks between them cost no slot
        nonlocal nxt, reads
        while nxt < n and reads < depth:
            i = nxt
            size = min(CHUNK, length - i * CHUNK)
            if i in zero_chunks and size == CHUNK:
                pending.append((i, None, 0))
                nxt += 1
                continue
            if not free:
                b = _POOL.get(CHUNK, must=reads == 0)
                if b is None:  # the worker's buffer budget is spent: wait for a read of ours
                    return
                bufs.append(b)
                free.append(b)
            nxt += 1
            buf = free.pop()
            pending.append((i, buf, h.aio_pread(buf.view(size), i * CHUNK)))
            reads += 1

    try:
        issue()
        while pending:
            i, buf, cookie = pending[0]
            if cookie:
                tries = 0
                while True:
                    try:
                        while not h.aio_command_completed(cookie):
                            h.poll(-1)
                        break
                    except nbd.Error:  # failed and retired: read that chunk again, or give up
                        if not _retry_read(h, tries):
                            raise
                        size = min(CHUNK, length - i * CHUNK)
                        cookie, tries = h.aio_pread(buf.view(size), i * CHUNK), tries + 1
                reads -= 1
            pending.popleft()
            if cookie:
                out.update(hashlib.sha256(memoryview(buf.data)[: min(CHUNK, length - i * CHUNK)]).digest())
                free.append(buf)
            else:
                out.update(zero_digest)
            if i % progress_every == 0:
                on_progress(i * CHUNK)
            issue()
    except nbd.Error as e:
        raise TransientIOError(f"checksum read failed: {e.string or e}") from None
    finally:
        if _idle([h]):
            _POOL.put(bufs)
    return out.hexdigest()


def _data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [start, end) a file holds data in (SEEK_DATA/SEEK_HOLE; all of it where the
    file system cannot tell, as on a block device)."""
    out, pos = [], start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from pos on
                break
            return [(start, end)]
        if a >= end:
            break
        b = min(end, os.lseek(fd, a, os.SEEK_HOLE))
        out.append((a, b))
        pos = b
    return out


def checksum_file(path: str, length: int, on_progress: Callable[[int], None] = lambda done: None,
                  progress_every: int = 64) -> str:
    """checksum() of a raw file or block device on this host, read directly instead of through an
    NBD server: the same digest at half the CPU (a 1 GiB disk with 512 MiB of data: 0.46-0.58
    CPU-s against 1.0-1.15 through a private qemu-nbd, as fast cached or not, benchmarks/):
    qemu-nbd's own read and the socket's two copies are gone. Only data is read: holes
    (SEEK_DATA/SEEK_HOLE) are zeroes filled in here, and the kernel's readahead is off (it ran on
    into the holes, and every page it read there had to be zeroed: with 8 migrations verifying at
    once that was 19 % of the host's CPU); instead the next chunk's data is asked for
    (WILLNEED) while this one is hashed."""
    zero_digest = hashlib.sha256(ZEROES).digest()
    out = hashlib.sha256()
    # Its own 1 MiB anonymous mapping, unmapped on return: no libnbd call sees it, so it need
    # not live in _POOL (whose buffers are never freed; see _Buf). A 4 MiB chunk from the pool,
    # beyond its budget, left 4 MiB buffers there after 16 checksums at once (8 migrations) that
    # the next copies took for their small pieces: a worker grew by ~30 MiB with every batch.
    buf = mmap.mmap(-1, FILE_PIECE)
    view, zeroes = memoryview(buf), memoryview(ZEROES)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            data = _data_ranges(fd, 0, length)
            ends = [y for _, y in data]
            chunks = -(-length // CHUNK)

            def pieces(i: int) -> list[tuple[int, int]]:
                """The data in chunk i, as ranges."""
                a, b = i * CHUNK, min(length, (i + 1) * CHUNK)
                got, j = [], bisect.bisect_right(ends, a)  # the first range that ends after a
                while j < len(data) and data[j][0] < b:
                    got.append((max(a, data[j][0]), min(b, data[j][1])))
                    j += 1
                return got

            nxt = pieces(0)
            for i in range(chunks):
                a, b = i * CHUNK, min(length, (i + 1) * CHUNK)
                here, nxt = nxt, pieces(i + 1) if i + 1 < chunks else []
                for x, y in nxt:
                    os.posix_fadvise(fd, x, y - x, os.POSIX_FADV_WILLNEED)
                if not here and b - a == CHUNK:
                    out.update(zero_digest)
                else:  # the chunk's digest, fed a piece at a time (the same as of the whole chunk)
                    h, pos = hashlib.sha256(), a
                    for x, y in [*here, (b, b)]:
                        if x > pos:
                            h.update(zeroes[: x - pos])  # a hole (or past the file's end)
                        got = x
                        while got < y:
                            n = os.preadv(fd, [view[: min(FILE_PIECE, y - got)]], got)
                            if n == 0:  # the file ends early: the rest reads as zeroes
                                break
                            h.update(view[:n])
                            got += n
                        pos = got
                    out.update(h.digest())
                if i % progress_every == 0:
                    on_progress(a)
        finally:
            os.close(fd)
    except OSError as e:
        raise TransientIOError(f"checksum read of {path} failed: {e.strerror or e}") from None
    finally:
        view.release()
        zeroes.release()
        buf.close()
    return out.hexdigest()


def file_reads_as_zero(path: str, start: int, end: int) -> bool:
    """True if every byte of [start, end) of the file reads as zero (holes are not read)."""
    with open(path, "rb", buffering=0) as f:
        for a, b in _data_ranges(f.fileno(), start, end):
            for pos in range(a, b, CHUNK):
                n = min(CHUNK, b - pos)
                if os.pread(f.fileno(), n, pos) != ZEROES[:n]:
                    return False
    return True

