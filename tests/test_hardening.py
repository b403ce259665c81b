"""No acknowledged write lost to a bug, a cancel or a slow consumer (issue 10).

Each test was written to fail on the code before the fix; real SQLite files (and the
real PostgreSQL where the behaviour is the backend's), faults made by thin subclasses
of the real backend.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from writebehind import (
    BackPressureError,
    ClosedError,
    Config,
    ConfigError,
    SessionStore,
    SQLiteBackend,
    StorageError,
    ValidationError,
    WriteBehindStore,
)
from writebehind.backends.base import BatchResult, SessionDelta
from writebehind.model import SessionRecord, StoredMessage
from writebehind.recovery import read_recovery, write_recovery

from .conftest import QUIET, StoreFactory
from .reliability.helpers import on_disk
from .test_store_backends import Opener, open_store  # noqa: F401 - the two-backend fixture


def _store(backend: SQLiteBackend, **overrides: Any) -> WriteBehindStore:
    config = Config(db_path=backend.path, **{**QUIET, **overrides})
    return WriteBehindStore(SessionStore(config.cache_size), backend, config=config)


# -- 1. an export under eviction, with a slow consumer ----------------------------------------


async def test_export_holds_every_session_exactly_once_while_the_lru_evicts(
    make_store: StoreFactory,
) -> None:
    store = await make_store(cache_size=4)
    for i in range(10):
        await store.ensure_session(f"s{i}", user_id=1)
        await store.append_message(f"s{i}", user_id=1, role="user", content=f"m{i}")
    await store.flush()
    # Three of them hot at the start, one of those with a write not yet on disk.
    for sid in ("s7", "s8", "s9"):
        await store.get_session(sid, user_id=1)
    await store.append_message("s9", user_id=1, role="assistant", content="unflushed")
    exported: list[SessionRecord] = []
    async for record in store.export_user(1):
        exported.append(record)
        if len(exported) == 1:
            # The consumer is slow: meanwhile the app flushes and the LRU evicts all of them.
            await store.flush()
            for i in range(8):
                await store.ensure_session(f"other{i}", user_id=2)
            await store.flush()
            assert not any(f"s{i}" in store.hot.tier for i in range(10))
    ids = [r.id for r in exported]
    assert sorted(ids) == sorted(f"s{i}" for i in range(10))
    assert len(ids) == len(set(ids))
    s9 = next(r for r in exported if r.id == "s9")
    assert [m.content for m in s9.messages] == ["m9", "unflushed"]


async def test_an_export_includes_a_session_only_in_memory_that_is_flushed_and_evicted_meanwhile(
    make_store: StoreFactory,
) -> None:
    store = await make_store(cache_size=3)
    await store.ensure_session("a-on-disk", user_id=1)
    await store.flush()
    await store.ensure_session("z-new", user_id=1)  # only in memory when the export starts
    exported = []
    async for record in store.export_user(1):
        exported.append(record.id)
        await store.flush()
        for i in range(4):
            await store.ensure_session(f"o{i}", user_id=2)
        await store.flush()
    assert sorted(exported) == ["a-on-disk", "z-new"]


# -- 2. purge_expired(now=...) is checked, and never half done ---------------------------------


@pytest.mark.parametrize(
    "now",
    [
        datetime(2030, 1, 1),  # naive
        datetime.min.replace(tzinfo=UTC),  # minus the retention leaves the calendar
        "2030-01-01",
        1_900_000_000,
    ],
    ids=["naive", "datetime.min", "str", "int"],
)
async def test_purge_expired_refuses_a_bad_now_and_changes_nothing(
    open_store: Opener,  # noqa: F811
    now: object,
) -> None:
    store = await open_store()
    await store.ensure_session("old", user_id=1)
    await store.append_message("old", user_id=1, role="user", content="kept")
    await store.flush()
    with pytest.raises(ValidationError) as caught:
        await store.purge_expired(now=now)  # type: ignore[arg-type]
    assert caught.value.field == "now"
    await store.append_message("old", user_id=1, role="user", content="after")
    await store.flush()  # no conflict: the row was never deleted
    assert [s.id for s in await store.backend.list_sessions(1)] == ["old"]
    loaded = await store.backend.load_session("old")
    assert loaded is not None and [m.content for m in loaded.messages] == ["kept", "after"]


# -- 3. metadata is immutable once accepted ----------------------------------------------------


class NotJSON:
    pass


async def test_mutating_metadata_after_the_call_changes_nothing_stored(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    meta: dict[str, Any] = {"tags": ["a"], "nested": {"n": 1}}
    await store.ensure_session("s", user_id=1)
    message = await store.append_message("s", user_id=1, role="user", content="x", metadata=meta)
    meta["tags"].append(NotJSON())  # would make the flush unencodable if it were shared
    meta["nested"]["n"] = 2
    handed_out = message.metadata
    assert handed_out is not None
    handed_out["tags"].append("changed by a reader")
    snapshot = (await store.get_session("s", user_id=1)).messages[0]
    assert snapshot.metadata == {"tags": ["a"], "nested": {"n": 1}}
    await store.flush()
    with sqlite3.connect(db_path) as conn:
        (stored,) = conn.execute("SELECT metadata FROM messages").fetchone()
    assert orjson.loads(stored) == {"tags": ["a"], "nested": {"n": 1}}


class DataErrorBackend(SQLiteBackend):
    """A real backend whose driver chokes on one session's data with a non-storage error
    (what an unencodable value used to do)."""

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        if any(d.record.id == "bad" for d in deltas):
            raise TypeError("Object of type NotJSON is not JSON serializable")
        return await super().write_batch(deltas, touches)


async def test_a_row_the_driver_cannot_take_is_isolated_and_saved_to_the_recovery_file(
    db_path: Path,
) -> None:
    store = _store(DataErrorBackend(db_path), shutdown_timeout_seconds=0.5)
    await store.start()
    for sid in ("a", "bad", "c"):
        await store.ensure_session(sid, user_id=1)
        await store.append_message(sid, user_id=1, role="user", content=f"in {sid}")
    with pytest.raises(StorageError):
        await store.flush()  # "bad" is refused, the rest of the batch lands
    assert set(on_disk(db_path)) == {"a", "c"}
    assert store.stats().consecutive_failures == 0  # the worker lives, no failure backoff
    await store.append_message("a", user_id=1, role="user", content="later")
    with pytest.raises(StorageError):
        await store.flush()
    assert on_disk(db_path)["a"] == {1: "in a", 2: "later"}
    await store.aclose()  # the final flush fails on "bad": the recovery file takes it
    (saved,) = read_recovery(db_path.with_name(db_path.name + ".recovery"))
    assert saved.id == "bad" and [m.content for m in saved.messages] == ["in bad"]


# -- 5. shutdown is bounded and cancellable ----------------------------------------------------


class HangingBackend(SQLiteBackend):
    """A disk that stops answering: writes never return (until cancelled)."""

    hang = False

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        if self.hang:
            await asyncio.Event().wait()
        return await super().write_batch(deltas, touches)


async def test_aclose_on_a_hung_disk_returns_within_the_timeout_and_saves_the_recovery_file(
    db_path: Path,
) -> None:
    backend = HangingBackend(db_path)
    store = _store(backend, shutdown_timeout_seconds=0.5)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    backend.hang = True
    await asyncio.wait_for(store.aclose(), 10)  # hung forever before the fix
    (saved,) = read_recovery(db_path.with_name(db_path.name + ".recovery"))
    assert [m.content for m in saved.messages] == ["acknowledged"]
    # The next start replays it.
    again = _store(SQLiteBackend(db_path))
    async with again:
        record = await again.get_session("s", user_id=1)
        assert [m.content for m in record.messages] == ["acknowledged"]


async def test_a_cancelled_aclose_still_writes_the_recovery_file(db_path: Path) -> None:
    backend = HangingBackend(db_path)
    store = _store(backend, shutdown_timeout_seconds=30)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    backend.hang = True
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.2)  # the final flush is hanging now
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing  # the caller's cancel is not swallowed
    (saved,) = read_recovery(db_path.with_name(db_path.name + ".recovery"))
    assert [m.content for m in saved.messages] == ["acknowledged"]


# -- 6. a crash of the housekeeping task never costs the final flush ---------------------------


class BrokenRetention(SQLiteBackend):
    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        raise RuntimeError("a bug in retention")


async def test_a_crashing_housekeeping_task_does_not_stop_the_final_flush(db_path: Path) -> None:
    store = _store(BrokenRetention(db_path))
    await store.start()
    await asyncio.sleep(0.05)  # retention runs once at start, and crashes
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    await store.aclose()  # re-raised the RuntimeError before the final flush, before the fix
    assert on_disk(db_path) == {"s": {1: "acknowledged"}}


# -- 7. reads are not writes ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_reads_write_nothing_and_last_access_is_persisted_coarsely_without_a_version(
    db_path: Path,
) -> None:
    clock = Clock()
    config = Config(db_path=db_path, **QUIET)
    store = WriteBehindStore(SessionStore(clock=clock), SQLiteBackend(db_path), config=config)
    async with store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="user", content="hi")
        await store.flush()
        batches = store.stats().batches_flushed
        for _ in range(50):
            clock.now += timedelta(seconds=1)
            await store.get_session("s", user_id=1)
            await store.get_messages("s", user_id=1)
        await store.flush()
        assert store.stats().batches_flushed == batches  # no row written for reads
        with sqlite3.connect(db_path) as conn:
            version, accessed = conn.execute("SELECT version, last_access_at FROM sessions").fetchone()
        assert version == 1
        clock.now += timedelta(hours=2)
        await store.get_session("s", user_id=1)
        await store.flush()
        with sqlite3.connect(db_path) as conn:
            version2, accessed2 = conn.execute("SELECT version, last_access_at FROM sessions").fetchone()
        assert version2 == 1  # moved forward, and still no version change
        assert accessed2 > accessed


# -- 8. the delete guard of cold loads is per session ------------------------------------------


class SlowLoads(SQLiteBackend):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.loads: dict[str, int] = {}

    async def load_session(self, session_id: str) -> SessionRecord | None:
        self.loads[session_id] = self.loads.get(session_id, 0) + 1
        await asyncio.sleep(0.05)
        return await super().load_session(session_id)


async def test_deleting_other_sessions_does_not_repeat_a_cold_load(db_path: Path) -> None:
    first = _store(SQLiteBackend(db_path))
    async with first:
        for sid in ("cold", *(f"d{i}" for i in range(10))):
            await first.ensure_session(sid, user_id=1)
        await first.flush()
    backend = SlowLoads(db_path)
    store = _store(backend)
    async with store:
        for i in range(10):
            await store.get_session(f"d{i}", user_id=1)
        loading = asyncio.create_task(store.get_session("cold", user_id=1))
        for i in range(10):
            await store.delete_session(f"d{i}", user_id=1)
            await asyncio.sleep(0.01)
        assert (await loading).id == "cold"
        assert backend.loads["cold"] == 1


# -- 9. deletes do not wait behind flushes; back-pressure wakes on any room ---------------------


class GatedWrites(SQLiteBackend):
    """Every batch waits for the test to let it through; the order of events is recorded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.events: list[str] = []
        self.gate = asyncio.Semaphore(1_000_000)
        self.writing = asyncio.Event()

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        self.writing.set()
        await self.gate.acquire()
        self.events.append("batch")
        return await super().write_batch(deltas, touches)

    async def delete_session(self, session_id: str, user_id: Any) -> bool:
        self.events.append("delete")
        return await super().delete_session(session_id, user_id)


async def test_a_delete_is_served_between_the_batches_of_a_long_flush(db_path: Path) -> None:
    backend = GatedWrites(db_path)
    store = _store(backend, flush_batch=5)
    async with store:
        await store.ensure_session("victim", user_id=1)
        await store.flush()
        backend.events.clear()
        backend.gate = asyncio.Semaphore(0)  # every batch waits for a release
        for i in range(50):
            await store.ensure_session(f"s{i}", user_id=1)  # a full batch starts a flush
        await backend.writing.wait()  # its first batch is in flight, the rest wait behind it
        deleting = asyncio.create_task(store.delete_session("victim", user_id=1))
        backend.gate.release()  # let one batch through
        await deleting  # before the fix: only after every batch of the flush
        assert backend.events == ["batch", "delete"]
        for _ in range(100):
            backend.gate.release()
        await store.flush()
        assert store.stats().dirty_sessions == 0
        with sqlite3.connect(db_path) as conn:
            ids = {row[0] for row in conn.execute("SELECT id FROM sessions")}
        assert ids == {f"s{i}" for i in range(50)}


class FailingWrites(SQLiteBackend):
    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        raise StorageError("disk I/O error (made by the test)")


async def test_a_delete_that_frees_room_wakes_a_write_waiting_under_back_pressure(db_path: Path) -> None:
    store = _store(FailingWrites(db_path), max_dirty=2, backpressure_timeout_ms=20_000)
    await store.start()
    try:
        await store.ensure_session("a", user_id=1)
        await store.ensure_session("b", user_id=1)
        waiting = asyncio.create_task(store.ensure_session("c", user_id=1))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await store.delete_session("a", user_id=1)  # memory-only so far: room now
        record = await asyncio.wait_for(waiting, 10)  # woke at the delete, not at the timeout
        assert record.id == "c"
    finally:
        await store._abandon()


# -- 10. unchecked edges -------------------------------------------------------------------------


async def test_list_sessions_with_an_offset_past_int64_is_a_validation_error(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.flush()
    with pytest.raises(ValidationError) as caught:
        await store.list_sessions(1, offset=2**63)
    assert caught.value.field == "offset"
    assert await store.list_sessions(1, offset=2**63 - 1, limit=2**63 - 1) == []
    assert [s.id for s in await store.list_sessions(1, limit=2**63 - 1)] == ["s"]


def test_a_bad_db_schema_names_its_variable() -> None:
    with pytest.raises(ConfigError, match="CHAT_SESSION_DB_SCHEMA"):
        Config.from_env({"CHAT_SESSION_DB_SCHEMA": "Robert'); DROP TABLE"})
    assert Config.from_env({"CHAT_SESSION_DB_SCHEMA": "tenant_7"}).db_schema == "tenant_7"


# -- 11. the recovery file's own home, and the caller's last chance -----------------------------


async def test_the_recovery_file_goes_where_chat_session_recovery_path_says(tmp_path: Path) -> None:
    db_path = tmp_path / "db" / "chat.db"
    db_path.parent.mkdir()
    elsewhere = tmp_path / "other-disk" / "chat.recovery"
    elsewhere.parent.mkdir()
    config = Config.from_env(
        {"CHAT_SESSION_DB_PATH": str(db_path), "CHAT_SESSION_RECOVERY_PATH": str(elsewhere)}
    )
    assert config.recovery_path == elsewhere
    store = WriteBehindStore(
        SessionStore(),
        FailingWrites(db_path),
        config=Config(**{**_fields(config), "shutdown_timeout_seconds": 0.2}),
    )
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.aclose()
    assert [r.id for r in read_recovery(elsewhere)] == ["s"]
    assert not db_path.with_name(db_path.name + ".recovery").exists()


async def test_when_nothing_can_be_saved_aclose_raises_and_unsaved_returns_the_records(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "chat.db"
    config = Config(
        db_path=db_path,
        recovery_path=tmp_path / "missing-dir" / "r.json",
        shutdown_timeout_seconds=0.2,
        **QUIET,
    )
    store = WriteBehindStore(SessionStore(), FailingWrites(db_path), config=config)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="last chance")
    with pytest.raises(StorageError, match="1 sessions could not be saved"):
        await store.aclose()
    (record,) = store.unsaved()
    assert [m.content for m in record.messages] == ["last chance"]


def _fields(config: Config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


# -- recovery replay onto a database that moved on: merged, nothing dropped ---------------------


async def test_a_recovery_file_replayed_onto_a_newer_row_is_merged_after_it(db_path: Path) -> None:
    store = _store(SQLiteBackend(db_path))
    async with store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="user", content="first", message_id="m1")
        await store.flush()
        mine = await store.get_session("s", user_id=1)  # version 1
        await store.append_message("s", user_id=1, role="assistant", content="on disk", message_id="m2")
        await store.flush()  # the row moves to version 2
    later = datetime.now(UTC)
    local = StoredMessage("m-local", 2, "user", "only in the recovery file", later, later)
    write_recovery(
        db_path.with_name(db_path.name + ".recovery"),
        [SessionRecord(**{**_record_fields(mine), "messages": (*mine.messages, local)})],
    )
    again = _store(SQLiteBackend(db_path))
    async with again:
        record = await again.get_session("s", user_id=1)
    assert [(m.seq, m.content) for m in record.messages] == [
        (1, "first"),
        (2, "on disk"),
        (3, "only in the recovery file"),
    ]
    assert not list(db_path.parent.glob("*.refused-*"))


def _record_fields(record: SessionRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


async def test_backpressure_error_is_still_raised_when_nothing_frees_room(db_path: Path) -> None:
    store = _store(FailingWrites(db_path), max_dirty=1, backpressure_timeout_ms=50)
    await store.start()
    try:
        await store.ensure_session("a", user_id=1)
        with pytest.raises(BackPressureError):
            await store.ensure_session("b", user_id=1)
    finally:
        await store._abandon()


# -- the token path keeps a running size ---------------------------------------------------------


async def test_the_size_limit_holds_token_by_token_across_a_reload_with_multibyte_text(
    db_path: Path,
) -> None:
    config = Config(db_path=db_path, max_message_bytes=40, **QUIET)
    store = WriteBehindStore(SessionStore(max_message_bytes=40), SQLiteBackend(db_path), config=config)
    async with store:
        await store.ensure_session("s", user_id=1)
        reply = await store.append_message("s", user_id=1, role="assistant", content="é" * 5)  # 10 bytes
        for _ in range(5):
            await store.update_message("s", reply.id, user_id=1, append="🙂")  # 4 bytes each
    again = WriteBehindStore(SessionStore(max_message_bytes=40), SQLiteBackend(db_path), config=config)
    async with again:
        await again.update_message("s", reply.id, user_id=1, append="中")  # 33 bytes: loaded, then 3 more
        with pytest.raises(ValidationError) as caught:
            await again.update_message("s", reply.id, user_id=1, append="🙂🙂")  # 41 > 40
        assert caught.value.field == "content"
        record = await again.get_session("s", user_id=1)
        assert record.messages[0].content == "é" * 5 + "🙂" * 5 + "中"  # unchanged by the refusal
        await again.update_message("s", reply.id, user_id=1, append="abcdefg")  # exactly 40
        await again.update_message("s", reply.id, user_id=1, content="short")  # a replace resets it
        await again.update_message("s", reply.id, user_id=1, append="x" * 35)


async def test_a_recovery_file_does_not_bring_back_a_session_erased_while_the_app_was_down(
    db_path: Path,
) -> None:
    store = _store(SQLiteBackend(db_path))
    async with store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="user", content="personal")
        await store.flush()
        saved = await store.get_session("s", user_id=1)  # version 1, on disk
    write_recovery(db_path.with_name(db_path.name + ".recovery"), [saved])
    eraser = SQLiteBackend(db_path)  # the operator's `writebehind erase --user 1`, app stopped
    await eraser.open()
    assert await eraser.delete_user(1) == ["s"]
    await eraser.close()
    again = _store(SQLiteBackend(db_path))
    async with again:
        assert await again.list_sessions(1) == []
    assert on_disk(db_path) == {}
    assert not list(db_path.parent.glob("*.recovery*"))


# -- found by a new user's review -----------------------------------------------------------------


class SlowLoadBackend(SQLiteBackend):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.loading = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def load_session(self, session_id: str) -> SessionRecord | None:
        self.loading.set()
        await self.release.wait()
        return await super().load_session(session_id)


async def test_a_write_waiting_on_a_load_when_aclose_begins_is_refused_not_acknowledged_and_lost(
    db_path: Path,
) -> None:
    first = _store(SQLiteBackend(db_path))
    async with first:
        await first.ensure_session("s", user_id=1)
        await first.append_message("s", user_id=1, role="user", content="on disk")
    backend = SlowLoadBackend(db_path)
    store = _store(backend)
    await store.start()
    backend.release.clear()
    writing = asyncio.create_task(store.append_message("s", user_id=1, role="user", content="late"))
    await backend.loading.wait()  # the write waits for its cold load
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0)
    backend.release.set()
    await closing
    outcome = await asyncio.gather(writing, return_exceptions=True)
    if isinstance(outcome[0], StoredMessage):
        # Acknowledged: then it must be on disk.
        assert on_disk(db_path)["s"] == {1: "on disk", 2: "late"}
    else:
        assert isinstance(outcome[0], ClosedError)  # refused, and not on disk either
        assert on_disk(db_path)["s"] == {1: "on disk"}


async def test_many_cold_requests_through_a_small_hot_tier_never_see_not_found(db_path: Path) -> None:
    first = _store(SQLiteBackend(db_path))
    async with first:
        for i in range(40):
            await first.ensure_session(f"s{i}", user_id=1)
            await first.append_message(f"s{i}", user_id=1, role="user", content=f"m{i}")
    store = _store(SQLiteBackend(db_path), cache_size=4)
    async with store:
        reads = [store.get_session(f"s{i}", user_id=1) for i in range(40)]
        writes = [store.append_message(f"s{i}", user_id=1, role="user", content="more") for i in range(40)]
        results = await asyncio.gather(*reads, *writes)
    assert [r.id for r in results[:40]] == [f"s{i}" for i in range(40)]
    assert all(isinstance(m, StoredMessage) and m.seq == 2 for m in results[40:])


async def test_erasure_reaches_the_recovery_file_and_its_refused_copies(
    db_path: Path, tmp_path: Path
) -> None:
    async with _store(SQLiteBackend(db_path)):
        pass  # the app ran once: the database exists
    recovery = db_path.with_name(db_path.name + ".recovery")
    now = datetime.now(UTC)
    mine = SessionRecord(
        "mine", 7, now, now, now, messages=(StoredMessage("m", 1, "user", "SECRET-7", now, now),)
    )
    other = SessionRecord("other", 8, now, now, now)
    write_recovery(recovery, [mine, other])
    refused = recovery.with_name(recovery.name + ".refused-1")
    write_recovery(refused, [replace_id(mine, "mine-2")])
    # The operator erases user 7 while the app is stopped: the command line.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "writebehind.cli", "--db", str(db_path), "erase", "--user", "7", "--yes"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r.id for r in read_recovery(recovery)] == ["other"]
    assert not refused.exists()
    store = _store(SQLiteBackend(db_path))
    async with store:  # the replay brings back user 8's session, nothing of user 7
        assert [s.id for s in await store.list_sessions(8)] == ["other"]
        assert await store.list_sessions(7) == []
        # and the store's own erasure reaches a refused copy too
        write_recovery(refused, [replace_id(other, "other-2")])
        assert await store.delete_user(8) == 2
        assert not refused.exists()
    for file in db_path.parent.iterdir():
        if file.is_file():
            assert b"SECRET-7" not in file.read_bytes(), file


def replace_id(record: SessionRecord, sid: str) -> SessionRecord:
    return SessionRecord(**{**_record_fields(record), "id": sid})


async def test_a_cancelled_aclose_leaves_no_worker_writing_to_a_closed_backend(db_path: Path) -> None:
    backend = HangingBackend(db_path)
    store = _store(backend, shutdown_timeout_seconds=30)
    await store.start()
    await store.ensure_session("s", user_id=1)
    backend.hang = True
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.2)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await asyncio.sleep(0.2)
    assert store.stats().total_failures == 0  # nothing kept retrying against the closed backend
    with pytest.raises(ClosedError):
        await store.flush()
