"""Who may read, delete, claim and list what, for anonymous callers and for sessions not in
memory: under the default policy (anonymous sessions live in memory only) and under a
policy that persists anonymous sessions too (`PersistencePolicy` is public, and the hot
tier already honours it). Another user's session always answers exactly like a missing one,
and a refusal changes nothing in memory or on disk. Real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from writebehind import Config, NotFound, SessionStore, SQLiteBackend, WriteBehindStore
from writebehind.model import UserId
from writebehind.policy import PersistencePolicy, authenticated_only, persist_nothing

from .conftest import QUIET
from .reliability.helpers import on_disk


def persist_everything(session_id: str, user_id: UserId | None) -> bool:
    """A policy some apps choose: anonymous chats survive a restart too."""
    return True


Opener = Callable[..., Coroutine[Any, Any, WriteBehindStore]]


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[Opener]:
    """`await open_store(policy, hot=None)`: a started store on `db_path`, closed at the end
    (also when the test fails half way)."""
    stores: list[WriteBehindStore] = []

    async def opener(
        policy: PersistencePolicy = authenticated_only, hot: SessionStore | None = None
    ) -> WriteBehindStore:
        store = WriteBehindStore(
            hot or SessionStore(),
            SQLiteBackend(db_path),
            config=Config(db_path=db_path, **QUIET),
            policy=policy,
        )
        await store.start()
        stores.append(store)
        return store

    yield opener
    for store in stores:
        await store.aclose()


def rows(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT id, user_id FROM sessions ORDER BY id").fetchall()


# -- the default policy ---------------------------------------------------------------------------


async def test_deleting_an_anonymous_session_needs_its_token_and_touches_only_memory(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store()
    await store.ensure_session("anon", user_id=None, binding_token="browser-a")
    await store.append_message("anon", user_id=None, binding_token="browser-a", role="user", content="hi")
    with pytest.raises(NotFound) as caught:
        await store.delete_session("anon", user_id=None, binding_token="browser-b")
    assert str(caught.value) == "session 'anon' not found"
    assert len((await store.get_session("anon", user_id=None, binding_token="browser-a")).messages) == 1
    await store.delete_session("anon", user_id=None, binding_token="browser-a")
    with pytest.raises(NotFound):
        await store.get_session("anon", user_id=None, binding_token="browser-a")
    await store.flush()
    assert rows(db_path) == []  # never written, before or after


async def test_an_anonymous_caller_cannot_delete_a_signed_in_session_not_in_memory(
    open_store: Opener, db_path: Path
) -> None:
    first = await open_store()
    await first.ensure_session("s", user_id=42)
    await first.append_message("s", user_id=42, role="user", content="mine")
    await first.aclose()
    store = await open_store()  # "s" is on disk only now
    for missing in ("s", "never-existed"):
        with pytest.raises(NotFound) as caught:
            await store.delete_session(missing, user_id=None)
        assert str(caught.value) == f"session {missing!r} not found"
    assert on_disk(db_path) == {"s": {1: "mine"}}


async def test_claiming_a_session_not_in_memory_is_not_found_and_changes_nothing(
    open_store: Opener, db_path: Path
) -> None:
    first = await open_store()
    await first.ensure_session("s", user_id=1)
    await first.append_message("s", user_id=1, role="user", content="mine")
    await first.aclose()
    store = await open_store()
    for sid in ("s", "never-existed"):  # another user's session (on disk), and no session at all
        with pytest.raises(NotFound) as caught:
            await store.claim(sid, user_id=2)
        assert str(caught.value) == f"session {sid!r} not found"
    await store.flush()
    assert rows(db_path) == [("s", 1)]
    assert [s.id for s in await store.list_sessions(1)] == ["s"]
    assert await store.list_sessions(2) == []


async def test_an_anonymous_caller_owns_no_list(open_store: Opener) -> None:
    store = await open_store()
    await store.ensure_session("signed-in", user_id=1)
    await store.ensure_session("anon", user_id=None)
    await store.flush()
    assert await store.list_sessions(None) == []  # type: ignore[arg-type]


async def test_reading_messages_leaves_a_debug_line_with_ids_and_never_content(
    open_store: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="writebehind.access")
    store = await open_store()
    await store.ensure_session("s", user_id=7)
    await store.append_message("s", user_id=7, role="user", content="SECRET-CONTENT")
    assert len(await store.get_messages("s", user_id=7, after_seq=0)) == 1
    access = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "writebehind.access"]
    assert (logging.DEBUG, "read messages session=s user=7 after_seq=0") in access
    assert not any("SECRET-CONTENT" in r.getMessage() for r in caplog.records)


# -- other policies ---------------------------------------------------------------------------------


async def test_persist_nothing_keeps_even_signed_in_sessions_in_memory_only(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store(persist_nothing)
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="ephemeral", durable=True)
    assert [m.content for m in (await store.get_session("s", user_id=1)).messages] == ["ephemeral"]
    await store.aclose()
    assert rows(db_path) == []
    again = await open_store(persist_nothing)
    with pytest.raises(NotFound):
        await again.get_session("s", user_id=1)


# -- a policy that persists anonymous sessions -----------------------------------------------------


async def test_a_dirty_anonymous_session_a_policy_persists_is_never_expired_before_it_is_on_disk(
    open_store: Opener, db_path: Path
) -> None:
    clock = Monotonic()
    hot = SessionStore(anon_ttl_seconds=10, monotonic=clock)
    store = await open_store(persist_everything, hot)
    await store.ensure_session("anon", user_id=None)
    await store.append_message("anon", user_id=None, role="user", content="not on disk yet")
    clock.now += 60  # idle far past the TTL, but its write is only in memory
    await store.ensure_session(user_id=None)  # each new session sweeps the idle ones
    assert store.stats().expired == 0
    assert [m.content for m in (await store.get_session("anon", user_id=None)).messages] == [
        "not on disk yet"
    ]
    await store.flush()
    assert on_disk(db_path)["anon"] == {1: "not on disk yet"}
    clock.now += 60
    await store.ensure_session(user_id=None)  # on disk now: memory may let both idle ones go
    assert store.stats().expired == 2
    assert "anon" not in store.hot.tier
    assert on_disk(db_path)["anon"] == {1: "not on disk yet"}  # kept...
    with pytest.raises(NotFound):  # ...but sealed: its binding token is never stored, so no
        await store.get_session("anon", user_id=None)  # anonymous caller can reopen it by id


async def test_an_anonymous_caller_cannot_erase_a_signed_in_session_when_anonymous_sessions_persist(
    open_store: Opener, db_path: Path
) -> None:
    first = await open_store(persist_everything)
    await first.ensure_session("s", user_id=42)
    await first.append_message("s", user_id=42, role="user", content="mine")
    await first.aclose()
    store = await open_store(persist_everything)  # "s" is on disk only
    with pytest.raises(NotFound):
        await store.delete_session("s", user_id=None)
    assert on_disk(db_path) == {"s": {1: "mine"}}


async def test_a_persisted_anonymous_session_stays_bound_to_its_token_after_a_restart(
    open_store: Opener,
) -> None:
    first = await open_store(persist_everything)
    await first.ensure_session("anon", user_id=None, binding_token="browser-a")
    await first.append_message(
        "anon", user_id=None, binding_token="browser-a", role="user", content="private"
    )
    with pytest.raises(NotFound):
        await first.get_session("anon", user_id=None, binding_token="browser-b")
    await first.aclose()
    store = await open_store(persist_everything)
    with pytest.raises(NotFound):
        await store.get_session("anon", user_id=None, binding_token="browser-b")
