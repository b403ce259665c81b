"""Retention over more sessions than one transaction takes, of sessions only on disk: every
idle one goes, in transactions of at most a chunk, and the count is exact. Real SQLite file;
time is a clock handed to the hot tier and the `now` handed to `purge_expired`."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from writebehind import Config, SessionStore, SQLiteBackend, WriteBehindStore

from .conftest import QUIET
from .reliability.helpers import on_disk

LONG_AGO = datetime(2030, 1, 1, tzinfo=UTC)


async def test_retention_purges_more_than_a_chunk_of_sessions_that_are_only_on_disk(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(db_path=db_path, **QUIET)
    writer = WriteBehindStore(SessionStore(clock=lambda: LONG_AGO), SQLiteBackend(db_path), config=config)
    async with writer:
        for i in range(1201):  # two full chunks of 500 and a partial one
            await writer.ensure_session(f"s{i:04d}", user_id=i % 7)
            await writer.append_message(f"s{i:04d}", user_id=i % 7, role="user", content=f"old {i}")
    caplog.set_level(logging.INFO, logger="writebehind")
    store = WriteBehindStore(SessionStore(10), SQLiteBackend(db_path), config=config)
    async with store:
        assert store.stats().hot_sessions == 0  # none of them is in memory
        assert await store.purge_expired(now=datetime(2031, 1, 1, tzinfo=UTC)) == 1201
        assert store.stats().sessions_purged == 1201
        assert await store.list_sessions(0) == []
    assert on_disk(db_path) == {}
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    assert "retention: purged 1201 sessions idle since before 2030-10-03T00:00:00+00:00" in [
        r.getMessage() for r in caplog.records
    ]
