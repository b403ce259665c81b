"""Writes, deletes and durable callers around a batch in flight, and a session another writer
keeps changing: whatever the order of events, every acknowledged write lands once, a delete
happens only if its caller was told it did, and a caller that gives up does not stop the
worker. Real SQLite files; a batch is held "in flight" by a thin subclass of the real
backend, failures are exactly what the backend raises, the other writer is a second real
connection."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    ClosedError,
    Config,
    ConflictError,
    NotFound,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindError,
    WriteBehindStore,
)
from writebehind.backends.sqlite import _storage_error
from writebehind.model import to_micros
from writebehind.recovery import read_recovery, recovery_path_for

from .conftest import QUIET, StoreFactory
from .reliability.helpers import assert_prefixes, on_disk


async def until_flushed(store: WriteBehindStore) -> None:
    """flush() until it succeeds: after a failure it fails fast until the backoff ends."""
    async with asyncio.timeout(30):
        while True:
            try:
                await store.flush()
                return
            except WriteBehindError:
                await asyncio.sleep(0.02)


class HeldBatch(SQLiteBackend):
    """A real backend whose writes wait at a gate the test opens; `fail` of them then raise
    exactly what the backend raises for an I/O error, and `hang` makes them never return
    (until cancelled: a disk that stopped answering)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.fail = 0
        self.hang = False

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        self.writing.set()
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.wait_for(self.gate.wait(), 30)  # bounded: a failing test ends
        if self.fail:
            self.fail -= 1
            raise _storage_error(self.path, "write_batch", sqlite3.OperationalError("disk I/O error"))
        return await super().write_batch(deltas, touches)

    async def in_flight(self) -> None:
        """Hold the next batch at the gate and return once it is there."""
        self.gate.clear()
        self.writing.clear()
        await asyncio.wait_for(self.writing.wait(), 10)


async def test_writes_made_while_their_batch_fails_land_with_the_failed_part(
    make_store: StoreFactory, db_path: Path
) -> None:
    backend = HeldBatch(db_path)
    store = await make_store(backend=backend, retry_max_delay_ms=20)
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="first")
    await store.flush()
    reply = await store.append_message("s", user_id=1, role="assistant", content="in the failing batch")
    backend.fail = 1
    flushing = asyncio.create_task(store.flush())
    await backend.in_flight()
    # Meanwhile the reply goes on and another message comes: the session is dirty again.
    await store.update_message("s", reply.id, user_id=1, content="edited while it was in flight")
    await store.append_message("s", user_id=1, role="user", content="written while it was in flight")
    backend.gate.set()
    with pytest.raises(StorageError, match="disk I/O error"):
        await flushing
    assert store.stats().dirty_messages == 2  # the failed part and the new part, together
    await until_flushed(store)
    assert on_disk(db_path) == {
        "s": {1: "first", 2: "edited while it was in flight", 3: "written while it was in flight"}
    }
    assert store.stats().dirty_sessions == 0
    assert_prefixes(db_path)


async def test_a_durable_caller_that_gives_up_does_not_stop_its_write_landing(
    make_store: StoreFactory, db_path: Path
) -> None:
    backend = HeldBatch(db_path)
    store = await make_store(backend=backend)
    await store.ensure_session("s", user_id=1)
    await store.flush()
    appending = asyncio.create_task(
        store.append_message("s", user_id=1, role="user", content="sent, then the client left", durable=True)
    )
    await backend.in_flight()
    appending.cancel()  # the HTTP request was cancelled while it waited for the disk
    with pytest.raises(asyncio.CancelledError):
        await appending
    backend.gate.set()
    await store.append_message("s", user_id=1, role="user", content="the next one", durable=True)
    assert on_disk(db_path) == {"s": {1: "sent, then the client left", 2: "the next one"}}


async def test_a_delete_whose_caller_gave_up_before_its_turn_is_not_performed(
    make_store: StoreFactory, db_path: Path
) -> None:
    backend = HeldBatch(db_path)
    store = await make_store(backend=backend)
    await store.ensure_session("victim", user_id=1)
    await store.append_message("victim", user_id=1, role="user", content="kept")
    await store.flush()
    await store.ensure_session("busy", user_id=1)
    flushing = asyncio.create_task(store.flush())
    await backend.in_flight()  # the delete would be served after this batch
    deleting = asyncio.create_task(store.delete_session("victim", user_id=1))
    await asyncio.sleep(0)  # queued behind the batch
    assert store.stats().queue_depth == 1
    deleting.cancel()  # its caller gave up: it was never told the session is gone
    backend.gate.set()
    await flushing
    with pytest.raises(asyncio.CancelledError):
        await deleting
    assert store.stats().queue_depth == 0
    assert [m.content for m in (await store.get_session("victim", user_id=1)).messages] == ["kept"]
    assert on_disk(db_path) == {"victim": {1: "kept"}}


async def test_calls_waiting_behind_a_hung_write_are_told_at_shutdown_and_nothing_is_lost(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    backend = HeldBatch(db_path)
    config = Config(db_path=db_path, shutdown_timeout_seconds=0.5, **QUIET)
    store = WriteBehindStore(SessionStore(), backend, config=config)
    await store.start()
    await store.ensure_session("a", user_id=1)
    await store.append_message("a", user_id=1, role="user", content="on disk")
    await store.flush()
    await store.ensure_session("b", user_id=1)
    await store.append_message("b", user_id=1, role="user", content="acknowledged")
    backend.hang = True
    backend.writing.clear()
    first = asyncio.create_task(store.flush())  # its cycle hangs in the write
    await asyncio.wait_for(backend.writing.wait(), 10)
    second = asyncio.create_task(
        store.append_message("a", user_id=1, role="user", content="waiting for the next cycle", durable=True)
    )
    deleting = asyncio.create_task(store.delete_session("a", user_id=1))
    await asyncio.sleep(0)
    assert store.stats().durable_waiters == 1 and store.stats().queue_depth == 1

    await asyncio.wait_for(store.aclose(), 10)  # bounded, the disk hangs for good
    for task in (first, second, deleting):
        with pytest.raises(ClosedError):
            await task
    assert any("did not stop within 0.5s" in r.getMessage() for r in caplog.records)
    saved = {r.id: [m.content for m in r.messages] for r in read_recovery(recovery_path_for(db_path))}
    assert saved == {"a": ["on disk", "waiting for the next cycle"], "b": ["acknowledged"]}
    # The delete was refused, not done: the next start has both sessions, whole.
    again = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=config)
    async with again:
        for sid, contents in saved.items():
            assert [m.content for m in (await again.get_session(sid, user_id=1)).messages] == contents
    assert on_disk(db_path) == {
        "a": {1: "on disk", 2: "waiting for the next cycle"},
        "b": {1: "acknowledged"},
    }


async def test_aclose_after_the_worker_died_still_writes_everything(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="writebehind")
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    worker = next(t for t in asyncio.all_tasks() if t.get_name() == "writebehind-flush-worker")
    worker.cancel()
    await asyncio.wait([worker])
    assert any("flush worker was cancelled" in r.getMessage() for r in caplog.records)
    await store.aclose()  # no request came to restart it: the final flush does the work
    assert on_disk(db_path) == {"s": {1: "acknowledged"}}
    assert not recovery_path_for(db_path).exists()


class Rival(SQLiteBackend):
    """A real backend beside which another writer (a second connection: a script, an older
    app) appends a message to every session of a batch just before the batch is written."""

    active = False

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        if self.active:
            with sqlite3.connect(self.path, isolation_level=None) as other:
                for delta in deltas:
                    sid = delta.record.id
                    (last,) = other.execute(
                        "SELECT coalesce(max(seq), 0) FROM messages WHERE session_id = ?", (sid,)
                    ).fetchone()
                    now = to_micros(datetime.now(UTC))
                    other.execute(
                        "INSERT INTO messages VALUES (?, ?, ?, 'assistant', ?, ?, ?, NULL)",
                        (sid, last + 1, f"rival-{last + 1}", f"rival {last + 1}", now, now),
                    )
                    other.execute(
                        "UPDATE sessions SET version = version + 1, message_count = ? WHERE id = ?",
                        (last + 1, sid),
                    )
            other.close()
        return await super().write_batch(deltas, touches)


async def test_a_session_another_writer_keeps_changing_is_a_conflict_error_and_lands_once_it_stops(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    backend = Rival(db_path)
    store = await make_store(backend=backend)
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="mine, on disk")
    await store.flush()
    await store.append_message("s", user_id=1, role="user", content="mine, contested", message_id="m-mine")
    backend.active = True
    with pytest.raises(ConflictError) as caught:
        await store.flush()
    assert caught.value.session_ids == ["s"] and caught.value.session_id == "s"
    assert "kept being changed by another writer; not written yet" in str(caught.value)
    # Nothing dropped: in memory, this writer's message now follows the other's three.
    record = await store.get_session("s", user_id=1)
    assert [(m.seq, m.content) for m in record.messages] == [
        (1, "mine, on disk"),
        (2, "rival 2"),
        (3, "rival 3"),
        (4, "rival 4"),
        (5, "mine, contested"),
    ]
    assert store.stats().conflicts == 3
    assert sum("was also written by another writer" in r.getMessage() for r in caplog.records) == 3

    backend.active = False
    await store.flush()
    assert on_disk(db_path) == {"s": {m.seq: m.content for m in record.messages}}
    assert_prefixes(db_path)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_failed_access_time_write_is_kept_and_lands_when_the_disk_is_back(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    clock = Clock()
    config = Config(db_path=db_path, **QUIET)
    store = WriteBehindStore(SessionStore(clock=clock), SQLiteBackend(db_path), config=config)

    def stored() -> tuple[int, int]:
        with sqlite3.connect(db_path) as conn:
            return conn.execute("SELECT version, last_access_at FROM sessions").fetchone()  # type: ignore[no-any-return]

    async with store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="user", content="hi")
        await store.flush()
        before = stored()
        clock.now += timedelta(hours=2)
        await store.get_session("s", user_id=1)  # a read two hours later: its time is to be kept
        assert isinstance(store.backend, SQLiteBackend)
        await store.backend.writer.execute("PRAGMA query_only = ON")  # a read-only disk
        await store.flush()  # a read's time is never a durable caller's failure...
        assert any(
            "persisting 1 sessions' last access failed, retrying later" in r.getMessage()
            and "readonly" in r.getMessage()
            for r in caplog.records
        )
        assert stored() == before  # ...and it is not lost either: kept for the next flush
        await store.backend.writer.execute("PRAGMA query_only = OFF")
        await store.flush()
        assert stored() == (1, to_micros(clock.now))  # a read is not a write: still version 1


async def test_a_reads_time_lands_even_if_the_session_leaves_memory_while_it_is_written(
    db_path: Path,
) -> None:
    clock = Clock()
    backend = HeldBatch(db_path)
    config = Config(db_path=db_path, cache_size=2, **QUIET)
    store = WriteBehindStore(SessionStore(2, clock=clock), backend, config=config)
    async with store:
        await store.ensure_session("s", user_id=1)
        await store.flush()
        clock.now += timedelta(hours=2)
        await store.get_session("s", user_id=1)  # its new access time is to be written
        flushing = asyncio.create_task(store.flush())
        await backend.in_flight()  # the access time is being written
        for sid in ("a", "b"):  # meanwhile two new sessions push the clean "s" out of memory
            await store.ensure_session(sid, user_id=1)
        assert "s" not in store.hot.tier
        backend.gate.set()
        await flushing
        await store.flush()
        with sqlite3.connect(db_path) as conn:
            rows = dict(conn.execute("SELECT id, last_access_at FROM sessions").fetchall())
        assert rows["s"] == to_micros(clock.now)
        assert (await store.get_session("s", user_id=1)).last_access_at == clock.now


class TouchBug(SQLiteBackend):
    """A real backend with a bug in one path only: while `bug` is set, writing read times
    (a batch of touches) raises something that is not a StorageError."""

    bug = False

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        if self.bug and touches:
            raise TypeError("a bug in the driver's handling of timestamps")
        return await super().write_batch(deltas, touches)


async def test_a_bug_in_writing_read_times_neither_fails_a_durable_write_nor_stops_the_worker(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="writebehind")
    clock = Clock()
    backend = TouchBug(db_path)
    store = WriteBehindStore(SessionStore(clock=clock), backend, config=Config(db_path=db_path, **QUIET))
    async with store:
        for sid in ("read", "written"):
            await store.ensure_session(sid, user_id=1)
        await store.flush()
        clock.now += timedelta(hours=2)
        await store.get_session("read", user_id=1)  # its read time is written with the next flush
        backend.bug = True
        await store.append_message("written", user_id=1, role="user", content="durable", durable=True)
        assert on_disk(db_path) == {"written": {1: "durable"}}
        assert not any("crashed" in r.getMessage() for r in caplog.records)


async def test_deleting_a_dirty_session_the_lru_had_to_park_removes_it_for_good(
    db_path: Path,
) -> None:
    config = Config(db_path=db_path, cache_size=2, **QUIET)
    store = WriteBehindStore(SessionStore(2), SQLiteBackend(db_path), config=config)
    async with store:
        for sid in ("parked", "b", "c"):  # three dirty sessions in an LRU of two
            await store.ensure_session(sid, user_id=1)
            await store.append_message(sid, user_id=1, role="user", content=f"in {sid}")
        assert store.stats().parked == 1  # pushed out by the LRU, kept because it is not on disk
        await store.delete_session("parked", user_id=1)
        assert store.stats().parked == 0 and store.stats().hot_sessions == 2
        await store.flush()
        with pytest.raises(NotFound):
            await store.get_session("parked", user_id=1)
    assert on_disk(db_path) == {"b": {1: "in b"}, "c": {1: "in c"}}
