"""`pop_message`: the session's last message goes, its seq is the next append's, and the
disk follows memory: after a flush, a restart, a cancelled pop, a batch in flight that
failed, or a recovery file. Real SQLite files and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    Config,
    NotFound,
    SessionStore,
    SQLiteBackend,
    StorageError,
    StoredMessage,
    WriteBehindStore,
)

from .conftest import QUIET, Opener, StoreFactory
from .reliability.helpers import assert_prefixes, integrity, on_disk


def shape(m: StoredMessage) -> tuple[Any, ...]:
    """Everything a message is, metadata decoded (the text may be re-spelt by a database)."""
    return (m.id, m.seq, m.role, m.content, m.created_at, m.updated_at, m.metadata)


async def disk_messages(store: WriteBehindStore, sid: str) -> list[tuple[Any, ...]]:
    record = await store.backend.load_session(sid)
    assert record is not None
    return [shape(m) for m in record.messages]


async def memory_messages(store: WriteBehindStore, sid: str, user: int | str | None) -> list[tuple[Any, ...]]:
    return [shape(m) for m in await store.get_messages(sid, user_id=user)]


# -- on both backends ---------------------------------------------------------------------------


async def test_a_popped_message_is_gone_after_a_restart(open_store: Opener) -> None:
    store = await open_store()
    await store.ensure_session("s", user_id="u")
    for text in ("first", "second", "third 🎉"):
        await store.append_message("s", user_id="u", role="user", content=text)
    await store.flush()
    popped = await store.pop_message("s", user_id="u", durable=True)
    assert popped is not None and (popped.seq, popped.content) == (3, "third 🎉")
    # durable: gone from the database before the call returned, not only at shutdown
    assert [m[3] for m in await disk_messages(store, "s")] == ["first", "second"]
    # and a pop that was only acknowledged from memory is gone after a graceful restart too
    second = await store.pop_message("s", user_id="u")
    assert second is not None and second.content == "second"
    await store.aclose()
    again = await open_store()
    record = await again.get_session("s", user_id="u")
    assert [m.content for m in record.messages] == ["first"]
    summary = (await again.list_sessions("u"))[0]
    assert summary.message_count == 1


async def test_pop_then_append_reuses_the_seq_and_the_disk_matches_memory(open_store: Opener) -> None:
    store = await open_store()
    await store.ensure_session("s", user_id=7)
    await store.append_message("s", user_id=7, role="user", content="question")
    old = await store.append_message(
        "s", user_id=7, role="assistant", content="a wrong answer", metadata={"model": "old"}
    )
    await store.flush()
    assert (await store.pop_message("s", user_id=7)) == old
    new = await store.append_message(
        "s", user_id=7, role="tool", content="שלום 世界 e\u0301", metadata={"model": "new"}
    )
    # the same seq, gap-free, but another message: the row on disk must not keep the old
    # one's id, role or creation time (an upsert of only content would)
    assert new.seq == old.seq == 2 and new.id != old.id
    await store.flush()
    assert await disk_messages(store, "s") == await memory_messages(store, "s", 7)
    # two pops, one append: the disk loses both rows above the lowest point
    await store.append_message("s", user_id=7, role="user", content="third")
    await store.flush()
    await store.pop_message("s", user_id=7)
    await store.pop_message("s", user_id=7)
    await store.append_message("s", user_id=7, role="assistant", content="again")
    await store.flush()
    assert await disk_messages(store, "s") == await memory_messages(store, "s", 7)
    assert [m[3] for m in await disk_messages(store, "s")] == ["question", "again"]
    await store.aclose()
    again = await open_store()
    assert [shape(m) for m in (await again.get_session("s", user_id=7)).messages] == [
        shape(m) for m in await store.hot.get_messages("s", user_id=7)
    ]


async def test_popping_everything_and_an_empty_session(open_store: Opener) -> None:
    store = await open_store()
    await store.ensure_session("s", user_id=1)
    assert await store.pop_message("s", user_id=1, durable=True) is None
    await store.append_message("s", user_id=1, role="user", content="only")
    await store.flush()
    popped = await store.pop_message("s", user_id=1, durable=True)
    assert popped is not None and popped.content == "only"
    assert await store.pop_message("s", user_id=1) is None
    assert await disk_messages(store, "s") == []
    await store.aclose()
    again = await open_store()
    assert (await again.get_session("s", user_id=1)).messages == ()  # the session stays


# -- SQLite: what is really in the file ---------------------------------------------------------


async def test_pop_of_a_message_appended_but_not_yet_flushed(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="kept", durable=True)
    late = await store.append_message("s", user_id=1, role="assistant", content="never written")
    assert (await store.pop_message("s", user_id=1)) == late
    assert store.stats().dirty_messages == 0  # nothing left to write but the row
    await store.flush()
    assert on_disk(db_path) == {"s": {1: "kept"}}
    assert assert_prefixes(db_path) == {"s": 1}
    reused = await store.append_message("s", user_id=1, role="user", content="in its place")
    assert reused.seq == 2
    await store.flush()
    assert on_disk(db_path) == {"s": {1: "kept", 2: "in its place"}}
    assert integrity(db_path) == "ok"


class FlakyGatedBackend(SQLiteBackend):
    """A real SQLite backend whose next write waits at a gate the test opens, then fails
    (as a full disk would) if the test says so: a batch in flight that comes back."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.fail_next = False

    async def write_batch(self, deltas: Any, *args: Any) -> Any:
        self.writing.set()
        await asyncio.wait_for(self.gate.wait(), 30)
        if self.fail_next:
            self.fail_next = False
            raise StorageError(f"{self.path}: write_batch failed: database or disk is full")
        return await super().write_batch(deltas, *args)


@pytest.mark.parametrize("in_flight_fails", [False, True])
async def test_pop_while_the_message_is_in_flight(
    make_store: StoreFactory, db_path: Path, in_flight_fails: bool, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FlakyGatedBackend(db_path)
    store = await make_store(backend, retry_max_delay_ms=10)
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="kept", durable=True)
    await store.append_message("s", user_id=1, role="assistant", content="in flight")
    backend.gate.clear()
    backend.writing.clear()
    backend.fail_next = in_flight_fails
    flushing = asyncio.create_task(store.flush())
    await backend.writing.wait()  # the batch holding "in flight" (seq 2) is being written
    popped = await store.pop_message("s", user_id=1)
    assert popped is not None and popped.content == "in flight"
    backend.gate.set()
    # Failed: the batch's marks come back naming seq 2, which memory no longer has; the
    # retry must write the session as it is now, not fail on the missing message.
    if in_flight_fails:
        with pytest.raises(StorageError):
            await flushing
    else:
        await flushing
    for _ in range(500):  # the retry comes after a backoff of at most 10 ms
        try:
            await store.flush()
            break
        except StorageError:
            await asyncio.sleep(0.01)
    else:
        pytest.fail("the flush never succeeded")
    assert on_disk(db_path) == {"s": {1: "kept"}}
    # the pop's own change (the row's count and time) reached the disk: its marks were
    # neither lost nor stuck behind the message that is gone
    stored = await store.backend.load_session("s")
    assert stored is not None
    assert stored.updated_at == (await store.get_session("s", user_id=1)).updated_at
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert assert_prefixes(db_path) == {"s": 1}
    assert store.stats().consecutive_failures == 0


class HeldBackend(FlakyGatedBackend):
    """Its loads, too, wait for the test once they have read the file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.loaded = asyncio.Event()
        self.release_load = asyncio.Event()
        self.release_load.set()

    async def load_session(self, session_id: str) -> Any:
        record = await super().load_session(session_id)
        self.loaded.set()
        await asyncio.wait_for(self.release_load.wait(), 30)
        return record


async def seeded(make_store: StoreFactory, count: int) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    for i in range(count):
        await store.append_message("s", user_id=1, role="user", content=f"m{i} ✓")
    await store.aclose()


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_pop_cancelled_at_each_await_is_all_or_nothing(
    make_store: StoreFactory, db_path: Path
) -> None:
    await seeded(make_store, 3)
    # Cancelled while its cold session loads: nothing was popped.
    backend = HeldBackend(db_path)
    store = await make_store(backend)
    backend.release_load.clear()
    task = asyncio.create_task(store.pop_message("s", user_id=1, durable=True))
    await backend.loaded.wait()
    await cancel(task)
    backend.release_load.set()
    assert [m[3] for m in await memory_messages(store, "s", 1)] == ["m0 ✓", "m1 ✓", "m2 ✓"]
    await store.flush()
    assert on_disk(db_path) == {"s": {1: "m0 ✓", 2: "m1 ✓", 3: "m2 ✓"}}
    # Cancelled while it waits for the disk: popped (acknowledged in memory), and the
    # flush it was waiting for, or the next, removes it there too.
    backend.gate.clear()
    backend.writing.clear()
    task = asyncio.create_task(store.pop_message("s", user_id=1, durable=True))
    await backend.writing.wait()
    await cancel(task)
    assert [m[3] for m in await memory_messages(store, "s", 1)] == ["m0 ✓", "m1 ✓"]
    backend.gate.set()
    await store.flush()
    assert on_disk(db_path) == {"s": {1: "m0 ✓", 2: "m1 ✓"}}
    await store.aclose()
    assert assert_prefixes(db_path) == {"s": 2}


async def test_pops_cancelled_after_any_number_of_turns_leave_memory_and_disk_agreeing(
    make_store: StoreFactory, db_path: Path
) -> None:
    """Cancelled after 0, 1, 2, ... event-loop turns (wherever that lands in the load, the
    write and the durable wait): the message is gone from both or from neither."""
    await seeded(make_store, 80)
    expected = 80
    for yields in range(80):
        store = await make_store()  # cold: the pop must load the session first
        task = asyncio.create_task(store.pop_message("s", user_id=1, durable=True))
        for _ in range(yields):
            await asyncio.sleep(0)
        await cancel(task)
        memory = await memory_messages(store, "s", 1)
        assert len(memory) in (expected, expected - 1)
        if yields == 0:
            assert len(memory) == expected  # cancelled before it ever ran
        await store.flush()
        assert await disk_messages(store, "s") == memory
        await store.aclose()
        assert assert_prefixes(db_path) == {"s": len(memory)}
        expected = len(memory)
    assert integrity(db_path) == "ok"


async def test_a_pop_that_only_reached_the_recovery_file_is_replayed(db_path: Path) -> None:
    """The disk refused the flush at shutdown: the recovery file holds the session without
    the popped message, and replaying it must delete the row the disk still has."""
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        await store.ensure_session("s", user_id=1)
        for text in ("one", "two", "three"):
            await store.append_message("s", user_id=1, role="user", content=text)
    assert on_disk(db_path) == {"s": {1: "one", 2: "two", 3: "three"}}

    class Refusing(SQLiteBackend):
        async def write_batch(self, deltas: Any, *args: Any) -> Any:
            raise StorageError(f"{self.path}: write_batch failed: database or disk is full")

    config = Config(db_path=db_path, shutdown_timeout_seconds=0.2, retry_max_delay_ms=20, **QUIET)
    refused = WriteBehindStore(SessionStore(), Refusing(db_path), config=config)
    await refused.start()
    await refused.pop_message("s", user_id=1)
    await refused.pop_message("s", user_id=1)
    await refused.append_message("s", user_id=1, role="assistant", content="new two")
    await refused.aclose()
    assert db_path.with_name(db_path.name + ".recovery").exists()
    assert on_disk(db_path) == {"s": {1: "one", 2: "two", 3: "three"}}  # untouched so far

    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        record = await store.get_session("s", user_id=1)
    assert [m.content for m in record.messages] == ["one", "new two"]
    assert on_disk(db_path) == {"s": {1: "one", 2: "new two"}}
    assert assert_prefixes(db_path) == {"s": 2}


# -- who may pop, and sessions that never reach the disk ----------------------------------------


async def test_another_user_or_a_missing_session_gets_not_found(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("mine", user_id=1)
    await store.append_message("mine", user_id=1, role="user", content="private")
    for user in (2, "1", None):
        with pytest.raises(NotFound) as raised:
            await store.pop_message("mine", user_id=user)
        assert "private" not in str(raised.value)
    with pytest.raises(NotFound):
        await store.pop_message("nowhere", user_id=1)
    await store.aclose()
    # cold (loaded from disk by the pop itself) it is the same, and nothing changed
    store = await make_store()
    with pytest.raises(NotFound):
        await store.pop_message("mine", user_id=2)
    await store.aclose()
    assert on_disk(db_path) == {"mine": {1: "private"}}


async def test_anonymous_sessions_pop_in_memory_only(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    anon = await store.ensure_session(user_id=None, binding_token="tok")
    for text in ("a", "b"):
        await store.append_message(anon.id, user_id=None, role="user", content=text, binding_token="tok")
    with pytest.raises(NotFound):  # the binding token is the owner's
        await store.pop_message(anon.id, user_id=None)
    popped = await store.pop_message(anon.id, user_id=None, binding_token="tok", durable=True)
    assert popped is not None and popped.content == "b"
    again = await store.append_message(anon.id, user_id=None, role="user", content="c", binding_token="tok")
    assert again.seq == 2
    assert store.stats().dirty_sessions == 0
    await store.flush()
    assert on_disk(db_path) == {}


async def test_the_plain_session_store_pops_too() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id=1)
    first = await store.append_message("s", user_id=1, role="user", content="x")
    second = await store.append_message("s", user_id=1, role="assistant", content="y")
    assert await store.pop_message("s", user_id=1) == second
    with pytest.raises(NotFound):
        await store.update_message("s", second.id, user_id=1, append="more")  # it is gone
    # the popped id is free again, and its seq is the next one's
    reused = await store.append_message("s", user_id=1, role="assistant", content="z", message_id=second.id)
    assert reused.seq == 2
    assert await store.get_messages("s", user_id=1) == (first, reused)
    with pytest.raises(NotFound):
        await store.pop_message("s", user_id=2)
    assert (await store.get_session("s", user_id=1)).messages == (first, reused)
