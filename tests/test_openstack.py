"""The OpenStack adapter against a real Cinder (scripts/cinder/cinder.sh): RabbitMQ, MariaDB,
cinder-api/-scheduler/-volume with two NFS-driver backends on loop-mounted ext4. No mocks.

Cold and warm migrations land on the backend of their type with equal hashes; a migration over
the per-type quota is refused before any volume exists; a worker killed right after Cinder
accepted a create is replaced and the retry reuses that volume; no credential reaches workflow
history or the logs."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GiB, MiB, raw_sha256, start_stack, workflow_show
from tests.test_warm import qemu_io, status, wait_status
from xms.demo import make_disk
from xms.errors import QuotaExceeded

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def os_stack(cinder, tmp_path_factory):
    data = tmp_path_factory.mktemp("xms-openstack")
    st = start_stack(data, extra_env={
        "XMS_TARGET": "openstack", "OS_CLOUD": cinder.cloud, "OS_CLIENT_CONFIG_FILE": str(cinder.clouds_yaml),
        "XMS_FAULTS_DIR": str(data),
    })
    yield st
    st.stop_worker()
    st.server.stop()


@pytest.fixture(autouse=True)
def cinder_volumes_deleted(os_stack):
    """Completed migrations leave their volumes (and snapshots) in Cinder, where they count against
    the small test quotas: each test deletes what it made once it has checked it."""
    yield
    store = os_stack.store()
    for v in store.list_volumes():
        store.delete_volume(v.id)


def sha256_volume(store, volume_id: str, length: int) -> str:
    """Hash a volume's first ``length`` bytes through its own attachment (read-only): the raw file
    os-brick returns, or a qemu-nbd over it when the NFS driver's active file is a qcow2 overlay."""
    import nbd

    h = hashlib.sha256()
    with store.open_target(volume_id, writable=False) as ep:
        if ep.kind == "file":
            with open(ep.path, "rb") as f:
                left = length
                while left:
                    b = f.read(min(left, 8 * MiB))
                    h.update(b)
                    left -= len(b)
        else:
            c = nbd.NBD()
            c.connect_uri(ep.uri)
            for off in range(0, length, 8 * MiB):
                h.update(c.pread(min(8 * MiB, length - off), off))
            c.shutdown()
    return h.hexdigest()


def volumes_named(store, migration: str) -> list:
    """Every Cinder volume whose name belongs to the migration, xms metadata or not (orphans too)."""
    return [v for v in store.bs.volumes(details=True) if (v.name or "").startswith(f"{migration}-disk")]


def test_volume_types_and_quota_from_cinder(os_stack, cinder):
    r = os_stack.cli("volume-types", "--json")
    assert r.returncode == 0, r.stderr
    types = {t["name"]: t for t in json.loads(r.stdout)}
    assert types["standard-ssd"]["backend"] == "ssd" and types["archive-hdd"]["backend"] == "hdd"
    assert types["archive-hdd"]["qos"] == {"write_bytes_sec": 100 * MiB, "write_iops_sec": 500}
    assert types["standard-ssd"]["availability_zone"] == "nova" and types["standard-ssd"]["encrypted"] is False
    q = json.loads(os_stack.cli("quota", cinder.project, "--json").stdout)
    assert q["quotas"]["gigabytes_standard-ssd"]["limit"] == 5


def test_cold_two_disks_into_cinder(os_stack, cinder, tmp_path):
    boot = make_disk(tmp_path / "boot.qcow2", 512 * MiB, [(MiB, 48 * MiB), (300 * MiB, 24 * MiB)], fmt="qcow2", seed=41)
    data = make_disk(tmp_path / "data.raw", 300 * MiB + 4096, [(16 * MiB, 20 * MiB)], seed=42)
    name = "os-cold"
    r = os_stack.cli("migrate", name, "--disk", str(boot), "--disk", str(data), "--project", cinder.project,
                     "--volume-type", "standard-ssd", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["phase"] == "Completed", view
    store = os_stack.store()
    mine = store.list_volumes(migration=name)
    assert len(mine) == 2 and len(volumes_named(store, name)) == 2  # exactly one volume per source disk
    by_id = {v.id: v for v in mine}
    for disk, src in zip(view["disks"], [boot, data]):
        vol = by_id[disk["volume_id"]]
        assert vol.backend == "ssd" and vol.volume_type == "standard-ssd" and vol.status == "available"
        assert vol.bootable == (disk["index"] == 0)
        want, size = raw_sha256(src, tmp_path)
        assert sha256_volume(store, vol.id, size) == want
        assert vol.metadata["xms.source"] == str(src) and vol.metadata["xms.checksum"].endswith(disk["target_sha256"])
        assert vol.metadata["xms.last_sync"] and vol.metadata["xms.boot_index"] == str(disk["index"])
        snaps = store.list_snapshots(vol.id)
        assert [s.name for s in snaps] == [f"{name}-disk{disk['index']}-post-migration"]
        assert snaps[0].status == "available" and snaps[0].id == disk["snapshot_id"]
    st = status(os_stack, name)
    assert st["disks"][0]["backup"].startswith("no backup: the cloud runs no cinder-backup service")


def test_warm_into_cinder(os_stack, cinder, tmp_path):
    size = 256 * MiB
    src = make_disk(tmp_path / "warm.qcow2", size, [(8 * MiB, 32 * MiB), (128 * MiB, 16 * MiB)], fmt="qcow2", seed=43)
    name = "os-warm"
    r = os_stack.cli("migrate", name, "--disk", str(src), "--project", cinder.project, "--volume-type", "archive-hdd",
                     "--mode", "warm", "--sync-interval", "1h", "--power-off-hook", "mark-off")
    assert r.returncode == 0, r.stderr
    st = wait_status(os_stack, name, lambda s: s["phase"] == "Ready", "Ready after the full sync")
    store = os_stack.store()
    vid = st["disks"][0]["volume_id"]
    assert sha256_volume(store, vid, size) == raw_sha256(src, tmp_path)[0]
    for i, gen in enumerate((1, 2)):
        qemu_io(src, f"write -P {0x40 + i} {(60 + 40 * i) * MiB} 3M", "write -z 10M 1M", f"write -P 7 0 4k")
        assert os_stack.cli("sync-now", name).returncode == 0
        wait_status(os_stack, name, lambda s: s["syncs_done"] >= gen and s["phase"] == "Ready", f"sync {gen}")
        # the next sync attached the same volume again and wrote only what changed
        assert sha256_volume(store, vid, size) == raw_sha256(src, tmp_path)[0]
    qemu_io(src, f"write -P 0x55 {200 * MiB} 1M")
    r = os_stack.cli("cutover", name, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    st = wait_status(os_stack, name, lambda s: s["phase"] == "Completed", "Completed")
    vols = store.list_volumes(migration=name)
    assert [v.id for v in vols] == [vid] and len(volumes_named(store, name)) == 1
    vol = vols[0]
    assert vol.backend == "hdd" and vol.bootable and vol.metadata["xms.mode"] == "warm"
    assert sha256_volume(store, vid, size) == raw_sha256(src, tmp_path)[0]
    assert len(store.list_snapshots(vid)) == 1 and st["disks"][0]["snapshot_id"]


def test_over_per_type_quota_refused_before_any_volume(os_stack, cinder, tmp_path):
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(6 * GiB)  # 6 GiB against gigabytes_standard-ssd = 5
    store = os_stack.store()
    before = len(list(store.bs.volumes()))
    r = os_stack.cli("migrate", "os-too-big", "--disk", str(big), "--project", cinder.project,
                     "--volume-type", "standard-ssd", "--no-snapshot")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert "gigabytes_standard-ssd" in line and "requested 6 GiB, limit 5 GiB, in use 0 GiB" in line, line
    assert volumes_named(store, "os-too-big") == [] and len(list(store.bs.volumes())) == before
    # 3 GiB fits, but not with its post-migration snapshot: Cinder counts snapshots in gigabytes quotas
    with open(big, "r+b") as f:
        f.truncate(3 * GiB)
    r = os_stack.cli("migrate", "os-with-snapshot", "--disk", str(big), "--project", cinder.project,
                     "--volume-type", "standard-ssd")
    assert r.returncode == 1 and "requested 6 GiB (volumes and their post-migration snapshots" in r.stderr, r.stderr
    assert volumes_named(store, "os-with-snapshot") == [] and len(list(store.bs.volumes())) == before
    # and Cinder's own 413, should a create get past the pre-check (a race), maps to the same error
    with pytest.raises(QuotaExceeded, match=r"Requested 6G, quota is 5G"):
        store.create_volume(reservation_id="x", migration="os-413", disk_index=0, name="os-413-disk0", size_gib=6,
                            volume_type="standard-ssd", availability_zone="nova", metadata={})
    assert volumes_named(store, "os-413") == []
    # a cloud without Nova cannot launch a server: refused at admission, nothing made
    r = os_stack.cli("migrate", "os-no-nova", "--disk", str(big), "--project", cinder.project, "--volume-type",
                     "standard-ssd", "--no-snapshot", "--flavor", "xms.small", "--network", "xms-net")
    assert r.returncode == 1 and "has no compute service (Nova)" in r.stderr, r.stderr
    assert volumes_named(store, "os-no-nova") == []


def test_worker_killed_after_cinder_created_volume(os_stack, cinder, tmp_path):
    """The worker SIGKILLs itself right after Cinder accepted the create (XMS_FAULTS); the next
    worker's retry finds that volume by name and metadata instead of making a second one."""
    src = make_disk(tmp_path / "k.raw", 64 * MiB, [(0, 8 * MiB)], seed=44)
    name = "os-killed"
    os_stack.stop_worker()
    os_stack.env["XMS_FAULTS"] = "after-volume-create"
    worker = os_stack.start_worker()
    submit = subprocess.Popen([sys.executable, "-m", "xms", "migrate", name, "--disk", str(src), "--project",
                               cinder.project, "--volume-type", "standard-ssd", "--heartbeat-timeout", "5"],
                              env=os_stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert worker.wait(timeout=300) == -signal.SIGKILL
        store = os_stack.store()
        made = volumes_named(store, name)
        assert len(made) == 1, made  # Cinder made it; the worker that asked is gone
        del os_stack.env["XMS_FAULTS"]
        os_stack.start_worker()
        out, err = submit.communicate(timeout=300)
        assert submit.returncode == 0, err
    finally:
        if submit.poll() is None:
            submit.kill()
    st = wait_status(os_stack, name, lambda s: s["phase"] == "Completed", "Completed after the retry")
    now = volumes_named(store, name)
    assert [v.id for v in now] == [made[0].id] == [st["disks"][0]["volume_id"]]  # reused, no orphan


def test_no_credentials_in_history_or_logs(os_stack, cinder):
    for name in ["os-cold", "os-warm", "os-killed"]:
        text = workflow_show(os_stack, name)
        assert '"cloud":"xms-test"' in text.replace(" ", "")  # the cloud's name is what travels
        assert cinder.secret not in text
    logs = [*os_stack.logs, os_stack.data_dir / "temporal.log"]
    assert any(p.stat().st_size for p in logs)
    for p in logs:
        assert cinder.secret not in p.read_text(errors="replace"), p
