"""Encryption at rest with a data key per user, so that an erasure reaches every backup.

`EncryptedBackend(inner, keys, kek)` is a `Backend` that delegates to `inner`, encrypting on
the way in (`write_batch`, which only the flush worker calls: never a request) and
decrypting on the way out (`load_session`, `list_sessions`, `iter_user_sessions`).

- **What is encrypted:** message content and metadata, and the session's title, client IP
  and user agent. Ids, user ids, roles, statuses, timestamps and counts stay plain: the
  database needs them to find, order and expire rows.
- **How:** AES-256-GCM, a random 96-bit nonce per value, and as associated data the owner,
  the session id, the message's seq and the field: a ciphertext copied to another row,
  field or user does not decrypt. A title is always stored encrypted, None included, so
  that every session row names its key.
- **Stored forms:** on SQLite, whose columns take any type, a value is raw bytes (a BLOB):
  version byte 1, key id (8 bytes), nonce (12), ciphertext and tag; content, metadata, title,
  client IP and user agent alike. On PostgreSQL, whose columns are `text` and `json`, it is
  text: `wbe1:` + base64(key id + nonce + ciphertext and tag), and metadata
  `{"wbe1": "<the same base64>"}`. That text form is also what SQLite files written by
  releases before the bytes form hold: both forms are read on every engine, so such a file
  reads as it is, and a value is rewritten in the bytes form the next time it is written.
  (The text form made a 500-byte message ~715 bytes, and SQLite's flush 1.6-1.8x as long.)
- **Keys:** one data key per user (and one shared by the anonymous sessions a custom policy
  persists), made at the user's first flush, kept wrapped (AES-GCM) by the key-encryption
  key (KEK, `CHAT_SESSION_ENCRYPTION_KEY` or `_FILE`) in a `KeyStore` that the database's
  backups do not copy: a small SQLite file of its own (`<db>.keys`), or a PostgreSQL schema
  of its own (`<schema>_keys`).
- **Erasure:** `delete_user` destroys the user's data key first (committed durably), then
  deletes the rows. Every copy of those rows in any backup is then ciphertext under a key
  that no longer exists anywhere. Reading such a row (a restored backup) finds nothing: a
  session whose key was destroyed loads as missing and is left out of listings and exports.
- **Rotation:** `rotate_kek` re-wraps the data keys under a new KEK in one transaction; no
  data row is rewritten.
- **Search:** `search` decrypts and scans the user's own sessions. An index cannot match
  ciphertext, and an index of plaintext (or of per-user tokens) would be a copy of the data
  that destroying the key does not reach; the price is a pass over the user's history per
  query (~200 ms for 5,000 messages on a busy 2-core VM).
- **Rows written before encryption was turned on** (text without the `wbe1:` prefix) are
  read as they are, and encrypted the next time they are written.

Errors: a KEK that does not open the keys store raises `WrongKeyError` from `open()`; a
value that does not decrypt (changed, moved, or under a key the keys store never had)
raises `DecryptionError` naming the session. Neither ever returns garbage.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import logging
import os
import sqlite3
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backends.base import Backend, BatchResult, SessionDelta
from .config import Config, decode_kek
from .errors import ConfigError, DecryptionError, StorageError, WrongKeyError
from .model import (
    MessageRow,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    add_message_rows,
    message_from_row,
    new_message,
    to_micros,
)
from .search import SearchRow, memory_rows

__all__ = [
    "PREFIX",
    "EncryptedBackend",
    "KeyStore",
    "PostgresKeyStore",
    "SQLiteKeyStore",
    "encrypted_backend",
    "kek_id",
    "keys_path_for",
    "keys_schema_for",
    "load_kek",
    "new_kek",
    "rotate_kek",
]

T = TypeVar("T")
LOG = logging.getLogger("writebehind")

PREFIX: Final = "wbe1:"
_META_HEAD: Final = '{"wbe1":"'
_META_TAIL: Final = '"}'
_KEY_ID: Final = 8
_NONCE: Final = 12
_HEAD: Final = _KEY_ID + _NONCE
_MIN_BLOB: Final = _HEAD + 16  # the GCM tag
# The bytes form: this version byte, then key id, nonce, ciphertext and tag.
_BLOB_V1: Final = 1
_BLOB_HEAD: Final = 1 + _HEAD
# The first 12 base64 characters after the prefix hold the key id (8 bytes, and one more).
_KID_CHARS: Final = 12
# Owners whose live key a SQLite-backed store remembers (~150 bytes each).
_LIVE_KEYS: Final = 100_000
# A load with more values than this decrypts in a thread: a 2,000-message session takes a
# few ms of CPU, which must not stall every other request on the event loop.
_INLINE_VALUES: Final = 64
_KEK_MAC_LABEL: Final = b"writebehind key-encryption key check v1"
_TITLE_NONE: Final = b"\x00"
_TITLE_TEXT: Final = b"\x01"
_SQLITE_KEYS_SCHEMA: Final = """
CREATE TABLE meta (name TEXT PRIMARY KEY NOT NULL, value BLOB NOT NULL);
CREATE TABLE keys (
    key_id       BLOB PRIMARY KEY NOT NULL,
    owner        TEXT UNIQUE,
    wrapped      BLOB,
    created_at   INTEGER NOT NULL,
    destroyed_at INTEGER
);
"""


# -- the key-encryption key --------------------------------------------------------------------


def load_kek(config: Config) -> bytes | None:
    """The KEK the configuration names (`encryption_key`, or the file `encryption_key_file`:
    base64 text, or the 32 raw bytes), or None when encryption is off. Raises `ConfigError`
    naming the variable; the key itself is never in a message."""
    if config.encryption_key is not None:
        return decode_kek(config.encryption_key, "CHAT_SESSION_ENCRYPTION_KEY")
    path = config.encryption_key_file
    if path is None:
        return None
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"CHAT_SESSION_ENCRYPTION_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        LOG.warning("the key file %s is readable by others than its owner; chmod 600 it", path)
    if len(raw) == 32:
        return raw
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"CHAT_SESSION_ENCRYPTION_KEY_FILE: {path} must hold base64 of 32 bytes (or the 32 bytes)"
        ) from None
    return decode_kek(text.strip(), f"CHAT_SESSION_ENCRYPTION_KEY_FILE ({path})")


def kek_id(kek: bytes) -> str:
    """A KEK's public name (16 hex digits): safe to log and show, says nothing of the key."""
    return _kek_mac(kek)[:8].hex()


def _kek_mac(kek: bytes) -> bytes:
    return hmac.new(kek, _KEK_MAC_LABEL, hashlib.sha256).digest()


def _wrap_aad(key_id: bytes, owner: str) -> bytes:
    return b"writebehind data key\x00" + key_id + b"\x00" + owner.encode()


def keys_path_for(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".keys")


def _owner(user_id: UserId | None) -> str:
    """A user as the keys store and the associated data name them: 1 and "1" differ."""
    if user_id is None:
        return "-"
    return f"i:{user_id}" if isinstance(user_id, int) else f"s:{user_id}"


# -- where the wrapped data keys live ----------------------------------------------------------

# A stored data key: (owner, wrapped key) while it lives, None once destroyed.
StoredKey = tuple[str, bytes] | None


class KeyStore(ABC):
    """The wrapped data keys, kept apart from the data (and from its backups).

    Each method is one transaction. `where` names the store in messages.
    """

    where: str

    @abstractmethod
    async def open(self, kek_mac: bytes, kek_name: str) -> None:
        """Create the store if it is new (recording which KEK it is wrapped with), or check
        that `kek_mac` is that KEK's: `WrongKeyError` if not."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def exists(self) -> bool:
        """Whether the store was made already (`open` creates it otherwise)."""

    @abstractmethod
    async def active(
        self, owners: Collection[str], kek_mac: bytes, make: Callable[[str], tuple[bytes, bytes]]
    ) -> dict[str, tuple[bytes, bytes]]:
        """Each owner's live key (key id, wrapped), making the missing ones with `make`,
        committed before this returns. Checks first, in the same transaction, that the store
        is still wrapped with `kek_mac`'s KEK (`WrongKeyError`: rotated meanwhile)."""

    @abstractmethod
    async def by_id(self, key_ids: Collection[bytes]) -> dict[bytes, StoredKey]:
        """The keys with these ids: (owner, wrapped), or None if destroyed; an id the store
        never had is absent."""

    @abstractmethod
    async def destroy(self, owner: str) -> list[bytes]:
        """Destroy the owner's keys, durably; returns their ids (kept as tombstones)."""

    @abstractmethod
    async def rewrap(self, old_mac: bytes, new_mac: bytes, fn: Callable[[bytes, str, bytes], bytes]) -> int:
        """Replace every live key's wrapping by `fn(key_id, owner, wrapped)` and record
        `new_mac`, in one transaction; `WrongKeyError` unless the store is at `old_mac`."""


def _wrong_key(where: str, kek_name: str, stored: bytes) -> WrongKeyError:
    return WrongKeyError(
        f"the key-encryption key (id {kek_name}) does not open {where}, whose data keys are wrapped "
        f"with key id {stored[:8].hex()}: set CHAT_SESSION_ENCRYPTION_KEY (or _FILE) to that key "
        "(after a rotation: the new one)"
    )


class SQLiteKeyStore(KeyStore):
    """A small SQLite file of its own (mode 0600), beside the database unless told otherwise.

    Rollback journal, not WAL, and `synchronous=FULL`: a key is on disk before the data it
    encrypts, the file alone is the whole store (a plain copy of it, taken while no app
    writes, is a backup), and `secure_delete` overwrites a destroyed key's bytes.
    `readonly=True` (the command line beside a running app) never writes, and a missing file
    reads as an empty store.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.where = f"the keys file {self.path}"
        self._conn: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"SQLiteKeyStore({str(self.path)!r})"

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None:
            raise StorageError(f"{self.where} is not open")
        conn = self._conn
        if conn is None:
            raise StorageError(f"{self.where} does not exist")

        def call() -> T:
            try:
                return job(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise StorageError(f"{self.where}: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def exists(self) -> bool:
        return self.path.exists()

    async def open(self, kek_mac: bytes, kek_name: str) -> None:
        if self._thread is not None:
            return
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="writebehind-keys")
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._connect)
            if self._conn is not None:
                created = await self._run(lambda conn: self._init(conn, kek_mac, kek_name))
                if created:
                    LOG.warning(
                        "created %s for key-encryption key id %s: back it up apart from the database "
                        "(without it nothing encrypted is readable)",
                        self.where,
                        kek_name,
                    )
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        if self.readonly:
            if not self.path.exists():
                return
            uri = self.path.absolute().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                os.close(fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot create {self.where}: {exc.strerror}") from exc
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open {self.where}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"{self.where} is not a keys file: {exc}") from exc
        self._conn = conn

    def _init(self, conn: sqlite3.Connection, kek_mac: bytes, kek_name: str) -> bool:
        created = False
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"{self.where} is not a keys file: {exc}") from exc
        if version == 0 and not self.readonly:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    conn.rollback()
                    raise StorageError(f"{self.where} is another application's database; left untouched")
                for statement in _SQLITE_KEYS_SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('kek_mac', ?)", (kek_mac,))
                conn.execute("PRAGMA user_version = 1")
                created = True
            conn.execute("COMMIT")
        elif version != 1:
            raise StorageError(f"{self.where} has version {version}, not one this writebehind reads")
        self._check(conn, kek_mac, kek_name)
        return created

    def _check(self, conn: sqlite3.Connection, kek_mac: bytes, kek_name: str) -> None:
        row = conn.execute("SELECT value FROM meta WHERE name = 'kek_mac'").fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), kek_mac):
            raise _wrong_key(self.where, kek_name, b"" if row is None else bytes(row[0]))

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        conn, self._conn = self._conn, None
        if thread is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        thread.shutdown(wait=False)

    async def active(
        self, owners: Collection[str], kek_mac: bytes, make: Callable[[str], tuple[bytes, bytes]]
    ) -> dict[str, tuple[bytes, bytes]]:
        def job(conn: sqlite3.Connection) -> dict[str, tuple[bytes, bytes]]:
            found = _select_active(conn, owners)
            missing = [o for o in owners if o not in found]
            if not missing:
                return found
            if self.readonly:
                raise StorageError(f"{self.where} is open read-only")
            conn.execute("BEGIN IMMEDIATE")
            self._check(conn, kek_mac, kek_mac[:8].hex())
            found = _select_active(conn, owners)
            now = int(time.time() * 1_000_000)
            for owner in owners:
                if owner not in found:
                    key_id, wrapped = make(owner)
                    conn.execute(
                        "INSERT INTO keys (key_id, owner, wrapped, created_at) VALUES (?, ?, ?, ?)",
                        (key_id, owner, wrapped, now),
                    )
                    found[owner] = (key_id, wrapped)
            conn.execute("COMMIT")
            return found

        return await self._run(job)

    async def by_id(self, key_ids: Collection[bytes]) -> dict[bytes, StoredKey]:
        if self._conn is None and self._thread is not None:
            return {}  # read-only, and no keys file: it knows no key

        def job(conn: sqlite3.Connection) -> dict[bytes, StoredKey]:
            ids = list(key_ids)
            rows = conn.execute(
                f"SELECT key_id, owner, wrapped FROM keys WHERE key_id IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
            return {
                bytes(k): (None if wrapped is None else (owner, bytes(wrapped))) for k, owner, wrapped in rows
            }

        return await self._run(job)

    async def destroy(self, owner: str) -> list[bytes]:
        def job(conn: sqlite3.Connection) -> list[bytes]:
            conn.execute("BEGIN IMMEDIATE")
            ids = [bytes(r[0]) for r in conn.execute("SELECT key_id FROM keys WHERE owner = ?", (owner,))]
            # The row stays as a tombstone (no owner, no key): a ciphertext naming it is then
            # known to be erased, rather than written under a key this file never had.
            conn.execute(
                "UPDATE keys SET owner = NULL, wrapped = NULL, destroyed_at = ? WHERE owner = ?",
                (int(time.time() * 1_000_000), owner),
            )
            conn.execute("COMMIT")
            return ids

        return await self._run(job)

    async def rewrap(self, old_mac: bytes, new_mac: bytes, fn: Callable[[bytes, str, bytes], bytes]) -> int:
        def job(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            self._check(conn, old_mac, old_mac[:8].hex())
            rows = conn.execute(
                "SELECT key_id, owner, wrapped FROM keys WHERE wrapped IS NOT NULL"
            ).fetchall()
            conn.executemany(
                "UPDATE keys SET wrapped = ? WHERE key_id = ?",
                [(fn(bytes(k), owner, bytes(w)), k) for k, owner, w in rows],
            )
            conn.execute("UPDATE meta SET value = ? WHERE name = 'kek_mac'", (new_mac,))
            conn.execute("COMMIT")
            return len(rows)

        return await self._run(job)


def _select_active(conn: sqlite3.Connection, owners: Collection[str]) -> dict[str, tuple[bytes, bytes]]:
    found: dict[str, tuple[bytes, bytes]] = {}
    ordered = list(owners)
    for start in range(0, len(ordered), 500):
        part = ordered[start : start + 500]
        for owner, key_id, wrapped in conn.execute(
            f"SELECT owner, key_id, wrapped FROM keys WHERE owner IN ({','.join('?' * len(part))})", part
        ):
            found[owner] = (bytes(key_id), bytes(wrapped))
    return found


class PostgresKeyStore(KeyStore):
    """A PostgreSQL schema of its own (default: the data schema's name + `_keys`), on its own
    small pool. Dump the data schema alone (`pg_dump -n <schema>`) for backups that erasure
    reaches, and this one apart. Needs the `postgres` extra."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.where = f"the keys schema {schema!r}"
        self._pool: Any = None

    def __repr__(self) -> str:
        return f"PostgresKeyStore(schema={self.schema!r})"

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        import asyncpg

        if self._pool is None:
            raise StorageError(f"{self.where} is not open")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"{self.where}: {exc}") from exc

    async def exists(self) -> bool:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn)
        except (asyncpg.PostgresError, OSError) as exc:
            raise StorageError(f"cannot connect for {self.where}: {exc}") from exc
        try:
            return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{self.schema}.meta"))
        finally:
            await conn.close()

    async def open(self, kek_mac: bytes, kek_name: str) -> None:
        import asyncpg

        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2)
        except (asyncpg.PostgresError, OSError) as exc:
            raise StorageError(f"cannot connect for {self.where}: {exc}") from exc
        s = self.schema
        try:
            async with self._conn() as conn, conn.transaction():
                # Several instances may start at once: one creates, the others wait and check.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"writebehind keys {s}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.meta (name text PRIMARY KEY, value bytea NOT NULL)"
                )
                await conn.execute(
                    f"""CREATE TABLE IF NOT EXISTS {s}.keys (
                        key_id bytea PRIMARY KEY, owner text UNIQUE, wrapped bytea,
                        created_at timestamptz NOT NULL DEFAULT now(), destroyed_at timestamptz)"""
                )
                created = await conn.fetchval(
                    f"INSERT INTO {s}.meta VALUES ('kek_mac', $1) ON CONFLICT DO NOTHING RETURNING true",
                    kek_mac,
                )
                await self._check(conn, kek_mac, kek_name)
        except BaseException:
            await self.close()
            raise
        if created:
            LOG.warning(
                "created %s for key-encryption key id %s: back it up apart from the data",
                self.where,
                kek_name,
            )

    async def _check(self, conn: Any, kek_mac: bytes, kek_name: str, lock: str = "") -> None:
        stored = await conn.fetchval(f"SELECT value FROM {self.schema}.meta WHERE name = 'kek_mac' {lock}")
        if stored is None or not hmac.compare_digest(bytes(stored), kek_mac):
            raise _wrong_key(self.where, kek_name, b"" if stored is None else bytes(stored))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def active(
        self, owners: Collection[str], kek_mac: bytes, make: Callable[[str], tuple[bytes, bytes]]
    ) -> dict[str, tuple[bytes, bytes]]:
        s = self.schema
        select = f"SELECT owner, key_id, wrapped FROM {s}.keys WHERE owner = ANY($1::text[])"
        async with self._conn() as conn:
            found = {
                r["owner"]: (bytes(r["key_id"]), bytes(r["wrapped"]))
                for r in await conn.fetch(select, list(owners))
            }
            missing = [o for o in owners if o not in found]
            if not missing:
                return found
            async with conn.transaction():
                # FOR SHARE: a rotation (which updates this row) waits for this insert, or
                # this waits for it and then refuses a key wrapped with the old KEK.
                await self._check(conn, kek_mac, kek_mac[:8].hex(), "FOR SHARE")
                made = [(o, *make(o)) for o in missing]
                await conn.executemany(
                    f"INSERT INTO {s}.keys (owner, key_id, wrapped) VALUES ($1, $2, $3) "
                    "ON CONFLICT (owner) DO NOTHING",
                    made,
                )
                # Another instance may have made some of them first: theirs are the ones.
                for r in await conn.fetch(select, missing):
                    found[r["owner"]] = (bytes(r["key_id"]), bytes(r["wrapped"]))
        return found

    async def by_id(self, key_ids: Collection[bytes]) -> dict[bytes, StoredKey]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT key_id, owner, wrapped FROM {self.schema}.keys WHERE key_id = ANY($1::bytea[])",
                list(key_ids),
            )
        return {
            bytes(r["key_id"]): None if r["wrapped"] is None else (r["owner"], bytes(r["wrapped"]))
            for r in rows
        }

    async def destroy(self, owner: str) -> list[bytes]:
        s = self.schema
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"UPDATE {s}.keys SET owner = NULL, wrapped = NULL, destroyed_at = now() WHERE owner = $1 "
                "RETURNING key_id",
                owner,
            )
            # The old row version holding the wrapped key is dead now; VACUUM frees it rather
            # than leaving it for autovacuum's next visit.
            await conn.execute(f"VACUUM {s}.keys")
        return [bytes(r["key_id"]) for r in rows]

    async def rewrap(self, old_mac: bytes, new_mac: bytes, fn: Callable[[bytes, str, bytes], bytes]) -> int:
        s = self.schema
        async with self._conn() as conn, conn.transaction():
            await self._check(conn, old_mac, old_mac[:8].hex(), "FOR UPDATE")
            rows = await conn.fetch(f"SELECT key_id, owner, wrapped FROM {s}.keys WHERE wrapped IS NOT NULL")
            await conn.executemany(
                f"UPDATE {s}.keys SET wrapped = $1 WHERE key_id = $2",
                [(fn(bytes(r["key_id"]), r["owner"], bytes(r["wrapped"])), r["key_id"]) for r in rows],
            )
            await conn.execute(f"UPDATE {s}.meta SET value = $1 WHERE name = 'kek_mac'", new_mac)
        return len(rows)


async def rotate_kek(keys: KeyStore, old_kek: bytes, new_kek: bytes) -> int:
    """Re-wrap every live data key under `new_kek`, in one transaction; returns how many.
    No data row is read or written. `keys` need not be open. Run it with the apps stopped
    (SQLite: the command line's `rotate-key` refuses a file an app holds); a PostgreSQL
    instance still running with the old KEK keeps serving what it has, and its next new
    user's key is refused (`WrongKeyError`, retried) until it restarts with the new one."""
    old, new = AESGCM(old_kek), AESGCM(new_kek)

    def again(key_id: bytes, owner: str, wrapped: bytes) -> bytes:
        aad = _wrap_aad(key_id, owner)
        try:
            key = old.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], aad)
        except InvalidTag:
            raise WrongKeyError(
                f"{keys.where}: the data key {key_id.hex()} does not open with the old key"
            ) from None
        nonce = os.urandom(_NONCE)
        return nonce + new.encrypt(nonce, key, aad)

    await keys.open(_kek_mac(old_kek), kek_id(old_kek))
    try:
        count = await keys.rewrap(_kek_mac(old_kek), _kek_mac(new_kek), again)
    finally:
        await keys.close()
    LOG.warning(
        "re-wrapped %d data keys in %s: key-encryption key %s -> %s",
        count,
        keys.where,
        kek_id(old_kek),
        kek_id(new_kek),
    )
    return count


# -- the backend wrapper -----------------------------------------------------------------------


class _Unresolved(Exception):
    """A value names a data key not looked up yet (raised inside the sync decryption)."""

    def __init__(self, key_id: bytes) -> None:
        self.key_id = key_id


class _Shredded(Exception):
    """The session's data key was destroyed: it was erased."""


# A data key as looked up: its cipher, or None once destroyed.
_Cipher = AESGCM | None


class EncryptedBackend:
    """A `Backend` storing message content, metadata, titles, client IPs and user agents
    encrypted under a data key per user (see the module's docstring).

    Everything that is not the `Backend` Protocol (`path`, `backup`, `disk_usage`,
    `ownership`, ...) is the inner backend's, so the store finds its file, backups and
    ownership as before. A backup of the inner database holds ciphertext only; the keys
    store is not in it.

    `binary`: write values in the bytes form (True) or the text form (False); None, the
    default, picks bytes for `SQLiteBackend` and text for any other backend (PostgreSQL's
    columns are `text` and `json`). Both forms are read whatever it says.
    """

    def __init__(self, inner: Backend, keys: KeyStore, kek: bytes, *, binary: bool | None = None) -> None:
        if len(kek) != 32:
            raise ConfigError("the key-encryption key must be 32 bytes")
        from .backends.sqlite import SQLiteBackend

        if binary is None:
            binary = isinstance(inner, SQLiteBackend)
        # SQLite takes a function sealing its rows in its own writer thread (the bytes form).
        self._sqlite = inner if isinstance(inner, SQLiteBackend) else None
        self.inner = inner
        self.keys = keys
        self.binary = binary
        self._kek = AESGCM(kek)
        self._kek_mac = _kek_mac(kek)
        self._kek_name = kek_id(kek)
        # Data keys by id, unwrapped once. A key id's key never changes; a destroyed one
        # (None) never comes back.
        self._ciphers: dict[bytes, _Cipher] = {}
        # Each owner's live key (key id, wrapped), when no one but this process changes the
        # keys store: a SQLite file has one app (its FileLock), and the command line's
        # writing verbs are refused beside it. A flush then asks the keys store only about
        # owners it has not met (before: a thread hop and a query every flush, as long as a
        # one-message durable commit itself). `delete_user` forgets the owner first. Not on
        # PostgreSQL, where another instance may destroy a key at any time.
        self._live: dict[str, tuple[bytes, bytes]] | None = (
            {} if isinstance(keys, SQLiteKeyStore) and not keys.readonly else None
        )

    def __repr__(self) -> str:
        return f"EncryptedBackend({self.inner!r}, {self.keys!r})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a half-made instance): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database, then the keys store: `WrongKeyError` if the KEK is not the one
        the keys store was made with; `ConfigError` if there is no keys store but the
        database holds encrypted rows (a keys file lost or pointed at the wrong place: a new,
        empty one would make every stored row unreadable and hide why). Nothing is left
        open after either."""
        await self.inner.open()
        try:
            if not await self.keys.exists():
                holds = getattr(self.inner, "holds_sealed_values", None)
                if holds is not None and await holds():
                    raise ConfigError(
                        f"{self.keys.where} does not exist, but the database holds encrypted rows: "
                        "restore the keys from their backup (or point CHAT_SESSION_ENCRYPTION_KEYS_PATH "
                        "at them); nothing stored is readable without them"
                    )
            await self.keys.open(self._kek_mac, self._kek_name)
        except BaseException:
            await self.inner.close()
            raise

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            await self.keys.close()

    # -- writes ------------------------------------------------------------------------------

    def _make_key(self, owner: str) -> tuple[bytes, bytes]:
        key_id = os.urandom(_KEY_ID)
        nonce = os.urandom(_NONCE)
        return key_id, nonce + self._kek.encrypt(nonce, AESGCM.generate_key(256), _wrap_aad(key_id, owner))

    def _unwrap(self, key_id: bytes, owner: str, wrapped: bytes) -> AESGCM:
        try:
            return AESGCM(self._kek.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _wrap_aad(key_id, owner)))
        except InvalidTag:
            raise WrongKeyError(
                f"{self.keys.where}: the data key {key_id.hex()} does not open with key-encryption key "
                f"{self._kek_name} (changed, or wrapped with another key)"
            ) from None

    async def write_batch(
        self, deltas: Sequence[SessionDelta], touches: Sequence[tuple[str, datetime]] = ()
    ) -> BatchResult:
        """Encrypt, then write through. The keys of users new to the store are committed to
        the keys store before the data that needs them. The encryption never runs on the
        event loop: on SQLite it runs in the writer's thread as the rows are made (~6 ms of
        CPU for 5,000 messages), elsewhere in a thread of its own before the write."""
        if deltas:
            owners = {_owner(d.record.user_id) for d in deltas}
            live = self._live
            if live is None:
                stored = await self.keys.active(owners, self._kek_mac, self._make_key)
            else:
                if len(live) > _LIVE_KEYS:
                    live.clear()  # a bound on memory: met again, each costs one lookup
                unknown = owners.difference(live)
                if unknown:
                    live.update(await self.keys.active(unknown, self._kek_mac, self._make_key))
                stored = {owner: live[owner] for owner in owners}
            keys: dict[str, tuple[bytes, _Encrypt]] = {}
            for owner, (key_id, wrapped) in stored.items():
                cipher = self._ciphers.get(key_id)
                if cipher is None:
                    cipher = self._ciphers[key_id] = self._unwrap(key_id, owner, wrapped)
                keys[owner] = (_BLOB_V1.to_bytes() + key_id if self.binary else key_id, cipher.encrypt)
            if self.binary and self._sqlite is not None:
                # Sealed in SQLite's writer thread as its rows are made: no sealed copy of the
                # batch, no thread of its own (together ~1 us a message, a fifth of a flush).
                return await self._sqlite.write_batch(deltas, touches, seal=partial(_seal_rows, keys))
            deltas = await asyncio.to_thread(_seal_batch, deltas, keys, self.binary)
        return await self.inner.write_batch(deltas, touches)

    async def delete_user(self, user_id: UserId) -> list[str]:
        """Destroy the user's data key (durably), then delete the rows. From the first step
        on, every copy of the user's rows, in any backup, is unreadable; if the second fails,
        the rows left are ciphertext no key opens, and a retry deletes them."""
        owner = _owner(user_id)
        if self._live is not None:
            self._live.pop(owner, None)  # the next flush of theirs makes a new key
        for key_id in await self.keys.destroy(owner):
            self._ciphers[key_id] = None
        return await self.inner.delete_user(user_id)

    async def delete_session(self, session_id: str, user_id: UserId | None) -> bool:
        return await self.inner.delete_session(session_id, user_id)

    async def purge_older_than(self, cutoff: datetime, *, limit: int = 500) -> list[str]:
        return await self.inner.purge_older_than(cutoff, limit=limit)

    # -- search ------------------------------------------------------------------------------

    async def search(
        self,
        user_id: UserId,
        words: Sequence[str],
        *,
        limit: int,
        offset: int = 0,
        order: str = "relevance",
        exclude: Collection[str] = (),
    ) -> list[SearchRow]:
        """The `SearchableBackend` answer, found by decrypting the user's own sessions and
        scanning them (the same matching and rank as a search of memory): a full-text index
        over ciphertext cannot match anything, and one over plaintext would be a copy that
        erasure by key cannot reach. Costs a pass over the user's history per query (the
        export's pages: one page of sessions in memory at a time, plus the best
        `offset + limit` rows)."""
        skip = set(exclude)

        async def sessions() -> AsyncIterator[tuple[str, str | None, tuple[StoredMessage, ...]]]:
            async for record in self.iter_user_sessions(user_id):
                if record.id not in skip:
                    yield record.id, record.title, record.messages

        best: list[SearchRow] = []
        want = offset + limit
        async for sid, title, messages in sessions():
            found = memory_rows([(sid, title, messages)], words)
            if found:
                best = heapq.nsmallest(want, [*best, *found], key=_newest if order == "newest" else _best)
        return best[offset:want]

    # -- reads -------------------------------------------------------------------------------

    async def _resolve(self, key_ids: Collection[bytes], session_id: str) -> None:
        wanted = [k for k in key_ids if k not in self._ciphers]
        if not wanted:
            return
        found = await self.keys.by_id(wanted)
        for key_id in wanted:
            if key_id not in found:
                raise DecryptionError(
                    session_id,
                    f"its data key {key_id.hex()} is not in {self.keys.where}: not the keys store this "
                    "database was written with (restore it from its backup), or the value was forged",
                )
            stored = found[key_id]
            self._ciphers[key_id] = None if stored is None else self._unwrap(key_id, *stored)

    async def _open(self, record: SessionRecord) -> SessionRecord | None:
        """The record decrypted; None if its key was destroyed (an erased user's session,
        from a backup restored since)."""
        title_kid = _key_id_of(record.title, record.id)
        if title_kid is not None:
            await self._resolve([title_kid], record.id)
        for _ in range(8):
            try:
                if len(record.messages) > _INLINE_VALUES:
                    return await asyncio.to_thread(_open_record, record, self._ciphers)
                return _open_record(record, self._ciphers)
            except _Unresolved as missing:
                await self._resolve([missing.key_id], record.id)
            except _Shredded:
                return None
        raise DecryptionError(record.id, "its values name more data keys than one session can have")

    async def load_session(self, session_id: str) -> SessionRecord | None:
        record = await self.inner.load_session(session_id)
        return None if record is None else await self._open(record)

    async def iter_user_sessions(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        async for record in self.inner.iter_user_sessions(user_id):
            opened = await self._open(record)
            if opened is not None:
                yield opened

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The inner listing with titles decrypted. A session whose key was destroyed is left
        out (so a page may be short; such rows exist only in a backup restored after an
        erasure)."""
        summaries = await self.inner.list_sessions(user_id, limit=limit, offset=offset)
        kids = {k for s in summaries if (k := _key_id_of(s.title, s.id)) is not None}
        for kid in kids:
            # Per id, so that an error names a session whose title names it.
            first = next(s.id for s in summaries if _key_id_of(s.title, s.id) == kid)
            await self._resolve([kid], first)
        listed: list[SessionSummary] = []
        owner = _owner(user_id)
        for s in summaries:
            try:
                title = _open_title(s.title, self._ciphers, owner, s.id)
            except _Shredded:
                continue
            listed.append(s if title is s.title else replace(s, title=title))
        return listed


# -- the values ------------------------------------------------------------------------------


# A data key's `encrypt`, as `_seal_batch` calls it: (nonce, data, associated data).
_Encrypt = Callable[[bytes, bytes, bytes], bytes]


def _aad_base(owner: str, session_id: str) -> bytes:
    return f"{len(owner)}:{owner}\x00{session_id}\x00".encode()


def _seal_batch(
    deltas: Sequence[SessionDelta], keys: dict[str, tuple[bytes, _Encrypt]], binary: bool
) -> list[SessionDelta]:
    """The deltas with every private value encrypted (in a worker thread), in the bytes form
    (`binary`) or the text form. `keys` holds each owner's (head, encrypt), the head being
    what goes before the nonce: the version byte and key id, or the key id.

    A message appended since the last flush is rebuilt as it was appended (`new_message`:
    its row made with it, its datetimes the original's), so SQLite inserts it as it would
    the plain one, and PostgreSQL binds its datetimes rather than making two from
    microseconds (~0.7 us a message). Any other is rebuilt as a loaded row (`message_from_row`)
    and upserted. One loop, no call a message beyond the cipher's and the constructor's: at
    5,000 messages a batch, each call a message is ~1% of the flush.
    """
    nonces = os.urandom(_NONCE * sum(3 + 2 * len(d.messages) for d in deltas))
    at = 0
    b2a = binascii.b2a_base64
    sealed: list[SessionDelta] = []
    fresh: list[MessageRow] = []
    rows: list[MessageRow] = []
    for delta in deltas:
        record = delta.record
        sid = record.id
        owner = _owner(record.user_id)
        head, encrypt = keys[owner]
        base = _aad_base(owner, sid)
        # Any: a stored value is str or bytes, whatever the record's annotations say.
        values: list[Any] = []
        title = record.title
        for plain, field in (
            (_TITLE_NONE if title is None else _TITLE_TEXT + title.encode(), b"title"),
            (None if record.client_ip is None else record.client_ip.encode(), b"client_ip"),
            (None if record.user_agent is None else record.user_agent.encode(), b"user_agent"),
        ):
            if plain is None:
                values.append(None)
                continue
            nonce = nonces[at : at + _NONCE]
            at += _NONCE
            blob = head + nonce + encrypt(nonce, plain, base + field)
            values.append(blob if binary else PREFIX + b2a(blob, newline=False).decode())
        new_record = replace(record, title=values[0], client_ip=values[1], user_agent=values[2])
        fresh.clear()
        rows.clear()
        originals = delta.messages
        add_message_rows(fresh, rows, sid, originals)
        # Each message's row, in the messages' order; which of them were appended.
        all_appended = not rows
        appended: Collection[int] = ()
        ordered = fresh
        if rows:
            ordered = rows
            if fresh:
                appended = {row[1] for row in fresh}
                by_seq = {row[1]: row for row in fresh}
                by_seq.update((row[1], row) for row in rows)
                ordered = [by_seq[m.seq] for m in originals]
        messages: list[StoredMessage] = []
        add = messages.append
        for m, (_sid, seq, mid, role, text, created, updated, meta) in zip(originals, ordered, strict=True):
            nonce = nonces[at : at + _NONCE]
            at += _NONCE
            content: Any = head + nonce + encrypt(nonce, text.encode(), base + b"%d:c" % seq)
            if not binary:
                content = PREFIX + b2a(content, newline=False).decode()
            metadata: Any = None
            if meta is not None:
                nonce = nonces[at : at + _NONCE]
                at += _NONCE
                metadata = head + nonce + encrypt(nonce, meta.encode(), base + b"%d:m" % seq)
                if not binary:
                    metadata = _META_HEAD + b2a(metadata, newline=False).decode() + _META_TAIL
            if all_appended or seq in appended:
                # `m` is the message of this row, and was never edited: its times are equal.
                add(new_message(sid, mid, seq, role, content, m.created_at, created, metadata))
            else:
                add(message_from_row(seq, mid, role, content, created, updated, metadata))
        sealed.append(SessionDelta(new_record, tuple(messages), delta.message_count, delta.truncate_after))
    return sealed


# The associated data's last part for a message's content and metadata, made once for the
# seqs most sessions have (a formatted bytes object a message was ~5% of the flush).
_SUFFIXES: Final = 2048
_CONTENT_AAD: Final = tuple(b"%d:c" % seq for seq in range(_SUFFIXES))
_META_AAD: Final = tuple(b"%d:m" % seq for seq in range(_SUFFIXES))


def _seal_rows(
    keys: dict[str, tuple[bytes, _Encrypt]],
    deltas: Sequence[SessionDelta],
    sessions: list[tuple[Any, ...]],
) -> tuple[list[Any], list[Any]]:
    """`_seal_batch` for SQLite, in the bytes form, on the rows themselves (a
    `backends.sqlite.RowSealer`, run in the writer's thread as the batch is written): the
    private values of the session rows replaced by their sealed bytes in place, and the
    message rows made (`add_message_rows`) and returned sealed, (fresh, others). The same
    values and associated data as `_seal_batch`, so either reads the other's.

    A comprehension a session, with nothing in it but the cipher's call and the row: at
    5,000 messages a batch, every 0.1 us a message is ~2% of the flush."""
    content_aad, meta_aad, n = _CONTENT_AAD, _META_AAD, _SUFFIXES
    # Every nonce the batch may need, from one system call: three a session (its private
    # values), two a message (its content, and its metadata if it has any).
    nonces = os.urandom(_NONCE * (3 * len(deltas) + 2 * sum(len(d.messages) for d in deltas)))
    start = 0
    fresh: list[Any] = []
    others: list[Any] = []
    made: list[MessageRow] = []
    remade: list[MessageRow] = []
    for i, (delta, row) in enumerate(zip(deltas, sessions, strict=True)):
        record = delta.record
        sid = record.id
        owner = _owner(record.user_id)
        head, encrypt = keys[owner]
        base = _aad_base(owner, sid)
        title, client_ip, user_agent = row[6], row[7], row[8]
        nonce = nonces[start : start + _NONCE]
        title = (
            head
            + nonce
            + encrypt(nonce, _TITLE_NONE if title is None else _TITLE_TEXT + title.encode(), base + b"title")
        )
        if client_ip is not None:
            nonce = nonces[start + _NONCE : start + 2 * _NONCE]
            client_ip = head + nonce + encrypt(nonce, client_ip.encode(), base + b"client_ip")
        if user_agent is not None:
            nonce = nonces[start + 2 * _NONCE : start + 3 * _NONCE]
            user_agent = head + nonce + encrypt(nonce, user_agent.encode(), base + b"user_agent")
        start += 3 * _NONCE
        sessions[i] = (*row[:6], title, client_ip, user_agent, *row[9:])
        made.clear()
        remade.clear()
        add_message_rows(made, remade, sid, delta.messages)
        for rows, out in ((made, fresh), (remade, others)):
            if not rows:
                continue
            end = start + 2 * _NONCE * len(rows)
            out += [
                (
                    sid_,
                    seq,
                    mid,
                    role,
                    head
                    + (c := nonces[at : at + _NONCE])
                    + encrypt(c, text.encode(), base + (content_aad[seq] if seq < n else b"%d:c" % seq)),
                    created,
                    updated,
                    None
                    if meta is None
                    else head
                    + (m := nonces[at + _NONCE : at + 2 * _NONCE])
                    + encrypt(m, meta.encode(), base + (meta_aad[seq] if seq < n else b"%d:m" % seq)),
                )
                for at, (sid_, seq, mid, role, text, created, updated, meta) in zip(
                    range(start, end, 2 * _NONCE), rows, strict=True
                )
            ]
            start = end
    return fresh, others


def _newest(row: SearchRow) -> tuple[int, str, int]:
    """The order of `writebehind.search` for "newest": newest first, ties by id and seq."""
    return (-to_micros(row.created_at), row.session_id, -row.seq)


def _best(row: SearchRow) -> tuple[float, int, str, int]:
    """ "relevance": the rank of a memory scan, then newest first."""
    return (row.rank, *_newest(row))


def _key_id_of(value: str | bytes | None, session_id: str) -> bytes | None:
    """The key id an encrypted value names (None: not encrypted)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if len(value) < _BLOB_HEAD + 16 or value[0] != _BLOB_V1:
            raise DecryptionError(session_id, "a stored value is not valid ciphertext")
        return value[1 : 1 + _KEY_ID]
    if not value.startswith(PREFIX):
        return None
    try:
        return binascii.a2b_base64(value[len(PREFIX) : len(PREFIX) + _KID_CHARS])[:_KEY_ID]
    except binascii.Error:
        raise DecryptionError(session_id, "a stored value is not valid ciphertext") from None


def _decrypt(
    value: str | bytes, ciphers: dict[bytes, _Cipher], aad: bytes, session_id: str, what: str, seq: int = 0
) -> bytes:
    """`value` decrypted: the bytes form, or the text form's base64 (its prefix taken off).
    `what` names the value in an error (`%d`: the message's `seq`)."""
    if isinstance(value, bytes):
        if len(value) < 1 + _MIN_BLOB:
            raise DecryptionError(
                session_id, f"{_what(what, seq)} is too short to be ciphertext (changed outside writebehind)"
            )
        if value[0] != _BLOB_V1:
            raise DecryptionError(
                session_id,
                f"{_what(what, seq)} is ciphertext of an unknown version ({value[0]}): written by a newer "
                "writebehind, or changed outside writebehind",
            )
        key_id, nonce, data = value[1 : 1 + _KEY_ID], value[1 + _KEY_ID : _BLOB_HEAD], value[_BLOB_HEAD:]
    else:
        try:
            blob = binascii.a2b_base64(value, strict_mode=True)
        except binascii.Error:
            raise DecryptionError(
                session_id, f"{_what(what, seq)} is not valid ciphertext (changed outside writebehind)"
            ) from None
        if len(blob) < _MIN_BLOB:
            raise DecryptionError(
                session_id, f"{_what(what, seq)} is too short to be ciphertext (changed outside writebehind)"
            )
        key_id, nonce, data = blob[:_KEY_ID], blob[_KEY_ID:_HEAD], blob[_HEAD:]
    try:
        cipher = ciphers[key_id]
    except KeyError:
        raise _Unresolved(key_id) from None
    if cipher is None:
        raise _Shredded
    try:
        return cipher.decrypt(nonce, data, aad)
    except InvalidTag:
        raise DecryptionError(
            session_id,
            f"{_what(what, seq)} does not decrypt: changed, or moved from another row, field or user",
        ) from None


def _what(what: str, seq: int) -> str:
    return what % seq if "%d" in what else what


def _open_title(
    title: str | bytes | None, ciphers: dict[bytes, _Cipher], owner: str, session_id: str
) -> str | None:
    if isinstance(title, bytes):
        sealed: str | bytes = title
    elif title is None or not title.startswith(PREFIX):
        return title  # written before encryption was turned on
    else:
        sealed = title[len(PREFIX) :]
    data = _decrypt(sealed, ciphers, _aad_base(owner, session_id) + b"title", session_id, "the title")
    if data[:1] == _TITLE_NONE and len(data) == 1:
        return None
    if data[:1] != _TITLE_TEXT:
        raise DecryptionError(session_id, "the title decrypts to an unknown form")
    return data[1:].decode()


def _open_text(
    value: str | bytes | None, ciphers: dict[bytes, _Cipher], aad: bytes, session_id: str, what: str
) -> str | None:
    """A client IP or user agent, decrypted if it was stored encrypted."""
    if isinstance(value, bytes):
        return _decrypt(value, ciphers, aad, session_id, what).decode()
    if value is None or not value.startswith(PREFIX):
        return value
    return _decrypt(value[len(PREFIX) :], ciphers, aad, session_id, what).decode()


def _open_record(record: SessionRecord, ciphers: dict[bytes, _Cipher]) -> SessionRecord:
    """The record with every encrypted value decrypted (sync: inline or in a thread).
    Raises `_Unresolved` for a key not looked up yet, `_Shredded` if the title's key was
    destroyed, `DecryptionError` for a value that does not decrypt."""
    sid = record.id
    owner = _owner(record.user_id)
    base = _aad_base(owner, sid)
    title = _open_title(record.title, ciphers, owner, sid)
    client_ip = _open_text(record.client_ip, ciphers, base + b"client_ip", sid, "the client IP")
    user_agent = _open_text(record.user_agent, ciphers, base + b"user_agent", sid, "the user agent")
    messages: list[StoredMessage] = []
    # Any: what a row holds is str or bytes, whatever `StoredMessage` says of its fields.
    content: Any
    meta: Any
    for m in record.messages:
        content, meta = m.content, m.metadata_json
        seq = m.seq
        opened = False
        if isinstance(content, bytes):
            content = _decrypt(
                content, ciphers, base + b"%d:c" % seq, sid, "message %d's content", seq
            ).decode()
            opened = True
        elif content.startswith(PREFIX):
            content = _decrypt(
                content[len(PREFIX) :], ciphers, base + b"%d:c" % seq, sid, "message %d's content", seq
            ).decode()
            opened = True
        if meta is None:
            pass
        elif isinstance(meta, bytes):
            meta = _decrypt(meta, ciphers, base + b"%d:m" % seq, sid, "message %d's metadata", seq).decode()
            opened = True
        elif meta.startswith(_META_HEAD):
            if not meta.endswith(_META_TAIL):
                raise DecryptionError(sid, f"message {seq}'s metadata is not valid ciphertext")
            meta = _decrypt(
                meta[len(_META_HEAD) : -len(_META_TAIL)],
                ciphers,
                base + b"%d:m" % seq,
                sid,
                "message %d's metadata",
                seq,
            ).decode()
            opened = True
        if not opened:
            messages.append(m)  # written before encryption was turned on
            continue
        messages.append(message_from_row(seq, m.id, m.role, content, m.created_us, m.updated_us, meta))
    return replace(record, title=title, client_ip=client_ip, user_agent=user_agent, messages=tuple(messages))


# -- wiring ----------------------------------------------------------------------------------


def encrypted_backend(inner: Backend, config: Config, *, readonly: bool = False) -> Backend:
    """`inner` wrapped by `EncryptedBackend` when the configuration names a KEK; `inner`
    itself otherwise. The keys live in `config.encryption_keys_path` (default `<db>.keys`)
    for SQLite, in the schema `<db_schema>_keys` for PostgreSQL."""
    kek = load_kek(config)
    if kek is None:
        return inner
    keys: KeyStore
    if config.db_url is not None:
        keys = PostgresKeyStore(config.db_url, keys_schema_for(config.db_schema))
    else:
        db_path = Path(getattr(inner, "path", config.db_path))
        keys = SQLiteKeyStore(config.encryption_keys_path or keys_path_for(db_path), readonly=readonly)
    return EncryptedBackend(inner, keys, kek)


def keys_schema_for(db_schema: str) -> str:
    return f"{db_schema}_keys"


def new_kek() -> str:
    """A fresh KEK, as CHAT_SESSION_ENCRYPTION_KEY takes it (base64 of 32 random bytes)."""
    return base64.b64encode(os.urandom(32)).decode()
