"""writebehind: write-behind persistence for chat sessions.

An in-memory hot tier answers every read and write; a background worker batches
what changed for signed-in users into SQLite (WAL) on an interval and at shutdown.
"""

from .backends.base import Backend, BatchResult, RecordError, SessionDelta
from .backends.sqlite import SQLiteBackend
from .config import Config
from .errors import (
    BackPressureError,
    ClosedError,
    ConfigError,
    ConflictError,
    DatabaseLockedError,
    NotFound,
    OwnershipError,
    SchemaError,
    StorageError,
    ValidationError,
    WriteBehindError,
)
from .model import SessionRecord, SessionSummary, StoredMessage, UserId
from .policy import PersistencePolicy, authenticated_only, persist_nothing
from .stats import StoreStats
from .store import UNSET, SessionStore, SessionTree
from .writebehind import WriteBehindStore

__all__ = [
    "UNSET",
    "BackPressureError",
    "Backend",
    "BatchResult",
    "ClosedError",
    "Config",
    "ConfigError",
    "ConflictError",
    "DatabaseLockedError",
    "NotFound",
    "OwnershipError",
    "PersistencePolicy",
    "RecordError",
    "SQLiteBackend",
    "SchemaError",
    "SessionDelta",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "SessionTree",
    "StorageError",
    "StoreStats",
    "StoredMessage",
    "UserId",
    "ValidationError",
    "WriteBehindError",
    "WriteBehindStore",
    "authenticated_only",
    "persist_nothing",
]
