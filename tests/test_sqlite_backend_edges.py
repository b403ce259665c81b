"""The SQLite backend at the edges of its life: paths it cannot use, a file another program
holds, a writer connection lost under it, erasures whose WAL checkpoint cannot run, and a
backend used outside `open()`/`close()`. Each refusal is a `StorageError` that says what is
wrong, leaves the file as it was and lets go of its lock. Real files under tmp_path; faults
are real SQLite or operating-system conditions (an authorizer, a reader holding a
snapshot, a planted symlink)."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from writebehind import (
    ClosedError,
    Config,
    SchemaError,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindStore,
)
from writebehind.backends.base import SessionDelta
from writebehind.model import SessionRecord, utcnow
from writebehind.ownership import FileLock, lock_path_for
from writebehind.recovery import read_recovery, recovery_path_for

from .conftest import QUIET, StoreFactory
from .reliability.helpers import on_disk


def lock_is_free(db_path: Path) -> bool:
    lock = FileLock(db_path)
    lock.acquire()  # raises DatabaseLockedError if a failed open kept it
    lock.release()
    return True


def delta(session_id: str, user_id: int | str | None = 1) -> SessionDelta:
    now = utcnow()
    return SessionDelta(SessionRecord(session_id, user_id, now, now, now), (), 0)


# -- paths a store cannot use --------------------------------------------------------------------


async def test_a_path_sqlite_cannot_open_is_a_storage_error_and_lets_go_of_the_file(tmp_path: Path) -> None:
    db_path = tmp_path / "chat_sessions.db"
    db_path.mkdir()  # a directory where the database should be (a mistyped mount, say)
    store = WriteBehindStore.from_config(Config(db_path=db_path, **QUIET))
    with pytest.raises(StorageError, match=r"chat_sessions\.db"):
        await store.start()
    assert lock_is_free(db_path)
    with pytest.raises(ClosedError, match="call start"):
        await store.get_session("s", user_id=1)


async def test_a_database_in_a_missing_directory_is_refused_creating_nothing(tmp_path: Path) -> None:
    db_path = tmp_path / "not-mounted" / "chat_sessions.db"
    store = WriteBehindStore.from_config(Config(db_path=db_path, **QUIET))
    with pytest.raises(StorageError, match=r"cannot open the lock file .*chat_sessions\.db\.lock"):
        await store.start()
    assert not db_path.parent.exists()
    with pytest.raises(ClosedError, match="call start"):
        await store.ensure_session("s", user_id=1)


async def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(db_path: Path) -> None:
    victim = db_path.parent / "precious.txt"
    victim.write_text("do not truncate me")
    lock_path_for(db_path).symlink_to(victim)
    with pytest.raises(StorageError, match="cannot open the lock file"):
        await SQLiteBackend(db_path).open()
    assert victim.read_text() == "do not truncate me"
    assert not db_path.exists()  # refused before the database was created


async def test_memory_is_refused_a_store_is_never_silently_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = SQLiteBackend(":memory:")  # sqlite3's name for a database that dies with it
    with pytest.raises(StorageError, match=r"could not switch to WAL mode \(got 'memory'\)"):
        await backend.open()
    assert lock_is_free(Path(":memory:"))


async def test_a_read_only_open_of_something_that_is_not_a_file_is_a_storage_error(tmp_path: Path) -> None:
    not_a_file = tmp_path / "a-directory.db"
    not_a_file.mkdir()
    backend = SQLiteBackend(not_a_file, readonly=True)
    with pytest.raises(StorageError, match="cannot open it read-only"):
        await backend.open()
    with pytest.raises(StorageError, match="not open"):
        await backend.list_sessions(1)  # nothing was left half open


async def test_a_file_another_program_holds_exclusively_is_locked_not_called_corrupt(db_path: Path) -> None:
    # A file still in rollback mode that another program (a script, sqlite3 itself) holds
    # with BEGIN EXCLUSIVE: even the schema version cannot be read. That is a lock, which
    # goes away, not "not a database", which tells the operator the file is lost.
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE notes (x)")
        conn.execute("PRAGMA user_version = 0")
    before = db_path.read_bytes()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(
            StorageError, match="cannot read the schema version: database is locked"
        ) as caught:
            await SQLiteBackend(db_path, busy_timeout_ms=50).open()
        assert not isinstance(caught.value, SchemaError)
    finally:
        other.close()
    assert db_path.read_bytes() == before
    assert lock_is_free(db_path)


# -- a backend used outside open() and close() ----------------------------------------------------


async def test_a_backend_used_before_open_or_after_close_raises_storage_error(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    with pytest.raises(StorageError, match="is not open"):
        await backend.load_session("s")
    with pytest.raises(StorageError, match="is not open"):
        await backend.write_batch([delta("s")])
    assert not db_path.exists()
    await backend.open()
    await backend.write_batch([delta("s")])
    await backend.close()
    await backend.close()  # idempotent
    with pytest.raises(StorageError, match="is not open"):
        await backend.list_sessions(1)
    assert lock_is_free(db_path)
    assert on_disk(db_path) == {}  # the session row is there, with no messages
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT id, version FROM sessions").fetchall() == [("s", 1)]


async def test_an_empty_batch_writes_nothing(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        await backend.write_batch([delta("s")])
        changes = backend.writer.total_changes
        result = await backend.write_batch([], [])
        assert result.versions == {} and not result.conflicts
        assert backend.writer.total_changes == changes
    finally:
        await backend.close()


# -- the writer connection lost under a running store --------------------------------------------


async def test_a_lost_writer_connection_is_a_storage_failure_not_a_poison_record(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    config = Config(db_path=db_path, shutdown_timeout_seconds=0.3, **QUIET)
    store = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=config)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    assert isinstance(store.backend, SQLiteBackend)
    await store.backend.writer.close()  # the writing connection is gone (its thread ended)
    with pytest.raises(StorageError, match="Connection closed"):
        await store.flush()
    stats = store.stats()
    # Retried with backoff like any failing disk, never set aside as the session's own fault.
    assert stats.consecutive_failures == 1 and stats.poisoned_sessions == 0
    assert stats.dirty_sessions == 1
    await store.aclose()  # the final flush fails too: the recovery file takes the session
    (saved,) = read_recovery(recovery_path_for(db_path))
    assert [m.content for m in saved.messages] == ["acknowledged"]
    again = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=config)
    async with again:
        assert [m.content for m in (await again.get_session("s", user_id=1)).messages] == ["acknowledged"]
    assert on_disk(db_path) == {"s": {1: "acknowledged"}}


# -- erasure when the WAL checkpoint cannot run --------------------------------------------------


async def test_an_erasure_blocked_by_a_reader_says_the_wal_is_kept_and_the_next_one_scrubs_it(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    store = await make_store(busy_timeout_ms=50)
    for user in (1, 2):
        await store.ensure_session(f"s{user}", user_id=user)
        await store.append_message(f"s{user}", user_id=user, role="user", content=f"PERSONAL-{user}-" * 20)
    await store.flush()
    reader = sqlite3.connect(db_path, isolation_level=None)  # a backup tool, say, mid-read
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM messages").fetchone() == (2,)
        assert await store.delete_user(1) == 1
        assert any("blocked by a reader; the WAL is kept" in r.getMessage() for r in caplog.records)
        assert set(on_disk(db_path)) == {"s2"}  # erased for everyone who reads now
    finally:
        reader.close()
    assert await store.delete_user(2) == 1  # no reader now: this checkpoint empties the WAL
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.stat().st_size == 0
    assert b"PERSONAL-1-" not in db_path.read_bytes()


async def test_an_erasure_whose_checkpoint_is_refused_still_erases_and_says_so(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="writebehind")
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="personal")
    await store.ensure_session("other", user_id=2)
    await store.flush()

    def no_checkpoint(action: int, arg1: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_PRAGMA and arg1 == "wal_checkpoint":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    assert isinstance(store.backend, SQLiteBackend)
    await store.backend.writer.set_authorizer(no_checkpoint)
    await store.delete_session("s", user_id=1)  # durable when it returns, checkpoint or not
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "checkpoint after an erasure failed: not authorized" in warnings
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT id FROM sessions").fetchall() == [("other",)]
    await store.backend.writer.set_authorizer(None)
    await store.append_message("other", user_id=2, role="user", content="still served")
    await store.flush()
    assert on_disk(db_path) == {"other": {1: "still served"}}


# -- reads of a file that changes under a read-only opener, or is damaged ------------------------


async def test_a_read_only_opener_that_came_before_the_migration_sees_the_store_after_it(
    db_path: Path,
) -> None:
    db_path.touch(mode=0o600)  # created, not migrated yet: the app is starting
    reader = SQLiteBackend(db_path, readonly=True)  # the operator's `writebehind stats`, say
    await reader.open()
    try:
        assert await reader.list_sessions(1) == []  # an empty store, not an error
        store = WriteBehindStore(
            SessionStore(), SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET)
        )
        async with store:
            await store.ensure_session("s", user_id=1)
            await store.append_message("s", user_id=1, role="user", content="hello", durable=True)
            assert [s.id for s in await reader.list_sessions(1)] == ["s"]
            loaded = await reader.load_session("s")
            assert loaded is not None and [m.content for m in loaded.messages] == ["hello"]
    finally:
        await reader.close()


async def test_a_damaged_page_is_a_storage_error_for_the_reads_that_touch_it_only(db_path: Path) -> None:
    store = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET))
    async with store:
        for i in range(200):
            await store.ensure_session(f"s{i:03d}", user_id=1)
            await store.append_message(
                f"s{i:03d}", user_id=1, role="user", content=f"MARKER-{i:03d}" + "x" * 500
            )
    data = db_path.read_bytes()  # closed: everything is in the main file, WAL checkpointed
    damaged, intact = (data.index(f"MARKER-{i:03d}".encode()) // 4096 for i in (150, 0))
    assert damaged != intact
    with open(db_path, "r+b") as f:  # a bad sector: the page holding s150's message
        f.seek(damaged * 4096)
        f.write(b"\xff" * 4096)
    reader = SQLiteBackend(db_path, readonly=True)
    await reader.open()  # the schema is readable: the damage is found by what reads it
    try:
        with pytest.raises(StorageError, match="load_session failed: database disk image is malformed"):
            await reader.load_session("s150")
        with pytest.raises(StorageError, match="integrity_check failed: database disk image is malformed"):
            await reader.integrity_check()
        loaded = await reader.load_session("s000")  # the connection still serves the rest
        assert loaded is not None and loaded.messages[0].content.startswith("MARKER-000")
    finally:
        await reader.close()


# -- anonymous rows, and the lock itself ---------------------------------------------------------


async def test_an_anonymous_row_round_trips_without_an_owner_and_is_deleted_by_id(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        await backend.write_batch([delta("anon", None)])
        loaded = await backend.load_session("anon")
        assert loaded is not None and loaded.user_id is None
        assert await backend.delete_session("anon", 1) is False  # a signed-in user does not own it
        assert await backend.delete_session("anon", None) is True
        assert await backend.load_session("anon") is None
    finally:
        await backend.close()


def test_a_lock_taken_twice_by_its_holder_is_one_lock_released_once(db_path: Path) -> None:
    lock = FileLock(db_path)
    lock.acquire()
    lock.acquire()  # already held: nothing more
    assert repr(lock) == f"FileLock({str(db_path)!r}, held=True)"
    lock.release()
    assert repr(lock) == f"FileLock({str(db_path)!r}, held=False)"
    assert lock_is_free(db_path)
    assert lock_path_for(db_path).read_bytes() == b""  # the holder's name goes with the lock


_LOCK_ON_A_FULL_QUOTA = r"""
import resource, signal, sys
from writebehind.ownership import FileLock
from writebehind import StorageError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # no byte may be written: a full quota
try:
    FileLock(sys.argv[1]).acquire()
except StorageError as exc:
    print(exc)
finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
lock = FileLock(sys.argv[1])
lock.acquire()  # the failed holder kept nothing
print("free")
lock.release()
"""


def test_a_lock_that_cannot_name_its_holder_is_not_held(db_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _LOCK_ON_A_FULL_QUOTA, str(db_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == [
        f"cannot write the lock file {lock_path_for(db_path)}: File too large",
        "free",
    ]
