"""Cold migration end to end: real Temporal dev server, real worker process, real qemu-nbd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import GiB, MiB, raw_sha256, sha256_file, tail_is_zero
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def two_disk_vm(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("vm")
    # boot disk: 1 GiB qcow2, random data in four regions, holes between them
    boot = make_disk(d / "boot.qcow2", GiB, [(i * 256 * MiB + 3 * MiB, 96 * MiB) for i in range(4)],
                     fmt="qcow2", seed=11)
    # data disk: raw, not a multiple of 1 GiB
    data = make_disk(d / "data.raw", 700 * MiB + 4096 * 3, [(8 * MiB, 40 * MiB), (600 * MiB, 16 * MiB)], seed=12)
    return [boot, data]


def test_cold_two_disk_migration(stack, two_disk_vm, tmp_path):
    before = stack.store().quota("acme").quotas
    r = stack.cli("migrate", "cold-two-disk", "--disk", str(two_disk_vm[0]), "--disk", str(two_disk_vm[1]),
                  "--project", "acme", "--volume-type", "standard-ssd", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    view = json.loads(r.stdout)
    assert view["phase"] == "Completed"
    assert [p for p, _, _ in view["history"]][-1] == "Completed"
    store = stack.store()
    vols = {v.id: v for v in store.list_volumes(migration="cold-two-disk")}
    assert len(vols) == 2
    for disk, src in zip(view["disks"], two_disk_vm):
        vol = vols[disk["volume_id"]]
        want, size = raw_sha256(src, tmp_path)
        # the target's first `size` bytes are the source's bytes; the rest of the volume is zero
        assert sha256_file(Path(vol.path), size) == want
        assert tail_is_zero(Path(vol.path), size)
        assert disk["match"] is True and disk["source_sha256"] == disk["target_sha256"]
        assert vol.size_gib == 1 and vol.volume_type == "standard-ssd" and vol.availability_zone == "zone-a"
        assert vol.bootable == (disk["index"] == 0)
        assert disk["snapshot_id"]
    # the data disk (700 MiB + 12 KiB) was rounded up to 1 GiB
    assert view["disks"][1]["virtual_size"] == 700 * MiB + 3 * 4096 and view["disks"][1]["volume_size_gib"] == 1
    # holes were neither read nor written: bytes read are the allocated bytes, the target stays sparse
    boot_vol = vols[view["disks"][0]["volume_id"]]
    assert view["disks"][0]["bytes_copied"] <= 4 * 96 * MiB + 2 * 4096 + 2 * 64 * 1024
    assert Path(boot_vol.path).stat().st_blocks * 512 < 500 * MiB
    # attached to the target instance in disk order; quota moved from reserved to in use
    assert len(store.list_snapshots(boot_vol.id)) == 1
    after = stack.store().quota("acme").quotas
    assert after["gigabytes"].in_use == before["gigabytes"].in_use + 2
    assert after["gigabytes"].reserved == 0 and after["volumes"].reserved == 0


def test_status_and_list_json(stack, two_disk_vm):
    r = stack.cli("migrate", "cold-status", "--disk", str(two_disk_vm[1]), "--project", "acme",
                  "--volume-type", "archive-hdd", "--no-snapshot", "--wait")
    assert r.returncode == 0, r.stderr
    st = json.loads(stack.cli("status", "cold-status", "--json").stdout)
    assert st["phase"] == "Completed" and st["volume_type"] == "archive-hdd"
    d = st["disks"][0]
    assert d["snapshot_id"] is None and d["bytes_copied"] == 56 * MiB + 2 * 4096
    names = {m["name"]: m for m in json.loads(stack.cli("list", "--json").stdout)}
    assert names["cold-status"]["status"] == "COMPLETED"
    vols = json.loads(stack.cli("volumes", "--json").stdout)
    mine = [v for v in vols if v["metadata"].get("xms.migration") == "cold-status"]
    assert len(mine) == 1 and mine[0]["backend"] == "hdd-b" and mine[0]["format"] == "raw"
    assert Path(mine[0]["path"]).exists()


def test_cancel_cleans_up(stack, two_disk_vm):
    """Cancel during the (write-limited) copy: volumes deleted, reservation released, phase Cancelled."""
    from tests.conftest import wait_until

    r = stack.cli("migrate", "cold-cancel", "--disk", str(two_disk_vm[0]), "--project", "acme",
                  "--volume-type", "throttled-ssd")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: json.loads(stack.cli("status", "cold-cancel", "--json").stdout)["disks"][0]["bytes_copied"] > 0,
               120, "copy progress")
    assert stack.cli("cancel", "cold-cancel").returncode == 0
    st = wait_until(lambda: (v := json.loads(stack.cli("status", "cold-cancel", "--json").stdout))["phase"] == "Cancelled" and v,
                    120, "phase Cancelled")
    assert st["reason"] == "cancelled by request"
    store = stack.store()
    assert store.list_volumes(migration="cold-cancel") == []
    q = store.quota("acme").quotas
    assert q["gigabytes"].reserved == 0
