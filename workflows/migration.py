"""MigrationWorkflow: deterministic orchestration of one VM's migration. No I/O here.

Cold: Initializing (validate, reserve the full footprint, create volumes) → FullSync (copy every
disk in parallel, resumable) → CuttingOver (Verify, Finalize, Snapshot) → Completed.
Failure or cancel: volumes deleted (unless keep_on_failure), reservation released, phase
Failed/Cancelled with the reason.
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
        Checksums,
        CleanupInput,
        CopyInput,
        CopyResult,
        CreateVolumeInput,
        DiskState,
        FinalizeInput,
        InstanceRef,
        MigrationRequest,
        MigrationResult,
        MigrationState,
        Phase,
        Reservation,
        ReserveInput,
        SnapshotInput,
        SnapshotRef,
        ValidationResult,
        VerifyInput,
        VolumeRef,
    )

PHASE_ATTR = SearchAttributeKey.for_keyword("XmsPhase")

SHORT = dict(
    start_to_close_timeout=timedelta(minutes=5),
    retry_policy=RetryPolicy(
        initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
        maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE_TYPES,
    ),
)
CLEANUP = dict(
    start_to_close_timeout=timedelta(minutes=10),
    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
                             maximum_attempts=20),
)


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
        assert self.s is not None
        return Admission(
            accepted=bool(self.s.admitted), phase=self.s.phase, reason=self.s.reason,
            reason_type=self.s.reason_type, reservation_id=self.s.reservation_id,
            footprint_gib=sum(d.plan.volume_size_gib for d in self.s.disks if d.plan),
        )

    # ------------------------------------------------------------------ main

    @workflow.run
    async def run(self, req: MigrationRequest) -> MigrationResult:
        s = self.s = MigrationState(
            request=req, started_at=workflow.now(),
            disks=[DiskState(index=i, source=d) for i, d in enumerate(req.disks)],
        )
        self._enter(Phase.INITIALIZING, "Validate")
        try:
            await self._admit()
            await self._create_volumes()
            self._enter(Phase.FULL_SYNC, "Copy")
            await self._copy_all()
            self._enter(Phase.CUTTING_OVER, "Verify")
            await self._verify_all()
            self._enter(Phase.CUTTING_OVER, "Finalize")
            await self._finalize()
            if req.snapshot:
                self._enter(Phase.CUTTING_OVER, "Snapshot")
                await self._snapshot_all()
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
        return MigrationResult(name=req.name, phase=s.phase, disks=s.disks, instance_id=s.instance_id)

    # ------------------------------------------------------------------ steps

    async def _admit(self) -> None:
        s = self.s
        v: ValidationResult = await workflow.execute_activity(
            "validate", s.request, result_type=ValidationResult, **SHORT
        )
        s.volume_type, s.availability_zone, s.host_queue = v.volume_type, v.availability_zone, v.host_queue
        for d, plan in zip(s.disks, v.disks):
            d.source, d.plan = plan.source, plan
        self._enter(Phase.INITIALIZING, "Reserve")
        r: Reservation = await workflow.execute_activity(
            "reserve",
            ReserveInput(migration=s.request.name, project=s.request.project, volume_type=v.volume_type.name,
                         sizes_gib=[d.volume_size_gib for d in v.disks]),
            result_type=Reservation, task_queue=s.host_queue, **SHORT,
        )
        s.reservation_id = r.id
        s.admitted = True

    async def _create_volumes(self) -> None:
        s = self.s
        self._enter(Phase.INITIALIZING, "CreateVolumes")

        async def one(d: DiskState) -> None:
            v: VolumeRef = await workflow.execute_activity(
                "create_volume",
                CreateVolumeInput(migration=s.request.name, project=s.request.project,
                                  reservation_id=s.reservation_id, disk=d.plan,
                                  volume_type=s.volume_type.name, availability_zone=s.availability_zone),
                result_type=VolumeRef, task_queue=s.host_queue, **SHORT,
            )
            d.volume_id = v.id

        await _gather(one(d) for d in s.disks)

    async def _copy_all(self) -> None:
        s = self.s

        async def one(d: DiskState) -> None:
            d.copy_result = await workflow.execute_activity(
                "copy_disk",
                CopyInput(migration=s.request.name, disk=d.plan, volume_id=d.volume_id,
                          qos=s.volume_type.qos, fresh=True),
                result_type=CopyResult, task_queue=s.host_queue,
                start_to_close_timeout=timedelta(days=2),
                heartbeat_timeout=timedelta(seconds=s.request.heartbeat_timeout_s),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2,
                                         maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                                         non_retryable_error_types=NON_RETRYABLE_TYPES),
            )

        await _gather(one(d) for d in s.disks)

    async def _verify_all(self) -> None:
        s = self.s

        async def one(d: DiskState) -> None:
            d.checksums = await workflow.execute_activity(
                "verify_disk", VerifyInput(migration=s.request.name, disk=d.plan, volume_id=d.volume_id),
                result_type=Checksums, task_queue=s.host_queue,
                start_to_close_timeout=timedelta(hours=12), heartbeat_timeout=None,
                retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=[*NON_RETRYABLE_TYPES, "ChecksumMismatch"]),
            )

        await _gather(one(d) for d in s.disks)

    async def _finalize(self) -> None:
        s = self.s
        inst: InstanceRef = await workflow.execute_activity(
            "finalize",
            FinalizeInput(
                migration=s.request.name, project=s.request.project,
                volume_ids=[d.volume_id for d in s.disks],
                metadata={"xms.migrated_at": workflow.now().isoformat(), "xms.mode": s.request.mode},
            ),
            result_type=InstanceRef, task_queue=s.host_queue, **SHORT,
        )
        s.instance_id = inst.id

    async def _snapshot_all(self) -> None:
        s = self.s

        async def one(d: DiskState) -> None:
            snap: SnapshotRef = await workflow.execute_activity(
                "snapshot", SnapshotInput(migration=s.request.name, volume_id=d.volume_id, disk_index=d.index),
                result_type=SnapshotRef, task_queue=s.host_queue,
                start_to_close_timeout=timedelta(hours=2), retry_policy=SHORT["retry_policy"],
            )
            d.snapshot_id = snap.id

        await _gather(one(d) for d in s.disks)

    async def _abort(self, reason: str, rtype: str, cancelled: bool) -> None:
        s = self.s
        s.reason, s.reason_type = reason, rtype
        if s.admitted is None:
            s.admitted = False
        keep = s.request.keep_on_failure and not cancelled
        if s.host_queue and (s.reservation_id or not keep):
            await workflow.execute_activity(
                "cleanup",
                CleanupInput(migration=s.request.name, project=s.request.project, reservation_id=s.reservation_id,
                             delete_volumes=not keep, volume_ids=[d.volume_id for d in s.disks if d.volume_id]),
                task_queue=s.host_queue, **CLEANUP,
            )
        self._enter(Phase.CANCELLED if cancelled else Phase.FAILED, s.step)
        await workflow.wait_condition(workflow.all_handlers_finished)

    def _enter(self, phase: Phase, step: str) -> None:
        s = self.s
        if s.phase != phase or not s.history:
            workflow.upsert_search_attributes([PHASE_ATTR.value_set(phase.value)])
        s.phase, s.step = phase, step
        s.history.append((phase.value, step, workflow.now()))


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


def _reason(e: BaseException, step: str) -> tuple[str, str]:
    cause = e
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return cause.message, cause.type or "ApplicationError"
    return f"{step}: {cause}", type(cause).__name__
