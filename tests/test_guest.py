"""Cutover that boots: a real Debian guest (scripts/guest/build.sh) migrated cold and warm, converted
by virt-v2v-in-place on the target volume, and booted from the target in a qemu VM (TCG here)
until its serial console prints the marker. A conversion that fails (injected) leaves the target
as the last sync wrote it and the cutover can run again without a new full sync. A data-only
disk is recorded as such and not converted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, MiB, crash_qemu, qemu_storage_daemon, sha256_file, start_stack
from tests.test_warm import status, wait_status

pytestmark = pytest.mark.timeout(1800)
MARKER = "XMS-BOOT-OK"
TAIL = 256 * MiB  # unpartitioned space added after the guest's disk: live writes go there


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    """The cached test guest and data disk (built by the project's script, rebuilt when it changes)."""
    r = subprocess.run([str(ROOT / "scripts/guest/setup.sh")], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([str(ROOT / "scripts/guest/build.sh")], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = Path(os.environ.get("XMS_GUEST_DIR", "/var/tmp/xms-guest"))
    return {"guest": d / "guest.img", "data": d / "data.img"}


@pytest.fixture(scope="module")
def gstack(tmp_path_factory):
    """A stack whose worker runs virt-v2v-in-place through a wrapper that fails once on demand."""
    data = tmp_path_factory.mktemp("xms-guest")
    wrapper_dir = data / "v2v"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "virt-v2v-in-place"  # same name, so its error line reads like virt-v2v's
    wrapper.write_text(f"""#!/bin/sh
if [ -e {wrapper_dir}/fail-next ]; then
  rm -f {wrapper_dir}/fail-next
  echo "virt-v2v-in-place: error: injected failure: the guest's initramfs could not be rebuilt" >&2
  exit 1
fi
exec /usr/bin/virt-v2v-in-place "$@"
""")
    wrapper.chmod(0o755)
    st = start_stack(data, extra_env={"XMS_V2V_COMMAND": str(wrapper)})
    st.fail_next = wrapper_dir / "fail-next"
    yield st
    st.stop_worker()
    st.server.stop()


def test_cold_guest_boots_from_target(gstack, images, tmp_path):
    src = tmp_path / "vm1.raw"
    subprocess.run(["cp", "--sparse=always", str(images["guest"]), str(src)], check=True)
    r = gstack.cli("migrate", "guest-cold", "--disk", str(src), "--project", "guests", "--volume-type",
                   "standard-ssd", "--boot-marker", MARKER, "--wait", "--json", timeout=1700)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["phase"] == "Completed", v["reason"]
    g = v["guest"]
    assert g["os_type"] == "linux" and g["distro"] == "debian" and g["firmware"] == "bios", g
    assert g["converted"] and not g["data_disk"] and g["boot_disk"] == 0
    assert MARKER in v["boot"]["marker_line"] and v["boot"]["seconds"] > 0
    assert MARKER in Path(v["boot"]["serial_log"]).read_text(errors="replace")
    assert v["disks"][0]["match"]  # copy verified before conversion changed the target
    text = gstack.cli("status", "guest-cold").stdout
    assert "guest: " in text and "firmware bios" in text and "first boot: marker after" in text
    # the instance record starts as a VM from the target volume on its own, too
    r = gstack.cli("instance", "start", "guest-cold", "--marker", MARKER, "--snapshot", "--json", timeout=900)
    assert r.returncode == 0, r.stderr
    boot = json.loads(r.stdout)
    assert boot["firmware"] == "bios" and MARKER in boot["marker_line"]


def test_warm_live_guest_cutover_retried_after_failed_conversion(gstack, images, tmp_path):
    import nbd

    img = tmp_path / "vm2.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(images["guest"]), str(img)], check=True)
    size = images["guest"].stat().st_size
    subprocess.run(["qemu-img", "resize", "-q", str(img), str(size + TAIL)], check=True)
    name = "guest-warm"
    with qemu_storage_daemon(img, tmp_path) as q:
        writer = nbd.NBD()
        writer.connect_uri(q.guest_uri)

        def write(i: int) -> None:  # live writes during the sync window, outside the guest's partition
            writer.pwrite(os.urandom(MiB) * 3, size + i * 8 * MiB)
            writer.flush()

        uri = f"qmp+unix://{q.qmp}?node=disk0&nbd-socket={q.guest}"
        r = gstack.cli("migrate", name, "--disk", uri, "--project", "guests", "--volume-type", "standard-ssd",
                       "--mode", "warm", "--sync-interval", "1h", "--boot-marker", MARKER)
        assert r.returncode == 0, r.stderr
        write(0)
        full = wait_status(gstack, name, lambda s: s["phase"] == "Ready", "Ready after the full sync", 900)
        full_copy = full["disks"][0]["bytes_copied"]
        for gen in (1, 2):
            write(gen)
            assert gstack.cli("sync-now", name).returncode == 0
            wait_status(gstack, name, lambda s: s["syncs_done"] >= gen and s["phase"] == "Ready", f"sync {gen}", 600)
        write(3)

        # 1st cutover: conversion fails (injected) -> back to Ready with virt-v2v's own line
        gstack.fail_next.touch()
        r = gstack.cli("cutover", name, "--json", timeout=1700)
        assert r.returncode != 0
        st = status(gstack, name)
        assert st["phase"] == "Ready" and "GuestConversion" in st["reason"]
        assert "virt-v2v-in-place: error: injected failure" in st["reason"], st["reason"]
        assert not gstack.fail_next.exists()
        write(4)

        # 2nd cutover: a fresh final delta, conversion, finalize, snapshot, first boot. The first
        # conversion's appliance qemu is killed with SIGSEGV as it starts (as qemu's TCG once
        # crashed here): the activity is retried on fresh overlays and the cutover still succeeds.
        with crash_qemu(f"XMS_DATA_DIR={gstack.data_dir}", "guestfs_identifier=v2v") as hit:
            r = gstack.cli("cutover", name, "--json", timeout=1700)
        assert r.returncode == 0, r.stderr + r.stdout
        assert hit.get("pid"), "the conversion's appliance never appeared"
        worker_log = gstack.logs[-1].read_text(errors="replace")
        assert '"error_type": "EmulatorFailed"' in worker_log
        assert "could not start the libguestfs appliance" in worker_log
        st = wait_status(gstack, name, lambda s: s["phase"] == "Completed", "Completed", 600)
        writer.shutdown()
    assert st["disks"][0]["bytes_copied"] == full_copy  # no second full sync: generation 0 ran once
    assert st["syncs_done"] >= 4  # two incremental syncs and the two final deltas
    assert st["guest"]["converted"] and st["guest"]["os_type"] == "linux"
    assert MARKER in st["boot"]["marker_line"]
    assert st["cutover"]["boot_s"] > 0 and st["boot"]["since_cutover_s"] == st["cutover"]["boot_s"]
    # the live writes (outside the partition conversion touches) reached the target
    vol = gstack.store().get_volume(st["disks"][0]["volume_id"])
    raw = tmp_path / "final.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)], check=True)
    with open(raw, "rb") as a, open(vol.path, "rb") as b:
        a.seek(size)
        b.seek(size)
        assert a.read(TAIL) == b.read(TAIL)
    print(f"warm guest: cutover request -> boot marker {st['cutover']['boot_s']:.0f} s")


def test_data_only_disk_is_not_converted(gstack, images, tmp_path):
    src = tmp_path / "data.raw"
    subprocess.run(["cp", "--sparse=always", str(images["data"]), str(src)], check=True)
    before = sha256_file(src)
    r = gstack.cli("migrate", "guest-data", "--disk", str(src), "--project", "guests", "--volume-type",
                   "standard-ssd", "--boot-marker", MARKER, "--no-snapshot", "--wait", "--json", timeout=1200)
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["phase"] == "Completed"
    assert v["guest"]["data_disk"] and not v["guest"]["converted"] and v["guest"]["os_type"] is None
    assert "not converted" in v["guest"]["note"] and v["boot"] is None
    vol = gstack.store().get_volume(v["disks"][0]["volume_id"])
    assert sha256_file(Path(vol.path), src.stat().st_size) == before  # untouched by conversion
