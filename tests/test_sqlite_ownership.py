"""One store per SQLite file: an operating-system lock held for the store's lifetime, a typed
refusal naming the holder, read-only openers beside it, and opening a fresh file from
several processes at once without a spurious failure. Real processes, real SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from writebehind import DatabaseLockedError, SchemaError, SQLiteBackend, StorageError
from writebehind.backends.migrations import SQLITE as MIGRATIONS
from writebehind.backends.sqlite import SCHEMA_VERSION
from writebehind.ownership import FileLock, lock_path_for

from .conftest import StoreFactory

# A running app, as far as the file is concerned: a started store holding one durable session.
_HOLD = r"""
import asyncio, sys
from writebehind import Config, SessionStore, SQLiteBackend, WriteBehindStore

async def main(path: str) -> None:
    config = Config(db_path=path, flush_interval_ms=3_600_000)
    store = WriteBehindStore(SessionStore(), SQLiteBackend(path), config=config)
    await store.start()
    await store.ensure_session("held", user_id="holder")
    await store.append_message("held", user_id="holder", role="user", content="kept", durable=True)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await store.aclose()

asyncio.run(main(sys.argv[1]))
"""

# Waits for a newline on stdin, then opens the file read-only ("ro") or as a store ("rw").
_RACE = r"""
import asyncio, sys
from writebehind import DatabaseLockedError, SQLiteBackend

async def main(path: str, role: str) -> None:
    backend = SQLiteBackend(path, readonly=role == "ro")
    print("waiting", flush=True)
    sys.stdin.readline()
    try:
        await backend.open()
    except DatabaseLockedError:
        print("locked")
        return
    try:
        print("ok", await backend.schema_version(), len(await backend.list_sessions("nobody")))
    finally:
        await backend.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@contextlib.contextmanager
def held_by_another_process(db_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process running a store on `db_path` until the block ends (or it is killed)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(db_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        ready = child.stdout.readline()
        assert ready == "ready\n", child.stderr.read()
        yield child
    finally:
        if child.poll() is None:
            child.stdin.close()  # a graceful stop
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        child.stdout.close()
        child.stderr.close()


async def test_a_second_store_in_the_same_process_is_refused_naming_this_process(
    make_store: StoreFactory, db_path: Path
) -> None:
    first = await make_store()
    with pytest.raises(DatabaseLockedError) as refused:
        await make_store()  # WriteBehindStore.start(): the second store never starts
    assert (refused.value.pid, refused.value.host) == (os.getpid(), socket.gethostname())
    assert refused.value.path == db_path
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert "--workers 1" in message and "CHAT_SESSION_DB_URL" in message
    with pytest.raises(DatabaseLockedError):
        await SQLiteBackend(db_path).open()  # the backend alone, too
    await first.aclose()
    second = await make_store()  # the lock ended with the first store
    await second.ensure_session("s", user_id=1)


async def test_another_process_is_refused_until_its_sigkill_frees_the_file_at_once(db_path: Path) -> None:
    with held_by_another_process(db_path) as child:
        backend = SQLiteBackend(db_path)
        with pytest.raises(DatabaseLockedError) as refused:
            await backend.open()
        assert (refused.value.pid, refused.value.host) == (child.pid, socket.gethostname())
        assert f"pid {child.pid} on host" in str(refused.value)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        await backend.open()  # at once: no retry, no stale lock to clear
        try:
            record = await backend.load_session("held")
            assert record is not None and [m.content for m in record.messages] == ["kept"]
            assert await backend.integrity_check() == ["ok"]
        finally:
            await backend.close()


async def test_the_lock_file_is_private_and_names_the_holder_only_while_held(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    lock = lock_path_for(db_path)
    assert lock.stat().st_mode & 0o777 == 0o600
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    await backend.close()
    assert lock.read_text() == ""
    second = FileLock(db_path)
    second.acquire()
    second.release()


@pytest.mark.parametrize("problem", ["not a database", "newer schema"])
async def test_a_refused_open_releases_the_lock(db_path: Path, problem: str) -> None:
    if problem == "not a database":
        db_path.write_bytes(b"hello, not a database" * 100)
    else:
        with sqlite3.connect(db_path) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError):
        await SQLiteBackend(db_path).open()
    lock = FileLock(db_path)
    lock.acquire()  # nobody holds it any more
    assert lock.held
    lock.release()


async def test_a_read_only_backend_opens_beside_a_store_and_never_writes(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s1", user_id=1, title="one")
    await store.append_message("s1", user_id=1, role="user", content="hello")
    await store.flush()
    reader = SQLiteBackend(db_path, readonly=True)
    await reader.open()  # no lock: the store holds it
    try:
        record = await reader.load_session("s1")
        assert record is not None and [m.content for m in record.messages] == ["hello"]
        assert [s.id for s in await reader.list_sessions(1)] == ["s1"]
        assert [r.id async for r in reader.iter_user_sessions(1)] == ["s1"]
        assert (await reader.file_stats())["sessions"] == 1
        assert await reader.integrity_check() == ["ok"]
        with pytest.raises(StorageError, match="read-only"):
            await reader.delete_user(1)
        await store.append_message("s1", user_id=1, role="assistant", content="later")
        await store.flush()
        record = await reader.load_session("s1")  # sees what the store commits since
        assert record is not None and len(record.messages) == 2
    finally:
        await reader.close()
    assert lock_path_for(db_path).read_text().startswith(f"{os.getpid()} ")  # still the store's


async def test_a_read_only_backend_changes_no_byte_and_creates_no_file(db_path: Path, tmp_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    await backend.close()
    before = db_path.read_bytes()
    reader = SQLiteBackend(db_path, readonly=True)
    await reader.open()
    assert await reader.schema_version() == SCHEMA_VERSION
    await reader.close()
    assert db_path.read_bytes() == before

    missing = tmp_path / "missing.db"
    with pytest.raises(StorageError, match="does not exist"):
        await SQLiteBackend(missing, readonly=True).open()
    assert not missing.exists() and not lock_path_for(missing).exists()

    empty = tmp_path / "empty.db"  # created by an app that has not migrated it yet
    empty.touch(mode=0o600)
    reader = SQLiteBackend(empty, readonly=True)
    await reader.open()
    try:  # an empty store, not an error
        assert await reader.schema_version() == 0
        assert await reader.list_sessions(1) == []
        assert await reader.load_session("x") is None
        assert [r async for r in reader.iter_user_sessions(1)] == []
        assert (await reader.file_stats())["sessions"] == 0
    finally:
        await reader.close()
    assert empty.read_bytes() == b""


def race(path: Path, roles: list[str]) -> list[str]:
    """Start one child per role, release them together, return each one's output."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(path), role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in roles
    ]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline() == "waiting\n"
    for child in children:  # as close to the same moment as a parent can make it
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outputs.append(out.strip())
    return outputs


async def test_a_fresh_file_opened_by_several_processes_at_once(tmp_path: Path) -> None:
    for round_ in range(3):
        path = tmp_path / f"fresh-{round_}.db"
        path.touch(mode=0o600)  # as the first store creates it
        roles = ["rw", "ro", "rw", "ro", "ro"]
        outputs = race(path, roles)
        stores = [out for role, out in zip(roles, outputs, strict=True) if role == "rw"]
        readers = [out for role, out in zip(roles, outputs, strict=True) if role == "ro"]
        assert all(out in (f"ok {SCHEMA_VERSION} 0", "locked") for out in stores), outputs
        assert any(out != "locked" for out in stores), outputs
        assert all(out in ("ok 0 0", f"ok {SCHEMA_VERSION} 0") for out in readers), outputs
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_the_switch_to_wal_waits_for_another_writer_instead_of_failing(db_path: Path) -> None:
    # Another connection holding the write lock on a file still in rollback mode makes
    # `PRAGMA journal_mode = WAL` fail at once, busy_timeout or not.
    db_path.touch(mode=0o600)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        backend = SQLiteBackend(db_path)
        opening = asyncio.create_task(backend.open())
        await asyncio.sleep(0.3)  # let it reach the switch, and fail there if it does not wait
        other.execute("ROLLBACK")
        await opening
        await backend.close()
    finally:
        other.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_the_switch_to_wal_gives_up_at_busy_timeout_with_a_storage_error(db_path: Path) -> None:
    db_path.touch(mode=0o600)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked"):
            await SQLiteBackend(db_path, busy_timeout_ms=200).open()
    finally:
        other.close()
    lock = FileLock(db_path)
    lock.acquire()  # a failed open let go of the file
    lock.release()


async def test_a_migration_that_another_process_finished_meanwhile_is_not_run_again(db_path: Path) -> None:
    # Another process (one that takes no writebehind lock: an older version, a script)
    # is migrating the file when the store opens it: the store reads the version again
    # under the write lock and finds nothing left to do.
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert other.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
        other.execute("BEGIN IMMEDIATE")
        for statement in _split(MIGRATIONS[0]):
            other.execute(statement)
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        backend = SQLiteBackend(db_path)
        opening = asyncio.create_task(backend.open())
        await asyncio.sleep(0.3)  # it has read version 0, and waits for the write lock
        other.execute("COMMIT")
        await opening
        try:
            assert await backend.schema_version() == SCHEMA_VERSION
            assert await backend.list_sessions(1) == []
        finally:
            await backend.close()
    finally:
        other.close()


def _split(script: str) -> list[str]:
    statements, start = [], 0
    for i, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : i + 1]):
            statements.append(script[start : i + 1])
            start = i + 1
    return statements


def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(db_path: Path) -> None:
    lock = FileLock(db_path)
    lock.acquire()
    child_ready, ready = os.pipe()
    release_child, go = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (a forked worker, say) outlives its parent's hold
        try:
            os.write(ready, b"r")
            os.read(release_child, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(child_ready, 1) == b"r"  # the child is running
        lock.release()
        again = FileLock(db_path)
        again.acquire()  # the child's inherited copy does not hold the file
        again.release()
    finally:
        os.write(go, b"x")
        os.waitpid(pid, 0)
        for fd in (child_ready, ready, release_child, go):
            os.close(fd)
