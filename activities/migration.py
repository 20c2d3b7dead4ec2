"""Activities of MigrationWorkflow: every side effect of a migration lives here.

They are synchronous (libnbd and the store block) and run on the worker's thread pool. Errors
from adapters (``xms.errors``) become ApplicationErrors with a stable type; permanent ones are
non-retryable.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from activities import copyengine
from activities.blockstorage.port import BlockStorage
from activities.transport import nbd as transport
from xms import telemetry
from xms.errors import DuplicateMigration, InvalidAvailabilityZone, XmsError
from xms.models import (
    Checksums,
    CleanupInput,
    CopyInput,
    CopyProgress,
    CopyResult,
    CreateVolumeInput,
    DiskPlan,
    FinalizeInput,
    InstanceRef,
    MigrationRequest,
    Reservation,
    ReserveInput,
    SnapshotInput,
    SnapshotRef,
    ValidationResult,
    VerifyInput,
    VolumeRef,
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


class MigrationActivities:
    def __init__(self, settings: Settings, store: BlockStorage):
        self.settings = settings
        self.store = store

    # ------------------------------------------------------------------ admission

    @activity.defn(name="validate")
    @_errors
    def validate(self, req: MigrationRequest) -> ValidationResult:
        vt = self.store.get_volume_type(req.volume_type)
        if req.availability_zone and req.availability_zone != vt.availability_zone:
            raise InvalidAvailabilityZone(
                f"volume type {vt.name} is served in availability zone {vt.availability_zone} only; "
                f"--az {req.availability_zone} is not allowed (omit --az or use {vt.availability_zone})"
            )
        with ThreadPoolExecutor(max_workers=min(8, len(req.disks))) as pool:
            infos = list(pool.map(transport.probe, req.disks))
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

    @activity.defn(name="reserve")
    @_errors
    def reserve(self, inp: ReserveInput) -> Reservation:
        kept = self.store.list_volumes(migration=inp.migration)
        if kept:
            raise DuplicateMigration(
                f"volumes kept from an earlier failed run of {inp.migration} still exist "
                f"({', '.join(v.id for v in kept)}); delete them with `xms cleanup {inp.migration}` or choose another name"
            )
        r = self.store.reserve(inp.project, inp.migration, inp.volume_type, inp.sizes_gib)
        _log().info("reserved", reservation=r.id, gigabytes=r.gigabytes, volumes=r.volumes)
        return r

    @activity.defn(name="create_volume")
    @_errors
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

    @activity.defn(name="copy_disk")
    @_errors
    def copy_disk(self, inp: CopyInput) -> CopyResult:
        info = activity.info()
        disk = inp.disk
        log = _log(disk=disk.index, volume=inp.volume_id)
        prev = CopyProgress.model_validate(info.heartbeat_details[0]) if info.heartbeat_details else None
        start = prev.offset if prev else 0
        if prev:
            telemetry.RESUMES.inc()
            log.info("resuming copy", offset=start)
        vt = self.store.get_volume(inp.volume_id).volume_type
        t0 = time.monotonic()
        progress = CopyProgress(
            disk_index=disk.index, offset=start, bytes_total=disk.virtual_size, resumed_from=start,
            attempt=info.attempt, bytes_copied=prev.bytes_copied if prev else 0,
        )
        reported = {"read": 0, "written": 0}

        def on_progress(s: copyengine.CopyStats) -> None:
            telemetry.BYTES_READ.labels(vt).inc(s.bytes_read - reported["read"])
            telemetry.BYTES_COPIED.labels(vt).inc(s.bytes_written - reported["written"])
            reported.update(read=s.bytes_read, written=s.bytes_written)
            telemetry.COPY_THROUGHPUT.labels(inp.migration, str(disk.index)).set(s.throughput)
            p = progress.model_copy(update=dict(
                offset=s.offset, bytes_copied=progress.bytes_copied + s.bytes_read,
                throughput=s.throughput, eta_s=s.eta_s, updated_at=time.time(),
            ))
            activity.heartbeat(p.model_dump(mode="json"))

        with (
            transport.handle(disk.source, disk.source_kind, disk.source_format) as src,
            self.store.open_target(inp.volume_id) as target,
        ):
            full = list(transport.extents(src, 0, disk.virtual_size))
            progress.data_bytes_total = sum(e.length for e in full if not e.zero)
            plan = _clip(full, start)
            writer = copyengine.open_writer(target)
            try:
                stats = copyengine.copy(
                    src, plan, writer, fresh=inp.fresh,
                    throttle=copyengine.Throttle(inp.qos.write_bytes_sec, inp.qos.write_iops_sec),
                    on_progress=on_progress, should_stop=activity.is_cancelled,
                )
            except copyengine.Stopped as e:
                raise CancelledError(str(e)) from None
            finally:
                writer.close()
        dur = time.monotonic() - t0
        telemetry.COPY_DURATION.observe(dur)
        telemetry.ZERO_BYTES_SKIPPED.labels(vt).inc(stats.zero_bytes_skipped)
        result = CopyResult(
            disk_index=disk.index, bytes_total=disk.virtual_size, bytes_read=stats.bytes_read,
            bytes_written=stats.bytes_written, zero_bytes_skipped=stats.zero_bytes_skipped,
            resumed_from=start, duration_s=dur, throughput=stats.throughput,
        )
        log.info("copied", **result.model_dump(exclude={"disk_index"}))
        return result

    @activity.defn(name="verify_disk")
    @_errors
    def verify_disk(self, inp: VerifyInput) -> Checksums:
        disk = inp.disk
        n = disk.virtual_size

        def source_sum() -> str:
            with transport.handle(disk.source, disk.source_kind, disk.source_format) as h:
                return copyengine.checksum(h, n, transport.extents(h, 0, n))

        with ThreadPoolExecutor(max_workers=1) as pool:
            src_future = pool.submit(source_sum)
            with self.store.open_target(inp.volume_id, writable=False) as target:
                loc, kind = (target.path, "image") if target.kind == "file" else (target.uri, "nbd")
                with transport.handle(loc, kind, "raw") as h:
                    tgt = copyengine.checksum(h, n, transport.extents(h, 0, n))
                    tail_zero = copyengine.reads_as_zero(h, transport.extents(h, n, target.size))
            src = src_future.result()
        sums = Checksums(length=n, source=src, target=tgt, target_tail_zero=tail_zero)
        _log(disk=disk.index).info("verified", match=sums.match, sha256=src)
        if not sums.match:
            raise ApplicationError(
                f"disk {disk.index}: target checksum {tgt[:16]}… differs from source {src[:16]}…"
                + ("" if tail_zero else " (target has data past the source's end)"),
                type="ChecksumMismatch", non_retryable=True,
            )
        return sums

    # ------------------------------------------------------------------ finish and clean up

    @activity.defn(name="finalize")
    @_errors
    def finalize(self, inp: FinalizeInput) -> InstanceRef:
        for i, vid in enumerate(inp.volume_ids):
            self.store.update_metadata(vid, inp.metadata)
            self.store.set_bootable(vid, i == 0)
        inst = self.store.ensure_instance(inp.migration, inp.project)
        for i, vid in enumerate(inp.volume_ids):
            inst = self.store.attach(inst.id, vid, i)
        _log().info("finalized", instance=inst.id, volumes=len(inp.volume_ids))
        return inst

    @activity.defn(name="snapshot")
    @_errors
    def snapshot(self, inp: SnapshotInput) -> SnapshotRef:
        s = self.store.create_snapshot(inp.volume_id, f"{inp.migration}-disk{inp.disk_index}-post-migration")
        _log(disk=inp.disk_index).info("snapshot", snapshot=s.id)
        return s

    @activity.defn(name="release")
    @_errors
    def release(self, reservation_id: str) -> None:
        self.store.release(reservation_id)

    @activity.defn(name="cleanup")
    @_errors
    def cleanup(self, inp: CleanupInput) -> None:
        """Undo what a failed or cancelled migration made: idempotent, safe to retry."""
        deleted = []
        if inp.delete_volumes:
            self.store.delete_instance(inp.migration)
            ids = set(inp.volume_ids) | {v.id for v in self.store.list_volumes(migration=inp.migration)}
            for vid in sorted(ids):
                self.store.delete_volume(vid)
                deleted.append(vid)
        if inp.reservation_id:
            self.store.release(inp.reservation_id)
        _log().info("cleaned up", volumes_deleted=len(deleted), reservation=inp.reservation_id)

    def all(self) -> list[Callable]:
        return [self.validate, self.reserve, self.create_volume, self.copy_disk, self.verify_disk,
                self.finalize, self.snapshot, self.release, self.cleanup]


def _clip(extents: list[transport.Extent], start: int) -> list[transport.Extent]:
    out = []
    for e in extents:
        if e.end <= start:
            continue
        if e.start < start:
            e = transport.Extent(start, e.end - start, e.zero)
        out.append(e)
    return out
