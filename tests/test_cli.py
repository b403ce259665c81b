"""The operator's command line, run as a new user types it: the real console script in a
subprocess, against a real file (also one a running store holds open: its reading verbs
work beside it, its changing verbs refuse)."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from writebehind import DatabaseLockedError, SQLiteBackend, WriteBehindStore
from writebehind.backends.sqlite import SCHEMA_VERSION

from .conftest import StoreFactory
from .test_sqlite_ownership import held_by_another_process

SCRIPT = Path(sys.executable).with_name("writebehind")


def wb(db_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    return subprocess.run(
        [str(SCRIPT), "--db", str(db_path), *args],
        capture_output=True, text=True, input=stdin, timeout=60, env=env,
    )  # fmt: skip


def wb_started(db_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """`wb`, left running: its stdin and stdout are the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    return subprocess.Popen(
        [str(SCRIPT), "--db", str(db_path), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


async def seed(make_store: StoreFactory) -> WriteBehindStore:
    """Five sessions on disk; the store stays open (it holds the file) until closed."""
    store = await make_store()
    for i in range(3):
        await store.ensure_session(f"a{i}", user_id=1, title=f"chat {i}")
        await store.append_message(f"a{i}", user_id=1, role="user", content=f"hello {i}")
    await store.ensure_session("b", user_id="bob")
    await store.append_message("b", user_id="bob", role="user", content="bob's")
    await store.ensure_session("n", user_id="1")  # the text id "1", not user 1
    await store.flush()
    return store


async def test_stats_sessions_and_check_while_the_app_holds_the_file(
    make_store: StoreFactory, db_path: Path
) -> None:
    await seed(make_store)  # the store stays open: WAL lets the CLI read beside it
    out = wb(db_path, "stats", "--json")
    assert out.returncode == 0, out.stderr
    info = orjson.loads(out.stdout)
    assert (info["sessions"], info["messages"], info["users"], info["schema_version"]) == (
        5,
        4,
        3,
        SCHEMA_VERSION,
    )
    listed = wb(db_path, "sessions", "--user", "1")
    assert listed.returncode == 0 and sorted(line.split("\t")[0] for line in listed.stdout.splitlines()) == [
        "a0", "a1", "a2",
    ]  # fmt: skip
    assert wb(db_path, "sessions", "--user", "1", "--text-id").stdout.split("\t")[0] == "n"
    checked = wb(db_path, "check")
    assert checked.returncode == 0 and "integrity ok" in checked.stdout


async def test_export_to_a_private_file(make_store: StoreFactory, db_path: Path, tmp_path: Path) -> None:
    await seed(make_store)
    out_file = tmp_path / "bob.json"
    result = wb(db_path, "export", "--user", "bob", "--out", str(out_file))
    assert result.returncode == 0, result.stderr
    assert out_file.stat().st_mode & 0o777 == 0o600
    data = orjson.loads(out_file.read_bytes())
    assert data["user_id"] == "bob" and [s["id"] for s in data["sessions"]] == ["b"]
    assert data["sessions"][0]["messages"][0]["content"] == "bob's"
    to_stdout = wb(db_path, "export", "--user", "1")
    assert sorted(s["id"] for s in orjson.loads(to_stdout.stdout)["sessions"]) == ["a0", "a1", "a2"]


async def test_erase_asks_first_and_then_erases(make_store: StoreFactory, db_path: Path) -> None:
    await (await seed(make_store)).aclose()  # the app is stopped
    refused = wb(db_path, "erase", "--user", "1", stdin="n\n")
    assert refused.returncode == 1 and "Aborted" in refused.stderr
    assert len(wb(db_path, "sessions", "--user", "1").stdout.splitlines()) == 3
    done = wb(db_path, "erase", "--user", "1", "--yes")
    assert done.returncode == 0 and "erased 3 session(s)" in done.stdout
    assert wb(db_path, "sessions", "--user", "1").stdout == ""
    assert "hello 1" not in (
        db_path.read_bytes() + db_path.with_name(db_path.name + "-wal").read_bytes()
    ).decode("latin-1")


async def test_purge_dry_run_then_for_real(make_store: StoreFactory, db_path: Path) -> None:
    await (await seed(make_store)).aclose()  # the app is stopped
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE sessions SET last_access_at = 0 WHERE id IN ('a0', 'b')")
    dry = wb(db_path, "purge", "--older-than", "90d", "--dry-run")
    assert dry.returncode == 0 and "would purge 2 session(s)" in dry.stdout
    assert orjson.loads(wb(db_path, "stats", "--json").stdout)["sessions"] == 5
    real = wb(db_path, "purge", "--older-than", "90d")
    assert real.returncode == 0 and "purged 2 session(s)" in real.stdout
    assert orjson.loads(wb(db_path, "stats", "--json").stdout)["sessions"] == 3


async def test_backup_and_migrate(make_store: StoreFactory, db_path: Path, tmp_path: Path) -> None:
    await seed(make_store)
    dest = tmp_path / "copy.db"
    result = wb(db_path, "backup", str(dest))
    assert result.returncode == 0 and "integrity ok" in result.stdout
    assert orjson.loads(wb(dest, "stats", "--json").stdout)["sessions"] == 5
    fresh = tmp_path / "fresh.db"
    migrated = wb(fresh, "migrate")
    assert migrated.returncode == 0 and f"schema version {SCHEMA_VERSION}" in migrated.stdout


def test_mistakes_get_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    missing = wb(tmp_path / "nope.db", "stats")
    assert (
        missing.returncode == 1
        and missing.stderr.strip()
        == f"Error: {tmp_path / 'nope.db'} does not exist (use --db, or run the app once)"
    )
    not_db = tmp_path / "text.db"
    not_db.write_text("hello")
    refused = wb(not_db, "check")
    assert refused.returncode == 1 and "not a SQLite database" in refused.stderr
    assert "Traceback" not in refused.stderr and not_db.read_text() == "hello"
    bad = wb(not_db, "purge", "--older-than", "soon")
    assert bad.returncode == 2 and "like 90d" in bad.stderr and "Traceback" not in bad.stderr
    exists = tmp_path / "exists.db"
    exists.write_text("x")
    good = tmp_path / "good.db"
    assert wb(good, "migrate").returncode == 0
    over = wb(good, "backup", str(exists))
    assert (
        over.returncode == 1
        and "exists; refusing to overwrite it" in over.stderr
        and exists.read_text() == "x"
    )


async def test_reading_verbs_work_beside_an_app_running_in_another_process(
    make_store: StoreFactory, db_path: Path, tmp_path: Path
) -> None:
    await (await seed(make_store)).aclose()
    with held_by_another_process(db_path):  # it adds the session "held" of user "holder"
        info = orjson.loads(wb(db_path, "stats", "--json").stdout)
        assert (info["sessions"], info["messages"], info["schema_version"]) == (6, 5, SCHEMA_VERSION)
        listed = wb(db_path, "sessions", "--user", "holder", "--text-id")
        assert listed.returncode == 0 and listed.stdout.split("\t")[0] == "held"
        exported = wb(db_path, "export", "--user", "holder")
        assert exported.returncode == 0, exported.stderr
        assert orjson.loads(exported.stdout)["sessions"][0]["messages"][0]["content"] == "kept"
        checked = wb(db_path, "check")
        assert checked.returncode == 0 and "integrity ok" in checked.stdout
        dry = wb(db_path, "purge", "--older-than", "1m", "--dry-run")
        assert dry.returncode == 0 and "would purge 0 session(s)" in dry.stdout
        copy = tmp_path / "copy.db"
        backed_up = wb(db_path, "backup", str(copy))
        assert backed_up.returncode == 0 and "integrity ok" in backed_up.stdout
        assert copy.stat().st_mode & 0o777 == 0o600
    assert orjson.loads(wb(copy, "stats", "--json").stdout)["sessions"] == 6


@pytest.mark.parametrize(
    ("verb", "advice"),
    [
        (("erase", "--user", "1", "--yes"), "DELETE /api/me"),
        (("erase", "--user", "1"), "store.delete_user(1)"),  # refused before it asks
        (("purge", "--older-than", "1m"), "store.purge_expired()"),
        (("migrate",), "the app migrates the file itself when it starts"),
    ],
)
async def test_changing_verbs_refuse_a_file_a_running_app_holds(
    make_store: StoreFactory, db_path: Path, verb: tuple[str, ...], advice: str
) -> None:
    await (await seed(make_store)).aclose()
    with held_by_another_process(db_path) as app:
        refused = wb(db_path, *verb)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.startswith(
            f"Error: {db_path} is in use by a running app (pid {app.pid} on host {socket.gethostname()}): "
        )
        assert advice in refused.stderr
        assert orjson.loads(wb(db_path, "stats", "--json").stdout)["sessions"] == 6  # nothing changed


async def test_a_changing_verb_holds_the_file_against_an_app_starting(
    make_store: StoreFactory, db_path: Path
) -> None:
    await (await seed(make_store)).aclose()
    erase = wb_started(db_path, "erase", "--user", "1")
    assert erase.stdout is not None
    prompt = b""
    while not prompt.endswith(b"[y/N]: "):  # it holds the file while it asks
        chunk = os.read(erase.stdout.fileno(), 1024)
        assert chunk, erase.communicate()[1]
        prompt += chunk
    with pytest.raises(DatabaseLockedError) as refused:
        await make_store()
    assert refused.value.pid == erase.pid
    erase.communicate(b"n\n", timeout=60)
    assert erase.returncode == 1  # aborted
    backend = SQLiteBackend(db_path)
    await backend.open()  # free again
    try:
        assert len(await backend.list_sessions(1)) == 3
    finally:
        await backend.close()
