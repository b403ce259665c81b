"""Two app instances creating the same session at the same moment, on the real PostgreSQL.

Neither sees the other's row when it checks (the other has not committed yet), so both
try to insert it. Exactly one wins; the other is told, and writes nothing of that
session: never a silent overwrite, never the two mixed. The moment is made with a real
lock: a third connection holds the messages table, so the first insert waits inside
its transaction while the second starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from writebehind import SessionDelta
from writebehind.backends.postgres import PostgresBackend

from ..pg import DSN, postgres_schema
from ..test_conformance import full, message, record


@pytest.fixture
async def two_instances() -> AsyncIterator[tuple[PostgresBackend, PostgresBackend]]:
    async with postgres_schema() as first:
        second = PostgresBackend(DSN, schema=first.schema, pool_size=2)
        await second.open()
        try:
            yield first, second
        finally:
            await second.close()


async def waiting_on_locks(monitor: asyncpg.Connection, schema: str, count: int) -> None:
    """Until `count` statements on this schema wait for a lock (others may share the server)."""
    async with asyncio.timeout(30):
        while True:
            waiting = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
                f"%{schema}.%",
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.01)


async def test_two_instances_inserting_one_new_session_end_with_one_winner(
    two_instances: tuple[PostgresBackend, PostgresBackend],
) -> None:
    a, b = two_instances
    s = a.schema
    theirs = full(record("s", 1, 2))
    mine = SessionDelta(record("s", 1), (message(1, "mine, never to be written"),), 1)
    holder = await asyncpg.connect(DSN)
    monitor = await asyncpg.connect(DSN)
    try:
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {s}.messages IN EXCLUSIVE MODE")
            first = asyncio.create_task(b.write_batch([theirs]))  # its row inserted, not committed
            await waiting_on_locks(monitor, s, 1)
            second = asyncio.create_task(a.write_batch([mine]))  # saw no row; its insert waits
            await waiting_on_locks(monitor, s, 2)
        won, lost = await asyncio.wait_for(asyncio.gather(first, second), 30)
    finally:
        await holder.close()
        await monitor.close()
    # Which one commits first depends on the path: the multi-statement write inserted its
    # row before waiting, the one-statement write waits for the table lock before starting.
    if "s" in lost.versions:
        won, lost = lost, won
    assert won.versions == {"s": 1} and not won.conflicts
    assert "s" not in lost.versions and "s" in lost.conflicts
    loaded = await a.load_session("s")
    assert loaded is not None
    contents = [m.content for m in loaded.messages]
    assert contents in (["content 1", "content 2"], ["mine, never to be written"])  # the winner's, alone
    # and the loser can go on from the winner's row like any instance that lost a race
    n = len(loaded.messages) + 1
    again = SessionDelta(replace(loaded, messages=()), (message(n, "mine, after reloading"),), n)
    after = await a.write_batch([again])
    assert after.versions == {"s": 2}
