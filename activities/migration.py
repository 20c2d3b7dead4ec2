"""Activities of MigrationWorkflow: every side effect of a migration lives here.

They are synchronous (libnbd and the store block) and run on the worker's thread pool. Errors
from adapters (``xms.errors``) become ApplicationErrors with a stable type; permanent ones are
non-retryable.
"""

from __future__ import annotations

import contextvars
import functools
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities import copyengine
from activities.blockstorage import delete_migration_volumes
from activities.blockstorage.port import BlockStorage
from activities.transport import cbt
from activities.transport import nbd as transport
from xms import telemetry
from xms.config import load_config
from xms.errors import DuplicateMigration, InvalidAvailabilityZone, InvalidRequest, SourceCannotTrack, XmsError
from xms.models import (
    BootInput,
    BootResult,
    Checksums,
    CleanupInput,
    CopyInput,
    CopyProgress,
    CopyResult,
    CreateVolumeInput,
    DiskPlan,
    FinalizeInput,
    LaunchInput,
    GuestInfo,
    GuestInput,
    InstanceRef,
    MigrationRequest,
    Reservation,
    ReserveInput,
    SnapshotInput,
    SnapshotRef,
    TrackerInput,
    ValidationResult,
    MiB,
    VolumeRef,
    merge_ranges,
)
from xms.settings import Settings

F = TypeVar("F", bound=Callable)


def _log(**extra):
    info = activity.info()
    return telemetry.get_logger(
        workflow_id=info.workflow_id, run_id=info.workflow_run_id, activity=info.activity_type,
        attempt=info.attempt, **extra,
    )


def _errors(fn: F) -> F:
    """Map xms errors to ApplicationErrors (non-retryable unless marked transient) and count failures."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XmsError as e:
            telemetry.ACTIVITY_FAILURES.labels(activity.info().activity_type, e.type).inc()
            _log().warning("activity failed", error_type=e.type, error=str(e))
            raise ApplicationError(str(e), type=e.type, non_retryable=not e.retryable) from None
        except CancelledError:
            raise
        except Exception as e:
            telemetry.ACTIVITY_FAILURES.labels(activity.info().activity_type, type(e).__name__).inc()
            _log().warning("activity failed", error_type=type(e).__name__, error=str(e))
            raise

    return wrapper  # type: ignore[return-value]


BEAT_EVERY_S = 2.0


def _beating(fn: F) -> F:
    """Heartbeat from a side thread while a blocking step runs (a Cinder create waiting for
    "available"), so a worker that dies mid-step is noticed after the heartbeat timeout, not
    after the start-to-close timeout. Not for copy_disk: its heartbeats carry the resume offset."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        done = threading.Event()
        ctx = contextvars.copy_context()

        def beat() -> None:
            while not done.wait(BEAT_EVERY_S):
                activity.heartbeat()

        t = threading.Thread(target=ctx.run, args=(beat,), daemon=True)
        t.start()
        try:
            return fn(*args, **kwargs)
        finally:
            done.set()
            t.join()

    return wrapper  # type: ignore[return-value]


class MigrationActivities:
    def __init__(self, settings: Settings, store: BlockStorage):
        self.settings = settings
        self.store = store
        self.config = load_config(settings.config)

    # ------------------------------------------------------------------ admission

    @activity.defn(name="validate")
    @_errors
    def validate(self, req: MigrationRequest) -> ValidationResult:
        mine = (self.settings.target, self.settings.cloud if self.settings.target == "openstack" else None)
        if (req.target, req.cloud if req.target == "openstack" else None) != mine:
            raise InvalidRequest(
                f"this request is for target {req.target}{f' (cloud {req.cloud})' if req.cloud else ''}, "
                f"but the workers serve {mine[0]}{f' (cloud {mine[1]})' if mine[1] else ''}; "
                "submit with the same XMS_TARGET / OS_CLOUD as the workers")
        vt = self.store.get_volume_type(req.volume_type)
        if req.availability_zone and req.availability_zone != vt.availability_zone:
            raise InvalidAvailabilityZone(
                f"volume type {vt.name} is served in availability zone {vt.availability_zone} only; "
                f"--az {req.availability_zone} is not allowed (omit --az or use {vt.availability_zone})"
            )
        with ThreadPoolExecutor(max_workers=min(8, len(req.disks))) as pool:
            infos = list(pool.map(self._probe, req.disks))
        if req.power_off_hook:
            self.config.hook(req.power_off_hook, migration=req.name, source="")  # refuses unknown hooks
        if req.flavor:
            self.store.check_launch(req.flavor, req.network)  # refuses an unknown flavor or network now
        for s in infos:
            if req.mode == "cold" and s.kind == "qmp":
                raise InvalidRequest(f"{s.location} is a live disk; live disks can only be migrated with --mode warm")
            why = cbt.can_track(s.location, s.kind, s.format, req.bitmap) if req.mode == "warm" else None
            if why:
                raise SourceCannotTrack(f"cannot migrate warm: {why}")
        disks = [
            DiskPlan(
                index=i, source=s.location, source_kind=s.kind, source_format=s.format,
                virtual_size=s.virtual_size, volume_size_gib=vt.footprint_gib(s.virtual_size),
            )
            for i, s in enumerate(infos)
        ]
        _log().info("validated", disks=len(disks), footprint_gib=sum(d.volume_size_gib for d in disks))
        return ValidationResult(
            volume_type=vt, availability_zone=vt.availability_zone, disks=disks,
            host_queue=self.settings.effective_host_queue,
        )

    def _probe(self, source: str) -> transport.SourceInfo:
        if source.startswith("qmp"):
            from activities.transport.live import live_disk

            return transport.SourceInfo("qmp", source, "raw", live_disk(source, self.settings.run_dir).size())
        return transport.probe(source)

    @activity.defn(name="reserve")
    @_errors
    @_beating
    def reserve(self, inp: ReserveInput) -> Reservation:
        kept = self.store.list_volumes(migration=inp.migration)
        if kept:
            raise DuplicateMigration(
                f"volumes kept from an earlier failed run of {inp.migration} still exist "
                f"({', '.join(v.id for v in kept)}); delete them with `xms cleanup {inp.migration}` or choose another name"
            )
        r = self.store.reserve(inp.project, inp.migration, inp.volume_type, inp.sizes_gib, snapshots=inp.snapshots)
        _log().info("reserved", reservation=r.id, gigabytes=r.gigabytes, volumes=r.volumes)
        return r

    @activity.defn(name="create_volume")
    @_errors
    @_beating
    def create_volume(self, inp: CreateVolumeInput) -> VolumeRef:
        v = self.store.create_volume(
            reservation_id=inp.reservation_id, migration=inp.migration, disk_index=inp.disk.index,
            name=f"{inp.migration}-disk{inp.disk.index}", size_gib=inp.disk.volume_size_gib,
            volume_type=inp.volume_type, availability_zone=inp.availability_zone,
            metadata={"xms.migration": inp.migration, "xms.disk_index": str(inp.disk.index),
                      "xms.source": inp.disk.source},
        )
        _log(disk=inp.disk.index).info("volume ready", volume=v.id, size_gib=v.size_gib)
        return v

    # ------------------------------------------------------------------ data

    @activity.defn(name="copy_disk", no_thread_cancel_exception=True)
    @_errors
    def copy_disk(self, inp: CopyInput) -> CopyResult:
        """Copy one generation of a disk: 0 = every allocated extent, g >= 1 = the extents dirty
        in sync g. Resumes at the heartbeated offset of the same generation; optionally verifies
        source (as frozen) against target in the same freeze."""
        info = activity.info()
        disk, g = inp.disk, inp.generation
        log = _log(disk=disk.index, volume=inp.volume_id, generation=g)
        prev = CopyProgress.model_validate(info.heartbeat_details[0]) if info.heartbeat_details else None
        if prev and prev.generation != g:
            prev = None
        vt = self.store.get_volume(inp.volume_id).volume_type
        t0 = time.monotonic()
        progress = CopyProgress(disk_index=disk.index, generation=g, bytes_total=disk.virtual_size,
                                attempt=info.attempt)
        reported = {"read": 0, "written": 0}

        def beat(**changes) -> None:
            nonlocal progress
            progress = progress.model_copy(update={**changes, "updated_at": time.time()})
            activity.heartbeat(progress.model_dump(mode="json"))

        def on_progress(s: copyengine.CopyStats) -> None:
            telemetry.BYTES_READ.labels(vt).inc(s.bytes_read - reported["read"])
            telemetry.BYTES_COPIED.labels(vt).inc(s.bytes_written - reported["written"])
            telemetry.COPY_THROUGHPUT.labels(inp.migration, str(disk.index)).set(s.throughput)
            reported.update(read=s.bytes_read, written=s.bytes_written)
            beat(offset=s.offset, bytes_copied=copied_before + s.bytes_read, throughput=s.throughput, eta_s=s.eta_s)

        with tracker_for(inp, self.settings).freeze(g) as view:
            frozen_at = datetime.now(timezone.utc)
            if view is not None and prev and prev.freeze_id != view.freeze_id:
                log.info("source re-frozen since the last attempt: starting this generation over")
                prev = None
            start = prev.offset if prev else 0
            copied_before = prev.bytes_copied if prev else 0
            # the volume reads as zeroes beyond `start` only for a first copy that was never
            # written, or one resumed within the same freeze (writes never pass the offset)
            fresh = g == 0 and (info.attempt == 1 or prev is not None)
            progress = progress.model_copy(update=dict(
                offset=start, resumed_from=start, bytes_copied=copied_before,
                freeze_id=view.freeze_id if view else ""))
            if prev:
                telemetry.RESUMES.inc()
                log.info("resuming copy", offset=start, stage=prev.stage)
            if view is None:
                log.info("generation already committed")
                return CopyResult(disk_index=disk.index, bytes_total=disk.virtual_size, bytes_read=0,
                                  bytes_written=0, zero_bytes_skipped=0, resumed_from=start, duration_s=0.0,
                                  throughput=0.0, generation=g, skipped=True, frozen_at=frozen_at)
            src = view.connect()
            try:
                if view.bitmap is None:
                    full = list(transport.extents(src, 0, disk.virtual_size))
                    plan = [e for e in full if not e.zero]
                else:
                    full = plan = list(transport.dirty_extents(src, view.bitmap, disk.virtual_size))
                    if inp.rewrite:  # ranges the target diverged in (a converted, failed cutover)
                        ranges = [(e.start, e.length) for e in plan] + [
                            (o, min(n, disk.virtual_size - o)) for o, n in inp.rewrite if o < disk.virtual_size]
                        full = plan = [e for o, n in merge_ranges(ranges)
                                       for e in transport.extents(src, o, o + n)]
                changed = sum(e.length for e in plan)
                beat(data_bytes_total=changed)
                todo = _clip(full, start) if start < disk.virtual_size else []
                with self.store.open_target(inp.volume_id) as target:
                    stats = copyengine.CopyStats(offset=disk.virtual_size, end=disk.virtual_size, started_from=start)
                    if todo:
                        conns = [(src, copyengine.open_writer(target))]
                        try:
                            for _ in range(copyengine.connections_for(sum(e.length for e in todo if not e.zero)) - 1):
                                conns.append((view.connect(private=True), copyengine.open_writer(target)))
                            stats = copyengine.copy(
                                src, todo, conns[0][1], more=conns[1:], fresh=fresh,
                                throttle=copyengine.Throttle(inp.qos.write_bytes_sec, inp.qos.write_iops_sec),
                                on_progress=on_progress, should_stop=activity.is_cancelled,
                            )
                        except copyengine.Stopped as e:
                            raise CancelledError(str(e)) from None
                        finally:
                            for i, (h, w) in enumerate(conns):
                                w.close()
                                if i:
                                    transport.close(h)
                    beat(offset=disk.virtual_size, stage="verify" if inp.verify else "copy")
                    sums = None
                    if inp.verify:  # reads the whole disk: not through the image server's one main loop
                        if view.kind == "image" and view.fmt == "raw":
                            whole = view.location  # a raw image on this host: read directly
                        else:
                            whole = view.connect(private=True) if transport.on_image_server(src) else src
                        try:
                            sums = self._checksums(whole, target, disk.virtual_size, beat)
                        finally:
                            if whole is not src and not isinstance(whole, str):
                                transport.close(whole)
                if sums and not sums.match:  # inside the freeze: the generation is not committed
                    raise ApplicationError(
                        f"disk {disk.index}: target checksum {sums.target[:16]}… differs from source "
                        f"{sums.source[:16]}…" + ("" if sums.target_tail_zero else " (target has data past the source's end)"),
                        type="ChecksumMismatch", non_retryable=True,
                    )
            finally:
                transport.close(src)
        dur = time.monotonic() - t0
        telemetry.COPY_DURATION.observe(dur)
        telemetry.ZERO_BYTES_SKIPPED.labels(vt).inc(stats.zero_bytes_skipped)
        result = CopyResult(
            disk_index=disk.index, bytes_total=disk.virtual_size, bytes_read=stats.bytes_read,
            bytes_written=stats.bytes_written, zero_bytes_skipped=stats.zero_bytes_skipped,
            zero_bytes_written=stats.zero_bytes_written, resumed_from=start, duration_s=dur,
            throughput=stats.throughput, generation=g, changed_bytes=changed, extents=len(plan),
            frozen_at=frozen_at, checksums=sums,
        )
        log.info("copied", **result.model_dump(exclude={"disk_index", "checksums", "frozen_at"}))
        return result

    def _checksums(self, src, target, n: int, beat) -> Checksums:
        """Source (through the frozen view, or a raw image's path) and target checksums, computed
        side by side. Raw files and block devices on this host are read directly (checksum_file:
        half the CPU of reading them through a qemu-nbd); anything else through NBD."""
        def progress(done: int) -> None:
            beat(verified=done)

        with ThreadPoolExecutor(max_workers=1) as pool:
            src_future = (pool.submit(copyengine.checksum_file, src, n) if isinstance(src, str) else
                          pool.submit(copyengine.checksum, src, n, list(transport.extents(src, 0, n))))
            if target.kind == "file":
                tgt = copyengine.checksum_file(target.path, n, on_progress=progress)
                tail_zero = copyengine.file_reads_as_zero(target.path, n, target.size)
            else:
                with transport.handle(target.uri, "nbd", "raw") as h:
                    tgt = copyengine.checksum(h, n, list(transport.extents(h, 0, n)), on_progress=progress)
                    tail_zero = copyengine.reads_as_zero(h, transport.extents(h, n, target.size))
            while True:  # keep heartbeating while a slower source finishes its checksum
                try:
                    src_sum = src_future.result(timeout=1.0)
                    break
                except FutureTimeout:
                    beat()
            return Checksums(length=n, source=src_sum, target=tgt, target_tail_zero=tail_zero)

    @activity.defn(name="stop_tracking", no_thread_cancel_exception=True)
    @_errors
    def stop_tracking(self, inp: TrackerInput) -> None:
        """Remove xms's bitmaps (and live fleecing nodes) from a warm source. Idempotent."""
        tracker_for(CopyInput(migration=inp.migration, disk=inp.disk, volume_id="", track=True,
                              bitmap=inp.bitmap), self.settings).stop()
        _log(disk=inp.disk.index).info("change tracking stopped")

    @activity.defn(name="power_off_source", no_thread_cancel_exception=True)
    @_errors
    def power_off_source(self, inp: TrackerInput) -> str:
        """PowerOffSource: the hook command if one was given; for a live disk, pause the VM (QMP
        ``stop``) so that nothing writes after the final delta's freeze; images need nothing."""
        if inp.hook:
            argv = self.config.hook(inp.hook, migration=inp.migration, source=inp.disk.source)
            r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                raise ApplicationError(f"power-off hook {inp.hook} failed: {tail}", type="PowerOffFailed",
                                       non_retryable=True)
            return f"hook {inp.hook} ran"
        if inp.disk.source_kind == "qmp":
            from activities.transport.live import live_disk

            return live_disk(inp.disk.source, self.settings.run_dir).pause()
        return "nothing to do for an image or NBD source"

    # ------------------------------------------------------------------ finish and clean up

    @activity.defn(name="finalize")
    @_errors
    @_beating
    def finalize(self, inp: FinalizeInput) -> InstanceRef:
        for i, vid in enumerate(inp.volume_ids):
            per_disk = inp.disk_metadata[i] if i < len(inp.disk_metadata) else {}
            self.store.update_metadata(vid, {**inp.metadata, **per_disk})
            self.store.set_bootable(vid, i == 0)
        inst = self.store.ensure_instance(inp.migration, inp.project)
        for i, vid in enumerate(inp.volume_ids):
            inst = self.store.attach(inst.id, vid, i)
        _log().info("finalized", instance=inst.id, volumes=len(inp.volume_ids))
        return inst

    @activity.defn(name="launch_instance")
    @_errors
    @_beating
    def launch_instance(self, inp: LaunchInput) -> InstanceRef:
        inst = self.store.launch_instance(inp.migration, inp.project, inp.volume_ids, inp.flavor, inp.network)
        _log().info("instance launched", instance=inst.id, flavor=inp.flavor, network=inp.network)
        return inst

    @activity.defn(name="snapshot")
    @_errors
    @_beating
    def snapshot(self, inp: SnapshotInput) -> SnapshotRef:
        name = f"{inp.migration}-disk{inp.disk_index}-post-migration"
        s = self.store.create_snapshot(inp.volume_id, name)
        s.backup = self.store.create_backup(inp.volume_id, name)  # openstack: the backup API, where it runs
        _log(disk=inp.disk_index).info("snapshot", snapshot=s.id, backup=s.backup or None)
        return s

    # ------------------------------------------------------------------ guest

    @activity.defn(name="convert_guest")
    @_errors
    @_beating
    def convert_guest(self, inp: GuestInput) -> GuestInfo:
        """Inspect the target volumes and convert the guest in place (virt-v2v-in-place) through a
        qcow2 overlay per volume, committed into the volume only when conversion succeeded: a
        failed conversion leaves the target exactly as the last sync wrote it."""
        from activities import guest

        t0 = time.monotonic()
        log = _log()
        work = self.settings.run_dir / f"convert-{inp.migration}"
        with ExitStack() as opened:
            eps = [opened.enter_context(self.store.open_target(v)) for v in inp.volume_ids]
            if any(ep.kind != "file" for ep in eps):
                return GuestInfo(note="not converted: these volumes are reached through NBD (encrypted); "
                                      "conversion needs the volumes as files")
            paths = [ep.path for ep in eps]
            if not any(_boot_record(p) for p in paths):
                return GuestInfo(data_disk=True, note="no boot record on any disk: data disk(s), not converted",
                                 duration_s=time.monotonic() - t0)
            found = guest.inspect(paths, "raw")
            info = GuestInfo(os_type=found.os_type, distro=found.distro, product_name=found.product_name,
                             firmware=found.firmware, root_device=found.root_device,
                             boot_disk=_disk_of(found.root_device))
            if found.is_data_disk or not found.os_type:
                info.data_disk, info.note = True, "no operating system found: data disk(s), not converted"
                info.duration_s = time.monotonic() - t0
                log.info("guest inspected", data_disk=True)
                return info
            log.info("guest inspected", os=found.product_name, firmware=found.firmware, root=found.root_device)
            work.mkdir(parents=True, exist_ok=True, mode=0o700)
            overlays = [work / f"disk{i}.qcow2" for i in range(len(paths))]
            done = work / "converted"  # conversion finished: a retry only commits again
            if not done.exists():
                for ov, p in zip(overlays, paths):
                    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", p, str(ov)])
                rep = guest.convert([str(o) for o in overlays], "qcow2", timeout_s=inp.timeout_s,
                                    log_path=str(work / "virt-v2v.log"))
                done.write_text(f"{rep.seconds}\n")
            info.changed_extents = [_overlay_ranges(ov) for ov in overlays]
            for ov in overlays:
                _run(["qemu-img", "commit", "-q", "-d", str(ov)])
        shutil.rmtree(work, ignore_errors=True)
        info.converted, info.duration_s = True, time.monotonic() - t0
        changed = sum(n for ranges in info.changed_extents for _, n in ranges)
        info.note = (f"converted {found.product_name or found.os_type} ({found.firmware or 'bios'}) in "
                     f"{info.duration_s:.0f} s; {changed // MiB} MiB rewritten")
        log.info("guest converted", seconds=round(info.duration_s), rewritten=changed)
        return info

    @activity.defn(name="boot_target")
    @_errors
    @_beating
    def boot_target(self, inp: BootInput) -> BootResult:
        """Boot the target volumes (boot order) in a qemu VM and wait for the marker on its serial
        console. The VM runs on a throw-away overlay (-snapshot): the check writes nothing."""
        from activities import guest

        log_path = self.settings.data_dir / "instances" / inp.migration / "first-boot-serial.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if inp.instance_id and self.store.instance_console(inp.instance_id) is not None:
            return self._server_marker(inp, log_path)
        with ExitStack() as opened:
            eps = [opened.enter_context(self.store.open_target(v, writable=False)) for v in inp.volume_ids]
            paths = [ep.path if ep.kind == "file" else ep.uri for ep in eps]
            secs = guest.boot(paths, firmware=inp.firmware, marker=inp.marker, timeout_s=inp.timeout_s,
                              serial_log=str(log_path), snapshot=True)
        line = next((ln for ln in log_path.read_text(errors="replace").splitlines() if inp.marker in ln), inp.marker)
        _log().info("target booted", seconds=round(secs, 1), marker=line.strip())
        return BootResult(seconds=secs, marker_line=line.strip(), serial_log=str(log_path))

    def _server_marker(self, inp: BootInput, log_path) -> BootResult:
        """A server the target runs: read its console (the cloud's console log API) until the marker."""
        from activities.guest import GuestBootFailed

        t0 = time.monotonic()
        while True:
            text = self.store.instance_console(inp.instance_id) or ""
            log_path.write_text(text)
            line = next((ln for ln in text.splitlines() if inp.marker in ln), None)
            if line is not None:
                secs = time.monotonic() - t0
                _log().info("target booted", instance=inp.instance_id, seconds=round(secs, 1), marker=line.strip())
                return BootResult(seconds=secs, marker_line=line.strip(), serial_log=str(log_path))
            if time.monotonic() - t0 > inp.timeout_s:
                last = (text.strip().splitlines() or ["(empty)"])[-1][:200]
                raise GuestBootFailed(f"server {inp.instance_id}: no {inp.marker!r} on its console after "
                                      f"{inp.timeout_s} s; last line: {last}")
            time.sleep(2)  # polling the cloud's console API, not synchronisation

    @activity.defn(name="cleanup", no_thread_cancel_exception=True)
    @_errors
    def cleanup(self, inp: CleanupInput) -> None:
        """Undo what a failed or cancelled migration made: idempotent, safe to retry."""
        deleted = (delete_migration_volumes(self.store, inp.migration, tuple(inp.volume_ids))
                   if inp.delete_volumes else [])
        if inp.reservation_id:
            self.store.release(inp.reservation_id)
        self.store.release_migration(inp.migration)  # a reserve that committed after cancel
        _log().info("cleaned up", volumes_deleted=len(deleted), reservation=inp.reservation_id)

    @activity.defn(name="resume_source", no_thread_cancel_exception=True)
    @_errors
    def resume_source(self, inp: TrackerInput) -> str:
        """A cutover rolled back to Ready: let a live VM that PowerOffSource paused run again."""
        if inp.disk.source_kind != "qmp" or inp.hook:
            return "nothing to resume"
        from activities.transport.live import live_disk

        return live_disk(inp.disk.source, self.settings.run_dir).resume()

    def all(self) -> list[Callable]:
        return [self.validate, self.reserve, self.create_volume, self.copy_disk, self.stop_tracking,
                self.power_off_source, self.resume_source, self.finalize, self.snapshot, self.cleanup,
                self.convert_guest, self.boot_target, self.launch_instance]


def _boot_record(path: str) -> bool:
    """An MBR boot signature or a GPT header: without either no firmware boots this disk, so
    libguestfs's appliance (~30 s on TCG) is not started for plain data disks."""
    with open(path, "rb") as f:
        head = f.read(1024)
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


def _disk_of(device: str | None) -> int | None:
    """libguestfs names disks /dev/sda, /dev/sdb, ... in the order they were added."""
    import re

    m = re.match(r"^/dev/[sv]d([a-z])", device or "")
    return ord(m.group(1)) - ord("a") if m else None


def _overlay_ranges(overlay) -> list[tuple[int, int]]:
    """The byte ranges an overlay holds (what conversion wrote), from ``qemu-img map``."""
    import json

    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(overlay)], capture_output=True,
                         text=True, check=True).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e.get("depth") == 0]


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise XmsError(f"{argv[0]} {argv[1]} failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")


def tracker_for(inp: CopyInput, settings: Settings) -> cbt.ChangeTracker:
    d = inp.disk
    if not inp.track:
        return cbt.Untracked(d.source, d.source_kind, d.source_format)
    if d.source_kind == "qmp":
        from activities.transport.live import live_disk

        return live_disk(d.source, settings.run_dir)
    if d.source_kind == "image":
        return cbt.QuiescedImage(d.source)
    return cbt.ExportedBitmap(d.source, inp.bitmap or "")


def _clip(extents: list[transport.Extent], start: int) -> list[transport.Extent]:
    out = []
    for e in extents:
        if e.end <= start:
            continue
        if e.start < start:
            e = transport.Extent(start, e.end - start, e.zero)
        out.append(e)
    return out
