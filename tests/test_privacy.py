"""Users' rights and the operator's duties: export, durable erasure, retention, backup, and
the access log, each on a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import tracemalloc
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from writebehind import SessionDelta, SessionRecord, SQLiteBackend, StorageError, StoredMessage
from writebehind.model import utcnow

from .conftest import StoreFactory

MARKER = "ZQX-ERASE-ME-7731"


async def test_export_merges_memory_and_disk_without_duplicates_or_secrets(make_store: StoreFactory) -> None:
    store = await make_store()
    for i in range(3):
        await store.ensure_session(f"old{i}", user_id=1, title=f"old {i}")
        await store.append_message(f"old{i}", user_id=1, role="user", content=f"kept {i}")
    await store.aclose()
    store = await make_store()
    await store.append_message("old1", user_id=1, role="assistant", content="newer, in memory")
    await store.ensure_session("new", user_id=1, csrf_token="CSRF-SECRET", client_ip="198.51.100.7")
    await store.ensure_session("theirs", user_id=2)
    anon = await store.ensure_session(user_id=None, binding_token="BINDING-SECRET")

    records = [r async for r in store.export_user(1)]
    assert sorted(r.id for r in records) == ["new", "old0", "old1", "old2"]
    old1 = next(r for r in records if r.id == "old1")
    assert [m.content for m in old1.messages] == ["kept 1", "newer, in memory"]

    document = b"".join([chunk async for chunk in store.export_user_json(1)])
    data = orjson.loads(document)
    assert data["format"] == "writebehind-export" and data["version"] == 1 and data["user_id"] == 1
    assert data["exported_at"].endswith("+00:00")
    assert sorted(s["id"] for s in data["sessions"]) == ["new", "old0", "old1", "old2"]
    assert b"CSRF-SECRET" not in document and b"BINDING-SECRET" not in document
    assert b"theirs" not in document and anon.id.encode() not in document


async def test_export_of_10000_sessions_streams_in_bounded_memory(
    make_store: StoreFactory, db_path: Path
) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    now = utcnow()
    total_bytes = 0
    for chunk in range(20):
        deltas = []
        for i in range(500):
            sid = f"s{chunk:02d}-{i:03d}"
            messages = tuple(
                StoredMessage(f"m{k}", k, "user", f"{sid} message {k} " + "e" * 400, now, now)
                for k in range(1, 6)
            )
            total_bytes += sum(len(m.content) for m in messages)
            record = SessionRecord(sid, 42, now, now, now)
            deltas.append(SessionDelta(record, messages, len(messages)))
        await backend.write_batch(deltas)
    await backend.close()

    store = await make_store()
    tracemalloc.start()
    count = size = 0
    async for chunk in store.export_user_json(42):
        size += len(chunk)
        count += chunk.count(b'"seq":1,')
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 10_000
    print(
        f"\nexported 10,000 sessions ({size / 1e6:.1f} MB of JSON, {total_bytes / 1e6:.1f} MB of content): "
        f"tracemalloc peak {peak / 1e6:.2f} MB"
    )
    assert peak < total_bytes / 20  # a few sessions at a time, never the whole user


def raw_bytes(db_path: Path) -> bytes:
    data = b""
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        if path.exists():
            data += path.read_bytes()
    return data


async def test_erased_user_leaves_no_byte_in_the_database_files(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    for i in range(20):
        await store.ensure_session(f"victim-{i}", user_id="victim", title=f"{MARKER} title")
        reply = await store.append_message(f"victim-{i}", user_id="victim", role="assistant", content="")
        for k in range(10):  # several versions of each row pass through the WAL
            await store.update_message(f"victim-{i}", reply.id, user_id="victim", append=f"{MARKER} {k} ")
            await store.flush()
    await store.ensure_session("bystander", user_id="other")
    await store.append_message("bystander", user_id="other", role="user", content="keep me")
    await store.flush()
    assert MARKER.encode() in raw_bytes(db_path)

    assert await store.delete_user("victim") == 20
    assert MARKER.encode() not in raw_bytes(db_path)
    await store.aclose()
    assert MARKER.encode() not in raw_bytes(db_path)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT content FROM messages").fetchall() == [("keep me",)]


async def test_retention_purges_idle_sessions_and_never_an_active_one(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store(retention_days=30)
    for name in ("idle", "active", "stale-row"):
        await store.ensure_session(name, user_id=1)
        await store.append_message(name, user_id=1, role="user", content=name)
    await store.flush()
    later = utcnow() + timedelta(days=31)
    # "stale-row" is read in memory right now: its disk row is old, the session is not
    await store.get_session("stale-row", user_id=1)
    active = store.hot.tier.peek("active")
    assert active is not None
    active.last_access_at = later  # touched in the future, from the purge's point of view
    stale = store.hot.tier.peek("stale-row")
    assert stale is not None
    stale.last_access_at = later
    await store.flush()  # "active" reaches disk with its new time; "stale-row" does too...
    with sqlite3.connect(db_path) as conn:  # ...then make its disk row old behind the store's back
        conn.execute("UPDATE sessions SET last_access_at = 0 WHERE id = 'stale-row'")

    assert await store.purge_expired(now=later) == 1  # "idle"; "stale-row" is written back
    assert sorted(s.id for s in await store.list_sessions(1)) == ["active", "stale-row"]
    assert store.stats().sessions_purged >= 1 and store.stats().last_cleanup_at is not None
    await store.flush()
    with sqlite3.connect(db_path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT id FROM sessions")) == ["active", "stale-row"]
        assert conn.execute("SELECT content FROM messages WHERE session_id = 'stale-row'").fetchall() == [
            ("stale-row",)
        ]


async def test_backup_is_a_consistent_copy_taken_while_writing(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = await make_store(flush_interval_ms=5)
    await store.ensure_session("s", user_id=1)

    async def keep_writing() -> None:
        for i in range(300):
            await store.append_message("s", user_id=1, role="user", content=f"m{i}")
            await asyncio.sleep(0)

    writing = asyncio.create_task(keep_writing())
    await asyncio.sleep(0.01)
    dest = tmp_path / "backup.db"
    await store.backup(dest)
    await writing
    assert dest.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(dest) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        seqs = [r[0] for r in conn.execute("SELECT seq FROM messages ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 1
    with pytest.raises(StorageError, match="exists"):
        await store.backup(dest)


async def test_access_log_names_ids_never_content(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="writebehind")
    store = await make_store()
    await store.ensure_session("s1", user_id=7)
    await store.append_message("s1", user_id=7, role="user", content=MARKER)
    await store.get_session("s1", user_id=7)
    await store.get_messages("s1", user_id=7, after_seq=0)
    _ = [r async for r in store.export_user(7)]
    await store.delete_session("s1", user_id=7)
    access = [r.getMessage() for r in caplog.records if r.name == "writebehind.access"]
    assert "read session=s1 user=7" in access
    assert "exported user=7 sessions=1" in access
    assert "erased session=s1 user=7" in access
    assert not any(MARKER in r.getMessage() for r in caplog.records)
