"""Cold load: a 2,000-message session read through the store when it is not in memory,
next to the plain row fetch of the same messages.

Two sessions of MESSAGES messages (~500 bytes each, with metadata on every tenth) are on
disk. The store's hot tier holds one session, so reading the other is a miss: the
store loads it (the session row and its messages in one read transaction, in the
reader's thread), puts it in the hot tier, and answers. The contender times
`get_messages` of the session not in memory (everything a caller waits for). The
baseline is what an app with no store would run: aiosqlite's `execute_fetchall` of
`SELECT ... FROM messages WHERE session_id = ? ORDER BY seq` on its own connection to
the same file, the same thread hop included. Interleaved round by round (paired.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiosqlite
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, WriteBehindStore

from .paired import run_paired

MESSAGES = 2000
ROUNDS = 40
USER = 5
_SELECT = (
    "SELECT seq, id, role, content, created_at, updated_at, metadata FROM messages "
    "WHERE session_id = ? ORDER BY seq"
)


async def _fill(store: WriteBehindStore, sid: str) -> None:
    await store.ensure_session(sid, user_id=USER)
    for i in range(MESSAGES):
        await store.append_message(
            sid,
            user_id=USER,
            role="user" if i % 2 else "assistant",
            content=f"message {i} " + "y" * 480,
            metadata={"n": i} if i % 10 == 0 else None,
        )
    await store.flush()


def test_cold_load(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    benchmark.group = f"cold load of a {MESSAGES:,}-message session"
    path = tmp_path / "cold.db"
    # One session in memory at a time: reading the other one is always a cold load.
    config = Config(db_path=path, cache_size=1, max_flushes_per_second=10_000)
    store = WriteBehindStore.from_config(config)
    loop.run_until_complete(store.start())
    sessions = ["a", "b"]
    for sid in sessions:
        loop.run_until_complete(_fill(store, sid))
    raw = loop.run_until_complete(aiosqlite.connect(path))
    current = [""]

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        # Each round reads the session that is not in memory, on both sides.
        current[0] = sid = next(s for s in sessions if s not in store.hot.tier)

        async def fetch() -> None:
            rows = await raw.execute_fetchall(_SELECT, (sid,))
            assert len(rows) == MESSAGES

        return fetch

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        sid = current[0]

        async def load() -> None:
            messages = await store.get_messages(sid, user_id=USER)
            assert len(messages) == MESSAGES

        return load

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="WriteBehindStore.get_messages, cold",
            baseline_name="aiosqlite execute_fetchall",
            baseline=baseline,
            contender=contender,
            rounds=ROUNDS,
            per_round=1,
            unit="load",
            target="<= 1.50x",
        )
        loads = store.stats().loads
    finally:
        loop.run_until_complete(raw.close())
        loop.run_until_complete(store.aclose())
    assert loads >= ROUNDS  # every timed read was a load from disk
