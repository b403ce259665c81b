"""Faults real deployments meet, made with real SQLite conditions wherever SQLite can make
them (a failing wrapper only for an I/O error). For each: requests keep being served from
memory, dirty data stays in memory, the worker backs off and retries, stats() and the log
say what is wrong (never the content), and once the fault is cleared everything lands,
once: nothing lost, nothing duplicated."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    BackPressureError,
    Config,
    RecordError,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindStore,
)
from writebehind.backends.base import SessionDelta
from writebehind.backends.sqlite import _storage_error
from writebehind.model import SessionRecord, utcnow

from ..conftest import StoreFactory
from .helpers import Model, assert_prefixes, integrity, on_disk

SECRET = "SECRET-CONTENT-MARKER"

Fault = Callable[[WriteBehindStore, Path], Awaitable[Callable[[], Awaitable[None]]]]


def writer(store: WriteBehindStore) -> Any:
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    return backend.writer


async def disk_full(store: WriteBehindStore, db_path: Path) -> Callable[[], Awaitable[None]]:
    conn = writer(store)
    async with conn.execute("PRAGMA page_count") as cur:
        (pages,) = await cur.fetchone()  # type: ignore[misc]
    await conn.execute(f"PRAGMA max_page_count = {pages}")

    async def clear() -> None:
        await conn.execute("PRAGMA max_page_count = 1073741823")

    return clear


async def read_only(store: WriteBehindStore, db_path: Path) -> Callable[[], Awaitable[None]]:
    conn = writer(store)
    await conn.execute("PRAGMA query_only = ON")

    async def clear() -> None:
        await conn.execute("PRAGMA query_only = OFF")

    return clear


async def locked(store: WriteBehindStore, db_path: Path) -> Callable[[], Awaitable[None]]:
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")

    async def clear() -> None:
        other.execute("ROLLBACK")
        other.close()

    return clear


FAULTS: dict[str, tuple[Fault, str]] = {
    "disk full": (disk_full, "full"),
    "read-only database": (read_only, "readonly"),
    "locked database": (locked, "locked"),
}


async def served_from_memory(store: WriteBehindStore, model: Model) -> None:
    for i in range(3):
        await model.append(store, f"s{i}", i, f"{SECRET} during the fault {i} " + "z" * 3000)
        record = await store.get_session(f"s{i}", user_id=i)
        assert record.messages[-1].content.startswith(f"{SECRET} during the fault {i}")


async def lands_once_cleared(store: WriteBehindStore) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                await store.flush()
                return
            except StorageError:
                await asyncio.sleep(0.02)  # backing off: flush() fails fast until the retry


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_keeps_data_retries_and_lands_when_cleared(
    fault: str, make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inject, words = FAULTS[fault]
    caplog.set_level(logging.INFO, logger="writebehind")
    store = await make_store(flush_interval_ms=20, retry_max_delay_ms=60, busy_timeout_ms=30)
    model = Model()
    for i in range(3):
        await store.ensure_session(f"s{i}", user_id=i)
        await model.append(store, f"s{i}", i, f"before {i}")
    await store.flush()

    clear = await inject(store, db_path)
    await served_from_memory(store, model)
    with pytest.raises(StorageError, match=words):
        await store.flush()
    await asyncio.sleep(0.4)  # the worker keeps trying on its own, backing off
    stats = store.stats()
    assert stats.consecutive_failures >= 2, stats
    assert stats.total_failures < 40, "retries must back off, not spin"
    assert stats.dirty_sessions == 3 and stats.last_error is not None and words in stats.last_error
    await served_from_memory(store, model)
    logged = [r.getMessage() for r in caplog.records if r.name == "writebehind"]
    assert any("flush failed" in m and words in m for m in logged)
    assert not any(SECRET in m for m in logged)

    await clear()
    await lands_once_cleared(store)
    assert store.stats().consecutive_failures == 0
    await store.aclose()
    assert on_disk(db_path) == model.sessions
    assert integrity(db_path) == "ok"
    assert_prefixes(db_path)


class IOErrorBackend(SQLiteBackend):
    """SQLite cannot be made to fail a commit with EIO on demand: this raises exactly what
    the backend raises for one, for the next `failures` writes."""

    failures = 0

    async def write_batch(self, deltas: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise _storage_error(self.path, "write_batch", sqlite3.OperationalError("disk I/O error"))
        return await super().write_batch(deltas)


async def test_io_error_during_commit_keeps_data_and_lands_later(db_path: Path) -> None:
    backend = IOErrorBackend(db_path)
    config = Config(db_path=db_path, flush_interval_ms=20, retry_max_delay_ms=40)
    store = WriteBehindStore(SessionStore(), backend, config=config)
    model = Model()
    async with store:
        await store.ensure_session("s", user_id=1)
        backend.failures = 5
        for i in range(10):
            await model.append(store, "s", 1, f"m{i}")
        async with asyncio.timeout(30):
            while backend.failures or store.stats().dirty_sessions:
                await asyncio.sleep(0.01)
        assert store.stats().total_failures == 5
    assert on_disk(db_path) == model.sessions


async def test_store_refuses_to_start_on_a_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.write_bytes(b"definitely not sqlite" * 100)
    store = WriteBehindStore.from_config(Config(db_path=db_path))
    with pytest.raises(StorageError, match="not a SQLite database"):
        await store.start()
    assert db_path.read_bytes() == b"definitely not sqlite" * 100


async def test_a_poison_record_is_isolated_and_never_blocks_the_others(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store(retry_max_delay_ms=20)
    with sqlite3.connect(db_path) as conn:  # a constraint the backend enforces and the store cannot see
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content LIKE '%POISON%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    model = Model()
    for sid in "abcdefgh":
        await store.ensure_session(sid, user_id=1)
        await model.append(store, sid, 1, f"{sid} is fine")
    await store.append_message("c", user_id=1, role="user", content=f"POISON {SECRET}")

    for attempt in range(1, 4):
        with pytest.raises(RecordError, match="1 session"):
            await store.flush()
        await model.append(store, "a", 1, f"more after attempt {attempt}")
    await store.flush()  # c is now set aside: the others flush cleanly
    await store.ensure_session("later", user_id=2)
    await model.append(store, "later", 2, "a later batch")
    await store.flush()

    stats = store.stats()
    assert stats.poisoned_sessions == 1 and stats.dirty_sessions == 1
    assert (await store.get_session("c", user_id=1)).messages[-1].content.startswith("POISON")
    disk = on_disk(db_path)
    assert "c" not in disk
    assert {sid: m for sid, m in disk.items()} == {sid: m for sid, m in model.sessions.items() if sid != "c"}
    logged = [r.getMessage() for r in caplog.records if r.name == "writebehind"]
    assert any("session 'c'" in m or "session c " in m for m in logged)
    assert not any(SECRET in m for m in logged)


async def test_backpressure_with_a_failing_disk_refuses_new_work_and_drops_nothing(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(max_dirty=3, backpressure_timeout_ms=100, retry_max_delay_ms=40)
    model = Model()
    clear = await read_only(store, db_path)
    for i in range(3):
        await store.ensure_session(f"s{i}", user_id=1)
        await model.append(store, f"s{i}", 1, f"acknowledged {i}")
    with pytest.raises(BackPressureError, match="max_dirty=3"):
        await store.ensure_session("s3", user_id=1)
    with pytest.raises(BackPressureError):
        await store.append_message("s3", user_id=1, role="user", content="x")  # nothing was created
    await model.append(store, "s0", 1, "already dirty: accepted")
    anon = await store.ensure_session(user_id=None)
    await store.append_message(anon.id, user_id=None, role="user", content="anonymous: unaffected")
    assert store.stats().backpressure_rejections == 2

    await clear()
    await lands_once_cleared(store)
    await store.ensure_session("s3", user_id=1)
    await model.append(store, "s3", 1, "room again")
    await store.aclose()
    assert on_disk(db_path) == model.sessions


async def test_a_write_cancelled_mid_transaction_leaves_the_backend_usable(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        record = SessionRecord("s", 1, utcnow(), utcnow(), utcnow())
        for _ in range(20):  # cancel at every point of the round trip, one of them mid-BEGIN
            task = asyncio.create_task(backend.write_batch([SessionDelta(record, (), 0)]))
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        result = await backend.write_batch([SessionDelta(replace(record, id="t"), (), 0)])
        assert result.versions == {"t": 1}
    finally:
        await backend.close()


async def test_a_delete_on_a_failing_disk_raises_and_changes_nothing(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(retry_max_delay_ms=20)
    model = Model()
    await store.ensure_session("s", user_id=1)
    await model.append(store, "s", 1, "still here")
    await store.flush()
    clear = await read_only(store, db_path)
    with pytest.raises(StorageError, match="readonly"):
        await store.delete_session("s", user_id=1)
    with pytest.raises(StorageError, match="readonly"):
        await store.delete_user(1)
    assert (await store.get_session("s", user_id=1)).messages[0].content == "still here"
    await clear()
    await store.delete_user(1)
    await store.aclose()
    assert on_disk(db_path) == {}


class RefuseWritesBackend(SQLiteBackend):
    """Refuses flushes (as a full disk would) but lets deletes through."""

    refuse = True

    async def write_batch(self, deltas: Any) -> Any:
        if self.refuse:
            raise _storage_error(
                self.path, "write_batch", sqlite3.OperationalError("database or disk is full")
            )
        return await super().write_batch(deltas)


async def test_no_spin_when_the_failed_data_is_deleted_before_the_retry(db_path: Path) -> None:
    backend = RefuseWritesBackend(db_path)
    config = Config(db_path=db_path, flush_interval_ms=3_600_000, retry_max_delay_ms=20)
    store = WriteBehindStore(SessionStore(), backend, config=config)
    async with store:
        await store.ensure_session("s", user_id=1)
        with pytest.raises(StorageError):
            await store.flush()
        await store.delete_session("s", user_id=1)  # nothing dirty is left to retry
        cycles = 0
        flush_all = store._worker.flush_all

        async def counted(*, throttle: bool = True) -> None:
            nonlocal cycles
            cycles += 1
            await flush_all(throttle=throttle)

        store._worker.flush_all = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.3)
        assert cycles <= 3, f"the worker ran {cycles} cycles in 0.3 s with nothing to do"
        assert store.stats().consecutive_failures == 0
