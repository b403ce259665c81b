"""What is particular to the SQLite file: its mode, its pragmas, its schema version, and
refusing (untouched) a file it cannot use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from writebehind import SchemaError, SQLiteBackend
from writebehind.backends.sqlite import SCHEMA_VERSION


async def test_new_file_is_private_wal_and_versioned(db_path: Path) -> None:
    backend = SQLiteBackend(db_path, synchronous="full")
    await backend.open()
    try:
        assert db_path.stat().st_mode & 0o777 == 0o600
        assert await backend.schema_version() == SCHEMA_VERSION
        assert await backend.integrity_check() == ["ok"]
        writer = backend.writer
        async with writer.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone()) == ("wal",)
        async with writer.execute("PRAGMA synchronous") as cur:
            assert (await cur.fetchone()) == (2,)  # FULL
        async with writer.execute("PRAGMA foreign_keys") as cur:
            assert (await cur.fetchone()) == (1,)
    finally:
        await backend.close()
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists():
        assert wal.stat().st_mode & 0o777 == 0o600


async def test_reopening_does_not_migrate_again(db_path: Path) -> None:
    for _ in range(2):
        backend = SQLiteBackend(db_path)
        await backend.open()
        await backend.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# Each refusal holds for a store and for a read-only opener (the command line's reading verbs).
READONLY = pytest.mark.parametrize("readonly", [False, True], ids=["store", "read-only"])


@READONLY
@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"this is a text file, not a database" * 200, "not a SQLite database"),
        (b"SQLite format 3\x00" + b"\xff" * 2000, "not a SQLite database"),
    ],
)
async def test_a_file_that_is_not_a_database_is_refused_untouched(
    db_path: Path, content: bytes, match: str, readonly: bool
) -> None:
    db_path.write_bytes(content)
    with pytest.raises(SchemaError, match=match):
        await SQLiteBackend(db_path, readonly=readonly).open()
    assert db_path.read_bytes() == content
    assert not db_path.with_name(db_path.name + "-wal").exists()


@READONLY
async def test_a_newer_schema_version_is_refused_untouched(db_path: Path, readonly: bool) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE future (x)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = db_path.read_bytes()
    with pytest.raises(SchemaError, match="newer than this writebehind supports"):
        await SQLiteBackend(db_path, readonly=readonly).open()
    assert db_path.read_bytes() == before


@READONLY
async def test_someone_elses_database_is_refused_untouched(db_path: Path, readonly: bool) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    before = db_path.read_bytes()
    with pytest.raises(SchemaError, match="something else"):
        await SQLiteBackend(db_path, readonly=readonly).open()
    assert db_path.read_bytes() == before


async def test_reopening_after_close_takes_the_file_again_at_once(db_path: Path) -> None:
    first = SQLiteBackend(db_path)
    await first.open()
    await first.open()  # idempotent: the lock is not taken twice
    await first.close()
    await first.close()  # idempotent
    second = SQLiteBackend(db_path)
    await second.open()
    try:
        assert await second.integrity_check() == ["ok"]
    finally:
        await second.close()


def test_bad_synchronous_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteBackend("x.db", synchronous="sometimes")
