"""NBD endpoints through libnbd: sources (NBD URIs or local images served by qemu-nbd), extents.

Local images are served read-only by a private qemu-nbd that libnbd starts with systemd socket
activation: no socket file, and qemu-nbd exits when the handle closes, or when its parent dies
(it is started through ``setpriv --pdeathsig``: a qemu-nbd whose client died before the NBD
handshake would otherwise listen for ever).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nbd

from xms.errors import ChangeTrackingLost, InvalidRequest, SourceUnreachable, SourceUnreadable, TransientIOError

NBD_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://")
SOURCE_FORMS = ("nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, qmp+unix:///PATH?node=NODE (live, warm), "
                "or a local qcow2/raw image path")
# util-linux's setpriv: the private qemu-nbd gets a signal when the thread that started it dies.
# SIGKILL for a read-only one: qemu-nbd notes a SIGTERM that arrives while it starts up but acts
# on it only when its main loop wakes, which never happens without a client. A writable one gets
# SIGTERM, so that it flushes what it holds (qcow2 metadata).
SETPRIV = shutil.which("setpriv")
BLOCK_STATUS_WINDOW = 1 << 30  # servers may refuse >= 4 GiB; qemu caps at 1 GiB anyway
# read-only private qemu-nbd: io_uring where the kernel allows it (scattered reads of an incremental
# sync: ~30 % faster than the thread pool, benchmarks/); None until the first start has shown it works
_IO_URING: bool | None = None
STATE_HOLE = 1
STATE_ZERO = 2
# connect() errors that mean "no server is answering there now", not "this is not a valid source"
UNREACHABLE = {errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE, errno.ESHUTDOWN}


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk: ``zero`` means it reads as zeroes (hole or zero-allocated) and is not read."""

    start: int
    length: int
    zero: bool

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class SourceInfo:
    kind: Literal["nbd", "image", "qmp"]
    location: str  # the URI, or the absolute image path
    format: str  # raw | qcow2 (for nbd: "raw", what the export presents)
    virtual_size: int


def source_kind(source: str) -> Literal["nbd", "image"]:
    if source.startswith(NBD_SCHEMES):
        return "nbd"
    if "://" in source:
        raise InvalidRequest(f"unsupported disk source {source!r}; allowed: {SOURCE_FORMS}")
    return "image"


def image_format(path: str) -> str:
    """Format of a local image, read by qemu-img; refuses anything but raw and qcow2."""
    p = Path(path)
    if not p.is_absolute():
        raise InvalidRequest(f"disk source {path!r} must be an absolute path")
    if not p.exists():
        raise SourceUnreadable(f"disk source {path}: no such file")
    if not p.is_file() and not p.is_block_device():
        raise SourceUnreadable(f"disk source {path}: not a regular file or block device")
    if not os.access(p, os.R_OK):
        raise SourceUnreadable(f"disk source {path}: not readable (permission denied)")
    r = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(p)], capture_output=True, text=True
    )
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["qemu-img info failed"])[-1]
        raise SourceUnreadable(f"disk source {path}: {msg}")
    fmt = json.loads(r.stdout).get("format", "")
    if fmt not in ("raw", "qcow2"):
        raise SourceUnreadable(f"disk source {path}: format {fmt!r} is not supported; allowed: raw, qcow2")
    return fmt


def connect(
    location: str,
    kind: Literal["nbd", "image"],
    fmt: str = "raw",
    *,
    meta_contexts: tuple[str, ...] = ("base:allocation",),
    writable: bool = False,
    bitmap: str | None = None,
    retry_unreachable: bool = False,
) -> nbd.NBD:
    """A connected libnbd handle. Connection failures become SourceUnreadable (one line).
    With ``bitmap``, the export also offers ``qemu:dirty-bitmap:<bitmap>``. With
    ``retry_unreachable`` (a copy of a source that was admitted), an NBD server that does not
    answer is SourceUnreachable, which is retried: it may be restarting."""
    def handle() -> nbd.NBD:
        h = nbd.NBD()
        for ctx in (*meta_contexts, *([dirty_context(bitmap)] if bitmap else [])):
            h.add_meta_context(ctx)
        return h

    h = handle()
    try:
        if kind == "nbd":
            h.connect_uri(location)
        else:
            die = ["setpriv", "--pdeathsig", "TERM" if writable else "KILL", "--"] if SETPRIV else []
            argv = [*die, "qemu-nbd", "-f", fmt]
            if not writable:
                argv.append("-r")
            if bitmap:
                argv += ["-B", bitmap]
            h = _serve(handle, h, argv, location, io_uring=not writable)
    except nbd.Error as e:
        if retry_unreachable and kind == "nbd" and e.errnum in UNREACHABLE:
            raise SourceUnreachable(f"cannot reach source {location}: {e.string or e}") from None
        raise SourceUnreadable(f"cannot open {location}: {e.string or e}") from None
    return h


def _serve(handle: Callable[[], nbd.NBD], h: nbd.NBD, argv: list[str], location: str, io_uring: bool) -> nbd.NBD:
    """Start the private qemu-nbd on ``h``; with ``io_uring`` it reads through io_uring, unless
    this kernel or qemu refused that once (then never again in this process: a new handle, as a
    handle whose connect failed cannot connect again)."""
    global _IO_URING
    if io_uring and _IO_URING is not False:
        try:
            h.connect_systemd_socket_activation([*argv, "--aio=io_uring", "--", location])
            _IO_URING = True
            return h
        except nbd.Error:
            if _IO_URING:  # io_uring works here: this failure is the image's, reported as it is
                raise
            h = handle()
            h.connect_systemd_socket_activation([*argv, "--", location])  # fails too: the image's fault
            _IO_URING = False
            return h
    h.connect_systemd_socket_activation([*argv, "--", location])
    return h


def probe(source: str) -> SourceInfo:
    """Check that a source can be read and learn its size, without copying anything."""
    kind = source_kind(source)
    fmt = image_format(source) if kind == "image" else "raw"
    h = connect(source, kind, fmt)
    try:
        size = h.get_size()
        h.pread(min(512, size), 0) if size else None
    except nbd.Error as e:
        raise SourceUnreadable(f"cannot read {source}: {e.string or e}") from None
    finally:
        close(h)
    return SourceInfo(kind=kind, location=source, format=fmt, virtual_size=size)


def close(h: nbd.NBD) -> None:
    """Disconnect now, and for a private qemu-nbd wait until it has exited (and released the
    image's lock): libnbd's close reaps the child. nbd.py only offers that through __del__, so
    do what it does, once."""
    try:
        h.shutdown()
    except nbd.Error:
        pass
    o = getattr(h, "_o", None)
    if o is not None:
        del h._o
        nbd.libnbdmod.close(o)


def dirty_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


def _status(h: nbd.NBD, offset: int, length: int) -> dict[str, list[tuple[int, int]]]:
    got: dict[str, list[tuple[int, int]]] = {}

    def cb(ctx: str, off: int, entries: list[int], err: object) -> int:
        got.setdefault(ctx, []).extend(zip(entries[0::2], entries[1::2]))
        return 0

    try:
        h.block_status(length, offset, cb)
    except nbd.Error as e:
        raise TransientIOError(f"block status at {offset}: {e.string or e}") from None
    return got


def dirty_extents(h: nbd.NBD, bitmap: str, end: int) -> Iterator[Extent]:
    """The regions dirty in ``bitmap``, each marked zero where base:allocation says it reads as
    zeroes (so it is written as zeroes, not read). Clean regions are left out."""
    ctx = dirty_context(bitmap)
    if not h.can_meta_context(ctx):
        raise ChangeTrackingLost(f"the source no longer exports dirty bitmap {bitmap!r}: the changes since "
                                 "the last sync cannot be known; a new full sync is needed")
    yield from _merged(_dirty_pieces(h, ctx, end))


def _dirty_pieces(h: nbd.NBD, ctx: str, end: int) -> Iterator[Extent]:
    offset = 0
    while offset < end:
        got = _status(h, offset, min(BLOCK_STATUS_WINDOW, end - offset))
        dirty, alloc = got.get(ctx), got.get("base:allocation")
        if not dirty or not alloc:
            raise TransientIOError(f"block status at {offset}: server returned no extents")
        # walk both lists at once: every boundary of either starts a new piece
        di = ai = 0
        d_end, a_end = offset + dirty[0][0], offset + alloc[0][0]
        pos = offset
        stop = min(end, offset + sum(n for n, _ in dirty), offset + sum(n for n, _ in alloc))
        while pos < stop:
            nxt = min(d_end, a_end, stop)
            if dirty[di][1] & 1:
                yield Extent(pos, nxt - pos, bool(alloc[ai][1] & STATE_ZERO))
            pos = nxt
            if pos == d_end and di + 1 < len(dirty):
                di += 1
                d_end += dirty[di][0]
            if pos == a_end and ai + 1 < len(alloc):
                ai += 1
                a_end += alloc[ai][0]
        offset = stop


def extents(h: nbd.NBD, start: int, end: int) -> Iterator[Extent]:
    """Allocation extents of [start, end), merged; the whole range is data if the server can't tell."""
    if not h.can_meta_context("base:allocation"):
        if end > start:
            yield Extent(start, end - start, False)
        return
    yield from _merged(_allocation(h, start, end))


def _allocation(h: nbd.NBD, start: int, end: int) -> Iterator[Extent]:
    offset = start
    while offset < end:
        got = _status(h, offset, min(BLOCK_STATUS_WINDOW, end - offset)).get("base:allocation")
        if not got:
            raise TransientIOError(f"block status at {offset}: server returned no extents")
        for length, flags in got:
            length = min(length, end - offset)
            if length <= 0:
                break
            yield Extent(offset, length, bool(flags & STATE_ZERO))
            offset += length


def _merged(pieces: Iterator[Extent]) -> Iterator[Extent]:
    """Adjacent pieces of the same kind joined into one extent."""
    pending: Extent | None = None
    for e in pieces:
        if pending and pending.end == e.start and pending.zero == e.zero:
            pending = Extent(pending.start, pending.length + e.length, e.zero)
        else:
            if pending:
                yield pending
            pending = e
    if pending:
        yield pending


@contextmanager
def handle(location: str, kind: Literal["nbd", "image"], fmt: str = "raw", **kw) -> Iterator[nbd.NBD]:
    h = connect(location, kind, fmt, **kw)
    try:
        yield h
    finally:
        close(h)
