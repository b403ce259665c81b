"""The recovery file at its edges: a replayed edit newer than the database's wins without
dropping what the database gained meanwhile; a file whose timestamps have no timezone is
refused, not read in some local time; and a rewrite that cannot be completed leaves the
previous recovery file whole (the file is replaced atomically, or not at all). Real files;
the failing write is a real operating-system limit (RLIMIT_FSIZE) in a child process."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from writebehind import ClosedError, Config, SessionStore, SQLiteBackend, StorageError, WriteBehindStore
from writebehind.model import SessionRecord, StoredMessage, utcnow
from writebehind.recovery import read_recovery, recovery_path_for, write_recovery

from .conftest import QUIET
from .reliability.helpers import integrity, on_disk
from .test_flush_races import Rival


def store_on(db_path: Path) -> WriteBehindStore:
    return WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET))


async def test_a_replayed_edit_newer_than_the_databases_wins_and_keeps_what_the_database_gained(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with store_on(db_path) as store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="assistant", content="draft", message_id="m1")
        await store.flush()
        mine = await store.get_session("s", user_id=1)  # version 1
        await store.append_message("s", user_id=1, role="user", content="gained on disk", message_id="m2")
    # What an earlier shutdown saved: the reply edited after the version the database has now.
    later = utcnow() + timedelta(seconds=1)
    (draft,) = mine.messages
    edited = replace(draft, content="final", updated_at=later)
    write_recovery(recovery_path_for(db_path), [replace(mine, messages=(edited,), updated_at=later)])
    caplog.set_level(logging.INFO, logger="writebehind")
    async with store_on(db_path) as again:
        record = await again.get_session("s", user_id=1)
    assert [(m.seq, m.id, m.content) for m in record.messages] == [
        (1, "m1", "final"),
        (2, "m2", "gained on disk"),
    ]
    assert on_disk(db_path) == {"s": {1: "final", 2: "gained on disk"}}
    assert not recovery_path_for(db_path).exists()
    assert not list(db_path.parent.glob("*.refused-*"))
    assert any(
        "replayed 1 sessions" in r.getMessage() and "(1 merged onto newer versions)" in r.getMessage()
        for r in caplog.records
    )


async def test_a_recovery_file_with_timestamps_without_a_timezone_is_refused_and_left_in_place(
    db_path: Path,
) -> None:
    now = utcnow()
    recovery = recovery_path_for(db_path)
    write_recovery(
        recovery,
        [SessionRecord("s", 1, now, now, now, messages=(StoredMessage("m", 1, "user", "x", now, now),))],
    )
    document = orjson.loads(recovery.read_bytes())
    naive = now.replace(tzinfo=None).isoformat()
    document["sessions"][0]["messages"][0]["created_at"] = naive  # hand-edited, say
    damaged = orjson.dumps(document)
    recovery.write_bytes(damaged)
    store = store_on(db_path)
    with pytest.raises(StorageError, match=r"cannot read the recovery file .*has no timezone; left in place"):
        await store.start()
    assert recovery.read_bytes() == damaged
    with pytest.raises(ClosedError):
        await store.ensure_session("s", user_id=1)
    assert integrity(db_path) == "ok" and on_disk(db_path) == {}


_REWRITE_UNDER_A_LIMIT = r"""
import os, resource, signal, sys
from pathlib import Path
from writebehind.model import SessionRecord, StoredMessage, utcnow
from writebehind.recovery import write_recovery

path = Path(sys.argv[1])
now = utcnow()
message = StoredMessage("m", 1, "user", "y" * 10_000, now, now)
big = SessionRecord("big", 1, now, now, now, messages=(message,))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 1000, hard))  # a quota, nearly full
try:
    write_recovery(path, [big])
except OSError as exc:
    print("refused", exc.errno)
else:
    print("written")
finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
"""


def test_a_recovery_rewrite_that_cannot_complete_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    now = utcnow()
    path = tmp_path / "chat.db.recovery"
    first = SessionRecord(
        "first", 1, now, now, now, messages=(StoredMessage("m", 1, "user", "keep me", now, now),)
    )
    write_recovery(path, [first])
    before = path.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", _REWRITE_UNDER_A_LIMIT, str(path)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["refused", str(errno.EFBIG)]  # the file would be too large
    assert path.read_bytes() == before
    assert [(r.id, r.messages[0].content) for r in read_recovery(path)] == [("first", "keep me")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.db.recovery"]  # no temporary file left


async def test_a_replay_that_another_writer_keeps_beating_is_kept_for_a_person_and_the_store_starts(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with store_on(db_path) as store:
        await store.ensure_session("s", user_id=1)
        await store.append_message("s", user_id=1, role="user", content="on disk")
        await store.flush()
        saved = await store.get_session("s", user_id=1)
    now = utcnow()
    local = StoredMessage("m-local", 2, "user", "only in the recovery file", now, now)
    recovery = recovery_path_for(db_path)
    write_recovery(recovery, [replace(saved, messages=(*saved.messages, local))])
    caplog.set_level(logging.WARNING, logger="writebehind")
    rival = Rival(db_path)  # another writer appends to the session before each of the replay's writes
    rival.active = True
    store = WriteBehindStore(SessionStore(), rival, config=Config(db_path=db_path, **QUIET))
    async with store:  # starts all the same
        rival.active = False
        on_disk_now = [m.content for m in (await store.get_session("s", user_id=1)).messages]
    assert on_disk_now == ["on disk", "rival 2", "rival 3", "rival 4"]
    assert not recovery.exists()
    (kept,) = db_path.parent.glob(recovery.name + ".refused-*")
    (merged,) = read_recovery(kept)
    assert [m.content for m in merged.messages] == [*on_disk_now, "only in the recovery file"]
    assert any(
        r.levelno == logging.ERROR
        and "recovery: 1 sessions could not be written (s); kept in" in r.getMessage()
        for r in caplog.records
    )
