"""The operator's command line at its edges, run as typed (the console script, or
`python -m writebehind.cli`, in a subprocess): what it prints without --json, progress on
long exports and purges, and one line and a non-zero exit, never a traceback, for ids,
variables, paths and files it cannot use."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from writebehind import Config, SessionStore, SQLiteBackend, WriteBehindStore
from writebehind.backends.sqlite import SCHEMA_VERSION

from .conftest import QUIET

SCRIPT = Path(sys.executable).with_name("writebehind")


def run(
    *args: str, env: dict[str, str] | None = None, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """The command line as an operator types it, with no CHAT_SESSION_* variables but `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    command = [sys.executable, "-m", "writebehind.cli"] if module else [str(SCRIPT)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


async def seed(db_path: Path, sessions: int, *, user: int = 1, at: datetime | None = None) -> None:
    """`sessions` sessions of `user` on disk, each with one message, last active `at`."""
    clock = (lambda: at) if at is not None else None
    hot = SessionStore(clock=clock) if clock is not None else SessionStore()
    store = WriteBehindStore(hot, SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET))
    async with store:
        for i in range(sessions):
            await store.ensure_session(f"s{i:05d}", user_id=user, title=f"chat {i}")
            await store.append_message(f"s{i:05d}", user_id=user, role="user", content=f"hello {i}")


async def test_stats_without_json_prints_one_aligned_line_per_figure(db_path: Path) -> None:
    await seed(db_path, 3)
    result = run("--db", str(db_path), "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for key, value in (
        ("path", db_path),
        ("schema_version", SCHEMA_VERSION),
        ("sessions", 3),
        ("users", 1),
        ("messages", 3),
    ):
        assert f"{key:16} {value}" in lines


async def test_a_user_id_no_store_can_hold_is_refused_naming_the_option(db_path: Path) -> None:
    await seed(db_path, 1)
    too_big = run("--db", str(db_path), "sessions", "--user", "99999999999999999999")
    assert "--user: int must fit in 64 bits" in one_line_error(too_big, code=2)
    as_text = run("--db", str(db_path), "sessions", "--user", "99999999999999999999", "--text-id")
    assert as_text.returncode == 0 and "0 session(s) for user '99999999999999999999'" in as_text.stderr
    unprintable = run("--db", str(db_path), "erase", "--user", "bad\tid", "--yes")
    assert "--user: must be printable text" in one_line_error(unprintable, code=2)
    assert run("--db", str(db_path), "sessions", "--user", "1").stdout.count("\n") == 1  # nothing erased


def test_a_bad_environment_variable_is_one_line_naming_it(tmp_path: Path) -> None:
    result = run(
        "stats", env={"CHAT_SESSION_FLUSH_BATCH": "0", "CHAT_SESSION_DB_PATH": str(tmp_path / "x.db")}
    )
    assert one_line_error(result) == "Error: CHAT_SESSION_FLUSH_BATCH: flush_batch must be > 0, got 0"


async def test_the_database_comes_from_chat_session_db_path_without_db(db_path: Path) -> None:
    await seed(db_path, 2)
    result = run("sessions", "--user", "1", env={"CHAT_SESSION_DB_PATH": str(db_path)})
    assert result.returncode == 0 and [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        "s00001",
        "s00000",
    ]


async def test_export_and_purge_of_more_than_a_chunk_report_progress_and_miss_nothing(
    db_path: Path, tmp_path: Path
) -> None:
    await seed(db_path, 1001, at=datetime(2020, 1, 1, tzinfo=UTC))
    out = tmp_path / "export.json"
    exported = run("--db", str(db_path), "export", "--user", "1", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr.splitlines() == [
        "exported 500 sessions...",
        "exported 1000 sessions...",
        f"exported 1001 session(s) of user 1 to {out}",
    ]
    document = orjson.loads(out.read_bytes())
    assert len({s["id"] for s in document["sessions"]}) == 1001
    purged = run("--db", str(db_path), "purge", "--older-than", "30d")
    assert purged.returncode == 0, purged.stderr
    assert purged.stderr.splitlines() == [
        "purged 500 sessions...",
        "purged 1000 sessions...",
        "purged 1001 sessions...",
    ]
    assert purged.stdout.startswith("purged 1001 session(s) idle since before ")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    again = run("--db", str(db_path), "purge", "--older-than", "30d")  # nothing left: no progress line
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout.startswith("purged 0 session(s) idle since before ")


def test_a_backup_of_a_missing_database_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    missing, dest = tmp_path / "missing.db", tmp_path / "copy.db"
    result = run("--db", str(missing), "backup", str(dest))
    assert one_line_error(result) == f"Error: {missing} does not exist"
    assert not dest.exists() and not missing.exists()


async def test_a_backup_into_a_missing_directory_is_one_line(db_path: Path, tmp_path: Path) -> None:
    await seed(db_path, 1)
    dest = tmp_path / "no-such-dir" / "copy.db"
    result = run("--db", str(db_path), "backup", str(dest))
    assert one_line_error(result) == f"Error: cannot create {dest}: No such file or directory"


async def test_check_and_backup_of_a_damaged_file_fail_and_say_what_is_wrong(
    db_path: Path, tmp_path: Path
) -> None:
    await seed(db_path, 3)
    # A real damage SQLite detects: an index whose schema no longer matches its entries.
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = 'CREATE INDEX sessions_updated ON sessions (created_at)' "
        "WHERE name = 'sessions_updated'"
    )
    conn.close()
    before = db_path.read_bytes()
    checked = run("--db", str(db_path), "check", module=True)  # `python -m writebehind.cli`
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert checked.stdout == f"schema version {SCHEMA_VERSION} (this writebehind: {SCHEMA_VERSION})\n"
    assert checked.stderr.splitlines() == [
        f"integrity: row {i} missing from index sessions_updated" for i in (1, 2, 3)
    ]
    dest = tmp_path / "copy.db"
    backed_up = run("--db", str(db_path), "backup", str(dest))
    assert one_line_error(backed_up) == (
        f"Error: the backup at {dest} failed its integrity check: "
        + "; ".join(f"row {i} missing from index sessions_updated" for i in (1, 2, 3))
    )
    assert not dest.exists() and not list(tmp_path.glob(".copy.db.tmp*"))  # no failed copy left
    assert db_path.read_bytes() == before  # the reading verbs wrote nothing


def test_a_database_path_sqlite_cannot_open_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    db_path = tmp_path / "chat_sessions.db"
    db_path.symlink_to(tmp_path / "unmounted" / "chat_sessions.db")  # a link to a volume not there
    result = run("--db", str(db_path), "migrate")
    # Named by the file the link leads to (its lock file is beside it), on one line.
    error = one_line_error(result)
    assert error.startswith("Error: ") and str(tmp_path / "unmounted" / "chat_sessions.db") in error
