"""The embedded block store: quota bookkeeping, races, volume files, encryption at rest."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from activities.blockstorage.local import LocalBlockStore, open_local_store
from activities.blockstorage.serve import NBD_STOP_TIMEOUT_S
from xms.config import load_config
from xms.errors import InvalidRequest, NotFound, QuotaExceeded, TransientIOError, UnknownVolumeType
from xms.models import GiB, MiB

MARKER = b"xms-plaintext-marker:"


@pytest.fixture
def store(tmp_path: Path) -> LocalBlockStore:
    return LocalBlockStore(load_config(None), tmp_path / "data")


def make_volume(store: LocalBlockStore, migration: str = "m1", size: int = 1, vtype: str = "standard-ssd",
                project: str = "demo", index: int = 0):
    res = store.reserve(project, migration, vtype, [size] * (index + 1))
    vt = store.get_volume_type(vtype)
    return res, store.create_volume(
        reservation_id=res.id, migration=migration, disk_index=index, name=f"{migration}-disk{index}",
        size_gib=size, volume_type=vtype, availability_zone=vt.availability_zone, metadata={"source": "a.qcow2"})


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def head(path: str | Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def usage(store: LocalBlockStore, project: str, key: str) -> tuple[int, int, int]:
    q = store.quota(project).quotas[key]
    return q.limit, q.in_use, q.reserved


def qemu_io(uri: str, *cmds: str, readonly: bool = False) -> str:
    argv = ["qemu-io", "-f", "raw", *(["-r"] if readonly else [])]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


# --------------------------------------------------------------------------- catalogue and quota


def test_unknown_volume_type_names_valid_types(store):
    with pytest.raises(UnknownVolumeType) as e:
        store.get_volume_type("foo")
    assert str(e.value) == (
        "unknown volume type 'foo'; valid types: archive-hdd, encrypted-ssd, performance-nvme, standard-ssd")
    assert [t.name for t in store.volume_types()] == [
        "archive-hdd", "encrypted-ssd", "performance-nvme", "standard-ssd"]


def test_quota_report_keys_and_layers(tmp_path):
    config = load_config(None)
    config.quotas.projects["big"] = {"gigabytes": 5000}
    store = LocalBlockStore(config, tmp_path)
    q = store.quota("demo").quotas
    assert list(q)[:2] == ["volumes", "gigabytes"]
    assert {f"gigabytes_{t.name}" for t in store.volume_types()} <= set(q)
    assert (q["volumes"].limit, q["gigabytes"].limit, q["gigabytes_standard-ssd"].limit) == (100, 2000, -1)
    assert store.quota("big").quotas["gigabytes"].limit == 5000
    report = store.set_quota("big", {"gigabytes": 7, "volumes_archive-hdd": 3})
    assert report.quotas["gigabytes"].limit == 7 and report.quotas["volumes_archive-hdd"].limit == 3
    assert store.quota("demo").quotas["gigabytes"].limit == 2000  # other projects untouched
    with pytest.raises(InvalidRequest, match="unknown quota key 'disks'"):
        store.set_quota("demo", {"disks": 1})
    with pytest.raises(InvalidRequest, match="-1 \\(unlimited\\)"):
        store.set_quota("demo", {"volumes": -2})
    with pytest.raises(UnknownVolumeType):
        store.set_quota("demo", {"gigabytes_nope": 1})


def test_reserve_consume_release_bookkeeping(store):
    res = store.reserve("demo", "m1", "standard-ssd", [3, 4])
    assert (res.volumes, res.gigabytes, res.project, res.volume_type) == (2, 7, "demo", "standard-ssd")
    assert store.reserve("demo", "m1", "standard-ssd", [3, 4]).id == res.id  # idempotent
    assert usage(store, "demo", "gigabytes") == (2000, 0, 7)
    assert usage(store, "demo", "volumes") == (100, 0, 2)
    assert usage(store, "demo", "gigabytes_standard-ssd") == (-1, 0, 7)
    assert usage(store, "demo", "gigabytes_archive-hdd") == (-1, 0, 0)

    vol = store.create_volume(reservation_id=res.id, migration="m1", disk_index=1, name="m1-disk1", size_gib=4,
                              volume_type="standard-ssd", availability_zone="zone-a", metadata={})
    assert vol.status == "available" and vol.size_gib == 4
    assert usage(store, "demo", "gigabytes") == (2000, 4, 3)
    assert usage(store, "demo", "volumes") == (100, 1, 1)

    store.release(res.id)
    assert usage(store, "demo", "gigabytes") == (2000, 4, 0)  # the volume stays, the rest is freed
    store.release(res.id)  # idempotent
    store.release("no-such-reservation")
    with pytest.raises(InvalidRequest, match="does not exist"):
        store.create_volume(reservation_id=res.id, migration="m1", disk_index=0, name="m1-disk0", size_gib=3,
                            volume_type="standard-ssd", availability_zone="zone-a", metadata={})


def test_reserve_for_a_migration_with_different_inputs_is_refused(store):
    store.reserve("demo", "m1", "standard-ssd", [1])
    with pytest.raises(InvalidRequest, match="already holds reservation"):
        store.reserve("demo", "m1", "standard-ssd", [2])
    with pytest.raises(InvalidRequest, match=">= 1 GiB per disk"):
        store.reserve("demo", "m2", "standard-ssd", [0])


@pytest.mark.parametrize("limits, sizes, message", [
    ({"gigabytes": 10}, [6, 6],
     "quota exceeded for project demo: gigabytes requested 12 GiB, limit 10 GiB, in use 0 GiB, reserved 0 GiB"),
    ({"gigabytes_standard-ssd": 10}, [6, 6],
     "quota exceeded for project demo: gigabytes_standard-ssd requested 12 GiB, limit 10 GiB, in use 0 GiB, "
     "reserved 0 GiB"),
    ({"volumes": 1}, [1, 1],
     "quota exceeded for project demo: volumes requested 2, limit 1, in use 0, reserved 0"),
    ({"volumes_standard-ssd": 1}, [1, 1],
     "quota exceeded for project demo: volumes_standard-ssd requested 2, limit 1, in use 0, reserved 0"),
])
def test_quota_exceeded_names_the_quota_and_numbers(store, limits, sizes, message):
    store.set_quota("demo", limits)
    with pytest.raises(QuotaExceeded) as e:
        store.reserve("demo", "m1", "standard-ssd", sizes)
    assert str(e.value) == message
    assert usage(store, "demo", "gigabytes")[1:] == (0, 0)  # nothing was reserved
    store.reserve("demo", "m1", "archive-hdd" if "_" in next(iter(limits)) else "standard-ssd", [1])


def test_quota_exceeded_counts_in_use_and_reserved(store):
    store.set_quota("demo", {"gigabytes_standard-ssd": 10})
    make_volume(store, "m1", size=4)  # 4 in use (and its reservation item consumed)
    store.reserve("demo", "m2", "standard-ssd", [3])
    store.reserve("other", "m3", "standard-ssd", [9])  # another project does not count
    store.reserve("demo", "m4", "archive-hdd", [9])  # another type does not count for the per-type key
    with pytest.raises(QuotaExceeded) as e:
        store.reserve("demo", "m5", "standard-ssd", [4])
    assert str(e.value).endswith("gigabytes_standard-ssd requested 4 GiB, limit 10 GiB, in use 4 GiB, reserved 3 GiB")
    store.reserve("demo", "m5", "standard-ssd", [3])  # exactly at the limit is fine


def _race(data_dir: str, worker: int, attempts: int, barrier, results) -> None:
    store = LocalBlockStore(load_config(None), Path(data_dir))  # its own connections, its own process
    barrier.wait()
    won = 0
    try:
        for i in range(attempts):
            try:
                store.reserve("demo", f"race-{worker}-{i}", "standard-ssd", [1])
                won += 1
            except QuotaExceeded:
                pass
    except Exception as e:  # anything else (e.g. "database is locked") fails the test, fast
        won = f"{type(e).__name__}: {e}"
    results.put(won)


def test_concurrent_reservations_never_pass_the_limit(tmp_path):
    store = LocalBlockStore(load_config(None), tmp_path)
    store.set_quota("demo", {"gigabytes": 13})
    store.reserve("demo", "before", "standard-ssd", [2])  # 11 GiB left for the racers
    workers, attempts = 6, 4  # 24 attempts at 1 GiB each
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), w, attempts, barrier, results)) for w in range(workers)]
    for p in procs:
        p.start()
    won = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(isinstance(w, int) for w in won), won
    assert sum(won) == 11
    assert usage(store, "demo", "gigabytes") == (13, 0, 13)
    assert usage(store, "demo", "volumes") == (100, 0, 12)


# --------------------------------------------------------------------------- volumes


def test_create_volume_is_idempotent_and_sparse(store):
    res, vol = make_volume(store, "m1", size=2)
    again = store.create_volume(reservation_id=res.id, migration="m1", disk_index=0, name="m1-disk0", size_gib=2,
                                volume_type="standard-ssd", availability_zone="zone-a", metadata={})
    assert again.id == vol.id
    assert [v.id for v in store.list_volumes(migration="m1")] == [vol.id]
    assert (vol.format, vol.encrypted, vol.availability_zone, vol.backend) == ("raw", False, "zone-a", "ssd-a")
    assert vol.metadata == {"source": "a.qcow2"} and vol.created_at is not None
    path = Path(vol.path)
    assert path.parent == store.data_dir / "backends/ssd-a/volumes" and path.name == f"{vol.id}.img"
    st = path.stat()
    assert st.st_size == 2 * GiB and st.st_blocks == 0
    assert mode(path) == 0o600
    assert usage(store, "demo", "gigabytes") == (2000, 2, 0)  # consumed once, not twice


def test_create_volume_refuses_what_was_not_reserved(store):
    res = store.reserve("demo", "m1", "standard-ssd", [2])
    kwargs = dict(reservation_id=res.id, migration="m1", name="d", volume_type="standard-ssd",
                  availability_zone="zone-a", metadata={})
    with pytest.raises(InvalidRequest, match="disk 1 does not exist"):
        store.create_volume(disk_index=1, size_gib=2, **kwargs)
    with pytest.raises(InvalidRequest, match="asked for m1, standard-ssd, 5 GiB"):
        store.create_volume(disk_index=0, size_gib=5, **kwargs)
    with pytest.raises(InvalidRequest, match="availability zone zone-a, not zone-b"):
        store.create_volume(disk_index=0, size_gib=2, **{**kwargs, "availability_zone": "zone-b"})
    vol = store.create_volume(disk_index=0, size_gib=2, **kwargs)
    store.delete_volume(vol.id)
    with pytest.raises(InvalidRequest, match="already used"):
        store.create_volume(disk_index=0, size_gib=2, **kwargs)


def test_raw_target_is_fresh_until_opened_for_writing(store):
    _, vol = make_volume(store)
    with store.open_target(vol.id, writable=False) as ep:
        assert (ep.kind, ep.path, ep.size, ep.fresh) == ("file", vol.path, GiB, True)
    with store.open_target(vol.id) as ep:
        assert ep.fresh
        with open(ep.path, "r+b") as f:
            f.seek(GiB - 4)
            f.write(b"tail")
    with store.open_target(vol.id, writable=False) as ep:
        assert not ep.fresh
        with open(ep.path, "rb") as f:
            f.seek(GiB - 4)
            assert f.read() == b"tail"
    assert Path(vol.path).stat().st_size == GiB  # writing the tail did not grow the volume


def test_metadata_bootable_snapshots_instances(store):
    _, vol = make_volume(store)
    _, vol2 = make_volume(store, "m2")
    assert store.update_metadata(vol.id, {"os": "linux"}).metadata == {"source": "a.qcow2", "os": "linux"}
    assert store.set_bootable(vol.id, True).bootable and store.get_volume(vol.id).bootable
    with open(vol.path, "r+b") as f:
        f.write(b"boot")
    snap = store.create_snapshot(vol.id, "post-migration")
    assert store.create_snapshot(vol.id, "post-migration").id == snap.id
    assert snap.status == "available" and snap.size_gib == 1 and Path(snap.path).parent.name == "snapshots"
    assert head(snap.path, 4) == b"boot" and mode(snap.path) == 0o600
    assert Path(snap.path).stat().st_blocks < 64  # copied sparse: 1 GiB file, a few KiB allocated
    assert [s.id for s in store.list_snapshots(vol.id)] == [snap.id] and store.list_snapshots(vol2.id) == []

    inst = store.ensure_instance("vm1", "demo")
    assert store.ensure_instance("vm1", "demo").id == inst.id
    store.attach(inst.id, vol2.id, 1)
    assert store.attach(inst.id, vol.id, 0).volume_ids == [vol.id, vol2.id]  # boot order
    assert store.attach(inst.id, vol.id, 0).volume_ids == [vol.id, vol2.id]  # idempotent
    with pytest.raises(InvalidRequest, match="already taken"):
        store.attach(inst.id, vol.id, 2)
    with pytest.raises(InvalidRequest, match="already exists in project demo"):
        store.ensure_instance("vm1", "other")
    store.delete_instance("vm1")
    store.delete_instance("vm1")
    assert store.ensure_instance("vm1", "demo").volume_ids == []


def test_delete_volume_removes_files_and_frees_quota(store):
    _, vol = make_volume(store, size=3)
    snap = store.create_snapshot(vol.id, "s1")
    inst = store.ensure_instance("vm1", "demo")
    store.attach(inst.id, vol.id, 0)
    assert usage(store, "demo", "gigabytes")[1] == 3
    store.delete_volume(vol.id)
    store.delete_volume(vol.id)  # idempotent
    assert not Path(vol.path).exists() and not Path(snap.path).exists()
    assert usage(store, "demo", "gigabytes")[1:] == (0, 0) and usage(store, "demo", "volumes")[1:] == (0, 0)
    assert store.list_volumes(project="demo") == [] and store.list_snapshots() == []
    assert store.ensure_instance("vm1", "demo").volume_ids == []
    with pytest.raises(NotFound):
        store.get_volume(vol.id)


def test_a_demo_removes_what_earlier_demos_left_and_nothing_else(store):
    """Repeated `make demo` runs must not fill the disk: earlier demo migrations' volumes, snapshots,
    instances and reservations go; another project's volume stays."""
    from rich.console import Console

    from xms.demo import DEMO_PROJECT, _remove_earlier_demos

    kept = []
    for name, project in (("demo-cold-1", DEMO_PROJECT), ("demo-warm-1", DEMO_PROJECT), ("prod-1", "prod")):
        res = store.reserve(project, name, "standard-ssd", [1, 1])
        for i in (0, 1):
            v = store.create_volume(reservation_id=res.id, migration=name, disk_index=i, name=f"{name}-disk{i}",
                                    size_gib=1, volume_type="standard-ssd", availability_zone="zone-a",
                                    metadata={"xms.migration": name})
            kept.append((v, store.create_snapshot(v.id, "post")))
        store.attach(store.ensure_instance(name, project).id, v.id, 0)
    console = Console(record=True, width=200)
    _remove_earlier_demos(store, console)
    assert "removed 4 volumes" in console.export_text()
    assert [v.name for v in store.list_volumes()] == ["prod-1-disk0", "prod-1-disk1"]
    for v, snap in kept:
        assert Path(v.path).exists() == Path(snap.path).exists() == (v.project == "prod")
    assert usage(store, DEMO_PROJECT, "gigabytes")[1:] == (0, 0)
    assert store.get_instance("demo-cold-1") is None and store.get_instance("prod-1").volume_ids
    _remove_earlier_demos(store, console)  # nothing left to remove: no second line
    assert console.export_text() == ""


# --------------------------------------------------------------------------- encryption


def test_encrypted_volume_keeps_plaintext_off_disk(store, tmp_path):
    pattern = tmp_path / "pattern"
    pattern.write_bytes((MARKER * 4000)[:65536])
    _, raw = make_volume(store, "plain")
    # control: the same write to an unencrypted volume does put the marker on disk
    with store.open_target(raw.id) as ep:
        qemu_io(ep.path, f"write -s {pattern} 0 64k")
    assert MARKER in head(raw.path, 65536)

    _, vol = make_volume(store, "secret", vtype="encrypted-ssd")
    assert (vol.format, vol.encrypted) == ("qcow2", True) and vol.path.endswith(".qcow2")
    key = store.data_dir / "keys" / f"{vol.id}.key"
    assert len(bytes.fromhex(key.read_text())) == 32
    assert mode(key) == 0o600 and mode(key.parent) == 0o700 and mode(vol.path) == 0o600
    started = time.monotonic()
    with store.open_target(vol.id, writable=False) as ep:
        assert ep.kind == "nbd" and ep.fresh  # readers do not spoil freshness
    assert time.monotonic() - started < NBD_STOP_TIMEOUT_S  # qemu-nbd stopped by SIGTERM, not SIGKILL
    with store.open_target(vol.id) as ep:
        assert ep.kind == "nbd" and ep.fresh and ep.size == GiB
        sock = ep.uri.split("socket=", 1)[1]
        assert mode(Path(sock).parent) == 0o700 and Path(sock).parent.parent == store.data_dir / "run"
        qemu_io(ep.uri, f"write -s {pattern} 1M 64k", "read -P 0 0 1M")
    assert not Path(sock).parent.exists()  # qemu-nbd stopped, its directory removed
    image = Path(vol.path).read_bytes()
    assert MARKER not in image and b"LUKS" in image

    with store.open_target(vol.id, writable=False) as ep:
        assert not ep.fresh
        h = nbd.NBD()
        h.connect_uri(ep.uri)
        assert h.is_read_only() and h.get_size() == GiB
        assert h.pread(65536, MiB) == pattern.read_bytes()
        assert h.pread(MiB, 0) == bytes(MiB)
        h.shutdown()

    store.delete_volume(vol.id)
    assert not Path(vol.path).exists() and not key.exists()


def test_nbd_start_failure_is_one_line_and_leaves_nothing_behind(store):
    _, vol = make_volume(store, "secret", vtype="encrypted-ssd")
    (store.data_dir / "keys" / f"{vol.id}.key").unlink()
    with pytest.raises(TransientIOError) as e:
        with store.open_target(vol.id):
            pytest.fail("the endpoint must not be handed out")
    assert str(e.value).startswith(f"qemu-nbd for volume {vol.id} did not start: ") and "\n" not in str(e.value)
    assert list((store.data_dir / "run").iterdir()) == []


def test_file_and_directory_modes(tmp_path):
    class Settings:
        data_dir = tmp_path / "xms"
        config = None

    store = open_local_store(Settings())
    _, vol = make_volume(store)
    assert mode(store.data_dir / "store.db") == 0o600
    for f in store.data_dir.glob("store.db-*"):  # WAL and shared-memory files
        assert mode(f) == 0o600, f
    for d in (store.data_dir, store.data_dir / "keys", store.data_dir / "run", Path(vol.path).parent):
        assert mode(d) == 0o700, d
    assert mode(vol.path) == 0o600


def test_signatures_match_the_port():
    import inspect

    from activities.blockstorage.port import BlockStorage

    names = [n for n in vars(BlockStorage) if not n.startswith("_") and callable(getattr(BlockStorage, n))]
    assert "open_target" in names and "reserve" in names
    for name in names:
        port, local = inspect.signature(getattr(BlockStorage, name)), inspect.signature(getattr(LocalBlockStore, name))
        assert list(port.parameters) == list(local.parameters), name
        assert [p.kind for p in port.parameters.values()] == [p.kind for p in local.parameters.values()], name
