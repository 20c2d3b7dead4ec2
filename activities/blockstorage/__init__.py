"""Block-storage adapters behind one port; ``open_store`` picks the configured one."""

from __future__ import annotations

from activities.blockstorage.port import BlockStorage
from xms.settings import Settings


def open_store(settings: Settings) -> BlockStorage:
    from activities.blockstorage.local import open_local_store

    return open_local_store(settings)
