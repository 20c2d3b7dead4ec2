"""LiveDisk: changed-block tracking over QMP on a qemu-storage-daemon that a guest keeps writing.

The daemon serves disk0 to a "guest" writer (a thread with its own libnbd connection) through a
writable NBD export; LiveDisk adds its frozen exports to the same NBD server (nbd_socket).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbd
import pytest

from activities.transport import nbd as transport
from activities.transport.live import LiveDisk, parse_qmp_uri
from tests.conftest import Qsd, qemu_storage_daemon
from xms.errors import InvalidRequest, SourceUnreadable
from xms.models import MiB

BLOCK = 64 * 1024  # the bitmap granularity; the guest writes whole, aligned blocks
SIZE = 256 * MiB
CHUNK = 4 * MiB
ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, what: str) -> None:
    """A deadline poll for a socket file to appear (not a sleep standing in for synchronisation)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def qsd(tmp_path) -> Qsd:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 24M", "-c", "write -P 0xa5 100M 8M", str(img)],
                   check=True, capture_output=True)
    with qemu_storage_daemon(img, tmp_path) as q:
        yield q


def live(q: Qsd, tmp_path: Path) -> LiveDisk:
    return LiveDisk(str(q.qmp), "disk0", tmp_path / "run", nbd_socket=str(q.guest))


class Writer(threading.Thread):
    """A guest: writes random (every 8th: zeroed) 64 KiB blocks, one per permit granted."""

    def __init__(self, uri: str, seed: int = 1):
        super().__init__(daemon=True)
        self.uri, self.rng = uri, random.Random(seed)
        self.permits, self.cond = threading.Semaphore(0), threading.Condition()
        self.granted = self.started = self.done = 0
        self.stopping, self.error = False, None

    def allow(self, n: int) -> None:
        self.granted += n
        self.permits.release(n)

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while True:
                self.permits.acquire()
                if self.stopping:
                    return
                off = self.rng.randrange(SIZE // BLOCK) * BLOCK
                with self.cond:
                    self.started += 1
                    n = self.started
                h.zero(BLOCK, off) if n % 8 == 0 else h.pwrite(self.rng.randbytes(BLOCK), off)
                with self.cond:
                    self.done += 1
                    self.cond.notify_all()
        except BaseException as e:  # surfaced by wait_all/finish
            self.error = e
            with self.cond:
                self.cond.notify_all()
        finally:
            transport.close(h)

    def wait_all(self) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.done >= self.granted or self.error, 120), "writer stalled"
        assert self.error is None, self.error

    def finish(self) -> None:
        if self.is_alive():
            self.wait_all()
            self.stopping = True
            self.permits.release()
            self.join(60)
        assert self.error is None, self.error


def write_blocks(uri: str, n: int, seed: int) -> None:
    w = Writer(uri, seed)
    w.start()
    w.allow(n)
    w.finish()


def sha_nbd(h: nbd.NBD) -> str:
    d, size = hashlib.sha256(), h.get_size()
    for off in range(0, size, CHUNK):
        d.update(h.pread(min(CHUNK, size - off), off))
    return d.hexdigest()


def sha_uri(uri: str) -> str:
    with transport.handle(uri, "nbd") as h:
        return sha_nbd(h)


def sha_file(path: Path) -> str:
    d = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            d.update(b)
    return d.hexdigest()


def copy(h: nbd.NBD, fd: int, e: transport.Extent) -> None:
    for off in range(e.start, e.end, CHUNK):
        n = min(CHUNK, e.end - off)
        os.pwrite(fd, b"\0" * n if e.zero else h.pread(n, off), off)


def full_copy(h: nbd.NBD, fd: int) -> None:
    for e in transport.extents(h, 0, SIZE):
        if not e.zero:  # the target starts sparse
            copy(h, fd, e)


def apply_delta(h: nbd.NBD, fd: int, bitmap: str) -> tuple[int, int]:
    """Copy the dirty extents; (bytes, extents)."""
    moved = count = 0
    for e in transport.dirty_extents(h, bitmap, SIZE):
        copy(h, fd, e)
        moved, count = moved + e.length, count + 1
    return moved, count


def new_target(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, SIZE)
    return fd


def xms_state(disk: LiveDisk, run: Path) -> dict:
    return {
        "bitmaps": disk.bitmaps(),
        "exports": sorted(e["id"] for e in disk.qmp("query-block-exports")),
        "jobs": [j["device"] for j in disk.qmp("query-block-jobs")],
        "nodes": sorted(n["node-name"] for n in disk.qmp("query-named-block-nodes", {"flat": True})
                        if n["node-name"] not in ("disk0", "file0")),  # fleeces, their files, filters
        "files": sorted(p.name for p in run.glob("*.qcow2")) if run.exists() else [],
    }


CLEAN_EXPORTS = {"exports": ["guest"], "jobs": [], "nodes": [], "files": []}


# ---------------------------------------------------------------------------------------- tests


def test_parse_qmp_uri():
    assert parse_qmp_uri("qmp+unix:///run/vm1/qmp.sock?node=disk0") == ("/run/vm1/qmp.sock", "disk0", None)
    assert parse_qmp_uri("qmp+unix:///q.sock?node=d&nbd-socket=/n.sock") == ("/q.sock", "d", "/n.sock")
    for bad in ("qmp+unix://host/x.sock?node=d", "qmp+unix:///x.sock", "qmp+unix:///x.sock?node=",
                "qmp:///x.sock?node=d", "qmp+unix:///x.sock?node=d&node=e", "qmp+unix:///x.sock?node=d&x=1",
                "qmp+unix:///x.sock?node=#block1", "qmp+unix://x.sock?node=d"):
        with pytest.raises(InvalidRequest) as e:
            parse_qmp_uri(bad)
        assert "\n" not in str(e.value)


def test_every_sync_equals_its_frozen_point_while_the_guest_writes(qsd, tmp_path):
    disk = live(qsd, tmp_path)
    assert disk.size() == SIZE
    target = tmp_path / "target.raw"
    fd = new_target(target)
    w = Writer(qsd.guest_uri)
    w.start()
    done_before: dict[int, int] = {}
    try:
        for g in range(5):
            final = g == 4
            if final:
                w.finish()
            else:
                w.allow(40)  # these race with the freeze itself
            done_before[g] = w.done
            with disk.freeze(g) as view:
                started_after = w.started
                assert view.generation == g and view.bitmap == (f"xms-{g}" if g else None)
                if not final:  # writes that certainly land after the freeze must not show in the view
                    w.allow(60)
                    w.wait_all()
                    live_sha = sha_uri(qsd.guest_uri)
                h = view.connect()
                try:
                    frozen = sha_nbd(h)
                    if not final:
                        assert frozen != live_sha
                    if g == 0:
                        full_copy(h, fd)
                    else:
                        moved, extents = apply_delta(h, fd, view.bitmap)
                        writes = started_after - done_before[g - 1]
                        assert 0 < moved <= writes * BLOCK, (g, moved, writes, extents)  # one granule per write
                        print(f"sync {g}: {moved // BLOCK} blocks in {extents} extents, <= {writes} writes")
                finally:
                    transport.close(h)
            assert sha_file(target) == frozen, f"sync {g}: target differs from the source as frozen"
            if not final:
                w.wait_all()  # keep the windows apart: the next sync starts from a quiet guest
        assert sha_file(target) == sha_uri(qsd.guest_uri)
        assert xms_state(disk, tmp_path / "run") == {"bitmaps": {"xms-5": True}, **CLEAN_EXPORTS}
        node = [n for n in disk.qmp("query-named-block-nodes", {"flat": True}) if n["node-name"] == "disk0"][0]
        assert [(b["name"], b["persistent"], b["granularity"]) for b in node["dirty-bitmaps"]] == [("xms-5", True, BLOCK)]
    finally:
        os.close(fd)
        w.stopping = True
        w.permits.release()


def test_failed_attempt_keeps_its_bitmap_and_the_retry_commits(qsd, tmp_path):
    disk, run = live(qsd, tmp_path), tmp_path / "run"
    fd = new_target(tmp_path / "target.raw")
    try:
        with disk.freeze(0) as view, transport.handle(view.location, "nbd") as h:
            full_copy(h, fd)
        write_blocks(qsd.guest_uri, 30, seed=2)
        with pytest.raises(RuntimeError), disk.freeze(1):
            raise RuntimeError("copy failed")
        assert xms_state(disk, run) == {"bitmaps": {"xms-1": False, "xms-2": True}, **CLEAN_EXPORTS}
        write_blocks(qsd.guest_uri, 30, seed=3)  # after the failed freeze: must be in the retry too
        with disk.freeze(1) as view:
            h = view.connect()
            try:
                apply_delta(h, fd, view.bitmap)
                frozen = sha_nbd(h)
            finally:
                transport.close(h)
        assert sha_file(tmp_path / "target.raw") == frozen == sha_uri(qsd.guest_uri)
        assert xms_state(disk, run) == {"bitmaps": {"xms-2": True}, **CLEAN_EXPORTS}
        with disk.freeze(1) as view:
            assert view is None  # committed already
        with disk.freeze(2) as view:  # nothing written since: an empty delta
            with transport.handle(view.location, "nbd", bitmap=view.bitmap) as h:
                assert list(transport.dirty_extents(h, view.bitmap, SIZE)) == []
    finally:
        os.close(fd)


def test_lost_tracking_is_change_tracking_lost(qsd, tmp_path):
    """Every xms bitmap removed from the node (a VM restarted without its persistent bitmaps):
    the next sync fails as ChangeTrackingLost, one line, non-retryable, and leaves nothing behind."""
    from xms.errors import ChangeTrackingLost

    disk, run = live(qsd, tmp_path), tmp_path / "run"
    with disk.freeze(0):
        pass
    for name in disk.bitmaps():
        disk.qmp("block-dirty-bitmap-remove", {"node": "disk0", "name": name})
    with pytest.raises(ChangeTrackingLost) as e, disk.freeze(1):
        pass
    assert not e.value.retryable and "no xms dirty bitmap is left" in str(e.value) and "\n" not in str(e.value)
    assert xms_state(disk, run) == {"bitmaps": {}, **CLEAN_EXPORTS}


CRASHING_ATTEMPT = """
import sys
from pathlib import Path
from activities.transport.live import LiveDisk
disk = LiveDisk(sys.argv[1], "disk0", Path(sys.argv[2]), nbd_socket=sys.argv[3])
with disk.freeze(int(sys.argv[4])) as view:
    print(view.location, flush=True)
    sys.stdin.read()  # killed here
"""


def killed_attempt(qsd: Qsd, run: Path, g: int) -> str:
    p = subprocess.Popen([sys.executable, "-c", CRASHING_ATTEMPT, str(qsd.qmp), str(run), str(qsd.guest), str(g)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    location = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert location.startswith("nbd+unix:///"), location
    return location


def test_killed_attempt_is_reused_then_stop_and_power_off(qsd, tmp_path):
    disk, run = live(qsd, tmp_path), tmp_path / "run"
    with disk.freeze(0):
        pass
    write_blocks(qsd.guest_uri, 20, seed=4)
    location = killed_attempt(qsd, run, 1)
    frozen = sha_uri(location)  # the crashed attempt's export is still there
    write_blocks(qsd.guest_uri, 20, seed=5)
    with disk.freeze(1) as view:  # a new process retries generation 1: same point in time
        assert view.location == location
        assert sha_uri(view.location) == frozen != sha_uri(qsd.guest_uri)
    assert xms_state(disk, run) == {"bitmaps": {"xms-2": True}, **CLEAN_EXPORTS}

    killed_attempt(qsd, run, 2)
    state = xms_state(disk, run)
    assert state["bitmaps"] == {"xms-2": False, "xms-3": True} and "xms-exp-disk0-2" in state["exports"]
    assert state["jobs"] == ["xms-backup-disk0-2"] and state["files"] == ["xms-fleece-disk0-2.qcow2"]
    disk.stop()
    disk.stop()
    assert xms_state(disk, run) == {"bitmaps": {}, **CLEAN_EXPORTS}
    with pytest.raises(SourceUnreadable, match="full sync"), disk.freeze(3):
        pass
    assert sha_uri(qsd.guest_uri)  # the guest's export survived all of it

    with pytest.raises(SourceUnreadable):
        LiveDisk(str(qsd.qmp), "nosuchnode", run).size()
    disk.power_off()
    assert qsd.proc.wait(30) == 0
    with pytest.raises(SourceUnreadable, match="no QEMU answers"):
        disk.size()


def test_own_nbd_server(tmp_path):
    """Without nbd_socket LiveDisk starts QEMU's NBD server itself, in a private run_dir. A raw node
    gets non-persistent bitmaps."""
    img, qmp = tmp_path / "d.raw", tmp_path / "qmp.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "64M"], check=True)
    proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f0,filename={img}",
                             "--blockdev", "driver=raw,node-name=d0,file=f0",
                             "--chardev", f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m"])
    try:
        wait_until(lambda: qmp.is_socket(), 30, "qemu-storage-daemon")
        disk = LiveDisk(str(qmp), "d0", tmp_path / "run")
        for g in (0, 1, 2):
            with disk.freeze(g) as view:
                assert view.location == f"nbd+unix:///xms-d0-{g}?socket={tmp_path / 'run' / 'nbd.sock'}"
                assert sha_uri(view.location)
            assert [b["persistent"] for n in disk.qmp("query-named-block-nodes", {"flat": True})
                    for b in n.get("dirty-bitmaps", []) if n["node-name"] == "d0"] == [False]
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        disk.stop()
        assert json.dumps(disk.qmp("query-block-exports")) == "[]" and not (tmp_path / "run" / "nbd.sock").exists()
    finally:
        proc.kill()
        proc.wait()


def test_pause_and_resume_on_a_daemon_without_vcpus(qsd, tmp_path):
    """PowerOffSource pauses a live VM (QMP stop) and a rolled-back cutover resumes it (cont);
    qemu-storage-daemon has no vCPUs, so both say so instead of failing."""
    disk = live(qsd, tmp_path)
    assert "no vCPUs" in disk.pause()
    assert "no vCPUs" in disk.resume()
    assert disk.size() == SIZE  # still serving
