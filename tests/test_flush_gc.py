"""What a flush leaves behind in memory: a committed batch's snapshots do not outlive it
(a cancelled write keeps its batch and loses nothing), and the marks it took, reused,
carry nothing over to the next session that becomes dirty. See benchmarks/test_sse_load.py
for why it matters (a streaming server's cyclic GC)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from writebehind import SQLiteBackend, WriteBehindStore
from writebehind.backends.base import BatchResult, SessionDelta

from .conftest import StoreFactory

TEXTS = (
    "emoji \U0001f680\U0001f469\u200d\U0001f4bb",
    "CJK \u4f60\u597d\u4e16\u754c",
    "RTL \u05e9\u05dc\u05d5\u05dd",
    "e\u0301\u0323",
)


def disk_messages(db_path: Path, sid: str) -> list[tuple[int, str]]:
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute(
            "SELECT seq, content FROM messages WHERE session_id = ? ORDER BY seq", (sid,)
        ).fetchall()


def live_deltas() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, SessionDelta))


async def stream(store: WriteBehindStore, sid: str, tokens: Sequence[str]) -> None:
    reply = await store.append_message(sid, user_id=1, role="assistant", content="")
    for token in tokens:
        await store.update_message(sid, reply.id, user_id=1, append=token)


async def test_a_committed_batch_is_not_kept_alive_by_the_backends_thread(make_store: StoreFactory) -> None:
    # aiosqlite's thread holds its last job (the write, and through it the deltas) until
    # its next one: the flush lets go of them itself.
    store = await make_store()
    for i in range(50):
        await store.ensure_session(f"s{i}", user_id=1)
        await stream(store, f"s{i}", TEXTS)
    await store.flush()
    assert live_deltas() == 0
    # Again with edits only (each delta holds the message's previous version).
    for i in range(50):
        await store.update_message(
            f"s{i}", (await store.get_messages(f"s{i}", user_id=1))[0].id, user_id=1, append="!"
        )
    await store.flush()
    assert live_deltas() == 0


async def test_reused_marks_carry_nothing_over(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await store.ensure_session("popped", user_id=1)
    await store.ensure_session("other", user_id=1)
    for text in TEXTS:
        await store.append_message("popped", user_id=1, role="user", content=text)
        await store.append_message("other", user_id=1, role="user", content=text)
    await store.flush()
    # The popped session's marks hold a truncation (and, claimed, a full rewrite); once
    # committed they are cleared and reused by the next session written.
    await store.pop_message("popped", user_id=1)
    await store.pop_message("popped", user_id=1)
    await store.flush()
    assert [seq for seq, _ in disk_messages(db_path, "popped")] == [1, 2]
    await store.append_message(
        "other", user_id=1, role="assistant", content="\u0645\u0631\u062d\u0628\u0627 \U0001f44b"
    )
    await store.flush()
    # A stale truncation would have deleted "other"'s messages above 2 on disk.
    assert disk_messages(db_path, "other") == [
        (i + 1, text) for i, text in enumerate((*TEXTS, "\u0645\u0631\u062d\u0628\u0627 \U0001f44b"))
    ]
    assert [seq for seq, _ in disk_messages(db_path, "popped")] == [1, 2]


class HeldBackend(SQLiteBackend):
    """Writes wait at `gate`; keeps the list each write was given."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()
        self.given: list[list[SessionDelta]] = []

    async def write_batch(self, deltas: Sequence[SessionDelta], touches: Sequence[Any] = ()) -> BatchResult:
        self.given.append(deltas)  # type: ignore[arg-type]  # the worker's own list
        self.writing.set()
        await asyncio.wait_for(self.gate.wait(), 30)
        return await super().write_batch(deltas, touches)


async def test_a_write_cancelled_in_flight_keeps_its_batch_and_loses_nothing(
    make_store: StoreFactory, db_path: Path
) -> None:
    backend = HeldBackend(db_path)
    store = await make_store(backend)
    for i in range(5):
        await store.ensure_session(f"s{i}", user_id=1)
        await stream(store, f"s{i}", TEXTS)
    flushing = asyncio.create_task(store.flush())
    await backend.writing.wait()
    worker = store._worker._task
    assert worker is not None
    worker.cancel()  # the write is in flight: its batch goes back to the dirty index
    await asyncio.wait([worker])
    assert len(backend.given[0]) == 5  # not emptied: a cancelled write may still be running
    await asyncio.gather(flushing, return_exceptions=True)
    backend.gate.set()
    await store.append_message("s0", user_id=1, role="user", content="after \U0001f680")  # revives the worker
    await store.flush()
    for i in range(5):
        expected = ["".join(TEXTS)] + (["after \U0001f680"] if i == 0 else [])
        assert [content for _, content in disk_messages(db_path, f"s{i}")] == expected
    # The test's own holds on them: the list, and the tasks' tracebacks (their frames).
    backend.given.clear()
    del worker, flushing
    assert live_deltas() == 0
