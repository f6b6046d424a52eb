"""The file store as the settings describe it, for every stage and process that opens one."""

from __future__ import annotations

from pacs_node.config import Settings
from storage.filestore import FileStore


def open_store(settings: Settings) -> FileStore:
    """The file store as configured."""
    return FileStore(
        settings.store_dir,
        fsync=settings.storage.fsync,
        min_free_bytes=settings.storage.min_free_mb * 2**20,
    )
