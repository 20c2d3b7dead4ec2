"""The copy engine: extents in, bytes out. Resumable, throttled, no Temporal and no OpenStack.

Reads run as a ring of libnbd AIO requests on one connection; completed reads are written in
order, so everything below ``offset`` is on the target and a restart resumes exactly there.
Zero extents are never read; on a fresh target they are not written either, and data chunks
that turn out to be all zeroes are skipped the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import nbd

from activities.transport.nbd import Extent
from activities.transport.nbd import close as transport_close
from xms.errors import TransientIOError
from xms.models import MiB, TargetEndpoint

CHUNK = 4 * MiB  # QEMU's NBD server refuses requests over 32 MiB
DEPTH = 16
ZEROES = bytes(CHUNK)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


# --------------------------------------------------------------------------- writers


class FileWriter:
    """Raw file or block device on this host (local store volumes, os-brick attachments)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def write(self, offset: int, data: memoryview) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def zero(self, offset: int, length: int) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
        for pos in range(offset, offset + length, CHUNK):  # no hole punching here: write zeroes
            self.write(pos, memoryview(ZEROES)[: min(CHUNK, offset + length - pos)])

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class NbdWriter:
    """An NBD export (encrypted local volumes served by qemu-nbd, remote targets)."""

    def __init__(self, uri: str):
        self.h = nbd.NBD()
        try:
            self.h.connect_uri(uri)
        except nbd.Error as e:
            raise TransientIOError(f"cannot open target {uri}: {e.string or e}") from None

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

    def acquire(self, nbytes: int) -> None:
        if not (self.bps or self.iops):
            return
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
    data_bytes_total: int = 0  # data bytes in [started_from, end)
    t0: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-9)

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
        if e.zero:
            yield e
            continue
        pos = e.start
        while pos < e.end:
            nxt = min(e.end, (pos // chunk + 1) * chunk)
            yield Extent(pos, nxt - pos, False)
            pos = nxt


class Stopped(Exception):
    """The caller asked the copy to stop (cancellation); progress so far is valid."""


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
) -> CopyStats:
    """Copy ``plan`` (extents in ascending order) from ``src`` to ``writer``."""
    start = plan[0].start if plan else 0
    end = plan[-1].end if plan else 0
    stats = CopyStats(offset=start, end=end, started_from=start)
    stats.data_bytes_total = sum(e.length for e in plan if not e.zero)
    throttle = throttle or Throttle()
    pieces = iter(split(plan))
    free = [bytearray(CHUNK) for _ in range(depth)]
    inflight: deque[tuple[Extent, bytearray | None, int]] = deque()  # (extent, buffer, cookie)
    last_report = 0.0

    def issue() -> None:
        while free and len(inflight) < 2 * depth:
            e = next(pieces, None)
            if e is None:
                return
            if e.zero:
                inflight.append((e, None, 0))
                continue
            buf = free.pop()
            cookie = src.aio_pread(nbd.Buffer.from_buffer(memoryview(buf)[: e.length]), e.start)
            inflight.append((e, buf, cookie))

    try:
        issue()
        while inflight:
            e, buf, cookie = inflight[0]
            if buf is not None:
                while not src.aio_command_completed(cookie):
                    src.poll(-1)
            inflight.popleft()
            if buf is None:
                if not fresh:
                    throttle.acquire(0)
                    writer.zero(e.start, e.length)
                    stats.zero_bytes_written += e.length
            else:
                stats.bytes_read += e.length
                data = memoryview(buf)[: e.length]
                if data == memoryview(ZEROES)[: e.length]:
                    if fresh:
                        stats.zero_bytes_skipped += e.length
                    else:
                        writer.zero(e.start, e.length)
                        stats.zero_bytes_written += e.length
                else:
                    throttle.acquire(e.length)
                    writer.write(e.start, data)
                    stats.bytes_written += e.length
                free.append(buf)
            stats.offset = e.end
            issue()
            now = time.monotonic()
            if now - last_report >= progress_interval:
                last_report = now
                on_progress(stats)
                if should_stop():
                    raise Stopped(f"stopped at offset {stats.offset}")
    except nbd.Error as e:
        raise TransientIOError(f"I/O error near offset {stats.offset}: {e.string or e}") from None
    finally:
        # drain reads still in flight so their buffers are not freed under libnbd
        for _, buf, cookie in inflight:
            if buf is not None:
                try:
                    while not src.aio_command_completed(cookie):
                        src.poll(-1)
                except nbd.Error:
                    pass
    writer.flush()
    on_progress(stats)
    return stats


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
    pending: deque[tuple[int, bytearray, int]] = deque()
    nxt = 0

    def issue() -> None:
        nonlocal nxt
        while nxt < n and len(pending) < depth:
            i, nxt = nxt, nxt + 1
            size = min(CHUNK, length - i * CHUNK)
            if i in zero_chunks and size == CHUNK:
                pending.append((i, bytearray(), 0))
                continue
            buf = bytearray(size)
            pending.append((i, buf, h.aio_pread(nbd.Buffer.from_buffer(buf), i * CHUNK)))

    try:
        issue()
        while pending:
            i, buf, cookie = pending[0]
            if cookie:
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
            pending.popleft()
            out.update(hashlib.sha256(buf).digest() if cookie else zero_digest)
            if i % progress_every == 0:
                on_progress(i * CHUNK)
            issue()
    except nbd.Error as e:
        raise TransientIOError(f"checksum read failed: {e.string or e}") from None
    return out.hexdigest()
