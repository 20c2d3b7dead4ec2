"""The contract: one pydantic model in and one out for every workflow, activity, query and update.

Fields are only ever added, with defaults, so that histories recorded by older versions replay.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GiB = 1024**3
MiB = 1024**2

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
NAME_RULE = "1-63 characters: lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], off + n) - out[-1][0])
        else:
            out.append((off, n))
    return out


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


# --------------------------------------------------------------------------- block storage


class QoS(Model):
    write_bytes_sec: int = Field(0, ge=0, description="0 = unlimited")
    write_iops_sec: int = Field(0, ge=0, description="0 = unlimited")


class VolumeTypeInfo(Model):
    name: str
    backend: str
    availability_zone: str
    qos: QoS = QoS()
    encrypted: bool = False
    granularity_gib: int = Field(1, ge=1)
    description: str = ""

    def footprint_gib(self, size_bytes: int) -> int:
        """Size in GiB of the volume that holds ``size_bytes``, rounded up to the granularity."""
        g = self.granularity_gib * GiB
        return max(1, -(-size_bytes // g)) * self.granularity_gib


class TargetEndpoint(Model):
    """Where the copy engine writes (or reads back) a volume's bytes."""

    kind: Literal["file", "nbd"]
    path: str = ""  # kind == file: a raw file or block device
    uri: str = ""  # kind == nbd
    size: int  # bytes
    fresh: bool = False  # never written since creation: reads as zeroes, zero extents need no write


class VolumeRef(Model):
    id: str
    name: str
    project: str
    size_gib: int
    volume_type: str
    backend: str
    availability_zone: str
    status: str
    bootable: bool = False
    encrypted: bool = False
    path: str = ""  # local store: the file holding the volume
    format: str = ""  # local store: raw | qcow2
    metadata: dict[str, str] = {}
    created_at: datetime | None = None


class SnapshotRef(Model):
    id: str
    name: str
    volume_id: str
    size_gib: int
    status: str
    path: str = ""
    backup: str = ""  # openstack: the backup made next to the snapshot, or why there is none


class InstanceRef(Model):
    id: str
    name: str
    project: str
    volume_ids: list[str] = []  # in boot order


class QuotaUsage(Model):
    limit: int  # -1 = unlimited
    in_use: int
    reserved: int


class QuotaReport(Model):
    project: str
    quotas: dict[str, QuotaUsage]  # "volumes", "gigabytes", "gigabytes_<type>"


class Reservation(Model):
    id: str
    project: str
    volume_type: str
    volumes: int
    gigabytes: int
    # True where the adapter has no reservations of its own (Cinder): the footprint is held by
    # creating every volume, so admission completes only once all of them exist
    held_by_volumes: bool = False


# --------------------------------------------------------------------------- migration contract


class Phase(str, Enum):
    INITIALIZING = "Initializing"
    FULL_SYNC = "FullSync"
    READY = "Ready"
    SYNCING = "Syncing"
    CUTTING_OVER = "CuttingOver"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED)


class MigrationRequest(Model):
    name: str
    disks: list[str] = Field(min_length=1, max_length=26)
    project: str
    volume_type: str
    availability_zone: str | None = None
    mode: Literal["cold", "warm"] = "cold"
    snapshot: bool = True
    keep_on_failure: bool = False
    # warm mode
    sync_interval_s: int = Field(900, ge=1, le=7 * 86400)
    cutover_at: datetime | None = None
    bitmap: str | None = None  # dirty bitmap exported by NBD sources that manage their own
    power_off_hook: str | None = None  # PowerOffSource: a hook named in the worker's config
    syncs_per_run: int = Field(200, ge=1, le=2000)  # continue-as-new after this many syncs
    # activity knobs, kept small so tests and operators can tune them
    heartbeat_timeout_s: int = Field(30, ge=2, le=3600)
    # where the volumes go: the worker's adapter and, for openstack, the clouds.yaml entry by name
    # (never credentials). The worker refuses a request meant for another target.
    target: Literal["local", "openstack"] = "local"
    cloud: str | None = Field(None, max_length=255)
    # GuestConversion: "auto" converts a disk set that holds an operating system (virt-v2v-in-place)
    # and records a data-only disk set as such; "off" skips the step
    guest_conversion: Literal["auto", "off"] = "auto"
    # BootTarget: wait for this line on the target VM's serial console (None: no boot check)
    boot_marker: str | None = Field(None, min_length=1, max_length=200)
    boot_timeout_s: int = Field(600, ge=10, le=7200)
    # LaunchInstance (openstack): a Nova server booted from the volumes in disk order, with this
    # flavor and a port on this network (names or ids); without them the instance is the volumes'
    # boot order in their metadata
    flavor: str | None = Field(None, min_length=1, max_length=255)
    network: str | None = Field(None, min_length=1, max_length=255)

    @field_validator("name", "project")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid name ({NAME_RULE})")
        return v

    @field_validator("disks")
    @classmethod
    def _disks(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d or d != d.strip():
                raise ValueError(f"disk source {d!r} is empty or has surrounding spaces")
        if len(set(v)) != len(v):
            raise ValueError("the same disk source is given twice")
        return v

    @model_validator(mode="after")
    def _mode(self) -> "MigrationRequest":
        if self.mode == "cold" and (self.cutover_at or self.bitmap):
            raise ValueError("--cutover-at and --bitmap apply to --mode warm only")
        if self.cutover_at is not None and self.cutover_at.tzinfo is None:
            raise ValueError("cutover_at needs a time zone, e.g. 2026-11-26T02:00:00Z")
        if self.power_off_hook is not None and not NAME_RE.match(self.power_off_hook):
            raise ValueError(f"hook name {self.power_off_hook!r} is not valid ({NAME_RULE})")
        if self.bitmap is not None and not NAME_RE.match(self.bitmap.lower()):
            raise ValueError(f"bitmap name {self.bitmap!r} is not valid ({NAME_RULE})")
        if (self.flavor is None) != (self.network is None):
            raise ValueError("--flavor and --network go together: a server needs both (or give neither)")
        if self.flavor is not None and self.target != "openstack":
            raise ValueError("--flavor and --network apply to --target openstack only (the embedded store's "
                             "instance is started with `xms instance start`)")
        return self


class DiskPlan(Model):
    index: int
    source: str
    source_kind: Literal["nbd", "image", "qmp"]
    source_format: str = "raw"  # for images: raw | qcow2
    virtual_size: int
    volume_size_gib: int


class ValidationResult(Model):
    volume_type: VolumeTypeInfo
    availability_zone: str
    disks: list[DiskPlan]
    host_queue: str

    @property
    def footprint_gib(self) -> int:
        return sum(d.volume_size_gib for d in self.disks)


class CopyProgress(Model):
    """Heartbeat details of a copy: small, so that it can be sent often."""

    disk_index: int
    generation: int = 0  # 0 = full sync; resume only within the same generation
    stage: Literal["copy", "verify"] = "copy"
    verified: int = 0  # bytes of the target checksummed so far
    freeze_id: str = ""  # identifies the frozen point in time; resume only within the same one
    offset: int = 0  # everything below this offset is on the target: resume here
    bytes_total: int = 0  # virtual size of the disk
    data_bytes_total: int = 0  # allocated bytes to transfer (from base:allocation)
    bytes_copied: int = 0  # data bytes written so far, all attempts
    resumed_from: int = 0  # offset this attempt started at
    attempt: int = 1
    throughput: float = 0.0  # bytes/s of this attempt
    eta_s: float | None = None
    updated_at: float = 0.0  # unix time


class CopyInput(Model):
    migration: str
    disk: DiskPlan
    volume_id: str
    qos: QoS = QoS()
    generation: int = 0  # 0 = full copy (and, warm, start tracking); g >= 1 = changes of sync g
    track: bool = False  # warm: freeze through the source's change tracker
    bitmap: str | None = None
    verify: bool = False  # checksum source (as frozen) and target after the copy
    rewrite: list[tuple[int, int]] = []  # (offset, length): copy again whatever the bitmap says


class CopyResult(Model):
    disk_index: int
    bytes_total: int
    bytes_read: int
    bytes_written: int
    zero_bytes_skipped: int
    resumed_from: int
    duration_s: float
    throughput: float
    generation: int = 0
    zero_bytes_written: int = 0
    changed_bytes: int = 0  # dirty bytes of this generation (incremental syncs)
    extents: int = 0
    frozen_at: datetime | None = None  # the point in time this copy reproduces
    skipped: bool = False  # generation already committed by an earlier attempt
    checksums: "Checksums | None" = None


class Checksums(Model):
    algorithm: str = "sha256-4MiB-chunks"
    length: int
    source: str
    target: str
    target_tail_zero: bool = True

    @property
    def match(self) -> bool:
        return self.source == self.target and self.target_tail_zero


class DiskState(Model):
    index: int
    source: str
    plan: DiskPlan | None = None
    volume_id: str | None = None
    copy_result: CopyResult | None = None  # the full copy
    last_sync: CopyResult | None = None  # the latest incremental sync (or final delta)
    synced_bytes: int = 0  # bytes read by all incremental syncs
    checksums: Checksums | None = None
    snapshot_id: str | None = None
    backup: str | None = None  # openstack: the post-migration backup, or why there is none


class SyncRecord(Model):
    generation: int
    started_at: datetime
    finished_at: datetime
    frozen_at: datetime | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    zero_bytes_written: int = 0
    changed_bytes: int = 0
    ok: bool = True
    error: str | None = None

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


class GuestInfo(Model):
    """What GuestConversion found and did (virt-v2v's inspection of the target volumes)."""

    os_type: str | None = None  # linux | windows | None (no operating system)
    distro: str | None = None
    product_name: str | None = None
    firmware: str | None = None  # bios | uefi
    root_device: str | None = None
    boot_disk: int | None = None  # index of the disk holding the root filesystem
    data_disk: bool = False  # no operating system: recorded, not converted
    converted: bool = False
    # per disk, the byte ranges conversion rewrote on the target (from its overlay): should the
    # cutover fail after this, the next syncs copy them from the source again (the CBT chain
    # only knows the source's writes)
    changed_extents: list[list[tuple[int, int]]] = []
    note: str = ""
    duration_s: float = 0.0


class BootResult(Model):
    """BootTarget: the target VM reached its boot marker."""

    seconds: float  # from VM start to the marker
    marker_line: str
    serial_log: str
    since_cutover_s: float | None = None  # from the cutover request to the marker (warm)


class GuestInput(Model):
    migration: str
    volume_ids: list[str]  # disk order
    timeout_s: int = 3600


class BootInput(Model):
    migration: str
    volume_ids: list[str]  # boot order
    firmware: str = "bios"
    marker: str
    timeout_s: int = 600
    instance_id: str | None = None  # a server the target runs (openstack): its console is read instead


class LaunchInput(Model):
    migration: str
    project: str
    volume_ids: list[str]  # disk order = boot order
    flavor: str
    network: str


class CutoverInfo(Model):
    requested_at: datetime
    requested_by: str = "update"  # update | schedule
    attempt: int = 1
    started_at: datetime | None = None
    finished_at: datetime | None = None
    power_off: str | None = None  # what PowerOffSource did
    conversion: str | None = None  # what GuestConversion did
    error: str | None = None
    boot_s: float | None = None  # from the request to the target's boot marker


class MigrationState(Model):
    request: MigrationRequest
    phase: Phase = Phase.INITIALIZING
    step: str = "Validate"
    reason: str | None = None
    reason_type: str | None = None
    volume_type: VolumeTypeInfo | None = None
    availability_zone: str | None = None
    host_queue: str | None = None
    guest: GuestInfo | None = None
    boot: BootResult | None = None
    rewrite: dict[int, list[tuple[int, int]]] = {}  # disk index -> ranges the target diverged in
    reservation_id: str | None = None
    disks: list[DiskState] = []
    instance_id: str | None = None
    admitted: bool | None = None  # None: not decided yet
    started_at: datetime | None = None
    finished_at: datetime | None = None
    history: list[tuple[str, str, datetime]] = []  # (phase, step, at), bounded
    # warm
    generation: int = 0  # the next sync's generation
    syncs_done: int = 0  # incremental syncs completed
    syncs_failed: int = 0
    consecutive_failures: int = 0
    recent_syncs: list[SyncRecord] = []  # the last few, newest last
    next_sync_at: datetime | None = None
    sync_now: bool = False
    cutover: CutoverInfo | None = None
    cutover_attempts: int = 0
    last_failed_cutover: CutoverInfo | None = None
    runs: int = 1  # runs of this workflow id so far (continue-as-new)
    index_phase: bool = False
    warnings: list[str] = []  # problems that did not change the outcome (e.g. cleanup that failed)
    volume_count: int = 0  # volumes made at admission; constant for the migration's life

    @property
    def last_sync(self) -> SyncRecord | None:
        return self.recent_syncs[-1] if self.recent_syncs else None


class MigrationInput(Model):
    """Workflow input: the request, and the state carried over by continue-as-new."""

    request: MigrationRequest
    state: MigrationState | None = None
    index_phase: bool = False  # the namespace has the XmsPhase search attribute: keep it current


class CutoverRequest(Model):
    reason: str = ""


class CutoverResult(Model):
    phase: Phase
    reason: str | None = None
    requested_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 1


class Admission(Model):
    accepted: bool
    phase: Phase
    reason: str | None = None
    reason_type: str | None = None
    reservation_id: str | None = None
    footprint_gib: int = 0


class CleanupInput(Model):
    migration: str
    project: str
    reservation_id: str | None = None
    delete_volumes: bool = True
    volume_ids: list[str] = []


class TrackerInput(Model):
    migration: str
    disk: DiskPlan
    bitmap: str | None = None
    hook: str | None = None


class FinalizeInput(Model):
    migration: str
    project: str
    volume_ids: list[str]  # in disk order; the first is the boot volume
    metadata: dict[str, str] = {}
    disk_metadata: list[dict[str, str]] = []  # per volume, same order: source, last sync, checksum


class SnapshotInput(Model):
    migration: str
    volume_id: str
    disk_index: int


class ReserveInput(Model):
    migration: str
    project: str
    volume_type: str
    sizes_gib: list[int]
    snapshots: bool = False  # a post-migration snapshot of each volume follows (Cinder counts its gigabytes)


class CreateVolumeInput(Model):
    migration: str
    project: str
    reservation_id: str
    disk: DiskPlan
    volume_type: str
    availability_zone: str


class MigrationResult(Model):
    name: str
    phase: Phase
    disks: list[DiskState]
    instance_id: str | None = None
    reason: str | None = None


CopyResult.model_rebuild()
