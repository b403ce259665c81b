"""What encryption at rest costs: the flush, and (nothing, it should be) the request path.

Flush: two stores, one encrypting (`CHAT_SESSION_ENCRYPTION_KEY`) and one not, each on its
own file, get the same round of 100 sessions x 50 new messages through the public API,
untimed; then the plain store's flush runs (the baseline, timed in the setup) and the
encrypting store's (timed). Both start from a checkpointed WAL. The encrypting side pays
AES-GCM for every content, metadata and title, and one keys-store lookup a batch. Target:
>= 70% of the plain flush's throughput. Two rounds:

- `uniform`: the round of `benchmarks/test_flush.py`, every message ~500 ASCII bytes and no
  metadata: the worst case for encryption. Its plain rows take SQLite's fastest path
  (ASCII text binds with no conversion), and their size sits at a page boundary: a
  ~575-byte row fits 7 to a 4 KB page, a sealed one (37 bytes more) 6, so SQLite writes
  ~17% more pages for 6% more bytes.
- `chat`: a conversation's shape: questions of ~80 characters and answers of ~900 (log-normal,
  up to 2,000 and 8,000), words of several scripts and emoji, and the reference server's
  metadata on every answer.

On SQLite a value is stored as raw bytes (a BLOB: version byte, key id, nonce, ciphertext,
tag), sealed in the writer's thread as the rows are made (`_seal_rows`): what encryption
adds is AES-GCM's call (~0.65 us a value here, most of it the call, not the cipher) and
~0.5 us of Python a message. Search does not read the rows' bytes: it decrypts and scans the
user's own sessions (`EncryptedBackend.search`), there is no index to maintain.

The same on PostgreSQL (two schemas of one server), whose `text` and `json` columns take the
text form (`wbe1:` + base64, a third more bytes), and where a flush costs more per message so
encryption's share is smaller.

Request path: `append_message` on the encrypting store next to the plain write-behind
store, both with their worker live (1 s interval), so the encrypting flushes' share of the
event loop shows. Target: unchanged (encryption happens only in the flush, in a thread).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, SQLiteBackend, StorageError, WriteBehindStore
from writebehind.encryption import EncryptedBackend, keys_schema_for

from .paired import run_paired
from .test_flush import MESSAGES, PER_SESSION, ROUNDS, SESSIONS, Round, fill, new_round

DSN = "postgresql://postgres@127.0.0.1:5432/test"
OPS = 1000
APPEND_ROUNDS = 60
CONTENT = "x" * 500
_ids = itertools.count()


_WORDS = ("the", "session", "store", "writes", "behind", "naïve", "café", "你好", "世界", "שלום",
          "مرحبا", "🙂", "e\u0301", "flush", "a", "of", "😀👍🏽")  # fmt: skip
_chat_rounds = itertools.count()


@dataclass(frozen=True)
class ChatRound:
    sessions: list[tuple[str, int]]
    # session id, seq, message id, role, content, metadata
    messages: list[tuple[str, int, str, str, str, dict[str, Any] | None]]


def _words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def new_chat_round() -> ChatRound:
    """100 conversations of 50 messages: questions (~80 characters), answers (~900), both
    log-normal, in several scripts; each answer with the metadata the chat server keeps."""
    r = next(_chat_rounds)
    rng = random.Random(r)
    sessions = [(f"c{r}-s{s}", s % 10) for s in range(SESSIONS)]
    messages = []
    for sid, _ in sessions:
        for seq in range(1, PER_SESSION + 1):
            mid = os.urandom(16).hex()
            if seq % 2:
                content = _words(rng, int(min(2_000, rng.lognormvariate(4.4, 0.9))))
                messages.append((sid, seq, mid, "user", content, None))
            else:
                content = _words(rng, int(min(8_000, rng.lognormvariate(6.8, 0.7))))
                messages.append((sid, seq, mid, "assistant", content, {"done": True}))
    return ChatRound(sessions, messages)


async def fill_chat(store: WriteBehindStore, data: ChatRound) -> None:
    for sid, user in data.sessions:
        await store.ensure_session(sid, user_id=user, title=f"chat {sid} ✓")
    users = dict(data.sessions)
    for sid, _seq, mid, role, content, metadata in data.messages:
        await store.append_message(
            sid, user_id=users[sid], role=role, content=content, message_id=mid, metadata=metadata
        )


def _sqlite(store: WriteBehindStore) -> SQLiteBackend:
    backend = store.backend
    if isinstance(backend, EncryptedBackend):
        backend = backend.inner
    assert isinstance(backend, SQLiteBackend)
    return backend


@pytest.fixture(params=["sqlite", "postgres"])
def pair(
    request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> Iterator[tuple[WriteBehindStore, WriteBehindStore]]:
    """(plain, encrypting) write-behind stores, on files (or PostgreSQL schemas) of their own."""
    key = base64.b64encode(os.urandom(32)).decode()
    schemas = [f"wb_bench_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    stores = []
    for (name, secret), schema in zip((("plain.db", None), ("encrypted.db", key)), schemas, strict=True):
        config = Config(
            db_path=tmp_path / name,
            db_url=DSN if request.param == "postgres" else None,
            db_schema=schema,
            encryption_key=secret,
            flush_interval_ms=3_600_000,
            flush_batch=1000,
            cache_size=1_000_000,
            max_dirty=1_000_000,
            max_flushes_per_second=10_000,
        )
        store = WriteBehindStore.from_config(config)
        try:
            loop.run_until_complete(store.start())
        except StorageError as exc:
            pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
        stores.append(store)
    assert isinstance(stores[1].backend, EncryptedBackend)
    yield stores[0], stores[1]
    for store in stores:
        loop.run_until_complete(store.aclose())
    if request.param == "postgres":
        loop.run_until_complete(_drop([*schemas, keys_schema_for(schemas[1])]))


async def _drop(schemas: list[str]) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


# Two stores filled through the API each round: minutes on a busy shared VM.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("shape", ["uniform", "chat"])
def test_flush_encrypted(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    pair: tuple[WriteBehindStore, WriteBehindStore],
    shape: str,
) -> None:
    plain, encrypted = pair
    engine = "PostgreSQL" if plain.config.db_url else "SQLite"
    benchmark.group = f"flush {MESSAGES} messages, encrypted ({engine}, {shape} round)"
    current: list[Round | ChatRound] = []

    def ready(store: WriteBehindStore) -> Callable[[], Coroutine[Any, Any, None]]:
        data = current[0]
        loop.run_until_complete(fill(store, data) if isinstance(data, Round) else fill_chat(store, data))
        if store.config.db_url is None:
            loop.run_until_complete(_sqlite(store).writer.execute_fetchall("PRAGMA wal_checkpoint(TRUNCATE)"))
        return store.flush

    def baseline() -> Callable[[], Coroutine[Any, Any, None]]:
        current[:] = [new_round() if shape == "uniform" else new_chat_round()]
        return ready(plain)

    run_paired(
        benchmark,
        loop=loop,
        name="flush(), encrypted",
        baseline_name="flush(), not encrypted",
        baseline=baseline,
        contender=lambda: ready(encrypted),
        rounds=ROUNDS,
        per_round=MESSAGES,
        unit="message",
        target="throughput >= 70% of the unencrypted flush",
    )
    for store in pair:
        stats = store.stats()
        assert stats.dirty_sessions == 0 and stats.messages_flushed == MESSAGES * (ROUNDS + 2)


@pytest.mark.timeout(600)
@pytest.mark.benchmark(group=f"append_message x{OPS}, encrypted store")
def test_append_message_encrypted(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    tmp_path: Path,
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    stores = []
    for name, secret in (("plain.db", None), ("encrypted.db", key)):
        # The defaults' worker (1 s interval), as an app runs it.
        config = Config(db_path=tmp_path / name, encryption_key=secret, cache_size=100_000, max_dirty=100_000)
        store = WriteBehindStore.from_config(config)
        loop.run_until_complete(store.start())
        stores.append(store)
    plain, encrypted = stores

    def prepare(store: WriteBehindStore) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = loop.run_until_complete(store.ensure_session(f"s{next(_ids)}", user_id=1)).id

        async def body() -> None:
            for _ in range(OPS):
                await store.append_message(sid, user_id=1, role="user", content=CONTENT)

        return body

    try:
        run_paired(
            benchmark,
            loop=loop,
            name="append_message, encrypting store",
            baseline_name="append_message, plain write-behind store",
            baseline=lambda: prepare(plain),
            contender=lambda: prepare(encrypted),
            rounds=APPEND_ROUNDS,
            per_round=OPS,
            unit="call",
            target="unchanged (~1.00x)",
        )
    finally:
        for store in stores:
            loop.run_until_complete(store.aclose())
