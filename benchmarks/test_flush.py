"""Flush throughput: the worker's flush next to raw sqlite3 `executemany` of the same rows.

Each round writes SESSIONS x PER_SESSION new messages of ~500 bytes. Both sides get
exactly the same rows (same ids, same timestamps) into the same schema with the same
pragmas (WAL, synchronous=NORMAL, secure_delete). The raw baseline gets them
ready-made as tuples, in one transaction; the store's time includes everything a
flush does: taking what is dirty, building rows, the hops to aiosqlite's thread,
its transactions.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, WriteBehindStore
from writebehind.backends.migrations import SQLITE as MIGRATIONS
from writebehind.model import to_micros

SESSIONS = 100
PER_SESSION = 50
MESSAGES = SESSIONS * PER_SESSION
ROUNDS = 40
_round = itertools.count()


@dataclass(frozen=True)
class Round:
    sessions: list[tuple[str, int]]
    messages: list[tuple[str, int, str, str]]  # session id, seq, message id, content


def new_round() -> Round:
    r = next(_round)
    sessions = [(f"r{r}-s{s}", s % 10) for s in range(SESSIONS)]
    messages = [
        (sid, seq, os.urandom(16).hex(), f"round {r} message {seq} " + "y" * 480)
        for sid, _ in sessions
        for seq in range(1, PER_SESSION + 1)
    ]
    return Round(sessions, messages)


def test_flush_writebehind(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    benchmark.group = f"flush {MESSAGES} messages"
    # The rate cap is lifted: this measures the write path, not the configured throttle.
    config = Config(
        db_path=tmp_path / "wb.db",
        cache_size=1_000_000,
        max_dirty=1_000_000,
        flush_batch=SESSIONS,
        max_flushes_per_second=10_000,
    )
    store = WriteBehindStore.from_config(config)
    loop.run_until_complete(store.start())

    async def fill(data: Round) -> None:
        for sid, user in data.sessions:
            await store.ensure_session(sid, user_id=user)
        users = dict(data.sessions)
        for sid, _seq, mid, content in data.messages:
            await store.append_message(sid, user_id=users[sid], role="user", content=content, message_id=mid)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        loop.run_until_complete(fill(new_round()))
        return (), {}

    benchmark.pedantic(
        lambda: loop.run_until_complete(store.flush()), setup=setup, rounds=ROUNDS, warmup_rounds=1
    )
    stats = store.stats()
    loop.run_until_complete(store.aclose())
    assert stats.dirty_sessions == 0 and stats.messages_flushed == MESSAGES * (ROUNDS + 1)
    benchmark.extra_info["messages"] = MESSAGES
    benchmark.extra_info["transactions_per_round"] = stats.batches_flushed / (ROUNDS + 1)


def test_flush_raw_sqlite3(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    benchmark.group = f"flush {MESSAGES} messages"
    conn = sqlite3.connect(tmp_path / "raw.db", isolation_level=None)
    for pragma in ("journal_mode = WAL", "synchronous = NORMAL", "foreign_keys = ON", "secure_delete = ON"):
        conn.execute(f"PRAGMA {pragma}")
    conn.executescript(MIGRATIONS[0])

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        data = new_round()
        now = to_micros(datetime.now().astimezone())
        sessions = [
            (sid, user, now, now, now, "active", None, None, None, PER_SESSION) for sid, user in data.sessions
        ]
        messages = [
            (sid, seq, mid, "user", content, now, now, None) for sid, seq, mid, content in data.messages
        ]
        return (sessions, messages), {}

    def write(sessions: list[tuple[Any, ...]], messages: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status, title,"
            " client_ip, user_agent, message_count) VALUES (?,?,?,?,?,?,?,?,?,?)",
            sessions,
        )
        conn.executemany(
            "INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)"
            " VALUES (?,?,?,?,?,?,?,?)",
            messages,
        )
        conn.execute("COMMIT")

    benchmark.pedantic(write, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    conn.close()
    benchmark.extra_info["messages"] = MESSAGES
