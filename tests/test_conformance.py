"""The backend conformance suite: every `Backend` must pass these, unchanged.

Add a backend by adding a factory to `BACKENDS`; the tests never look at which one
they are running against.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from writebehind import Backend, RecordError, SessionDelta, SessionRecord, SQLiteBackend, StoredMessage
from writebehind.model import UserId, check_metadata

from .pg import postgres_schema


@asynccontextmanager
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    backend = SQLiteBackend(tmp_path / "conformance.db")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def postgres_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    async with postgres_schema() as backend:
        yield backend


BACKENDS: dict[str, Callable[[Path], AbstractAsyncContextManager[Backend]]] = {
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with BACKENDS[request.param](tmp_path) as backend:
        await backend.open()  # idempotent
        yield backend


def message(seq: int, content: str | None = None, *, at: datetime = T0, **meta: object) -> StoredMessage:
    return StoredMessage(
        id=f"m{seq}",
        seq=seq,
        role="user" if seq % 2 else "assistant",
        content=f"content {seq}" if content is None else content,
        created_at=at + timedelta(microseconds=seq),
        updated_at=at + timedelta(seconds=1, microseconds=seq),
        metadata_json=check_metadata(dict(meta) or None),
    )


def record(
    sid: str, user: UserId | None, n: int = 0, *, at: datetime = T0, title: str | None = "t"
) -> SessionRecord:
    return SessionRecord(
        id=sid,
        user_id=user,
        created_at=at,
        updated_at=at + timedelta(seconds=2),
        last_access_at=at + timedelta(seconds=3),
        status="active",
        title=title,
        messages=tuple(message(i, at=at) for i in range(1, n + 1)),
        client_ip="192.0.2.1",
        user_agent="pytest",
    )


def full(r: SessionRecord) -> SessionDelta:
    return SessionDelta(replace(r, messages=()), r.messages, len(r.messages))


async def test_round_trip_is_exact(backend: Backend) -> None:
    r = replace(
        record("s1", 42, 3),
        messages=(
            message(1, "emoji 🎉 and RTL \u202e", k=[1, 2.5, None, True], nested={"a": "b\x00"}),
            message(2, ""),
            message(3),
        ),
    )
    await backend.write_batch([full(r)])
    assert await backend.load_session("s1") == r
    assert await backend.load_session("missing") is None


async def test_int_and_str_user_ids_are_different_users(backend: Backend) -> None:
    await backend.write_batch([full(record("a", 1)), full(record("b", "1"))])
    assert [s.id for s in await backend.list_sessions(1)] == ["a"]
    assert [s.id for s in await backend.list_sessions("1")] == ["b"]
    loaded = await backend.load_session("b")
    assert loaded is not None and loaded.user_id == "1"


async def test_deltas_upsert_only_what_they_carry(backend: Backend) -> None:
    r = record("s", 1, 3)
    first = await backend.write_batch([full(r)])
    assert first.versions == {"s": 1} and not first.conflicts
    edited = replace(message(2), content="edited", metadata_json='{"v":2}')
    header = replace(r, title="renamed", status="archived", messages=(), version=1)
    await backend.write_batch([SessionDelta(header, (edited, message(4)), 4)])
    loaded = await backend.load_session("s")
    assert loaded is not None and loaded.version == 2
    assert loaded.title == "renamed" and loaded.status == "archived"
    assert [m.content for m in loaded.messages] == ["content 1", "edited", "content 3", "content 4"]
    assert loaded.messages[1].metadata == {"v": 2}
    (summary,) = await backend.list_sessions(1)
    assert summary.message_count == 4


async def test_a_refused_batch_writes_nothing(backend: Backend) -> None:
    good = record("good", 1, 2)
    bad = replace(record("bad", 1), status=None)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(RecordError):
        await backend.write_batch([full(good), full(bad)])
    assert await backend.load_session("good") is None
    await backend.write_batch([full(good)])  # and the backend is still usable
    assert await backend.load_session("good") == good


async def test_list_sessions_newest_first_with_pagination(backend: Backend) -> None:
    records = [record(f"s{i}", 7, at=T0 + timedelta(minutes=i)) for i in range(5)]
    await backend.write_batch([full(r) for r in records] + [full(record("other", 8))])
    listed = await backend.list_sessions(7)
    assert [s.id for s in listed] == ["s4", "s3", "s2", "s1", "s0"]
    assert [s.id for s in await backend.list_sessions(7, limit=2, offset=1)] == ["s3", "s2"]
    assert listed[0].updated_at == records[4].updated_at and listed[0].message_count == 0
    assert await backend.list_sessions(9) == []


async def test_delete_session_respects_ownership_and_cascades(backend: Backend) -> None:
    await backend.write_batch([full(record("s", 1, 3))])
    assert await backend.delete_session("s", 2) is False
    assert await backend.load_session("s") is not None
    assert await backend.delete_session("s", 1) is True
    assert await backend.load_session("s") is None
    assert await backend.delete_session("s", 1) is False
    # a re-created session of the same id starts empty: no orphaned messages came back
    await backend.write_batch([full(record("s", 1, 0))])
    loaded = await backend.load_session("s")
    assert loaded is not None and loaded.messages == ()


async def test_delete_user_removes_only_that_user(backend: Backend) -> None:
    await backend.write_batch([full(record(f"a{i}", "alice", 2)) for i in range(3)])
    await backend.write_batch([full(record("b", "bob", 2))])
    assert sorted(await backend.delete_user("alice")) == ["a0", "a1", "a2"]
    assert await backend.list_sessions("alice") == []
    assert [s.id for s in await backend.list_sessions("bob")] == ["b"]
    assert await backend.delete_user("alice") == []


async def test_purge_older_than_uses_last_activity_in_chunks(backend: Backend) -> None:
    old = [record(f"old{i}", 1, 2, at=T0 - timedelta(days=100)) for i in range(5)]
    fresh = record("fresh", 1, 2, at=T0)
    await backend.write_batch([full(r) for r in [*old, fresh]])
    cutoff = T0 - timedelta(days=90)
    first = await backend.purge_older_than(cutoff, limit=2)
    rest = await backend.purge_older_than(cutoff, limit=10)
    assert len(first) == 2 and sorted(first + rest) == [f"old{i}" for i in range(5)]
    assert [s.id for s in await backend.list_sessions(1)] == ["fresh"]
    assert await backend.purge_older_than(cutoff) == []


async def test_iter_user_sessions_yields_every_session_whole(backend: Backend) -> None:
    records = [record(f"s{i:03d}", 5, 3) for i in range(120)]
    await backend.write_batch([full(r) for r in records])
    await backend.write_batch([full(record("x", 6, 1))])
    exported = [r async for r in backend.iter_user_sessions(5)]
    assert sorted(exported, key=lambda r: r.id) == records


async def test_a_stale_version_is_a_conflict_and_writes_nothing_of_that_session(backend: Backend) -> None:
    await backend.write_batch([full(record("s", 1, 2)), full(record("t", 1, 1))])
    # another writer moved "s" to version 2
    await backend.write_batch([SessionDelta(replace(record("s", 1), title="theirs", version=1), (), 2)])
    mine = SessionDelta(replace(record("s", 1), title="mine", version=1), (message(3, "mine"),), 3)
    other = SessionDelta(replace(record("t", 1), title="fine", version=1), (message(2, "fine"),), 2)
    result = await backend.write_batch([mine, other])
    assert result.conflicts == {"s"} and result.versions == {"t": 2} and not result.deleted
    s = await backend.load_session("s")
    assert s is not None and s.title == "theirs" and [m.seq for m in s.messages] == [1, 2]
    t = await backend.load_session("t")
    assert t is not None and t.title == "fine" and [m.content for m in t.messages] == ["content 1", "fine"]


async def test_inserting_a_session_that_exists_is_a_conflict(backend: Backend) -> None:
    await backend.write_batch([full(record("s", 1, 1))])
    result = await backend.write_batch([full(record("s", 2, 3))])  # version 0: "must not exist"
    assert result.conflicts == {"s"} and result.versions == {}
    loaded = await backend.load_session("s")
    assert loaded is not None and loaded.user_id == 1 and len(loaded.messages) == 1


async def test_updating_a_deleted_session_is_a_conflict_not_a_resurrection(backend: Backend) -> None:
    await backend.write_batch([full(record("s", 1, 1))])
    assert await backend.delete_user(1) == ["s"]
    stale = SessionDelta(replace(record("s", 1), version=1), (message(2),), 2)
    result = await backend.write_batch([stale])
    assert result.conflicts == result.deleted == {"s"}
    assert await backend.load_session("s") is None
