"""Scheduled backups on real SQLite files: each a checked, private, consistent copy made
while the app writes; rotated by count and by the retention period over simulated time
(an injected clock, never a sleep); failures visible in stats() and the metrics without
touching the flushes; restored only onto a file no app holds, the old file kept aside."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from writebehind import (
    Config,
    ConfigError,
    DatabaseLockedError,
    SchemaError,
    SessionStore,
    StorageError,
    WriteBehindStore,
)
from writebehind.backups import BackupScheduler, backup_name, list_backups, restore_backup
from writebehind.cli import cli
from writebehind.metrics import StoreCollector
from writebehind.model import utcnow

from .conftest import QUIET, StoreFactory

SCRIPT = Path(sys.executable).with_name("writebehind")
# Text SQLite and the copy must carry byte for byte: emoji (astral, ZWJ), CJK, RTL with
# its marks, combining characters.
TEXTS = ("👩‍💻 ship it 🚀", "会话备份测试", "نسخة احتياطية \u200f", "e\u0301 n\u0303 a\u030a")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def seed(store: WriteBehindStore, sessions: int = 4, user: int | str = 1) -> None:
    for i in range(sessions):
        sid = f"s{i}-{user}"
        await store.ensure_session(sid, user_id=user, title=TEXTS[i % len(TEXTS)])
        for text in TEXTS:
            await store.append_message(sid, user_id=user, role="user", content=text)
    await store.flush()


async def first_attempt(store: WriteBehindStore) -> None:
    """Wait for the attempt a store's schedule makes at start (there is no backup yet)."""
    async with asyncio.timeout(30):
        while store.stats().backups_made + store.stats().backup_failures == 0:
            await asyncio.sleep(0.01)


def scheduler(
    db_path: Path,
    directory: Path,
    clock: Clock,
    *,
    keep: int = 28,
    retention_days: int = 90,
    interval_hours: float = 6.0,
) -> BackupScheduler:
    return BackupScheduler(
        db_path,
        directory,
        clock=clock,
        keep=keep,
        retention_days=retention_days,
        interval_hours=interval_hours,
    )


# -- configuration ----------------------------------------------------------------------------


def test_the_backup_variables_are_read_and_a_bad_value_names_its_variable(tmp_path: Path) -> None:
    config = Config.from_env(
        {
            "CHAT_SESSION_BACKUP_DIR": str(tmp_path / "b"),
            "CHAT_SESSION_BACKUP_INTERVAL_HOURS": "0.5",
            "CHAT_SESSION_BACKUP_KEEP": "3",
        }
    )
    assert (config.backup_dir, config.backup_interval_hours, config.backup_keep) == (tmp_path / "b", 0.5, 3)
    defaults = Config.from_env({})
    assert (defaults.backup_dir, defaults.backup_interval_hours, defaults.backup_keep) == (None, 6.0, 28)
    for env, named in (
        ({"CHAT_SESSION_BACKUP_KEEP": "0"}, "CHAT_SESSION_BACKUP_KEEP"),
        ({"CHAT_SESSION_BACKUP_KEEP": "many"}, "CHAT_SESSION_BACKUP_KEEP"),
        ({"CHAT_SESSION_BACKUP_INTERVAL_HOURS": "-1"}, "CHAT_SESSION_BACKUP_INTERVAL_HOURS"),
        ({"CHAT_SESSION_BACKUP_INTERVAL_HOURS": "inf"}, "CHAT_SESSION_BACKUP_INTERVAL_HOURS"),
        ({"CHAT_SESSION_BACKUP_INTERVAL_HOURS": "100000"}, "CHAT_SESSION_BACKUP_INTERVAL_HOURS"),
        # PostgreSQL: refused at configuration, not at the first backup six hours later.
        (
            {"CHAT_SESSION_BACKUP_DIR": "/b", "CHAT_SESSION_DB_URL": "postgresql://h/db"},
            "CHAT_SESSION_BACKUP_DIR",
        ),
        ({"CHAT_SESSION_BACKUP_DIR": "/b", "CHAT_SESSION_RETENTION_DAYS": "0"}, "CHAT_SESSION_BACKUP_DIR"),
    ):
        with pytest.raises(ConfigError, match=named):
            Config.from_env(env)


def test_a_store_whose_backend_has_no_file_refuses_a_backup_dir(tmp_path: Path) -> None:
    class NoFile:  # what the scheduler sees of a PostgreSQL backend: no `path`
        pass

    with pytest.raises(ConfigError, match="backup_dir is for SQLite only"):
        WriteBehindStore(SessionStore(), NoFile(), config=Config(backup_dir=tmp_path))  # type: ignore[arg-type]


# -- one backup -------------------------------------------------------------------------------


async def test_a_backup_is_a_checked_private_single_file_copy_that_restores(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    backups = tmp_path / "nested" / "backups"  # created, 0700
    store = await make_store(backup_dir=backups)
    await first_attempt(store)  # at start: there was no backup
    await seed(store)
    assert store.backups is not None
    backup = await store.backups.run_once()
    assert backup.path.parent == backups and backup.path.name.startswith("chat_sessions-")
    assert backup.path.name.endswith("Z.db") and backup.size == backup.path.stat().st_size
    assert (mode(backup.path), mode(backups)) == (0o600, 0o700)
    # Self-contained files (rollback journal, no -wal beside them), no temporary left.
    listed = list_backups(backups, db_path)
    assert listed[0] == backup and len(listed) == 2
    assert sorted(p.name for p in backups.iterdir()) == sorted(b.path.name for b in listed)
    assert rows(backup.path, "PRAGMA journal_mode") == [("delete",)]
    assert rows(backup.path, "PRAGMA integrity_check") == [("ok",)]
    assert rows(listed[1].path, "SELECT count(*) FROM sessions") == [(0,)]  # the one at start
    stats = store.stats()
    assert (stats.backups_made, stats.backup_failures, stats.backups_kept) == (2, 0, 2)
    assert stats.last_backup_at == backup.taken_at

    # Later writes are not in it; a restore brings the database back to it.
    await store.append_message("s0-1", user_id=1, role="assistant", content="after the backup")
    await store.delete_session("s1-1", user_id=1)
    await store.aclose()
    aside = restore_backup(backup.path, db_path)
    assert aside is not None and aside.name.startswith("chat_sessions.db.before-restore-")
    assert (mode(db_path), mode(aside)) == (0o600, 0o600)
    assert not list(tmp_path.glob(".chat_sessions.db.restoring*"))
    async with WriteBehindStore.from_config(Config(db_path=db_path, **QUIET)) as restored:
        assert sorted(s.id for s in await restored.list_sessions(1)) == ["s0-1", "s1-1", "s2-1", "s3-1"]
        messages = await restored.get_messages("s0-1", user_id=1)
        assert [m.content for m in messages] == list(TEXTS)
        assert (await restored.get_session("s2-1", user_id=1)).title == TEXTS[2]
    # The old file kept aside is the database as it was before the restore.
    assert rows(aside, "SELECT count(*) FROM sessions") == [(3,)]
    assert ("after the backup",) in rows(aside, "SELECT content FROM messages")


async def test_a_restore_sets_the_old_wal_aside_with_its_file_and_never_replays_it_onto_the_backup(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store(backup_dir=tmp_path / "b")
    await seed(store, sessions=2)
    assert store.backups is not None
    backup = await store.backups.run_once()
    await store.aclose()
    # A process that dies with committed data in the WAL (no checkpoint ran): the WAL
    # holds a session the main file does not.
    child = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            "import os, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('PRAGMA wal_autocheckpoint = 0')\n"
            'c.execute("INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status) '
            "VALUES ('only-in-the-wal', 1, 1, 1, 1, 'active')\")\n"
            "os._exit(0)\n",
            str(db_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.stat().st_size > 0
    aside = restore_backup(backup.path, db_path)
    assert aside is not None
    assert not wal.exists() and not db_path.with_name(db_path.name + "-shm").exists()
    assert aside.with_name(aside.name + "-wal").exists()
    # The old state is whole aside (SQLite reads its WAL with it); the restored file never
    # met that WAL.
    assert ("only-in-the-wal",) in rows(aside, "SELECT id FROM sessions")
    assert sorted(rows(db_path, "SELECT id FROM sessions")) == [("s0-1",), ("s1-1",)]
    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_a_restore_onto_a_missing_database_installs_it(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store(backup_dir=tmp_path / "b")
    await seed(store, sessions=1)
    assert store.backups is not None
    backup = await store.backups.run_once()
    await store.aclose()
    for suffix in ("", "-wal", "-shm"):
        db_path.with_name(db_path.name + suffix).unlink(missing_ok=True)
    assert restore_backup(backup.path, db_path) is None
    assert mode(db_path) == 0o600
    assert rows(db_path, "SELECT id FROM sessions") == [("s0-1",)]


async def test_a_restore_is_refused_while_a_store_holds_the_file_and_changes_nothing(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store(backup_dir=tmp_path / "b")
    await seed(store, sessions=1)
    assert store.backups is not None
    backup = await store.backups.run_once()
    await store.ensure_session("newer", user_id=1)
    await store.flush()
    with pytest.raises(DatabaseLockedError) as refused:
        restore_backup(backup.path, db_path)
    assert refused.value.pid == os.getpid()
    assert not list(db_path.parent.glob("*.before-restore-*"))
    assert not list(db_path.parent.glob(".chat_sessions.db.restoring*"))
    assert sorted(s.id for s in await store.list_sessions(1)) == ["newer", "s0-1"]
    # From the command line too, in another process: one line naming the holder.
    out = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "--db", str(db_path), "restore", str(backup.path), "--yes"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")},
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"in use by a running app (pid {os.getpid()}" in out.stderr and "stop the app" in out.stderr
    await store.flush()
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(2,)]


async def test_a_backup_that_is_not_a_whole_writebehind_database_is_refused_before_anything_changes(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await seed(store, sessions=1)
    await store.aclose()
    before = db_path.read_bytes()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    other_app = tmp_path / "other.db"
    conn = sqlite3.connect(other_app)
    conn.execute("CREATE TABLE invoices (id)")
    conn.close()
    # A backup whose pages were damaged after it was made.
    good = tmp_path / "good.db"
    src = sqlite3.connect(db_path)
    dst = sqlite3.connect(good)
    src.backup(dst)
    dst.execute("PRAGMA journal_mode = DELETE")
    src.close()
    dst.close()
    page = good.read_bytes()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(page[:4096] + b"\xff" * (len(page) - 4096))
    for bad, message in (
        (garbage, "not a usable SQLite database"),
        (other_app, "not a writebehind database"),
        (damaged, "integrity check|not a usable"),
    ):
        with pytest.raises(SchemaError, match=message):
            restore_backup(bad, db_path)
        assert db_path.read_bytes() == before
        assert not list(tmp_path.glob("*.before-restore-*")) and not list(tmp_path.glob(".*restoring*"))
    with pytest.raises(StorageError, match="is the database itself"):
        restore_backup(db_path, db_path)


# -- the schedule -----------------------------------------------------------------------------


async def test_rotation_keeps_the_newest_and_retention_deletes_every_older_backup(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await seed(store, sessions=1)
    directory = tmp_path / "b"
    clock = Clock()
    by_count = scheduler(db_path, directory, clock, keep=3, retention_days=90)
    made = []
    for _ in range(5):
        made.append(await by_count.run_once())
        clock.advance(hours=6)
    assert [b.path for b in list_backups(directory, db_path)] == [b.path for b in reversed(made[-3:])]
    assert [b.taken_at for b in list_backups(directory, db_path)] == [
        T0 + timedelta(hours=h) for h in (24, 18, 12)
    ]

    # Retention wins over keep: with 28 kept but a 1-day retention, nothing older than a
    # day survives a rotation.
    for backup in list_backups(directory, db_path):
        backup.path.unlink()
    clock = Clock()
    by_age = scheduler(db_path, directory, clock, keep=28, retention_days=1)
    for _ in range(6):  # at 0, 6, 12, 18, 24 and 30 hours
        await by_age.run_once()
        clock.advance(hours=6)
    assert [b.taken_at for b in list_backups(directory, db_path)] == [
        T0 + timedelta(hours=h) for h in (30, 24, 18, 12, 6)
    ]
    assert by_age.fill(store.stats()).backups_kept == 5

    # A failing attempt still rotates: two days later, with the database unreadable, every
    # backup is past the retention period and goes.
    clock.advance(days=2)
    broken = scheduler(tmp_path / "gone" / db_path.name, directory, clock, keep=28, retention_days=1)
    with pytest.raises(StorageError):
        await broken.run_once()
    assert list_backups(directory, db_path) == []
    # Files that are not this database's backups are never touched.
    (directory / "notes.txt").write_text("mine")
    (directory / "other-20260101T000000Z.db").write_text("another database's")
    await by_age.run_once()
    assert {p.name for p in directory.iterdir()} >= {"notes.txt", "other-20260101T000000Z.db"}


async def test_the_first_backup_is_due_one_interval_after_the_newest_or_at_once(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    store = await make_store()
    await seed(store, sessions=1)
    directory = tmp_path / "b"
    clock = Clock()
    first = scheduler(db_path, directory, clock, interval_hours=6)
    first.start()
    assert first.next_run_at == T0  # no backup yet: at once
    await first.aclose()

    (directory).mkdir()
    (directory / backup_name(db_path, T0 - timedelta(hours=2))).write_bytes(b"")
    recent = scheduler(db_path, directory, clock, interval_hours=6)
    recent.start()
    assert recent.next_run_at == T0 + timedelta(hours=4)  # a restart does not repeat it
    await recent.aclose()

    clock.advance(hours=5)  # the newest is now 7 hours old: one is overdue
    overdue = scheduler(db_path, directory, clock, interval_hours=6)
    overdue.start()
    assert overdue.next_run_at == clock.now
    await overdue.aclose()


async def test_the_schedule_runs_on_its_own_and_again_after_each_interval(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    # A real clock and an interval of about a second: the loop itself, not run_once.
    store = await make_store(backup_dir=tmp_path / "b", backup_interval_hours=0.0003)
    await seed(store, sessions=1)
    async with asyncio.timeout(60):
        while store.stats().backups_made < 2:
            await asyncio.sleep(0.05)
    listed = list_backups(tmp_path / "b", db_path)
    assert len(listed) >= 2 and len({b.path.name for b in listed}) == len(listed)


async def test_a_failing_backup_directory_shows_in_stats_and_metrics_and_flushes_go_on(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tests run as root here, so a read-only directory would not refuse: a path under a
    # regular file is refused by the kernel for anyone.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file")
    store = await make_store(backup_dir=blocker / "backups")
    assert store.backups is not None
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="SECRET-CONTENT 🔒")
    await first_attempt(store)  # the one at start fails: tried again in a minute, not 6 hours
    due = store.backups.next_run_at
    assert due is not None and utcnow() + timedelta(seconds=50) < due < utcnow() + timedelta(seconds=61)
    with pytest.raises(StorageError, match=r"backup of .* failed"):
        await store.backups.run_once()
    stats = store.stats()
    assert (stats.backup_failures, stats.consecutive_backup_failures, stats.backups_made) == (2, 2, 0)
    assert stats.last_backup_error is not None and "NotADirectoryError" in stats.last_backup_error
    assert stats.last_backup_at is None
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()
    assert "writebehind_backup_failures_total 2.0" in text
    assert "writebehind_consecutive_backup_failures 2.0" in text
    assert "writebehind_last_successful_backup_timestamp_seconds 0.0" in text
    # The flushes never noticed.
    await store.append_message("s", user_id=1, role="user", content="still written", durable=True)
    assert store.stats().consecutive_failures == 0 and store.stats().last_error is None
    assert [m for (m,) in rows(db_path, "SELECT content FROM messages ORDER BY seq")] == [
        "SECRET-CONTENT 🔒",
        "still written",
    ]
    assert "backup of" in caplog.text and "SECRET-CONTENT" not in caplog.text
    # Fixed: the next attempt works and the consecutive count starts again.
    blocker.unlink()
    await store.backups.run_once()
    stats = store.stats()
    assert (stats.backup_failures, stats.consecutive_backup_failures, stats.backups_made) == (2, 0, 1)
    assert stats.backups_kept == 1
    assert stats.last_backup_error is None


async def test_a_directory_that_is_a_file_fails_the_same_way(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    store = await make_store(backup_dir=taken)
    assert store.backups is not None
    await first_attempt(store)
    assert store.stats().backup_failures == 1 and "FileExistsError" in str(store.stats().last_backup_error)
    assert taken.read_text() == "a file"


async def test_a_store_closing_during_a_backup_closes_promptly_and_leaves_no_temporary_file(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "b"
    directory.mkdir()
    (directory / backup_name(db_path, utcnow())).write_bytes(b"")  # recent: none due at start
    store = await make_store(backup_dir=directory)
    assert store.backups is not None and store.backups.next_run_at is not None
    assert store.backups.next_run_at > utcnow() + timedelta(hours=5)
    await seed(store, sessions=20)
    running = asyncio.create_task(store.backups.run_once())
    await asyncio.sleep(0)  # the copy's thread has started
    await store.aclose()  # tells it to stop, waits a second at most, then the final flush
    try:
        await running  # it finished before it was told: a whole backup
    except StorageError as exc:
        assert "stopped by shutdown" in str(exc)
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(20,)]
    async with asyncio.timeout(30):  # the thread removes its temporary file as it ends
        while list((tmp_path / "b").glob(".*")):
            await asyncio.sleep(0.01)
    for backup in list_backups(tmp_path / "b", db_path):
        assert rows(backup.path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("yields", [0, 1, 2, 5])
async def test_a_caller_cancelled_at_any_await_leaves_no_half_backup_and_the_next_one_works(
    make_store: StoreFactory, db_path: Path, tmp_path: Path, yields: int
) -> None:
    store = await make_store()
    await seed(store, sessions=30)
    directory = tmp_path / "b"
    clock = Clock()
    backups = scheduler(db_path, directory, clock)
    running = asyncio.create_task(backups.run_once())
    for _ in range(yields):
        await asyncio.sleep(0)
    running.cancel()
    # Cancelled before its copy ended (that copy is told to stop), or it ended first.
    with contextlib.suppress(asyncio.CancelledError):
        await running
    async with asyncio.timeout(30):  # the copy's thread ends and removes its temporary file
        while directory.exists() and any(p.name.startswith(".") for p in directory.iterdir()):
            await asyncio.sleep(0.01)
    for backup in list_backups(directory, db_path):  # whatever got a backup's name is whole
        assert rows(backup.path, "PRAGMA integrity_check") == [("ok",)]
    clock.advance(hours=1)
    again = await backups.run_once()
    assert rows(again.path, "SELECT count(*) FROM sessions") == [(30,)]
    await backups.aclose()


async def test_a_stale_temporary_file_from_a_crash_is_removed_by_the_next_backup(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "b"
    directory.mkdir()
    stale = directory / f".{backup_name(db_path, T0)}.tmp"
    stale.write_bytes(b"half a copy")
    foreign = directory / ".someone-else.tmp"
    foreign.write_bytes(b"not ours")
    store = await make_store(backup_dir=directory)
    assert store.backups is not None
    await store.backups.run_once()
    assert not stale.exists() and foreign.exists()


# -- under load -------------------------------------------------------------------------------


BIG_SESSIONS = 300  # of 25 messages of 1.5 kB each, owned by 50 users


async def test_a_backup_under_heavy_writes_is_consistent_and_the_flushes_go_on(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    """Reports the flush latency before and during backups (run with -s to see it); the
    assertions are about what lands and what the copies hold, never about time."""
    store = await make_store(flush_interval_ms=20, cache_size=4000, max_dirty=4000)
    body = "x" * 1500 + " 🚀 会话"
    for i in range(BIG_SESSIONS):  # about 12 MB of messages on disk
        await store.ensure_session(f"big{i}", user_id=i % 50)
        for _ in range(25):
            await store.append_message(f"big{i}", user_id=i % 50, role="user", content=body)
        if i % 100 == 99:
            await store.flush()
    await store.flush()
    size_mb = db_path.stat().st_size / 1e6

    stop = asyncio.Event()
    written: dict[str, int] = {}

    async def writer(n: int) -> None:
        sid = f"w{n}"
        await store.ensure_session(sid, user_id="writer")
        while not stop.is_set():
            await store.append_message(sid, user_id="writer", role="user", content=f"{n} {body[:500]}")
            written[sid] = written.get(sid, 0) + 1
            await asyncio.sleep(0.005)

    latencies: list[tuple[float, bool]] = []
    in_backup = False

    async def measure() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await store.flush()
            latencies.append(((time.perf_counter() - started) * 1000, in_backup))
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(writer(n)) for n in range(40)]
    tasks.append(asyncio.create_task(measure()))
    await asyncio.sleep(1.0)  # the baseline: heavy writes, no backup
    clock = Clock()
    backups = scheduler(db_path, tmp_path / "b", clock, keep=28, retention_days=90)
    durations = []
    made = []
    for _ in range(5):
        before = {sid: count for sid, count in written.items()}
        await store.flush()  # everything counted in `before` is on disk now
        in_backup = True
        started = time.perf_counter()
        made.append((await backups.run_once(), before))
        durations.append(time.perf_counter() - started)
        in_backup = False
        clock.advance(hours=1)
        await asyncio.sleep(0.2)
    # An erasure during a copy: its truncating checkpoint waits for the copy's snapshot to
    # end (the one case where flushes wait for a backup: they queue behind the erasure).
    in_backup = True
    during = asyncio.create_task(backups.run_once())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    erased = await store.delete_user(7)
    erase_ms = (time.perf_counter() - started) * 1000
    made.append((await during, {}))
    in_backup = False
    stop.set()
    await asyncio.gather(*tasks)
    await store.flush()

    base = sorted(ms for ms, during in latencies if not during)
    busy = sorted(ms for ms, during in latencies if during)

    def p(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(len(values) * q))]

    print(
        f"\nbackup under heavy writes: {size_mb:.0f} MB file, backups took "
        f"{statistics.median(durations) * 1000:.0f} ms (median of {len(durations)}); "
        f"flush() latency without a backup p50 {p(base, 0.5):.1f} ms p99 {p(base, 0.99):.1f} ms "
        f"max {base[-1]:.1f} ms (n={len(base)}); during backups p50 {p(busy, 0.5):.1f} ms "
        f"p99 {p(busy, 0.99):.1f} ms max {busy[-1]:.1f} ms (n={len(busy)}); an erasure during "
        f"a backup took {erase_ms:.0f} ms"
    )
    assert erased == BIG_SESSIONS // 50 and rows(
        db_path, "SELECT count(*) FROM sessions WHERE user_id = 7"
    ) == [(0,)]
    assert busy, "no flush completed while a backup ran"
    assert store.stats().consecutive_failures == 0
    # Each copy is whole, and holds at least everything flushed before it started, each
    # session a gap-free prefix of what was written.
    for backup, before in made:
        assert rows(backup.path, "PRAGMA integrity_check") == [("ok",)]
        counts = dict(rows(backup.path, "SELECT session_id, count(*) FROM messages GROUP BY session_id"))
        gaps = rows(
            backup.path, "SELECT count(*) FROM messages GROUP BY session_id HAVING max(seq) != count(*)"
        )
        assert gaps == []
        for sid, count in before.items():
            assert counts.get(sid, 0) >= count
        assert rows(backup.path, "SELECT count(*) FROM sessions WHERE id LIKE 'big%'") in (
            [(BIG_SESSIONS,)],
            [(BIG_SESSIONS - BIG_SESSIONS // 50,)],
        )
    # And every write landed in the database.
    for sid, count in written.items():
        assert rows(db_path, f"SELECT count(*) FROM messages WHERE session_id = '{sid}'") == [(count,)]


def test_a_copy_in_steps_restarts_whenever_another_connection_commits(tmp_path: Path) -> None:
    """Why the backup is one step: SQLite restarts a stepped copy from its first page when
    the source changes through another connection between steps (the store's writer), so
    under steady writes a stepped copy would never end."""
    source_path = tmp_path / "source.db"
    writer = sqlite3.connect(source_path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.executemany("INSERT INTO t VALUES (?)", [("y" * 1000,)] * 400)
    reader = sqlite3.connect(source_path.absolute().as_uri() + "?mode=ro", uri=True)
    remaining: list[int] = []

    def progress(status: int, left: int, total: int) -> None:
        remaining.append(left)
        if len(remaining) <= 5:
            writer.execute("INSERT INTO t VALUES ('a commit between two steps')")

    target = sqlite3.connect(tmp_path / "copy.db")
    reader.backup(target, pages=50, progress=progress)
    restarts = sum(1 for a, b in itertools.pairwise(remaining) if b >= a)
    assert restarts >= 5  # each commit sent the copy back to its start
    for conn in (target, reader, writer):
        conn.close()


# -- the command line -------------------------------------------------------------------------


async def test_the_backups_and_restore_verbs(make_store: StoreFactory, db_path: Path, tmp_path: Path) -> None:
    directory = tmp_path / "b"
    store = await make_store()
    await seed(store, sessions=2)
    clock = Clock()
    made = []
    for _ in range(3):
        made.append(await scheduler(db_path, directory, clock).run_once())
        clock.advance(hours=6)
    runner = CliRunner()

    def invoke(
        *args: str, env: dict[str, str] | None = None, stdin: str | None = None
    ) -> tuple[int, str, str]:
        result = runner.invoke(cli, ["--db", str(db_path), *args], env=env, input=stdin)
        return result.exit_code, result.stdout, result.stderr

    code, out, err = await asyncio.to_thread(invoke, "backups", "--dir", str(directory))
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[0] for line in lines] == [b.taken_at.isoformat() for b in reversed(made)]
    assert [int(line[1]) for line in lines] == [b.size for b in reversed(made)]
    assert [line[3] for line in lines] == [str(b.path) for b in reversed(made)]
    assert "3 backup(s) of chat_sessions.db" in err
    code, out, _ = await asyncio.to_thread(
        invoke, "backups", "--json", env={"CHAT_SESSION_BACKUP_DIR": str(directory)}
    )
    assert code == 0 and '"taken_at": "2026-01-01T12:00:00+00:00"' in out
    code, _, err = await asyncio.to_thread(invoke, "backups", env={"CHAT_SESSION_BACKUP_DIR": ""})
    assert code == 1 and "no backup directory" in err

    # Refused while the store holds the file; then, stopped, a name in the backup
    # directory is enough, and it asks first.
    code, _, err = await asyncio.to_thread(invoke, "restore", str(made[0].path), "--yes")
    assert code == 1 and "in use by a running app" in err
    await store.ensure_session("later", user_id=1)
    await store.aclose()
    env = {"CHAT_SESSION_BACKUP_DIR": str(directory)}
    code, _, _ = await asyncio.to_thread(invoke, "restore", made[0].path.name, env=env, stdin="n\n")
    assert code == 1 and rows(db_path, "SELECT count(*) FROM sessions") == [(3,)]  # declined: unchanged
    code, out, err = await asyncio.to_thread(invoke, "restore", made[0].path.name, env=env, stdin="y\n")
    assert code == 0, err
    assert f"restored {db_path} from {made[0].path}" in out and "kept as" in out
    assert rows(db_path, "SELECT count(*) FROM sessions") == [(2,)]
    assert mode(db_path) == 0o600
    code, _, err = await asyncio.to_thread(invoke, "restore", str(tmp_path / "nope.db"), "--yes")
    assert code == 1 and "is not a backup file" in err


def test_the_backups_verb_as_typed(tmp_path: Path) -> None:
    db = tmp_path / "chat.db"  # listing needs no database, only its name
    directory = tmp_path / "b"
    directory.mkdir()
    name = backup_name(db, T0)
    (directory / name).write_bytes(b"x" * 2048)
    out = subprocess.run(
        [str(SCRIPT), "--db", str(db), "backups"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")},
             "CHAT_SESSION_BACKUP_DIR": str(directory)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"2026-01-01T00:00:00+00:00\t2048\t2.0 KB\t{directory / name}\n"
