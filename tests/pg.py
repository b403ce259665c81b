"""PostgreSQL for the tests: the real server on 127.0.0.1:5432 (database `test`), each test
in a schema of its own that is dropped afterwards.

In CI (CI=true) a missing server fails the run: those tests must run there. Elsewhere it
is a skip that says why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from writebehind import Config, SessionStore, StorageError, WriteBehindStore
from writebehind.backends.postgres import PostgresBackend

DSN = os.environ.get("WRITEBEHIND_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def new_schema() -> str:
    return f"wb_test_{uuid.uuid4().hex[:16]}"


@asynccontextmanager
async def postgres_schema(schema: str | None = None) -> AsyncIterator[PostgresBackend]:
    backend = PostgresBackend(DSN, schema=schema or new_schema(), pool_size=4)
    try:
        await backend.open()
    except StorageError as exc:
        reason = f"PostgreSQL is not reachable at {DSN} ({exc}); start it, or set WRITEBEHIND_TEST_PG_DSN"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {reason}")
        pytest.skip(reason)
    try:
        yield backend
    finally:
        await backend.drop_schema()
        await backend.close()


@asynccontextmanager
async def store_on(schema: str) -> AsyncIterator[WriteBehindStore]:
    """A started write-behind store on `schema`, one instance among others that share it. No
    interval flush: what reaches the database gets there by a handoff, a durable write, an
    explicit flush or the shutdown."""
    config = Config(db_url=DSN, db_schema=schema, flush_interval_ms=3_600_000)
    store = WriteBehindStore(SessionStore(), PostgresBackend(DSN, schema=schema, pool_size=4), config=config)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()
