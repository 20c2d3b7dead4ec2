"""The block-storage port. Two adapters implement it: ``local`` (embedded default) and ``openstack``.

Adapters are synchronous (they run in activity threads), never import Temporal, and raise
``xms.errors`` exceptions. Every mutating call is idempotent, so a retried activity is safe.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from xms.models import (
    InstanceRef,
    QuotaReport,
    Reservation,
    SnapshotRef,
    TargetEndpoint,
    VolumeRef,
    VolumeTypeInfo,
)


class BlockStorage(Protocol):
    # ---- catalogue
    def volume_types(self) -> list[VolumeTypeInfo]: ...

    def get_volume_type(self, name: str) -> VolumeTypeInfo:
        """Raises UnknownVolumeType naming the valid types."""
        ...

    # ---- quota
    def quota(self, project: str) -> QuotaReport: ...

    def set_quota(self, project: str, limits: dict[str, int]) -> QuotaReport: ...

    def reserve(self, project: str, migration: str, volume_type: str, sizes_gib: list[int], *,
                snapshots: bool = False) -> Reservation:
        """Atomically reserve one volume per size (``snapshots``: a snapshot of each follows; adapters
        whose quota counts snapshots include them). Raises QuotaExceeded (which quota, requested,
        limit, in use). Idempotent: a second call for the same migration returns its reservation."""
        ...

    def release(self, reservation_id: str) -> None:
        """Drop what is left of a reservation. Idempotent."""
        ...

    def release_migration(self, migration: str) -> None:
        """Drop whatever reservation a migration holds (cleanup that never learnt its id). Idempotent."""
        ...

    # ---- volumes
    def create_volume(
        self,
        *,
        reservation_id: str,
        migration: str,
        disk_index: int,
        name: str,
        size_gib: int,
        volume_type: str,
        availability_zone: str,
        metadata: dict[str, str],
    ) -> VolumeRef:
        """Create an empty volume, consuming the reservation's item for ``disk_index``.
        Idempotent: the volume for (migration, disk_index) is returned if it exists."""
        ...

    def get_volume(self, volume_id: str) -> VolumeRef: ...

    def list_volumes(self, *, project: str | None = None, migration: str | None = None) -> list[VolumeRef]: ...

    def delete_volume(self, volume_id: str) -> None:
        """Delete a volume and its snapshots; detach it first. Idempotent."""
        ...

    def open_target(self, volume_id: str, *, writable: bool = True) -> AbstractContextManager[TargetEndpoint]:
        """Attach the volume to this host for the duration of the ``with`` block."""
        ...

    def set_bootable(self, volume_id: str, bootable: bool) -> VolumeRef: ...

    def update_metadata(self, volume_id: str, metadata: dict[str, str]) -> VolumeRef: ...

    # ---- snapshots and instances
    def create_snapshot(self, volume_id: str, name: str) -> SnapshotRef:
        """Idempotent by (volume_id, name)."""
        ...

    def list_snapshots(self, volume_id: str | None = None) -> list[SnapshotRef]: ...

    def create_backup(self, volume_id: str, name: str) -> str:
        """A backup where the target has a backup service: what was made, or why nothing ("" = no
        such service in this adapter). Idempotent by (volume_id, name)."""
        ...

    def get_instance(self, name: str) -> InstanceRef | None: ...

    def ensure_instance(self, name: str, project: str) -> InstanceRef: ...

    def attach(self, instance_id: str, volume_id: str, index: int) -> InstanceRef:
        """Attach at boot position ``index``. Idempotent."""
        ...

    def delete_instance(self, name: str) -> None:
        """Detach everything and delete the record (and a server made by ``launch_instance``). Idempotent."""
        ...

    def check_launch(self, flavor: str, network: str) -> None:
        """Refuse (InvalidRequest, naming what exists) a flavor or network ``launch_instance`` could not use."""
        ...

    def launch_instance(self, name: str, project: str, volume_ids: list[str], flavor: str, network: str) -> InstanceRef:
        """Create and start a server booted from the volumes in this order (boot-from-volume), and
        wait until it runs. Idempotent by name."""
        ...

    def instance_console(self, instance_id: str) -> str | None:
        """The console output of a server this target runs; None if the target runs no servers
        (the worker boots the volumes itself)."""
        ...
