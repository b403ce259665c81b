"""Invariant 10: bad input fails at the call, with a typed error naming the field, and
changes nothing in memory or on disk."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from writebehind import NotFound, SessionRecord, ValidationError, WriteBehindError, WriteBehindStore

from .conftest import StoreFactory

Call = Callable[[WriteBehindStore, str], Awaitable[Any]]


class NotJSON:
    pass


deep: dict[str, Any] = {}
cursor = deep
for _ in range(300):
    cursor["x"] = {}
    cursor = cursor["x"]

BAD_CALLS: list[tuple[str, str, Call]] = [
    ("session_id", "empty id", lambda s, m: s.get_session("", user_id=1)),
    ("session_id", "id with a slash", lambda s, m: s.append_message("a/b", user_id=1, role="user", content="x")),
    ("session_id", "id too long", lambda s, m: s.ensure_session("x" * 129, user_id=1)),
    ("session_id", "id not a str", lambda s, m: s.get_session(42, user_id=1)),  # type: ignore[arg-type]
    ("session_id", "lone surrogate id", lambda s, m: s.ensure_session("a\ud800", user_id=1)),
    ("user_id", "bool user", lambda s, m: s.get_session("s", user_id=True)),
    ("user_id", "float user", lambda s, m: s.get_session("s", user_id=1.5)),  # type: ignore[arg-type]
    ("user_id", "int past 64 bits", lambda s, m: s.ensure_session("t", user_id=2**63)),
    ("user_id", "surrogate user", lambda s, m: s.ensure_session("t", user_id="\udc80")),
    ("user_id", "None for delete_user", lambda s, m: s.delete_user(None)),  # type: ignore[arg-type]
    ("role", "unknown role", lambda s, m: s.append_message("s", user_id=1, role="robot", content="x")),
    ("content", "content not str", lambda s, m: s.append_message("s", user_id=1, role="user", content=b"x")),  # type: ignore[arg-type]
    ("content", "oversized content", lambda s, m: s.append_message("s", user_id=1, role="user", content="x" * 2049)),
    ("content", "oversized multibyte content", lambda s, m: s.append_message("s", user_id=1, role="user", content="é" * 1025)),
    ("content", "NUL in content", lambda s, m: s.append_message("s", user_id=1, role="user", content="a\x00b")),
    ("title", "NUL in title", lambda s, m: s.update_session("s", user_id=1, title="\x00")),
    ("content", "lone surrogate content", lambda s, m: s.append_message("s", user_id=1, role="user", content="hi \ud83d")),
    ("content", "oversized replacement", lambda s, m: s.update_message("s", m, user_id=1, content="x" * 5000)),
    ("append", "surrogate token", lambda s, m: s.update_message("s", m, user_id=1, append="\udfff")),
    ("content", "token that overflows the message", lambda s, m: s.update_message("s", m, user_id=1, append="x" * 2045)),
    ("append", "content and append", lambda s, m: s.update_message("s", m, user_id=1, content="a", append="b")),
    ("metadata", "metadata not a dict", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata=[1])),  # type: ignore[arg-type]
    ("metadata", "non-encodable metadata", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata={"o": NotJSON()})),
    ("metadata", "non-str keys", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata={1: "a"})),  # type: ignore[dict-item]
    ("metadata", "NaN", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata={"n": float("nan")})),
    ("metadata", "tuple", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata={"t": (1, 2)})),
    ("metadata", "too deep", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", metadata=deep)),
    ("metadata", "surrogate in metadata", lambda s, m: s.update_message("s", m, user_id=1, metadata={"k": "\ud800"})),
    ("message_id", "duplicate message id", lambda s, m: s.append_message("s", user_id=1, role="user", content="x", message_id=m)),
    ("message_id", "bad message id", lambda s, m: s.update_message("s", "no such/id", user_id=1, append="x")),
    ("status", "bad status", lambda s, m: s.update_session("s", user_id=1, status="Not OK")),
    ("title", "surrogate title", lambda s, m: s.update_session("s", user_id=1, title="\ud800")),
    ("title", "oversized title", lambda s, m: s.update_session("s", user_id=1, title="t" * 2000)),
    ("limit", "negative limit", lambda s, m: s.get_messages("s", user_id=1, limit=-1)),
    ("after_seq", "negative after_seq", lambda s, m: s.get_messages("s", user_id=1, after_seq=-1)),
    ("offset", "negative offset", lambda s, m: s.list_sessions(1, offset=-3)),
]  # fmt: skip


def peek(store: WriteBehindStore, session_id: str) -> SessionRecord:
    """The hot tier's record without touching it (a read would move last_access_at)."""
    session = store.hot.tier.peek(session_id)
    assert session is not None
    return session.snapshot()


def dump(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as conn:
        return list(conn.iterdump())


async def seeded(make_store: StoreFactory) -> tuple[WriteBehindStore, str]:
    store = await make_store(max_message_bytes=2048)
    await store.ensure_session("s", user_id=1, title="seed")
    message = await store.append_message("s", user_id=1, role="user", content="hello", metadata={"a": 1})
    await store.flush()
    return store, message.id


@pytest.mark.parametrize(("field", "case", "call"), BAD_CALLS, ids=[c[1] for c in BAD_CALLS])
async def test_bad_input_raises_a_typed_error_and_changes_nothing(
    make_store: StoreFactory, db_path: Path, field: str, case: str, call: Call
) -> None:
    store, message_id = await seeded(make_store)
    memory_before = peek(store, "s")
    disk_before = dump(db_path)
    stats_before = store.stats()

    with pytest.raises(ValidationError) as info:
        await call(store, message_id)

    assert isinstance(info.value, WriteBehindError)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert "hello" not in str(info.value)  # never echoes content
    assert peek(store, "s") == memory_before
    assert store.stats().dirty_sessions == stats_before.dirty_sessions == 0
    await store.flush()
    assert dump(db_path) == disk_before


async def test_unknown_session_and_message_raise_not_found(make_store: StoreFactory) -> None:
    store, _ = await seeded(make_store)
    with pytest.raises(NotFound, match="session 'ghost' not found"):
        await store.append_message("ghost", user_id=1, role="user", content="x")
    with pytest.raises(NotFound, match="message 'ghost' not found in session 's'"):
        await store.update_message("s", "ghost", user_id=1, append="x")
    with pytest.raises(NotFound):
        await store.delete_session("ghost", user_id=1)
    assert store.stats().dirty_sessions == 0


async def test_values_that_pass_validation_round_trip_exactly(make_store: StoreFactory) -> None:
    store = await make_store()
    odd = "emoji 🎉, RTL \u202e, CJK 漢字, tab\tand newline\n"
    metadata = {"nested": {"list": [1, 2.5, True, None, "x"]}, "": "empty key", "big": 2**62, "nul": "a\x00b"}
    await store.ensure_session("odd", user_id="ülrich", title=odd)
    await store.append_message("odd", user_id="ülrich", role="tool", content=odd, metadata=metadata)
    await store.append_message("odd", user_id="ülrich", role="system", content="")
    await store.aclose()
    again = await make_store()
    record = await again.get_session("odd", user_id="ülrich")
    assert record.title == odd
    assert record.messages[0].content == odd and record.messages[0].metadata == metadata
    assert record.messages[1].content == ""
