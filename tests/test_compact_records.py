"""The compact records (issue 13): a `StoredMessage` built cheaply (from a row, on an append,
token by token) is the same frozen, typed record as one built by hand; a cold load gives
back exactly what was written; a flush writes exactly the rows the records hold, on both
backends, whichever way each row was made (an append's ready-made row, an edit's, a row
made again after a failed flush)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from writebehind import SessionRecord, SQLiteBackend, StorageError, StoredMessage, ValidationError
from writebehind.backends.base import Backend, SessionDelta
from writebehind.model import edited_message, message_from_row, new_message, to_micros

from .conftest import StoreFactory
from .pg import postgres_schema

USER = 42
# Emoji (astral, ZWJ sequence), CJK, RTL with a mark, combining marks, a lone combining mark.
TEXTS = [
    "hello 👋🏽 👨‍👩‍👧",
    "汉字かなカナ한글",
    "שלום عربي \u200f!",
    "e\u0301 n\u0303 a\u030a",
    "\u0301 starts with a combining mark",
    "",
]
T0 = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def _row_of(sid: str, m: StoredMessage) -> tuple[Any, ...]:
    return (
        sid,
        m.seq,
        m.id,
        m.role,
        m.content,
        to_micros(m.created_at),
        to_micros(m.updated_at),
        m.metadata_json,
    )


def _disk_rows(path: Path, sid: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT session_id, seq, id, role, content, created_at, updated_at, metadata FROM messages"
            " WHERE session_id = ? ORDER BY seq",
            (sid,),
        ).fetchall()
    finally:
        conn.close()


# -- the record ----------------------------------------------------------------------------------


def test_every_way_of_building_a_message_gives_the_same_frozen_record() -> None:
    by_hand = StoredMessage("m1", 1, "user", "héllo 👋", T0, T0, '{"a":1}')
    appended = new_message("s", "m1", 1, "user", "héllo 👋", T0, to_micros(T0), '{"a":1}')
    loaded = message_from_row(1, "m1", "user", "héllo 👋", to_micros(T0), to_micros(T0), '{"a":1}')
    for m in (appended, loaded):
        assert type(m) is StoredMessage
        assert m == by_hand and hash(m) == hash(by_hand) and repr(m) == repr(by_hand)
        assert m.created_at == T0 and m.updated_at == T0 and m.created_at.tzinfo is UTC
        assert m.created_us == to_micros(T0) and m.metadata == {"a": 1}
        assert copy.deepcopy(m) == m and pickle.loads(pickle.dumps(m)) == m
        assert dataclasses.replace(m, seq=2) == StoredMessage("m1", 2, "user", "héllo 👋", T0, T0, '{"a":1}')
        assert [f.name for f in dataclasses.fields(m)] == [
            "id",
            "seq",
            "role",
            "content",
            "created_at",
            "updated_at",
            "metadata_json",
        ]
        for name in ("id", "seq", "content", "created_at", "updated_at", "metadata_json", "_text", "_row"):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(m, name, "changed")
        assert m == by_hand  # nothing changed


def test_tokens_build_every_version_exactly_and_older_versions_never_change() -> None:
    message = new_message("s", "m", 1, "assistant", "", T0, to_micros(T0), None)
    versions = [message]
    expected = [""]
    tokens = [TEXTS[i % len(TEXTS)] + str(i) for i in range(500)]
    for i, token in enumerate(tokens):
        if i % 97 == 0:
            assert message.content == expected[-1]  # reading in between changes nothing
        message = edited_message(message, T0 + timedelta(microseconds=i), None, token, None)
        versions.append(message)
        expected.append(expected[-1] + token)
    # A token appended to an older version starts a branch of its own.
    branch = edited_message(versions[100], T0, None, "⟨branch⟩", None)
    assert branch.content == expected[100] + "⟨branch⟩"
    for version, text in zip(versions, expected, strict=True):
        assert version.content == text
    assert versions[-1].updated_at == T0 + timedelta(microseconds=499)
    assert versions[-1].created_at == T0
    replaced = edited_message(versions[-1], T0, "new text", None, '{"k":"v"}')
    assert replaced.content == "new text" and replaced.metadata == {"k": "v"}
    assert versions[-1].content == expected[-1]


async def test_the_size_limit_counts_every_token_of_a_long_reply(make_store: StoreFactory) -> None:
    store = await make_store(max_message_bytes=4000)
    sid = (await store.ensure_session(user_id=USER)).id
    mid = (await store.append_message(sid, user_id=USER, role="assistant", content="")).id
    for _ in range(1000):  # 4 bytes a token: exactly the limit
        await store.update_message(sid, mid, user_id=USER, append="👋")
    with pytest.raises(ValidationError, match="content"):
        await store.update_message(sid, mid, user_id=USER, append="x")
    (message,) = await store.get_messages(sid, user_id=USER)
    assert message.content == "👋" * 1000


# -- SQLite: a cold load gives back what was written; a flush writes what the records hold ---------


async def _conversation(store: Any, sid: str) -> None:
    await store.ensure_session(sid, user_id=USER, title="t")
    for i, text in enumerate(TEXTS):
        await store.append_message(
            sid, user_id=USER, role="user", content=text, metadata={"i": i, "t": text} if i % 2 else None
        )
    reply = await store.append_message(sid, user_id=USER, role="assistant", content="")
    for i in range(300):
        await store.update_message(sid, reply.id, user_id=USER, append=TEXTS[i % len(TEXTS)][:3])


async def test_a_cold_load_gives_back_exactly_what_was_written(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await _conversation(store, "s")
    written = await store.get_session("s", user_id=USER)
    await store.aclose()

    again = await make_store()
    loaded = await again.get_session("s", user_id=USER)
    assert loaded.messages == written.messages
    for a, b in zip(loaded.messages, written.messages, strict=True):
        assert (a.created_at, a.updated_at) == (b.created_at, b.updated_at)  # to the microsecond
        assert a.content == b.content and a.metadata == b.metadata
    # The read itself moved last_access_at; everything else is as written.
    assert dataclasses.replace(loaded, last_access_at=written.last_access_at) == written


async def test_the_flush_writes_the_rows_the_records_hold(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await _conversation(store, "s")
    await store.flush()
    session = await store.get_session("s", user_id=USER)
    assert _disk_rows(db_path, "s") == [_row_of("s", m) for m in session.messages]

    # Edits after the flush: an upsert of those rows, the others untouched.
    first = session.messages[0]
    await store.update_message("s", first.id, user_id=USER, content="réécrit ✍️", metadata={"v": 2})
    await store.update_message("s", session.messages[-1].id, user_id=USER, append=" fin")
    await store.append_message("s", user_id=USER, role="user", content="après")
    await store.flush()
    session = await store.get_session("s", user_id=USER)
    assert _disk_rows(db_path, "s") == [_row_of("s", m) for m in session.messages]


async def test_rows_made_again_after_a_failed_flush_are_the_same(
    make_store: StoreFactory, db_path: Path
) -> None:
    """A failed flush has let go of the appended messages' ready-made rows: the next one
    makes them again, and writes the same."""
    store = await make_store(retry_max_delay_ms=1)
    await _conversation(store, "s")
    backend = store.backend
    assert isinstance(backend, SQLiteBackend)
    await backend.writer.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageError):
        await store.flush()
    assert _disk_rows(db_path, "s") == []
    await backend.writer.execute("PRAGMA query_only = OFF")
    for _ in range(100):  # past the retry backoff
        try:
            await store.flush()
            break
        except StorageError:
            continue
    session = await store.get_session("s", user_id=USER)
    assert _disk_rows(db_path, "s") == [_row_of("s", m) for m in session.messages]
    assert store.stats().dirty_sessions == 0


# -- both backends: the write path of each, records in and out -------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        backend = SQLiteBackend(tmp_path / "records.db")
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()
    else:
        async with postgres_schema() as pg:
            yield pg


async def test_each_backend_stores_and_loads_every_kind_of_message(any_backend: Backend) -> None:
    sid = "s1"
    appended = [
        new_message(sid, f"m{i}", i + 1, "user", text, T0, to_micros(T0), None if i % 2 else '{"n":1}')
        for i, text in enumerate(TEXTS)
    ]
    streamed = new_message(sid, "r", len(appended) + 1, "assistant", "", T0, to_micros(T0), None)
    for i in range(200):
        streamed = edited_message(
            streamed, T0 + timedelta(seconds=1, microseconds=i), None, TEXTS[i % 5][:2], None
        )
    by_hand = StoredMessage("h", len(appended) + 2, "tool", "by hand 🛠", T0, T0 + timedelta(microseconds=1))
    messages = (*appended, streamed, by_hand)
    record = SessionRecord(sid, USER, T0, T0, T0)
    result = await any_backend.write_batch([SessionDelta(record, messages, len(messages))])
    assert result.versions == {sid: 1}
    loaded = await any_backend.load_session(sid)
    assert loaded is not None and loaded.messages == messages

    # Written again (an upsert of rows already stored), edited: the loaded record follows.
    edited = edited_message(loaded.messages[0], T0 + timedelta(days=1), "édité", None, None)
    again = dataclasses.replace(record, version=1)
    await any_backend.write_batch([SessionDelta(again, (edited, *loaded.messages[1:]), len(messages))])
    reloaded = await any_backend.load_session(sid)
    assert reloaded is not None and reloaded.messages == (edited, *messages[1:])
