"""Faults at the end of a transaction and in the flush worker itself.

SQLite refuses a COMMIT (and a ROLLBACK) when the connection's authorizer denies it: a
real SQLite condition, made on the store's own writing connection. A backend with a bug
(an exception that is not a StorageError) and a worker cancelled from outside in the
middle of a flush are the others. For each: the caller waiting for the disk is told,
nothing acknowledged is lost or half written, and once the fault is gone everything
lands, once.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    Config,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindError,
    WriteBehindStore,
)

from ..conftest import QUIET, StoreFactory
from .helpers import Model, assert_prefixes, integrity, on_disk


async def until_flushed(store: WriteBehindStore) -> None:
    """flush() until it succeeds: after a failure it fails fast until the backoff ends."""
    async with asyncio.timeout(30):
        while True:
            try:
                await store.flush()
                return
            except WriteBehindError:
                await asyncio.sleep(0.02)


def deny(*operations: str) -> Any:
    """An authorizer that denies these transaction statements ("COMMIT", "ROLLBACK")."""

    def authorizer(action: int, arg1: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_TRANSACTION and arg1 in operations:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    return authorizer


@pytest.mark.parametrize("refused", [("COMMIT",), ("COMMIT", "ROLLBACK")], ids=["commit", "commit+rollback"])
async def test_a_refused_commit_writes_nothing_and_the_batch_lands_later(
    make_store: StoreFactory, db_path: Path, refused: tuple[str, ...]
) -> None:
    store = await make_store(retry_max_delay_ms=20)
    model = Model()
    for i in range(3):
        await store.ensure_session(f"s{i}", user_id=i)
        await model.append(store, f"s{i}", i, f"before {i}")
    await store.flush()
    before = on_disk(db_path)

    assert isinstance(store.backend, SQLiteBackend)
    conn = store.backend.writer
    await conn.set_authorizer(deny(*refused))
    for i in range(3):
        await model.append(store, f"s{i}", i, f"refused at commit {i}")
    await store.ensure_session("new", user_id=7)
    await model.append(store, "new", 7, "a new session, refused at commit")
    with pytest.raises(StorageError, match="not authorized"):
        await store.flush()
    assert on_disk(db_path) == before  # all of the batch or none of it: none
    assert (await store.get_session("new", user_id=7)).messages[0].content.startswith("a new session")
    assert store.stats().dirty_sessions == 4

    await conn.set_authorizer(None)
    await until_flushed(store)
    assert store.stats().dirty_sessions == 0
    await store.aclose()
    assert on_disk(db_path) == model.sessions  # everything, once
    assert integrity(db_path) == "ok"
    assert_prefixes(db_path)


class BuggyBackend(SQLiteBackend):
    """A real SQLite backend with a bug: while `bug` is set, every write raises something
    that is not a StorageError."""

    bug = False

    async def write_batch(self, deltas: Any, *args: Any) -> Any:
        if self.bug:
            raise RuntimeError("a bug in the backend")
        return await super().write_batch(deltas, *args)


async def test_a_backend_bug_is_reported_and_loses_nothing(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="writebehind")
    backend = BuggyBackend(db_path)
    config = Config(db_path=db_path, retry_max_delay_ms=20, **QUIET)
    store = WriteBehindStore(SessionStore(), backend, config=config)
    model = Model()
    async with store:
        await store.ensure_session("old", user_id=1)
        await model.append(store, "old", 1, "on disk before the bug")
        await store.flush()
        await store.get_session("old", user_id=1)  # a read: its access time is written too
        await store.ensure_session("new", user_id=2)
        await model.append(store, "new", 2, "written while the backend is broken")

        backend.bug = True
        with pytest.raises(WriteBehindError):
            await store.flush()
        assert (await store.get_session("new", user_id=2)).messages[0].content.startswith("written while")
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("RuntimeError" in m for m in logged), logged

        backend.bug = False
        await model.append(store, "new", 2, "after the fix")
        await until_flushed(store)
    assert on_disk(db_path) == model.sessions
    assert integrity(db_path) == "ok"


class HeldWrites(SQLiteBackend):
    """A real SQLite backend whose writes wait at a gate the test opens."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()

    async def write_batch(self, deltas: Any, *args: Any) -> Any:
        self.writing.set()
        await asyncio.wait_for(self.gate.wait(), 30)  # bounded: a failing test ends
        return await super().write_batch(deltas, *args)


async def test_a_worker_cancelled_mid_flush_fails_the_waiter_and_keeps_the_batch(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="writebehind")
    backend = HeldWrites(db_path)
    store = WriteBehindStore(SessionStore(), backend, config=Config(db_path=db_path, **QUIET))
    model = Model()
    async with store:
        await store.ensure_session("s", user_id=1)
        await model.append(store, "s", 1, "in flight when the worker is cancelled")
        backend.gate.clear()
        flushing = asyncio.create_task(store.flush())
        await backend.writing.wait()
        worker = next(t for t in asyncio.all_tasks() if t.get_name() == "writebehind-flush-worker")
        worker.cancel()
        with pytest.raises(WriteBehindError):  # told at once, not left waiting for good
            await asyncio.wait_for(flushing, 10)
        assert any(r.levelno >= logging.ERROR and "cancel" in r.getMessage() for r in caplog.records)

        backend.gate.set()
        await model.append(store, "s", 1, "after the cancel")  # the next request restarts it
        await store.flush()
        assert on_disk(db_path) == model.sessions
    assert on_disk(db_path) == model.sessions
    assert_prefixes(db_path)
