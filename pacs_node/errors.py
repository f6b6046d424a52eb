"""The node's exception hierarchy.

Third-party errors are converted at the edge with ``raise ... from exc`` so that
callers catch one family and messages say what a person can do about it.
"""

from __future__ import annotations


class PacsNodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(PacsNodeError):
    """The configuration is unreadable or invalid; the message names the key."""


class RuleError(ConfigError):
    """A routing rule or input matcher cannot be compiled."""


class IngestError(PacsNodeError):
    """An instance cannot be accepted; carries the DIMSE status to return."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CannotUnderstand(IngestError):
    """The instance lacks what we need to store it (0xC210 'cannot understand')."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0xC210)


class OutOfResources(IngestError):
    """The disk is full or below the free-space watermark (0xA700 'out of resources')."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0xA700)


class DatabaseError(PacsNodeError):
    """The database cannot be reached or migrated."""
