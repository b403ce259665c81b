"""The exception hierarchy: every error the package raises on purpose is a `WriteBehindError`.

Each message names the field, variable or session it is about, and never the
content of a message or a secret.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = [
    "BackPressureError",
    "ClosedError",
    "ConfigError",
    "ConflictError",
    "DatabaseLockedError",
    "DecryptionError",
    "EncryptionError",
    "NotFound",
    "OwnershipError",
    "SchemaError",
    "StorageError",
    "ValidationError",
    "WriteBehindError",
    "WrongKeyError",
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

    Raised when `max_dirty` sessions, or `max_dirty_bytes` of text, are waiting
    for the disk and the worker did not make room within `backpressure_timeout_ms`;
    the message names the bound. Retry later.
    """


class ClosedError(WriteBehindError):
    """The store is closed (or was never started) and takes no more writes."""


class StorageError(WriteBehindError):
    """The backend failed. Dirty data stays in memory and is retried."""


class SchemaError(StorageError):
    """The database file is not one this version can use; it was left untouched."""


class EncryptionError(StorageError):
    """Encrypted data, or the keys that open it, cannot be used (`writebehind.encryption`).
    Never garbage instead: a value that does not decrypt raises."""


class WrongKeyError(EncryptionError):
    """The key-encryption key (CHAT_SESSION_ENCRYPTION_KEY or _FILE) is not the one the keys
    store was made with, or was last rotated to. Raised by `start()`, which changed nothing;
    the message names both keys by their public ids, never the keys."""


class DecryptionError(EncryptionError):
    """A stored value of the session does not decrypt: it was changed or moved outside
    writebehind, or its data key is not in the keys store (a keys store from elsewhere).
    `session_id` names the session; the load that met it raises this, and nothing else is
    affected."""

    def __init__(self, session_id: str, problem: str) -> None:
        super().__init__(f"session {session_id!r}: {problem}")
        self.session_id = session_id
        self.problem = problem


class DatabaseLockedError(StorageError):
    """Another writebehind store holds this SQLite file: raised by `start()` (the backend's
    `open()`), which changed nothing.

    SQLite allows one store per database file, because a store acknowledges writes from
    memory and only the file's one owner may do that. `pid` and `host` name the holder as
    it wrote itself into the lock file (None if that could not be read). The lock is the
    operating system's: it ends with the holder, SIGKILL included, so retrying after the
    holder stopped works at once; there is never a stale lock to remove.
    """

    def __init__(self, path: str | os.PathLike[str], pid: int | None, host: str | None) -> None:
        holder = f"pid {'unknown' if pid is None else pid} on host {host or 'unknown'}"
        if pid == os.getpid() and host == socket.gethostname():
            holder += ": this very process"
        super().__init__(
            f"{path} is held by another writebehind store ({holder}). SQLite allows one store "
            "per database file: run one server worker (--workers 1), or use PostgreSQL "
            "(CHAT_SESSION_DB_URL) for several."
        )
        self.path = Path(path)
        self.pid = pid
        self.host = host


class OwnershipError(StorageError):
    """Another app instance owns the session (PostgreSQL, several instances) and did not
    hand it over in time: it did not answer within the handoff timeout although its lock
    says it is alive, or a reply streaming into the session there outlasted the hold
    timeout. Nothing was changed here; the caller may retry. `owner` names the holder
    ("instance 7, pid 123 on host h") when it is known.
    """

    def __init__(self, session_id: str, problem: str, owner: str | None = None) -> None:
        held = f" (owned by {owner})" if owner else ""
        super().__init__(f"session {session_id!r}{held}: {problem}")
        self.session_id = session_id
        self.owner = owner


class ConflictError(StorageError):
    """Sessions that another writer (an app instance sharing the database) kept changing
    while this one tried to write them: after merging this instance's messages onto the
    other's version a few times in one flush, they are still not written. Nothing is
    dropped: they stay in memory, merged, and the next flush tries again."""

    def __init__(self, session_ids: list[str]) -> None:
        first = session_ids[0]
        more = f" (and {len(session_ids) - 1} more)" if len(session_ids) > 1 else ""
        super().__init__(f"session {first!r}{more} kept being changed by another writer; not written yet")
        self.session_id = first
        self.session_ids = session_ids
