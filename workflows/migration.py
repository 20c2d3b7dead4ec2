"""MigrationWorkflow: deterministic orchestration of one VM's migration. No I/O here.

Cold: Initializing (validate, reserve the full footprint, create volumes) → FullSync (copy and
verify every disk in parallel, resumable) → CuttingOver (Finalize, Snapshot) → Completed.

Warm: Initializing → FullSync (generation 0 also starts change tracking) → Ready; every
sync interval (a durable timer) or on ``sync_now``: Ready → Syncing → Ready. The ``cutover``
update (or ``cutover_at``) runs CuttingOver: PowerOffSource → FinalDelta (with verification in
the same freeze) → GuestConversion → Finalize → Snapshot → StopTracking → Completed. All state
is one model, carried through continue-as-new every ``syncs_per_run`` syncs.

Failure or cancel: volumes deleted (unless keep_on_failure), reservation released, tracking
stopped, phase Failed/Cancelled with the reason.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, FailureError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from xms.errors import NON_RETRYABLE_TYPES
    from xms.models import (
        Admission,
        CleanupInput,
        CopyInput,
        CopyResult,
        CreateVolumeInput,
        CutoverInfo,
        CutoverRequest,
        CutoverResult,
        DiskState,
        FinalizeInput,
        LaunchInput,
        BootInput,
        BootResult,
        GuestInfo,
        GuestInput,
        InstanceRef,
        MigrationInput,
        MigrationResult,
        MigrationState,
        Phase,
        Reservation,
        ReserveInput,
        SnapshotInput,
        SnapshotRef,
        SyncRecord,
        TrackerInput,
        ValidationResult,
        VolumeRef,
        merge_ranges,
    )

PHASE_ATTR = SearchAttributeKey.for_keyword("XmsPhase")
RECENT_SYNCS = 10
HISTORY_KEEP = 50
MAX_CONSECUTIVE_SYNC_FAILURES = 5

SHORT = dict(
    start_to_close_timeout=timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
        maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE_TYPES,
    ),
    # a cancelled step finishes before cleanup runs, so cleanup sees all it made
    cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
)
CLEANUP = dict(
    start_to_close_timeout=timedelta(minutes=10),
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
                             maximum_attempts=20),
)


class CutoverRefused(ValueError):
    pass


@workflow.defn
class MigrationWorkflow:
    def __init__(self) -> None:
        self.s: MigrationState | None = None

    # ------------------------------------------------------------------ messages

    @workflow.query
    def status(self) -> MigrationState:
        if self.s is None:
            raise ApplicationError("migration has not started yet")
        return self.s

    @workflow.update
    async def admission(self) -> Admission:
        """Completes when quota is reserved (accepted) or the migration was refused."""
        await workflow.wait_condition(lambda: self.s is not None and self.s.admitted is not None)
        return Admission(
            accepted=bool(self.s.admitted), phase=self.s.phase, reason=self.s.reason,
            reason_type=self.s.reason_type, reservation_id=self.s.reservation_id,
            footprint_gib=sum(d.plan.volume_size_gib for d in self.s.disks if d.plan),
        )

    @workflow.signal
    def sync_now(self) -> None:
        """Start an incremental sync at once (warm, Ready)."""
        if self.s is not None:
            self.s.sync_now = True

    @workflow.update
    async def cutover(self, req: CutoverRequest) -> CutoverResult:
        """Run the cutover (or join the one in progress) and return when it has ended."""
        s = self.s
        if s.cutover is None:
            s.cutover = CutoverInfo(requested_at=workflow.now(), requested_by="update", attempt=s.cutover_attempts + 1)
        attempt = s.cutover
        await workflow.wait_condition(lambda: attempt.finished_at is not None or s.phase.terminal)
        return CutoverResult(phase=s.phase, reason=attempt.error or s.reason, requested_at=attempt.requested_at,
                             finished_at=attempt.finished_at, attempt=attempt.attempt)

    @cutover.validator
    def _cutover_allowed(self, req: CutoverRequest) -> None:
        s = self.s
        if s is None or s.request.mode != "warm":
            raise CutoverRefused("cutover refused: only warm migrations have a cutover (cold ones cut over by themselves)")
        if s.phase == Phase.CUTTING_OVER or s.cutover is not None and not s.phase.terminal:
            return  # join the cutover in progress
        if s.phase not in (Phase.READY, Phase.SYNCING) or s.syncs_done < 1:
            raise CutoverRefused(
                f"cutover refused: migration is {s.phase.value} with {s.syncs_done} incremental sync(s) done; "
                "allowed once it is Ready and at least one incremental sync has completed"
            )

    # ------------------------------------------------------------------ main

    @workflow.run
    async def run(self, inp: MigrationInput) -> MigrationResult:
        req = inp.request
        if inp.state is None:
            s = self.s = MigrationState(
                request=req, started_at=workflow.now(), index_phase=inp.index_phase,
                disks=[DiskState(index=i, source=d) for i, d in enumerate(req.disks)],
            )
            self._enter(Phase.INITIALIZING, "Validate")
        else:  # continued as new: carry on where the last run stopped
            s = self.s = inp.state
            s.runs += 1
            if s.index_phase:
                workflow.upsert_search_attributes([PHASE_ATTR.value_set(s.phase.value)])
        try:
            if s.phase == Phase.INITIALIZING:
                await self._admit()
                await self._create_volumes()
                self._enter(Phase.FULL_SYNC, "Copy")
            if s.phase == Phase.FULL_SYNC:
                await self._full_sync()
                self._enter(Phase.READY if req.mode == "warm" else Phase.CUTTING_OVER,
                            "Waiting" if req.mode == "warm" else "Finalize")
            if req.mode == "warm":
                while True:
                    if await self._sync_loop():
                        await workflow.wait_condition(workflow.all_handlers_finished)
                        workflow.continue_as_new(MigrationInput(request=req, state=s))
                    if await self._cutover():
                        break
            else:
                await self._finish()
            self._enter(Phase.COMPLETED, "Done")
        except (asyncio.CancelledError, FailureError) as e:
            cancelled = is_cancelled_exception(e)
            reason, rtype = ("cancelled by request", "Cancelled") if cancelled else _reason(e, s.step)
            await self._abort(reason, rtype, cancelled)
            if cancelled:
                raise
            raise ApplicationError(reason, type=rtype, non_retryable=True) from None
        finally:
            s.finished_at = workflow.now() if s.phase.terminal else None
            if s.cutover and s.phase.terminal:
                s.cutover.finished_at = workflow.now()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return MigrationResult(name=req.name, phase=s.phase, disks=s.disks, instance_id=s.instance_id)

    # ------------------------------------------------------------------ admission

    async def _admit(self) -> None:
        s = self.s
        v: ValidationResult = await workflow.execute_activity(
            "validate", s.request, result_type=ValidationResult, **SHORT
        )
        _honour_cancel()
        s.volume_type, s.availability_zone, s.host_queue = v.volume_type, v.availability_zone, v.host_queue
        for d, plan in zip(s.disks, v.disks):
            d.source, d.plan = plan.source, plan
        self._enter(Phase.INITIALIZING, "Reserve")
        r: Reservation = await workflow.execute_activity(
            "reserve",
            ReserveInput(migration=s.request.name, project=s.request.project, volume_type=v.volume_type.name,
                         sizes_gib=[d.volume_size_gib for d in v.disks], snapshots=s.request.snapshot),
            result_type=Reservation, task_queue=s.host_queue,
            heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s), **SHORT,
        )
        s.reservation_id = r.id
        _honour_cancel()
        if not r.held_by_volumes:
            s.admitted = True  # else (Cinder) admission waits until every volume exists

    async def _create_volumes(self) -> None:
        s = self.s
        self._enter(Phase.INITIALIZING, "CreateVolumes")

        async def one(d: DiskState) -> None:
            v: VolumeRef = await workflow.execute_activity(
                "create_volume",
                CreateVolumeInput(migration=s.request.name, project=s.request.project,
                                  reservation_id=s.reservation_id, disk=d.plan,
                                  volume_type=s.volume_type.name, availability_zone=s.availability_zone),
                result_type=VolumeRef, task_queue=s.host_queue,
                heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s), **SHORT,
            )
            d.volume_id = v.id

        await _gather(one(d) for d in s.disks)
        s.volume_count = len(s.disks)
        s.admitted = True
        _honour_cancel()

    # ------------------------------------------------------------------ data

    def _copy(self, d: DiskState, generation: int, verify: bool):
        s = self.s
        return workflow.execute_activity(
            "copy_disk",
            CopyInput(migration=s.request.name, disk=d.plan, volume_id=d.volume_id, qos=s.volume_type.qos,
                      generation=generation, track=s.request.mode == "warm", bitmap=s.request.bitmap,
                      verify=verify, rewrite=s.rewrite.get(d.index, []) if generation else []),
            result_type=CopyResult, task_queue=s.host_queue,
            start_to_close_timeout=timedelta(days=2),
            heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2,
                                     maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                                     non_retryable_error_types=[*NON_RETRYABLE_TYPES, "ChecksumMismatch"]),
        )

    async def _full_sync(self) -> None:
        s = self.s
        cold = s.request.mode == "cold"

        async def one(d: DiskState) -> None:
            d.copy_result = await self._copy(d, 0, verify=cold)
            d.checksums = d.copy_result.checksums

        await _gather(one(d) for d in s.disks)
        s.generation = 1

    async def _sync(self, final: bool = False) -> SyncRecord:
        """One incremental sync of every disk at generation ``s.generation`` (frozen per disk)."""
        s = self.s
        g, started = s.generation, workflow.now()
        results: list[CopyResult] = []

        async def one(d: DiskState) -> None:
            r = await self._copy(d, g, verify=final)
            d.last_sync, d.synced_bytes = r, d.synced_bytes + r.bytes_read
            s.rewrite.pop(d.index, None)  # copied again: the target follows the source there too
            if final:
                d.checksums = r.checksums
            results.append(r)

        try:
            await _gather(one(d) for d in s.disks)
            rec = SyncRecord(generation=g, started_at=started, finished_at=workflow.now(), ok=True,
                             frozen_at=min((r.frozen_at for r in results if r.frozen_at), default=None),
                             bytes_read=sum(r.bytes_read for r in results),
                             bytes_written=sum(r.bytes_written for r in results),
                             zero_bytes_written=sum(r.zero_bytes_written for r in results),
                             changed_bytes=sum(r.changed_bytes for r in results))
            s.syncs_done += 1
            s.consecutive_failures = 0
        except ActivityError as e:
            if final or is_cancelled_exception(e):
                raise
            rec = SyncRecord(generation=g, started_at=started, finished_at=workflow.now(), ok=False,
                             error=_reason(e, "Syncing")[0])
            s.syncs_failed += 1
            s.consecutive_failures += 1
        finally:
            s.generation = g + 1  # a failed generation's changes are merged into the next one
        s.recent_syncs = [*s.recent_syncs, rec][-RECENT_SYNCS:]
        if s.consecutive_failures >= MAX_CONSECUTIVE_SYNC_FAILURES:
            raise ApplicationError(f"{s.consecutive_failures} incremental syncs failed in a row; last: {rec.error}",
                                   type="SyncFailing", non_retryable=True)
        return rec

    async def _sync_loop(self) -> bool:
        """Ready ⇄ Syncing until cutover is due. True when it is time to continue as new."""
        s, req = self.s, self.s.request
        syncs_this_run = 0
        scheduled = req.cutover_at if s.cutover_attempts == 0 else None  # a schedule fires once
        while True:
            if s.cutover is None and scheduled and workflow.now() >= scheduled:
                s.cutover = CutoverInfo(requested_at=workflow.now(), requested_by="schedule", attempt=1)
            if s.cutover is not None:
                return False
            if syncs_this_run >= req.syncs_per_run or workflow.info().is_continue_as_new_suggested():
                return True
            if s.next_sync_at is None:
                s.next_sync_at = workflow.now() + timedelta(seconds=req.sync_interval_s)
            wake = min(s.next_sync_at, max(scheduled, workflow.now())) if scheduled else s.next_sync_at
            self._enter(Phase.READY, "Waiting")
            try:
                await workflow.wait_condition(lambda: s.sync_now or s.cutover is not None,
                                              timeout=max(wake - workflow.now(), timedelta(milliseconds=1)))
            except asyncio.TimeoutError:
                pass
            if s.cutover is not None or (scheduled and workflow.now() >= scheduled):
                continue
            if workflow.now() < s.next_sync_at and not s.sync_now:
                continue
            s.sync_now = False
            s.next_sync_at = None
            self._enter(Phase.SYNCING, f"Sync {s.generation}")
            await self._sync()
            syncs_this_run += 1

    async def _cutover(self) -> bool:
        """PowerOffSource → FinalDelta → GuestConversion → Finalize → Snapshot → StopTracking.
        The source is stopped before the final freeze, so no write can fall between the final
        delta and the power-off. If a step fails, the migration goes back to Ready with the
        reason (change tracking intact) and a new cutover can be requested: False."""
        s = self.s
        c = s.cutover
        c.started_at = workflow.now()
        s.cutover_attempts = c.attempt
        try:
            self._enter(Phase.CUTTING_OVER, "PowerOffSource")
            for d in s.disks:
                c.power_off = await workflow.execute_activity(
                    "power_off_source",
                    TrackerInput(migration=s.request.name, disk=d.plan, hook=s.request.power_off_hook),
                    result_type=str, task_queue=s.host_queue, **SHORT,
                )
                if s.request.power_off_hook:
                    break  # one hook powers off the whole VM
            self._enter(Phase.CUTTING_OVER, "FinalDelta")
            await self._sync(final=True)
            for _ in range(3):  # an attempt committed but lost its result: verify in a fresh freeze
                if all(d.checksums for d in s.disks):
                    break
                await self._sync(final=True)
            await self._finish()
        except ActivityError as e:
            if is_cancelled_exception(e):
                raise
            c.error, c.finished_at = f"cutover failed in {s.step}: {_reason(e, s.step)[0]}", workflow.now()
            if s.guest and s.guest.converted:  # the target diverged where conversion wrote
                for i, ranges in enumerate(s.guest.changed_extents):
                    s.rewrite[i] = merge_ranges([*s.rewrite.get(i, []), *ranges])
            if c.power_off and not s.request.power_off_hook:  # a paused live VM runs again while Ready
                for d in s.disks:
                    try:
                        await workflow.execute_activity(
                            "resume_source", TrackerInput(migration=s.request.name, disk=d.plan),
                            result_type=str, task_queue=s.host_queue, **SHORT)
                    except ActivityError as e2:
                        s.warnings = [*s.warnings, f"source not resumed: {_reason(e2, 'ResumeSource')[0]}"]
            s.reason, s.cutover, s.last_failed_cutover = c.error, None, c
            self._enter(Phase.READY, "Waiting")
            return False
        self._enter(Phase.CUTTING_OVER, "StopTracking")
        try:
            await self._stop_tracking()
        except ActivityError as e:  # the migration is done; leftover bitmaps are only noted
            s.warnings = [*s.warnings, f"change tracking could not be removed from the source: {_reason(e, s.step)[0]}"]
        return True

    async def _finish(self) -> None:
        """GuestConversion → Finalize → Snapshot → LaunchInstance (openstack, with a flavor) → BootTarget.
        The snapshot comes before the server's first boot: it is the state the migration delivered."""
        s = self.s
        if workflow.patched("guest-conversion"):
            await self._convert()
        else:  # histories recorded before conversion existed
            self._enter(Phase.CUTTING_OVER, "GuestConversion")
            if s.cutover:
                s.cutover.conversion = "skipped: no guest converter configured"
        self._enter(Phase.CUTTING_OVER, "Finalize")
        inst: InstanceRef = await workflow.execute_activity(
            "finalize",
            FinalizeInput(
                migration=s.request.name, project=s.request.project,
                volume_ids=[d.volume_id for d in s.disks],
                metadata={"xms.migrated_at": workflow.now().isoformat(), "xms.mode": s.request.mode,
                          "xms.syncs": str(s.syncs_done)},
                disk_metadata=[_disk_metadata(d) for d in s.disks],
            ),
            result_type=InstanceRef, task_queue=s.host_queue,
            heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s), **SHORT,
        )
        s.instance_id = inst.id
        _honour_cancel()
        if s.request.snapshot:
            self._enter(Phase.CUTTING_OVER, "Snapshot")

            async def one(d: DiskState) -> None:
                snap: SnapshotRef = await workflow.execute_activity(
                    "snapshot", SnapshotInput(migration=s.request.name, volume_id=d.volume_id, disk_index=d.index),
                    result_type=SnapshotRef, task_queue=s.host_queue,
                    start_to_close_timeout=timedelta(hours=2), retry_policy=SHORT["retry_policy"],
                    heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s),
                    cancellation_type=SHORT["cancellation_type"],
                )
                d.snapshot_id, d.backup = snap.id, snap.backup or None

            await _gather(one(d) for d in s.disks)
            _honour_cancel()
        if s.request.flavor:  # requests made before servers existed have none: no patch needed
            self._enter(Phase.CUTTING_OVER, "LaunchInstance")
            inst = await workflow.execute_activity(
                "launch_instance",
                LaunchInput(migration=s.request.name, project=s.request.project,
                            volume_ids=[d.volume_id for d in s.disks], flavor=s.request.flavor,
                            network=s.request.network or ""),
                result_type=InstanceRef, task_queue=s.host_queue,
                start_to_close_timeout=timedelta(minutes=30), retry_policy=SHORT["retry_policy"],
                heartbeat_timeout=timedelta(seconds=max(60, s.request.heartbeat_timeout_s)),
                cancellation_type=SHORT["cancellation_type"],
            )
            s.instance_id = inst.id
            _honour_cancel()
        if s.request.boot_marker and workflow.patched("boot-target"):
            await self._boot()

    async def _convert(self) -> None:
        s = self.s
        self._enter(Phase.CUTTING_OVER, "GuestConversion")
        if s.request.guest_conversion == "off":
            s.guest = GuestInfo(note="skipped: --guest-conversion off")
        else:
            s.guest = await workflow.execute_activity(
                "convert_guest", GuestInput(migration=s.request.name, volume_ids=[d.volume_id for d in s.disks]),
                result_type=GuestInfo, task_queue=s.host_queue,
                start_to_close_timeout=timedelta(hours=3),
                heartbeat_timeout=timedelta(seconds=max(60, s.request.heartbeat_timeout_s)),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=5), maximum_attempts=3,
                                         non_retryable_error_types=[*NON_RETRYABLE_TYPES, "GuestConversionFailed",
                                                                    "GuestInspectionFailed"]),
            )
        _honour_cancel()
        if s.cutover:
            s.cutover.conversion = s.guest.note

    async def _boot(self) -> None:
        s = self.s
        if s.guest and s.guest.data_disk:
            s.boot = None
            return  # nothing to boot
        self._enter(Phase.CUTTING_OVER, "BootTarget")
        r: BootResult = await workflow.execute_activity(
            "boot_target",
            BootInput(migration=s.request.name, volume_ids=[d.volume_id for d in s.disks],
                      firmware=(s.guest.firmware if s.guest else None) or "bios", marker=s.request.boot_marker,
                      timeout_s=s.request.boot_timeout_s, instance_id=s.instance_id if s.request.flavor else None),
            result_type=BootResult, task_queue=s.host_queue,
            start_to_close_timeout=timedelta(seconds=s.request.boot_timeout_s + 300),
            heartbeat_timeout=timedelta(seconds=max(60, s.request.heartbeat_timeout_s)),
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            retry_policy=RetryPolicy(maximum_attempts=2, non_retryable_error_types=[*NON_RETRYABLE_TYPES,
                                                                                     "GuestBootFailed"]),
        )
        if s.cutover:
            r.since_cutover_s = (workflow.now() - s.cutover.requested_at).total_seconds()
            s.cutover.boot_s = r.since_cutover_s
        s.boot = r

    async def _stop_tracking(self) -> None:
        s = self.s
        await _gather(
            workflow.execute_activity(
                "stop_tracking", TrackerInput(migration=s.request.name, disk=d.plan, bitmap=s.request.bitmap),
                task_queue=s.host_queue, **CLEANUP,
            )
            for d in s.disks if d.plan
        )

    # ------------------------------------------------------------------ failure

    async def _abort(self, reason: str, rtype: str, cancelled: bool) -> None:
        s = self.s
        s.reason, s.reason_type = reason, rtype
        if s.admitted is None:
            s.admitted = False
        # a failed conversion keeps the volumes for inspection (virt-v2v's message says why)
        # so does a server that would not launch (the volumes hold the finished migration)
        keep = (s.request.keep_on_failure
                or rtype in ("GuestConversionFailed", "GuestInspectionFailed", "LaunchFailed")) and not cancelled
        if s.host_queue:
            try:
                await workflow.execute_activity(
                    "cleanup",
                    CleanupInput(migration=s.request.name, project=s.request.project, reservation_id=s.reservation_id,
                                 delete_volumes=not keep, volume_ids=[d.volume_id for d in s.disks if d.volume_id]),
                    task_queue=s.host_queue, **CLEANUP,
                )
            except ActivityError as e:
                s.warnings = [*s.warnings, f"cleanup failed, volumes or quota may be left: {_reason(e, 'Cleanup')[0]}"]
        if s.request.mode == "warm" and s.host_queue and s.phase != Phase.INITIALIZING:
            try:
                await self._stop_tracking()
            except ActivityError:
                pass  # the source may be gone; the migration's outcome is already decided
        self._enter(Phase.CANCELLED if cancelled else Phase.FAILED, s.step)
        await workflow.wait_condition(workflow.all_handlers_finished)

    def _enter(self, phase: Phase, step: str) -> None:
        s = self.s
        if s.index_phase and (s.phase != phase or not s.history):
            workflow.upsert_search_attributes([PHASE_ATTR.value_set(phase.value)])
        s.phase, s.step = phase, step
        s.history = [*s.history, (phase.value, step, workflow.now())][-HISTORY_KEEP:]


def _honour_cancel() -> None:
    """A cancel that arrives while a step runs is requested of that activity; if the activity
    then succeeds anyway (WAIT_CANCELLATION_COMPLETED hands back its result) the request would
    be lost. The run task still counts it: honour it at the step boundary."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancelled by request")


async def _gather(coros) -> None:
    """Run per-disk steps in parallel; on the first failure cancel the rest and wait for them."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _disk_metadata(d: DiskState) -> dict[str, str]:
    m = {"xms.source": d.source}
    last = d.last_sync or d.copy_result
    if last and last.frozen_at:
        m["xms.last_sync"] = last.frozen_at.isoformat()  # the point in time the volume reproduces
    if d.checksums:
        m["xms.checksum"] = f"{d.checksums.algorithm}:{d.checksums.target}"
    return m


def _reason(e: BaseException, step: str) -> tuple[str, str]:
    cause = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.message, cause.type or "ApplicationError"
    return f"{step}: {cause}", type(cause).__name__
