"""`SQLiteBackend`: the embedded default, on aiosqlite, in WAL mode.

Two connections, each with its own thread: the writer (used only by the store's
flush worker, one transaction per batch) and a read-only reader, so that loads
and listings are never queued behind a flush and, thanks to WAL, never blocked
by one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiosqlite
import orjson

from ..config import SYNCHRONOUS_MODES
from ..errors import SchemaError, StorageError
from ..model import SessionRecord, SessionSummary, StoredMessage, UserId, from_micros, to_micros
from .base import BatchResult, RecordError, SessionDelta, check_versions
from .migrations import SQLITE as MIGRATIONS

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]

LOG = logging.getLogger("writebehind")
SCHEMA_VERSION: Final = len(MIGRATIONS)
_EXPORT_PAGE: Final = 50

_UPSERT_SESSION: Final = """
INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status, title,
                      client_ip, user_agent, message_count, version)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    user_id = excluded.user_id, updated_at = excluded.updated_at,
    last_access_at = excluded.last_access_at, status = excluded.status, title = excluded.title,
    client_ip = excluded.client_ip, user_agent = excluded.user_agent,
    message_count = excluded.message_count, version = excluded.version
"""
_UPSERT_MESSAGE: Final = """
INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, seq) DO UPDATE SET
    content = excluded.content, updated_at = excluded.updated_at, metadata = excluded.metadata
"""
_SESSION_COLUMNS: Final = (
    "id, user_id, created_at, updated_at, last_access_at, status, title, client_ip, user_agent, version"
)
_SUMMARY_COLUMNS: Final = "id, user_id, title, status, created_at, updated_at, last_access_at, message_count"


class SQLiteBackend:
    """A SQLite database file, created mode 0600, schema versioned by `PRAGMA user_version`.

    `synchronous` is SQLite's: NORMAL (the default) in WAL mode never corrupts the file
    but may lose the last transactions on power loss; FULL survives power loss too.
    `secure_delete` overwrites deleted content with zeros, so erased data does not linger
    in free pages.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        secure_delete: bool = True,
    ) -> None:
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self._synchronous = mode
        self._busy_timeout_ms = busy_timeout_ms
        self._secure_delete = secure_delete
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Reads share one connection; a load is BEGIN..COMMIT, which must not interleave.
        self._read_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.path)!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        _create_private(self.path)
        writer = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await self._check_and_migrate(writer)
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                await reader.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                await reader.execute("PRAGMA query_only = ON")
            except BaseException:
                await reader.close()
                raise
        except BaseException:
            await writer.close()
            raise
        self._writer, self._reader = writer, reader

    async def _check_and_migrate(self, conn: aiosqlite.Connection) -> None:
        # Read before writing anything: a file that is not a database, or one from a newer
        # version, must be refused with its bytes untouched.
        try:
            version = await _scalar(conn, "PRAGMA user_version")
            tables = await _scalar(conn, "SELECT count(*) FROM sqlite_master WHERE type = 'table'")
        except sqlite3.DatabaseError as exc:
            raise SchemaError(f"{self.path} is not a SQLite database ({exc}); left untouched") from exc
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has schema version {version}, newer than this writebehind "
                f"supports ({SCHEMA_VERSION}); upgrade writebehind. The file was left untouched."
            )
        if version == 0 and tables:
            raise SchemaError(
                f"{self.path} is a SQLite database of something else ({tables} tables, no "
                "writebehind schema); left untouched"
            )
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        mode = await _scalar(conn, "PRAGMA journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise StorageError(f"{self.path}: could not switch to WAL mode (got {mode!r})")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA secure_delete = {'ON' if self._secure_delete else 'OFF'}")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            script = MIGRATIONS[target - 1]
            try:
                await conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    await conn.rollback()
                raise StorageError(f"{self.path}: migration to version {target} failed: {exc}") from exc
            LOG.info("migrated %s to schema version %d", self.path, target)

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        for conn in (reader, writer):
            if conn is not None:
                await conn.close()

    @property
    def writer(self) -> aiosqlite.Connection:
        """The writing connection, for diagnostics (trace callbacks, `total_changes`)."""
        if self._writer is None:
            raise StorageError(f"{self!r} is not open")
        return self._writer

    def _reading(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageError(f"{self!r} is not open")
        return self._reader

    # -- writes (the flush worker's) ---------------------------------------------------------

    async def write_batch(self, deltas: Sequence[SessionDelta]) -> BatchResult:
        if not deltas:
            return BatchResult({})
        # Rows are built on the event loop: about half a microsecond a message, and the
        # worker bounds a batch's size. Overlapping the building with the previous chunk's
        # execution in the connection's thread was measured and gained nothing.
        async with self._transaction("write_batch") as conn:
            # BEGIN IMMEDIATE holds the write lock: the versions read here cannot change
            # before this transaction commits.
            current: dict[str, int] = {}
            ids = [d.record.id for d in deltas]
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                rows = await conn.execute_fetchall(
                    f"SELECT id, version FROM sessions WHERE id IN ({','.join('?' * len(part))})", part
                )
                current.update((row[0], row[1]) for row in rows)
            written, conflicts = check_versions(deltas, current)
            if written:
                await conn.executemany(_UPSERT_SESSION, [_session_row(d) for d in written])
                message_rows = _message_rows(written)
                if message_rows:
                    await conn.executemany(_UPSERT_MESSAGE, message_rows)
        return BatchResult(
            {d.record.id: d.record.version + 1 for d in written},
            conflicts,
            frozenset(sid for sid in conflicts if sid not in current),
        )

    async def delete_session(self, session_id: str, user_id: UserId | None) -> bool:
        async with self._transaction("delete_session") as conn:
            if user_id is None:
                cursor = await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            else:
                cursor = await conn.execute(
                    "DELETE FROM sessions WHERE id = ? AND user_id = ?", (session_id, user_id)
                )
            deleted = cursor.rowcount > 0
        if deleted:
            await self._scrub()
        return deleted

    async def delete_user(self, user_id: UserId) -> list[str]:
        async with self._transaction("delete_user") as conn:
            rows = await conn.execute_fetchall(
                "DELETE FROM sessions WHERE user_id = ? RETURNING id", (user_id,)
            )
        ids = [row[0] for row in rows]
        if ids:
            await self._scrub()
        return ids

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        async with self._transaction("purge") as conn:
            rows = await conn.execute_fetchall(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                "WHERE last_access_at < ? ORDER BY last_access_at LIMIT ?) RETURNING id",
                (to_micros(cutoff), limit),
            )
        return [row[0] for row in rows]

    async def _scrub(self) -> None:
        """After an erasure: copy the WAL into the database and truncate it, so that the old
        page images holding erased content leave the -wal file (secure_delete already
        zeroes them in the database). Best effort: a reader holding an old snapshot keeps
        the WAL alive until the next checkpoint, and that is logged."""
        try:
            async with self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            LOG.warning("checkpoint after an erasure failed: %s", exc)
            return
        if row is not None and row[0]:
            LOG.warning("checkpoint after an erasure was blocked by a reader; the WAL is kept")

    async def backup(self, dest: str | os.PathLike[str]) -> None:
        """A consistent online copy of the database (SQLite's backup API) at `dest`, created
        mode 0600, checked with `integrity_check`. The app may keep writing meanwhile."""
        dest_path = Path(dest)
        try:
            os.close(os.open(dest_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise StorageError(f"{dest_path} exists; refusing to overwrite it") from None
        except OSError as exc:
            raise StorageError(f"cannot create {dest_path}: {exc.strerror}") from exc
        target = await aiosqlite.connect(dest_path)
        try:
            await self._reading().backup(target)
            async with target.execute("PRAGMA integrity_check") as cursor:
                row = await cursor.fetchone()
            if row is None or row[0] != "ok":
                raise StorageError(f"the backup at {dest_path} failed its integrity check: {row}")
        except sqlite3.Error as exc:
            raise StorageError(f"backup to {dest_path} failed: {exc}") from exc
        finally:
            await target.close()

    def _transaction(self, what: str) -> _Transaction:
        return _Transaction(self.writer, what, self.path)

    # -- reads -------------------------------------------------------------------------------

    async def load_session(self, session_id: str) -> SessionRecord | None:
        conn = self._reading()
        try:
            # One read transaction: the session row and its messages from the same snapshot.
            async with self._read_lock:
                await conn.execute("BEGIN")
                try:
                    return await _load(conn, session_id)
                finally:
                    await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: load_session failed: {exc}") from exc

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        conn = self._reading()
        try:
            rows = await conn.execute_fetchall(
                f"SELECT {_SUMMARY_COLUMNS} FROM sessions WHERE user_id = ? "
                "ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
                (user_id, -1 if limit is None else limit, offset),
            )
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: list_sessions failed: {exc}") from exc
        return [_summary(row) for row in rows]

    async def iter_user_sessions(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        # A page of sessions at a time, each page one read transaction with two queries:
        # memory holds one page, and a 10,000-session export is 200 round trips, not 40,000.
        conn = self._reading()
        after = ""
        while True:
            try:
                async with self._read_lock:
                    await conn.execute("BEGIN")
                    try:
                        page = await _load_page(conn, user_id, after, _EXPORT_PAGE)
                    finally:
                        await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: export failed: {exc}") from exc
            for record in page:
                yield record
            if len(page) < _EXPORT_PAGE:
                return
            after = page[-1].id

    async def count_older_than(self, cutoff: datetime) -> int:
        """How many sessions `purge_older_than(cutoff)` would delete (a dry run)."""
        return int(
            await _scalar(
                self._reading(),
                "SELECT count(*) FROM sessions WHERE last_access_at < ?",
                (to_micros(cutoff),),
            )
        )

    async def file_stats(self) -> dict[str, Any]:
        """What an operator asks first: counts, sizes, the schema version, activity range."""
        conn = self._reading()
        async with conn.execute(
            "SELECT count(*), count(DISTINCT user_id), min(last_access_at), max(last_access_at) FROM sessions"
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None  # an aggregate always has its row
        sessions, users, oldest, newest = row
        messages = await _scalar(conn, "SELECT count(*) FROM messages")
        wal = self.path.with_name(self.path.name + "-wal")
        return {
            "path": str(self.path),
            "schema_version": await self.schema_version(),
            "sessions": sessions,
            "users": users,
            "messages": messages,
            "oldest_activity": None if oldest is None else from_micros(oldest).isoformat(),
            "newest_activity": None if newest is None else from_micros(newest).isoformat(),
            "file_bytes": self.path.stat().st_size,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }

    async def schema_version(self) -> int:
        return int(await _scalar(self._reading(), "PRAGMA user_version"))

    async def integrity_check(self) -> list[str]:
        rows = await self._reading().execute_fetchall("PRAGMA integrity_check")
        return [str(row[0]) for row in rows]


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any error, errors mapped to StorageError."""

    def __init__(self, conn: aiosqlite.Connection, what: str, path: Path) -> None:
        self._conn = conn
        self._what = what
        self._path = path

    async def __aenter__(self) -> aiosqlite.Connection:
        try:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "within a transaction" not in str(exc):
                    raise
                # A call cancelled while its BEGIN was on the connection's queue (the worker
                # cancelled from outside) left a transaction open: nothing of it was
                # committed, so roll it back and begin again.
                LOG.warning("rolling back a transaction left open by a cancelled call")
                await self._conn.execute("ROLLBACK")
                await self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _storage_error(self._path, self._what, exc) from exc
        return self._conn

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            try:
                await self._conn.execute("COMMIT")
                return
            except sqlite3.Error as commit_exc:
                exc = commit_exc
        # SQLite may already have rolled back (SQLITE_FULL, I/O errors).
        if self._conn.in_transaction:
            try:
                await self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                LOG.warning("rollback after a failed %s failed too", self._what)
        if isinstance(exc, sqlite3.Error):
            raise _storage_error(self._path, self._what, exc) from exc


def _storage_error(path: Path, what: str, exc: sqlite3.Error) -> StorageError:
    cls = RecordError if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError) else StorageError
    return cls(f"{path}: {what} failed: {type(exc).__name__}: {exc}")


def _session_row(delta: SessionDelta) -> tuple[Any, ...]:
    r = delta.record
    return (
        r.id,
        r.user_id,
        to_micros(r.created_at),
        to_micros(r.updated_at),
        to_micros(r.last_access_at),
        r.status,
        r.title,
        r.client_ip,
        r.user_agent,
        delta.message_count,
        r.version + 1,
    )


def _message_rows(deltas: Sequence[SessionDelta]) -> list[tuple[Any, ...]]:
    # The flush's one per-message loop on the event loop, so written for speed: a freshly
    # appended message shares one datetime for created_at and updated_at, converted once.
    dumps = orjson.dumps
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    for delta in deltas:
        sid = delta.record.id
        for m in delta.messages:
            created = to_micros(m.created_at)
            updated = created if m.updated_at is m.created_at else to_micros(m.updated_at)
            meta = m.metadata
            append(
                (
                    sid,
                    m.seq,
                    m.id,
                    m.role,
                    m.content,
                    created,
                    updated,
                    None if meta is None else dumps(meta).decode(),
                )
            )
    return rows


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only; an existing file is not touched."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
    os.close(fd)


async def _scalar(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    async with conn.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    return None if row is None else row[0]


def _message_from_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> StoredMessage:
    # Runs in the connection's thread (a row factory), not on the event loop.
    seq, mid, role, content, created, updated, metadata = row
    return StoredMessage(
        id=mid,
        seq=seq,
        role=role,
        content=content,
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        metadata=None if metadata is None else orjson.loads(metadata),
    )


async def _load(conn: aiosqlite.Connection, session_id: str) -> SessionRecord | None:
    async with conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None
    async with conn.execute(
        "SELECT seq, id, role, content, created_at, updated_at, metadata FROM messages "
        "WHERE session_id = ? ORDER BY seq",
        (session_id,),
    ) as cursor:
        cursor.row_factory = _message_from_row  # type: ignore[assignment]
        messages: list[StoredMessage] = list(await cursor.fetchall())  # type: ignore[arg-type]
    return _record(row, messages)


async def _load_page(
    conn: aiosqlite.Connection, user_id: UserId, after: str, size: int
) -> list[SessionRecord]:
    rows = list(
        await conn.execute_fetchall(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND id > ? ORDER BY id LIMIT ?",
            (user_id, after, size),
        )
    )
    if not rows:
        return []
    by_session: dict[str, list[StoredMessage]] = {row[0]: [] for row in rows}
    async with conn.execute(
        "SELECT session_id, seq, id, role, content, created_at, updated_at, metadata FROM messages "
        f"WHERE session_id IN ({','.join('?' * len(rows))}) ORDER BY session_id, seq",
        [row[0] for row in rows],
    ) as cursor:
        async for message_row in cursor:
            by_session[message_row[0]].append(_message_from_row(None, message_row[1:]))  # type: ignore[arg-type]
    return [_record(row, by_session[row[0]]) for row in rows]


def _record(row: Any, messages: list[StoredMessage]) -> SessionRecord:
    sid, user_id, created, updated, accessed, status, title, client_ip, user_agent, version = row
    return SessionRecord(
        id=sid,
        user_id=user_id,
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        last_access_at=from_micros(accessed),
        status=status,
        title=title,
        messages=tuple(messages),
        client_ip=client_ip,
        user_agent=user_agent,
        version=version,
    )


def _summary(row: Any) -> SessionSummary:
    sid, user_id, title, status, created, updated, accessed, count = row
    return SessionSummary(
        id=sid,
        user_id=user_id,
        title=title,
        status=status,
        created_at=from_micros(created),
        updated_at=from_micros(updated),
        last_access_at=from_micros(accessed),
        message_count=count,
    )
