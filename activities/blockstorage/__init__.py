"""Block-storage adapters behind one port; ``open_store`` picks the configured one (XMS_TARGET)."""

from __future__ import annotations

from activities.blockstorage.port import BlockStorage
from xms.settings import Settings


def open_store(settings: Settings) -> BlockStorage:
    if settings.target == "openstack":
        from activities.blockstorage.openstack import open_openstack_store

        return open_openstack_store(settings)
    from activities.blockstorage.local import open_local_store

    return open_local_store(settings)
