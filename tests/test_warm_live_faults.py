"""Warm migrations end to end through the worker: a live disk (qemu-storage-daemon standing in
for a running VM) written during the syncs; a worker SIGKILLed during an incremental sync; the
Temporal dev server SIGKILLed and restarted on the same database; `temporal workflow update`."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path

import nbd
import pytest

from activities.transport import nbd as transport
from tests.conftest import MiB, qemu_storage_daemon, raw_sha256, sha256_file, start_stack
from tests.test_warm import qemu_io, status, wait_status
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(600)
BLOCK = 64 * 1024


@pytest.fixture
def qsd(tmp_path):
    """qemu-storage-daemon serving a 128 MiB qcow2 node `disk0`: QMP for xms, and a writable
    NBD export `guest` on the same NBD server for the writer (the 'guest')."""
    img = tmp_path / "live.qcow2"
    make_disk(img, 128 * MiB, [(4 * MiB, 16 * MiB), (64 * MiB, 8 * MiB)], fmt="qcow2", seed=81)
    with qemu_storage_daemon(img, tmp_path) as q:
        yield {"uri": f"qmp+unix://{q.qmp}?node=disk0&nbd-socket={q.guest}", "guest": q.guest_uri}


class Writer(threading.Thread):
    """The guest: writes random 64 KiB blocks (every 5th a zero write) until told to stop."""

    def __init__(self, uri: str):
        super().__init__(daemon=True)
        self.uri, self.stop, self.writes, self.error = uri, threading.Event(), 0, None

    def run(self) -> None:
        rng, h = random.Random(82), nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while not self.stop.wait(0.01):  # a paced guest, ~100 writes/s
                off = rng.randrange(128 * MiB // BLOCK) * BLOCK
                h.zero(BLOCK, off) if self.writes % 5 == 4 else h.pwrite(rng.randbytes(BLOCK), off)
                self.writes += 1
        except BaseException as e:
            self.error = e
        finally:
            transport.close(h)


def sha_nbd(uri: str) -> str:
    h = transport.connect(uri, "nbd")
    try:
        size, out = h.get_size(), hashlib.sha256()
        for off in range(0, size, 4 * MiB):
            out.update(h.pread(min(4 * MiB, size - off), off))
        return out.hexdigest()
    finally:
        transport.close(h)


def test_warm_live_source_with_writes_during_syncs(stack, qsd):
    name = "warm-live"
    writer = Writer(qsd["guest"])
    writer.start()
    r = stack.cli("migrate", name, "--disk", qsd["uri"], "--project", "live", "--volume-type", "standard-ssd",
                  "--mode", "warm", "--sync-interval", "2s")
    assert r.returncode == 0, r.stderr
    st = wait_status(stack, name, lambda s: s["syncs_done"] >= 3, "three syncs while the guest writes", 300)
    writes_during_syncs = writer.writes
    assert writes_during_syncs > 0 and st["last_sync"]["ok"]
    volumes = len(stack.store().list_volumes(migration=name))
    writer.stop.set()
    writer.join()
    assert writer.error is None, writer.error
    r = stack.cli("cutover", name, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    st = status(stack, name)
    assert st["phase"] == "Completed" and st["disks"][0]["match"] is True
    vol = stack.store().get_volume(st["disks"][0]["volume_id"])
    assert sha256_file(Path(vol.path), 128 * MiB) == sha_nbd(qsd["guest"])
    assert len(stack.store().list_volumes(migration=name)) == volumes == 1
    assert "qemu-storage-daemon" in st["cutover"]["power_off"]


def test_worker_killed_during_incremental_sync(stack, tmp_path):
    size = 512 * MiB
    src = make_disk(tmp_path / "k.qcow2", size, [(0, 192 * MiB)], fmt="qcow2", seed=83)
    name = "warm-kill"
    r = stack.cli("migrate", name, "--disk", str(src), "--project", "kill", "--volume-type", "throttled-ssd",
                  "--mode", "warm", "--sync-interval", "1h", "--heartbeat-timeout", "4", "--no-snapshot")
    assert r.returncode == 0, r.stderr
    # the full sync of 192 MiB at 48 MiB/s takes ~4 s: a cutover now is refused with its reason
    early = stack.cli("cutover", name)
    assert early.returncode != 0 and "cutover refused: migration is " in early.stderr
    assert "allowed once it is Ready" in early.stderr and "Ready with" not in early.stderr
    wait_status(stack, name, lambda s: s["phase"] == "Ready", "Ready")
    qemu_io(src, "write -P 9 16M 400M")  # 400 MiB of changes: ~8 s at the type's 48 MiB/s
    expected, _ = raw_sha256(src, tmp_path)
    assert stack.cli("sync-now", name).returncode == 0
    wait_status(stack, name, lambda s: s["disks"][0]["copy_state"] == "copying" and s["disks"][0]["generation"] == 1
                and s["disks"][0]["bytes_copied"] >= 64 * MiB, "incremental sync under way")
    stack.kill_worker()
    stack.start_worker()
    st = wait_status(stack, name, lambda s: s["syncs_done"] == 1 and s["phase"] == "Ready", "sync 1 after the kill")
    assert st["disks"][0]["last_sync_bytes"] < 400 * MiB  # the retry resumed, it did not start over
    vol = stack.store().get_volume(st["disks"][0]["volume_id"])
    assert sha256_file(Path(vol.path), size) == expected
    r = stack.cli("cutover", name)
    assert r.returncode == 0, r.stderr
    assert status(stack, name)["disks"][0]["match"] is True


def test_server_killed_and_restarted_on_same_database(tmp_path):
    st = start_stack(tmp_path / "own")
    try:
        src = make_disk(tmp_path / "s.qcow2", 128 * MiB, [(0, 32 * MiB)], fmt="qcow2", seed=84)
        name = "warm-server-kill"
        r = st.cli("migrate", name, "--disk", str(src), "--project", "srv", "--volume-type", "standard-ssd",
                   "--mode", "warm", "--sync-interval", "1h", "--no-snapshot")
        assert r.returncode == 0, r.stderr
        wait_status(st, name, lambda s: s["phase"] == "Ready", "Ready")
        st.server.stop(sig=9)  # SIGKILL: no chance to flush anything
        st.server.start()  # same port, same SQLite file; the worker reconnects by itself
        qemu_io(src, "write -P 3 40M 4M")
        expected, _ = raw_sha256(src, tmp_path)
        assert st.cli("sync-now", name).returncode == 0
        s = wait_status(st, name, lambda s: s["syncs_done"] == 1, "a sync after the restart", 120)
        vol = st.store().get_volume(s["disks"][0]["volume_id"])
        assert sha256_file(Path(vol.path), 128 * MiB) == expected
        # the cutover through Temporal's own CLI, as an operator would run it
        temporal = shutil.which("temporal", path=sysconfig.get_path("scripts"))
        r = subprocess.run([temporal, "workflow", "update", "execute", "--address", st.server.address,
                            "-w", name, "--name", "cutover", "--input", "{}", "-o", "json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
        assert '"Completed"' in r.stdout
        assert status(st, name)["disks"][0]["match"] is True
    finally:
        st.stop_worker()
        st.server.stop()


def test_cancel_during_incremental_sync_cleans_up(stack, tmp_path):
    """Cancelling while a sync copies ends Cancelled (not a 'failed sync'): volumes deleted,
    quota released, the source's bitmaps removed."""
    from tests.test_warm import xms_bitmaps

    src = make_disk(tmp_path / "c.qcow2", 512 * MiB, [(0, 8 * MiB)], fmt="qcow2", seed=85)
    name = "warm-cancel-sync"
    r = stack.cli("migrate", name, "--disk", str(src), "--project", "cancel", "--volume-type", "throttled-ssd",
                  "--mode", "warm", "--sync-interval", "1h")
    assert r.returncode == 0, r.stderr
    wait_status(stack, name, lambda s: s["phase"] == "Ready", "Ready")
    qemu_io(src, "write -P 5 16M 300M")
    assert stack.cli("sync-now", name).returncode == 0
    wait_status(stack, name, lambda s: s["phase"] == "Syncing" and s["disks"][0]["bytes_copied"] > 16 * MiB,
                "sync under way")
    assert stack.cli("cancel", name).returncode == 0
    st = wait_status(stack, name, lambda s: s["phase"] == "Cancelled", "Cancelled")
    assert st["reason"] == "cancelled by request" and st["syncs_failed"] == 0
    store = stack.store()
    assert store.list_volumes(migration=name) == []
    assert store.quota("cancel").quotas["gigabytes"].reserved == 0
    assert store.quota("cancel").quotas["gigabytes"].in_use == 0
    assert xms_bitmaps(src) == []
