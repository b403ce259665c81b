"""Durable writes: `append_message(durable=True)` next to aiosqlite write-through.

A durable write returns once it is on disk, so its floor is a commit. The baseline is
what an app would write without this store: aiosqlite, the same schema and pragmas
(WAL, synchronous=NORMAL, secure_delete), and per message an INSERT and a commit on one
connection (concurrent callers take turns on it under a lock, as they must: an aiosqlite
connection is one transaction at a time). The store runs with its default configuration
(the background flush throttle included: a durable caller never waits for it).

- one caller: CALLS durable appends back to back, each timed (p99 over every round);
- 100 concurrent callers, each appending the messages of its own session one after the
  other, durably: sessions of 20 and of 200 messages. Concurrent durable callers share
  commits (group commit), so the figure is messages a second, and the p99 of a call.

Interleaved round by round with the baseline (paired.py).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, WriteBehindStore
from writebehind.backends.migrations import SQLITE as MIGRATIONS
from writebehind.model import new_id

from .paired import run_paired

CALLS = 200
CONTENT = "d" * 500
_ids = itertools.count()

_INSERT = (
    "INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


class WriteThrough:
    """The baseline: aiosqlite, one INSERT and one commit per message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path) -> None:
        self.loop = loop
        self.conn = loop.run_until_complete(aiosqlite.connect(path))
        self.lock = asyncio.Lock()

        async def setup() -> None:
            for pragma in (
                "journal_mode = WAL",
                "synchronous = NORMAL",
                "foreign_keys = ON",
                "secure_delete = ON",
            ):
                await self.conn.execute(f"PRAGMA {pragma}")
            await self.conn.executescript(MIGRATIONS[0])

        loop.run_until_complete(setup())

    def session(self) -> str:
        sid = f"w{next(_ids)}"

        async def create() -> None:
            await self.conn.execute(
                "INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status)"
                " VALUES (?, 1, 0, 0, 0, 'active')",
                (sid,),
            )
            await self.conn.commit()

        self.loop.run_until_complete(create())
        return sid

    async def write(self, sid: str, seq: int) -> None:
        async with self.lock:
            await self.conn.execute(_INSERT, (sid, seq, new_id(), "user", CONTENT, seq, seq, None))
            await self.conn.commit()

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())


@pytest.fixture
def durable_store(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Any:
    store = WriteBehindStore.from_config(Config(db_path=tmp_path / "durable.db"))
    loop.run_until_complete(store.start())
    yield store
    loop.run_until_complete(store.aclose())


def _p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100)[98]


@pytest.mark.benchmark(group=f"append_message(durable=True), one caller, x{CALLS}")
def test_durable_one_caller(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
    durable_store: WriteBehindStore,
) -> None:
    raw = WriteThrough(loop, tmp_path / "raw.db")
    store = durable_store
    latencies: list[float] = []

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        sid = raw.session()

        async def body() -> None:
            for seq in range(1, CALLS + 1):
                await raw.write(sid, seq)

        return body

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        sid = loop.run_until_complete(store.ensure_session(f"d{next(_ids)}", user_id=1, durable=True)).id

        async def body() -> None:
            clock = time.perf_counter
            for _ in range(CALLS):
                started = clock()
                await store.append_message(sid, user_id=1, role="user", content=CONTENT, durable=True)
                latencies.append(clock() - started)

        return body

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="append_message(durable=True)",
            baseline_name="aiosqlite INSERT + commit",
            baseline=baseline,
            contender=contender,
            rounds=40,
            per_round=CALLS,
            unit="call",
            target="<= 1.20x, p99 <= 2 ms",
        )
    finally:
        raw.close()
    benchmark.extra_info["p99_ms"] = _p99(latencies) * 1000
    assert store.stats().dirty_sessions == 0


@pytest.mark.parametrize("per_session", [20, 200])
def test_durable_concurrent(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
    durable_store: WriteBehindStore,
    per_session: int,
) -> None:
    callers = 100
    benchmark.group = (
        f"append_message(durable=True), {callers} concurrent callers, {per_session}-message sessions"
    )
    raw = WriteThrough(loop, tmp_path / "raw.db")
    store = durable_store
    latencies: list[float] = []

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        sids = [raw.session() for _ in range(callers)]

        async def caller(sid: str) -> None:
            for seq in range(1, per_session + 1):
                await raw.write(sid, seq)

        async def body() -> None:
            await asyncio.gather(*(caller(sid) for sid in sids))

        return body

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        async def create() -> list[str]:
            sids = [(await store.ensure_session(f"c{next(_ids)}", user_id=1)).id for _ in range(callers)]
            await store.flush()
            return sids

        sids = loop.run_until_complete(create())

        async def caller(sid: str) -> None:
            clock = time.perf_counter
            for _ in range(per_session):
                started = clock()
                await store.append_message(sid, user_id=1, role="user", content=CONTENT, durable=True)
                latencies.append(clock() - started)

        async def body() -> None:
            await asyncio.gather(*(caller(sid) for sid in sids))

        return body

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="append_message(durable=True)",
            baseline_name="aiosqlite INSERT + commit",
            baseline=baseline,
            contender=contender,
            rounds=10 if per_session == 20 else 4,
            per_round=callers * per_session,
            unit="message",
            target=">= 30,000 messages/s, p99 <= 20 ms",
        )
    finally:
        raw.close()
    benchmark.extra_info["p99_ms"] = _p99(latencies) * 1000
    assert store.stats().dirty_sessions == 0
