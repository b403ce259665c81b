"""Temporary chats for signed-in users (`ensure_session(..., persist=False)`) and the per-user
default "don't keep my history" (`set_user_preferences(user_id, keep_history=False)`).

A temporary chat is never on disk: every test that says so reads the raw bytes of the
SQLite file, its WAL and shared memory, and the recovery files for a marker, next to a
kept session's marker that must be found there (so the scan is shown to see what is
written). On PostgreSQL the tables are queried. Real SQLite files, the real PostgreSQL,
and a real uvicorn server stopped by SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from writebehind import (
    BackPressureError,
    Config,
    NotFound,
    SessionStore,
    SQLiteBackend,
    StorageError,
    ValidationError,
    WriteBehindStore,
)
from writebehind.model import UserId, utcnow
from writebehind.policy import (
    PREFERENCES_PREFIX,
    PersistencePolicy,
    UserPreferences,
    authenticated_only,
    preferences_id,
)

from .conftest import QUIET
from .e2e.server import Server, client, events
from .pg import DSN, new_schema, postgres_schema

# Non-ASCII on purpose (emoji, CJK, RTL, a combining mark): the text a temporary chat holds.
WORDS = " 🦄 秘密の話 שלום e\u0301 "


def marker(kind: str) -> str:
    """A unique ASCII token (found whatever encoding a file uses) with non-ASCII text around."""
    return f"{kind}-{uuid.uuid4().hex}"


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def persist_everything(session_id: str, user_id: UserId | None) -> bool:
    return True


class RefusingBackend(SQLiteBackend):
    """A disk that refuses every write: what is dirty at aclose() goes to the recovery file."""

    async def write_batch(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageError("disk says no")


Opener = Callable[..., Coroutine[Any, Any, WriteBehindStore]]


@pytest.fixture
async def open_store(db_path: Path) -> AsyncIterator[Opener]:
    """`await open_store(policy=..., hot=..., backend=..., **config)`: a started store on
    `db_path`, closed at the end unless the test closed it."""
    stores: list[WriteBehindStore] = []

    async def opener(
        policy: PersistencePolicy = authenticated_only,
        hot: SessionStore | None = None,
        backend: SQLiteBackend | None = None,
        **config: Any,
    ) -> WriteBehindStore:
        store = WriteBehindStore(
            hot or SessionStore(),
            backend or SQLiteBackend(db_path),
            config=Config(db_path=db_path, **{**QUIET, **config}),
            policy=policy,
        )
        await store.start()
        stores.append(store)
        return store

    yield opener
    for store in stores:
        await store.aclose()


def files_beside(db_path: Path) -> dict[str, bytes]:
    """Every file the store keeps beside the database: the file, -wal, -shm, the recovery
    file and its .refused-* copies, the status file."""
    return {p.name: p.read_bytes() for p in db_path.parent.glob(db_path.name + "*") if p.is_file()}


def where(text: str, files: dict[str, bytes]) -> list[str]:
    needles = (text.encode(), text.encode("utf-16-le"))
    return sorted(name for name, data in files.items() if any(n in data for n in needles))


async def fill(store: WriteBehindStore, sid: str, user: UserId, secret: str) -> None:
    await store.append_message(sid, user_id=user, role="user", content=secret + WORDS)
    reply = await store.append_message(sid, user_id=user, role="assistant", content="")
    for token in (secret[:8], WORDS, secret[8:]):
        await store.update_message(sid, reply.id, user_id=user, append=token)
    await store.update_session(sid, user_id=user, title=f"title {secret}{WORDS}")


# -- never on disk ------------------------------------------------------------------------------


async def test_a_temporary_chat_is_never_on_disk_after_flush_durable_writes_and_aclose(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store()
    temp, kept = marker("TEMP"), marker("KEPT")
    t = await store.ensure_session(user_id=42, persist=False, title=temp)
    k = await store.ensure_session(user_id=42, title="kept")
    await fill(store, t.id, 42, temp)
    await fill(store, k.id, 42, kept)
    # durable=True on a temporary chat returns at once: there is nothing to wait for.
    await store.append_message(t.id, user_id=42, role="user", content=temp, durable=True)
    await store.flush()
    files = files_beside(db_path)
    assert where(kept, files), "the scan must see what a flush wrote"
    assert where(temp, files) == []
    assert store.stats().dirty_sessions == 0
    await store.aclose()
    files = files_beside(db_path)
    assert where(kept, files)
    assert where(temp, files) == []
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions WHERE id = ?", (t.id,)).fetchone() == (0,)


async def test_a_temporary_chat_never_reaches_the_recovery_file_at_a_failed_shutdown(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store(backend=RefusingBackend(db_path), shutdown_timeout_seconds=0.2)
    temp, kept = marker("TEMP"), marker("KEPT")
    t = await store.ensure_session(user_id="alice", persist=False)
    k = await store.ensure_session(user_id="alice")
    await fill(store, t.id, "alice", temp)
    await fill(store, k.id, "alice", kept)
    await store.aclose()  # the kept session goes to the recovery file
    files = files_beside(db_path)
    assert [name for name in where(kept, files)] == [db_path.name + ".recovery"]
    assert where(temp, files) == []


async def test_no_policy_makes_a_temporary_chat_persistent(open_store: Opener, db_path: Path) -> None:
    store = await open_store(policy=persist_everything)
    temp, anon = marker("TEMP"), marker("ANON")
    signed_in = await store.ensure_session(user_id=7, persist=False)
    anonymous = await store.ensure_session(user_id=None, binding_token="b", persist=False)
    persisted_anon = await store.ensure_session(user_id=None, binding_token="b")
    await fill(store, signed_in.id, 7, temp)
    for sid in (anonymous.id, persisted_anon.id):
        await store.append_message(sid, user_id=None, binding_token="b", role="user", content=anon + sid)
    await store.pop_message(signed_in.id, user_id=7)
    await store.flush()
    files = files_beside(db_path)
    assert where(anon + persisted_anon.id, files), "this policy writes anonymous sessions"
    assert where(temp, files) == []
    assert where(anon + anonymous.id, files) == []


async def test_a_claim_never_makes_a_temporary_chat_persistent(open_store: Opener, db_path: Path) -> None:
    store = await open_store()
    temp, claimed = marker("TEMP"), marker("CLAIMED")
    anon_temp = await store.ensure_session(user_id=None, binding_token="cookie", persist=False)
    anon = await store.ensure_session(user_id=None, binding_token="cookie")
    for sid, secret in ((anon_temp.id, temp), (anon.id, claimed)):
        await store.append_message(sid, user_id=None, binding_token="cookie", role="user", content=secret)
    await store.claim(anon_temp.id, user_id=5, binding_token="cookie", durable=True)
    await store.claim(anon.id, user_id=5, binding_token="cookie", durable=True)
    mine = await store.ensure_session(user_id=5, persist=False)
    await store.append_message(mine.id, user_id=5, role="user", content=temp + "mine")
    await store.claim(mine.id, user_id=5, durable=True)  # already the user's: a no-op
    await store.append_message(anon_temp.id, user_id=5, role="user", content=temp + "after")
    await store.flush()
    assert store.is_temporary(anon_temp.id, user_id=5)
    assert store.is_temporary(mine.id, user_id=5)
    assert not store.is_temporary(anon.id, user_id=5)
    assert not store.is_temporary(anon_temp.id, user_id=6)  # another user's: as if missing
    files = files_beside(db_path)
    assert where(claimed, files)
    assert where(temp, files) == []
    # Listed and exported while they exist: they are the user's data.
    listed = {s.id for s in await store.list_sessions(5)}
    assert listed == {anon_temp.id, anon.id, mine.id}
    exported = [r.id async for r in store.export_user(5)]
    assert sorted(exported) == sorted(listed)


async def test_a_session_never_changes_between_temporary_and_kept(open_store: Opener) -> None:
    store = await open_store()
    t = await store.ensure_session("temp-1", user_id=1, persist=False)
    k = await store.ensure_session("kept-1", user_id=1)
    with pytest.raises(ValidationError) as caught:
        await store.ensure_session(t.id, user_id=1, persist=True)
    assert caught.value.field == "persist"
    with pytest.raises(ValidationError) as caught:
        await store.ensure_session(k.id, user_id=1, persist=False)
    assert caught.value.field == "persist"
    # Without `persist`, or with the one it has, an existing session is returned as it is.
    assert (await store.ensure_session(t.id, user_id=1)).id == t.id
    assert (await store.ensure_session(t.id, user_id=1, persist=False)).id == t.id
    assert store.is_temporary(t.id, user_id=1)
    # Another user asking with a mismatching `persist` learns nothing: NotFound, as for a missing one.
    with pytest.raises(NotFound):
        await store.ensure_session(t.id, user_id=2, persist=True)
    with pytest.raises(ValidationError) as caught:
        await store.ensure_session(user_id=1, persist="no")  # type: ignore[arg-type]
    assert caught.value.field == "persist"


async def test_a_kept_chat_after_restart_cannot_be_reopened_as_temporary(open_store: Opener) -> None:
    store = await open_store()
    k = await store.ensure_session("kept-2", user_id=1, durable=True)
    await store.aclose()
    again = await open_store()
    with pytest.raises(ValidationError):
        await again.ensure_session(k.id, user_id=1, persist=False)  # loaded from disk first
    assert not again.is_temporary(k.id, user_id=1)


async def test_back_pressure_never_refuses_a_temporary_chat(open_store: Opener, db_path: Path) -> None:
    store = await open_store(
        backend=RefusingBackend(db_path),
        max_dirty=2,
        backpressure_timeout_ms=50,
        shutdown_timeout_seconds=0.2,
    )
    for _ in range(2):
        await store.ensure_session(user_id=1)  # dirty, and the disk refuses them
    with pytest.raises(BackPressureError):
        await store.ensure_session(user_id=1)
    with pytest.raises(BackPressureError):
        await store.ensure_session("kept-3", user_id=1)
    t = await store.ensure_session(user_id=1, persist=False)
    chosen = await store.ensure_session("temp-3", user_id=1, persist=False)
    for sid in (t.id, chosen.id):
        await store.append_message(sid, user_id=1, role="user", content="still taken" + WORDS)
    assert store.stats().dirty_sessions == 2


# -- expiry and the LRU ---------------------------------------------------------------------------


async def test_a_temporary_chat_expires_after_the_idle_ttl_and_a_kept_one_does_not(
    open_store: Opener, db_path: Path
) -> None:
    clock = Monotonic()
    store = await open_store(hot=SessionStore(anon_ttl_seconds=60, monotonic=clock))
    t = await store.ensure_session(user_id=3, persist=False)
    k = await store.ensure_session(user_id=3)
    await store.append_message(t.id, user_id=3, role="user", content="hi" + WORDS)
    clock.now = 50
    await store.get_session(t.id, user_id=3)  # a read is activity
    clock.now = 100
    assert len(await store.get_messages(t.id, user_id=3)) == 1
    clock.now = 161
    with pytest.raises(NotFound):
        await store.get_session(t.id, user_id=3)
    with pytest.raises(NotFound):
        await store.append_message(t.id, user_id=3, role="user", content="late")
    assert (await store.get_session(k.id, user_id=3)).id == k.id
    assert t.id not in {s.id for s in await store.list_sessions(3)}
    # The sweep (housekeeping's) finds idle ones nobody asks for again, and only those.
    others = [await store.ensure_session(user_id=3, persist=False) for _ in range(3)]
    clock.now = 300
    assert store.hot.tier.expire_idle() == 3
    for s in others:
        assert s.id not in store.hot.tier
    assert k.id in store.hot.tier


async def test_temporary_chats_are_bounded_by_the_lru(open_store: Opener) -> None:
    store = await open_store(hot=SessionStore(maxsize=4))
    ids = [(await store.ensure_session(user_id=9, persist=False)).id for _ in range(10)]
    assert len(store.hot.tier) == 4
    assert [sid for sid in ids if sid in store.hot.tier] == ids[-4:]
    with pytest.raises(NotFound):
        await store.get_session(ids[0], user_id=9)


# -- the per-user default -------------------------------------------------------------------------


async def test_the_per_user_default_survives_a_restart_and_makes_new_chats_temporary(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store()
    assert await store.user_preferences(11) == UserPreferences(keep_history=True)
    assert await store.set_user_preferences(11, keep_history=False) == UserPreferences(keep_history=False)
    await store.set_user_preferences(11, keep_history=False)  # idempotent
    await store.aclose()
    store = await open_store()
    assert (await store.user_preferences(11)).keep_history is False
    assert (await store.user_preferences(12)).keep_history is True  # another user: untouched
    temp = marker("TEMP")
    t = await store.ensure_session(user_id=11)
    assert store.is_temporary(t.id, user_id=11)
    await fill(store, t.id, 11, temp)
    chosen = await store.ensure_session(user_id=11, persist=True)  # kept, on purpose
    assert not store.is_temporary(chosen.id, user_id=11)
    other = await store.ensure_session(user_id=12)
    assert not store.is_temporary(other.id, user_id=12)
    await store.flush()
    assert where(temp, files_beside(db_path)) == []
    # The preferences session is never listed as a chat.
    assert {s.id for s in await store.list_sessions(11)} == {t.id, chosen.id}
    assert [s.id for s in await store.list_sessions(11, limit=1, offset=1)] in ([t.id], [chosen.id])
    # Back to the default: the stored setting is deleted, nothing is kept about the user.
    await store.set_user_preferences(11, keep_history=True)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute(
            "SELECT count(*) FROM sessions WHERE id = ?", (preferences_id(11),)
        ).fetchone() == (0,)
    assert not store.is_temporary((await store.ensure_session(user_id=11)).id, user_id=11)


async def test_retention_never_deletes_the_default_of_a_user_who_is_active(
    open_store: Opener, db_path: Path
) -> None:
    store = await open_store(retention_days=30)
    await store.set_user_preferences(13, keep_history=False)
    await store.set_user_preferences(14, keep_history=False)
    await store.aclose()
    day = 86400 * 1_000_000
    with sqlite3.connect(db_path) as conn:  # both last read 20 days ago
        conn.execute("UPDATE sessions SET last_access_at = last_access_at - 20 * ?", (day,))
    store = await open_store(retention_days=30)
    # User 13 is active: a creation reads the setting, which marks it read (once a day at most).
    assert store.is_temporary((await store.ensure_session(user_id=13)).id, user_id=13)
    await store.flush()
    with sqlite3.connect(db_path) as conn:
        ages = dict(conn.execute("SELECT user_id, last_access_at FROM sessions ORDER BY user_id"))
    assert ages[14] - ages[13] < -19 * day
    # 15 days on, user 14's setting has been idle for 35 days: retention applies to it.
    assert await store.purge_expired(utcnow() + timedelta(days=15)) == 1
    assert (await store.user_preferences(13)).keep_history is False
    assert (await store.user_preferences(14)).keep_history is True


async def test_delete_user_erases_the_per_user_default(open_store: Opener, db_path: Path) -> None:
    store = await open_store()
    await store.set_user_preferences("ユーザー", keep_history=False)
    await store.set_user_preferences("other", keep_history=False)
    t = await store.ensure_session(user_id="ユーザー")
    assert await store.delete_user("ユーザー") == 2  # the temporary chat and the preferences
    with pytest.raises(NotFound):
        await store.get_session(t.id, user_id="ユーザー")
    assert (await store.user_preferences("ユーザー")).keep_history is True
    await store.aclose()
    store = await open_store()
    assert (await store.user_preferences("ユーザー")).keep_history is True
    assert (await store.user_preferences("other")).keep_history is False
    with sqlite3.connect(db_path) as conn:
        ids = {row[0] for row in conn.execute("SELECT id FROM sessions")}
    assert ids == {preferences_id("other")}


async def test_nobody_can_take_a_users_preferences_session_first(open_store: Opener) -> None:
    store = await open_store()
    reserved = preferences_id(1)
    for caller in (2, None, 1):
        with pytest.raises(ValidationError) as caught:
            await store.ensure_session(reserved, user_id=caller)
        assert caught.value.field == "session_id"
    with pytest.raises(ValidationError):
        await store.ensure_session(PREFERENCES_PREFIX + "x", user_id=1)
    await store.set_user_preferences(1, keep_history=False)
    with pytest.raises(NotFound):
        await store.get_session(reserved, user_id=2)  # another user's: as if missing
    assert preferences_id(42) != preferences_id("42")
    with pytest.raises(ValidationError) as caught:
        await store.set_user_preferences(1, keep_history="no")  # type: ignore[arg-type]
    assert caught.value.field == "keep_history"
    with pytest.raises(ValidationError):
        await store.set_user_preferences(None, keep_history=False)  # type: ignore[arg-type]


async def test_a_cancelled_creation_or_setting_leaves_nothing_half_made(
    open_store: Opener, db_path: Path
) -> None:
    """Cancel `ensure_session` (which first reads the user's default from disk) and
    `set_user_preferences` at each of their awaits in turn: each happened whole or not at
    all, the default still decides, and what the store says is what the disk holds."""
    for step in range(8):
        store = await open_store()
        await store.set_user_preferences(20, keep_history=False)
        store.hot.tier.remove(preferences_id(20))  # out of memory: the next read goes to disk
        task = asyncio.ensure_future(store.ensure_session(user_id=20))
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        try:
            made = await task
        except asyncio.CancelledError:
            made = None
        assert [s.id for s in await store.list_sessions(20)] == ([] if made is None else [made.id])
        if made is not None:
            assert store.is_temporary(made.id, user_id=20)
        assert store.is_temporary((await store.ensure_session(user_id=20)).id, user_id=20)
        setting = asyncio.ensure_future(store.set_user_preferences(20, keep_history=True))
        for _ in range(step):
            await asyncio.sleep(0)
        setting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setting
        await store.flush()
        said = (await store.user_preferences(20)).keep_history
        with sqlite3.connect(db_path) as conn:
            stored = conn.execute("SELECT count(*) FROM sessions WHERE id = ?", (preferences_id(20),))
            assert stored.fetchone() == ((0,) if said else (1,))
        await store.set_user_preferences(20, keep_history=True)
        await store.aclose()


# -- the plain store ------------------------------------------------------------------------------


async def test_the_plain_store_has_temporary_chats_and_the_default_too() -> None:
    clock = Monotonic()
    store = SessionStore(anon_ttl_seconds=10, monotonic=clock)
    t = await store.ensure_session(user_id=1, persist=False)
    k = await store.ensure_session(user_id=1)
    assert store.is_temporary(t.id, user_id=1) and not store.is_temporary(k.id, user_id=1)
    await store.set_user_preferences(1, keep_history=False)
    assert (await store.user_preferences(1)).keep_history is False
    d = await store.ensure_session(user_id=1)
    assert store.is_temporary(d.id, user_id=1)
    with pytest.raises(ValidationError):
        await store.ensure_session(d.id, user_id=1, persist=True)
    clock.now = 11
    for sid in (t.id, d.id):
        with pytest.raises(NotFound):
            await store.get_session(sid, user_id=1)
    assert (await store.get_session(k.id, user_id=1)).id == k.id
    assert await store.delete_user(1) == 1
    assert (await store.user_preferences(1)).keep_history is True


# -- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    name = new_schema()
    async with postgres_schema(name):
        yield name


def pg_store(schema: str) -> WriteBehindStore:
    from writebehind.backends.postgres import PostgresBackend

    config = Config(db_url=DSN, db_schema=schema, flush_interval_ms=QUIET["flush_interval_ms"])
    return WriteBehindStore(SessionStore(), PostgresBackend(DSN, schema=schema, pool_size=4), config=config)


async def pg_text(schema: str) -> str:
    """Every stored column of every row of the schema's tables, as text."""
    conn = await asyncpg.connect(DSN)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        parts: list[str] = []
        for row in tables:
            rows = await conn.fetch(f'SELECT t::text AS t FROM "{schema}"."{row["tablename"]}" t')
            parts.extend(r["t"] for r in rows)
        return "\n".join(parts)
    finally:
        await conn.close()


async def test_on_postgresql_a_temporary_chat_is_never_in_the_tables(pg_schema: str) -> None:
    store = pg_store(pg_schema)
    await store.start()
    temp, kept = marker("TEMP"), marker("KEPT")
    try:
        t = await store.ensure_session(user_id=1, persist=False)
        k = await store.ensure_session(user_id=1)
        await fill(store, t.id, 1, temp)
        await fill(store, k.id, 1, kept)
        await store.set_user_preferences(2, keep_history=False)
        d = await store.ensure_session(user_id=2)
        await fill(store, d.id, 2, temp + "default")
        await store.flush()
        text = await pg_text(pg_schema)
        assert kept in text
        assert temp not in text
    finally:
        await store.aclose()
    text = await pg_text(pg_schema)
    assert kept in text and temp not in text
    # The default survives the restart there too, and is erased with the user.
    again = pg_store(pg_schema)
    await again.start()
    try:
        assert (await again.user_preferences(2)).keep_history is False
        await again.delete_user(2)
        # (Its id may stay in `owners` until this instance closes, as any erased session's
        # does: an UNLOGGED table of ids, no content.)
        conn = await asyncpg.connect(DSN)
        try:
            rows = await conn.fetch(f'SELECT id FROM "{pg_schema}".sessions WHERE user_id = $1', "2")
        finally:
            await conn.close()
        assert rows == []
        assert (await again.user_preferences(2)).keep_history is True
    finally:
        await again.aclose()


async def test_on_postgresql_a_temporary_chat_is_served_only_by_the_instance_that_made_it(
    pg_schema: str,
) -> None:
    a, b = pg_store(pg_schema), pg_store(pg_schema)
    await a.start()
    await b.start()
    temp = marker("TEMP")
    try:
        t = await a.ensure_session(user_id=1, persist=False)
        chosen = await a.ensure_session("chosen-temp", user_id=1, persist=False)  # owned here by id
        anon = await a.ensure_session(user_id=None, binding_token="c")
        k = await a.ensure_session(user_id=1)
        for sid in (t.id, chosen.id):
            await fill(a, sid, 1, temp)
        await a.append_message(k.id, user_id=1, role="user", content="kept")
        # Followed from the other instance while this one owns its id: refused there, and
        # no text of it is ever sent (a NOTIFY passes through the database server).
        async with b.follow(chosen.id, user_id=1, on_change=lambda _: None) as view:
            with pytest.raises(NotFound):
                await view.messages(0)
            await fill(a, chosen.id, 1, temp + "later")
        # The owner's side of a follow request as it arrives (the read that comes next lets
        # the session go, but until then): no change of it is sent to the follower.
        relay = a._relay
        assert relay is not None
        relay.followed(chosen.id, b.stats().instance_id or 0)
        await fill(a, chosen.id, 1, temp + "followed")
        await asyncio.sleep(0.3)  # what the relay would send, it would have sent by now
        assert a.stats().live_messages_sent == 0
        # The other instance does not have them: exactly a missing session's answer, as for
        # an anonymous session (memory only, per instance). A kept one moves there.
        for sid, who in ((t.id, 1), (chosen.id, 1), (anon.id, None)):
            with pytest.raises(NotFound):
                await b.get_session(sid, user_id=who, binding_token="c")
            with pytest.raises(NotFound):
                await b.append_message(sid, user_id=who, binding_token="c", role="user", content="x")
        assert [m.content for m in await b.get_messages(k.id, user_id=1)] == ["kept"]
        assert {s.id for s in await b.list_sessions(1)} == {k.id}
        # The instance that made them still serves them, whole.
        for sid in (t.id, chosen.id):
            assert (await a.get_session(sid, user_id=1)).messages[0].content.startswith(temp)
            assert a.is_temporary(sid, user_id=1)
        await a.flush()
        await b.flush()
        assert temp not in await pg_text(pg_schema)
    finally:
        await a.aclose()
        await b.aclose()
    assert temp not in await pg_text(pg_schema)


async def test_on_postgresql_the_default_set_on_one_instance_decides_on_another(pg_schema: str) -> None:
    a, b = pg_store(pg_schema), pg_store(pg_schema)
    await a.start()
    await b.start()
    try:
        assert (await b.user_preferences(5)).keep_history is True  # b read it (nothing there)
        await a.set_user_preferences(5, keep_history=False)
        made = await b.ensure_session(user_id=5)
        assert b.is_temporary(made.id, user_id=5)
        await b.set_user_preferences(5, keep_history=True)
        assert (await a.user_preferences(5)).keep_history is True
        assert not a.is_temporary((await a.ensure_session(user_id=5)).id, user_id=5)
    finally:
        await a.aclose()
        await b.aclose()


# -- the server -----------------------------------------------------------------------------------


def test_a_temporary_chat_on_a_real_server_is_never_on_disk_after_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "server.db"
    server = Server(db, delay_ms=0)
    temp, kept = marker("TEMP"), marker("KEPT")
    try:
        with client(server, "alice") as alice:
            t = alice.post("/api/sessions", json={"temporary": True}).json()
            k = alice.post("/api/sessions", json={}).json()
            assert t["temporary"] is True and k["temporary"] is False
            for session, secret in ((t, temp), (k, kept)):
                said = alice.post(f"/api/sessions/{session['id']}/messages", json={"content": secret + WORDS})
                assert said.status_code == 202, said.text
                for event in events(alice, session["id"]):
                    if event["role"] == "assistant" and event["done"]:
                        break
            assert alice.get(f"/api/sessions/{t['id']}").json()["temporary"] is True
            listed = {s["id"]: s["temporary"] for s in alice.get("/api/sessions").json()["sessions"]}
            assert listed == {t["id"]: True, k["id"]: False}
            # The default, from the API: new chats are temporary, `temporary: false` overrides.
            assert alice.get("/api/me/preferences").json() == {"keep_history": True}
            changed = alice.patch("/api/me/preferences", json={"keep_history": False})
            assert changed.json() == {"keep_history": False}
            assert alice.post("/api/sessions", json={}).json()["temporary"] is True
            assert alice.post("/api/sessions", json={"temporary": False}).json()["temporary"] is False
            bad = alice.patch("/api/me/preferences", json={"keep_history": "no"})
            assert bad.status_code == 422 and "keep_history" in bad.text
            # A claim of it by the same user changes nothing.
            assert alice.post(f"/api/sessions/{t['id']}/claim").json()["temporary"] is True
        with client(server, "bob") as bob:
            assert bob.get(f"/api/sessions/{t['id']}").status_code == 404
            assert bob.get("/api/me/preferences").json() == {"keep_history": True}
        with client(server) as anonymous:
            assert anonymous.get("/api/me/preferences").json() == {"keep_history": False}
            assert anonymous.patch("/api/me/preferences", json={"keep_history": False}).status_code == 200
            refused = anonymous.patch("/api/me/preferences", json={"keep_history": True})
            assert refused.status_code == 401
            anon_temp = anonymous.post("/api/sessions", json={"temporary": True}).json()
            assert anon_temp["temporary"] is True
    finally:
        output = server.stop(signal.SIGTERM)
    assert "store closed: flushed" in output, output  # the graceful path, not a crash
    files = files_beside(db)
    assert where(kept, files), "the scan must see what the server wrote"
    assert where(temp, files) == []
    assert temp not in output and WORDS.strip() not in output
    # Restarted: the kept chat and the default are there, the temporary chat is not.
    server = Server(db, delay_ms=0)
    try:
        with client(server, "alice") as alice:
            assert alice.get(f"/api/sessions/{t['id']}").status_code == 404
            assert alice.get(f"/api/sessions/{k['id']}").json()["temporary"] is False
            assert alice.get("/api/me/preferences").json() == {"keep_history": False}
            assert alice.delete("/api/me").status_code == 200
            assert alice.get("/api/me/preferences").json() == {"keep_history": True}
    finally:
        server.close()


def test_the_openapi_document_says_temporary_and_the_preferences_route(tmp_path: Path) -> None:
    server = Server(tmp_path / "doc.db", delay_ms=0)
    try:
        doc = httpx.get(server.url + "/api/openapi.json").json()
    finally:
        server.close()
    schemas = doc["components"]["schemas"]
    assert schemas["NewSession"]["properties"]["temporary"]["anyOf"][0]["type"] == "boolean"
    assert "temporary" in schemas["SessionOut"]["required"]
    assert {"get", "patch"} <= set(doc["paths"]["/api/me/preferences"])
