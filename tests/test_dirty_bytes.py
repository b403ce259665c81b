"""Back-pressure on the bytes waiting for the disk (`max_dirty_bytes`), not only on sessions.

A few sessions written faster than the disk takes them (a reply streaming tokens into a
session whose flush hangs or keeps failing) must not grow memory without bound: the store
counts the text its pending writes added, and refuses a write once that reaches the bound,
changing nothing, until the disk takes the backlog.

The unit is the code point (`len()` of the text), which is the UTF-8 size of ASCII text;
several tests here pin it down with text whose UTF-8 size differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from writebehind import BackPressureError, NotFound, SQLiteBackend, StorageError, ValidationError
from writebehind.backends.base import SessionDelta
from writebehind.dirty import DirtyIndex
from writebehind.model import SessionRecord, utcnow
from writebehind.store import HotTier
from writebehind.writebehind import WriteBehindStore

from .conftest import StoreFactory

# Code points: 词 🙂 é - t o k e n (UTF-8: 3 + 4 + 2 + 6 = 15 bytes).
TOKEN = "词🙂é-token"


class Disk(SQLiteBackend):
    """Real SQLite behind a disk the test controls: `gate` cleared, a write hangs until it is
    set again; `fail` set, a write (once through the gate) is refused as a broken disk's."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()
        self.fail = False

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        if deltas:
            self.writing.set()
        # Bounded, so that a failing test ends instead of hanging its teardown.
        await asyncio.wait_for(self.gate.wait(), 30)
        if self.fail and deltas:
            raise StorageError("disk I/O error (the test's broken disk)")
        return await super().write_batch(deltas, touches)


def on_disk(db_path: Path, session_id: str) -> list[str]:
    with sqlite3.connect(db_path) as db:
        found = db.execute("SELECT content FROM messages WHERE session_id = ? ORDER BY seq", (session_id,))
        return [row[0] for row in found]


async def recovered(store: WriteBehindStore, disk: Disk) -> None:
    """The disk works again: flush until a flush goes through (a refused one left the worker
    in a backoff, during which a flush fails at once)."""
    disk.fail = False
    disk.gate.set()
    deadline = time.monotonic() + 20
    while True:
        try:
            await store.flush()
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def stream_until_refused(
    store: WriteBehindStore, session_id: str, message_id: str
) -> tuple[list[str], str, BackPressureError]:
    accepted: list[str] = []
    for i in range(100_000):
        token = f"{TOKEN}{i};"
        try:
            await store.update_message(session_id, message_id, user_id=1, append=token)
        except BackPressureError as exc:
            return accepted, token, exc
        accepted.append(token)
    raise AssertionError("100,000 tokens accepted with the disk down: no bound")


# -- the bound ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hung", "refusing"])
async def test_a_reply_streaming_into_a_dead_disk_stops_at_the_bound_and_the_write_beyond_is_not_applied(
    db_path: Path, make_store: StoreFactory, kind: str
) -> None:
    bound = 2_000
    disk = Disk(db_path)
    store = await make_store(disk, max_dirty_bytes=bound, backpressure_timeout_ms=50, retry_max_delay_ms=100)
    if kind == "hung":
        disk.gate.clear()
    else:
        disk.fail = True
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="")

    accepted, refused, error = await stream_until_refused(store, "s", reply.id)

    text = "".join(accepted)
    stats = store.stats()
    # Exact: every accepted token, nothing of the refused one; and at most one write over.
    assert stats.dirty_bytes == len(text)
    assert bound <= stats.dirty_bytes < bound + len(refused)
    assert stats.backpressure_rejections == 1
    assert "max_dirty_bytes" in str(error) and "not applied" in str(error)
    messages = await store.get_messages("s", user_id=1)
    assert messages[0].content == text  # the refused token is absent
    # Any persisted write is refused while the backlog is over the bound: an already dirty
    # session's, and a new session's.
    with pytest.raises(BackPressureError):
        await store.append_message("s", user_id=1, role="user", content="more")
    with pytest.raises(BackPressureError):
        await store.ensure_session("t", user_id=1)
    with pytest.raises(NotFound):
        await store.get_session("t", user_id=1)
    assert store.stats().dirty_bytes == len(text)

    await recovered(store, disk)
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "s") == [text]  # everything acknowledged
    # Writes flow again.
    await store.update_message("s", reply.id, user_id=1, append=refused)
    await store.ensure_session("t", user_id=1)
    await store.flush()
    assert on_disk(db_path, "s") == [text + refused]
    assert store.stats().dirty_bytes == 0


async def test_a_write_waiting_under_back_pressure_goes_through_once_the_disk_takes_the_backlog(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk, max_dirty_bytes=100, backpressure_timeout_ms=20_000)
    disk.gate.clear()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="中" * 100)
    waiting = asyncio.create_task(store.append_message("s", user_id=1, role="user", content="نعم"))
    await asyncio.wait_for(disk.writing.wait(), 10)  # it kicked the worker, whose write hangs
    assert not waiting.done()
    disk.gate.set()
    message = await asyncio.wait_for(waiting, 10)  # woken by the commit, not the timeout
    assert message.seq == 2
    assert store.stats().dirty_bytes == 3
    await store.flush()
    assert on_disk(db_path, "s") == ["中" * 100, "نعم"]


# -- the worker's snapshot and commit -------------------------------------------------------------


async def test_bytes_written_while_a_batch_is_in_flight_stay_counted_after_it_commits(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk)
    await store.ensure_session("s", user_id=1, title="标题")  # 2
    reply = await store.append_message("s", user_id=1, role="assistant", content="前")  # 1
    assert store.stats().dirty_bytes == 3
    disk.gate.clear()
    flushing = asyncio.create_task(store.flush())
    await asyncio.wait_for(disk.writing.wait(), 10)  # the batch is taken, its write hangs
    for token in ("🙂", "and more", "ñ"):
        await store.update_message("s", reply.id, user_id=1, append=token)
    await store.ensure_session("n", user_id=1, title="new")  # another session, 3
    await store.append_message("n", user_id=1, role="user", content="x" * 5)  # 5
    assert store.stats().dirty_bytes == 3 + 10 + 8
    disk.gate.set()
    await flushing
    # The batch took 3; the 18 written meanwhile are still waiting.
    assert store.stats().dirty_bytes == 18
    await store.flush()
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "s") == ["前🙂and moreñ"]
    # Marks recycled from those batches start from zero for the next sessions.
    await store.ensure_session("u", user_id=2)
    await store.append_message("u", user_id=2, role="user", content="abc")
    assert store.stats().dirty_bytes == 3


async def test_a_failed_batch_keeps_its_bytes_and_those_written_while_it_was_in_flight(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk, retry_max_delay_ms=100)
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="γειά")  # 4
    disk.gate.clear()
    disk.fail = True
    flushing = asyncio.create_task(store.flush())
    await asyncio.wait_for(disk.writing.wait(), 10)
    await store.update_message("s", reply.id, user_id=1, append="λέξ")  # 3
    disk.gate.set()
    with pytest.raises(StorageError):
        await flushing
    assert store.stats().dirty_bytes == 7
    await recovered(store, disk)
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "s") == ["γειάλέξ"]


# -- cancellation ---------------------------------------------------------------------------------


async def test_a_write_cancelled_under_back_pressure_is_neither_applied_nor_counted(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk, max_dirty_bytes=10, backpressure_timeout_ms=20_000)
    disk.gate.clear()
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="0123456789")
    waiting = asyncio.create_task(store.update_message("s", reply.id, user_id=1, append="late"))
    await asyncio.wait_for(disk.writing.wait(), 10)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert store.stats().dirty_bytes == 10
    assert (await store.get_messages("s", user_id=1))[0].content == "0123456789"
    disk.gate.set()
    await store.flush()
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "s") == ["0123456789"]


async def test_a_durable_write_cancelled_while_waiting_for_the_disk_stays_counted_until_written(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk)
    await store.ensure_session("s", user_id=1)
    disk.gate.clear()
    durable = asyncio.create_task(
        store.append_message("s", user_id=1, role="user", content="שלום", durable=True)
    )
    await asyncio.wait_for(disk.writing.wait(), 10)
    durable.cancel()
    with pytest.raises(asyncio.CancelledError):
        await durable
    # Applied before it waited (acknowledged from memory): it is still to be written.
    assert store.stats().dirty_bytes == 4
    disk.gate.set()
    await store.flush()
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "s") == ["שלום"]


# -- what removes pending writes releases their bytes ---------------------------------------------


async def test_a_delete_and_an_erasure_release_their_bytes_and_wake_a_waiting_write(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(
        disk, max_dirty_bytes=100, backpressure_timeout_ms=20_000, retry_max_delay_ms=100
    )
    disk.fail = True  # every flush refused: only a delete can make room
    for sid, uid, text in (("a", 1, "a" * 60), ("b", 1, "ж" * 35), ("c", 2, "c" * 5)):
        await store.ensure_session(sid, user_id=uid)
        await store.append_message(sid, user_id=uid, role="user", content=text)
    assert store.stats().dirty_bytes == 100
    waiting = asyncio.create_task(store.append_message("b", user_id=1, role="user", content="more"))
    await asyncio.wait_for(disk.writing.wait(), 10)  # kicked a flush, refused
    assert not waiting.done()
    await store.delete_session("a", user_id=1)
    await asyncio.wait_for(waiting, 10)  # woken by the delete, not the timeout
    assert store.stats().dirty_bytes == 35 + 4 + 5
    assert await store.delete_user(1) == 1
    assert store.stats().dirty_bytes == 5  # user 2's session is still to be written
    await recovered(store, disk)
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, "a") == [] and on_disk(db_path, "b") == [] and on_disk(db_path, "c") == ["c" * 5]


def test_a_batch_whose_session_was_deleted_while_in_flight_releases_its_bytes_when_it_fails() -> None:
    tier = HotTier(10, 60.0, time.monotonic)
    now = utcnow()
    tier.insert(SessionRecord(id="s", user_id=1, created_at=now, updated_at=now, last_access_at=now))
    dirty = DirtyIndex(tier)
    dirty.mark("s", None, True, 7)
    batch = dirty.take(10, 10)
    dirty.mark("s", None, False, 5)  # written while in flight
    assert dirty.bytes == 12
    tier.remove("s")
    dirty.discard("s")
    assert dirty.bytes == 7  # the batch in flight still holds its own
    dirty.restore(batch)  # it failed: the session is gone, nothing to put back
    assert dirty.bytes == 0
    assert isinstance(batch[0].delta, SessionDelta)


# -- the unit -------------------------------------------------------------------------------------


async def test_text_is_counted_in_code_points_title_content_token_and_metadata(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="שלום עולם")  # 9 (UTF-8: 17)
    meta = {"lang": "中文", "emoji": "👩‍💻"}
    reply = await store.append_message("s", user_id=1, role="assistant", content="🙂中é", metadata=meta)
    await store.update_message("s", reply.id, user_id=1, append="ñ̃")  # n + combining tilde: 2
    await store.update_session("s", user_id=1, title="新しい")  # 3
    meta_text = orjson.dumps(meta).decode()
    assert store.stats().dirty_bytes == 9 + 3 + len(meta_text) + 2 + 3
    await store.update_message("s", reply.id, user_id=1, metadata={"k": "v"})  # metadata only: 9
    counted = 9 + 3 + len(meta_text) + 2 + 3 + 9
    assert store.stats().dirty_bytes == counted
    # A write refused at the call changed nothing, and counts nothing.
    with pytest.raises(ValidationError):
        await store.update_message("s", reply.id, user_id=1, append="\ud800 lone surrogate")
    with pytest.raises(ValidationError):
        await store.append_message("s", user_id=1, role="user", content="ok", metadata={"t": (1, 2)})
    with pytest.raises(NotFound):
        await store.update_message("s", reply.id, user_id=2, append="not yours")
    assert store.stats().dirty_bytes == counted
    await store.flush()
    assert store.stats().dirty_bytes == 0


# -- never written, never counted -----------------------------------------------------------------


async def test_anonymous_and_temporary_sessions_are_never_counted_nor_blocked(
    db_path: Path, make_store: StoreFactory
) -> None:
    disk = Disk(db_path)
    store = await make_store(disk, max_dirty_bytes=10, backpressure_timeout_ms=50)
    disk.gate.clear()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="0123456789")
    with pytest.raises(BackPressureError):
        await store.append_message("s", user_id=1, role="user", content="x")
    anon = await store.ensure_session(user_id=None, title="مجهول")
    temp = await store.ensure_session(user_id=1, persist=False, title="temp")
    for session in (anon, temp):
        reply = await store.append_message(session.id, user_id=session.user_id, role="assistant", content="")
        for _ in range(500):
            await store.update_message(session.id, reply.id, user_id=session.user_id, append=TOKEN)
        assert (await store.get_messages(session.id, user_id=session.user_id))[0].content == TOKEN * 500
    stats = store.stats()
    assert stats.dirty_bytes == 10
    assert stats.backpressure_rejections == 1
    disk.gate.set()
    await store.flush()
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, anon.id) == [] and on_disk(db_path, temp.id) == []


async def test_a_claimed_session_counts_its_whole_history_and_is_refused_at_the_bound(
    db_path: Path, make_store: StoreFactory
) -> None:
    """Claiming an anonymous session on sign-in makes its whole history wait for the disk
    at once: it is counted (title, contents, metadata), and a claim that finds the bound
    reached is refused, the session still the anonymous one's."""
    disk = Disk(db_path)
    store = await make_store(disk, max_dirty_bytes=20, backpressure_timeout_ms=50)
    disk.gate.clear()
    anon = await store.ensure_session(user_id=None, title="מסע")
    token = anon.user_binding_token
    await store.append_message(anon.id, user_id=None, role="user", content=TOKEN * 2, binding_token=token)
    await store.append_message(
        anon.id, user_id=None, role="assistant", content="好", metadata={"k": "v"}, binding_token=token
    )
    assert store.stats().dirty_bytes == 0
    # Under the bound when it starts: let through (the backlog passes the bound by one write).
    await store.claim(anon.id, user_id=1, binding_token=token)
    assert store.stats().dirty_bytes == 3 + 2 * len(TOKEN) + 1 + len(orjson.dumps({"k": "v"}))
    # A second claim with the bound reached: refused, nothing changed.
    other = await store.ensure_session(user_id=None, title="x")
    theirs = other.user_binding_token
    await store.append_message(other.id, user_id=None, role="user", content="y" * 300, binding_token=theirs)
    with pytest.raises(BackPressureError):
        await store.claim(other.id, user_id=1, binding_token=theirs)
    assert (await store.get_session(other.id, user_id=None, binding_token=theirs)).user_id is None
    disk.gate.set()
    await store.flush()
    assert store.stats().dirty_bytes == 0
    assert on_disk(db_path, anon.id) == [TOKEN * 2, "好"]
    assert on_disk(db_path, other.id) == []


async def test_a_session_the_disk_refuses_for_good_holds_back_only_itself(
    db_path: Path, make_store: StoreFactory
) -> None:
    """A session refused `POISON_AFTER` times (a trigger refuses its text here) is kept in
    memory and no longer tried: its text must not count against everyone's writes (or one
    bad record would refuse every persisted write, for every user, until a restart). Its
    own writes are bounded by the text of such sessions; deleting it releases it."""
    store = await make_store(max_dirty_bytes=100, backpressure_timeout_ms=50)
    await store.ensure_session("bad", user_id=1)
    await store.flush()
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content LIKE '%POISON%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    bad = await store.append_message("bad", user_id=1, role="user", content="POISON 词🙂 " * 12)  # 120
    for _ in range(4):
        with contextlib.suppress(StorageError):
            await store.flush()
    stats = store.stats()
    assert stats.poisoned_sessions == 1 and stats.dirty_bytes == 120
    # Everyone else writes on, and reaches the disk.
    for i in range(3):
        await store.ensure_session(f"good{i}", user_id=2, title="好")
        await store.append_message(f"good{i}", user_id=2, role="user", content="fine ✓")
    await store.flush()
    assert on_disk(db_path, "good2") == ["fine ✓"]
    # The refused session itself: over the bound, refused, nothing applied.
    with pytest.raises(BackPressureError, match="refuses"):
        await store.update_message("bad", bad.id, user_id=1, append=" more")
    assert (await store.get_messages("bad", user_id=1))[0].content == "POISON 词🙂 " * 12
    await store.delete_session("bad", user_id=1)
    assert store.stats().dirty_bytes == 0
    await store.ensure_session("good3", user_id=2)
    await store.append_message("good3", user_id=2, role="user", content="x" * 150)
