"""Flush throughput: the worker's flush next to raw sqlite3 `executemany` of the same rows.

Each round writes SESSIONS x PER_SESSION new messages of ~500 bytes. Both sides get
exactly the same rows (same ids, same timestamps) into the same schema with the same
pragmas (WAL, synchronous=NORMAL, secure_delete), each into its own file. The raw
baseline gets them ready-made as tuples, in one transaction; the store's time
includes everything a flush does: taking what is dirty, building rows, the hops to
aiosqlite's thread, its transaction.

The two run interleaved, round by round, on the same data (see paired.py). Each round
starts from a checkpointed WAL and a collected heap, on both sides alike,
so that SQLite's auto-checkpoint (about 20 ms, every other round otherwise) does not
land on one side more than the other.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, SQLiteBackend, WriteBehindStore
from writebehind.backends.migrations import SQLITE as MIGRATIONS
from writebehind.model import to_micros

from .paired import run_paired

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


async def fill(store: WriteBehindStore, data: Round) -> None:
    """Put a round into the store, through its public API, as the app would."""
    for sid, user in data.sessions:
        await store.ensure_session(sid, user_id=user)
    users = dict(data.sessions)
    for sid, _seq, mid, content in data.messages:
        await store.append_message(sid, user_id=users[sid], role="user", content=content, message_id=mid)


class RawWriter:
    """The baseline: plain sqlite3, the same schema and pragmas, rows ready-made."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode = WAL",
            "synchronous = NORMAL",
            "foreign_keys = ON",
            "secure_delete = ON",
        ):
            self.conn.execute(f"PRAGMA {pragma}")
        self.conn.executescript(MIGRATIONS[0])

    def prepare(self, data: Round) -> Callable[[], None]:
        now = to_micros(datetime.now(UTC))
        sessions = [
            (sid, user, now, now, now, "active", None, None, None, PER_SESSION) for sid, user in data.sessions
        ]
        messages = [
            (sid, seq, mid, "user", content, now, now, None) for sid, seq, mid, content in data.messages
        ]
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        def write() -> None:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status, title,"
                " client_ip, user_agent, message_count) VALUES (?,?,?,?,?,?,?,?,?,?)",
                sessions,
            )
            self.conn.executemany(
                "INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at, metadata)"
                " VALUES (?,?,?,?,?,?,?,?)",
                messages,
            )
            self.conn.execute("COMMIT")

        return write


def test_flush(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    benchmark.group = f"flush {MESSAGES} messages"
    # No rate cap, a long interval and a batch larger than the round: the timed flush is
    # the whole round in one transaction, and nothing flushes part of it during setup.
    config = Config(
        db_path=tmp_path / "wb.db",
        flush_interval_ms=3_600_000,
        flush_batch=10 * SESSIONS,
        cache_size=1_000_000,
        max_dirty=1_000_000,
        max_flushes_per_second=10_000,
    )
    store = WriteBehindStore.from_config(config)
    loop.run_until_complete(store.start())
    raw = RawWriter(tmp_path / "raw.db")
    current: list[Round] = []

    def baseline() -> Callable[[], None]:
        current[:] = [new_round()]
        return raw.prepare(current[0])

    def contender() -> Callable[[], Coroutine[Any, Any, None]]:
        loop.run_until_complete(fill(store, current[0]))
        backend = store.backend
        assert isinstance(backend, SQLiteBackend)
        loop.run_until_complete(backend.writer.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)"))
        return store.flush

    run_paired(
        benchmark,
        loop=loop,
        name="WriteBehindStore.flush()",
        baseline_name="raw sqlite3 executemany",
        baseline=baseline,
        contender=contender,
        rounds=ROUNDS,
        per_round=MESSAGES,
        unit="message",
        target="throughput >= 90% of raw",
    )
    stats = store.stats()
    loop.run_until_complete(store.aclose())
    raw.conn.close()
    assert stats.dirty_sessions == 0 and stats.messages_flushed == MESSAGES * (ROUNDS + 2)
    assert stats.batches_flushed == ROUNDS + 2
