"""`SQLiteBackend`: the embedded default, in WAL mode.

One store per file: a store holds the file's lock (`ownership.FileLock`) from `open()` to
`close()`; a second store, in this process or another, is refused with
`DatabaseLockedError`. `readonly=True` opens the file beside a running store, with no lock,
no migration and no write: the command line's reading verbs use it.

Two connections, each with its own thread: the writer (aiosqlite, used only by the
store's flush worker, one transaction per batch) and a read-only reader, so that loads
and listings are never queued behind a flush and, thanks to WAL, never blocked by one.
Every read job (a load, a page of an export) crosses into the reader's thread as one
callable, its read transaction included, so a cancelled caller cannot leave it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from itertools import starmap
from pathlib import Path
from typing import Any, Final, TypeVar

import aiosqlite
import orjson

from ..branches import Branches
from ..config import SYNCHRONOUS_MODES
from ..errors import SchemaError, StorageError
from ..model import (
    MessageRow,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    add_message_rows,
    from_micros,
    message_from_row,
    to_micros,
)
from ..ownership import FileLock
from ..search import SearchRow, matches, rank_of
from ..stats import DiskUsage
from .base import BatchResult, RecordError, SessionDelta, check_versions
from .migrations import SQLITE as MIGRATIONS

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]

T = TypeVar("T")
# (deltas written, their session rows) -> (fresh message rows, other message rows): what
# `_message_rows` returns, made by the sealer, which also rewrites the session rows in place
# (see `SQLiteBackend.write_batch`).
RowSealer = Callable[[Sequence[SessionDelta], list[tuple[Any, ...]]], tuple[list[Any], list[Any]]]
LOG = logging.getLogger("writebehind")
SCHEMA_VERSION: Final = len(MIGRATIONS)
_EXPORT_PAGE: Final = 50

_UPSERT_SESSION: Final = """
INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status, title,
                      client_ip, user_agent, message_count, version, branches)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    user_id = excluded.user_id, updated_at = excluded.updated_at,
    last_access_at = excluded.last_access_at, status = excluded.status, title = excluded.title,
    client_ip = excluded.client_ip, user_agent = excluded.user_agent,
    message_count = excluded.message_count, version = excluded.version, branches = excluded.branches
"""
_UPSERT_MESSAGE: Final = """
INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_id, seq) DO UPDATE SET
    content = excluded.content, updated_at = excluded.updated_at, metadata = excluded.metadata
"""
_INSERT_MESSAGE: Final = """
INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
_TOUCH: Final = "UPDATE sessions SET last_access_at = max(last_access_at, ?1) WHERE id = ?2"
_SESSION_COLUMNS: Final = (
    "id, user_id, created_at, updated_at, last_access_at, status, title, client_ip, user_agent, version, "
    "branches"
)
# One statement, so one snapshot: read apart, a migration committing in between would
# show a version 0 file with tables, "someone else's database".
_SCHEMA_STATE: Final = (
    "SELECT (SELECT user_version FROM pragma_user_version), "
    "(SELECT count(*) FROM sqlite_master WHERE type = 'table')"
)
_SUMMARY_COLUMNS: Final = "id, user_id, title, status, created_at, updated_at, last_access_at, message_count"
# FTS5's own `secure-delete` option (SQLite 3.42+): a delete rewrites the index pages that
# held the row, so erased text leaves the index at once. Older SQLite keeps a deleted row's
# entries in the index's segments until they are merged; there, an erasure merges them all
# (`optimize`) in its own transaction.
_SEARCH_COLUMNS: Final = "m.session_id, s.title, m.id, m.seq, m.role, m.content, m.created_at"


class SQLiteBackend:
    """A SQLite database file, created mode 0600, schema versioned by `PRAGMA user_version`.

    One store per file: `open()` takes the file's lock (`<db>.lock`, released by `close()`
    or by the kernel when the process ends) and raises `DatabaseLockedError` if another
    store holds it. `readonly=True` is for tools that read beside a running store: no
    lock, no migration, no write; its write methods raise `StorageError`.

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
        readonly: bool = False,
    ) -> None:
        mode = synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self._synchronous = mode
        self._busy_timeout_ms = busy_timeout_ms
        self._secure_delete = secure_delete
        self._lock = FileLock(self.path)
        self._writer: aiosqlite.Connection | None = None
        self._reader: _Reader | None = None
        # Read-only, on a file no store has migrated yet: its reads answer as an empty store
        # until one has. Only read and written in the reader's thread.
        self._unmigrated = False

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file as its one store (the default), or read-only.

        As a store: take the file's lock first (`DatabaseLockedError` if another store
        holds it, in this process or another), create the file (0600) if it is missing,
        switch it to WAL and migrate it. A file it cannot use raises `SchemaError`, its
        bytes untouched.

        Read-only: no lock, no migration, no write (SQLite opens the file read-only). A
        missing file raises `StorageError`; one that no store has migrated yet reads as an
        empty store. Either way, a failed open leaves nothing open and nothing locked.
        """
        if self._reader is not None:
            return
        if self.readonly:
            await self._open_readonly()
            return
        self._lock.acquire()
        writer: aiosqlite.Connection | None = None
        reader = _Reader()
        try:
            _create_private(self.path)
            try:
                writer = await aiosqlite.connect(self.path, isolation_level=None)
                await self._check_and_migrate(writer)
                await reader.connect(str(self.path), uri=False, busy_timeout_ms=self._busy_timeout_ms)
            except sqlite3.Error as exc:  # a directory, a dangling link, a disk that refuses
                raise StorageError(f"{self.path}: cannot open it: {exc}") from exc
        except BaseException:
            try:
                await reader.close()
                if writer is not None:
                    await writer.close()
            finally:
                self._lock.release()
            raise
        self._writer, self._reader = writer, reader

    async def _open_readonly(self) -> None:
        if not self.path.exists():
            raise StorageError(f"{self.path} does not exist")
        reader = _Reader()
        try:
            # mode=ro: SQLite itself refuses every write, and never creates the file.
            uri = self.path.absolute().as_uri() + "?mode=ro"
            try:
                await reader.connect(uri, uri=True, busy_timeout_ms=self._busy_timeout_ms)
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: cannot open it read-only: {exc}") from exc
            await reader.run(self._check_readable)
        except BaseException:
            await reader.close()
            raise
        self._reader = reader

    def _check_readable(self, conn: sqlite3.Connection) -> None:
        # In the reader's thread.
        try:
            version, tables = conn.execute(_SCHEMA_STATE).fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from exc
        self._refuse(version, tables)
        if 0 < version < SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has schema version {version}, older than this writebehind's "
                f"({SCHEMA_VERSION}); the app migrates it when it starts (or run `writebehind "
                "migrate` while the app is stopped). The file was left untouched."
            )
        self._unmigrated = version == 0

    async def _check_and_migrate(self, conn: aiosqlite.Connection) -> None:
        # First, so that every step below waits for another connection's lock (up to the
        # timeout) instead of failing at once.
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        # Read before writing anything: a file that is not a database, or one from a newer
        # version, must be refused with its bytes untouched.
        version, tables = await self._schema_state(conn)
        self._refuse(version, tables)
        await self._switch_to_wal(conn)
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA secure_delete = {'ON' if self._secure_delete else 'OFF'}")
        if version < SCHEMA_VERSION:
            await self._migrate(conn)

    async def _schema_state(self, conn: aiosqlite.Connection) -> tuple[int, int]:
        """(`user_version`, how many tables)."""
        try:
            async with conn.execute(_SCHEMA_STATE) as cursor:
                row = await cursor.fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._unreadable(exc) from exc
        assert row is not None  # a SELECT of two scalars always has its row
        return int(row[0]), int(row[1])

    def _unreadable(self, exc: sqlite3.DatabaseError) -> StorageError:
        # Only what SQLite calls not a database, or corrupt, is the file's fault: locked,
        # unreadable, or a directory that refuses the -shm file is not.
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            return SchemaError(f"{self.path} is not a SQLite database ({exc}); left untouched")
        return StorageError(f"{self.path}: cannot read the schema version: {exc}")

    def _refuse(self, version: int, tables: int) -> None:
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

    async def _switch_to_wal(self, conn: aiosqlite.Connection) -> None:
        # While another connection holds the write lock of a file still in rollback mode,
        # `journal_mode = WAL` fails at once with "database is locked": SQLite does not call
        # the busy handler there. So wait as busy_timeout would: retry until it expires.
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        delay = 0.005
        while True:
            try:
                mode = await _scalar(conn, "PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise StorageError(f"{self.path}: could not switch to WAL mode: {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        if str(mode).lower() != "wal":
            raise StorageError(f"{self.path}: could not switch to WAL mode (got {mode!r})")

    async def _migrate(self, writer: aiosqlite.Connection) -> None:
        """Every pending migration in one transaction: all of them, or none."""

        def migrate(conn: sqlite3.Connection) -> int:
            # Read again under the write lock: another process (one that takes no
            # writebehind lock: an older version, a script) may have migrated it since.
            try:
                version, tables = _schema_state(conn)
            except sqlite3.DatabaseError as exc:
                raise self._unreadable(exc) from exc
            self._refuse(version, tables)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _statements(MIGRATIONS[target - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
            return version

        version = await self._write("migration", migrate, writer)
        if version < SCHEMA_VERSION:
            LOG.info("migrated %s from schema version %d to %d", self.path, version, SCHEMA_VERSION)

    async def close(self) -> None:
        """Close the connections, then let go of the file: another store may open it as soon
        as this returns. Idempotent."""
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        try:
            if reader is not None:
                await reader.close()
            if writer is not None:
                await writer.close()
        finally:
            self._lock.release()

    @property
    def writer(self) -> aiosqlite.Connection:
        """The writing connection, for diagnostics (trace callbacks, `total_changes`)."""
        if self._writer is None:
            raise StorageError(f"{self!r} is {'read-only' if self.readonly else 'not open'}")
        return self._writer

    def _reading(self) -> _Reader:
        if self._reader is None:
            raise StorageError(f"{self!r} is not open")
        return self._reader

    # -- writes (the flush worker's) ---------------------------------------------------------

    async def write_batch(
        self,
        deltas: Sequence[SessionDelta],
        touches: Sequence[tuple[str, datetime]] = (),
        *,
        seal: RowSealer | None = None,
    ) -> BatchResult:
        """Write the batch in one transaction. `seal`, if given, makes the rows to write in
        the writer's thread (`EncryptedBackend` encrypts them there: no sealed copy of the
        batch is made, and no other thread is hopped to)."""
        if not deltas and not touches:
            return BatchResult({})

        # The whole transaction is one job in the writer's thread: one hop there and back
        # instead of one per statement (an event loop busy with streams delayed each hop, and
        # a 5 ms batch took 500 ms under load), rows built off the event loop, and no
        # cancellation can leave it half done.
        def write(conn: sqlite3.Connection) -> BatchResult:
            # BEGIN IMMEDIATE holds the write lock: the versions read here cannot change
            # before this transaction commits.
            current: dict[str, int] = {}
            ids = [d.record.id for d in deltas]
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                rows = conn.execute(
                    f"SELECT id, version FROM sessions WHERE id IN ({','.join('?' * len(part))})", part
                )
                current.update(rows)
            written, conflicts = check_versions(deltas, current)
            if written:
                sessions = [_session_row(d) for d in written]
                if seal is None:
                    fresh, others = _message_rows(written)
                else:
                    fresh, others = seal(written, sessions)
                conn.executemany(_UPSERT_SESSION, sessions)
                # Popped messages go before the upsert: a seq popped and appended again is
                # then a plain insert of the new message, never an update of the old row.
                truncated = [(d.record.id, d.truncate_after) for d in written if d.truncate_after is not None]
                if truncated:
                    conn.executemany("DELETE FROM messages WHERE session_id = ? AND seq > ?", truncated)
                if fresh:
                    # Rows never offered to a flush before: a plain INSERT, which costs SQLite
                    # one index probe a row less than the upsert (a few % of a flush).
                    try:
                        conn.executemany(_INSERT_MESSAGE, fresh)
                    except sqlite3.IntegrityError:
                        # Cannot happen (a seq on disk was never fresh); if it does, the
                        # upsert writes the same rows and a real refusal raises again there.
                        LOG.warning("a fresh message row was already stored; upserting the batch")
                        conn.executemany(_UPSERT_MESSAGE, fresh)
                if others:
                    conn.executemany(_UPSERT_MESSAGE, others)
            if touches:
                conn.executemany(_TOUCH, [(to_micros(at), sid) for sid, at in touches])
            return BatchResult(
                {d.record.id: d.record.version + 1 for d in written},
                conflicts,
                frozenset(sid for sid in conflicts if sid not in current),
            )

        return await self._write("write_batch", write)

    async def delete_session(self, session_id: str, user_id: UserId | None) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            if user_id is None:  # an anonymous session a policy persisted: only such a row
                cursor = conn.execute("DELETE FROM sessions WHERE id = ? AND user_id IS NULL", (session_id,))
            else:
                cursor = conn.execute(
                    "DELETE FROM sessions WHERE id = ? AND user_id = ?", (session_id, user_id)
                )
            return cursor.rowcount > 0

        deleted = await self._write("delete_session", delete)
        if deleted:
            await self._scrub()
        return deleted

    async def delete_user(self, user_id: UserId) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            ids = [
                row[0]
                for row in conn.execute("DELETE FROM sessions WHERE user_id = ? RETURNING id", (user_id,))
            ]
            return ids

        ids = await self._write("delete_user", delete)
        if ids:
            await self._scrub()
        return ids

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        params = (to_micros(cutoff), limit)

        def purge(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                "WHERE last_access_at < ? ORDER BY last_access_at LIMIT ?) RETURNING id",
                params,
            )
            return [row[0] for row in rows]

        return await self._write("purge", purge)

    async def _write(
        self, what: str, job: Callable[[sqlite3.Connection], T], writer: aiosqlite.Connection | None = None
    ) -> T:
        """Run `job` in one write transaction (BEGIN IMMEDIATE … COMMIT, rolled back on any
        error) as one call in the writer's thread, the way aiosqlite runs its own multi-step
        calls. A call once queued runs to its end even if its caller is cancelled, so the
        writer is never left inside a transaction. sqlite3 errors become StorageError
        (RecordError for data a constraint refused)."""
        if writer is None:
            writer = self.writer
        conn_of = writer

        def transaction() -> T:
            conn = conn_of._conn  # in the writer's thread, where it lives
            _begin(conn)
            try:
                result = job(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                # SQLite may have rolled back already (SQLITE_FULL, I/O errors).
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error as rollback_exc:
                        LOG.warning("rollback after a failed %s failed too: %s", what, rollback_exc)
                raise exc
            return result

        try:
            # aiosqlite's own way into its thread (what its execute_fetchall uses).
            result: T = await writer._execute(transaction)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise _storage_error(self.path, what, exc) from exc
        except ValueError as exc:
            if writer._running and writer._connection is not None:
                raise  # the job's own (its data): isolated by the worker like a bad record
            # aiosqlite's "Connection closed"
            raise StorageError(f"{self.path}: {what} failed: {exc}") from exc
        return result

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
        """A consistent online copy of the database at `dest`, made as the scheduled backups
        are (`writebehind.backups.copy_database`): one self-contained file, mode 0600,
        checked with `integrity_check`, under a temporary name until whole, nothing left at
        `dest` if it fails (a full disk included). The app may keep writing meanwhile; a
        read-only backend can make it beside a running app."""
        # Imported here: `backups` builds on this module.
        from ..backups import copy_database

        dest_path = Path(dest)

        def copy() -> None:
            if dest_path.exists():
                raise StorageError(f"{dest_path} exists; refusing to overwrite it")
            copy_database(self.path, dest_path, busy_timeout_ms=self._busy_timeout_ms)

        await asyncio.to_thread(copy)

    # -- reads -------------------------------------------------------------------------------
    #
    # Each read is one job in the reader's thread (`_Reader.run`), its read transaction
    # included: a caller cancelled while it waits leaves nothing open behind it.

    async def _query(self, what: str, job: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._reading().run(job)
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: {what} failed: {exc}") from exc

    async def _query_tables(self, what: str, job: Callable[[sqlite3.Connection], T], empty: T) -> T:
        """`_query` for a job that reads the tables: on a file no store has migrated yet
        (open read-only), `empty` instead."""

        def guarded(conn: sqlite3.Connection) -> T:
            if self._unmigrated:
                if _user_version(conn) < SCHEMA_VERSION:
                    return empty
                self._unmigrated = False
            return job(conn)

        return await self._query(what, guarded)

    async def load_session(self, session_id: str) -> SessionRecord | None:
        return await self._query_tables("load_session", lambda conn: _load(conn, session_id), None)

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        params = (user_id, -1 if limit is None else limit, offset)

        def fetch(conn: sqlite3.Connection) -> list[SessionSummary]:
            rows = conn.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM sessions WHERE user_id = ? "
                "ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
                params,
            ).fetchall()
            return [_summary(row) for row in rows]

        return await self._query_tables("list_sessions", fetch, [])

    async def iter_user_sessions(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        # A page of sessions at a time, each page one job (one read transaction, two
        # queries): memory holds one page, a 10,000-session export is 200 hops into the
        # thread, not 40,000, and a consumer that stops between pages holds nothing open.
        after = ""
        while True:
            page: list[SessionRecord] = await self._query_tables(
                "export", partial(_load_page, user_id=user_id, after=after, size=_EXPORT_PAGE), []
            )
            for record in page:
                yield record
            if len(page) < _EXPORT_PAGE:
                return
            after = page[-1].id

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
        """The user's messages holding every word (case-insensitive substrings, as
        `str.lower()` folds them: any script), best or newest first, leaving out the
        sessions in `exclude` (those the caller searches in memory). `words` are plain text.

        A scan of the user's own rows, no index: `sessions.user_id = ?` picks the user's
        sessions by their index, their messages by the primary key, and the match and the
        rank are the memory search's own functions (`writebehind.search`), registered on
        the reader's connection, so disk and memory agree. Its cost grows with the user's
        own history, not the database's (p99 0.44 ms at 100 messages a user among
        1,000,000); an index kept in the flush made the flush 25x slower (see migrations)."""
        folded = [w.lower() for w in words]
        excluded = orjson.dumps(sorted(exclude)).decode()
        order_by = (
            "m.created_at DESC, m.session_id, m.seq DESC"
            if order == "newest"
            else "score, m.created_at DESC, m.session_id, m.seq DESC"
        )

        def find(conn: sqlite3.Connection) -> list[SearchRow]:
            # A BLOB is a value `EncryptedBackend` encrypted (its bytes form): never a match
            # here (that backend searches by decrypting), and never an error.
            conn.create_function(
                "wb_matches",
                1,
                lambda content: content.__class__ is str and matches(content, folded),
                deterministic=True,
            )
            conn.create_function(
                "wb_rank",
                1,
                lambda content: rank_of(content, folded) if content.__class__ is str else 0.0,
                deterministic=True,
            )
            with _snapshot(conn):
                rows = conn.execute(
                    f"SELECT {_SEARCH_COLUMNS}, wb_rank(m.content) AS score "
                    "FROM sessions s JOIN messages m ON m.session_id = s.id "
                    "WHERE s.user_id = ? AND s.id NOT IN (SELECT value FROM json_each(?)) "
                    f"AND wb_matches(m.content) ORDER BY {order_by} LIMIT ? OFFSET ?",
                    (user_id, excluded, limit, offset),
                ).fetchall()
            return [
                SearchRow(sid, title, mid, seq, role, content, from_micros(created), float(score))
                for sid, title, mid, seq, role, content, created, score in rows
            ]

        return await self._query_tables("search", find, [])

    async def holds_sealed_values(self) -> bool:
        """Whether any session row holds an encrypted title (`writebehind.encryption` seals
        every title, None included): the bytes form, or the text form's `wbe1:` prefix. A
        scan at most, once, when an encrypting store finds no keys store to open."""

        def find(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM sessions WHERE typeof(title) = 'blob' OR substr(title, 1, 5) = 'wbe1:' LIMIT 1"
            ).fetchone()
            return row is not None

        return await self._query_tables("holds_sealed_values", find, False)

    async def count_older_than(self, cutoff: datetime) -> int:
        """How many sessions `purge_older_than(cutoff)` would delete (a dry run)."""
        micros = to_micros(cutoff)

        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count(*) FROM sessions WHERE last_access_at < ?", (micros,)).fetchone()
            return int(row[0])

        return await self._query_tables("count_older_than", count, 0)

    async def file_stats(self) -> dict[str, Any]:
        """What an operator asks first: counts, sizes, the schema version, activity range."""

        def counts(conn: sqlite3.Connection) -> tuple[Any, ...]:
            with _snapshot(conn):
                row = conn.execute(
                    "SELECT count(*), count(DISTINCT user_id), min(last_access_at), max(last_access_at) "
                    "FROM sessions"
                ).fetchone()
                messages = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
            return (*row, messages)

        sessions, users, oldest, newest, messages = await self._query_tables(
            "file_stats", counts, (0, 0, None, None, 0)
        )
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

    async def disk_usage(self, counts: bool = False) -> DiskUsage:
        """The file's size with its WAL and, with `counts`, how many sessions and users it
        holds: for the store's monitoring (`stats.DiskMonitor`), which counts every few
        minutes only. On a read-only connection and a thread of their own: a load never
        queues behind the count, and in WAL mode no flush waits for it."""
        path, busy_ms = self.path, int(self._busy_timeout_ms)

        def measure() -> DiskUsage:
            wal_bytes = 0
            with contextlib.suppress(FileNotFoundError):  # no WAL between a close and the next write
                wal_bytes = path.with_name(path.name + "-wal").stat().st_size
            db_bytes = path.stat().st_size + wal_bytes
            if not counts:
                return DiskUsage(db_bytes, wal_bytes)
            conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                with _snapshot(conn):
                    sessions = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
                    users = conn.execute("SELECT count(DISTINCT user_id) FROM sessions").fetchone()[0]
            finally:
                conn.close()
            return DiskUsage(db_bytes, wal_bytes, int(sessions), int(users))

        try:
            return await asyncio.to_thread(measure)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"{self.path}: disk usage failed: {exc}") from exc

    async def schema_version(self) -> int:
        return await self._query("schema_version", _user_version)

    async def integrity_check(self) -> list[str]:
        return await self._query(
            "integrity_check", lambda conn: [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
        )


class _Reader:
    """A plain sqlite3 connection that lives in one thread of its own: aiosqlite's model,
    with a whole job as the unit. `run(job)` runs `job(connection)` there from start to
    end; a caller cancelled while it waits only stops waiting (a job that has started
    finishes, one that has not never starts), so no transaction outlives its job. The one
    thread also runs the jobs one at a time: they need no lock."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writebehind-reader")
        self._closed = False
        self._conn: sqlite3.Connection | None = None  # only touched in the reader's thread

    async def connect(self, database: str, *, uri: bool, busy_timeout_ms: int) -> None:
        def connect() -> None:
            conn = sqlite3.connect(database, uri=uri, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                conn.execute("PRAGMA query_only = ON")
            except BaseException:
                conn.close()
                raise
            self._conn = conn

        await self._submit(connect)

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                raise StorageError("the reading connection is closed")
            return job(self._conn)

        return await self._submit(call)

    async def close(self) -> None:
        """Close the connection once every job queued before has run. Idempotent."""
        if self._closed:
            return
        self._closed = True

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        done = asyncio.wrap_future(self._executor.submit(close))
        self._executor.shutdown(wait=False)
        await asyncio.shield(done)  # a cancelled caller must not keep the close from running

    async def _submit(self, job: Callable[[], T]) -> T:
        if self._closed:
            raise StorageError("the reading connection is closed")
        return await asyncio.wrap_future(self._executor.submit(job))


def _begin(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "within a transaction" not in str(exc):
            raise
        # Only a bug can get here (every job ends its transaction); nothing of an open
        # transaction was committed, so roll it back and begin again.
        LOG.warning("rolling back a transaction left open on the writer")
        conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")


def _schema_state(conn: sqlite3.Connection) -> tuple[int, int]:
    """(`user_version`, how many tables), in one statement."""
    row = conn.execute(_SCHEMA_STATE).fetchone()
    return int(row[0]), int(row[1])


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
        None if r.branches is None else r.branches.encode(),
    )


def _message_rows(deltas: Sequence[SessionDelta]) -> tuple[list[MessageRow], list[MessageRow]]:
    """(rows of messages appended since their last flush, rows of the others): the flush's
    one per-message loop, in the writer's thread. The times are kept as microseconds since
    the append and metadata was encoded when it was accepted, so a row is what the message
    already holds (an appended one's is made with it)."""
    fresh: list[MessageRow] = []
    rows: list[MessageRow] = []
    for delta in deltas:
        add_message_rows(fresh, rows, delta.record.id, delta.messages)
    return fresh, rows


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


def _load(conn: sqlite3.Connection, session_id: str) -> SessionRecord | None:
    # In the reader's thread: the session row and its messages from one snapshot.
    with _snapshot(conn):
        row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return None
        rows = conn.execute(
            "SELECT seq, id, role, content, created_at, updated_at, metadata FROM messages "
            "WHERE session_id = ? ORDER BY seq",
            (session_id,),
        ).fetchall()
    # Trusted rows (validated when written) straight into records, their datetimes made when
    # first read: this loop is most of a cold load's cost beyond SQLite's.
    return _record(row, list(starmap(message_from_row, rows)))


def _load_page(conn: sqlite3.Connection, user_id: UserId, after: str, size: int) -> list[SessionRecord]:
    # In the reader's thread: a page of sessions and their messages from one snapshot.
    with _snapshot(conn):
        rows = conn.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND id > ? ORDER BY id LIMIT ?",
            (user_id, after, size),
        ).fetchall()
        if not rows:
            return []
        by_session: dict[str, list[StoredMessage]] = {row[0]: [] for row in rows}
        cursor = conn.execute(
            "SELECT session_id, seq, id, role, content, created_at, updated_at, metadata FROM messages "
            f"WHERE session_id IN ({','.join('?' * len(rows))}) ORDER BY session_id, seq",
            [row[0] for row in rows],
        )
        for message_row in cursor:
            by_session[message_row[0]].append(message_from_row(*message_row[1:]))
    return [_record(row, by_session[row[0]]) for row in rows]


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction: every query inside sees the same committed state. Only ever
    entered inside one job in the reader's thread, so nothing can leave it open."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:  # SQLite may have ended it already (an I/O error)
            conn.execute("ROLLBACK")


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes included: someone else holds a lock."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _statements(script: str) -> list[str]:
    """A migration script as single statements, so that it can run inside a transaction
    the caller controls (`executescript` would COMMIT first)."""
    statements: list[str] = []
    start = 0
    for i, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : i + 1]):
            statements.append(script[start : i + 1].strip())
            start = i + 1
    if script[start:].strip():
        statements.append(script[start:].strip())
    return statements


def _record(row: Any, messages: list[StoredMessage]) -> SessionRecord:
    sid, user_id, created, updated, accessed, status, title, client_ip, user_agent, version, branches = row
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
        branches=Branches.decode(branches, f"session {sid!r}"),
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
