"""The write-behind store on real SQLite files: the invariants of DESIGN.md."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from writebehind import (
    BackPressureError,
    ClosedError,
    NotFound,
    SQLiteBackend,
    StorageError,
    WriteBehindStore,
)
from writebehind.model import SessionRecord

from .conftest import GatedBackend, StoreFactory


def rows(db_path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read the file with a separate, plain sqlite3 connection: what is really on disk."""
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql, params).fetchall()


def without_access(record: SessionRecord) -> SessionRecord:
    return replace(record, last_access_at=record.created_at)


async def chat(store: WriteBehindStore, sid: str, user: int | str | None, turns: int) -> None:
    for i in range(turns):
        await store.append_message(sid, user_id=user, role="user", content=f"question {i} ✓")
        reply = await store.append_message(
            sid, user_id=user, role="assistant", content="", metadata={"model": "demo", "turn": i}
        )
        for token in ("The ", "answer ", f"is {i}."):
            await store.update_message(sid, reply.id, user_id=user, append=token)


async def test_restart_round_trip_keeps_signed_in_sessions_and_drops_anonymous(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("alice-1", user_id=1, title="Trip to Lisbon", client_ip="10.0.0.1")
    await store.ensure_session("bob-1", user_id="bob@example.com")
    anon = await store.ensure_session(user_id=None, title="anonymous")
    await chat(store, "alice-1", 1, 3)
    await chat(store, "bob-1", "bob@example.com", 2)
    await chat(store, anon.id, None, 2)
    await store.update_session("alice-1", user_id=1, status="archived", title="Lisbon")
    before = {
        "alice-1": await store.hot.get_session("alice-1", user_id=1),
        "bob-1": await store.hot.get_session("bob-1", user_id="bob@example.com"),
    }
    await store.aclose()

    # What is on disk equals what was in memory, to the microsecond, last access included.
    backend = SQLiteBackend(db_path)
    await backend.open()
    for sid, record in before.items():
        assert await backend.load_session(sid) == record
    assert await backend.load_session(anon.id) is None
    await backend.close()

    again = await make_store()
    alice = await again.get_session("alice-1", user_id=1)
    assert without_access(alice) == without_access(before["alice-1"])
    assert alice.status == "archived" and alice.title == "Lisbon"
    assert [m.seq for m in alice.messages] == [1, 2, 3, 4, 5, 6]
    assert alice.messages[1].content == "The answer is 0."
    assert alice.messages[1].metadata == {"model": "demo", "turn": 0}
    assert isinstance((await again.get_session("bob-1", user_id="bob@example.com")).user_id, str)
    with pytest.raises(NotFound):
        await again.get_session(anon.id, user_id=None)
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(2,)]


async def test_flush_writes_only_the_delta(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("big", user_id=7)
    for i in range(2000):
        await store.append_message("big", user_id=7, role="user", content=f"message {i}")
    await store.flush()
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    statements: list[str] = []
    await backend.writer.set_trace_callback(statements.append)
    changes_before = backend.writer.total_changes

    await store.append_message("big", user_id=7, role="assistant", content="one more")
    await store.flush()

    message_inserts = [s for s in statements if "INTO messages" in s]
    assert len(message_inserts) == 1
    # one message row and the session row, nothing else
    assert backend.writer.total_changes - changes_before == 2
    assert store.stats().messages_flushed == 2001


async def test_500_token_updates_reach_disk_as_one_row_with_the_final_content(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="")
    await store.flush()
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    changes_before = backend.writer.total_changes
    for i in range(500):
        await store.update_message("s", reply.id, user_id=1, append=f"t{i} ")
    assert store.stats().dirty_messages == 1
    await store.flush()
    assert backend.writer.total_changes - changes_before == 2
    expected = "".join(f"t{i} " for i in range(500))
    assert rows(db_path, "SELECT content FROM messages WHERE session_id = 's'") == [(expected,)]


async def test_requests_on_hot_sessions_never_wait_for_the_disk(db_path: Path) -> None:
    backend = GatedBackend(db_path)
    from writebehind import Config, SessionStore

    store = WriteBehindStore(SessionStore(), backend, config=Config(db_path=db_path))
    async with store:
        await store.ensure_session("hot", user_id=1)
        await store.flush()
        backend.gate.clear()
        await store.append_message("hot", user_id=1, role="user", content="first")
        flushing = asyncio.create_task(store.flush())
        await backend.writing.wait()
        backend.writing.clear()
        async with asyncio.timeout(10):  # a hang, not a slowness, is what this guards against
            for i in range(200):
                message = await store.append_message("hot", user_id=1, role="user", content=f"{i}")
                await store.update_message("hot", message.id, user_id=1, append="!")
                await store.get_session("hot", user_id=1)
            await store.list_sessions(1)
        assert not flushing.done() and not backend.gate.is_set()
        backend.gate.set()
        await flushing
        await store.flush()
    assert rows(db_path, "SELECT count(*) FROM messages") == [(201,)]


async def test_concurrent_misses_for_one_session_make_one_load(db_path: Path) -> None:
    from writebehind import Config, SessionStore

    config = Config(db_path=db_path)
    async with WriteBehindStore.from_config(config) as store:
        await store.ensure_session("cold", user_id=1)
        await store.append_message("cold", user_id=1, role="user", content="hello")
    backend = GatedBackend(db_path)
    async with WriteBehindStore(SessionStore(), backend, config=config) as store:
        results = await asyncio.gather(*(store.get_session("cold", user_id=1) for _ in range(100)))
        assert backend.loads == 1
        assert store.stats().loads == 1
        assert {r.messages[0].content for r in results} == {"hello"}


async def test_dirty_sessions_are_never_evicted_and_clean_ones_come_back(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(cache_size=10)
    for i in range(100):
        await store.ensure_session(f"s{i}", user_id=i % 7)
        await store.append_message(f"s{i}", user_id=i % 7, role="user", content=f"hello {i}")
    stats = store.stats()
    assert stats.dirty_sessions == 100
    assert stats.hot_sessions == 100  # 10 in the LRU, 90 parked until flushed
    assert stats.parked == 90
    await store.flush()
    stats = store.stats()
    assert stats.hot_sessions == 10 and stats.parked == 0 and stats.evictions == 90
    assert rows(db_path, "SELECT count(*) FROM messages") == [(100,)]
    for i in range(100):
        record = await store.get_session(f"s{i}", user_id=i % 7)
        assert record.messages[0].content == f"hello {i}"
    assert store.stats().hot_sessions <= 10 + store.stats().dirty_sessions


async def test_delete_then_flush_cannot_bring_the_session_back(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("doomed", user_id=1)
    await store.append_message("doomed", user_id=1, role="user", content="first")
    await store.flush()
    await store.append_message("doomed", user_id=1, role="user", content="dirty, unflushed")
    await store.delete_session("doomed", user_id=1)
    await store.flush()
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]
    with pytest.raises(NotFound):
        await store.get_session("doomed", user_id=1)


async def test_delete_during_inflight_flush_cannot_resurrect(db_path: Path) -> None:
    from writebehind import Config, SessionStore

    backend = GatedBackend(db_path)
    async with WriteBehindStore(SessionStore(), backend, config=Config(db_path=db_path)) as store:
        await store.ensure_session("doomed", user_id=1)
        await store.append_message("doomed", user_id=1, role="user", content="in flight")
        backend.gate.clear()
        flushing = asyncio.create_task(store.flush())
        await backend.writing.wait()
        deleting = asyncio.create_task(store.delete_session("doomed", user_id=1))
        await asyncio.sleep(0.05)
        assert not deleting.done()  # queued behind the batch in flight
        backend.gate.set()
        await flushing
        await deleting
        await store.flush()
        with pytest.raises(NotFound):
            await store.get_session("doomed", user_id=1)
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(0,)]
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


async def test_delete_user_is_durable_and_wins_over_a_failed_flush(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    for i in range(5):
        await store.ensure_session(f"u1-{i}", user_id=1)
        await store.append_message(f"u1-{i}", user_id=1, role="user", content="mine")
    await store.ensure_session("u2", user_id=2)
    await store.flush()
    await store.append_message("u1-0", user_id=1, role="user", content="unflushed")
    await store.ensure_session("u1-new", user_id=1)
    assert await store.delete_user(1) == 6
    assert rows(db_path, "SELECT id FROM sessions") == [("u2",)]
    assert await store.list_sessions(1) == []
    await store.flush()
    assert rows(db_path, "SELECT id FROM sessions") == [("u2",)]


async def test_another_users_session_looks_exactly_like_a_missing_one(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    await store.ensure_session("private", user_id=1)
    message = await store.append_message("private", user_id=1, role="user", content="secret")
    await store.flush()

    async def error_of(call: object) -> str:
        with pytest.raises(NotFound) as info:
            await call  # type: ignore[misc]
        return str(info.value)

    missing = await error_of(store.get_session("nope", user_id=2))
    calls = [
        store.get_session("private", user_id=2),
        store.get_session("private", user_id="1"),
        store.get_session("private", user_id=None),
        store.get_messages("private", user_id=2),
        store.append_message("private", user_id=2, role="user", content="x"),
        store.update_message("private", message.id, user_id=2, append="x"),
        store.update_session("private", user_id=2, title="mine now"),
        store.delete_session("private", user_id=2),
        store.claim("private", user_id=2),
        store.ensure_session("private", user_id=2),
    ]
    for call in calls:
        assert (await error_of(call)).replace("private", "nope") == missing
    assert await store.list_sessions(2) == []
    record = await store.get_session("private", user_id=1)
    assert [m.content for m in record.messages] == ["secret"] and record.title is None


async def test_concurrent_durable_appends_share_transactions(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await store.ensure_session("g", user_id=1)
    await store.flush()
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    commits: list[str] = []
    await backend.writer.set_trace_callback(
        lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None
    )

    async def durable_append(i: int) -> None:
        message = await store.append_message(
            "g", user_id=1, role="user", content=f"durable {i}", durable=True
        )
        # On disk when the call returns: a separate connection sees it.
        assert rows(db_path, "SELECT content FROM messages WHERE id = ?", (message.id,)) == [
            (f"durable {i}",)
        ]

    await asyncio.gather(*(durable_append(i) for i in range(200)))
    assert 1 <= len(commits) <= 10, f"{len(commits)} transactions for 200 durable appends"
    assert rows(db_path, "SELECT count(*) FROM messages") == [(200,)]


async def test_backpressure_refuses_new_dirty_sessions_but_never_drops_or_blocks_others(
    db_path: Path,
) -> None:
    from writebehind import Config, SessionStore

    backend = GatedBackend(db_path)
    config = Config(db_path=db_path, max_dirty=3, backpressure_timeout_ms=50)
    async with WriteBehindStore(SessionStore(), backend, config=config) as store:
        backend.gate.clear()
        for i in range(3):
            await store.ensure_session(f"s{i}", user_id=1)
        with pytest.raises(BackPressureError):
            await store.ensure_session("s3", user_id=1)
        with pytest.raises(BackPressureError):
            await store.ensure_session(user_id=1)
        assert store.stats().dirty_sessions == 3
        # already dirty: accepted; anonymous: unaffected
        await store.append_message("s0", user_id=1, role="user", content="still fine")
        anon = await store.ensure_session(user_id=None)
        await store.append_message(anon.id, user_id=None, role="user", content="fine")
        assert store.stats().backpressure_rejections == 2
        backend.gate.set()
        await store.flush()
        await store.ensure_session("s3", user_id=1)
    assert rows(db_path, "SELECT id FROM sessions ORDER BY id") == [("s0",), ("s1",), ("s2",), ("s3",)]
    with pytest.raises(NotFound):
        await store.hot.get_session("s4", user_id=1)


class RefusingBackend(SQLiteBackend):
    """Stands in for a disk that refuses every write (the reliability suite uses real
    SQLite faults; this one only needs 'refuses', whatever the cause)."""

    refuse = True

    async def write_batch(self, deltas: object) -> None:
        if self.refuse:
            raise StorageError("disk says no")
        return await super().write_batch(deltas)  # type: ignore[arg-type]


async def test_failed_flushes_keep_data_and_aclose_saves_it_to_a_recovery_file(
    db_path: Path,
) -> None:
    from writebehind import Config, SessionStore

    config = Config(db_path=db_path, shutdown_timeout_seconds=0.2, retry_max_delay_ms=50)
    store = WriteBehindStore(SessionStore(), RefusingBackend(db_path), config=config)
    await store.start()
    await store.ensure_session("s", user_id=1, title="keep me")
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    with pytest.raises(StorageError):
        await store.flush()
    stats = store.stats()
    assert stats.consecutive_failures >= 1 and stats.last_error and "disk says no" in stats.last_error
    assert stats.dirty_sessions == 1
    assert (await store.get_session("s", user_id=1)).messages[0].content == "acknowledged"
    await store.aclose()
    recovery = db_path.with_name(db_path.name + ".recovery")
    assert recovery.exists() and recovery.stat().st_mode & 0o777 == 0o600
    assert b"acknowledged" in recovery.read_bytes()

    async with WriteBehindStore.from_config(config) as again:
        record = await again.get_session("s", user_id=1)
        assert record.title == "keep me" and record.messages[0].content == "acknowledged"
    assert not recovery.exists()


async def test_worker_cancelled_from_outside_is_restarted(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    worker_task = next(t for t in asyncio.all_tasks() if t.get_name() == "writebehind-flush-worker")
    worker_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker_task
    await store.append_message("s", user_id=1, role="user", content="after the cancel")
    await store.flush()
    assert store.stats().messages_flushed == 1


async def test_closed_store_refuses_calls(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.aclose()
    with pytest.raises(ClosedError):
        await store.ensure_session(user_id=1)
    with pytest.raises(ClosedError):
        await store.flush()
    await store.aclose()  # idempotent


async def test_claiming_an_anonymous_session_persists_it_whole(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    anon = await store.ensure_session(user_id=None, binding_token="cookie")
    for i in range(5):
        await store.append_message(
            anon.id, user_id=None, role="user", content=f"m{i}", binding_token="cookie"
        )
    await store.flush()
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(0,)]  # anonymous: never written
    await store.claim(anon.id, user_id=9, binding_token="cookie", durable=True)
    assert rows(db_path, "SELECT user_id, message_count FROM sessions") == [(9, 5)]
    assert rows(db_path, "SELECT content FROM messages ORDER BY seq") == [(f"m{i}",) for i in range(5)]


async def test_listing_merges_memory_and_disk_newest_first(make_store: StoreFactory) -> None:
    store = await make_store()
    for i in range(6):
        await store.ensure_session(f"s{i}", user_id=1, title=f"t{i}")
    await store.aclose()
    again = await make_store()
    await again.append_message("s2", user_id=1, role="user", content="bump")  # newer in memory than on disk
    await again.ensure_session("fresh", user_id=1)  # in memory only
    listed = await again.list_sessions(1)
    assert [s.id for s in listed][:2] == ["fresh", "s2"]
    assert sorted(s.id for s in listed) == ["fresh", "s0", "s1", "s2", "s3", "s4", "s5"]
    assert next(s for s in listed if s.id == "s2").message_count == 1
    page = await again.list_sessions(1, limit=3, offset=1)
    assert [s.id for s in page] == [s.id for s in listed[1:4]]
    assert await again.list_sessions(2) == []


async def test_resume_after_restart_reads_what_was_missed(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    for i in range(10):
        await store.append_message("s", user_id=1, role="user", content=f"m{i}")
    await store.aclose()
    again = await make_store()
    missed = await again.get_messages("s", user_id=1, after_seq=7)
    assert [(m.seq, m.content) for m in missed] == [(8, "m7"), (9, "m8"), (10, "m9")]


async def test_stats_report_what_happened(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="")
    for _ in range(10):
        await store.update_message("s", reply.id, user_id=1, append="x")
    before = store.stats()
    assert (before.dirty_sessions, before.dirty_messages, before.batches_flushed) == (1, 1, 0)
    await store.flush()
    after = store.stats()
    assert (after.dirty_sessions, after.batches_flushed, after.sessions_flushed) == (0, 1, 1)
    assert after.messages_flushed == 1 and after.last_flush_at is not None
    assert after.flush_latency_p50_ms is not None and after.consecutive_failures == 0
    assert after.hot_sessions == 1 and after.hot_hits >= 11


async def test_flush_happens_on_the_interval_without_being_asked(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(flush_interval_ms=20)
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="soon on disk")
    async with asyncio.timeout(10):
        while store.stats().messages_flushed < 1:
            await asyncio.sleep(0.01)
    assert rows(db_path, "SELECT content FROM messages") == [("soon on disk",)]


async def test_a_full_batch_triggers_a_flush(make_store: StoreFactory) -> None:
    store = await make_store(flush_batch=5)
    for i in range(5):
        await store.ensure_session(f"s{i}", user_id=1)
    async with asyncio.timeout(10):
        while store.stats().sessions_flushed < 5:
            await asyncio.sleep(0.01)
