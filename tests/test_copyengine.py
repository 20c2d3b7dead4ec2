"""The copy engine against real NBD servers: the target's writeback is started during the copy
(background flushes to an NBD target, sync_file_range on a file), so the final flush waits for
the tail only; the bytes on the target are the source's either way."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activities import copyengine
from activities.transport import nbd as transport
from chaos.harness import Nbdkit
from tests.conftest import MiB, sha256_file
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(300)

SIZE = 64 * MiB
REGIONS = [(0, 20 * MiB), (28 * MiB, 24 * MiB)]  # 44 MiB of data (plus the edges), holes between


@pytest.fixture
def source(tmp_path):
    return make_disk(tmp_path / "src.raw", SIZE, REGIONS, seed=707)


def _copy(src_path, writer, **kw) -> copyengine.CopyStats:
    with transport.handle(str(src_path), "image", "raw") as h:
        plan = [e for e in transport.extents(h, 0, SIZE) if not e.zero]
        return copyengine.copy(h, plan, writer, fresh=True, **kw)


def _copy_to_logged_nbd(tmp_path, source, before=lambda w: None):
    """Copy ``source`` with one connection into a fresh file served by nbdkit with its log
    filter; ``before`` sees the writer first. (target path, statistics, the server's log)"""
    target = tmp_path / "dst.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    srv = Nbdkit(target, tmp_path / "dst.sock", filters=["log"], params=[f"logfile={tmp_path / 'log'}"]).start()
    try:
        w = copyengine.NbdWriter(srv.uri)
        try:
            before(w)
            stats = _copy(source, w, more=[], threads=1)
        finally:
            w.close()
    finally:
        srv.stop()
    return target, stats, (tmp_path / "log").read_text()


def test_background_flushes_to_an_nbd_target(tmp_path, source, monkeypatch):
    """Every NBD_FLUSH_EVERY bytes written a connection sends a flush without waiting for it: the
    server's log (nbdkit's log filter) shows flushes that were answered while writes still came,
    the last command of the copy is a flush, and the target hashes like the source."""
    monkeypatch.setattr(copyengine, "NBD_FLUSH_EVERY", 8 * MiB)
    target, stats, log = _copy_to_logged_nbd(tmp_path, source)
    assert stats.offset == stats.end == SIZE
    commands = re.findall(r"connection=\d+ (Write|Flush) id=\d+ ", log)
    flushes = [i for i, c in enumerate(commands) if c == "Flush"]
    last_write = max(i for i, c in enumerate(commands) if c == "Write")
    # one flush at a time per connection, so how many depends on the disk; at least one came early
    assert len(flushes) >= 2, commands.count("Flush")
    assert flushes[0] < last_write, "no flush was sent while the copy was still writing"
    assert commands[-1] == "Flush"
    assert sha256_file(target) == sha256_file(source)


def test_file_target_writeback_keeps_the_bytes(tmp_path, source, monkeypatch):
    """A file target with writeback started every 4 MiB (sync_file_range, in the writer's own
    thread) and made durable by fdatasync: writeback was started while the copy ran, written,
    skipped and read bytes add up, the file hashes like the source and the thread is gone."""
    monkeypatch.setattr(copyengine, "FILE_WRITEBACK_EVERY", 4 * MiB)
    target = tmp_path / "dst.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    w = copyengine.FileWriter(str(target))
    calls = []
    real = copyengine._libc.sync_file_range
    monkeypatch.setattr(copyengine._libc, "sync_file_range", lambda *a: calls.append(a) or real(*a))
    try:
        stats = _copy(source, w)
    finally:
        w.close()
    assert calls  # requests coalesce while one runs: how many depends on the disk
    assert w.writeback is not None and not w.writeback.is_alive()
    assert stats.bytes_read == stats.bytes_written + stats.zero_bytes_skipped
    assert sha256_file(target) == sha256_file(source)


def test_a_file_target_is_dropped_from_the_page_cache_behind_the_copy(tmp_path, source, monkeypatch):
    """Drop-behind: a copy into a file leaves at most 2 x FILE_KEEP_CACHED of it in the page cache
    (fincore counts the target's resident pages), each dropped range was written back first (a
    waiting sync_file_range over it just before the POSIX_FADV_DONTNEED; the last drop, of the
    whole dropped span, sweeps up pages that were busy when their range went, after the
    fdatasync), and the bytes are the source's. Without drop-behind all 44 MiB written stay
    cached; without the sweep 10-18 MiB did in ~1 run of 10."""
    monkeypatch.setattr(copyengine, "FILE_WRITEBACK_EVERY", 1 * MiB)
    monkeypatch.setattr(copyengine, "FILE_KEEP_CACHED", 4 * MiB)
    target = tmp_path / "dst.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    calls = []
    real_sync, real_fadvise = copyengine._libc.sync_file_range, copyengine.os.posix_fadvise
    monkeypatch.setattr(copyengine._libc, "sync_file_range",
                        lambda fd, lo, n, flags: calls.append(("sync", lo.value, n.value, flags)) or real_sync(fd, lo, n, flags))
    monkeypatch.setattr(copyengine.os, "posix_fadvise",
                        lambda fd, lo, n, advice: calls.append(("drop", lo, n, advice)) or real_fadvise(fd, lo, n, advice))
    real_fdatasync = copyengine.os.fdatasync
    monkeypatch.setattr(copyengine.os, "fdatasync", lambda fd: calls.append(("fdatasync",)) or real_fdatasync(fd))
    w = copyengine.FileWriter(str(target))
    try:
        stats = _copy(source, w, more=[], threads=1)
    finally:
        w.close()
    resident = int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(target)],
                                  capture_output=True, text=True, check=True).stdout)
    assert stats.bytes_written >= 44 * MiB
    assert resident <= 10 * MiB, resident  # at most twice FILE_KEEP_CACHED, plus a range straddled
    assert calls[-1][0] == "drop" and ("fdatasync",) in calls  # the sweep, after the fdatasync
    io = [c for c in calls if c[0] != "fdatasync"]  # (which may come between the writeback
    drops = [i for i, c in enumerate(io) if c[0] == "drop"]  # thread's wait and its drop)
    *ranges, sweep = drops
    assert ranges
    for i in ranges:
        _, lo, n, advice = io[i]
        assert advice == os.POSIX_FADV_DONTNEED
        assert io[i - 1] == ("sync", lo, n, copyengine._SYNC_FILE_RANGE_WAIT_ALL), io[i - 1]
    _, lo, n, advice = io[sweep]
    assert advice == os.POSIX_FADV_DONTNEED
    assert all(lo <= io[i][1] and io[i][1] + io[i][2] <= lo + n for i in ranges)
    assert sha256_file(target) == sha256_file(source)


def test_a_stopped_copy_resumes_at_its_offset(tmp_path, source):
    """Cancellation: a copy asked to stop (throttled to 16 MiB/s, stopped once 8 MiB are on the
    target) raises Stopped with an offset short of the end, and a second copy from that offset
    completes the target: it then hashes like the source, so everything below the offset was
    there (pieces taken but not issued when the stop came are left to the resumed copy)."""
    target = tmp_path / "dst.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    seen: list[int] = []
    w = copyengine.FileWriter(str(target))
    try:
        with pytest.raises(copyengine.Stopped):
            _copy(source, w, throttle=copyengine.Throttle(16 * MiB, burst_s=0), progress_interval=0.01,
                  on_progress=lambda s: seen.append(s.offset), should_stop=lambda: seen[-1] >= 8 * MiB)
        offset = seen[-1]
        assert 8 * MiB <= offset < SIZE
        with transport.handle(str(source), "image", "raw") as h:
            rest = [e for e in transport.extents(h, offset, SIZE) if not e.zero]
            stats = copyengine.copy(h, rest, w, fresh=True)
    finally:
        w.close()
    assert stats.started_from >= offset and stats.offset == stats.end == SIZE
    assert sha256_file(target) == sha256_file(source)


def test_repeated_copies_and_checksums_hold_no_memory(tmp_path, source):
    """A worker copies and verifies disk after disk in one process. libnbd 1.14's Python bindings
    keep a reference to every buffer an AIO request used (a worker that verified 8 disks grew to
    8 GiB); the engine's buffers come from a pool and are reused, so after the first round the
    pool holds the same bytes and the process does not grow by the data it moved."""

    def rss_mib() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 // MiB

    target = tmp_path / "dst.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    idle, rss = [], []
    for _ in range(5):
        w = copyengine.FileWriter(str(target))
        try:
            _copy(source, w)
        finally:
            w.close()
        with transport.handle(str(target), "image", "raw") as h:
            digest = copyengine.checksum(h, SIZE, list(transport.extents(h, 0, SIZE)))
        idle.append(copyengine._POOL.idle_bytes())
        rss.append(rss_mib())
    assert len(set(idle)) == 1 and idle[0] > 0, idle  # the same buffers, back in the pool each time
    assert rss[-1] - rss[0] < 44, rss  # 4 more rounds moved 4 x 2 x 44 MiB; a leak would keep it
    with transport.handle(str(source), "image", "raw") as h:
        assert digest == copyengine.checksum(h, SIZE, list(transport.extents(h, 0, SIZE)))


def _copy_in_thread(source, target, connections: int, errors: list, ready=lambda: None) -> None:
    """Copy ``source`` into a fresh file ``target`` over ``connections`` connections (a thread's
    body: a failure goes to ``errors``); ``ready`` is called just before the copy starts."""
    with open(target, "wb") as f:
        f.truncate(SIZE)
    with transport.handle(str(source), "image", "raw") as h:
        plan = [e for e in transport.extents(h, 0, SIZE) if not e.zero]
        more = [(transport.connect(str(source), "image", "raw"), copyengine.FileWriter(str(target)))
                for _ in range(connections - 1)]
        w = copyengine.FileWriter(str(target))
        try:
            ready()
            copyengine.copy(h, plan, w, fresh=True, more=more)
        except BaseException as e:  # noqa: BLE001 - the caller asserts there were none
            errors.append(e)
        finally:
            for s, ww in more:
                ww.close()
                transport.close(s)
            w.close()


def test_a_spent_buffer_budget_slows_copies_but_never_stops_them(tmp_path, source, monkeypatch):
    """The worker's buffers have one budget that every copy and checksum shares. With a budget
    smaller than one request per connection, two copies of 4 connections each and a checksum run
    at the same time with a buffer or two each, never deadlock, and both targets hash like the
    source; the buffers made stay within the budget plus one per connection and checksum."""
    import threading

    pool = copyengine._Pool(budget=1 * MiB)
    monkeypatch.setattr(copyengine, "_POOL", pool)
    targets = [tmp_path / f"dst{i}.raw" for i in range(2)]
    errors = []
    threads = [threading.Thread(target=_copy_in_thread, args=(source, t, 4, errors)) for t in targets]
    for th in threads:
        th.start()
    with transport.handle(str(source), "image", "raw") as h:
        digest = copyengine.checksum(h, SIZE, list(transport.extents(h, 0, SIZE)))
    for th in threads:
        th.join()
    assert not errors, errors
    # beyond the budget only what a connection with nothing in flight must get (one buffer per size
    # class, 64 KiB .. REQUEST, as its pieces grow) and the checksum's first chunk
    assert pool.total <= 1 * MiB + 8 * (2 * copyengine.REQUEST - 64 * 1024) + copyengine.CHUNK, pool.total
    for t in targets:
        assert sha256_file(t) == sha256_file(source)
        with transport.handle(str(t), "image", "raw") as h:
            assert copyengine.checksum(h, SIZE, list(transport.extents(h, 0, SIZE))) == digest


def test_concurrent_copies_keep_to_the_budget_batch_after_batch(tmp_path, source, monkeypatch):
    """A worker runs batches of migrations at once, all its life. Each copy connection holds at
    most its share of the budget (giving buffers back when more copies start), so one that starts
    late finds buffers idle instead of making new ones: the pool stays near its budget however
    many batches run. (Before: the first copies kept their whole window and the pool grew by
    ~9 MiB with every batch of 8 migrations.)"""
    import threading

    pool = copyengine._Pool(budget=8 * MiB)
    monkeypatch.setattr(copyengine, "_POOL", pool)
    copies, conns = 4, 2
    targets = [tmp_path / f"dst{i}.raw" for i in range(copies)]
    totals, errors = [], []
    for _ in range(5):
        go = threading.Barrier(copies)
        threads = [threading.Thread(target=_copy_in_thread, args=(source, t, conns, errors, go.wait)) for t in targets]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        totals.append(pool.total)
    # the budget, plus what connections with nothing in flight must get when none is idle
    assert max(totals) <= 8 * MiB + copies * conns * 2 * copyengine.REQUEST, [t // MiB for t in totals]
    assert pool.users == 0
    for t in targets:
        assert sha256_file(t) == sha256_file(source)


def test_split_cuts_data_at_chunk_boundaries_only():
    """Pieces cover the plan exactly; data is cut at chunk-aligned offsets, an extent inside one
    chunk (an incremental sync's 64 KiB block) comes through as it is, zero extents are never cut."""
    E = transport.Extent
    chunk = 4 * MiB
    plan = [E(0, 64 * 1024, False), E(3 * MiB, 2 * MiB, False), E(5 * MiB, 20 * MiB, True),
            E(25 * MiB, 9 * MiB, False)]
    pieces = list(copyengine.split(plan, chunk))
    assert pieces[0] is plan[0]
    assert [(p.start, p.end) for p in pieces[1:3]] == [(3 * MiB, 4 * MiB), (4 * MiB, 5 * MiB)]
    assert pieces[3] is plan[2]
    assert [(p.start, p.length) for p in pieces[4:]] == [(25 * MiB, 3 * MiB), (28 * MiB, 4 * MiB),
                                                        (32 * MiB, 2 * MiB)]
    assert sum(p.length for p in pieces) == sum(e.length for e in plan)


_entries = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=8)


@given(st.lists(st.tuples(_entries, _entries, st.integers(0, 3)), min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_dirty_runs_match_a_per_block_model(windows):
    """dirty_runs (the plan of an incremental sync) against a model that marks every block dirty or
    clean and zero or data: the same runs, cut only where dirty data meets dirty zeroes, adjacent
    runs of one kind joined across windows too, whatever the two entry lists' boundaries."""
    flat, model, pos = [], {}, 0
    for dirty, alloc, short in windows:
        stop = pos + max(1, min(sum(n for n, _ in dirty), sum(n for n, _ in alloc)) - short)
        at = pos
        for n, flags in dirty:
            for b in range(at, at + n):
                model.setdefault(b, [False, False])[0] = bool(flags & 1)
            at += n
        at = pos
        for n, flags in alloc:
            for b in range(at, at + n):
                model.setdefault(b, [False, False])[1] = bool(flags & transport.STATE_ZERO)
            at += n
        flat.append((pos, stop, [x for e in dirty for x in e], [x for e in alloc for x in e]))
        pos = stop
    want, end = [], pos
    for b in range(end):
        dirty, zero = model[b]
        if not dirty:
            continue
        if want and want[-1][1] == b and want[-1][2] == zero:
            want[-1][1] = b + 1
        else:
            want.append([b, b + 1, zero])
    got = [(e.start, e.end, e.zero) for e in transport.dirty_runs(flat)]
    assert got == [tuple(w) for w in want]


@pytest.mark.parametrize("device", ["file", "loop device"])
def test_a_file_read_directly_checksums_as_through_nbd(tmp_path, device):
    """checksum_file (a raw file or block device on this host, read without an NBD server) gives
    the digest checksum() gives through qemu-nbd: a disk of an odd size with data across a chunk
    boundary, whole chunks of holes and data in its partial last chunk; and file_reads_as_zero
    tells holes and zeroes from data."""
    size = 3 * copyengine.CHUNK + 12 * 4096
    path = make_disk(tmp_path / "odd.raw", size, [(3 * MiB, 2 * MiB), (size - 8192, 4096)], seed=808)
    with open(path, "r+b") as f:  # a zero block written as data, not a hole
        f.seek(9 * MiB)
        f.write(bytes(64 * 1024))
    with transport.handle(str(path), "image", "raw") as h:
        want = copyengine.checksum(h, size, list(transport.extents(h, 0, size)))
    dev = None
    if device == "loop device":
        if os.geteuid() != 0:
            pytest.skip("attaches a loop device (root only)")
        dev = subprocess.run(["losetup", "-f", "--show", "-r", str(path)], check=True, capture_output=True,
                             text=True).stdout.strip()
    try:
        seen = []
        assert copyengine.checksum_file(dev or str(path), size, on_progress=seen.append, progress_every=1) == want
        assert seen == [0, copyengine.CHUNK, 2 * copyengine.CHUNK, 3 * copyengine.CHUNK]
        assert copyengine.file_reads_as_zero(dev or str(path), 6 * MiB, size - 8192)
        assert not copyengine.file_reads_as_zero(dev or str(path), 6 * MiB, size - 4096)
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev], check=True)


def test_a_plan_holds_over_short_block_status_replies(tmp_path, monkeypatch):
    """A server may answer block status for less than was asked: nbdkit's eval plugin here answers
    one extent of at most 1 MiB per request (holes and data by turns) while 8 windows of 4 MiB are
    in flight. The plan still covers the disk once, in order, each MiB as what it is."""
    extents = ('m=$(( $4 / 1048576 )); n=$(( (m + 1) * 1048576 - $4 )); [ $n -gt $3 ] && n=$3; '
               'if [ $(( m % 2 )) -eq 0 ]; then echo "$4 $n hole,zero"; else echo "$4 $n"; fi')
    srv = Nbdkit(tmp_path / "none", tmp_path / "eval.sock", plugin=[
        "eval", "get_size=echo 48M", "pread=exit 5", f"extents={extents}"]).start()
    monkeypatch.setattr(transport, "BLOCK_STATUS_WINDOW", 4 * MiB)
    try:
        with transport.handle(srv.uri, "nbd") as h:
            got = list(transport.extents(h, 0, 48 * MiB))
            tail = list(transport.extents(h, 5 * MiB + 4096, 7 * MiB))
    finally:
        srv.stop()
    assert [(e.start, e.length, e.zero) for e in got] == [(i * MiB, MiB, i % 2 == 0) for i in range(48)]
    assert [(e.start, e.length, e.zero) for e in tail] == [(5 * MiB + 4096, MiB - 4096, False), (6 * MiB, MiB, True)]


@pytest.mark.parametrize("server", ["private qemu-nbd", "image server", "NBD URI on a unix socket"])
def test_the_server_sends_with_a_larger_socket_buffer(tmp_path, server):
    """The socket the server replies on gets a send buffer above the kernel's default (neither
    qemu-nbd nor QEMU's NBD server sets one): a local image's private qemu-nbd, the worker's image
    server, and a server on this host reached by URI (as a running VM's QEMU is for a live sync).
    Read back from the socket the server holds, via pidfd_getfd."""
    import socket

    from tests.conftest import wait_until

    with open("/proc/sys/net/core/wmem_default") as f:
        default = int(f.read())
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b"], check=True)
    sock = tmp_path / "nbd.sock"
    proc = None
    if server == "NBD URI on a unix socket":
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", str(sock), str(img)])
        wait_until(sock.exists, 30, "qemu-nbd socket")
    args = {"private qemu-nbd": (str(img), "image", "qcow2"),
            "image server": (str(img), "image", "qcow2"),
            "NBD URI on a unix socket": (f"nbd+unix:///?socket={sock}", "nbd")}[server]
    try:
        with transport.handle(*args, bitmap="b" if server == "image server" else None) as h:
            assert (transport.server_pid(h) is not None) == (server == "private qemu-nbd")
            if server == "image server":
                from activities.transport.imageserver import SERVER

                with SERVER.lock:
                    assert len(SERVER.daemon.command("query-block-exports")) == 1
            theirs = transport.server_socket(h)
            assert theirs is not None
            with theirs:
                assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > default
            assert h.pread(4096, 0) == bytes(4096)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def test_an_nbd_target_gets_our_larger_send_buffer_and_256k_writes(tmp_path, source):
    """Writing to an NBD target on a unix socket: our end of the socket sends with a buffer above
    the kernel's default, the writes the server logs are REQUEST_NBD (256 KiB) at most and some
    are that long, and the target hashes like the source."""
    import socket

    with open("/proc/sys/net/core/wmem_default") as f:
        default = int(f.read())
    sndbuf = []

    def ours(w: copyengine.NbdWriter) -> None:
        with socket.socket(fileno=os.dup(w.h.aio_get_fd())) as mine:
            sndbuf.append(mine.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    target, _, log = _copy_to_logged_nbd(tmp_path, source, before=ours)
    assert sndbuf[0] > default
    counts = [int(n, 16) for n in re.findall(r" Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+)", log)]
    assert counts and max(counts) == copyengine.REQUEST_NBD == 256 * 1024
    assert sha256_file(target) == sha256_file(source)


def test_a_long_tmpdir_does_not_stop_a_private_qemu_nbd(tmp_path, monkeypatch):
    """The private qemu-nbd's socket is made in TMPDIR; one too long for a unix socket path (108
    bytes) falls back to /tmp instead of failing the source."""
    import tempfile

    long_dir = tmp_path / ("d" * 120)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(range(256)) * 4096)
    with transport.handle(str(img), "image", "raw") as h:
        assert h.pread(4096, 0) == bytes(range(256)) * 16
    assert list(long_dir.iterdir()) == []
