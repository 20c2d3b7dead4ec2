"""NBD endpoints through libnbd: sources (NBD URIs or local images served by qemu-nbd), extents.

Local images are served by a private qemu-nbd, started here with systemd socket activation: the
listening socket is made, connected to and unlinked before qemu-nbd starts (so no socket file is
left, not even by a killed process, and nobody else can connect), then handed to qemu-nbd as fd 3
by posix_spawn, which does not copy the worker's page tables as a fork does (libnbd's own socket
activation forks: 20-29 ms per connection in a worker of 300 MiB, 8 ms with posix_spawn). qemu-nbd
exits when the handle closes, or when its parent dies (``setpriv --pdeathsig``: a qemu-nbd whose
client died before the NBD handshake would otherwise run for ever). An incremental sync's image
is exported by the worker's image server instead (imageserver.py: no process to start).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import weakref
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
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
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
# qemu-nbd takes the socket only if LISTEN_PID is its own pid, known only once it runs: sh sets it
_ACTIVATE = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
_LISTEN_FD = 3  # SD_LISTEN_FDS_START
# the private qemu-nbd's socket send buffer: with the AF_UNIX default (208 KiB) it sends replies in
# pieces and waits for the reader between them; 4 MiB (or net.core.wmem_max if lower): an
# incremental sync's copy ~18 % faster (benchmarks/). qemu-nbd has no option: grow_server_send_buffer.
SERVER_SNDBUF = 4 << 20
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (Linux >= 5.6)
BLOCK_STATUS_WINDOW = 1 << 30  # servers may refuse >= 4 GiB; qemu caps at 1 GiB anyway
STATUS_AHEAD = 8  # block status requests in flight while a plan is read (_windows_of)
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
    private: bool = False,
) -> nbd.NBD:
    """A connected libnbd handle. Connection failures become SourceUnreadable (one line).
    With ``bitmap``, the export also offers ``qemu:dirty-bitmap:<bitmap>``. With
    ``retry_unreachable`` (a copy of a source that was admitted), an NBD server that does not
    answer is SourceUnreachable, which is retried: it may be restarting. A local image read with
    a bitmap (an incremental sync) is exported by the worker's image server (imageserver.py),
    unless ``private``: the extra connections of a large copy, each with its own qemu-nbd."""
    def handle() -> nbd.NBD:
        h = nbd.NBD()
        for ctx in (*meta_contexts, *([dirty_context(bitmap)] if bitmap else [])):
            h.add_meta_context(ctx)
        return h

    h = handle()
    try:
        if kind == "nbd":
            h.connect_uri(location)
            grow_server_send_buffer(h)  # a server on this host (a running VM's QEMU): its replies
        elif bitmap and not writable and not private:
            from activities.transport.imageserver import SERVER  # it builds on this module

            SERVER.connect(h, location, fmt, bitmap)
        else:
            argv = ["-f", fmt, *([] if writable else ["-r"]), *(["-B", bitmap] if bitmap else [])]
            h = _serve(handle, h, argv, location, writable)
    except OSError as e:  # no socket or process for the private qemu-nbd
        raise SourceUnreadable(f"cannot open {location}: cannot start qemu-nbd: {e}") from None
    except nbd.Error as e:
        if retry_unreachable and kind == "nbd" and e.errnum in UNREACHABLE:
            raise SourceUnreachable(f"cannot reach source {location}: {e.string or e}") from None
        raise SourceUnreadable(f"cannot open {location}: {e.string or e}") from None
    return h


def _serve(handle: Callable[[], nbd.NBD], h: nbd.NBD, argv: list[str], location: str, writable: bool) -> nbd.NBD:
    """Connect ``h`` to a private qemu-nbd. A read-only one reads through io_uring, unless this
    kernel or qemu refused that once (then never again in this process: a new handle, as a handle
    whose connect failed cannot connect again)."""
    global _IO_URING
    if not writable and _IO_URING is not False:
        try:
            _start(h, [*argv, "--aio=io_uring"], location, writable)
            _IO_URING = True
            return h
        except nbd.Error:
            if _IO_URING:  # io_uring works here: this failure is the image's, reported as it is
                raise
            h = handle()
            _start(h, argv, location, writable)  # fails too: the image's fault
            _IO_URING = False
            return h
    _start(h, argv, location, writable)
    return h


def _start(h: nbd.NBD, argv: list[str], location: str, writable: bool) -> None:
    """Start qemu-nbd on a listening socket that already holds this handle's connection, and
    shake hands. Its reads skip libnbd's zeroing of each buffer (pread_initialize): that guards
    against servers whose replies leave part of a buffer unwritten, not this qemu-nbd, and costs a
    memset per request (a quarter of a small copy's time in aio_pread)."""
    # mode 0700: only we can connect while it exists
    d = tempfile.mkdtemp(prefix="xms-nbd-", dir=socket_dir(27))
    path = os.path.join(d, "sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
        client.connect(path)  # queued until qemu-nbd accepts it: its first and only client
    finally:
        shutil.rmtree(d, ignore_errors=True)
    cmd = helper_command(["/bin/sh", "-c", _ACTIVATE, "sh", QEMU_NBD, *argv, "--", location],
                         "TERM" if writable else "KILL")
    # dup2 onto itself would keep close-on-exec: fd 3 must come from another number
    handover = listener.dup() if listener.fileno() == _LISTEN_FD else listener
    with listener, handover:
        pid = os.posix_spawn(cmd[0], cmd, helper_env(),
                             file_actions=[(os.POSIX_SPAWN_DUP2, handover.fileno(), _LISTEN_FD)])
    reap = weakref.finalize(h, _reap, pid)  # also when a handle is dropped without close()
    reap.atexit = False  # a handle still open at exit keeps qemu-nbd up: pdeathsig ends it instead
    h._xms_reap, h._xms_pid = reap, pid
    if not writable:
        h.set_pread_initialize(False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)  # requests and writes
    try:
        h.connect_socket(client.detach())
    except nbd.Error:
        os.kill(pid, 9)
        reap()
        raise
    grow_server_send_buffer(h)


def helper_command(argv: list[str], die: str) -> list[str]:
    """``argv`` run so that it gets signal ``die`` when the thread that starts it dies."""
    return [SETPRIV, "--pdeathsig", die, "--", *argv] if SETPRIV else argv


def helper_env() -> dict[str, str]:
    """The C locale: setpriv, sh and QEMU skip loading locale data (~1.5 ms a start)."""
    return {**os.environ, "LC_ALL": "C"}


def socket_dir(room: int) -> str:
    """Where to make a directory of unix sockets whose own name and socket take ``room`` bytes of
    the path: TMPDIR, or /tmp when TMPDIR is too long for a socket path (108 bytes)."""
    base = tempfile.gettempdir()
    return base if len(base) + room <= 107 else "/tmp"


def grow_server_send_buffer(h: nbd.NBD) -> None:
    """Give the server's end of ``h``'s unix socket a send buffer of SERVER_SNDBUF. That socket is
    made by the kernel when the server accepts (it does not inherit the listener's options) and
    neither qemu-nbd nor QEMU's NBD server sets the option, so it is set here on a copy of it
    (pidfd_getfd: the same kernel socket): found by asking the kernel for our socket's peer
    (sock_diag) and looking it up among the server process's fds. Best effort: over TCP, for a
    server we may not inspect, or where the kernel refuses, the server keeps the default and is
    only slower. Used for private qemu-nbd, the worker's image server, and a running VM's QEMU
    serving a live sync (its replies: copy -12 %, its CPU -10 %, benchmarks/)."""
    theirs = server_socket(h)
    if theirs is not None:
        with theirs:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)


def grow_own_send_buffer(h: nbd.NBD) -> None:
    """Give our end of ``h``'s unix socket a send buffer of SERVER_SNDBUF, as a private qemu-nbd's
    client socket has: writes to an NBD target then go out whole, not in 208 KiB pieces each
    waiting for the server to read the last (NBD to NBD full copy 554-567 -> 604-616 MiB/s,
    benchmarks/). Not over TCP, whose buffers tune themselves."""
    try:
        mine = socket.socket(fileno=os.dup(h.aio_get_fd()))
    except (OSError, nbd.Error):
        return
    with mine:
        if mine.family == socket.AF_UNIX:
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)


def server_socket(h: nbd.NBD) -> socket.socket | None:
    """A copy (pidfd_getfd) of the socket the server of ``h`` (on a unix socket) replies on, or
    None if it cannot be had."""
    try:
        mine = socket.socket(fileno=os.dup(h.aio_get_fd()))
    except (OSError, nbd.Error):
        return None
    with mine:
        if mine.family != socket.AF_UNIX:
            return None
        try:
            # our own servers' listeners were made here, so their peer credentials may name this
            # process: their pids are known; any other server is named by them
            pid = (server_pid(h) or getattr(h, "_xms_peer_pid", None)
                   or struct.unpack("3i", mine.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])
            peer = _unix_peer(os.fstat(mine.fileno()).st_ino)
            if not pid or peer is None:
                return None
            want = f"socket:[{peer}]"
            fd = next((int(n) for n in os.listdir(f"/proc/{pid}/fd") if readlink(f"/proc/{pid}/fd/{n}") == want), None)
            if fd is None:
                return None
            pidfd = os.pidfd_open(pid)
            try:
                got = _libc().syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            finally:
                os.close(pidfd)
            if got < 0:
                return None
            theirs = socket.socket(fileno=got)
            if os.fstat(got).st_ino != peer:  # the fd number was reused meanwhile
                theirs.close()
                return None
            return theirs
        except (OSError, AttributeError, struct.error):  # no /proc, no pidfd_open, not permitted
            return None


def readlink(path: str) -> str:
    """Where a /proc fd link points, "" if it is gone."""
    try:
        return os.readlink(path)
    except OSError:
        return ""


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _UDIAG_SHOW_PEER, _UNIX_DIAG_PEER = 4, 20, 0x4, 2


def _unix_peer(inode: int) -> int | None:
    """The inode of the other end of unix socket ``inode`` (sock_diag, as ``ss -x`` shows it)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        # unix_diag_req: family, protocol, pad, states (all), inode, show, cookie (none)
        req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER,
                          0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req)  # NLM_F_REQUEST
        data = nl.recv(4096)
    length, kind = struct.unpack_from("=IH", data)
    if kind != _SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: no such socket, or no unix_diag in this kernel
        return None
    off = 16 + 16  # nlmsghdr, unix_diag_msg; then attributes
    while off + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            break
        if atype == _UNIX_DIAG_PEER:
            return struct.unpack_from("=I", data, off + 4)[0]
        off += (alen + 3) & ~3
    return None


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def server_pid(h: nbd.NBD) -> int | None:
    """The private qemu-nbd behind ``h``, while it runs (None for NBD URI sources)."""
    reap = getattr(h, "_xms_reap", None)
    return h._xms_pid if reap is not None and reap.alive else None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


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
    image's lock). nbd.py closes the handle only through __del__, so do what it does, once. An
    image server's export is removed with its connections (hard): its handle just closes, without
    the disconnect round trip."""
    if not on_image_server(h):
        try:
            h.shutdown()
        except nbd.Error:
            pass
    o = getattr(h, "_o", None)
    if o is not None:
        del h._o
        nbd.libnbdmod.close(o)
    reap = getattr(h, "_xms_reap", None)
    if reap is not None:
        reap()  # qemu-nbd exits once its client has gone
    if on_image_server(h):
        from activities.transport.imageserver import SERVER  # loaded: it made the export

        SERVER.release(h)  # the export and node are gone: the image is closed and unlocked


def on_image_server(h: nbd.NBD) -> bool:
    """Whether ``h`` reads an export of the worker's image server (one main loop for all)."""
    return hasattr(h, "_xms_export")


def dirty_context(bitmap: str) -> str:
    return f"qemu:dirty-bitmap:{bitmap}"


def _status(h: nbd.NBD, offset: int, length: int) -> dict[str, list[int]]:
    """Block status of [offset, offset + length): per context, the flat list libnbd gives
    (length, flags, length, flags, ...)."""
    got: dict[str, list[int]] = {}

    def cb(ctx: str, off: int, entries: list[int], err: object) -> int:
        got.setdefault(ctx, []).extend(entries)
        return 0

    try:
        h.block_status(length, offset, cb)
    except nbd.Error as e:
        raise TransientIOError(f"block status at {offset}: {e.string or e}") from None
    return got


def _windows_of(h: nbd.NBD, start: int, end: int,
                contexts: tuple[str, ...]) -> Iterator[tuple[int, int, dict[str, list[int]]]]:
    """Block status of [start, end) window by window, in order: (offset, stop, entries per
    context), each reply covering [offset, stop) in every context. STATUS_AHEAD windows are asked
    for at once, so the server answers the next ones while this thread works on the first: one
    round trip for a 4 GiB disk, not four (the plan of the benchmark's incremental sync: 3.7 ->
    2.8 ms). A reply that covers less than its window is completed before the next window's."""
    issued: deque[tuple[int, int, dict[str, list[int]], int]] = deque()
    nxt = start

    def issue() -> None:
        nonlocal nxt
        while nxt < end and len(issued) < STATUS_AHEAD:
            n = min(BLOCK_STATUS_WINDOW, end - nxt)
            got: dict[str, list[int]] = {}

            def cb(ctx: str, off: int, entries: list[int], err: object, got=got) -> int:
                got.setdefault(ctx, []).extend(entries)
                return 0

            try:
                issued.append((nxt, nxt + n, got, h.aio_block_status(n, nxt, cb)))
            except nbd.Error as e:
                raise TransientIOError(f"block status at {nxt}: {e.string or e}") from None
            nxt += n

    issue()
    while issued:
        offset, window_end, got, cookie = issued.popleft()
        try:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        except nbd.Error as e:
            raise TransientIOError(f"block status at {offset}: {e.string or e}") from None
        issue()
        while True:
            lists = [got.get(c) for c in contexts]
            if not all(lists):
                raise TransientIOError(f"block status at {offset}: server returned no extents")
            stop = min(window_end, *(offset + sum(x[0::2]) for x in lists))
            yield offset, stop, got
            if stop >= window_end:
                break
            offset, got = stop, _status(h, stop, window_end - stop)  # a short reply: the rest of its window


def dirty_extents(h: nbd.NBD, bitmap: str, end: int) -> Iterator[Extent]:
    """The regions dirty in ``bitmap``, each marked zero where base:allocation says it reads as
    zeroes (so it is written as zeroes, not read). Clean regions are left out."""
    ctx = dirty_context(bitmap)
    if not h.can_meta_context(ctx):
        raise ChangeTrackingLost(f"the source no longer exports dirty bitmap {bitmap!r}: the changes since "
                                 "the last sync cannot be known; a new full sync is needed")
    yield from dirty_runs(_windows(h, ctx, end))


def _windows(h: nbd.NBD, ctx: str, end: int) -> Iterator[tuple[int, int, list[int], list[int]]]:
    """(start, stop, dirty entries, allocation entries) of each block status window up to ``end``."""
    for offset, stop, got in _windows_of(h, 0, end, (ctx, "base:allocation")):
        yield offset, stop, got[ctx], got["base:allocation"]


def dirty_runs(windows: Iterable[tuple[int, int, list[int], list[int]]]) -> Iterator[Extent]:
    """The dirty runs of consecutive windows, cut where allocation changes between data and zero,
    adjacent runs of the same kind joined (across windows too). A window's entry lists are flat
    (length, flags, ...) and start at its start. Boundaries are summed and searched in C
    (accumulate, bisect): Python only visits the dirty runs, ~1 ms for a 1 %-changed 4 GiB disk
    against ~3 ms for a walk over every boundary of both lists."""
    run_start = run_end = -1  # the run being built
    run_zero = False
    for pos, stop, dirty, alloc in windows:
        d_at = list(accumulate(dirty[0::2], initial=pos))  # d_at[i]: where dirty entry i starts
        a_at = list(accumulate(alloc[0::2], initial=pos))
        a_flags = alloc[1::2]
        for i in [i for i, flags in enumerate(dirty[1::2]) if flags & 1]:
            s, d_end = d_at[i], min(d_at[i + 1], stop)
            if s >= stop:
                break
            ai = bisect_right(a_at, s) - 1  # the allocation entry that holds s
            while s < d_end:
                e = min(a_at[ai + 1], d_end)
                z = bool(a_flags[ai] & STATE_ZERO)
                if s == run_end and z == run_zero:
                    run_end = e
                else:
                    if run_start >= 0:
                        yield Extent(run_start, run_end - run_start, run_zero)
                    run_start, run_end, run_zero = s, e, z
                s, ai = e, ai + 1
    if run_start >= 0:
        yield Extent(run_start, run_end - run_start, run_zero)


def extents(h: nbd.NBD, start: int, end: int) -> Iterator[Extent]:
    """Allocation extents of [start, end), merged; the whole range is data if the server can't tell."""
    if not h.can_meta_context("base:allocation"):
        if end > start:
            yield Extent(start, end - start, False)
        return
    yield from _merged(_allocation(h, start, end))


def _allocation(h: nbd.NBD, start: int, end: int) -> Iterator[Extent]:
    for offset, stop, got in _windows_of(h, start, end, ("base:allocation",)):
        alloc = got["base:allocation"]
        for length, flags in zip(alloc[0::2], alloc[1::2]):
            length = min(length, stop - offset)
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
