"""PostgreSQL: flush throughput next to raw asyncpg `executemany` of the same rows, and the
request path of a PostgreSQL-backed store next to the plain in-memory store (it never
touches the network, so it should match the SQLite-backed figure).

Needs the PostgreSQL server on 127.0.0.1:5432 (database `test`); skipped, saying so,
without it.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, SessionStore, StorageError, WriteBehindStore
from writebehind.backends.postgres import MIGRATIONS, PostgresBackend

from .paired import run_paired
from .test_flush import MESSAGES, PER_SESSION, ROUNDS, SESSIONS, Round, fill, new_round

DSN = "postgresql://postgres@127.0.0.1:5432/test"
OPS = 1000
_ids = itertools.count()


@pytest.fixture
def pg_store(loop: asyncio.AbstractEventLoop) -> Iterator[WriteBehindStore]:
    schema = f"wb_bench_{uuid.uuid4().hex[:12]}"
    config = Config(
        db_url=DSN,
        db_schema=schema,
        flush_interval_ms=3_600_000,
        flush_batch=10 * SESSIONS,
        cache_size=1_000_000,
        max_dirty=1_000_000,
        max_flushes_per_second=10_000,
    )
    store = WriteBehindStore.from_config(config)
    try:
        loop.run_until_complete(store.start())
    except StorageError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
    yield store
    backend = store.backend
    loop.run_until_complete(store.aclose())
    assert isinstance(backend, PostgresBackend)
    loop.run_until_complete(backend.open())
    loop.run_until_complete(backend.drop_schema())
    loop.run_until_complete(backend.close())


class RawAsyncpg:
    """The baseline: plain asyncpg, the same schema, the same rows ready-made, one transaction."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.schema = f"wb_raw_{uuid.uuid4().hex[:12]}"
        self.loop = loop
        self.conn: asyncpg.Connection = loop.run_until_complete(asyncpg.connect(DSN))
        loop.run_until_complete(self.conn.execute(f"CREATE SCHEMA {self.schema}"))
        loop.run_until_complete(self.conn.execute(MIGRATIONS[0].format(s=self.schema)))

    def prepare(self, data: Round) -> Callable[[], Coroutine[Any, Any, None]]:
        now = datetime.now(UTC)
        s = self.schema
        sessions = [(sid, 0, str(user), now, now, now, "active", PER_SESSION) for sid, user in data.sessions]
        messages = [
            (sid, seq, mid, "user", content, now, now, None) for sid, seq, mid, content in data.messages
        ]

        async def write() -> None:
            async with self.conn.transaction():
                await self.conn.executemany(
                    f"INSERT INTO {s}.sessions (id, user_kind, user_id, created_at, updated_at,"
                    " last_access_at, status, message_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    sessions,
                )
                await self.conn.executemany(
                    f"INSERT INTO {s}.messages (session_id, seq, id, role, content, created_at, updated_at,"
                    " metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    messages,
                )

        return write

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.execute(f"DROP SCHEMA {self.schema} CASCADE"))
        self.loop.run_until_complete(self.conn.close())


def test_flush_postgres(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, pg_store: WriteBehindStore
) -> None:
    benchmark.group = f"flush {MESSAGES} messages to PostgreSQL"
    raw = RawAsyncpg(loop)
    current: list[Round] = []

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        current[:] = [new_round()]
        return raw.prepare(current[0])

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        loop.run_until_complete(fill(pg_store, current[0]))
        return pg_store.flush

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="WriteBehindStore.flush() on PostgreSQL",
            baseline_name="raw asyncpg executemany",
            baseline=baseline,
            contender=contender,
            rounds=ROUNDS // 2,
            per_round=MESSAGES,
            unit="message",
            target="throughput >= 80% of raw",
        )
    finally:
        raw.close()
    assert pg_store.stats().dirty_sessions == 0


@pytest.mark.benchmark(group=f"append_message x{OPS}, PostgreSQL-backed")
def test_append_message_postgres(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, pg_store: WriteBehindStore
) -> None:
    plain = SessionStore(maxsize=100_000)

    def prepare(store: SessionStore | WriteBehindStore) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = loop.run_until_complete(store.ensure_session(f"p{next(_ids)}", user_id=1)).id

        async def body() -> None:
            for _ in range(OPS):
                await store.append_message(sid, user_id=1, role="user", content="x" * 500)

        return body

    run_paired(
        benchmark,
        loop=loop,
        name="WriteBehindStore (PostgreSQL)",
        baseline_name="SessionStore",
        baseline=lambda: prepare(plain),
        contender=lambda: prepare(pg_store),
        rounds=40,
        per_round=OPS,
        unit="call",
        target="as on SQLite",
    )


DURABLE_CALLS = 100


@pytest.mark.benchmark(group=f"append_message(durable=True) x{DURABLE_CALLS}, PostgreSQL")
def test_durable_postgres(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, pg_store: WriteBehindStore
) -> None:
    """One caller's durable appends next to asyncpg write-through: per message, an INSERT
    in a transaction (BEGIN, INSERT, COMMIT) on one connection, into the same schema."""
    raw = RawAsyncpg(loop)
    content = "d" * 500

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        sid = f"w{next(_ids)}"
        now = datetime.now(UTC)
        loop.run_until_complete(
            raw.conn.execute(
                f"INSERT INTO {raw.schema}.sessions (id, user_kind, user_id, created_at, updated_at,"
                " last_access_at, status) VALUES ($1, 0, '1', $2, $2, $2, 'active')",
                sid,
                now,
            )
        )
        insert = (
            f"INSERT INTO {raw.schema}.messages (session_id, seq, id, role, content, created_at,"
            " updated_at, metadata) VALUES ($1, $2, $3, $4, $5, $6, $6, NULL)"
        )

        async def body() -> None:
            for seq in range(1, DURABLE_CALLS + 1):
                async with raw.conn.transaction():
                    await raw.conn.execute(insert, sid, seq, uuid.uuid4().hex, "user", content, now)

        return body

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        sid = loop.run_until_complete(pg_store.ensure_session(f"d{next(_ids)}", user_id=1, durable=True)).id

        async def body() -> None:
            for _ in range(DURABLE_CALLS):
                await pg_store.append_message(sid, user_id=1, role="user", content=content, durable=True)

        return body

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="append_message(durable=True), PostgreSQL",
            baseline_name="asyncpg BEGIN + INSERT + COMMIT",
            baseline=baseline,
            contender=contender,
            rounds=20,
            per_round=DURABLE_CALLS,
            unit="call",
            target="<= 1.20x",
        )
    finally:
        raw.close()
    assert pg_store.stats().dirty_sessions == 0
