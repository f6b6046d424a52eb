"""Persistence: SQLAlchemy models, migrations, sessions, and the file store.

Imports neither ``pacs_node`` nor ``inference``.
"""

from storage.db import Database, upgrade
from storage.errors import InvalidUID, StorageError, StorageFull
from storage.filestore import FileStore

__all__ = ["Database", "FileStore", "InvalidUID", "StorageError", "StorageFull", "upgrade"]
