"""The embedded block store: volumes are files under backend directories, bookkeeping is SQLite.

Unencrypted volume types are sparse raw files (attached as a plain file); encrypted types are
LUKS-encrypted qcow2 images with a per-volume key file, attached through a private qemu-nbd
on a unix socket. Quota checks and reservations run inside one ``BEGIN IMMEDIATE``
transaction, so concurrent workers (threads or processes) never overrun a limit.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

from activities.blockstorage.serve import serve_image
from xms.config import QUOTA_KEY_RE, XmsConfig, check_quota_limits, load_config
from xms.errors import InvalidRequest, NotFound, QuotaExceeded, TransientIOError, UnknownVolumeType
from xms.models import (GiB, InstanceRef, QuotaReport, QuotaUsage, Reservation, SnapshotRef, TargetEndpoint,
                        VolumeRef, VolumeTypeInfo)

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, project TEXT NOT NULL, migration TEXT,
    disk_index INTEGER, size_gib INTEGER NOT NULL, volume_type TEXT NOT NULL,
    backend TEXT NOT NULL, az TEXT NOT NULL, status TEXT NOT NULL,
    bootable INTEGER NOT NULL DEFAULT 0, encrypted INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL, format TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}',
    written INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS volumes_disk ON volumes (migration, disk_index)
    WHERE status != 'deleted';
CREATE INDEX IF NOT EXISTS volumes_project ON volumes (project, status);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, volume_id TEXT NOT NULL, size_gib INTEGER NOT NULL,
    status TEXT NOT NULL, path TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE (volume_id, name));
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, project TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attachments (
    instance_id TEXT NOT NULL, volume_id TEXT NOT NULL UNIQUE, idx INTEGER NOT NULL,
    PRIMARY KEY (instance_id, idx));
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, migration TEXT NOT NULL UNIQUE,
    volume_type TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reservation_items (
    reservation_id TEXT NOT NULL, disk_index INTEGER NOT NULL, size_gib INTEGER NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (reservation_id, disk_index));
CREATE TABLE IF NOT EXISTS quota_limits (
    project TEXT NOT NULL, key TEXT NOT NULL, lim INTEGER NOT NULL, PRIMARY KEY (project, key));
"""



def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _run(argv: list[str], what: str) -> None:
    for attempt in range(3):
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode == 0:
            return
        # qemu's LUKS key-slot benchmark reads thread CPU time, which this kernel may report as 0
        # for a short burst: "Unable to get accurate CPU usage". Measuring again succeeds.
        if "accurate CPU usage" not in proc.stderr:
            break
    detail = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
    raise TransientIOError(f"{what} failed (exit {proc.returncode}): {detail}")


def _install(final: Path, make: Callable[[Path], None]) -> None:
    """Build a file next to ``final`` and link it into place; an existing file is left alone,
    so a retried or concurrent call never replaces a file that may already hold data."""
    if final.exists():
        _drop_partials(final)
        return
    tmp = final.with_name(f".{final.name}.{uuid4().hex}.tmp")
    try:
        make(tmp)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    _drop_partials(final)


def _drop_partials(final: Path) -> None:
    """Half-built siblings of ``final`` left by a worker killed while making it."""
    for p in final.parent.glob(f".{final.name}.*.tmp"):
        p.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)


def _quota_key(key: str) -> tuple[str, str | None]:
    """``gigabytes_standard-ssd`` -> ("gigabytes", "standard-ssd"); ``volumes`` -> ("volumes", None).
    Keys reaching here were validated by ``check_quota_limits``."""
    kind, suffix = QUOTA_KEY_RE.match(key).groups()
    return kind, suffix[1:] if suffix else None


class LocalBlockStore:
    """``BlockStorage`` on this host's filesystem. Safe to use from many threads and processes."""

    def __init__(self, config: XmsConfig, data_dir: Path):
        self.config = config
        self.data_dir = _private_dir(Path(data_dir))
        self.db_path = self.data_dir / "store.db"
        os.close(os.open(self.db_path, os.O_CREAT | os.O_RDWR, 0o600))  # WAL/SHM inherit this mode
        os.chmod(self.db_path, 0o600)
        for backend in config.backends:
            root = _private_dir(config.backend_dir(backend, self.data_dir))
            _private_dir(root / "volumes")
            _private_dir(root / "snapshots")
        self.keys_dir = _private_dir(self.data_dir / "keys")
        self.run_dir = _private_dir(self.data_dir / "run")
        with self._conn() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    # ------------------------------------------------------------------ sqlite plumbing

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        con.row_factory = sqlite3.Row
        with closing(con):
            con.execute("PRAGMA busy_timeout=30000")
            yield con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the lock is taken up front, so check-then-write is atomic."""
        with self._conn() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # ------------------------------------------------------------------ catalogue

    def volume_types(self) -> list[VolumeTypeInfo]:
        return self.config.all_volume_types()

    def get_volume_type(self, name: str) -> VolumeTypeInfo:
        if name not in self.config.volume_types:
            valid = ", ".join(sorted(self.config.volume_types))
            raise UnknownVolumeType(f"unknown volume type {name!r}; valid types: {valid}")
        return self.config.volume_type(name)

    # ------------------------------------------------------------------ quota

    def _limits(self, con: sqlite3.Connection, project: str) -> dict[str, int]:
        limits = dict(self.config.quotas.default)
        limits.update(self.config.quotas.projects.get(project, {}))
        rows = con.execute("SELECT key, lim FROM quota_limits WHERE project = ?", (project,))
        limits.update({r["key"]: r["lim"] for r in rows})
        return limits

    def _usage(self, con: sqlite3.Connection, project: str, key: str) -> tuple[int, int]:
        """(in use, reserved) for a quota key: volume count or GiB, optionally of one type."""
        kind, vtype = _quota_key(key)
        agg = "COUNT(*)" if kind == "volumes" else "COALESCE(SUM(size_gib), 0)"
        where, args = ("project = ? AND volume_type = ?", (project, vtype)) if vtype else ("project = ?", (project,))
        in_use = con.execute(f"SELECT {agg} FROM volumes WHERE status != 'deleted' AND {where}", args)
        reserved = con.execute(
            f"SELECT {agg} FROM reservation_items JOIN reservations ON id = reservation_id "
            f"WHERE consumed = 0 AND {where}", args)
        return in_use.fetchone()[0], reserved.fetchone()[0]

    def _report(self, con: sqlite3.Connection, project: str) -> QuotaReport:
        limits = self._limits(con, project)
        keys = ["volumes", "gigabytes", *(f"gigabytes_{t}" for t in sorted(self.config.volume_types))]
        keys += sorted(k for k in limits if k not in keys)
        quotas = {}
        for key in keys:
            in_use, reserved = self._usage(con, project, key)
            quotas[key] = QuotaUsage(limit=limits.get(key, -1), in_use=in_use, reserved=reserved)
        return QuotaReport(project=project, quotas=quotas)

    def quota(self, project: str) -> QuotaReport:
        with self._conn() as con:
            return self._report(con, project)

    def set_quota(self, project: str, limits: dict[str, int]) -> QuotaReport:
        try:
            check_quota_limits(limits)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        for key in limits:
            if (vtype := _quota_key(key)[1]) is not None:
                self.get_volume_type(vtype)
        with self._tx() as con:
            con.executemany(
                "INSERT INTO quota_limits (project, key, lim) VALUES (?, ?, ?) "
                "ON CONFLICT (project, key) DO UPDATE SET lim = excluded.lim",
                [(project, k, v) for k, v in limits.items()])
            return self._report(con, project)

    def reserve(self, project: str, migration: str, volume_type: str, sizes_gib: list[int], *,
                snapshots: bool = False) -> Reservation:
        self.get_volume_type(volume_type)
        if not sizes_gib or any(s < 1 for s in sizes_gib):
            raise InvalidRequest(f"reservation for {migration} needs one size >= 1 GiB per disk, got {sizes_gib}")
        with self._tx() as con:
            row = con.execute("SELECT * FROM reservations WHERE migration = ?", (migration,)).fetchone()
            if row is not None:
                sizes = [r[0] for r in con.execute("SELECT size_gib FROM reservation_items WHERE reservation_id = ?"
                                                   " ORDER BY disk_index", (row["id"],))]
                if (row["project"], row["volume_type"], sizes) != (project, volume_type, list(sizes_gib)):
                    raise InvalidRequest(
                        f"migration {migration} already holds reservation {row['id']} for project {row['project']}, "
                        f"type {row['volume_type']}, sizes {sizes} GiB")
                return self._reservation(con, row["id"])
            limits = self._limits(con, project)
            for key in ("volumes", "gigabytes", f"volumes_{volume_type}", f"gigabytes_{volume_type}"):
                limit = limits.get(key, -1)
                if limit < 0:
                    continue
                count = key.startswith("volumes")
                requested = len(sizes_gib) if count else sum(sizes_gib)
                in_use, reserved = self._usage(con, project, key)
                if in_use + reserved + requested > limit:
                    u = "" if count else " GiB"
                    raise QuotaExceeded(
                        f"quota exceeded for project {project}: {key} requested {requested}{u}, limit {limit}{u}, "
                        f"in use {in_use}{u}, reserved {reserved}{u}")
            rid = str(uuid4())
            con.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?)",
                        (rid, project, migration, volume_type, _now()))
            con.executemany("INSERT INTO reservation_items (reservation_id, disk_index, size_gib) VALUES (?, ?, ?)",
                            [(rid, i, s) for i, s in enumerate(sizes_gib)])
            return self._reservation(con, rid)

    def _reservation(self, con: sqlite3.Connection, rid: str) -> Reservation:
        row = con.execute(
            "SELECT r.*, COUNT(i.disk_index) AS n, COALESCE(SUM(i.size_gib), 0) AS gib FROM reservations r "
            "LEFT JOIN reservation_items i ON i.reservation_id = r.id WHERE r.id = ? GROUP BY r.id", (rid,)).fetchone()
        return Reservation(id=rid, project=row["project"], volume_type=row["volume_type"],
                           volumes=row["n"], gigabytes=row["gib"])

    def release_migration(self, migration: str) -> None:
        """Release whatever reservation ``migration`` holds (cleanup that lost the id). Idempotent."""
        with self._tx() as con:
            for (rid,) in con.execute("SELECT id FROM reservations WHERE migration = ?", (migration,)).fetchall():
                con.execute("DELETE FROM reservation_items WHERE reservation_id = ?", (rid,))
                con.execute("DELETE FROM reservations WHERE id = ?", (rid,))

    def release(self, reservation_id: str) -> None:
        # consumed items no longer count against quota (their volumes do), so all items go
        with self._tx() as con:
            con.execute("DELETE FROM reservation_items WHERE reservation_id = ?", (reservation_id,))
            con.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))

    # ------------------------------------------------------------------ volumes

    def _volume(self, row: sqlite3.Row) -> VolumeRef:
        return VolumeRef(
            id=row["id"], name=row["name"], project=row["project"], size_gib=row["size_gib"],
            volume_type=row["volume_type"], backend=row["backend"], availability_zone=row["az"],
            status=row["status"], bootable=bool(row["bootable"]), encrypted=bool(row["encrypted"]),
            path=row["path"], format=row["format"], metadata=json.loads(row["metadata"]),
            created_at=datetime.fromisoformat(row["created_at"]))

    def _row(self, con: sqlite3.Connection, volume_id: str) -> sqlite3.Row:
        row = con.execute("SELECT * FROM volumes WHERE id = ? AND status != 'deleted'", (volume_id,)).fetchone()
        if row is None:
            raise NotFound(f"volume {volume_id} not found")
        return row

    def _key_path(self, volume_id: str) -> Path:
        return self.keys_dir / f"{volume_id}.key"

    def create_volume(self, *, reservation_id: str, migration: str, disk_index: int, name: str, size_gib: int,
                      volume_type: str, availability_zone: str, metadata: dict[str, str]) -> VolumeRef:
        vt = self.get_volume_type(volume_type)
        if availability_zone != vt.availability_zone:
            raise InvalidRequest(f"volume type {volume_type} lives in availability zone {vt.availability_zone}, "
                                 f"not {availability_zone}")
        with self._tx() as con:
            row = con.execute("SELECT * FROM volumes WHERE migration = ? AND disk_index = ? AND status != 'deleted'",
                              (migration, disk_index)).fetchone()
            if row is None:
                res = con.execute(
                    "SELECT r.project, r.migration, r.volume_type, i.size_gib, i.consumed FROM reservations r "
                    "JOIN reservation_items i ON i.reservation_id = r.id WHERE r.id = ? AND i.disk_index = ?",
                    (reservation_id, disk_index)).fetchone()
                if res is None or res["consumed"]:
                    state = "is already used" if res else "does not exist"
                    raise InvalidRequest(f"reservation {reservation_id} item for disk {disk_index} {state}")
                if (res["migration"], res["volume_type"], res["size_gib"]) != (migration, volume_type, size_gib):
                    raise InvalidRequest(
                        f"reservation {reservation_id} disk {disk_index} is for migration {res['migration']}, "
                        f"type {res['volume_type']}, {res['size_gib']} GiB; asked for {migration}, {volume_type}, "
                        f"{size_gib} GiB")
                vid = str(uuid4())
                fmt = "qcow2" if vt.encrypted else "raw"
                ext = "qcow2" if vt.encrypted else "img"
                path = self.config.backend_dir(vt.backend, self.data_dir) / "volumes" / f"{vid}.{ext}"
                con.execute(
                    "INSERT INTO volumes (id, name, project, migration, disk_index, size_gib, volume_type, backend, az,"
                    " status, encrypted, path, format, metadata, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?, ?)",
                    (vid, name, res["project"], migration, disk_index, size_gib, volume_type, vt.backend,
                     availability_zone, int(vt.encrypted), str(path), fmt,
                     json.dumps({k: str(v) for k, v in metadata.items()}), _now()))
                con.execute("UPDATE reservation_items SET consumed = 1 WHERE reservation_id = ? AND disk_index = ?",
                            (reservation_id, disk_index))
                row = con.execute("SELECT * FROM volumes WHERE id = ?", (vid,)).fetchone()
        if row["status"] == "creating":  # also finishes a volume whose creator died half-way
            self._make_file(row)
            with self._tx() as con:
                con.execute("UPDATE volumes SET status = 'available' WHERE id = ? AND status = 'creating'",
                            (row["id"],))
        return self.get_volume(row["id"])

    def _make_file(self, row: sqlite3.Row) -> None:
        path, size = Path(row["path"]), row["size_gib"] * GiB
        if row["format"] == "raw":
            def sparse(tmp: Path) -> None:
                with open(tmp, "xb") as f:
                    f.truncate(size)
            _install(path, sparse)
            return
        key = self._key_path(row["id"])
        _install(key, lambda tmp: _write_private(tmp, secrets.token_hex(32)))
        # the secret is 256 random bits, so LUKS key stretching adds nothing but 2 s per open
        _install(path, lambda tmp: _run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "--object", f"secret,id=sec0,file={key}",
             "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(tmp), str(size)],
            f"creating encrypted volume {row['id']}"))

    def get_volume(self, volume_id: str) -> VolumeRef:
        with self._conn() as con:
            return self._volume(self._row(con, volume_id))

    def list_volumes(self, *, project: str | None = None, migration: str | None = None) -> list[VolumeRef]:
        with self._conn() as con:
            rows = con.execute(
                "SELECT * FROM volumes WHERE status != 'deleted' AND (?1 IS NULL OR project = ?1)"
                " AND (?2 IS NULL OR migration = ?2) ORDER BY created_at, migration, disk_index",
                (project, migration)).fetchall()
        return [self._volume(r) for r in rows]

    def delete_volume(self, volume_id: str) -> None:
        with self._conn() as con:
            row = con.execute("SELECT * FROM volumes WHERE id = ? AND status != 'deleted'", (volume_id,)).fetchone()
            snaps = [r["path"] for r in con.execute("SELECT path FROM snapshots WHERE volume_id = ?", (volume_id,))]
        if row is None:
            return
        # files first: a crash part-way leaves a row that the retry deletes, never an orphaned file
        for p in [*snaps, row["path"], self._key_path(volume_id)]:
            Path(p).unlink(missing_ok=True)
            _drop_partials(Path(p))
        with self._tx() as con:
            con.execute("DELETE FROM attachments WHERE volume_id = ?", (volume_id,))
            con.execute("DELETE FROM snapshots WHERE volume_id = ?", (volume_id,))
            con.execute("UPDATE volumes SET status = 'deleted' WHERE id = ?", (volume_id,))

    def set_bootable(self, volume_id: str, bootable: bool) -> VolumeRef:
        with self._tx() as con:
            self._row(con, volume_id)
            con.execute("UPDATE volumes SET bootable = ? WHERE id = ?", (int(bootable), volume_id))
            return self._volume(self._row(con, volume_id))

    def update_metadata(self, volume_id: str, metadata: dict[str, str]) -> VolumeRef:
        with self._tx() as con:
            merged = json.loads(self._row(con, volume_id)["metadata"]) | {k: str(v) for k, v in metadata.items()}
            con.execute("UPDATE volumes SET metadata = ? WHERE id = ?", (json.dumps(merged), volume_id))
            return self._volume(self._row(con, volume_id))

    @contextmanager
    def open_target(self, volume_id: str, *, writable: bool = True) -> Iterator[TargetEndpoint]:
        # ``fresh`` is decided and cleared in one transaction when a writer opens the volume, so a
        # writer that dies half-way never leaves the next one believing the volume is all zeroes
        with self._tx() as con:
            row = self._row(con, volume_id)
            if row["status"] != "available":
                raise InvalidRequest(f"volume {volume_id} is {row['status']}, not available")
            if writable:
                con.execute("UPDATE volumes SET written = 1 WHERE id = ?", (volume_id,))
        fresh, size = not row["written"], row["size_gib"] * GiB
        if row["format"] == "raw":
            yield TargetEndpoint(kind="file", path=row["path"], size=size, fresh=fresh)
            return
        image = ["--object", f"secret,id=sec0,file={self._key_path(row['id'])}", "--image-opts",
                 f"driver=qcow2,file.filename={row['path']},encrypt.key-secret=sec0"]
        with serve_image(image, self.run_dir, writable=writable, what=f"volume {row['id']}") as uri:
            yield TargetEndpoint(kind="nbd", uri=uri, size=size, fresh=fresh)

    # ------------------------------------------------------------------ snapshots and instances

    def _snapshot(self, row: sqlite3.Row) -> SnapshotRef:
        return SnapshotRef(id=row["id"], name=row["name"], volume_id=row["volume_id"], size_gib=row["size_gib"],
                           status=row["status"], path=row["path"])

    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRef:
        with self._tx() as con:
            vol = self._row(con, volume_id)
            if vol["status"] != "available":
                raise InvalidRequest(f"volume {volume_id} is {vol['status']}, not available")
            snap = con.execute("SELECT * FROM snapshots WHERE volume_id = ? AND name = ?", (volume_id, name)).fetchone()
            if snap is None:
                sid = str(uuid4())
                ext = "qcow2" if vol["format"] == "qcow2" else "img"
                path = self.config.backend_dir(vol["backend"], self.data_dir) / "snapshots" / f"{sid}.{ext}"
                con.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?, 'creating', ?, ?)",
                            (sid, name, volume_id, vol["size_gib"], str(path), _now()))
                snap = con.execute("SELECT * FROM snapshots WHERE id = ?", (sid,)).fetchone()
        if snap["status"] == "creating":
            _install(Path(snap["path"]), lambda tmp: _run(
                ["cp", "--sparse=always", vol["path"], str(tmp)], f"snapshot of volume {volume_id}"))
            with self._tx() as con:
                con.execute("UPDATE snapshots SET status = 'available' WHERE id = ?", (snap["id"],))
                snap = con.execute("SELECT * FROM snapshots WHERE id = ?", (snap["id"],)).fetchone()
        return self._snapshot(snap)

    def create_backup(self, volume_id: str, name: str) -> str:
        """The embedded store has no backup service: the snapshot is all there is."""
        return ""

    def list_snapshots(self, volume_id: str | None = None) -> list[SnapshotRef]:
        with self._conn() as con:
            rows = con.execute("SELECT * FROM snapshots WHERE ?1 IS NULL OR volume_id = ?1 ORDER BY created_at",
                               (volume_id,)).fetchall()
        return [self._snapshot(r) for r in rows]

    def _instance(self, con: sqlite3.Connection, where: str, arg: str) -> InstanceRef | None:
        row = con.execute(f"SELECT * FROM instances WHERE {where} = ?", (arg,)).fetchone()
        if row is None:
            return None
        vols = con.execute("SELECT volume_id FROM attachments WHERE instance_id = ? ORDER BY idx", (row["id"],))
        return InstanceRef(id=row["id"], name=row["name"], project=row["project"], volume_ids=[v[0] for v in vols])

    def get_instance(self, name: str) -> InstanceRef | None:
        with self._conn() as con:
            return self._instance(con, "name", name)

    def ensure_instance(self, name: str, project: str) -> InstanceRef:
        with self._tx() as con:
            inst = self._instance(con, "name", name)
            if inst is None:
                con.execute("INSERT INTO instances VALUES (?, ?, ?, ?)", (str(uuid4()), name, project, _now()))
                inst = self._instance(con, "name", name)
            elif inst.project != project:
                raise InvalidRequest(f"instance {name} already exists in project {inst.project}")
            return inst

    def attach(self, instance_id: str, volume_id: str, index: int) -> InstanceRef:
        with self._tx() as con:
            inst = self._instance(con, "id", instance_id)
            if inst is None:
                raise NotFound(f"instance {instance_id} not found")
            vol = self._row(con, volume_id)
            if vol["project"] != inst.project:
                raise InvalidRequest(f"volume {volume_id} is in project {vol['project']}, "
                                     f"instance {inst.name} in {inst.project}")
            held = con.execute("SELECT * FROM attachments WHERE volume_id = ? OR (instance_id = ? AND idx = ?)",
                               (volume_id, instance_id, index)).fetchall()
            if any((h["instance_id"], h["volume_id"], h["idx"]) != (instance_id, volume_id, index) for h in held):
                raise InvalidRequest(f"cannot attach volume {volume_id} to {inst.name} at {index}: "
                                     "the volume or that position is already taken")
            if not held:
                con.execute("INSERT INTO attachments VALUES (?, ?, ?)", (instance_id, volume_id, index))
            return self._instance(con, "id", instance_id)

    def delete_instance(self, name: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM attachments WHERE instance_id IN"
                        " (SELECT id FROM instances WHERE name = ?)", (name,))
            con.execute("DELETE FROM instances WHERE name = ?", (name,))

    def check_launch(self, flavor: str, network: str) -> None:
        raise InvalidRequest(NO_SERVERS)

    def launch_instance(self, name: str, project: str, volume_ids: list[str], flavor: str, network: str) -> InstanceRef:
        raise InvalidRequest(NO_SERVERS)

    def instance_console(self, instance_id: str) -> str | None:
        return None  # the worker boots the volumes in qemu itself


NO_SERVERS = ("the embedded store runs no servers: --flavor and --network need --target openstack "
              "(start the embedded store's instance with `xms instance start`)")


def open_local_store(settings) -> LocalBlockStore:
    """The store configured by ``Settings`` (``XMS_CONFIG``, ``XMS_DATA_DIR``)."""
    return LocalBlockStore(load_config(settings.config), settings.data_dir)
