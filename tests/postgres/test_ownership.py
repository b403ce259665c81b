"""Session ownership on PostgreSQL, the edges, in one process: several stores sharing a
schema, and instances faked with plain SQL (one that is alive but never answers, one that
died). The whole processes are in test_instances.py."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from writebehind import (
    Config,
    NotFound,
    OwnershipError,
    SessionStore,
    SQLiteBackend,
    ValidationError,
    WriteBehindStore,
)
from writebehind.backends.pg_ownership import PostgresOwnership, lock_key_of, namespace_of
from writebehind.backends.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresBackend

from ..pg import DSN, new_schema, postgres_schema


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    async with postgres_schema(name):  # created (migrated) here, dropped afterwards
        yield name


@asynccontextmanager
async def store_on(schema: str, **backend: Any) -> AsyncIterator[WriteBehindStore]:
    config = Config(db_url=DSN, db_schema=schema, flush_interval_ms=3_600_000)
    store = WriteBehindStore(
        SessionStore(), PostgresBackend(DSN, schema=schema, pool_size=4, **backend), config=config
    )
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


def ownership(store: WriteBehindStore) -> PostgresOwnership:
    owner = store._ownership
    assert isinstance(owner, PostgresOwnership)
    return owner


async def fake_instance(schema: str, *sessions: str) -> tuple[asyncpg.Connection, int]:
    """An instance registered as a real one is (its lock held on its connection) that owns
    `sessions` and never answers a request."""
    conn = await asyncpg.connect(DSN)
    instance_id = await conn.fetchval(f"SELECT nextval('{schema}.instance_ids')")
    key = lock_key_of(namespace_of(schema), instance_id)
    assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
    await conn.execute(
        f"INSERT INTO {schema}.instances (id, lock_key, pid, host) VALUES ($1, $2, 4242, 'elsewhere')",
        instance_id,
        key,
    )
    claims = [(s, instance_id) for s in sessions]
    await conn.executemany(f"INSERT INTO {schema}.owners (session_id, owner) VALUES ($1, $2)", claims)
    return conn, instance_id


async def owner_of(schema: str, session_id: str) -> int | None:
    conn = await asyncpg.connect(DSN)
    try:
        owner: int | None = await conn.fetchval(
            f"SELECT owner FROM {schema}.owners WHERE session_id = $1", session_id
        )
        return owner
    finally:
        await conn.close()


async def test_an_owner_that_never_answers_is_a_typed_error_naming_it_and_nothing_changes(
    schema: str,
) -> None:
    conn, fake = await fake_instance(schema, "s")
    try:
        async with store_on(schema, handoff_timeout_s=0.3) as store:
            with pytest.raises(OwnershipError) as raised:
                await store.append_message("s", user_id=1, role="user", content="hi")
            assert raised.value.session_id == "s"
            assert "pid 4242 on host elsewhere" in str(raised.value)
            assert "did not answer" in str(raised.value)
            assert "s" not in store.hot.tier
            assert ownership(store).stats().timeouts == 1
            assert await owner_of(schema, "s") == fake
    finally:
        await conn.close()


async def test_a_dead_owners_sessions_are_taken_at_once_and_a_new_instance_forgets_it(schema: str) -> None:
    conn, fake = await fake_instance(schema, "s", "t")
    await conn.close()  # its lock goes with its connection: the instance is dead
    async with store_on(schema, handoff_timeout_s=0.3) as store:
        # started after the death: the dead instance and its claims are gone
        assert await owner_of(schema, "s") is None
        conn = await asyncpg.connect(DSN)
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.instances WHERE id = $1", fake) == 0
        finally:
            await conn.close()
        await store.ensure_session("s", user_id=1)
    conn, _ = await fake_instance(schema, "u")
    async with store_on(schema, handoff_timeout_s=0.3) as store:
        await conn.close()  # dies while the store runs
        await store.ensure_session("u", user_id=1)
        stats = ownership(store).stats()
        assert stats.takeovers == 1 and stats.timeouts == 0
        assert await owner_of(schema, "u") == stats.instance_id


async def test_a_hold_that_outlasts_the_hold_timeout_is_a_typed_error_then_the_write_lands(
    schema: str,
) -> None:
    async with store_on(schema) as a, store_on(schema, hold_timeout_s=0.3) as b:
        await a.ensure_session("s", user_id=1)
        await a.append_message("s", user_id=1, role="user", content="q")
        async with a.hold("s"):
            with pytest.raises(OwnershipError, match=r"has not ended within 0\.3s"):
                await b.append_message("s", user_id=1, role="user", content="too early")
        message = await b.append_message("s", user_id=1, role="user", content="after the reply")
        assert message.seq == 2
        assert "s" in b.hot.tier and "s" not in a.hot.tier


async def test_closing_hands_its_held_sessions_to_the_instances_waiting_for_them(schema: str) -> None:
    async with store_on(schema) as b:
        a_cm = store_on(schema)
        a = await a_cm.__aenter__()
        await a.ensure_session("s", user_id=1)
        await a.append_message("s", user_id=1, role="user", content="from A")
        hold = a.hold("s")
        await hold.__aenter__()  # a reply the server never ended before shutting down
        waiting = asyncio.create_task(b.append_message("s", user_id=1, role="user", content="from B"))
        while ownership(a).pending_handoffs("s") == 0:
            await asyncio.sleep(0.01)
        await a_cm.__aexit__(None, None, None)  # flushes, releases everything, answers B
        assert (await waiting).seq == 2
        assert [m.content for m in (await b.get_session("s", user_id=1)).messages] == ["from A", "from B"]


async def test_two_instances_creating_one_session_at_once_end_with_one_session(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        made = await asyncio.gather(a.ensure_session("n", user_id=1), b.ensure_session("n", user_id=1))
        assert made[0].created_at == made[1].created_at  # one session, handed from one to the other
        await a.append_message("n", user_id=1, role="user", content="one")
        await b.append_message("n", user_id=1, role="user", content="two")
        await a.flush()
        await b.flush()
        stored = await b.backend.load_session("n")
        assert stored is not None and [m.content for m in stored.messages] == ["one", "two"]
        assert a.stats().conflicts == b.stats().conflicts == 0


async def test_a_read_while_the_owner_holds_is_not_kept_and_only_the_owner_user_sees_it(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        await a.ensure_session("s", user_id=1)
        for text in ("one", "two", "three"):
            await a.append_message("s", user_id=1, role="user", content=text)
        async with a.hold("s"):
            record = await b.get_session("s", user_id=1)
            assert [m.content for m in record.messages] == ["one", "two", "three"]
            tail = await b.get_messages("s", user_id=1, after_seq=1, limit=1)
            assert [m.content for m in tail] == ["two"]
            with pytest.raises(NotFound):
                await b.get_session("s", user_id=2)
            with pytest.raises(NotFound):
                await b.get_messages("s", user_id="1")
            assert "s" not in b.hot.tier and "s" in a.hot.tier
        assert ownership(b).stats().reads_elsewhere == 4


async def test_a_lost_lock_connection_registers_again_keeping_the_claims(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        await a.ensure_session("s", user_id=1)
        await a.append_message("s", user_id=1, role="user", content="from A")
        before = ownership(a).instance_id
        conn = ownership(a)._conn
        assert conn is not None
        killer = await asyncpg.connect(DSN)
        try:
            await killer.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        finally:
            await killer.close()
        async with asyncio.timeout(10):
            while ownership(a).instance_id == before or ownership(a)._conn is None:
                await asyncio.sleep(0.01)
        after = ownership(a).instance_id
        assert await owner_of(schema, "s") == after
        record = await b.get_session("s", user_id=1)  # handed over by A, listening again
        assert [m.content for m in record.messages] == ["from A"]
        assert ownership(b).stats().handoffs == 1


async def test_a_schema_released_before_ownership_is_migrated_and_served() -> None:
    schema = new_schema()
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(MIGRATIONS[0].format(s=schema))
        await conn.execute(
            f"CREATE TABLE {schema}.writebehind_migrations "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(f"INSERT INTO {schema}.writebehind_migrations (version) VALUES (1)")
        await conn.execute(
            f"INSERT INTO {schema}.sessions (id, user_kind, user_id, created_at, updated_at, "
            "last_access_at, status) VALUES ('old', 0, '1', now(), now(), now(), 'active')"
        )
        async with store_on(schema) as store:
            assert (await store.get_session("old", user_id=1)).id == "old"
            version = await conn.fetchval(f"SELECT max(version) FROM {schema}.writebehind_migrations")
            assert version == SCHEMA_VERSION >= 2
            assert await owner_of(schema, "old") == ownership(store).instance_id
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def test_hold_on_sqlite_is_a_marker_and_nothing_else(tmp_path: Path) -> None:
    store = WriteBehindStore(SessionStore(), SQLiteBackend(tmp_path / "s.db"))
    async with store:
        await store.ensure_session("s", user_id=1)
        async with store.hold("s"), store.hold("s"):
            await store.append_message("s", user_id=1, role="user", content="hi")
        with pytest.raises(ValidationError):
            store.hold("not an id!")
        assert (await store.get_session("s", user_id=1)).messages[0].content == "hi"
    assert os.path.exists(tmp_path / "s.db")


async def test_writers_and_replies_on_three_instances_at_random_never_conflict_and_lose_nothing(
    schema: str,
) -> None:
    rng = random.Random(11)
    async with store_on(schema) as a, store_on(schema) as b, store_on(schema) as c:
        stores = [a, b, c]
        sessions = [f"shared{i}" for i in range(4)]
        acknowledged: dict[str, list[tuple[int, str]]] = {sid: [] for sid in sessions}

        async def writer(w: int) -> None:
            for i in range(10):
                store, sid = rng.choice(stores), rng.choice(sessions)
                text = f"w{w}-{i}"
                await store.ensure_session(sid, user_id=1)
                if rng.random() < 0.3:  # a reply, streamed under hold()
                    async with store.hold(sid):
                        message = await store.append_message(sid, user_id=1, role="assistant", content="")
                        for token in text:
                            await store.update_message(sid, message.id, user_id=1, append=token)
                            await asyncio.sleep(0)
                else:
                    message = await store.append_message(sid, user_id=1, role="user", content=text)
                acknowledged[sid].append((message.seq, text))
                # a read right after, on any instance, shows it
                reader = rng.choice(stores)
                seen = await reader.get_messages(sid, user_id=1, after_seq=message.seq - 1, limit=1)
                assert seen and seen[0].content == text

        await asyncio.gather(*(writer(w) for w in range(12)))
        for store in stores:
            await store.flush()
        for sid in sessions:
            stored = await a.backend.load_session(sid)
            assert stored is not None
            assert [m.seq for m in stored.messages] == list(range(1, len(stored.messages) + 1))
            assert sorted((m.seq, m.content) for m in stored.messages) == sorted(acknowledged[sid])
        assert sum(len(v) for v in acknowledged.values()) == 120
        assert [s.stats().conflicts for s in stores] == [0, 0, 0]
