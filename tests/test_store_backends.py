"""Store-level behaviour that must not depend on the backend: the same tests on SQLite and
on PostgreSQL (restart, listing, export, erasure racing a flush, retention)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from writebehind import Config, NotFound, SessionStore, SQLiteBackend, WriteBehindStore
from writebehind.backends.base import Backend
from writebehind.backends.postgres import PostgresBackend
from writebehind.model import utcnow

from .pg import DSN, new_schema, postgres_schema

Opener = Callable[..., Coroutine[Any, Any, WriteBehindStore]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """`await open_store(**config)`: a started store; the same database every call."""
    async with AsyncExitStack() as stack:
        schema = new_schema()
        if request.param == "postgres":
            await stack.enter_async_context(postgres_schema(schema))  # dropped at the end
        stores: list[WriteBehindStore] = []

        async def opener(**overrides: Any) -> WriteBehindStore:
            config = Config(db_path=tmp_path / "s.db", **{"flush_interval_ms": 3_600_000, **overrides})
            backend: Backend = (
                PostgresBackend(DSN, schema=schema)
                if request.param == "postgres"
                else SQLiteBackend(config.db_path)
            )
            store = WriteBehindStore(SessionStore(config.cache_size), backend, config=config)
            await store.start()
            stores.append(store)
            return store

        yield opener
        for store in stores:
            await store.aclose()


async def test_restart_keeps_signed_in_sessions_only(open_store: Opener) -> None:
    store = await open_store()
    await store.ensure_session("kept", user_id="u", title="t")
    await store.append_message("kept", user_id="u", role="user", content="hello")
    anon = await store.ensure_session(user_id=None)
    await store.aclose()
    again = await open_store()
    record = await again.get_session("kept", user_id="u")
    assert record.title == "t" and [m.content for m in record.messages] == ["hello"]
    with pytest.raises(NotFound):
        await again.get_session(anon.id, user_id=None)


async def test_listing_and_export_merge_memory_and_disk(open_store: Opener) -> None:
    store = await open_store()
    for i in range(3):
        await store.ensure_session(f"s{i}", user_id=1)
    await store.aclose()
    store = await open_store()
    await store.append_message("s1", user_id=1, role="user", content="newer")
    await store.ensure_session("fresh", user_id=1)
    listed = [s.id for s in await store.list_sessions(1)]
    assert listed[:2] == ["fresh", "s1"] and sorted(listed) == ["fresh", "s0", "s1", "s2"]
    exported = {r.id: r for r in [r async for r in store.export_user(1)]}
    assert sorted(exported) == ["fresh", "s0", "s1", "s2"]
    assert [m.content for m in exported["s1"].messages] == ["newer"]


async def test_erasure_racing_flushes_leaves_nothing(open_store: Opener) -> None:
    store = await open_store(flush_interval_ms=1)
    await store.ensure_session("s", user_id=1)
    writes = asyncio.gather(
        *(store.append_message("s", user_id=1, role="user", content=f"m{i}") for i in range(50)),
        return_exceptions=True,
    )
    await asyncio.sleep(0.005)
    await store.delete_user(1)
    await writes
    await store.flush()
    await asyncio.sleep(0.05)
    await store.flush()
    await store.aclose()
    again = await open_store()
    assert await again.list_sessions(1) == []
    assert [r async for r in again.export_user(1)] == []


async def test_retention_removes_idle_sessions_but_not_active_ones(open_store: Opener) -> None:
    store = await open_store(retention_days=30)
    await store.ensure_session("idle", user_id=1)
    await store.ensure_session("active", user_id=1)
    await store.flush()
    later = utcnow() + timedelta(days=31)
    active = store.hot.tier.peek("active")
    assert active is not None
    active.last_access_at = later
    await store.flush()
    # "active" was touched only in memory: its disk row is as old as "idle"'s; the purge
    # deletes both rows, and writes "active" back because it is active.
    assert await store.purge_expired(now=later) == 1
    await store.flush()
    assert [s.id for s in await store.list_sessions(1)] == ["active"]
    await store.aclose()
    again = await open_store()
    assert [s.id for s in await again.list_sessions(1)] == ["active"]
