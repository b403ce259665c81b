"""Backups and restores as they get attacked: real files, the real console script in
subprocesses, an app holding the database from another process. Each test is a defect
found by trying it (a symlinked database, an encrypted backup without its keys, a full
disk, a path that is not UTF-8, a clock that was wrong once, a relative directory, a
status file left by an app that is gone)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from writebehind import Config, DatabaseLockedError, StorageError, WriteBehindStore
from writebehind import backups as backups_module
from writebehind.backups import BackupScheduler, backup_name, list_backups, restore_backup

from .conftest import QUIET, StoreFactory
from .test_sqlite_ownership import held_by_another_process

SCRIPT = Path(sys.executable).with_name("writebehind")
KEY = base64.b64encode(b"\x07" * 32).decode()
OTHER_KEY = base64.b64encode(b"\x09" * 32).decode()
TEXTS = ("👩‍💻 secret 🚀", "机密会话", "سري جدا \u200f", "e\u0301 n\u0303")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def wb(
    db: Path, *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    return subprocess.run(
        [str(SCRIPT), "--db", str(db), *args],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})}, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def encrypted_store(db_path: Path, backup_dir: Path | None = None, key: str = KEY) -> WriteBehindStore:
    config = Config(db_path=db_path, encryption_key=key, backup_dir=backup_dir, **QUIET)  # type: ignore[arg-type]
    store = WriteBehindStore.from_config(config)
    await store.start()
    return store


async def seed(store: WriteBehindStore, users: tuple[int, ...] = (1, 2)) -> None:
    for user in users:
        sid = f"chat-{user}"
        await store.ensure_session(sid, user_id=user, title=f"{TEXTS[user % 4]} {user}")
        for text in TEXTS:
            await store.append_message(sid, user_id=user, role="user", content=f"{text} of {user}")
    await store.flush()


# -- restore: which file, and who holds it ----------------------------------------------------


async def test_a_restore_through_a_symlink_is_refused_while_an_app_holds_the_real_file(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("before", user_id=1, title="会话")
    await store.flush()
    backup = tmp_path / "backup.db"
    await store.backup(backup)
    await store.aclose()
    link = tmp_path / "link.db"
    link.symlink_to(db_path)
    with held_by_another_process(db_path) as app:
        with pytest.raises(DatabaseLockedError) as refused:
            restore_backup(backup, link)
        assert refused.value.pid == app.pid
        assert "in use by a running app" in one_line(wb(link, "restore", str(backup), "--yes"))
        assert link.is_symlink() and not list(tmp_path.glob("link.db.before-restore-*"))
    # Stopped: the restore reaches the real file, and the link stays the link it was.
    aside = restore_backup(backup, link)
    assert link.is_symlink() and link.resolve() == db_path.resolve()
    assert aside is not None and aside.parent == db_path.parent and not aside.is_symlink()
    assert rows(db_path, "SELECT id FROM sessions") == [("before",)]


# -- restore: an encrypted backup and its keys ------------------------------------------------


async def test_an_encrypted_backup_restored_after_an_erasure_shows_nothing_of_the_erased_user(
    tmp_path: Path,
) -> None:
    """Part 1 end to end, as an operator does it: the schedule's backup, `delete_user`, the
    app stopped, `writebehind restore`, the app started again with its key."""
    db, directory = tmp_path / "chat.db", tmp_path / "backups"
    store = await encrypted_store(db, directory)
    await seed(store)
    assert store.backups is not None
    backup = await store.backups.run_once()
    await store.delete_user(1)
    await store.aclose()
    restored = wb(db, "restore", backup.path.name, "--yes", env={"CHAT_SESSION_BACKUP_DIR": str(directory)})
    assert restored.returncode == 0, restored.stderr
    assert "1 erased user(s) in it stay unreadable" in restored.stdout
    store = await encrypted_store(db)
    try:
        assert await store.list_sessions(1) == []
        assert [r async for r in store.export_user(1)] == []
        mine = await store.get_session("chat-2", user_id=2)
        assert [m.content for m in mine.messages] == [f"{t} of 2" for t in TEXTS]
    finally:
        await store.aclose()
    raw = db.read_bytes()
    for text in TEXTS:
        assert f"{text} of 1".encode() not in raw and text.encode() not in raw


async def test_an_encrypted_backup_is_refused_without_its_keys_file_or_with_another_databases(
    tmp_path: Path,
) -> None:
    db, directory = tmp_path / "chat.db", tmp_path / "backups"
    store = await encrypted_store(db, directory)
    await seed(store)
    assert store.backups is not None
    backup = await store.backups.run_once()
    await store.aclose()
    # Onto a new machine without the keys file: every session would be ciphertext, served
    # as bytes to an app without the key, or fail to decrypt with it.
    elsewhere = tmp_path / "new" / "chat.db"
    elsewhere.parent.mkdir()
    with pytest.raises(StorageError, match=r"encrypted.*chat\.db\.keys.*does not exist"):
        restore_backup(backup.path, elsewhere)
    assert not elsewhere.exists()
    refused = one_line(wb(elsewhere, "restore", str(backup.path), "--yes"))
    assert "keys file" in refused and "nothing was changed" in refused
    # A keys file of another database (made with another key): none of the backup's keys.
    other = await encrypted_store(elsewhere, key=OTHER_KEY)
    await seed(other, users=(3,))
    await other.aclose()
    before = elsewhere.read_bytes()
    with pytest.raises(StorageError, match=r"holds no key for 2 of the backup's 2 user key"):
        restore_backup(backup.path, elsewhere)
    assert elsewhere.read_bytes() == before
    # CHAT_SESSION_ENCRYPTION_KEYS_PATH names the keys file: with the right one, it restores.
    ok = wb(
        elsewhere,
        "restore",
        str(backup.path),
        "--yes",
        env={"CHAT_SESSION_ENCRYPTION_KEYS_PATH": str(db) + ".keys", "CHAT_SESSION_ENCRYPTION_KEY": KEY},
    )
    assert ok.returncode == 0, ok.stderr


async def test_the_reading_verbs_refuse_an_encrypted_file_whose_keys_file_is_missing(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    store = await encrypted_store(db)
    await seed(store)
    await store.aclose()
    (tmp_path / "chat.db.keys").rename(tmp_path / "elsewhere.keys")
    for env in ({}, {"CHAT_SESSION_ENCRYPTION_KEY": KEY}):
        for verb in (("sessions", "--user", "2"), ("export", "--user", "2")):
            message = one_line(wb(db, *verb, env=env))
            assert "encrypted" in message and "chat.db.keys" in message
    # An erasure is never held up by a lost keys file: the rows go, and no keys file is made.
    erased = wb(db, "erase", "--user", "2", "--yes", env={"CHAT_SESSION_ENCRYPTION_KEY": KEY})
    assert erased.returncode == 0, erased.stderr
    assert rows(db, "SELECT count(*) FROM sessions WHERE user_id = 2") == [(0,)]
    assert rows(db, "SELECT count(*) FROM sessions WHERE user_id = 1") == [(1,)]
    assert not (tmp_path / "chat.db.keys").exists()


# -- making a backup: no partial file, one self-contained file -------------------------------


def _small_files(limit: int) -> None:
    """In the child: writes past `limit` bytes fail (EFBIG), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


async def test_the_backup_verb_on_a_full_disk_leaves_no_file_and_makes_a_single_file_copy(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    for i in range(40):
        await store.ensure_session(f"s{i}", user_id=i % 3, title=TEXTS[i % 4])
        await store.append_message(f"s{i}", user_id=i % 3, role="user", content="😀 会话 " * 400)
    await store.flush()
    dest = tmp_path / "out" / "copy.db"
    dest.parent.mkdir()
    # Not measured by coverage: its data file could not be written under that limit either.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_SESSION_", "COVERAGE_"))}
    failed = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "--db", str(db_path), "backup", str(dest)],
        capture_output=True, text=True, timeout=60, env=base, preexec_fn=lambda: _small_files(16384),
    )  # fmt: skip
    assert "full" in one_line(failed).lower() or "large" in failed.stderr.lower()
    assert list(dest.parent.iterdir()) == []
    made = wb(db_path, "backup", str(dest))
    assert made.returncode == 0, made.stderr
    # One file, as the schedule's: no -wal/-shm beside it, and it opens read-only anywhere.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.db"]
    assert rows(dest, "PRAGMA journal_mode") == [("delete",)]
    assert dest.stat().st_mode & 0o777 == 0o600
    assert "exists" in one_line(wb(db_path, "backup", str(dest)))


# -- listing backups ---------------------------------------------------------------------------


def test_the_backups_verb_prints_a_path_that_is_not_utf8_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / os.fsdecode(b"bk-\xff\xfe-\xe4\xbc\x9a")
    directory.mkdir()
    db = tmp_path / "会话.db"
    name = backup_name(db, T0)
    (directory / name).write_bytes(b"x" * 10)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    text = subprocess.run(
        [str(SCRIPT), "--db", str(db), "backups", "--dir", str(directory)],
        capture_output=True,
        env=base,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert text.stdout.split(b"\t")[3].rstrip(b"\n") == os.fsencode(directory / name)
    as_json = subprocess.run(
        [str(SCRIPT), "--db", str(db), "backups", "--dir", str(directory), "--json"],
        capture_output=True, env=base, timeout=60,
    )  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr
    [row] = json.loads(as_json.stdout)
    assert Path(row["path"]) == directory / name and row["bytes"] == 10


# -- the schedule ------------------------------------------------------------------------------


async def test_a_backup_dated_in_the_future_neither_stops_the_schedule_nor_outlives_rotation(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="时钟")
    await store.flush()
    directory = tmp_path / "b"
    clock = Clock(T0 + timedelta(days=3650))  # the clock was ten years ahead once
    future = await BackupScheduler(db_path, directory, clock=clock, keep=3).run_once()
    clock.now = T0
    scheduler = BackupScheduler(db_path, directory, clock=clock, keep=3)
    scheduler.start()
    try:
        assert scheduler.next_run_at == T0  # due now, not in ten years
    finally:
        await scheduler.aclose()
    scheduler = BackupScheduler(db_path, directory, clock=clock, keep=3)
    for _ in range(3):
        await scheduler.run_once()
        clock.now += timedelta(hours=6)
    kept = list_backups(directory, db_path)
    assert future.path not in [b.path for b in kept] and len(kept) == 3


async def test_a_relative_backup_directory_is_where_it_was_when_the_store_started(
    db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = WriteBehindStore.from_config(
        Config(db_path=Path(db_path.name), backup_dir=Path("backups"), **QUIET)
    )  # type: ignore[arg-type]
    await store.start()
    try:
        await store.ensure_session("s", user_id=1)
        await store.flush()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)  # a daemon's chdir("/"), a test runner's
        assert store.backups is not None
        made = await store.backups.run_once()
        assert made.path.parent == tmp_path / "backups"
        assert not (elsewhere / "backups").exists()
    finally:
        await store.aclose()


async def test_a_backup_never_sweeps_away_another_databases_temporary_file(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.flush()
    directory = tmp_path / "b"
    directory.mkdir()
    # chat_sessions-old.db's backup in progress, in the same directory.
    theirs = directory / f".{backup_name(tmp_path / 'chat_sessions-old.db', T0)}.tmp"
    theirs.write_bytes(b"in progress")
    ours = directory / f".{backup_name(db_path, T0)}.tmp"
    ours.write_bytes(b"left by a crash")
    await BackupScheduler(db_path, directory, clock=Clock()).run_once()
    assert theirs.exists() and not ours.exists()


# -- writebehind stats: is the app that wrote the status file still there? --------------------


async def test_stats_says_whether_the_app_that_wrote_the_status_is_running(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    await store.refresh_stats()
    await store.flush()
    await store.aclose()
    stopped = orjson.loads(wb(db_path, "stats", "--json").stdout)
    assert stopped["app_running"] is False
    with held_by_another_process(db_path) as app:
        running = orjson.loads(wb(db_path, "stats", "--json").stdout)
        assert running["app_running"] is True and running["app_lock_pid"] == app.pid


async def test_a_backup_is_deleted_when_it_passes_the_retention_period_not_at_the_next_backup(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retention of a day and a backup every two days: the copy made at the start must not
    live on for the second day, holding sessions retention already removed."""
    monkeypatch.setattr("writebehind.backups._RECHECK_S", 0.01)  # the loop looks at the clock often
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="保留期")
    await store.flush()
    directory = tmp_path / "b"
    clock = Clock()
    schedule = BackupScheduler(db_path, directory, clock=clock, interval_hours=48, retention_days=1)
    schedule.start()
    try:
        async with asyncio.timeout(30):
            while schedule.fill(store.stats()).backups_made == 0:
                await asyncio.sleep(0.01)
        assert len(list_backups(directory, db_path)) == 1
        assert schedule.next_expiry_at == T0 + timedelta(days=1)
        clock.now = T0 + timedelta(days=1, minutes=1)
        async with asyncio.timeout(30):
            while schedule.fill(store.stats()).backups_kept != 0:
                await asyncio.sleep(0.01)
        assert list_backups(directory, db_path) == []
        stats = schedule.fill(store.stats())
        assert (stats.backups_made, stats.backups_kept) == (1, 0)  # deleted, no new one made
        assert schedule.next_run_at == T0 + timedelta(hours=48) and schedule.next_expiry_at is None
    finally:
        await schedule.aclose()


def test_with_postgresql_configured_the_file_verbs_say_so_instead_of_using_a_default_file(
    tmp_path: Path,
) -> None:
    """An operator of a PostgreSQL deployment types `writebehind restore X`: it must not
    restore ./chat_sessions.db, which no app uses, and report success."""
    backup = tmp_path / "备份.db"
    sqlite3.connect(backup).close()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    env = {**base, "CHAT_SESSION_DB_URL": "postgresql://127.0.0.1:5432/test"}
    for verb in (("restore", str(backup), "--yes"), ("backup", str(tmp_path / "x.db")), ("stats",)):
        result = subprocess.run(
            [str(SCRIPT), *verb], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )
        message = one_line(result)
        assert "CHAT_SESSION_DB_URL" in message and "--db" in message and "pg_dump" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["备份.db"]


async def test_an_erasure_during_a_copy_need_not_wait_for_it_the_copy_stops_and_is_made_again_soon(
    make_store: StoreFactory,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Measured before: an erasure during a copy longer than busy_timeout held every flush
    queued behind it for 5 s, and left the erased pages in the WAL. Here the copy is held
    mid-way (as a long one would be) and `interrupt()` lets the erasure's checkpoint pass."""
    store = await make_store()
    for user in (1, 2):
        await store.ensure_session(f"s{user}", user_id=user, title="删除 🗑️")
        await store.append_message(f"s{user}", user_id=user, role="user", content="ERASE-ME 秘密")
    await store.flush()
    reached = threading.Event()
    original = backups_module._Job._progress

    def held(job: backups_module._Job, status: int, remaining: int, total: int) -> None:
        reached.set()
        job._stop.wait(30)  # a long copy, mid-way, until told to stop
        original(job, status, remaining, total)

    monkeypatch.setattr(backups_module, "_STEP_PAGES", 1)
    monkeypatch.setattr(backups_module._Job, "_progress", held)
    directory = tmp_path / "b"
    clock = Clock()
    schedule = BackupScheduler(db_path, directory, clock=clock)
    schedule.start()  # none yet: due at once
    try:
        assert await asyncio.to_thread(reached.wait, 30)
        assert schedule.interrupt() is True
        await store.delete_user(1)
        assert "blocked by a reader" not in caplog.text
        wal = db_path.with_name(db_path.name + "-wal")
        assert not wal.exists() or b"ERASE-ME" not in wal.read_bytes()
        async with asyncio.timeout(30):  # the stopped copy: made again in a minute, not 6 hours
            while schedule.next_run_at == T0:
                await asyncio.sleep(0.01)
        assert schedule.next_run_at == T0 + timedelta(seconds=60)
        stats = schedule.fill(store.stats())
        assert (stats.backups_made, stats.backup_failures, stats.last_backup_error) == (0, 0, None)
        assert list(directory.iterdir()) == []  # no temporary file, no backup
    finally:
        await schedule.aclose()
    assert schedule.interrupt() is False  # nothing to stop


async def test_a_copy_whose_caller_was_cancelled_ends_before_the_next_one_starts(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies at once sweep each other's temporary files (a flaky "disk I/O error" in
    the next backup after a cancelled one): the next one waits for the cancelled one's thread."""
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="取消")
    await store.flush()
    reached, release = threading.Event(), threading.Event()
    original = backups_module._Job._progress
    steps: list[str] = []

    def held(job: backups_module._Job, status: int, remaining: int, total: int) -> None:
        if not reached.is_set():
            steps.append("first copy held")
            reached.set()
            release.wait(30)  # a slow disk: deaf to the stop for a while
        original(job, status, remaining, total)

    monkeypatch.setattr(backups_module, "_STEP_PAGES", 1)
    monkeypatch.setattr(backups_module._Job, "_progress", held)
    clock = Clock()
    schedule = BackupScheduler(db_path, tmp_path / "b", clock=clock)
    first = asyncio.create_task(schedule.run_once())
    assert await asyncio.to_thread(reached.wait, 30)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    clock.now += timedelta(hours=1)
    second = asyncio.create_task(schedule.run_once())
    await asyncio.sleep(0.2)
    assert not second.done()  # waiting for the first copy's thread, not copying beside it
    steps.append("released")
    release.set()
    made = await second
    assert steps == ["first copy held", "released"]
    assert [b.path for b in list_backups(tmp_path / "b", db_path)] == [made.path]
    assert rows(made.path, "SELECT title IS NOT NULL FROM sessions") == [(1,)]
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]
    await schedule.aclose()


async def test_the_stores_own_erasure_stops_its_scheduled_copy(
    make_store: StoreFactory,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`delete_user` and `delete_session` stop the store's own copy in progress themselves:
    held mid-way here (a long copy), it would otherwise hold the erasure for busy_timeout
    and keep the erased pages in the WAL."""
    caplog.set_level(logging.INFO, logger="writebehind")
    reached = threading.Event()
    original = backups_module._Job._progress

    def held(job: backups_module._Job, status: int, remaining: int, total: int) -> None:
        reached.set()
        job._stop.wait(30)
        original(job, status, remaining, total)

    monkeypatch.setattr(backups_module, "_STEP_PAGES", 1)
    monkeypatch.setattr(backups_module._Job, "_progress", held)
    # A database with pages to copy before the store (and its schedule) starts.
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as seeding:
        for user in (1, 2):
            await seeding.ensure_session(f"s{user}", user_id=user, title="删除 🗑️")
            await seeding.append_message(f"s{user}", user_id=user, role="user", content="ERASE-ME 秘密")
    store = await make_store(backup_dir=tmp_path / "b")
    assert await asyncio.to_thread(reached.wait, 30)
    async with asyncio.timeout(10):  # not the 30 s the held copy would take, nor busy_timeout
        assert await store.delete_user(1) == 1
    assert "blocked by a reader" not in caplog.text
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or b"ERASE-ME" not in wal.read_bytes()
    assert "stopped for an erasure" in caplog.text
    await store.aclose()
    assert store.stats().backup_failures == 0


async def test_a_failed_backup_is_tried_again_within_minutes_backing_off_up_to_the_interval(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full (or unmounted) for a minute must not cost the 6 hours to the next
    backup: a failure is tried again after 1, 2, 4... minutes (the schedule's clock moved
    on by hand), never sooner, never later than the interval; a success goes back to it."""
    monkeypatch.setattr("writebehind.backups._RECHECK_S", 0.01)  # the loop looks at the clock often
    store = await make_store()
    await store.ensure_session("s", user_id=1, title="备份 💾")
    await store.flush()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file")
    clock = Clock()
    schedule = BackupScheduler(db_path, blocker / "b", interval_hours=1, clock=clock)
    schedule.start()
    try:
        waits = []
        for failures in range(1, 9):
            async with asyncio.timeout(30):
                while schedule.fill(store.stats()).backup_failures < failures:
                    await asyncio.sleep(0.005)
                while schedule.next_run_at == clock.now:
                    await asyncio.sleep(0.005)
            due = schedule.next_run_at
            assert due is not None
            waits.append((due - clock.now).total_seconds())
            clock.now = due  # the time comes
        assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
        blocker.unlink()  # the disk is back
        async with asyncio.timeout(30):
            while schedule.fill(store.stats()).backups_made < 1:
                await asyncio.sleep(0.005)
            while schedule.next_run_at == clock.now:
                await asyncio.sleep(0.005)
        assert schedule.next_run_at == clock.now + timedelta(hours=1)
        assert schedule.fill(store.stats()).consecutive_backup_failures == 0
    finally:
        await schedule.aclose()


async def test_an_erasure_before_the_copy_took_its_snapshot_stops_it_too(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window before the copy's snapshot (making the directory, sweeping old temporary
    files, opening the file): an erasure then must stop it as well, or a snapshot taken
    just before the erasure's DELETE commits would finish as a backup with the erased rows."""
    store = await make_store()
    for user in (1, 2):
        await store.ensure_session(f"s{user}", user_id=user, title="删除 🗑️")
        await store.append_message(f"s{user}", user_id=user, role="user", content="ERASE-ME 秘密")
    await store.flush()
    reached, go_on = threading.Event(), threading.Event()
    original = backups_module._remove_stale_temps

    def slow_sweep(*args: object) -> None:
        reached.set()
        go_on.wait(30)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(backups_module, "_remove_stale_temps", slow_sweep)
    directory = tmp_path / "b"
    schedule = BackupScheduler(db_path, directory, clock=Clock())
    schedule.start()
    try:
        assert await asyncio.to_thread(reached.wait, 30)
        assert schedule.interrupt() is True  # what the store's erasure does first
        assert await store.delete_user(1) == 1
        go_on.set()
        async with asyncio.timeout(30):
            while schedule.next_run_at == T0:
                await asyncio.sleep(0.01)
        assert schedule.next_run_at == T0 + timedelta(seconds=60)  # stopped, made again soon
        assert list(directory.iterdir()) == []
        stats = schedule.fill(store.stats())
        assert (stats.backups_made, stats.backup_failures) == (0, 0)
    finally:
        go_on.set()
        await schedule.aclose()
