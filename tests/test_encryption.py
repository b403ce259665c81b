"""Encryption at rest with a key per user (`writebehind.encryption`), on real SQLite files and
the real PostgreSQL: round trips, no plaintext on disk or in a backup, erasure that reaches a
backup restored afterwards, key rotation, a wrong key, tampering, and the hot path untouched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from writebehind import Config, NotFound, SessionStore, SQLiteBackend, WriteBehindStore
from writebehind import encryption as enc
from writebehind.backups import restore_backup
from writebehind.encryption import EncryptedBackend, SQLiteKeyStore, keys_path_for, rotate_kek
from writebehind.errors import ConfigError, DecryptionError, WrongKeyError

from .pg import DSN, new_schema
from .test_cli import SCRIPT

MARKER = "QZX-PRIVATE-4471"
TITLE = f"Rëçïpé 🍜 {MARKER} 中文 עברית e\u0301"
CONTENTS = [
    f"hello 👋🏽 {MARKER}",
    "你好\uff0c世界 — こんにちは",
    "مرحبا بالعالم שלום",
    "combining: a\u0301 o\u0308 n\u0303 \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "",
]
META = {"source": f"ünïcode {MARKER}", "nested": {"list": [1, "二", None, True]}, "emoji": "🔐"}


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def store_for(db: Path, key: str | None, **overrides: Any) -> WriteBehindStore:
    config = Config(db_path=db, encryption_key=key, **{"flush_interval_ms": 3_600_000, **overrides})
    return WriteBehindStore.from_config(config)


def written_as_before(store: WriteBehindStore) -> None:
    """From now on `store` writes as releases before the bytes form did: the text form
    (`wbe1:` + base64) on SQLite too."""
    backend = store.backend
    assert isinstance(backend, EncryptedBackend) and backend.binary
    backend.binary = False


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


async def fill(store: WriteBehindStore, sid: str, user: int | str, *, marker: str = MARKER) -> None:
    await store.ensure_session(sid, user_id=user, title=f"{TITLE} {marker}", client_ip="203.0.113.9",
                               user_agent=f"Agent/1.0 {marker}")  # fmt: skip
    for i, text in enumerate(CONTENTS):
        await store.append_message(
            sid, user_id=user, role="user" if i % 2 == 0 else "assistant", content=f"{text} {marker}",
            metadata={**META, "i": i} if i % 2 == 0 else None,
        )  # fmt: skip


def raw_bytes(*paths: Path) -> bytes:
    return b"".join(p.read_bytes() for p in paths if p.exists())


def sidecars(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


# -- round trips -----------------------------------------------------------------------------


async def test_content_titles_and_metadata_round_trip_with_non_ascii_text(db: Path) -> None:
    key = new_key()
    async with store_for(db, key) as store:
        await fill(store, "s1", 1)
        # An edit after a flush (an upsert of a stored row), a streamed reply, a pop, a
        # session with no title and one long enough to decrypt in a thread.
        await store.flush()
        first = (await store.get_messages("s1", user_id=1))[0]
        await store.update_message("s1", first.id, user_id=1, content="édité ✏️", metadata={"v": "二"})
        reply = await store.append_message("s1", user_id=1, role="assistant", content="")
        for token in ["Stré", "amed ", "🌊", " توكن"]:
            await store.update_message("s1", reply.id, user_id=1, append=token)
        await store.append_message("s1", user_id=1, role="user", content="popped")
        await store.pop_message("s1", user_id=1)
        await store.ensure_session("untitled", user_id="alice")
        await store.ensure_session("long", user_id="alice", title="long")
        # Past 2,048 messages: the associated data of such seqs is made, not looked up.
        for i in range(2_100):
            meta = {"i": i, "ключ": "值"} if i % 7 == 0 else None
            await store.append_message(
                "long", user_id="alice", role="user", content=f"message {i} ∑ {i}", metadata=meta
            )
            if i == 2_060:  # a flush, then edits of stored rows on both sides of 2,048
                await store.flush()
                for seq in (2_040, 2_060):
                    stored = (await store.get_messages("long", user_id="alice", after_seq=seq - 1, limit=1))[
                        0
                    ]
                    await store.update_message("long", stored.id, user_id="alice", metadata={"edited": "✓"})
        expected = {
            sid: await store.get_session(sid, user_id=user)
            for sid, user in (("s1", 1), ("untitled", "alice"), ("long", "alice"))
        }
    assert isinstance(store.backend, EncryptedBackend)

    async with store_for(db, key) as store:
        for sid, user in (("s1", 1), ("untitled", "alice"), ("long", "alice")):
            loaded = await store.get_session(sid, user_id=user)
            want = expected[sid]
            assert (loaded.title, loaded.client_ip, loaded.user_agent) == (
                want.title, want.client_ip, want.user_agent,
            )  # fmt: skip
            assert [(m.id, m.seq, m.role, m.content, m.metadata, m.created_at, m.updated_at)
                    for m in loaded.messages] == [
                (m.id, m.seq, m.role, m.content, m.metadata, m.created_at, m.updated_at)
                for m in want.messages
            ]  # fmt: skip
        s1 = await store.get_session("s1", user_id=1)
        assert s1.messages[0].content == "édité ✏️" and s1.messages[0].metadata == {"v": "二"}
        assert s1.messages[-1].content == "Stréamed 🌊 توكن"
        assert [m.content for m in s1.messages[1:5]] == [f"{t} {MARKER}" for t in CONTENTS[1:]]
        assert (await store.get_session("untitled", user_id="alice")).title is None

    # SQLite stores every private value as a BLOB (the bytes form), nothing as text.
    conn = sqlite3.connect(db)
    try:
        kinds = conn.execute(
            "SELECT DISTINCT typeof(m.content), typeof(m.metadata), typeof(s.title), typeof(s.client_ip), "
            "typeof(s.user_agent) FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.id = 's1'"
        ).fetchall()
    finally:
        conn.close()
    assert {k[0] for k in kinds} == {"blob"} and {k[1] for k in kinds} == {"blob", "null"}
    assert {k[2:] for k in kinds} == {("blob", "blob", "blob")}

    # From disk only (a new store, nothing in memory): listings and exports decrypt too.
    async with store_for(db, key) as store:
        listed = await store.list_sessions("alice")
        assert {s.id: s.title for s in listed} == {"untitled": None, "long": "long"}
        exported = orjson.loads(b"".join([c async for c in store.export_user_json(1)]))
        assert exported["sessions"][0]["title"] == f"{TITLE} {MARKER}"
        assert [m["content"] for m in exported["sessions"][0]["messages"]][1] == f"{CONTENTS[1]} {MARKER}"


async def test_nothing_private_is_in_plaintext_in_the_file_its_wal_its_backup_or_the_keys_file(
    db: Path, tmp_path: Path
) -> None:
    key = new_key()
    store = store_for(db, key)
    await store.start()
    try:
        await fill(store, "s1", 1)
        await fill(store, "s2", "bob")
        await store.flush()
        # While the store is open the rows are in the WAL, not yet in the main file.
        assert db.with_name(db.name + "-wal").stat().st_size > 0
        on_disk = raw_bytes(*sidecars(db))
        await store.backup(tmp_path / "backup.db")
    finally:
        await store.aclose()
    keys = keys_path_for(db)
    for blob in (on_disk, raw_bytes(*sidecars(db)), (tmp_path / "backup.db").read_bytes(), keys.read_bytes()):
        for plain in (MARKER, "Agent/1.0", "203.0.113.9", "你好", "ünïcode", "🍜"):
            assert plain.encode() not in blob
            assert plain.encode("utf-16-le") not in blob
    # The check can fail: the same writes without a key leave the marker in the file.
    async with store_for(tmp_path / "plain.db", None) as plain_store:
        await fill(plain_store, "s1", 1)
    assert MARKER.encode() in raw_bytes(*sidecars(tmp_path / "plain.db"))
    assert os.stat(keys).st_mode & 0o777 == 0o600
    # The keys file is not in the backup, and the backup names no key.
    assert b"wrapped" not in (tmp_path / "backup.db").read_bytes()


# -- erasure reaches backups -----------------------------------------------------------------


def ciphertexts_of(db: Path, user: object) -> list[str | bytes]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT m.content FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.user_id = ?",
            (user,),
        ).fetchall()
        titles = conn.execute("SELECT title FROM sessions WHERE user_id = ?", (user,)).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows + titles]


def sealed_parts(value: str | bytes) -> tuple[bytes, bytes, bytes]:
    """(key id, nonce, ciphertext and tag) of a stored value: the bytes form (a version byte
    first) or the text form of releases before it (`wbe1:` + base64)."""
    if isinstance(value, bytes):
        assert value[0] == 1
        blob = value[1:]
    else:
        blob = base64.b64decode(value[len(enc.PREFIX) :])
    return blob[:8], blob[8:20], blob[20:]


def every_key_in(keys: Path, kek: bytes) -> list[AESGCM]:
    """What an attacker holding the keys file and the KEK can unwrap: every live data key."""
    conn = sqlite3.connect(keys)
    try:
        rows = conn.execute("SELECT key_id, owner, wrapped FROM keys WHERE wrapped IS NOT NULL").fetchall()
    finally:
        conn.close()
    wrapper = AESGCM(kek)
    return [AESGCM(wrapper.decrypt(w[:12], w[12:], enc._wrap_aad(bytes(k), owner))) for k, owner, w in rows]


async def test_a_backup_taken_before_an_erasure_and_restored_after_it_holds_nothing_readable_of_the_user(
    db: Path, tmp_path: Path
) -> None:
    key = new_key()
    backup = tmp_path / "before-erasure.db"
    async with store_for(db, key) as store:
        await fill(store, "erased-1", 1, marker="GONE")
        await store.flush()
        # One session in the text form of the releases before the bytes form.
        written_as_before(store)
        await fill(store, "erased-2", 1, marker="GONE")
        await store.flush()
        backend = store.backend
        assert isinstance(backend, EncryptedBackend)
        backend.binary = True
        await fill(store, "kept", 2, marker="KEPT")
        await store.backup(backup)
        assert await store.delete_user(1) == 2

    # The restore: the backup replaces the database (the app stopped); the keys file stays.
    restore_backup(backup, db)
    assert len(ciphertexts_of(db, 1)) == 2 * (len(CONTENTS) + 1)  # the rows are back...

    async with store_for(db, key) as store:
        # ...and nothing of them is readable through the store,
        assert await store.list_sessions(1) == []
        assert [r async for r in store.export_user(1)] == []
        for sid in ("erased-1", "erased-2"):
            with pytest.raises(NotFound):
                await store.get_messages(sid, user_id=1)
        # while the other user's data in the same backup is.
        kept = await store.get_session("kept", user_id=2)
        assert kept.title == f"{TITLE} KEPT"
        assert [m.content for m in kept.messages] == [f"{t} KEPT" for t in CONTENTS]

    # Nor with the KEK and the keys file in hand: no key left anywhere opens those rows.
    kek = base64.b64decode(key)
    keys = every_key_in(keys_path_for(db), kek)
    assert keys, "the other user's key is there"
    erased = ciphertexts_of(db, 1)
    assert {type(v) for v in erased} == {bytes, str}  # both forms
    named = set()
    for value in erased:
        key_id, nonce, sealed = sealed_parts(value)
        named.add(key_id)
        for candidate in keys:
            # The right associated data, so only the key could be wrong.
            for field in (b"title", *(b"%d:c" % seq for seq in range(1, len(CONTENTS) + 1))):
                for sid in ("erased-1", "erased-2"):
                    with pytest.raises(InvalidTag):
                        candidate.decrypt(nonce, sealed, enc._aad_base("i:1", sid) + field)
    conn = sqlite3.connect(keys_path_for(db))
    try:
        # The erased key's row is a tombstone: no owner, no key material.
        tombstones = conn.execute(
            "SELECT owner, wrapped, key_id FROM keys WHERE destroyed_at IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    assert [t[:2] for t in tombstones] == [(None, None)]
    assert named == {tombstones[0][2]}  # every erased value, of either form, names that key
    assert b"i:1" not in keys_path_for(db).read_bytes()


async def test_erasure_destroys_the_key_before_deleting_the_rows(db: Path) -> None:
    """If deleting the rows fails after the key is gone, what is left is unreadable, and a
    retry deletes it."""
    key = new_key()
    async with store_for(db, key) as store:
        await fill(store, "s1", 7)
        await store.flush()
        backend = store.backend
        assert isinstance(backend, EncryptedBackend)
        real_delete = backend.inner.delete_user
        calls: list[str] = []

        async def failing(user_id: Any) -> list[str]:
            calls.append("rows")
            raise OSError("disk gone")

        backend.inner.delete_user = failing  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await backend.delete_user(7)
        assert calls == ["rows"]
        # The key is destroyed already: the rows still there load as erased.
        assert await backend.load_session("s1") is None
        backend.inner.delete_user = real_delete  # type: ignore[method-assign]
        assert await store.delete_user(7) == 1
        assert await backend.inner.load_session("s1") is None


# -- keys: wrong, rotated, tampered ------------------------------------------------------------


async def test_a_wrong_key_fails_at_start_with_a_typed_error_and_leaves_the_file_usable(db: Path) -> None:
    key, wrong = new_key(), new_key()
    async with store_for(db, key) as store:
        await fill(store, "s1", 1)
    before = raw_bytes(db), raw_bytes(keys_path_for(db))
    store = store_for(db, wrong)
    with pytest.raises(WrongKeyError) as caught:
        await store.start()
    text = str(caught.value)
    assert enc.kek_id(base64.b64decode(wrong)) in text and enc.kek_id(base64.b64decode(key)) in text
    assert key not in text and wrong not in text and "CHAT_SESSION_ENCRYPTION_KEY" in text
    assert (raw_bytes(db), raw_bytes(keys_path_for(db))) == before
    # Nothing was left open or locked: the right key starts at once.
    async with store_for(db, key) as store:
        assert (await store.get_messages("s1", user_id=1))[0].content == f"{CONTENTS[0]} {MARKER}"


def test_bad_keys_in_the_configuration_name_the_variable_and_never_the_key(tmp_path: Path) -> None:
    for value in (
        "not base64!",
        base64.b64encode(b"short").decode(),
        base64.b64encode(os.urandom(33)).decode(),
    ):
        with pytest.raises(ConfigError) as caught:
            Config.from_env({"CHAT_SESSION_ENCRYPTION_KEY": value})
        assert str(caught.value).startswith("CHAT_SESSION_ENCRYPTION_KEY:") and value not in str(caught.value)
    key = new_key()
    assert key not in repr(Config(encryption_key=key))
    with pytest.raises(ConfigError, match="both set"):
        Config.from_env({"CHAT_SESSION_ENCRYPTION_KEY": key, "CHAT_SESSION_ENCRYPTION_KEY_FILE": "/k"})
    with pytest.raises(ConfigError, match="CHAT_SESSION_ENCRYPTION_KEYS_PATH"):
        Config.from_env({"CHAT_SESSION_ENCRYPTION_KEYS_PATH": str(tmp_path / "k")})
    # A key file: base64 text (a trailing newline is fine) or the 32 bytes themselves.
    raw = os.urandom(32)
    text_file, raw_file, bad_file = tmp_path / "k.txt", tmp_path / "k.bin", tmp_path / "bad"
    text_file.write_text(base64.b64encode(raw).decode() + "\n")
    raw_file.write_bytes(raw)
    bad_file.write_text("nope")
    assert enc.load_kek(Config(encryption_key_file=text_file)) == raw
    assert enc.load_kek(Config(encryption_key_file=raw_file)) == raw
    with pytest.raises(ConfigError, match="CHAT_SESSION_ENCRYPTION_KEY_FILE"):
        enc.load_kek(Config(encryption_key_file=bad_file))
    with pytest.raises(ConfigError, match="CHAT_SESSION_ENCRYPTION_KEY_FILE: cannot read"):
        enc.load_kek(Config(encryption_key_file=tmp_path / "missing"))


async def test_rotating_the_key_rewraps_data_keys_only_and_the_old_key_stops_working(db: Path) -> None:
    old, new = new_key(), new_key()
    async with store_for(db, old) as store:
        await fill(store, "s1", 1)
        await fill(store, "s2", "zoë")
    rows_before = sqlite3.connect(db).execute("SELECT * FROM messages ORDER BY session_id, seq").fetchall()
    keys = keys_path_for(db)
    assert await rotate_kek(SQLiteKeyStore(keys), base64.b64decode(old), base64.b64decode(new)) == 2
    # Not a byte of the data was rewritten.
    assert (
        sqlite3.connect(db).execute("SELECT * FROM messages ORDER BY session_id, seq").fetchall()
        == rows_before
    )
    async with store_for(db, new) as store:
        assert (await store.get_session("s2", user_id="zoë")).title == f"{TITLE} {MARKER}"
        await store.append_message("s1", user_id=1, role="user", content="after rotation")
        await fill(store, "s3", 3)  # a new user's key, wrapped with the new key
    with pytest.raises(WrongKeyError):
        await store_for(db, old).start()
    # A rotation from a key that is not the current one changes nothing.
    with pytest.raises(WrongKeyError):
        await rotate_kek(SQLiteKeyStore(keys), base64.b64decode(old), base64.b64decode(new_key()))
    async with store_for(db, new) as store:
        assert (await store.get_messages("s1", user_id=1))[-1].content == "after rotation"
        assert (await store.get_session("s3", user_id=3)).title == f"{TITLE} {MARKER}"


def tamper(db: Path, sql: str, *params: Any) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("form", ["bytes", "text, as before"])
@pytest.mark.parametrize(
    "how",
    [
        "flip a byte",
        "swap two messages",
        "move from another session",
        "truncate",
        "not base64 / unknown version",
        "metadata",
        "title",
    ],
)
async def test_a_tampered_value_raises_a_typed_error_naming_the_session_and_nothing_else_breaks(
    db: Path, how: str, form: str
) -> None:
    key = new_key()
    async with store_for(db, key) as store:
        if form != "bytes":
            written_as_before(store)
        await fill(store, "victim", 1)
        await fill(store, "other", 1)
    content = (
        sqlite3.connect(db)
        .execute("SELECT content FROM messages WHERE session_id = 'victim' AND seq = 1")
        .fetchone()[0]
    )
    assert isinstance(content, bytes if form == "bytes" else str)
    if how == "flip a byte":
        blob = bytearray(content if isinstance(content, bytes) else base64.b64decode(content[5:]))
        blob[-20] ^= 1
        forged: str | bytes = (
            bytes(blob) if isinstance(content, bytes) else enc.PREFIX + base64.b64encode(bytes(blob)).decode()
        )
        tamper(db, "UPDATE messages SET content = ? WHERE session_id = 'victim' AND seq = 1", forged)
    elif how == "swap two messages":
        tamper(db, "UPDATE messages SET content = (SELECT content FROM messages WHERE session_id = 'victim' "
                   "AND seq = 2) WHERE session_id = 'victim' AND seq = 1")  # fmt: skip
    elif how == "move from another session":
        tamper(db, "UPDATE messages SET content = (SELECT content FROM messages WHERE session_id = 'other' "
                   "AND seq = 1) WHERE session_id = 'victim' AND seq = 1")  # fmt: skip
    elif how == "truncate":
        tamper(db, "UPDATE messages SET content = ? WHERE session_id = 'victim' AND seq = 1", content[:30])
    elif how == "not base64 / unknown version":
        forged = b"\x02" + content[1:] if isinstance(content, bytes) else content + "!!"
        tamper(db, "UPDATE messages SET content = ? WHERE session_id = 'victim' AND seq = 1", forged)
    elif how == "title":
        tamper(db, "UPDATE sessions SET title = (SELECT title FROM sessions WHERE id = 'other') "
                   "WHERE id = 'victim'")  # fmt: skip
    else:
        tamper(db, "UPDATE messages SET metadata = (SELECT metadata FROM messages WHERE session_id = 'other' "
                   "AND seq = 1) WHERE session_id = 'victim' AND seq = 1")  # fmt: skip
    async with store_for(db, key, flush_interval_ms=50) as store:
        with pytest.raises(DecryptionError) as caught:
            await store.get_messages("victim", user_id=1)
        assert caught.value.session_id == "victim" and "'victim'" in str(caught.value)
        assert MARKER not in str(caught.value)
        # The failed load left nothing behind: the other session loads, writes and flushes.
        assert len(await store.get_messages("other", user_id=1)) == len(CONTENTS)
        await store.append_message("other", user_id=1, role="user", content="still fine", durable=True)
        stats = store.stats()
        assert stats.consecutive_failures == 0 and stats.last_error is None
        # And asking again fails again, the same way (not a cached half-load).
        with pytest.raises(DecryptionError):
            await store.get_session("victim", user_id=1)


async def test_a_lost_keys_file_refuses_the_start_and_is_not_replaced_by_an_empty_one(db: Path) -> None:
    key = new_key()
    async with store_for(db, key) as store:
        await fill(store, "s1", 1)
    keys = keys_path_for(db)
    saved = keys.read_bytes()
    keys.unlink()
    store = store_for(db, key)
    with pytest.raises(ConfigError, match="does not exist, but the database holds encrypted rows"):
        await store.start()
    assert not keys.exists(), "no empty keys file made in its place"
    # The keys file back from its backup: everything reads again.
    keys.write_bytes(saved)
    async with store_for(db, key) as store:
        assert (await store.get_messages("s1", user_id=1))[0].content == f"{CONTENTS[0]} {MARKER}"
    # A keys file whose keys are not the rows' (another database's) is a loud error on read.
    keys.unlink()
    async with store_for(tmp := db.with_name("other.db"), key) as other:
        await fill(other, "x", 1)
    keys_path_for(tmp).rename(keys)
    async with store_for(db, key) as store:
        with pytest.raises(DecryptionError, match="not in the keys file"):
            await store.get_messages("s1", user_id=1)


async def test_a_plain_file_turning_encryption_on_makes_its_keys_file(db: Path) -> None:
    async with store_for(db, None) as store:
        await fill(store, "plain", 1)
    async with store_for(db, new_key()) as store:  # no keys file, no encrypted row: a first start
        assert (await store.get_session("plain", user_id=1)).title == f"{TITLE} {MARKER}"
    assert keys_path_for(db).exists()


# -- the hot path, and data from before encryption ---------------------------------------------


class SpyCipher:
    """Stands in for `AESGCM`: counts every encryption and decryption."""

    encrypted = 0
    decrypted = 0

    def __init__(self, key: bytes) -> None:
        self._real = AESGCM(key)

    @staticmethod
    def generate_key(bit_length: int) -> bytes:
        return AESGCM.generate_key(bit_length)

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        SpyCipher.encrypted += 1
        return self._real.encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        SpyCipher.decrypted += 1
        return self._real.decrypt(nonce, data, aad)


async def test_requests_never_encrypt_only_the_flush_does(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(enc, "AESGCM", SpyCipher)
    async with store_for(db, new_key()) as store:
        await store.ensure_session("s1", user_id=1, title="t")
        await store.flush()  # the user's key exists from here on
        SpyCipher.encrypted = SpyCipher.decrypted = 0
        for i in range(50):
            await store.append_message("s1", user_id=1, role="user", content=f"m{i}", metadata={"i": i})
        message = await store.append_message("s1", user_id=1, role="assistant", content="")
        for token in "tokens":
            await store.update_message("s1", message.id, user_id=1, append=token)
        await store.get_messages("s1", user_id=1, after_seq=10)
        assert (SpyCipher.encrypted, SpyCipher.decrypted) == (0, 0)
        # A listing reads the disk (as without encryption): it decrypts what it read there.
        await store.list_sessions(1)
        assert (SpyCipher.encrypted, SpyCipher.decrypted) == (0, 1)
        await store.flush()
        # The session's title, and content plus metadata of each new message (the reply: none).
        assert SpyCipher.encrypted == 1 + 2 * 50 + 1
        assert SpyCipher.decrypted == 1


async def test_rows_written_before_encryption_stay_readable_and_new_writes_are_encrypted(db: Path) -> None:
    async with store_for(db, None) as store:
        await fill(store, "legacy", 1, marker="OLD")
    key = new_key()
    async with store_for(db, key) as store:
        legacy = await store.get_session("legacy", user_id=1)
        assert legacy.title == f"{TITLE} OLD"
        assert [m.content for m in legacy.messages] == [f"{t} OLD" for t in CONTENTS]
        await store.append_message("legacy", user_id=1, role="user", content="NEW-SECRET")
    rows = dict(sqlite3.connect(db).execute("SELECT seq, content FROM messages WHERE session_id = 'legacy'"))
    assert rows[1] == f"{CONTENTS[0]} OLD" and rows[len(CONTENTS) + 1][:1] == b"\x01"
    assert b"NEW-SECRET" not in raw_bytes(*sidecars(db))
    async with store_for(db, key) as store:
        mixed = await store.get_session("legacy", user_id=1)
        assert (
            mixed.messages[0].content == f"{CONTENTS[0]} OLD" and mixed.messages[-1].content == "NEW-SECRET"
        )
        assert mixed.title == f"{TITLE} OLD"  # re-written encrypted with the session row


async def test_a_file_in_the_text_form_of_earlier_releases_reads_and_takes_new_writes_in_bytes(
    db: Path,
) -> None:
    """Rows as the releases before the bytes form wrote them (`wbe1:` + base64 in text
    columns, metadata as `{"wbe1": ...}`), made here from the format itself, not by this
    release's code: they read back, and the session's new writes are in the bytes form."""
    key = new_key()
    async with store_for(db, key) as store:
        await store.ensure_session("old", user_id="zoë", title="placeholder")
    kek = base64.b64decode(key)
    conn = sqlite3.connect(keys_path_for(db))
    try:
        key_id, owner, wrapped = conn.execute("SELECT key_id, owner, wrapped FROM keys").fetchone()
    finally:
        conn.close()
    assert owner == "s:zoë"
    data_key = AESGCM(AESGCM(kek).decrypt(wrapped[:12], wrapped[12:], enc._wrap_aad(key_id, owner)))

    def sealed(plain: bytes, field: bytes) -> str:
        nonce = os.urandom(12)
        aad = f"{len(owner)}:{owner}\x00old\x00".encode() + field
        return "wbe1:" + base64.b64encode(key_id + nonce + data_key.encrypt(nonce, plain, aad)).decode()

    meta = orjson.dumps(META).decode()
    tamper(
        db,
        "UPDATE sessions SET title = ?, client_ip = ?, user_agent = ?, message_count = ? WHERE id = 'old'",
        sealed(b"\x01" + TITLE.encode(), b"title"),
        sealed(b"203.0.113.9", b"client_ip"),
        sealed(b"Agent/0.9", b"user_agent"),
        len(CONTENTS),
    )
    for seq, text in enumerate(CONTENTS, 1):
        tamper(
            db,
            "INSERT INTO messages VALUES ('old', ?, ?, 'user', ?, 1000000, 2000000, ?)",
            seq,
            f"m{seq}",
            sealed(text.encode(), b"%d:c" % seq),
            '{"wbe1":"' + sealed(meta.encode(), b"%d:m" % seq)[5:] + '"}' if seq % 2 else None,
        )
    async with store_for(db, key) as store:
        loaded = await store.get_session("old", user_id="zoë")
        assert (loaded.title, loaded.client_ip, loaded.user_agent) == (TITLE, "203.0.113.9", "Agent/0.9")
        assert [m.content for m in loaded.messages] == CONTENTS
        assert [m.metadata for m in loaded.messages] == [META if i % 2 == 0 else None for i in range(5)]
        assert [(h.session_id, h.seq) for h in (await store.search("zoë", "世界")).hits] == [("old", 2)]
        await store.append_message("old", user_id="zoë", role="user", content="new 🆕", metadata={"n": 1})
        await store.update_message("old", "m1", user_id="zoë", content="edited ✏️")
    conn = sqlite3.connect(db)
    try:
        kinds = dict(conn.execute("SELECT seq, typeof(content) FROM messages WHERE session_id = 'old'"))
        title_kind = conn.execute("SELECT typeof(title) FROM sessions WHERE id = 'old'").fetchone()[0]
    finally:
        conn.close()
    # What was written since is in the bytes form; what was not stays as it was.
    assert kinds == {1: "blob", 2: "text", 3: "text", 4: "text", 5: "text", 6: "blob"}
    assert title_kind == "blob"
    async with store_for(db, key) as store:
        mixed = await store.get_session("old", user_id="zoë")
        assert [m.content for m in mixed.messages] == ["edited ✏️", *CONTENTS[1:], "new 🆕"]
        assert mixed.messages[-1].metadata == {"n": 1} and mixed.messages[2].metadata == META
        assert mixed.title == TITLE


# -- search ------------------------------------------------------------------------------------


async def test_search_keeps_working_for_the_keys_owner_and_only_for_them(db: Path) -> None:
    key = new_key()
    async with store_for(db, key) as store:
        await fill(store, "mine", 1)
        await fill(store, "theirs", 2)
        await store.append_message("mine", user_id=1, role="user", content="second 世界 hit, newer")
    # A new store: nothing in memory, so every hit comes from decrypting the disk's rows.
    async with store_for(db, key) as store:
        page = await store.search(1, "世界")
        assert [(h.session_id, h.seq) for h in page.hits] == [("mine", len(CONTENTS) + 1), ("mine", 2)]
        assert page.hits[1].title == f"{TITLE} {MARKER}"
        assert ("世界", True) in page.hits[0].snippet
        newest = await store.search(1, "世界", order="newest", limit=1)
        assert [h.seq for h in newest.hits] == [len(CONTENTS) + 1] and newest.next_offset == 1
        assert [h.seq for h in (await store.search(1, "世界", order="newest", limit=1, offset=1)).hits] == [2]
        assert (await store.search(1, MARKER.lower())).hits  # case-insensitive, on plaintext
        assert (await store.search(1, "wbe1")).hits == ()  # never on the ciphertext
        assert [h.session_id for h in (await store.search(2, "世界")).hits] == ["theirs"]
        await store.delete_user(1)
        assert (await store.search(1, "世界")).hits == ()
    # The file's own search, without the key (a tool beside the app): the BLOBs are
    # ciphertext, never a match and never an error; a plain row written before still is.
    # (`from_config` refuses an encrypted file without its key; a store built by hand does not.)
    plain_config = Config(db_path=db, flush_interval_ms=3_600_000)
    async with WriteBehindStore(SessionStore(), SQLiteBackend(db), config=plain_config) as plain:
        await plain.append_message("theirs", user_id=2, role="user", content="plain 世界 row")
    raw = SQLiteBackend(db, readonly=True)
    await raw.open()
    try:
        found = await raw.search(2, ["世界"], limit=10)
        assert [(r.session_id, r.content) for r in found] == [("theirs", "plain 世界 row")]
        assert await raw.search(2, ["wbe1"], limit=10) == []
    finally:
        await raw.close()


# -- the command line ------------------------------------------------------------------------


def wb(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_SESSION_")}
    return subprocess.run(
        [str(SCRIPT), "--db", str(db), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


async def test_the_command_line_decrypts_erases_keys_and_rotates(db: Path, tmp_path: Path) -> None:
    key = new_key()
    async with store_for(db, key) as store:
        await fill(store, "s1", 1)
        await fill(store, "s2", 2)
    with_key = {"CHAT_SESSION_ENCRYPTION_KEY": key}

    refused = wb(db, "export", "--user", "1")
    assert refused.returncode == 1 and "is encrypted" in refused.stderr and MARKER not in refused.stdout
    exported = wb(db, "export", "--user", "1", env=with_key)
    assert exported.returncode == 0, exported.stderr
    assert orjson.loads(exported.stdout)["sessions"][0]["title"] == f"{TITLE} {MARKER}"
    listed = wb(db, "sessions", "--user", "2", env=with_key)
    assert f"{TITLE} {MARKER}" in listed.stdout

    backup = tmp_path / "b.db"
    assert wb(db, "backup", str(backup)).returncode == 0
    erased = wb(db, "erase", "--user", "1", "--yes", env=with_key)
    assert erased.returncode == 0, erased.stderr

    new = new_key()
    new_file = tmp_path / "new.key"
    new_file.write_text(new)
    rotated = wb(db, "rotate-key", "--new-key-file", str(new_file), env=with_key)
    assert rotated.returncode == 0 and "re-wrapped 1 data key(s)" in rotated.stdout, rotated.stderr
    assert wb(db, "rotate-key", "--new-key-file", str(new_file), env=with_key).returncode == 1  # old key now

    restore_backup(backup, db)
    async with store_for(db, new) as store:
        assert await store.list_sessions(1) == []
        assert (await store.get_session("s2", user_id=2)).title == f"{TITLE} {MARKER}"
    # While an app holds the file, rotation is refused.
    async with store_for(db, new):
        busy = wb(db, "rotate-key", env={"CHAT_SESSION_ENCRYPTION_KEY": new,
                                        "CHAT_SESSION_NEW_ENCRYPTION_KEY": new_key()})  # fmt: skip
        assert busy.returncode == 1 and "in use by a running app" in busy.stderr


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    schema = new_schema()
    try:
        conn = await asyncpg.connect(DSN)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL at {DSN}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
    try:
        yield schema
    finally:
        for s in (schema, enc.keys_schema_for(schema)):
            await conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await conn.close()


def pg_store(schema: str, key: str) -> WriteBehindStore:
    return WriteBehindStore.from_config(
        Config(db_url=DSN, db_schema=schema, encryption_key=key, flush_interval_ms=3_600_000)
    )


async def test_postgres_keeps_keys_in_their_own_schema_and_erasure_reaches_a_restored_dump(
    pg_schema: str,
) -> None:
    key = new_key()
    async with pg_store(pg_schema, key) as store:
        await fill(store, "gone", 1, marker="GONE")
        await fill(store, "kept", "bob", marker="KEPT")
    conn = await asyncpg.connect(DSN)
    try:
        # A "pg_dump -n <schema>" of the data: every row of both tables, as they are stored.
        sessions = await conn.fetch(f"SELECT * FROM {pg_schema}.sessions")
        messages = await conn.fetch(f"SELECT * FROM {pg_schema}.messages")
        dump = repr([dict(r) for r in sessions + messages])
        assert "GONE" not in dump and "KEPT" not in dump and "203.0.113.9" not in dump and "🍜" not in dump
        assert all(r["metadata"] is None or r["metadata"].startswith('{"wbe1":"') for r in messages)
        keys_tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", pg_schema + "_keys"
        )
        assert sorted(r["table_name"] for r in keys_tables) == ["keys", "meta"]

        async with pg_store(pg_schema, key) as store:
            assert [m.content for m in (await store.get_session("gone", user_id=1)).messages] == [
                f"{t} GONE" for t in CONTENTS
            ]
            assert await store.delete_user(1) == 1

        # The keys schema lost: the start is refused, no empty one is made in its place.
        await conn.execute(f"ALTER SCHEMA {pg_schema}_keys RENAME TO {pg_schema}_k")
        try:
            with pytest.raises(ConfigError, match="does not exist, but the database holds encrypted rows"):
                await pg_store(pg_schema, key).start()
            assert await conn.fetchval("SELECT to_regnamespace($1) IS NULL", pg_schema + "_keys")
        finally:
            await conn.execute(f"ALTER SCHEMA {pg_schema}_k RENAME TO {pg_schema}_keys")

        # The restore of the dump taken before the erasure.
        await conn.execute(f"DELETE FROM {pg_schema}.sessions")
        for table, rows in (("sessions", sessions), ("messages", messages)):
            columns = list(rows[0].keys())
            await conn.copy_records_to_table(table, schema_name=pg_schema, columns=columns,
                                             records=[tuple(r.values()) for r in rows])  # fmt: skip
        assert await conn.fetchval(f"SELECT count(*) FROM {pg_schema}.sessions") == 2
    finally:
        await conn.close()

    async with pg_store(pg_schema, key) as store:
        assert await store.list_sessions(1) == []
        assert [r async for r in store.export_user(1)] == []
        with pytest.raises(NotFound):
            await store.get_session("gone", user_id=1)
        kept = await store.get_session("kept", user_id="bob")
        assert kept.title == f"{TITLE} KEPT" and kept.messages[2].content == f"{CONTENTS[2]} KEPT"
        assert kept.messages[0].metadata == {**META, "i": 0}

    with pytest.raises(WrongKeyError):
        await pg_store(pg_schema, new_key()).start()
    new = new_key()
    keys = enc.PostgresKeyStore(DSN, enc.keys_schema_for(pg_schema))
    assert await rotate_kek(keys, base64.b64decode(key), base64.b64decode(new)) == 1
    async with pg_store(pg_schema, new) as store:
        assert (await store.get_session("kept", user_id="bob")).user_agent == "Agent/1.0 KEPT"
    with pytest.raises(WrongKeyError):
        await pg_store(pg_schema, key).start()


async def test_the_command_line_rotates_the_key_of_a_postgres_keys_schema(
    pg_schema: str, tmp_path: Path
) -> None:
    key, new = new_key(), new_key()
    async with pg_store(pg_schema, key) as store:
        await fill(store, "s1", 1)
        await fill(store, "s2", "bob")
    env = {"CHAT_SESSION_DB_URL": DSN, "CHAT_SESSION_DB_SCHEMA": pg_schema,
           "CHAT_SESSION_ENCRYPTION_KEY": key, "CHAT_SESSION_NEW_ENCRYPTION_KEY": new}  # fmt: skip
    no_file = tmp_path / "absent.db"  # PostgreSQL: --db names nothing that needs to exist

    # While an instance runs on the schema, refused, and nothing changed.
    async with pg_store(pg_schema, key) as running:
        busy = wb(no_file, "rotate-key", env=env)
        assert busy.returncode == 1 and "1 app instance(s) are running" in busy.stderr, busy.stderr
        assert (await running.get_session("s1", user_id=1)).title == f"{TITLE} {MARKER}"

    rotated = wb(no_file, "rotate-key", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "re-wrapped 2 data key(s)" in rotated.stdout and f"{pg_schema}_keys" in rotated.stdout
    assert key not in rotated.stdout + rotated.stderr and new not in rotated.stdout + rotated.stderr
    # Again from the old key, which no longer opens the keys schema: a typed refusal.
    again = wb(no_file, "rotate-key", env={**env, "CHAT_SESSION_NEW_ENCRYPTION_KEY": new_key()})
    assert again.returncode == 1 and "does not open the keys schema" in again.stderr, again.stderr
    with pytest.raises(WrongKeyError):
        await pg_store(pg_schema, key).start()
    async with pg_store(pg_schema, new) as store:
        assert (await store.get_session("s2", user_id="bob")).title == f"{TITLE} {MARKER}"
        assert [m.content for m in (await store.get_session("s1", user_id=1)).messages] == [
            f"{t} {MARKER}" for t in CONTENTS
        ]

    # A schema nothing was encrypted in: refused, and no keys schema is made for it.
    other = new_schema()
    nothing = wb(no_file, "rotate-key", env={**env, "CHAT_SESSION_DB_SCHEMA": other})
    assert nothing.returncode == 1 and "does not exist" in nothing.stderr, nothing.stderr
    conn = await asyncpg.connect(DSN)
    try:
        made = await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1", f"{other}%")
    finally:
        await conn.close()
    assert made == 0


async def test_an_encrypted_file_is_refused_without_its_key(tmp_path: Path) -> None:
    """Served without its key, an encrypted file would hand out ciphertext and take new
    messages in the clear: `from_config` refuses it, naming the variable."""
    from writebehind import ConfigError

    db = tmp_path / "chat.db"
    async with WriteBehindStore.from_config(Config(db_path=db, encryption_key=enc.new_kek())) as store:
        await store.ensure_session("s", user_id=1)
    with pytest.raises(ConfigError, match="CHAT_SESSION_ENCRYPTION_KEY"):
        WriteBehindStore.from_config(Config(db_path=db))


async def test_a_seal_that_fails_in_the_writer_thread_writes_nothing_and_the_retry_writes_all(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are sealed inside SQLite's write transaction: a failure there (the cipher
    refusing) rolls the batch back, nothing half-sealed or in the clear reaches the file,
    the data stays in memory, and once sealing works again it all reaches the disk."""
    key = new_key()
    real = enc._seal_rows
    refusing = [True]
    calls = []

    def sealing(*args: Any) -> Any:
        calls.append(1)
        if refusing[0]:
            raise RuntimeError("the cipher refused")
        return real(*args)

    monkeypatch.setattr(enc, "_seal_rows", sealing)
    async with store_for(db, key) as store:
        for sid in ("a", "b"):
            await fill(store, sid, 1)
        with contextlib.suppress(Exception):
            await store.flush()
        assert calls, "the batch was offered to the disk"
        assert store.stats().dirty_sessions == 2
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
        finally:
            conn.close()
        refusing[0] = False
        await store.flush()
        assert store.stats().dirty_sessions == 0
        expected = [m.content for m in (await store.get_session("a", user_id=1)).messages]
    async with store_for(db, key) as store:
        assert [m.content for m in (await store.get_session("a", user_id=1)).messages] == expected
        assert (await store.get_session("b", user_id=1)).title == f"{TITLE} {MARKER}"
    assert MARKER.encode() not in db.read_bytes()


async def test_a_cancelled_flush_of_an_encrypted_batch_still_commits_it_whole(db: Path) -> None:
    """A flush cancelled while its sealed batch is being written: the write transaction
    (sealing included) runs to its end in the writer's thread, or never starts."""
    key = new_key()
    async with store_for(db, key) as store:
        for i in range(30):
            await fill(store, f"s{i}", i % 3)
        task = asyncio.ensure_future(store.flush())
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.flush()
        want = {f"s{i}": [m.content for m in (await store.get_session(f"s{i}", user_id=i % 3)).messages]
                for i in range(30)}  # fmt: skip
    async with store_for(db, key) as store:
        for i in range(30):
            assert [m.content for m in (await store.get_session(f"s{i}", user_id=i % 3)).messages] == want[
                f"s{i}"
            ]


async def test_a_flush_asks_the_keys_file_only_about_users_it_has_not_met_and_an_erasure_forgets(
    db: Path,
) -> None:
    """On SQLite the app alone changes its keys file: a flush looks a user's key up once,
    not at every flush. An erasure forgets it first: what the user writes after it is
    sealed under a new key, readable, and the old key stays destroyed."""
    key = new_key()
    async with store_for(db, key) as store:
        backend = store.backend
        assert isinstance(backend, EncryptedBackend)
        calls: list[set[str]] = []
        real = backend.keys.active

        async def active(owners: Any, *args: Any) -> Any:
            calls.append(set(owners))
            return await real(owners, *args)

        backend.keys.active = active  # type: ignore[method-assign]
        await fill(store, "a", 1)
        await store.flush()
        for i in range(3):
            await store.append_message("a", user_id=1, role="user", content=f"again {i} ✓", durable=True)
        await fill(store, "b", "zoë")
        await store.flush()
        assert len(calls) == 2 and all(len(c) == 1 for c in calls)  # user 1 once, zoë once
        before = {sealed_parts(v)[0] for v in ciphertexts_of(db, 1)}
        assert await store.delete_user(1) == 1
        await fill(store, "after", 1, marker="AFTER")
        await store.flush()
        assert len(calls) == 3
        after = {sealed_parts(v)[0] for v in ciphertexts_of(db, 1)}
        assert len(before) == len(after) == 1 and before != after
    async with store_for(db, key) as store:
        assert (await store.get_session("after", user_id=1)).title == f"{TITLE} AFTER"
        assert (await store.get_session("b", user_id="zoë")).title == f"{TITLE} {MARKER}"
