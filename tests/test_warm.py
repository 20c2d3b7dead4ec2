"""Warm migration of a quiesced qcow2 source: full sync, incremental syncs of exactly the changed
extents (bitmaps rotated with qemu-img), zeroed and discarded regions, a refused early cutover,
and a cutover that ends with the target equal to the final source."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MiB, raw_sha256, sha256_file, wait_until
from xms.demo import make_disk

pytestmark = pytest.mark.timeout(600)
BLOCK = 64 * 1024  # the dirty bitmaps' granularity


def status(stack, name: str) -> dict:
    r = stack.cli("status", name, "--json")
    assert r.returncode in (0, 1) and r.stdout.strip(), r.stderr
    return json.loads(r.stdout)


def wait_status(stack, name: str, pred, what: str, timeout: float = 240) -> dict:
    return wait_until(lambda: (st := status(stack, name)) and pred(st) and st, timeout, what)


def qemu_io(image: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, str(image)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def xms_bitmaps(image: Path) -> list[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], capture_output=True,
                                     text=True, check=True).stdout)
    return [b["name"] for b in info["format-specific"]["data"].get("bitmaps", []) if b["name"].startswith("xms-")]


def test_warm_quiesced_qcow2(stack, tmp_path):
    size = 256 * MiB
    src = make_disk(tmp_path / "warm.qcow2", size, [(8 * MiB, 64 * MiB), (160 * MiB, 32 * MiB)], fmt="qcow2", seed=61)
    name = "warm-quiesced"
    r = stack.cli("migrate", name, "--disk", str(src), "--project", "warm", "--volume-type", "standard-ssd",
                  "--mode", "warm", "--sync-interval", "1h", "--power-off-hook", "mark-off")
    assert r.returncode == 0, r.stderr
    st = wait_status(stack, name, lambda s: s["phase"] == "Ready", "Ready after the full sync")
    vol = stack.store().get_volume(st["disks"][0]["volume_id"])
    target = Path(vol.path)
    want, _ = raw_sha256(src, tmp_path)
    assert sha256_file(target, size) == want

    # a cutover before any incremental sync is refused with its reason
    early = stack.cli("cutover", name)
    assert early.returncode != 0 and "cutover refused" in early.stderr and "0 incremental sync" in early.stderr

    store = stack.store()
    volumes_before = len(store.list_volumes(migration=name))
    rng = random.Random(62)
    written_once: list[tuple[int, int]] = []
    for round_ in range(1, 4):
        cmds, changed, extents = [], 0, 0
        # random 64 KiB-aligned writes, plus the first and the last sector of the disk
        for _ in range(12):
            off = rng.randrange(0, size // BLOCK - 8) * BLOCK
            n = rng.randint(1, 8) * BLOCK
            cmds.append(f"write -P {rng.randint(1, 255)} {off} {n}")
            changed, extents = changed + n, extents + 1
            written_once.append((off, n))
        cmds += [f"write -P {round_ + 100} 0 512", f"write -P {round_ + 110} {size - 512} 512"]
        changed, extents = changed + 1024, extents + 2
        # zero one region written earlier and discard another: both must read as zeroes on the target
        zoff, zlen = written_once[rng.randrange(len(written_once))]
        cmds.append(f"write -z {zoff} {zlen}")
        doff = 8 * MiB + round_ * MiB
        cmds.append(f"discard {doff} {BLOCK * 4}")
        extents += 2
        qemu_io(src, *cmds)
        expected, _ = raw_sha256(src, tmp_path)  # the source as of this sync's point in time
        assert stack.cli("sync-now", name).returncode == 0
        st = wait_status(stack, name, lambda s: s["syncs_done"] == round_ and s["phase"] == "Ready",
                         f"incremental sync {round_}")
        assert sha256_file(target, size) == expected, f"target differs from source after sync {round_}"
        last = st["last_sync"]
        assert last["ok"] and last["generation"] == round_
        # only the changed extents moved: bytes read <= bytes changed + one block per extent
        assert 0 < last["bytes_read"] <= changed + BLOCK * extents, (last, changed, extents)
        assert last["bytes_read"] < size // 10
        assert last["zero_bytes_written"] > 0  # the zeroed/discarded regions were written as zeroes
        # fixed footprint: no new volumes, no snapshots during syncs; no lock held between syncs
        assert len(store.list_volumes(migration=name)) == volumes_before
        assert store.list_snapshots(vol.id) == []
        assert xms_bitmaps(src) == [f"xms-{round_ + 1}"]

    qemu_io(src, "write -P 7 100M 1M")  # written after the last sync: only the final delta carries it
    # two cutover requests at once: one cutover runs, both get its answer
    calls = [subprocess.Popen([sys.executable, "-m", "xms", "cutover", name, "--json"], env=stack.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    answers = [c.communicate(timeout=300) for c in calls]
    assert all(c.returncode == 0 for c in calls), answers
    results = [json.loads(out) for out, _ in answers]
    assert [r["phase"] for r in results] == ["Completed", "Completed"]
    assert results[0]["requested_at"] == results[1]["requested_at"] and results[0]["attempt"] == 1
    final, _ = raw_sha256(src, tmp_path)
    assert sha256_file(target, size) == final
    st = status(stack, name)
    assert st["phase"] == "Completed" and st["disks"][0]["match"] is True
    assert st["cutover"]["power_off"] == "hook mark-off ran" and "data disk(s), not converted" in st["cutover"]["conversion"]
    assert name in (stack.data_dir / "powered-off.txt").read_text().split()
    assert len(store.list_volumes(migration=name)) == volumes_before
    assert len(store.list_snapshots(vol.id)) == 1  # the post-migration snapshot only
    assert store.get_volume(vol.id).bootable
    assert xms_bitmaps(src) == []  # tracking stopped: no bitmaps left on the source


def test_warm_refuses_sources_that_cannot_track(stack, tmp_path):
    raw = make_disk(tmp_path / "plain.raw", 32 * MiB, [(0, MiB)], seed=63)
    r = stack.cli("migrate", "warm-raw", "--disk", str(raw), "--project", "warm2", "--volume-type",
                  "standard-ssd", "--mode", "warm")
    assert r.returncode != 0
    assert "cannot migrate warm" in r.stderr and "raw image" in r.stderr and "--mode cold" in r.stderr
    assert stack.store().list_volumes(migration="warm-raw") == []
    assert stack.store().quota("warm2").quotas["gigabytes"].reserved == 0


def test_periodic_syncs_on_the_interval(stack, tmp_path):
    src = make_disk(tmp_path / "p.qcow2", 64 * MiB, [(0, 4 * MiB)], fmt="qcow2", seed=64)
    name = "warm-periodic"
    r = stack.cli("migrate", name, "--disk", str(src), "--project", "warm3", "--volume-type", "standard-ssd",
                  "--mode", "warm", "--sync-interval", "2s", "--no-snapshot")
    assert r.returncode == 0, r.stderr
    st = wait_status(stack, name, lambda s: s["syncs_done"] >= 2, "two timer-driven syncs", timeout=120)
    assert st["last_sync"]["ok"] and st["lag_s"] is not None
    assert stack.cli("cancel", name).returncode == 0
    wait_status(stack, name, lambda s: s["phase"] == "Cancelled", "Cancelled")
    assert stack.store().list_volumes(migration=name) == []
    assert xms_bitmaps(src) == []


def test_failed_cutover_returns_to_ready_and_unknown_hooks_are_refused(stack, tmp_path):
    src = make_disk(tmp_path / "f.qcow2", 64 * MiB, [(0, 4 * MiB)], fmt="qcow2", seed=65)
    r = stack.cli("migrate", "warm-nohook", "--disk", str(src), "--project", "warm4", "--volume-type",
                  "standard-ssd", "--mode", "warm", "--power-off-hook", "rm-rf")
    assert r.returncode != 0 and "unknown hook 'rm-rf'" in r.stderr and "fail-off, mark-off" in r.stderr
    assert stack.store().list_volumes(migration="warm-nohook") == []
    name = "warm-failoff"
    r = stack.cli("migrate", name, "--disk", str(src), "--project", "warm4", "--volume-type", "standard-ssd",
                  "--mode", "warm", "--sync-interval", "1h", "--power-off-hook", "fail-off")
    assert r.returncode == 0, r.stderr
    wait_status(stack, name, lambda s: s["phase"] == "Ready", "Ready")
    assert stack.cli("sync-now", name).returncode == 0
    wait_status(stack, name, lambda s: s["syncs_done"] == 1 and s["phase"] == "Ready", "sync 1")
    r = stack.cli("cutover", name)
    assert r.returncode != 0 and "cutover failed in PowerOffSource" in r.stdout + r.stderr
    assert "the BMC said no" in r.stdout + r.stderr
    st = status(stack, name)
    assert st["phase"] == "Ready" and st["last_failed_cutover"]["error"]
    # still a live warm migration: it syncs again, with its volume and tracking intact
    qemu_io(src, "write -P 8 1M 64k")
    assert stack.cli("sync-now", name).returncode == 0
    wait_status(stack, name, lambda s: s["syncs_done"] == 2 and s["phase"] == "Ready", "sync 2")
    assert stack.cli("cancel", name).returncode == 0
    wait_status(stack, name, lambda s: s["phase"] == "Cancelled", "Cancelled")
    assert xms_bitmaps(src) == []


def test_warm_nbd_export_with_its_own_bitmap(stack, tmp_path):
    """An NBD server that exports a dirty bitmap someone else manages (--bitmap NAME): every sync
    copies what the bitmap marks (cumulative, xms cannot rotate it); the target follows the source."""
    from tests.test_warm_live_faults import sha_nbd

    img, sock = tmp_path / "e.qcow2", tmp_path / "e.sock"
    make_disk(img, 64 * MiB, [(0, 8 * MiB)], fmt="qcow2", seed=66)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "64K", str(img), "ext"], check=True)
    server = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-B", "ext", "-k", str(sock), str(img)])
    try:
        wait_until(sock.exists, 30, "qemu-nbd socket")
        uri = f"nbd+unix:///?socket={sock}"
        r = stack.cli("migrate", "warm-nbd-nobitmap", "--disk", uri, "--project", "warm5", "--volume-type",
                      "standard-ssd", "--mode", "warm")
        assert r.returncode != 0 and "without a dirty bitmap" in r.stderr and "--bitmap NAME" in r.stderr
        name = "warm-nbd-bitmap"
        r = stack.cli("migrate", name, "--disk", uri, "--bitmap", "ext", "--project", "warm5", "--volume-type",
                      "standard-ssd", "--mode", "warm", "--sync-interval", "1h", "--no-snapshot")
        assert r.returncode == 0, r.stderr
        st = wait_status(stack, name, lambda s: s["phase"] == "Ready", "Ready")
        target = Path(stack.store().get_volume(st["disks"][0]["volume_id"]).path)
        for i in (1, 2):
            w = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {i + 40} {i * 16}M 1M",
                                "-c", f"write -z {i}M 64k", uri], capture_output=True, text=True)
            assert w.returncode == 0, w.stderr
            assert stack.cli("sync-now", name).returncode == 0
            st = wait_status(stack, name, lambda s, i=i: s["syncs_done"] == i and s["phase"] == "Ready", f"sync {i}")
            assert sha256_file(target, 64 * MiB) == sha_nbd(uri)
            assert st["last_sync"]["bytes_read"] <= i * (MiB + BLOCK)  # what the bitmap marks, no more
        r = stack.cli("cutover", name)
        assert r.returncode == 0, r.stderr
        assert status(stack, name)["disks"][0]["match"] is True
    finally:
        server.terminate()
        server.wait()
