"""The exception hierarchy: every error the package raises on purpose is a `WriteBehindError`.

Each message names the field, variable or session it is about, and never the
content of a message or a secret.
"""

from __future__ import annotations

__all__ = [
    "BackPressureError",
    "ClosedError",
    "ConfigError",
    "ConflictError",
    "NotFound",
    "SchemaError",
    "StorageError",
    "ValidationError",
    "WriteBehindError",
]


class WriteBehindError(Exception):
    """Base class of every error raised by writebehind."""


class ValidationError(WriteBehindError, ValueError):
    """Bad input, rejected at the call before anything changed.

    `field` names the argument that was wrong.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigError(WriteBehindError, ValueError):
    """A configuration value is invalid; the message names the field or variable."""


class NotFound(WriteBehindError, LookupError):
    """No such session (or message) for this caller.

    Another user's session raises exactly this, with exactly the same message,
    so that existence never leaks across users.
    """

    def __init__(self, session_id: str, message_id: str | None = None) -> None:
        if message_id is None:
            text = f"session {session_id!r} not found"
        else:
            text = f"message {message_id!r} not found in session {session_id!r}"
        super().__init__(text)
        self.session_id = session_id
        self.message_id = message_id


class BackPressureError(WriteBehindError):
    """Too much unflushed data: the write was refused and nothing changed.

    Raised when `max_dirty` sessions are waiting for the disk and the worker did
    not make room within `backpressure_timeout_ms`. Retry later.
    """


class ClosedError(WriteBehindError):
    """The store is closed (or was never started) and takes no more writes."""


class StorageError(WriteBehindError):
    """The backend failed. Dirty data stays in memory and is retried."""


class SchemaError(StorageError):
    """The database file is not one this version can use; it was left untouched."""


class ConflictError(StorageError):
    """Another writer (an app instance sharing the database, an erasure) changed or deleted
    the session since this one last read it. This instance's version was not written: it
    is kept (`WriteBehindStore.take_conflicts()`), and the next access loads the winner's."""

    def __init__(self, session_ids: list[str]) -> None:
        first = session_ids[0]
        more = f" (and {len(session_ids) - 1} more)" if len(session_ids) > 1 else ""
        super().__init__(f"session {first!r}{more} was changed by another writer; not written")
        self.session_id = first
        self.session_ids = session_ids
