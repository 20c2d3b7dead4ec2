"""The worker's image server (one real qemu-storage-daemon per process) exporting local qcow2
images for incremental syncs: the bytes it serves, the image closed and unlocked after each sync,
bad input answered in one line with nothing left on the daemon, a dead daemon replaced, and the
daemon gone with its process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from activities import copyengine
from activities.transport import nbd as transport
from activities.transport.imageserver import _ROOM, SERVER
from tests.conftest import MiB, wait_until
from xms.errors import SourceUnreadable, TransientIOError
from xms.models import TargetEndpoint

pytestmark = pytest.mark.timeout(300)

SIZE = 64 * MiB
CHANGED = [(3 * MiB, 64 * 1024), (10 * MiB, 192 * 1024), (40 * MiB + 128 * 1024, 64 * 1024)]


@pytest.fixture(autouse=True, scope="module")
def _stopped_after():
    yield
    SERVER.stop()  # nothing of this process's daemon outlives the module (its socket directory)


@pytest.fixture
def image(tmp_path):
    """A qcow2 with data, then bitmap ``b`` recording three changed ranges."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {32 * MiB}", str(img)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b", "-g", "64K"], check=True)
    cmds = [x for i, (off, n) in enumerate(CHANGED) for x in ("-c", f"write -P {40 + i} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True, capture_output=True)
    return img


def _on_daemon(command: str):
    with SERVER.lock:
        return SERVER.daemon.command(command)


def _nothing_on_the_daemon() -> bool:
    nodes = _on_daemon("query-named-block-nodes")
    return _on_daemon("query-block-exports") == [] and not [n for n in nodes if n["node-name"].startswith("xms-")]


def _writable(img) -> None:
    """A writer can open the image: nothing holds its lock."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k", str(img)], check=True, capture_output=True)


def _raw(img, tmp_path) -> bytes:
    raw = tmp_path / "raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)], check=True)
    return raw.read_bytes()


def test_an_incremental_sync_reads_through_the_image_server(image, tmp_path):
    """The handle is served by the worker's daemon, not a private qemu-nbd; the plan is exactly
    the changed ranges; the bytes copied equal the image's; once closed the image has no node or
    export on the daemon and a writer can open it (its lock is released)."""
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    try:
        assert transport.server_pid(h) is None and SERVER.daemon.alive
        plan = list(transport.dirty_extents(h, "b", SIZE))
        assert [(e.start, e.length) for e in plan] == CHANGED
        dst = tmp_path / "dst.raw"
        dst.write_bytes(b"")
        os.truncate(dst, SIZE)
        w = copyengine.open_writer(TargetEndpoint(kind="file", path=str(dst), size=SIZE))
        copyengine.copy(h, plan, w, fresh=False)
        w.close()
    finally:
        transport.close(h)
    src, got = _raw(image, tmp_path), dst.read_bytes()
    for off, n in CHANGED:
        assert hashlib.sha256(got[off:off + n]).hexdigest() == hashlib.sha256(src[off:off + n]).hexdigest()
    assert _nothing_on_the_daemon()
    _writable(image)


def test_extra_connections_are_private(image):
    """``private`` (the extra connections of a large copy) starts a qemu-nbd of its own."""
    h = transport.connect(str(image), "image", "qcow2", bitmap="b", private=True)
    try:
        assert transport.server_pid(h) is not None
        assert h.can_meta_context(transport.dirty_context("b"))
    finally:
        transport.close(h)


def test_bad_input_is_one_line_and_leaves_nothing_on_the_daemon(image, tmp_path):
    """A bitmap the image does not have, an image that is not there or not qcow2: one line naming
    the image and qemu's reason; no node or export left behind."""
    not_qcow2 = tmp_path / "plain.raw"
    not_qcow2.write_bytes(bytes(MiB))
    transport.close(transport.connect(str(image), "image", "qcow2", bitmap="b"))
    daemon = SERVER.daemon.pid
    for path, bitmap, reason in ((image, "nope", "Bitmap 'nope' is not found"),
                                 (tmp_path / "missing.qcow2", "b", "No such file or directory"),
                                 (not_qcow2, "b", "qcow2")):
        with pytest.raises(SourceUnreadable) as e:
            transport.connect(str(path), "image", "qcow2", bitmap=bitmap)
        msg = str(e.value)
        assert msg.startswith(f"cannot open {path}: ") and reason in msg and "\n" not in msg
    assert SERVER.daemon.pid == daemon  # the same daemon throughout: nothing was cleared by a restart
    assert _nothing_on_the_daemon()


def test_a_dead_daemon_is_replaced(image):
    """Syncs share one daemon; one that died is started anew by the next sync, whose handle works."""
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    first = SERVER.daemon.pid
    transport.close(h)
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    assert SERVER.daemon.pid == first
    os.kill(first, 9)
    wait_until(lambda: not SERVER.daemon.alive, 30, "the daemon's exit")
    transport.close(h)  # its export went with the daemon: nothing to remove
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    try:
        assert SERVER.daemon.pid != first
        assert len(list(transport.dirty_extents(h, "b", SIZE))) == len(CHANGED)
    finally:
        transport.close(h)


def test_the_daemon_dies_with_its_process(image):
    """A worker killed mid-sync (SIGKILL, nothing closed) takes its daemon with it, so the image is
    not left open and locked; its socket directory goes when the next daemon starts."""
    code = ("import os, sys\nfrom activities.transport import nbd as t\nfrom activities.transport.imageserver import SERVER\n"
            f"h = t.connect({str(image)!r}, 'image', 'qcow2', bitmap='b')\nprint(SERVER.daemon.pid, flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    pid = int(p.stdout.readline())
    p.kill()
    p.wait()

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited; its reaper was the worker
        except FileNotFoundError:
            return True

    wait_until(gone, 30, "the daemon's exit")
    _writable(image)
    # no exit handler ran in the killed process: the next daemon started removes its socket directory
    left = list(Path(transport.socket_dir(_ROOM)).glob(f"xms-images-{p.pid}-*"))
    assert left
    SERVER.stop()
    transport.close(transport.connect(str(image), "image", "qcow2", bitmap="b"))
    assert not any(d.exists() for d in left)


def test_the_cli_leaves_no_socket_directory(image):
    """xms leaves with os._exit (no exit handlers run): a worker that used the image server still
    removes its socket directory, and its daemon goes with it."""
    code = ("import sys\nfrom activities.transport import nbd as t\nfrom activities.transport.imageserver import SERVER\n"
            f"t.close(t.connect({str(image)!r}, 'image', 'qcow2', bitmap='b'))\nprint(SERVER.daemon.dir, flush=True)\n"
            "from xms import cli\nsys.argv = ['xms', '--help']\ncli.main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    d = Path(r.stdout.splitlines()[0])
    assert d.name.startswith("xms-images-") and not d.exists()


def test_a_handle_dropped_without_close_gives_its_image_back(image):
    """A handle that is garbage collected without close() has its export and node removed (in a
    thread of their own: its finalizer may run while the server's lock is held)."""
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    assert _on_daemon("query-block-exports") != []
    del h
    wait_until(_nothing_on_the_daemon, 30, "the export's removal")
    _writable(image)


def test_a_daemon_whose_socket_went_is_replaced(image):
    """Its socket directory removed under it (a /tmp cleaner): that sync fails as retryable, the
    next one gets a new daemon."""
    transport.close(transport.connect(str(image), "image", "qcow2", bitmap="b"))
    first = SERVER.daemon.pid
    shutil.rmtree(SERVER.daemon.dir)
    with pytest.raises(TransientIOError):
        transport.connect(str(image), "image", "qcow2", bitmap="b")
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    try:
        assert SERVER.daemon.pid != first and len(list(transport.dirty_extents(h, "b", SIZE))) == len(CHANGED)
    finally:
        transport.close(h)
    _writable(image)


def test_plans_over_many_block_status_windows_in_flight(image, monkeypatch):
    """Block status asked for 32 windows ahead of the one being read (2 MiB windows, up to
    STATUS_AHEAD in flight) gives the plans one request for the whole disk gives: the dirty runs
    and the allocation extents, each range once and in order."""
    h = transport.connect(str(image), "image", "qcow2", bitmap="b")
    try:
        whole = list(transport.extents(h, 0, SIZE))
        assert [(e.start, e.length) for e in transport.dirty_extents(h, "b", SIZE)] == CHANGED
        monkeypatch.setattr(transport, "BLOCK_STATUS_WINDOW", 2 * MiB)
        assert [(e.start, e.length) for e in transport.dirty_extents(h, "b", SIZE)] == CHANGED
        assert list(transport.extents(h, 0, SIZE)) == whole
        assert list(transport.extents(h, 3 * MiB, 41 * MiB)) == [
            transport.Extent(3 * MiB, 29 * MiB, False), transport.Extent(32 * MiB, 8 * MiB + 128 * 1024, True),
            transport.Extent(40 * MiB + 128 * 1024, 64 * 1024, False),
            transport.Extent(40 * MiB + 192 * 1024, 41 * MiB - (40 * MiB + 192 * 1024), True)]
    finally:
        transport.close(h)


@pytest.mark.skipif(os.geteuid() != 0, reason="attaches a loop device (root only)")
def test_a_qcow2_on_a_block_device(image):
    """A qcow2 on a block device (an LV, here a read-only loop device) is opened as one."""
    os.truncate(image, -(-image.stat().st_size // MiB) * MiB)  # a loop device ends at a whole sector
    dev = subprocess.run(["losetup", "-f", "--show", "-r", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        h = transport.connect(dev, "image", "qcow2", bitmap="b")
        try:
            assert [(e.start, e.length) for e in transport.dirty_extents(h, "b", SIZE)] == CHANGED
        finally:
            transport.close(h)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
