"""The `Backend` Protocol: what the write-behind store needs from a database.

A backend is used by one store. Writes (`write_batch`, the deletes, `purge_older_than`)
are only ever called by that store's `FlushWorker`, one at a time, in queue order;
reads (`load_session`, `list_sessions`, `iter_user_sessions`) may run concurrently
with a write and must see only committed data.

Errors: a backend raises `StorageError` (or a subclass) for anything that went wrong
in the database, with the driver's exception as `__cause__`; `RecordError` when the
data of one session was refused (so the worker can isolate it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from ..errors import StorageError
from ..model import SessionRecord, SessionSummary, StoredMessage, UserId
from ..search import SearchRow

__all__ = ["Backend", "BatchResult", "RecordError", "SearchableBackend", "SessionDelta", "check_versions"]


class RecordError(StorageError):
    """The backend refused the data of particular sessions (a constraint, a bad value)."""


@dataclass(frozen=True, slots=True)
class SessionDelta:
    """What changed in one session since its last flush.

    `record` carries the session row (its `messages` are empty); `messages` are only
    the messages added or edited since the last flush, in `seq` order;
    `message_count` is the session's total. `record.version` is the version this
    writer last saw: 0 means "insert, the row must not exist"; n means "update, the row
    must still be at version n". Anything else is a conflict: another writer (an app
    instance, an erasure) got there first, and nothing of this session is written.

    `truncate_after`: messages were removed (`pop_message`) since the last flush; delete
    the session's stored messages with `seq > truncate_after` in the same transaction,
    before writing `messages` (which may re-use those seqs). None: nothing was removed.
    """

    record: SessionRecord
    messages: tuple[StoredMessage, ...]
    message_count: int
    truncate_after: int | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a batch did: each written session's new version, and the sessions skipped
    because of a version conflict; `deleted` are those of them whose row is gone (another
    writer deleted or erased them)."""

    versions: dict[str, int]
    conflicts: frozenset[str] = frozenset()
    deleted: frozenset[str] = frozenset()


@runtime_checkable
class Backend(Protocol):
    async def open(self) -> None:
        """Create or migrate the schema. Refuses (SchemaError) a store it cannot use."""

    async def close(self) -> None: ...

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        """Upsert all deltas in one transaction: all of it lands, or none of it, except the
        sessions whose version conflicts, which are left out and reported.

        `touches` move sessions' `last_access_at` forward (never back) in the same
        transaction, without a version check or change: a read is not a write, and must
        not turn another writer's next flush into a conflict."""

    async def load_session(self, session_id: str) -> SessionRecord | None: ...

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The user's sessions, most recently updated first."""

    async def delete_session(self, session_id: str, user_id: UserId | None) -> bool:
        """Delete the session (only if owned by `user_id`, unless that is None); True if it
        was there. Erasure: when this returns, no copy of the data is left in the store's
        files that the backend can remove (SQLite: secure_delete, and a truncating WAL
        checkpoint)."""

    async def delete_user(self, user_id: UserId) -> list[str]:
        """Delete every session of the user in one transaction; returns their ids."""

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        """Delete up to `limit` sessions whose last activity is before `cutoff`, oldest first,
        in one transaction; returns their ids. Callers loop until fewer than `limit` come back,
        so no single transaction is long."""

    def iter_user_sessions(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        """Every session of the user, whole, a few at a time (for export)."""


class SearchableBackend(Backend, Protocol):
    """A backend that can search its users' messages (SQLite, PostgreSQL). Optional: the
    store's `search` raises StorageError on a backend whose class has no `search`."""

    async def search(
        self,
        user_id: UserId,
        words: Sequence[str],
        *,
        limit: int,
        offset: int = 0,
        order: str = "relevance",
        exclude: Collection[str] = (),
    ) -> list[SearchRow]:
        """The user's messages holding every word as a case-insensitive substring, best or
        newest first, leaving out the sessions in `exclude`. The user filter is part of the
        query itself; `words` are text, never the database's query syntax."""
        ...


def check_versions(
    deltas: Sequence[SessionDelta], current: dict[str, int]
) -> tuple[list[SessionDelta], frozenset[str]]:
    """Which deltas may be written: an insert (version 0) of a row that does not exist, or
    an update of a row still at the version this writer last saw. Shared by the
    backends, which read `current` under a lock that keeps it true until they commit."""
    written: list[SessionDelta] = []
    conflicts: set[str] = set()
    for delta in deltas:
        have = current.get(delta.record.id)
        expected = delta.record.version
        if (expected == 0 and have is None) or (expected != 0 and have == expected):
            written.append(delta)
        else:
            conflicts.add(delta.record.id)
    return written, frozenset(conflicts)
