"""The PostgreSQL backend's failures and edges, on the real server at 127.0.0.1:5432: a server
or database that is not there, a schema it must not touch (newer, or another app's), a
connection the server terminates, the mapping of the driver's errors to the package's, the
access-time writes of reads, anonymous rows, and what a store on PostgreSQL cannot do
(a file backup, a recovery file nobody configured). Each refusal is typed, says what is
wrong and changes nothing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from writebehind import (
    ClosedError,
    Config,
    RecordError,
    SchemaError,
    SessionStore,
    StorageError,
    WriteBehindStore,
)
from writebehind.backends.base import SessionDelta
from writebehind.backends.postgres import SCHEMA_VERSION, PostgresBackend, _errors
from writebehind.model import SessionRecord, StoredMessage, utcnow

from ..conftest import QUIET
from ..pg import DSN, new_schema, postgres_schema


def record(session_id: str, user_id: int | str | None = 1, **changes: Any) -> SessionRecord:
    now = utcnow()
    return SessionRecord(session_id, user_id, now, now, now, **changes)


def delta(rec: SessionRecord, *contents: str) -> SessionDelta:
    messages = tuple(
        StoredMessage(f"m{i}", i, "user", text, rec.created_at, rec.created_at)
        for i, text in enumerate(contents, 1)
    )
    return SessionDelta(rec, messages, len(messages))


@pytest.fixture
async def backend() -> AsyncIterator[PostgresBackend]:
    async with postgres_schema() as opened:
        yield opened


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    """A connection of the database's operator, beside the backend's pool."""
    try:
        conn = await asyncpg.connect(DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        reason = f"PostgreSQL is not reachable at {DSN} ({exc})"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {reason}")
        pytest.skip(reason)
    try:
        yield conn
    finally:
        await conn.close()


# -- a server, database or schema it must not use --------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://postgres@127.0.0.1:1/test", DSN.rsplit("/", 1)[0] + "/wb_no_such_database"],
    ids=["no server", "no database"],
)
async def test_a_server_or_database_that_is_not_there_is_a_storage_error_and_the_store_stays_unstarted(
    tmp_path: Path, admin: asyncpg.Connection, dsn: str
) -> None:
    config = Config(db_url=dsn, db_schema=new_schema(), db_path=tmp_path / "local.db", **QUIET)
    store = WriteBehindStore.from_config(config)
    assert isinstance(store.backend, PostgresBackend) and store.backend.schema == config.db_schema
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL"):
        await store.start()
    with pytest.raises(ClosedError, match="call start"):
        await store.ensure_session("s", user_id=1)
    assert not list(tmp_path.iterdir())  # nothing local was created either


async def test_a_schema_of_a_newer_version_is_refused_and_left_untouched(
    backend: PostgresBackend, admin: asyncpg.Connection
) -> None:
    await backend.write_batch([delta(record("s"), "kept")])
    s = backend.schema
    await admin.execute(f"INSERT INTO {s}.writebehind_migrations (version) VALUES (99)")
    newer = PostgresBackend(DSN, schema=s, pool_size=1)
    with pytest.raises(
        SchemaError, match=f"schema {s} is at version 99, newer than this writebehind supports"
    ):
        await newer.open()
    with pytest.raises(StorageError, match="is not open"):
        await newer.load_session("s")  # the failed open kept no pool
    versions = [
        row["version"] for row in await admin.fetch(f"SELECT version FROM {s}.writebehind_migrations")
    ]
    assert sorted(versions) == [*range(1, SCHEMA_VERSION + 1), 99]
    loaded = await backend.load_session("s")
    assert loaded is not None and [m.content for m in loaded.messages] == ["kept"]


async def test_a_schema_holding_another_apps_sessions_table_is_refused_untouched(
    admin: asyncpg.Connection,
) -> None:
    s = new_schema()
    await admin.execute(f"CREATE SCHEMA {s}")
    try:
        await admin.execute(f"CREATE TABLE {s}.sessions (token text PRIMARY KEY, expires timestamptz)")
        await admin.execute(f"INSERT INTO {s}.sessions VALUES ('another app', now())")
        backend = PostgresBackend(DSN, schema=s, pool_size=1)
        with pytest.raises(StorageError, match=f"PostgreSQL migration of schema {s} failed"):
            await backend.open()
        tables = {
            row["tablename"]
            for row in await admin.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", s)
        }
        assert tables == {"sessions"}  # the migration rolled back whole: not even its own table
        assert await admin.fetchval(f"SELECT token FROM {s}.sessions") == "another app"
    finally:
        await admin.execute(f"DROP SCHEMA {s} CASCADE")


def test_a_schema_name_that_is_not_a_plain_identifier_is_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="lower-case SQL identifier"):
        PostgresBackend(DSN, schema="chat; DROP SCHEMA public")


# -- connections and the driver's errors ------------------------------------------------------------


async def test_a_backend_used_before_open_or_after_close_raises_storage_error(
    admin: asyncpg.Connection,
) -> None:
    backend = PostgresBackend(DSN, schema=new_schema(), pool_size=1)
    with pytest.raises(StorageError, match="is not open"):
        await backend.write_batch([delta(record("s"))])
    await backend.open()
    try:
        assert (await backend.write_batch([], [])).versions == {}  # nothing to do: no transaction
        await backend.write_batch([delta(record("s"), "hello")])
    finally:
        await backend.drop_schema()
        await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(StorageError, match="is not open"):
        await backend.load_session("s")


def closed_by_the_server(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # the pool already took back the connection it lost
        return True


async def test_a_connection_the_server_terminates_is_a_storage_error_and_the_pool_recovers(
    backend: PostgresBackend, admin: asyncpg.Connection
) -> None:
    await backend.write_batch([delta(record("s"), "before")])
    with pytest.raises(StorageError, match="PostgreSQL probe failed") as caught:
        async with backend.connection("probe") as conn:
            await admin.fetchval(
                "SELECT pg_terminate_backend($1)", conn.get_server_pid()
            )  # a DBA, a failover
            async with asyncio.timeout(10):
                while not closed_by_the_server(conn):
                    await asyncio.sleep(0.01)
            await conn.fetchval("SELECT 1")
    assert isinstance(caught.value.__cause__, asyncpg.InterfaceError)
    assert not isinstance(caught.value, RecordError)  # the data is fine: retried, never set aside
    # The next calls get a fresh connection: nothing is lost, nothing half written.
    await backend.write_batch([delta(record("t"), "after")])
    loaded = {sid: await backend.load_session(sid) for sid in ("s", "t")}
    assert {sid: [m.content for m in r.messages] for sid, r in loaded.items() if r} == {
        "s": ["before"],
        "t": ["after"],
    }


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (asyncpg.UniqueViolationError("duplicate key"), RecordError),
        (asyncpg.DataError("invalid input"), RecordError),
        (
            asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
            StorageError,
        ),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), StorageError),
        (ConnectionResetError(104, "Connection reset by peer"), StorageError),
        (TimeoutError(), StorageError),
        (
            # What a query gets when it races the server's termination of its connection: seen
            # in 6 of 10 tries of pg_terminate_backend followed at once by a query (asyncpg 0.30).
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            StorageError,
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
async def test_the_drivers_errors_become_the_packages(
    raised: BaseException, expected: type[StorageError]
) -> None:
    with pytest.raises(expected, match=r"PostgreSQL write_batch (failed|refused): ") as caught:
        async with _errors("write_batch"):
            raise raised
    assert type(caught.value) is expected  # a connection failure is never a RecordError
    assert caught.value.__cause__ is raised


async def test_a_bug_in_our_own_code_is_not_disguised_as_a_storage_failure() -> None:
    with pytest.raises(TypeError, match="a bug"):
        async with _errors("write_batch"):
            raise TypeError("a bug")


# -- writes that are not session writes --------------------------------------------------------------


async def test_reads_move_the_stored_access_time_forward_only_without_a_version_change(
    backend: PostgresBackend,
) -> None:
    rec = record("s")
    await backend.write_batch([delta(rec, "hi")])
    later = rec.last_access_at + timedelta(hours=2)
    result = await backend.write_batch([], [("s", later), ("never-stored", later)])
    assert result.versions == {} and not result.conflicts
    loaded = await backend.load_session("s")
    assert loaded is not None and (loaded.last_access_at, loaded.version) == (later, 1)
    await backend.write_batch([], [("s", rec.last_access_at)])  # an older read arriving late
    loaded = await backend.load_session("s")
    assert loaded is not None and loaded.last_access_at == later
    assert await backend.load_session("never-stored") is None
    # The next write of the session is not a conflict: a read did not move its version.
    again = replace(loaded, messages=(), updated_at=utcnow())
    assert (await backend.write_batch([delta(again, "hi", "again")])).versions == {"s": 2}


async def test_an_anonymous_row_round_trips_without_an_owner_and_is_deleted_by_id(
    backend: PostgresBackend,
) -> None:
    await backend.write_batch([delta(record("anon", None), "hello")])
    loaded = await backend.load_session("anon")
    assert loaded is not None and loaded.user_id is None and [m.content for m in loaded.messages] == ["hello"]
    assert await backend.delete_session("anon", 1) is False  # a signed-in user does not own it
    assert await backend.delete_session("anon", None) is True
    assert await backend.delete_session("anon", None) is False
    assert await backend.load_session("anon") is None


# -- what a store on PostgreSQL cannot do -----------------------------------------------------------


@pytest.fixture
async def pg_config(tmp_path: Path) -> AsyncIterator[Config]:
    async with postgres_schema() as created:
        yield Config(db_url=DSN, db_schema=created.schema, db_path=tmp_path / "beside.db", **QUIET)


async def test_a_backup_of_a_postgresql_store_is_refused_and_creates_nothing(
    pg_config: Config, tmp_path: Path
) -> None:
    async with WriteBehindStore.from_config(pg_config) as store:
        await store.ensure_session("s", user_id=1)
        dest = tmp_path / "backup.db"
        with pytest.raises(StorageError, match="PostgresBackend has no backup; use the database's tools"):
            await store.backup(dest)
        assert not dest.exists()
        await store.flush()
    check = PostgresBackend(DSN, schema=pg_config.db_schema, pool_size=1)
    await check.open()
    try:
        loaded = await check.load_session("s")
        assert loaded is not None and loaded.user_id == 1  # CHAT_SESSION_DB_URL chose PostgreSQL
    finally:
        await check.close()


class RefusingWrites(PostgresBackend):
    """The real backend, on a server that stopped taking writes (made by the test)."""

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        if deltas:
            raise StorageError("PostgreSQL write_batch failed: the server is read-only (made by the test)")
        return await super().write_batch(deltas, touches)


async def test_without_a_recovery_file_aclose_raises_and_hands_the_records_to_unsaved(
    pg_config: Config,
) -> None:
    backend = RefusingWrites(DSN, schema=pg_config.db_schema, pool_size=2)
    config = Config(
        db_url=DSN, db_schema=pg_config.db_schema, shutdown_timeout_seconds=0.2, **QUIET
    )  # no recovery_path, and a PostgreSQL backend has no file to put one beside
    store = WriteBehindStore(SessionStore(), backend, config=config)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="only in memory")
    with pytest.raises(
        StorageError, match=r"1 sessions could not be saved: .*no recovery file is configured"
    ):
        await store.aclose()
    (unsaved,) = store.unsaved()
    assert [m.content for m in unsaved.messages] == ["only in memory"]
