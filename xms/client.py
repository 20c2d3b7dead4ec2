"""Client side of the contract: submit, inspect, cancel migrations. Used by the CLI and tests."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from workflows.migration import MigrationWorkflow
from xms.errors import DuplicateMigration, InvalidRequest, NotFound, XmsError
from xms.models import (
    BootResult,
    GuestInfo,
    Admission,
    CopyProgress,
    CutoverRequest,
    CutoverResult,
    CutoverInfo,
    MigrationInput,
    MigrationRequest,
    MigrationState,
    Model,
    Phase,
    SyncRecord,
)
from xms.settings import Settings


class Refused(XmsError):
    """The migration was refused at admission (validation or quota); ``type`` is the reason's type."""

    def __init__(self, message: str, type_: str):
        super().__init__(message)
        self.type = type_


class DiskView(Model):
    index: int
    source: str
    volume_id: str | None = None
    virtual_size: int = 0
    volume_size_gib: int = 0
    bytes_copied: int = 0
    data_bytes_total: int = 0
    throughput: float = 0.0
    eta_s: float | None = None
    resumed_from: int = 0
    attempt: int = 0
    copy_state: str = "pending"  # pending | copying | verifying | retrying | done
    generation: int = 0
    synced_bytes: int = 0  # read by incremental syncs so far
    last_sync_bytes: int | None = None
    source_sha256: str | None = None
    target_sha256: str | None = None
    match: bool | None = None
    snapshot_id: str | None = None
    backup: str | None = None


class MigrationView(Model):
    name: str
    status: str  # Temporal's execution status
    phase: Phase
    step: str
    reason: str | None = None
    reason_type: str | None = None  # the failure's stable type (QuotaExceeded, LaunchFailed, ...), for scripts
    project: str
    volume_type: str
    availability_zone: str | None = None
    mode: str
    target: str = "local"  # local | openstack (cloud name)
    instance_id: str | None = None
    disks: list[DiskView]
    started_at: str | None = None
    finished_at: str | None = None
    history: list[tuple[str, str, str]] = []
    # warm
    syncs_done: int = 0
    syncs_failed: int = 0
    last_sync: SyncRecord | None = None
    lag_s: float | None = None  # now − the last sync's point in time
    next_sync_at: str | None = None
    cutover: CutoverInfo | None = None
    last_failed_cutover: CutoverInfo | None = None
    guest: GuestInfo | None = None
    boot: BootResult | None = None
    runs: int = 1
    volume_count: int = 0
    warnings: list[str] = []


async def connect(settings: Settings) -> Client:
    try:
        return await Client.connect(
            settings.temporal_address, namespace=settings.namespace, data_converter=settings.data_converter
        )
    except RuntimeError as e:
        raise XmsError(
            f"cannot reach Temporal at {settings.temporal_address} ({str(e).splitlines()[0]}); "
            "start it with `xms server` or pass --temporal HOST:PORT"
        ) from None


def build_request(**fields) -> MigrationRequest:
    try:
        return MigrationRequest(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {msg}" if where else msg) from None


async def submit(client: Client, settings: Settings, req: MigrationRequest) -> Admission:
    """Start the migration and wait for admission (quota reserved) or refusal, in one call."""
    op = WithStartWorkflowOperation(
        MigrationWorkflow.run, MigrationInput(request=req, index_phase=await phase_indexed(client)), id=req.name, task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        # a name is free again once its last run failed, was cancelled or terminated
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        static_summary=f"{req.mode} migration of {len(req.disks)} disk(s) to {req.volume_type} for {req.project}",
    )
    try:
        adm: Admission = await client.execute_update_with_start_workflow(
            MigrationWorkflow.admission, start_workflow_operation=op, rpc_timeout=timedelta(minutes=10),
        )
    except WorkflowAlreadyStartedError:
        raise DuplicateMigration(
            f"a migration named {req.name!r} already exists (running or completed); choose another name"
        ) from None
    except WorkflowUpdateFailedError as e:
        raise XmsError(f"migration {req.name}: {e.cause or e}") from None
    except RPCError as e:
        if e.status == RPCStatusCode.ALREADY_EXISTS or "already" in e.message.lower():
            raise DuplicateMigration(
                f"a migration named {req.name!r} already exists (running or completed); choose another name"
            ) from None
        raise XmsError(f"cannot start migration {req.name}: {e.message}") from None
    if not adm.accepted:
        raise Refused(adm.reason or "refused", adm.reason_type or "Refused")
    return adm


async def phase_indexed(client: Client) -> bool:
    """True if the namespace has the XmsPhase search attribute (the worker registers it at start)."""
    try:
        r = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace))
    except RPCError:
        return False
    return "XmsPhase" in r.custom_attributes


async def wait(client: Client, name: str) -> MigrationView:
    handle = client.get_workflow_handle(name)
    try:
        await handle.result()
    except WorkflowFailureError:
        pass
    return await view(client, name)


async def _describe(client: Client, name: str):
    handle = client.get_workflow_handle(name)
    try:
        return handle, await handle.describe()
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise NotFound(f"no migration named {name!r}; `xms list` shows them") from None
        raise


async def view(client: Client, name: str) -> MigrationView:
    handle, desc = await _describe(client, name)
    state: MigrationState = await handle.query(MigrationWorkflow.status)
    req = state.request
    disks = []
    live: dict[int, tuple[CopyProgress, str]] = {}
    for pa in desc.raw_description.pending_activities:
        if pa.activity_type.name != "copy_disk" or not pa.heartbeat_details.payloads:
            continue
        details = await client.data_converter.decode(pa.heartbeat_details.payloads)
        p = CopyProgress.model_validate(details[0])
        st = "retrying" if pa.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED and pa.attempt > 1 else (
            "verifying" if p.stage == "verify" else "copying")
        live[p.disk_index] = (p, st)
    for d in state.disks:
        v = DiskView(index=d.index, source=d.source, volume_id=d.volume_id, snapshot_id=d.snapshot_id,
                     backup=d.backup)
        if d.plan:
            v.virtual_size, v.volume_size_gib = d.plan.virtual_size, d.plan.volume_size_gib
        if d.copy_result:
            r = d.copy_result
            v.copy_state, v.bytes_copied, v.resumed_from = "done", r.bytes_read, r.resumed_from
            v.data_bytes_total, v.throughput = r.bytes_read, r.throughput
        elif d.index in live:
            p, v.copy_state = live[d.index]
            v.bytes_copied, v.data_bytes_total, v.throughput = p.bytes_copied, p.data_bytes_total, p.throughput
            v.eta_s, v.resumed_from, v.attempt = p.eta_s, p.resumed_from, p.attempt
            if p.updated_at and time.time() - p.updated_at > 60:
                v.copy_state = "stalled"
        v.synced_bytes = d.synced_bytes
        if d.last_sync:
            v.last_sync_bytes, v.generation = d.last_sync.bytes_read, d.last_sync.generation
        if d.index in live and d.copy_result:  # an incremental sync in flight
            p, v.copy_state = live[d.index]
            v.bytes_copied, v.data_bytes_total, v.throughput, v.eta_s = p.bytes_copied, p.data_bytes_total, p.throughput, p.eta_s
            v.generation = p.generation
        if d.checksums:
            v.source_sha256, v.target_sha256, v.match = d.checksums.source, d.checksums.target, d.checksums.match
        disks.append(v)
    return MigrationView(
        name=name, status=desc.status.name if desc.status else "UNKNOWN", phase=state.phase, step=state.step,
        reason=state.reason, reason_type=state.reason_type, project=req.project, volume_type=req.volume_type,
        target=req.target if not req.cloud else f"{req.target} ({req.cloud})",
        availability_zone=state.availability_zone, mode=req.mode, instance_id=state.instance_id, disks=disks,
        started_at=state.started_at.isoformat() if state.started_at else None,
        finished_at=state.finished_at.isoformat() if state.finished_at else None,
        history=[(p, s, t.isoformat()) for p, s, t in state.history],
        syncs_done=state.syncs_done, syncs_failed=state.syncs_failed, last_sync=state.last_sync,
        lag_s=(datetime.now(timezone.utc) - state.last_sync.frozen_at).total_seconds()
        if state.last_sync and state.last_sync.frozen_at and not state.phase.terminal else None,
        next_sync_at=state.next_sync_at.isoformat() if state.next_sync_at else None,
        cutover=state.cutover, last_failed_cutover=state.last_failed_cutover, runs=state.runs,
        guest=state.guest, boot=state.boot,
        volume_count=state.volume_count, warnings=state.warnings,
    )


async def list_migrations(client: Client, limit: int = 200) -> list[dict]:
    out = []
    async for w in client.list_workflows("WorkflowType='MigrationWorkflow'", limit=limit):
        phase = w.typed_search_attributes.get(_phase_key()) if w.typed_search_attributes else None
        out.append({
            "name": w.id, "status": w.status.name if w.status else "UNKNOWN", "phase": phase,
            "started": w.start_time.isoformat() if w.start_time else None,
            "closed": w.close_time.isoformat() if w.close_time else None,
        })
    return out


def _phase_key():
    from workflows.migration import PHASE_ATTR

    return PHASE_ATTR


async def sync_now(client: Client, name: str) -> None:
    st = await view(client, name)
    if st.mode != "warm" or st.phase not in (Phase.READY, Phase.SYNCING):
        raise InvalidRequest(f"sync-now refused: migration {name} is {st.mode}, {st.phase.value}; "
                             "allowed for warm migrations that are Ready")
    await client.get_workflow_handle(name).signal(MigrationWorkflow.sync_now)


async def cutover(client: Client, name: str) -> CutoverResult:
    """Request the cutover (or join the one in progress) and wait for its end."""
    handle = client.get_workflow_handle(name)
    try:
        return await handle.execute_update(MigrationWorkflow.cutover, CutoverRequest(),
                                           rpc_timeout=timedelta(hours=24))
    except WorkflowUpdateFailedError as e:
        raise InvalidRequest(failure_line(e)) from None
    except RPCError as e:
        if e.status == RPCStatusCode.NOT_FOUND:
            raise NotFound(f"no running migration named {name!r}") from None
        raise XmsError(f"cutover of {name}: {e.message}") from None


async def execution_status(client: Client, name: str) -> str | None:
    """Temporal's status of the latest run of migration ``name`` (RUNNING, COMPLETED, FAILED, …), or None."""
    try:
        _, desc = await _describe(client, name)
    except NotFound:
        return None
    return desc.status.name if desc.status else None


async def cancel(client: Client, name: str) -> None:
    handle, desc = await _describe(client, name)
    if desc.status != WorkflowExecutionStatus.RUNNING:
        raise InvalidRequest(f"migration {name} is not running (status {desc.status.name}); nothing to cancel")
    await handle.cancel()


def failure_line(e: BaseException) -> str:
    cause = e
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause.message if isinstance(cause, ApplicationError) else str(cause)
