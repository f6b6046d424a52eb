"""Errors raised by the storage layer; the node maps them to DICOM statuses."""

from __future__ import annotations


class StorageError(Exception):
    """Base of storage errors."""


class InvalidUID(StorageError):
    """A UID that may not become part of a path (not digits and dots, or too long)."""


class StorageFull(StorageError):
    """The disk is full or below the configured free-space watermark."""
