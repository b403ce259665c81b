"""Monitoring on real files (and the real PostgreSQL): the database's size, sessions and
users on disk, the last cleanup and backup and their failures, in stats(), the
Prometheus collector and `writebehind stats`; measured in the background, so that a scrape
never queries the database."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from writebehind import Config, SessionStore, SQLiteBackend, StorageError, WriteBehindStore
from writebehind.backups import list_backups
from writebehind.metrics import StoreCollector
from writebehind.model import utcnow
from writebehind.stats import DiskMonitor, DiskUsage, read_status, status_path_for

from .conftest import QUIET, StoreFactory
from .pg import DSN, new_schema, postgres_schema

SCRIPT = Path(sys.executable).with_name("writebehind")
PRIVATE = ("secret-session", "SECRET-CONTENT", "alice")


class Measured(SQLiteBackend):
    """A real SQLite backend that records every `disk_usage` call (whether it counted), and
    can be told to fail its purges or its measurements."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[bool] = []
        self.fail_purge = False
        self.fail_usage = False

    async def disk_usage(self, counts: bool = False) -> DiskUsage:
        self.calls.append(counts)
        if self.fail_usage:
            raise StorageError(f"{self.path}: disk usage failed: disk I/O error")
        return await super().disk_usage(counts)

    async def purge_older_than(self, cutoff: Any, *, limit: int = 500) -> list[str]:
        if self.fail_purge:
            raise StorageError(f"{self.path}: purge failed: database is locked")
        return await super().purge_older_than(cutoff, limit=limit)


def metrics(store: SessionStore | WriteBehindStore) -> str:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    return generate_latest(registry).decode()


def value(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


async def until(condition: Any) -> None:
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.01)


async def seed(store: WriteBehindStore) -> None:
    """Five sessions of three users on disk (the int user 1 and the text user "1" are two),
    and an anonymous one that never is."""
    for sid, user in (("a", 1), ("b", 1), ("c", "1"), ("secret-session", "alice"), ("e", "alice")):
        await store.ensure_session(sid, user_id=user, title="会话 👩‍💻")
        await store.append_message(sid, user_id=user, role="user", content="SECRET-CONTENT مرحبا e\u0301")
    await store.ensure_session("anon", user_id=None)
    await store.flush()


async def test_stats_report_the_file_and_wal_sizes_and_the_sessions_and_users_on_disk(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await seed(store)
    stats = await store.refresh_stats()
    wal = db_path.with_name(db_path.name + "-wal")
    assert stats.wal_bytes == wal.stat().st_size and stats.wal_bytes > 0
    assert stats.db_bytes == db_path.stat().st_size + wal.stat().st_size
    assert (stats.sessions_on_disk, stats.users_on_disk) == (5, 3)
    assert stats.disk_counted_at is not None and stats.disk_counted_at <= utcnow()
    await store.delete_user("alice")  # ends with a truncating checkpoint: the WAL empties
    stats = await store.refresh_stats()
    assert (stats.sessions_on_disk, stats.users_on_disk, stats.wal_bytes) == (3, 2, 0)
    assert stats.db_bytes == db_path.stat().st_size


async def test_a_scrape_never_queries_the_database(make_store: StoreFactory, db_path: Path) -> None:
    backend = Measured(db_path)
    store = await make_store(backend=backend)
    await seed(store)
    await until(lambda: store.stats().db_bytes is not None)  # the housekeeping's first round
    assert backend.calls[0] is True  # it counts at start (after the cleanup there)
    before = len(backend.calls)
    for _ in range(500):
        store.stats()
        metrics(store)
    assert len(backend.calls) == before


async def test_counts_are_taken_every_five_minutes_and_when_asked_sizes_every_time(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    await seed(store)
    now = [1000.0]
    asked: list[bool] = []

    async def usage(counts: bool) -> DiskUsage:
        asked.append(counts)
        return await store.backend.disk_usage(counts)  # type: ignore[attr-defined,no-any-return]

    monitor = DiskMonitor(usage, clock=lambda: now[0])
    await monitor.refresh()  # never counted yet
    await monitor.refresh()
    now[0] += 299
    await monitor.refresh()
    now[0] += 2
    await monitor.refresh()  # five minutes since the last count
    await monitor.refresh(counts=True)  # after a cleanup
    assert asked == [True, False, False, True, True]
    assert monitor.fill(store.stats()).sessions_on_disk == 5


async def test_the_housekeeping_counts_again_after_each_cleanup(
    make_store: StoreFactory, db_path: Path
) -> None:
    # A cleanup about every second, a housekeeping round every half second.
    store = await make_store(cleanup_interval_hours=0.0003, anon_ttl_seconds=1)
    await until(lambda: store.stats().disk_counted_at is not None)
    assert store.stats().sessions_on_disk == 0  # counted at start, before anything was written
    await seed(store)
    # Two sessions idle since 1970, written by another program: the next cleanup removes them.
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.executemany(
        "INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status) "
        "VALUES (?, 9, 1, 1, 1, 'active')",
        [("old1",), ("old2",)],
    )
    conn.close()
    # Far less than the five minutes between counts: only the count after a cleanup shows it.
    await until(lambda: store.stats().sessions_purged == 2 and store.stats().sessions_on_disk == 5)
    assert store.stats().users_on_disk == 3


async def test_cleanup_failures_and_the_last_cleanup_show_in_stats_metrics_and_the_command_line(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    backend = Measured(db_path)
    backend.fail_purge = True
    store = await make_store(backend=backend, backup_dir=tmp_path / "b")
    await seed(store)
    await until(lambda: store.stats().cleanup_failures == 1)  # the cleanup at start failed
    assert store.stats().last_cleanup_at is None
    text = metrics(store)
    assert value(text, "writebehind_cleanup_failures_total") == 1
    assert value(text, "writebehind_last_successful_cleanup_timestamp_seconds") == 0
    backend.fail_purge = False
    await store.purge_expired()
    assert store.backups is not None
    await until(lambda: store.stats().backups_made + store.stats().backup_failures > 0)
    await store.backups.run_once()
    stats = await store.refresh_stats()
    assert stats.last_cleanup_at is not None and stats.cleanup_failures == 1
    text = metrics(store)
    assert (
        value(text, "writebehind_last_successful_cleanup_timestamp_seconds")
        == stats.last_cleanup_at.timestamp()
    )

    # What the app reports, in a file beside the database that the command line reads.
    status_file = status_path_for(db_path)
    assert status_file.stat().st_mode & 0o777 == 0o600
    status = read_status(status_file)
    assert status is not None and status["pid"] == os.getpid()
    assert status["cleanup_failures"] == 1 and status["last_cleanup_at"] == stats.last_cleanup_at.isoformat()
    assert status["backups_made"] == 2 and status["last_backup_at"] == stats.last_backup_at.isoformat()
    for private in PRIVATE:
        assert private not in status_file.read_text()
    out = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "--db", str(db_path), "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")},
             "CHAT_SESSION_BACKUP_DIR": str(tmp_path / "b")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = orjson.loads(out.stdout)
    assert info["db_bytes"] == info["file_bytes"] + info["wal_bytes"]
    assert (info["sessions"], info["users"]) == (5, 3)
    assert (info["cleanup_failures"], info["last_cleanup_at"]) == (1, stats.last_cleanup_at.isoformat())
    assert (info["backups_made"], info["backup_failures"], info["app_pid"]) == (2, 0, os.getpid())
    newest = list_backups(tmp_path / "b", db_path)[0]
    assert (info["backups"], info["newest_backup_at"]) == (2, newest.taken_at.isoformat())
    plain = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "--db", str(db_path), "stats"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")},
    )  # fmt: skip
    assert f"{'cleanup_failures':16} 1" in plain.stdout.splitlines()
    assert "newest_backup_at" not in plain.stdout  # no backup directory given: not listed


async def test_a_status_file_that_is_not_ours_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "x.db.status.json"
    for content in (b"", b"[1, 2]", b'{"format": "something else"}', b"\xff\xfe"):
        path.write_bytes(content)
        assert read_status(path) is None
    assert read_status(tmp_path / "missing") is None


async def test_the_metrics_expose_the_disk_and_the_backups_and_never_an_id_or_content(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = await make_store(backup_dir=tmp_path / "b")
    await seed(store)
    await until(lambda: store.stats().backups_made == 1)
    stats = await store.refresh_stats()
    text = metrics(store)
    assert stats.db_bytes is not None and stats.wal_bytes is not None and stats.last_backup_at is not None
    assert value(text, "writebehind_database_bytes") == stats.db_bytes
    assert value(text, "writebehind_wal_bytes") == stats.wal_bytes
    assert value(text, "writebehind_sessions_on_disk") == 5
    assert value(text, "writebehind_users_on_disk") == 3
    assert value(text, "writebehind_backups_kept") == 1
    assert value(text, "writebehind_backups_made_total") == 1
    assert value(text, "writebehind_backup_failures_total") == 0
    assert (
        value(text, "writebehind_last_successful_backup_timestamp_seconds")
        == stats.last_backup_at.timestamp()
    )
    assert value(text, "writebehind_disk_counted_timestamp_seconds") > 1.7e9
    for private in PRIVATE:
        assert private not in text
    # A plain store has no disk: those gauges are absent, not a zero that reads as "empty".
    plain = metrics(SessionStore())
    for absent in ("database_bytes", "sessions_on_disk", "users_on_disk", "backups_kept"):
        assert f"writebehind_{absent} " not in plain
    assert value(plain, "writebehind_backup_failures_total") == 0


async def test_a_failing_measurement_keeps_the_last_figures_and_logs_no_content(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Measured(db_path)
    store = await make_store(backend=backend)
    await seed(store)
    first = await store.refresh_stats()
    backend.fail_usage = True
    await store.ensure_session("more", user_id=2)
    await store.flush()
    again = await store.refresh_stats()
    assert (again.db_bytes, again.sessions_on_disk, again.disk_counted_at) == (
        first.db_bytes,
        first.sessions_on_disk,
        first.disk_counted_at,
    )
    assert "could not read the database's size" in caplog.text
    assert "SECRET-CONTENT" not in caplog.text
    backend.fail_usage = False
    assert (await store.refresh_stats()).sessions_on_disk == 6


async def test_postgres_reports_its_tables_size_and_what_they_hold(tmp_path: Path) -> None:
    schema = new_schema()
    async with postgres_schema(schema):
        from writebehind.backends.postgres import PostgresBackend

        backend = PostgresBackend(DSN, schema=schema, pool_size=2)
        config = Config(db_path=tmp_path / "local.db", **QUIET)
        async with WriteBehindStore(SessionStore(), backend, config=config) as store:
            empty = await store.refresh_stats()
            await seed(store)
            stats = await store.refresh_stats()
            text = metrics(store)
        assert empty.db_bytes is not None and empty.sessions_on_disk == 0
        assert (stats.sessions_on_disk, stats.users_on_disk, stats.wal_bytes) == (5, 3, None)
        assert stats.db_bytes is not None and stats.db_bytes >= empty.db_bytes > 0
        assert value(text, "writebehind_sessions_on_disk") == 5
        assert "writebehind_wal_bytes " not in text
        assert not list(tmp_path.iterdir())  # no status file: it is the SQLite file's


async def test_the_status_file_has_the_apps_last_word_after_it_stops(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    """A backup made, then one that failed, moments before the app stops (before any
    housekeeping round could report them): `writebehind stats` run after the stop shows
    both, and the failure's reason."""
    backups = tmp_path / "b"
    store = await make_store(backup_dir=backups)
    await seed(store)
    assert store.backups is not None
    await until(lambda: store.stats().backups_made == 1)
    await store.backups.run_once()
    # The next copy cannot be made there (a file where the directory was: root ignores modes).
    backups.rename(tmp_path / "moved")
    backups.write_text("not a directory")
    with pytest.raises(StorageError):
        await store.backups.run_once()
    await store.aclose()
    status = read_status(status_path_for(db_path))
    assert status is not None
    assert (status["backups_made"], status["backup_failures"]) == (2, 1)
    assert status["last_backup_error"] and str(backups) in status["last_backup_error"]
