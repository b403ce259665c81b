"""Shared fixtures: real SQLite files under tmp_path, stores closed after each test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from writebehind import Config, SessionStore, SQLiteBackend, WriteBehindStore
from writebehind.backends.base import Backend
from writebehind.backends.postgres import PostgresBackend

from .pg import DSN, new_schema, postgres_schema

# Flushes in tests happen when a test asks for them, unless it sets a short interval.
QUIET = {"flush_interval_ms": 3_600_000}

StoreFactory = Callable[..., Coroutine[Any, Any, WriteBehindStore]]
Opener = Callable[..., Coroutine[Any, Any, WriteBehindStore]]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat_sessions.db"


@pytest.fixture
async def make_store(db_path: Path) -> AsyncIterator[StoreFactory]:
    """`await make_store(backend=None, **config)`: a started store on `db_path`."""
    stores: list[WriteBehindStore] = []

    async def factory(backend: Backend | None = None, **overrides: Any) -> WriteBehindStore:
        config = Config(db_path=db_path, **{**QUIET, **overrides})
        hot = SessionStore(
            config.cache_size,
            anon_ttl_seconds=config.anon_ttl_seconds,
            max_message_bytes=config.max_message_bytes,
        )
        store = WriteBehindStore(
            hot,
            backend
            or SQLiteBackend(db_path, synchronous=config.synchronous, busy_timeout_ms=config.busy_timeout_ms),
            config=config,
        )
        await store.start()
        stores.append(store)
        return store

    yield factory
    for store in stores:
        await store.aclose()


class GatedBackend(SQLiteBackend):
    """A real SQLite backend whose writes wait at a gate the test opens: lets a test hold a
    flush "in flight" for as long as it likes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.loads = 0

    async def write_batch(self, deltas: Any) -> None:
        self.writing.set()
        # Bounded, so that a failing test ends instead of hanging its teardown.
        await asyncio.wait_for(self.gate.wait(), 30)
        return await super().write_batch(deltas)

    async def load_session(self, session_id: str) -> Any:
        self.loads += 1
        await asyncio.sleep(0.01)  # give concurrent callers time to pile up on one load
        return await super().load_session(session_id)


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """`await open_store()`: a started store; the same database on every call."""
    async with AsyncExitStack() as stack:
        schema = new_schema()
        if request.param == "postgres":
            await stack.enter_async_context(postgres_schema(schema))  # dropped at the end
        stores: list[WriteBehindStore] = []

        async def opener(**overrides: Any) -> WriteBehindStore:
            config = Config(db_path=tmp_path / "s.db", **{**QUIET, **overrides})
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
