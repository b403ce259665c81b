"""What a caller relies on when it asks for the disk: a durable write is in the file when
it returns, a read racing an erasure cannot bring the erased session back, and a recovery
file is either replayed or refused loudly, never lost. Real SQLite files, checked with a
plain sqlite3 connection."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    ClosedError,
    Config,
    NotFound,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindStore,
)

from .conftest import QUIET, StoreFactory
from .reliability.helpers import integrity, on_disk


def rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


# -- durable writes -------------------------------------------------------------------------


async def test_durable_update_message_is_in_the_file_when_it_returns(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()  # no flush on an interval: only `durable` writes reach the file
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="The ", durable=True)
    assert on_disk(db_path) == {"s": {1: "The "}}
    await store.update_message("s", reply.id, user_id=1, append="answer.", durable=True)
    assert on_disk(db_path) == {"s": {1: "The answer."}}
    await store.update_message("s", reply.id, user_id=1, content="Replaced.", metadata={"k": 1}, durable=True)
    [(content, metadata)] = rows(db_path, "SELECT content, metadata FROM messages")
    assert content == "Replaced." and json.loads(metadata) == {"k": 1}


async def test_durable_update_session_is_in_the_file_when_it_returns(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="first", durable=True)
    assert rows(db_path, "SELECT id, title, status FROM sessions") == [("s", "first", "active")]
    await store.update_session("s", user_id=1, title="renamed", status="archived", durable=True)
    assert rows(db_path, "SELECT id, title, status FROM sessions") == [("s", "renamed", "archived")]
    await store.update_session("s", user_id=1, title=None, durable=True)
    assert rows(db_path, "SELECT title FROM sessions") == [(None,)]


async def test_durable_claim_writes_the_whole_session_under_its_new_owner(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    anon = await store.ensure_session(user_id=None, binding_token="cookie", durable=True)
    for i in range(3):
        await store.append_message(
            anon.id, user_id=None, role="user", content=f"m{i}", binding_token="cookie", durable=True
        )
    assert on_disk(db_path) == {}  # anonymous: durable asks nothing of the disk
    claimed = await store.claim(anon.id, user_id="alice", binding_token="cookie", durable=True)
    assert claimed.user_id == "alice"
    assert rows(db_path, "SELECT id, user_id, message_count FROM sessions") == [(anon.id, "alice", 3)]
    assert on_disk(db_path) == {anon.id: {1: "m0", 2: "m1", 3: "m2"}}


async def test_a_durable_write_reports_a_refusing_disk_and_keeps_the_data(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(retry_max_delay_ms=20)
    await store.ensure_session("s", user_id=1, durable=True)
    reply = await store.append_message("s", user_id=1, role="assistant", content="", durable=True)
    assert isinstance(store.backend, SQLiteBackend)
    conn = store.backend.writer
    await conn.execute("PRAGMA query_only = ON")  # the disk refuses every write now
    with pytest.raises(StorageError, match="readonly"):
        await store.update_message("s", reply.id, user_id=1, append="kept", durable=True)
    with pytest.raises(StorageError):
        await store.update_session("s", user_id=1, title="kept too", durable=True)
    record = await store.get_session("s", user_id=1)
    assert record.title == "kept too" and record.messages[0].content == "kept"  # served from memory
    await conn.execute("PRAGMA query_only = OFF")
    async with asyncio.timeout(30):
        while True:
            try:
                await store.flush()
                break
            except StorageError:
                await asyncio.sleep(0.02)  # backing off until the retry
    assert on_disk(db_path) == {"s": {1: "kept"}}
    assert rows(db_path, "SELECT title FROM sessions") == [("kept too",)]


# -- a read racing an erasure ---------------------------------------------------------------


class HeldLoads(SQLiteBackend):
    """A real SQLite backend whose loads read the file, then wait for the test: a load
    "in flight" that already holds what it read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def load_session(self, session_id: str) -> Any:
        record = await super().load_session(session_id)
        self.read.set()
        await asyncio.wait_for(self.release.wait(), 30)
        return record


async def saved_session(db_path: Path, sid: str, user: int) -> None:
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        await store.ensure_session(sid, user_id=user)
        await store.append_message(sid, user_id=user, role="user", content="to be erased")


@pytest.mark.parametrize("erase", ["delete_session", "delete_user"])
async def test_a_load_in_flight_cannot_bring_back_a_session_erased_meanwhile(
    db_path: Path, erase: str
) -> None:
    await saved_session(db_path, "s", 1)
    backend = HeldLoads(db_path)
    async with WriteBehindStore(SessionStore(), backend, config=Config(db_path=db_path, **QUIET)) as store:
        reading = asyncio.create_task(store.get_session("s", user_id=1))
        await backend.read.wait()  # the load holds the session as it was before the erasure
        if erase == "delete_session":
            await store.delete_session("s", user_id=1)
        else:
            assert await store.delete_user(1) == 1
        backend.release.set()
        with pytest.raises(NotFound):
            await reading
        with pytest.raises(NotFound):
            await store.get_session("s", user_id=1)
        assert await store.list_sessions(1) == []
        await store.flush()
    assert on_disk(db_path) == {}


# -- the recovery file ----------------------------------------------------------------------


class RefusingBackend(SQLiteBackend):
    """Refuses every flush, as a full disk would, until told otherwise."""

    refuse = True

    async def write_batch(self, deltas: Any, *args: Any) -> Any:
        if self.refuse:
            raise StorageError(f"{self.path}: write_batch failed: database or disk is full")
        return await super().write_batch(deltas, *args)


async def close_into_recovery(db_path: Path, sessions: dict[str, tuple[int, list[str]]]) -> None:
    """A store whose disk refuses everything: at shutdown what it holds goes to the recovery
    file, the default one beside the database."""
    config = Config(db_path=db_path, shutdown_timeout_seconds=0.2, retry_max_delay_ms=20, **QUIET)
    store = WriteBehindStore(SessionStore(), RefusingBackend(db_path), config=config)
    await store.start()
    for sid, (user, contents) in sessions.items():
        await store.ensure_session(sid, user_id=user)
        for text in contents:
            await store.append_message(sid, user_id=user, role="user", content=text)
    await store.aclose()


CORRUPT = {
    "not JSON": b"\x00\x01 definitely not json",
    "cut short": b'{"format": 1, "sessions": [{"id": "s"',
    "unknown format": b'{"format": 99, "sessions": []}',
    "no sessions": b'{"format": 1}',
}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
async def test_a_corrupt_recovery_file_stops_start_and_is_left_in_place(db_path: Path, damage: str) -> None:
    await saved_session(db_path, "before", 1)
    recovery = db_path.with_name(db_path.name + ".recovery")
    recovery.write_bytes(CORRUPT[damage])
    store = WriteBehindStore.from_config(Config(db_path=db_path))
    with pytest.raises(StorageError) as raised:
        await store.start()
    assert str(recovery) in str(raised.value)
    assert recovery.read_bytes() == CORRUPT[damage]
    with pytest.raises(ClosedError):  # not started: it takes no writes it could not keep
        await store.ensure_session("s", user_id=1)
    # The database was closed again, untouched: once a person moves the file away, it opens.
    recovery.rename(recovery.with_name("moved-aside"))
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as again:
        assert (await again.get_session("before", user_id=1)).messages[0].content == "to be erased"
    assert integrity(db_path) == "ok"


async def test_recovery_replay_onto_a_session_changed_since_loses_nothing(
    db_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await saved_session(db_path, "s", 1)  # on disk: "to be erased"
    await close_into_recovery(db_path, {"s": (1, ["recovered 1", "recovered 2"])})
    recovery = db_path.with_name(db_path.name + ".recovery")
    assert recovery.exists()
    # Meanwhile another writer (an instance with a recovery file of its own) moves the session on.
    other = WriteBehindStore(
        SessionStore(),
        SQLiteBackend(db_path),
        config=Config(db_path=db_path, **QUIET),
        recovery_path=tmp_path / "other.recovery",
    )
    async with other as store:
        await store.append_message("s", user_id=1, role="user", content="the other writer's")
    caplog.set_level(logging.INFO, logger="writebehind")

    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        record = await store.get_session("s", user_id=1)
    assert not recovery.exists()  # replayed: the next start does not replay it again
    disk = set(on_disk(db_path).get("s", {}).values())
    assert {"to be erased", "the other writer's"} <= disk  # the other writer's work stands
    kept = b"".join(p.read_bytes() for p in db_path.parent.glob(recovery.name + "*"))
    for text in ("recovered 1", "recovered 2"):
        assert text in disk or text.encode() in kept, f"{text!r} is neither on disk nor kept"
    assert {m.content for m in record.messages} == disk
    assert any(r.name == "writebehind" and str(recovery) in r.getMessage() for r in caplog.records)
    assert integrity(db_path) == "ok"


async def test_a_recovery_session_the_database_refuses_is_kept_and_the_others_land(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await close_into_recovery(
        db_path, {"rejected-chat": (1, ["POISON for the trigger"]), "good": (2, ["fine"])}
    )
    with sqlite3.connect(db_path) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.content LIKE '%POISON%' "
            "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END"
        )
    recovery = db_path.with_name(db_path.name + ".recovery")
    caplog.set_level(logging.INFO, logger="writebehind")
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        assert (await store.get_session("good", user_id=2)).messages[0].content == "fine"
    assert on_disk(db_path) == {"good": {1: "fine"}}
    assert not recovery.exists()
    kept = list(db_path.parent.glob(recovery.name + "*"))
    assert kept and any(b"POISON for the trigger" in p.read_bytes() for p in kept)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "rejected-chat" in logged and "POISON" not in logged  # names the session, never the content


async def test_start_twice_is_harmless_and_a_closed_store_stays_closed(db_path: Path) -> None:
    store = WriteBehindStore.from_config(Config(db_path=db_path, **QUIET))
    await store.start()
    await store.start()  # already running: nothing happens, nothing is replayed twice
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="kept")
    await store.aclose()
    with pytest.raises(ClosedError, match="make a new one"):
        await store.start()
    assert on_disk(db_path) == {"s": {1: "kept"}}
