"""Block-storage adapters behind one port; ``open_store`` picks the configured one (XMS_TARGET)."""

from __future__ import annotations

from activities.blockstorage.port import BlockStorage
from xms.settings import Settings


def delete_migration_volumes(store: BlockStorage, migration: str, volume_ids: tuple[str, ...] = ()) -> list[str]:
    """Delete a migration's instance record and its volumes (those it lists and ``volume_ids``),
    snapshots with them; the ids deleted. Idempotent. Its reservation is the caller's to release."""
    store.delete_instance(migration)
    ids = sorted(set(volume_ids) | {v.id for v in store.list_volumes(migration=migration)})
    for vid in ids:
        store.delete_volume(vid)
    return ids


def open_store(settings: Settings) -> BlockStorage:
    if settings.target == "openstack":
        from activities.blockstorage.openstack import open_openstack_store

        return open_openstack_store(settings)
    from activities.blockstorage.local import open_local_store

    return open_local_store(settings)
