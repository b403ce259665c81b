"""The plain in-memory `SessionStore` on its own: what an app has today, made bounded."""

from __future__ import annotations

import pytest

from writebehind import UNSET, NotFound, SessionStore, ValidationError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_append_stream_and_read_back() -> None:
    store = SessionStore()
    session = await store.ensure_session(user_id=1, title="hello")
    first = await store.append_message(session.id, user_id=1, role="user", content="hi")
    reply = await store.append_message(session.id, user_id=1, role="assistant", content="")
    for token in ("Hel", "lo", "!"):
        reply = await store.update_message(session.id, reply.id, user_id=1, append=token)
    assert (first.seq, reply.seq, reply.content) == (1, 2, "Hello!")
    record = await store.get_session(session.id, user_id=1)
    assert [m.content for m in record.messages] == ["hi", "Hello!"]
    assert record.updated_at >= record.created_at
    assert await store.get_messages(session.id, user_id=1, after_seq=1) == (reply,)
    assert await store.get_messages(session.id, user_id=1, after_seq=0, limit=1) == (first,)
    assert await store.get_messages(session.id, user_id=1, after_seq=5) == ()


async def test_records_are_snapshots() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id=1)
    before = await store.get_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="later")
    assert before.messages == ()


async def test_update_session_distinguishes_unset_from_none() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id=1, title="t")
    assert (await store.update_session("s", user_id=1, status="archived")).title == "t"
    assert (await store.update_session("s", user_id=1, title=None)).title is None
    assert (await store.update_session("s", user_id=1, title=UNSET)).status == "archived"


async def test_update_message_metadata_and_replace() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id=1)
    m = await store.append_message("s", user_id=1, role="user", content="a", metadata={"x": 1})
    m2 = await store.update_message("s", m.id, user_id=1, content="b")
    assert (m2.content, m2.metadata, m2.seq) == ("b", {"x": 1}, 1)
    m3 = await store.update_message("s", m.id, user_id=1, metadata=None)
    assert (m3.content, m3.metadata) == ("b", None)


async def test_metadata_is_copied_in() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id=1)
    meta = {"list": [1]}
    await store.append_message("s", user_id=1, role="user", content="a", metadata=meta)
    meta["list"].append(2)
    assert (await store.get_session("s", user_id=1)).messages[0].metadata == {"list": [1]}


async def test_lru_bounds_memory_and_indexes_stay_consistent() -> None:
    store = SessionStore(maxsize=3)
    for i in range(5):
        await store.ensure_session(f"s{i}", user_id=1)
    await store.get_session("s2", user_id=1)  # touch: s2 becomes most recent
    await store.ensure_session("s5", user_id=1)
    listed = {s.id for s in await store.list_sessions(1)}
    assert listed == {"s2", "s4", "s5"}
    assert store.stats().evictions == 3 and store.stats().hot_sessions == 3
    with pytest.raises(NotFound):
        await store.get_session("s0", user_id=1)


async def test_list_sessions_newest_first_and_paginated() -> None:
    store = SessionStore()
    for i in range(4):
        await store.ensure_session(f"s{i}", user_id="u")
    await store.append_message("s1", user_id="u", role="user", content="bump")
    ids = [s.id for s in await store.list_sessions("u")]
    assert ids[0] == "s1" and sorted(ids) == ["s0", "s1", "s2", "s3"]
    assert [s.id for s in await store.list_sessions("u", limit=2, offset=1)] == ids[1:3]
    assert await store.list_sessions(None) == []  # type: ignore[arg-type]


async def test_anonymous_sessions_expire_when_idle() -> None:
    clock = Clock()
    store = SessionStore(anon_ttl_seconds=60, monotonic=clock)
    anon = await store.ensure_session(user_id=None)
    await store.ensure_session("signed-in", user_id=1)
    clock.now += 59
    await store.get_session(anon.id, user_id=None)  # access resets the idle clock
    clock.now += 59
    await store.get_session(anon.id, user_id=None)
    clock.now += 61
    with pytest.raises(NotFound):
        await store.get_session(anon.id, user_id=None)
    await store.get_session("signed-in", user_id=1)  # signed-in sessions do not expire
    assert store.stats().expired == 1


async def test_idle_anonymous_sessions_are_swept_on_insert_without_access() -> None:
    clock = Clock()
    store = SessionStore(anon_ttl_seconds=10, monotonic=clock)
    for _ in range(5):
        await store.ensure_session(user_id=None)
    clock.now += 11
    await store.ensure_session(user_id=None)
    assert store.stats().hot_sessions == 1 and store.stats().expired == 5


async def test_binding_token_guards_anonymous_sessions() -> None:
    store = SessionStore()
    anon = await store.ensure_session(user_id=None, binding_token="cookie-1", csrf_token="csrf")
    assert "cookie-1" not in repr(anon) and "csrf" not in repr(anon)
    await store.append_message(anon.id, user_id=None, role="user", content="hi", binding_token="cookie-1")
    for token in (None, "cookie-2"):
        with pytest.raises(NotFound):
            await store.get_session(anon.id, user_id=None, binding_token=token)
    with pytest.raises(NotFound):
        await store.get_session(anon.id, user_id=5)


async def test_claim_moves_an_anonymous_session_to_the_user() -> None:
    store = SessionStore()
    anon = await store.ensure_session(user_id=None, binding_token="b")
    await store.append_message(anon.id, user_id=None, role="user", content="hi", binding_token="b")
    with pytest.raises(NotFound):
        await store.claim(anon.id, user_id=1, binding_token="wrong")
    claimed = await store.claim(anon.id, user_id=1, binding_token="b")
    assert claimed.user_id == 1 and claimed.messages[0].content == "hi"
    assert [s.id for s in await store.list_sessions(1)] == [anon.id]
    with pytest.raises(NotFound):
        await store.get_session(anon.id, user_id=None, binding_token="b")
    assert (await store.claim(anon.id, user_id=1)).user_id == 1  # again: a no-op
    with pytest.raises(NotFound):
        await store.claim(anon.id, user_id=2)
    with pytest.raises(ValidationError):
        await store.claim(anon.id, user_id=None)  # type: ignore[arg-type]


async def test_delete_session_and_user() -> None:
    store = SessionStore()
    for i in range(3):
        await store.ensure_session(f"a{i}", user_id=1)
    await store.ensure_session("b", user_id=2)
    await store.delete_session("a0", user_id=1)
    with pytest.raises(NotFound):
        await store.delete_session("a0", user_id=1)
    assert await store.delete_user(1) == 2
    assert await store.list_sessions(1) == []
    assert [s.id for s in await store.list_sessions(2)] == ["b"]


async def test_ensure_session_returns_the_existing_one_unchanged() -> None:
    store = SessionStore()
    created = await store.ensure_session("s", user_id=1, title="first")
    again = await store.ensure_session("s", user_id=1, title="second")
    assert again.title == "first" and again.created_at == created.created_at
