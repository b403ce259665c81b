"""`PostgresBackend`: the scale-out backend, on asyncpg (`pip install writebehind[postgres]`).

The same schema in spirit as SQLite's, in a PostgreSQL schema of its own (default
`writebehind`), migrations recorded in `<schema>.writebehind_migrations` and applied
under an advisory lock so that several app instances starting at once migrate once.
A bounded connection pool; one transaction per batch.

User ids: an int user 1 and a str user "1" are different users, as in memory: the
row keeps the id as text plus its kind.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from ..branches import Branches
from ..errors import SchemaError, StorageError
from ..model import SessionRecord, SessionSummary, StoredMessage, UserId
from ..search import SearchRow
from ..stats import DiskUsage
from .base import BatchResult, RecordError, SessionDelta, check_versions

if TYPE_CHECKING:
    from .pg_ownership import PostgresOwnership

__all__ = ["SCHEMA_VERSION", "PostgresBackend"]

LOG = logging.getLogger("writebehind")

_IDENT: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_INT, _TEXT = 0, 1
_EXPORT_PAGE: Final = 50

MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE {s}.sessions (
        id             text PRIMARY KEY,
        user_kind      smallint,
        user_id        text,
        created_at     timestamptz NOT NULL,
        updated_at     timestamptz NOT NULL,
        last_access_at timestamptz NOT NULL,
        status         text NOT NULL,
        title          text,
        client_ip      text,
        user_agent     text,
        message_count  integer NOT NULL DEFAULT 0,
        version        bigint NOT NULL DEFAULT 1
    );
    CREATE INDEX sessions_user_updated ON {s}.sessions (user_kind, user_id, updated_at);
    CREATE INDEX sessions_updated ON {s}.sessions (updated_at);
    CREATE INDEX sessions_last_access ON {s}.sessions (last_access_at);
    CREATE TABLE {s}.messages (
        session_id text NOT NULL REFERENCES {s}.sessions (id) ON DELETE CASCADE,
        seq        integer NOT NULL,
        id         text NOT NULL,
        role       text NOT NULL,
        content    text NOT NULL,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        metadata   json,
        PRIMARY KEY (session_id, seq)
    );
    """,
    # 2: one owner per session across app instances (see pg_ownership.py). An instance is
    # alive while it holds the advisory lock `lock_key` (its id in this schema's namespace);
    # `owners` says which instance owns a session, whether or not its row exists yet.
    """
    CREATE SEQUENCE {s}.instance_ids;
    CREATE UNLOGGED TABLE {s}.instances (
        id         bigint PRIMARY KEY,
        lock_key   bigint NOT NULL UNIQUE,
        pid        integer NOT NULL,
        host       text NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE UNLOGGED TABLE {s}.owners (
        session_id text PRIMARY KEY,
        owner      bigint NOT NULL
    );
    CREATE INDEX owners_owner ON {s}.owners (owner);
    """,
    # 3: where a session's messages branch and its active path (writebehind/branches.py),
    # NULL for a session that never branched.
    """
    ALTER TABLE {s}.sessions ADD COLUMN branches text;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """The pool's reset (see `open`): nothing beyond what asyncpg always does."""


def _user(user_id: UserId | None) -> tuple[int | None, str | None]:
    if user_id is None:
        return None, None
    return (_INT, str(user_id)) if isinstance(user_id, int) else (_TEXT, user_id)


def _from_user(kind: int | None, value: str | None) -> UserId | None:
    if kind is None or value is None:
        return None
    return int(value) if kind == _INT else value


class PostgresBackend:
    """`handoff_timeout_s` / `hold_timeout_s` bound how long a store waits for another
    instance to hand a session over (see `pg_ownership`): for its answer, and for a reply
    streaming into the session there to end. Either raises `OwnershipError`."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "writebehind",
        pool_size: int = 10,
        handoff_timeout_s: float = 5.0,
        hold_timeout_s: float = 120.0,
    ) -> None:
        if _IDENT.fullmatch(schema) is None:
            raise ValueError(f"schema must be a lower-case SQL identifier, got {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._pool_size = pool_size
        self._handoff_timeout = handoff_timeout_s
        self._hold_timeout = hold_timeout_s
        self._pool: asyncpg.Pool | None = None
        s = schema
        columns = (
            "id, user_kind, user_id, created_at, updated_at, last_access_at, status, title, "
            "client_ip, user_agent, message_count, version, branches"
        )
        self._insert_sessions = f"""
            INSERT INTO {s}.sessions ({columns})
            SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[], $4::timestamptz[],
                                 $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[],
                                 $9::text[], $10::text[], $11::integer[], $12::bigint[],
                                 $13::text[])
            ON CONFLICT (id) DO NOTHING
            RETURNING id"""
        # The whole of an ordinary batch (no pops, no read touches) as one statement: one
        # round trip, atomic without BEGIN/COMMIT. A session is updated only if its row is
        # still at the version this writer last saw, inserted only if absent; messages go
        # only into the sessions written. What is not returned is a conflict.
        self._write_once = f"""
            WITH u AS (
                SELECT * FROM unnest($1::text[], $2::smallint[], $3::text[], $4::timestamptz[],
                                     $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[],
                                     $9::text[], $10::text[], $11::integer[], $12::bigint[],
                                 $13::text[])
                    AS u(id, user_kind, user_id, created_at, updated_at, last_access_at, status,
                         title, client_ip, user_agent, message_count, version, branches)
            ), updated AS (
                UPDATE {s}.sessions AS t SET user_kind = u.user_kind, user_id = u.user_id,
                    updated_at = u.updated_at, last_access_at = u.last_access_at, status = u.status,
                    title = u.title, client_ip = u.client_ip, user_agent = u.user_agent,
                    message_count = u.message_count, version = u.version, branches = u.branches
                FROM u WHERE t.id = u.id AND u.version > 1 AND t.version = u.version - 1
                RETURNING t.id
            ), inserted AS (
                INSERT INTO {s}.sessions ({columns}) SELECT * FROM u WHERE u.version = 1
                ON CONFLICT (id) DO NOTHING
                RETURNING id
            ), written AS (
                SELECT id FROM updated UNION ALL SELECT id FROM inserted
            ), messages AS (
                INSERT INTO {s}.messages
                    (session_id, seq, id, role, content, created_at, updated_at, metadata)
                SELECT * FROM unnest($14::text[], $15::integer[], $16::text[], $17::text[], $18::text[],
                                     $19::timestamptz[], $20::timestamptz[], $21::json[])
                    AS m(session_id, seq, id, role, content, created_at, updated_at, metadata)
                WHERE m.session_id IN (SELECT id FROM written)
                ON CONFLICT (session_id, seq) DO UPDATE SET
                    content = excluded.content, updated_at = excluded.updated_at,
                    metadata = excluded.metadata
            )
            SELECT id FROM written"""
        self._update_session = f"""
            UPDATE {s}.sessions SET user_kind = $2, user_id = $3, updated_at = $5,
                last_access_at = $6, status = $7, title = $8, client_ip = $9, user_agent = $10,
                message_count = $11, version = $12, branches = $13
            WHERE id = $1 AND $4::timestamptz IS NOT NULL"""
        self._upsert_messages = f"""
            INSERT INTO {s}.messages (session_id, seq, id, role, content, created_at, updated_at, metadata)
            SELECT * FROM unnest($1::text[], $2::integer[], $3::text[], $4::text[], $5::text[],
                                 $6::timestamptz[], $7::timestamptz[], $8::json[])
            ON CONFLICT (session_id, seq) DO UPDATE SET
                content = excluded.content, updated_at = excluded.updated_at,
                metadata = excluded.metadata"""
        self._session_columns = (
            "id, user_kind, user_id, created_at, updated_at, last_access_at, status, title, "
            "client_ip, user_agent, version, branches"
        )
        self._load_one = f"""
            SELECT s.id, s.user_kind, s.user_id, s.created_at, s.updated_at, s.last_access_at,
                   s.status, s.title, s.client_ip, s.user_agent, s.version, s.branches, m.seq,
                   m.id AS message_id, m.role, m.content, m.created_at AS message_created_at,
                   m.updated_at AS message_updated_at, m.metadata
            FROM {s}.sessions s LEFT JOIN {s}.messages m ON m.session_id = s.id
            WHERE s.id = $1 ORDER BY m.seq"""

    def __repr__(self) -> str:
        return f"PostgresBackend(schema={self.schema!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            # `reset`: asyncpg still ends any open transaction at release; what this skips is
            # its reset query (unlock advisory locks, close cursors, UNLISTEN, RESET ALL), a
            # round trip a release for state this backend never leaves on a pooled
            # connection (its advisory locks are transaction-level, its LISTEN has a
            # connection of its own).
            pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self._pool_size, reset=_keep_session_state
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        s = self.schema
        try:
            async with conn.transaction():
                # One migrator at a time across every instance starting now.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"writebehind:{s}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.writebehind_migrations "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                version = await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {s}.writebehind_migrations"
                )
                if version > SCHEMA_VERSION:
                    raise SchemaError(
                        f"PostgreSQL schema {s} is at version {version}, newer than this writebehind "
                        f"supports ({SCHEMA_VERSION}); upgrade writebehind. Nothing was changed."
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    await conn.execute(MIGRATIONS[target - 1].format(s=s))
                    await conn.execute(
                        f"INSERT INTO {s}.writebehind_migrations (version) VALUES ($1)", target
                    )
                    LOG.info("migrated PostgreSQL schema %s to version %d", s, target)
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL migration of schema {s} failed: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _acquire(self) -> Any:
        if self._pool is None:
            raise StorageError(f"{self!r} is not open")
        return self._pool.acquire()

    @asynccontextmanager
    async def connection(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, its errors mapped as every method's (`what` names the
        operation in them). For this package's session ownership."""
        async with _errors(what), self._acquire() as conn:
            yield conn

    def ownership(self) -> PostgresOwnership:
        """A new, unstarted session ownership for a store on this backend: several stores
        (app instances) share a schema, each session owned by one at a time."""
        from .pg_ownership import PostgresOwnership

        return PostgresOwnership(
            self, answer_timeout_s=self._handoff_timeout, hold_timeout_s=self._hold_timeout
        )

    # -- writes ------------------------------------------------------------------------------

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        if not deltas and not touches:
            return BatchResult({})
        if not touches and all(d.truncate_after is None for d in deltas):
            return await self._write_in_one_statement(deltas)
        s = self.schema
        async with _errors("write_batch"), self._acquire() as conn, conn.transaction():
            # Lock the rows this batch updates: another instance's write or delete of them
            # waits for this commit, so the versions read here stay true until then. In id
            # order, so that two instances locking overlapping batches cannot deadlock.
            rows = await conn.fetch(
                f"SELECT id, version FROM {s}.sessions WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                sorted({d.record.id for d in deltas} | {sid for sid, _ in touches}),
            )
            current = {row["id"]: row["version"] for row in rows}
            written, conflicts = check_versions(deltas, current)
            inserts = [d for d in written if d.record.version == 0]
            updates = [d for d in written if d.record.version != 0]
            if inserts:
                # A row absent a moment ago may be inserted by another instance right now:
                # ON CONFLICT DO NOTHING, and whatever did not come back is a conflict.
                columns = list(zip(*(self._session_row(d) for d in inserts), strict=True))
                landed = {
                    row["id"] for row in await conn.fetch(self._insert_sessions, *[list(c) for c in columns])
                }
                lost = {d.record.id for d in inserts} - landed
                if lost:
                    conflicts = conflicts | lost
                    written = [d for d in written if d.record.id not in lost]
            if updates:
                await conn.executemany(self._update_session, [self._session_row(d) for d in updates])
            message_rows = [
                (d.record.id, m.seq, m.id, m.role, m.content, m.created_at, m.updated_at, m.metadata_json)
                for d in written
                for m in d.messages
            ]
            # Popped messages go before the upsert: a seq popped and appended again is then a
            # plain insert of the new message, never an update of the old row.
            truncated = [(d.record.id, d.truncate_after) for d in written if d.truncate_after is not None]
            if truncated:
                await conn.executemany(
                    f"DELETE FROM {s}.messages WHERE session_id = $1 AND seq > $2", truncated
                )
            if message_rows:
                # One statement over arrays, not executemany's statement a row: the server
                # plans once and takes the rows as a set (5,000 rows: 1.5x raw executemany's
                # throughput here, against 0.77x a row at a time).
                await conn.execute(self._upsert_messages, *[list(c) for c in zip(*message_rows, strict=True)])
            if touches:
                ordered = sorted(touches)  # rows already locked above, in id order
                await conn.execute(
                    f"UPDATE {s}.sessions AS t SET last_access_at = greatest(t.last_access_at, u.at) "
                    "FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at) WHERE t.id = u.id",
                    [sid for sid, _ in ordered],
                    [at for _, at in ordered],
                )
        deleted = frozenset(
            d.record.id
            for d in deltas
            if d.record.id in conflicts and d.record.version and d.record.id not in current
        )
        return BatchResult({d.record.id: d.record.version + 1 for d in written}, conflicts, deleted)

    async def _write_in_one_statement(self, deltas: Sequence[SessionDelta]) -> BatchResult:
        """`write_batch` for a batch of deltas only: one statement (`_write_once`).

        Rows are locked in whatever order the join takes them, not in id order as the
        multi-statement path does: two instances writing overlapping sessions at once (only
        possible when ownership was lost) may deadlock, which PostgreSQL breaks by failing
        one statement; that batch is retried like any failed flush."""
        sessions = list(zip(*(self._session_row(d) for d in deltas), strict=True))
        message_rows = [
            (d.record.id, m.seq, m.id, m.role, m.content, m.created_at, m.updated_at, m.metadata_json)
            for d in deltas
            for m in d.messages
        ]
        messages = list(zip(*message_rows, strict=True)) if message_rows else [()] * 8
        async with _errors("write_batch"), self._acquire() as conn:
            rows = await conn.fetch(
                self._write_once, *[list(c) for c in sessions], *[list(c) for c in messages]
            )
            written = {row["id"] for row in rows}
            conflicts = frozenset(d.record.id for d in deltas if d.record.id not in written)
            deleted: frozenset[str] = frozenset()
            if conflicts:
                # Which of them were updates of a row that is gone (erased elsewhere): rare.
                asked = sorted(d.record.id for d in deltas if d.record.id in conflicts and d.record.version)
                present = {
                    row["id"]
                    for row in await conn.fetch(
                        f"SELECT id FROM {self.schema}.sessions WHERE id = ANY($1::text[])", asked
                    )
                }
                deleted = frozenset(sid for sid in asked if sid not in present)
        return BatchResult(
            {d.record.id: d.record.version + 1 for d in deltas if d.record.id in written}, conflicts, deleted
        )

    @staticmethod
    def _session_row(delta: SessionDelta) -> tuple[Any, ...]:
        r = delta.record
        kind, uid = _user(r.user_id)
        return (
            r.id,
            kind,
            uid,
            r.created_at,
            r.updated_at,
            r.last_access_at,
            r.status,
            r.title,
            r.client_ip,
            r.user_agent,
            delta.message_count,
            r.version + 1,
            None if r.branches is None else r.branches.encode(),
        )

    async def delete_session(self, session_id: str, user_id: UserId | None) -> bool:
        s = self.schema
        async with _errors("delete_session"), self._acquire() as conn:
            if user_id is None:  # an anonymous session a policy persisted: only such a row
                status = await conn.execute(
                    f"DELETE FROM {s}.sessions WHERE id = $1 AND user_id IS NULL", session_id
                )
            else:
                kind, uid = _user(user_id)
                status = await conn.execute(
                    f"DELETE FROM {s}.sessions WHERE id = $1 AND user_kind = $2 AND user_id = $3",
                    session_id,
                    kind,
                    uid,
                )
        return bool(status != "DELETE 0")

    async def delete_user(self, user_id: UserId) -> list[str]:
        kind, uid = _user(user_id)
        async with _errors("delete_user"), self._acquire() as conn:
            rows = await conn.fetch(
                f"DELETE FROM {self.schema}.sessions WHERE user_kind = $1 AND user_id = $2 RETURNING id",
                kind,
                uid,
            )
        return [row["id"] for row in rows]

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        s = self.schema
        async with _errors("purge"), self._acquire() as conn:
            rows = await conn.fetch(
                f"DELETE FROM {s}.sessions WHERE id IN (SELECT id FROM {s}.sessions "
                "WHERE last_access_at < $1 ORDER BY last_access_at LIMIT $2) RETURNING id",
                cutoff,
                limit,
            )
        return [row["id"] for row in rows]

    # -- reads -------------------------------------------------------------------------------

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
        """See `SearchableBackend.search`. Each word is one ILIKE pattern (its `%`, `_` and
        `\\` escaped), a bound parameter: nothing of it is SQL. Case-insensitive substrings,
        as on SQLite, so CJK is found too (a `simple` tsvector would take a whole CJK
        sentence for one word).

        The plan is the user's rows first (sessions_user_updated, then the messages' primary
        key), the patterns checked on those only: its cost is the user's own history, never
        the table's. No text index, on purpose: with a pg_trgm GIN index the planner started
        from the words instead, and a pattern without a trigram (a 2-character CJK word)
        became a scan of the whole index (measured: p99 54 ms over 10,000 messages against
        the user-first plan's few ms). relevance: occurrences of the words per length, as the
        memory scan ranks (PostgreSQL has no bm25)."""
        kind, uid = _user(user_id)
        patterns = [
            "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for w in words
        ]
        folded = [w.lower() for w in words]
        # occurrences of each word: (length - length with it removed) / its length
        score = " + ".join(
            f"(length(lower(m.content)) - length(replace(lower(m.content), ${i + 6}, ''))) / {len(w)}.0"
            for i, w in enumerate(folded)
        )
        offset_ = 6 + len(folded)
        likes = " AND ".join(f"m.content ILIKE ${offset_ + i}" for i in range(len(patterns)))
        orders = (
            "m.created_at DESC, m.session_id, m.seq DESC"
            if order == "newest"
            else "rank, m.created_at DESC, m.session_id, m.seq DESC"
        )
        sql = (
            "SELECT m.session_id, s.title, m.id, m.seq, m.role, m.content, m.created_at, "
            f"-({score}) / (1 + length(m.content) / 500.0) AS rank "
            f"FROM {self.schema}.sessions s JOIN {self.schema}.messages m ON m.session_id = s.id "
            f"WHERE s.user_kind = $1 AND s.user_id = $2 AND NOT (s.id = ANY($3::text[])) AND {likes} "
            f"ORDER BY {orders} LIMIT $4 OFFSET $5"
        )
        async with _errors("search"), self._acquire() as conn:
            rows = await conn.fetch(sql, kind, uid, sorted(exclude), limit, offset, *folded, *patterns)
        return [SearchRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], float(r[7])) for r in rows]

    async def load_session(self, session_id: str) -> SessionRecord | None:
        # One statement, so one snapshot and one round trip (a transaction around two
        # SELECTs took four): this is every miss's cost, and a handoff's.
        async with _errors("load_session"), self._acquire() as conn:
            rows = await conn.fetch(self._load_one, session_id)
        if not rows:
            return None
        return _record(
            rows[0],
            tuple(
                StoredMessage(
                    id=m["message_id"],
                    seq=m["seq"],
                    role=m["role"],
                    content=m["content"],
                    created_at=m["message_created_at"],
                    updated_at=m["message_updated_at"],
                    metadata_json=m["metadata"],
                )
                for m in rows
                if m["seq"] is not None
            ),
        )

    async def _load(self, conn: asyncpg.Connection, ids: list[str]) -> list[SessionRecord]:
        s = self.schema
        rows = await conn.fetch(
            f"SELECT {self._session_columns} FROM {s}.sessions WHERE id = ANY($1) ORDER BY id", ids
        )
        if not rows:
            return []
        messages: dict[str, list[StoredMessage]] = {row["id"]: [] for row in rows}
        for m in await conn.fetch(
            "SELECT session_id, seq, id, role, content, created_at, updated_at, metadata "
            f"FROM {s}.messages WHERE session_id = ANY($1) ORDER BY session_id, seq",
            list(messages),
        ):
            messages[m["session_id"]].append(
                StoredMessage(
                    id=m["id"],
                    seq=m["seq"],
                    role=m["role"],
                    content=m["content"],
                    created_at=m["created_at"],
                    updated_at=m["updated_at"],
                    metadata_json=m["metadata"],
                )
            )
        return [_record(row, tuple(messages[row["id"]])) for row in rows]

    async def holds_sealed_values(self) -> bool:
        """`SQLiteBackend.holds_sealed_values`: the text form is the only one here."""
        async with _errors("holds_sealed_values"), self._acquire() as conn:
            found = await conn.fetchval(
                f"SELECT true FROM {self.schema}.sessions WHERE left(title, 5) = 'wbe1:' LIMIT 1"
            )
        return bool(found)

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        kind, uid = _user(user_id)
        async with _errors("list_sessions"), self._acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, title, status, created_at, updated_at, last_access_at, message_count "
                f"FROM {self.schema}.sessions WHERE user_kind = $1 AND user_id = $2 "
                "ORDER BY updated_at DESC, id LIMIT $3 OFFSET $4",
                kind,
                uid,
                limit,
                offset,
            )
        return [
            SessionSummary(
                id=row["id"],
                user_id=user_id,
                title=row["title"],
                status=row["status"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                last_access_at=row["last_access_at"],
                message_count=row["message_count"],
            )
            for row in rows
        ]

    async def iter_user_sessions(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        kind, uid = _user(user_id)
        after = ""
        while True:
            async with (
                _errors("export"),
                self._acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                ids = [
                    row["id"]
                    for row in await conn.fetch(
                        f"SELECT id FROM {self.schema}.sessions "
                        "WHERE user_kind = $1 AND user_id = $2 AND id > $3 ORDER BY id LIMIT $4",
                        kind,
                        uid,
                        after,
                        _EXPORT_PAGE,
                    )
                ]
                page = await self._load(conn, ids) if ids else []
            for record in page:
                yield record
            if len(ids) < _EXPORT_PAGE:
                return
            after = ids[-1]

    async def disk_usage(self, counts: bool = False) -> DiskUsage:
        """The sessions and messages tables' size (`pg_total_relation_size`: with their
        indexes and TOAST) and, with `counts`, how many sessions and users they hold (one
        statement, one snapshot): for the store's monitoring, which counts every few
        minutes only."""
        s = self.schema
        async with _errors("disk_usage"), self._acquire() as conn:
            size = await conn.fetchval(
                "SELECT pg_total_relation_size($1::regclass) + pg_total_relation_size($2::regclass)",
                f"{s}.sessions",
                f"{s}.messages",
            )
            if not counts:
                return DiskUsage(int(size), None)
            row = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM {s}.sessions), (SELECT count(*) FROM "
                f"(SELECT DISTINCT user_kind, user_id FROM {s}.sessions WHERE user_id IS NOT NULL) u)"
            )
        return DiskUsage(int(size), None, int(row[0]), int(row[1]))

    async def drop_schema(self) -> None:
        """Remove this backend's schema and everything in it (tests, and operators who mean it)."""
        async with _errors("drop_schema"), self._acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def _record(row: Any, messages: tuple[StoredMessage, ...]) -> SessionRecord:
    """A session row (with its messages) as a record; the one place that reads its columns."""
    return SessionRecord(
        id=row["id"],
        user_id=_from_user(row["user_kind"], row["user_id"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_access_at=row["last_access_at"],
        status=row["status"],
        title=row["title"],
        messages=messages,
        client_ip=row["client_ip"],
        user_agent=row["user_agent"],
        version=row["version"],
        branches=Branches.decode(row["branches"], f"session {row['id']!r}"),
    )


class _errors:
    """Map asyncpg's errors to the package's: data a constraint refused → RecordError,
    anything else (connection lost, server gone, timeouts) → StorageError."""

    def __init__(self, what: str) -> None:
        self._what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, StorageError):
            return
        record_level = (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError)
        if isinstance(exc, record_level):
            raise RecordError(f"PostgreSQL {self._what} refused: {type(exc).__name__}: {exc}") from exc
        # InternalClientError: what asyncpg raises for a query racing the server's end of
        # the connection; the connection failed, not the data.
        if isinstance(
            exc,
            asyncpg.PostgresError
            | asyncpg.InterfaceError
            | asyncpg.InternalClientError
            | OSError
            | TimeoutError,
        ):
            raise StorageError(f"PostgreSQL {self._what} failed: {type(exc).__name__}: {exc}") from exc
