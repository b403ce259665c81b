"""Reads and writes that a caller's cancellation cannot leave half done.

A load, and each page of an export, is one call in the reader's thread; a write's BEGIN,
COMMIT and ROLLBACK leave the writer outside a transaction whatever the caller's
cancellation. So a client that disconnects in the middle of an export leaves no
transaction open: later cold loads work, and an erasure's truncating checkpoint is not
held back by an old snapshot keeping erased bytes in the -wal file.

Each test cancels at every await point it can reach: run N is cancelled at the N-th time
the operation suspends (exactly what `Task.cancel()` does to a task waiting there), for N
= 1, 2, ... until a run finishes first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any, TypeVar

from writebehind import SessionDelta, SessionRecord, SQLiteBackend, StoredMessage
from writebehind.model import utcnow

from .conftest import StoreFactory
from .test_privacy import raw_bytes

T = TypeVar("T")
MARKER = "ZQX-CANCELLED-EXPORT-5521"
SESSIONS = 120  # more than two pages of an export (50 a page)


class CancelledAt:
    """Awaits `coro`, and cancels the task running it the `n`-th time `coro` suspends."""

    def __init__(self, coro: Coroutine[Any, Any, T], n: int) -> None:
        self._coro = coro
        self._n = n
        self.suspensions = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self._coro.__await__()
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                yielded = inner.send(send) if throw is None else inner.throw(throw)
            except StopIteration as stop:
                return stop.value
            self.suspensions += 1
            if self.suspensions == self._n:
                task = asyncio.current_task()
                assert task is not None
                # The task cancels what it now waits for, then raises CancelledError here.
                task.cancel()
            try:
                send, throw = (yield yielded), None
            except BaseException as exc:
                send, throw = None, exc


async def cancel_at_every_step(
    operation: Callable[[], Coroutine[Any, Any, object]], after_each: Callable[[], Awaitable[None]]
) -> int:
    """Run `operation` once per await point, cancelled there; `after_each` checks the
    aftermath. Returns how many runs were cancelled (at least one: there was a page)."""
    cancelled = 0
    n = 1
    while True:
        step = CancelledAt(operation(), n)

        async def run(step: CancelledAt = step) -> None:
            await step

        task = asyncio.create_task(run())
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
        await after_each()
        if step.suspensions < n:  # finished before its n-th suspension: every point was hit
            assert cancelled == n - 1
            return cancelled
        n += 1


async def seed(make_store: StoreFactory) -> None:
    store = await make_store()
    for i in range(SESSIONS):
        await store.ensure_session(f"s{i:03d}", user_id="victim", title=f"{MARKER} title {i}")
        await store.append_message(f"s{i:03d}", user_id="victim", role="user", content=f"{MARKER} {i}")
    await store.ensure_session("bystander", user_id="other")
    await store.append_message("bystander", user_id="other", role="user", content="keep me")
    await store.aclose()


async def test_an_export_cancelled_anywhere_leaves_cold_loads_working_and_erasure_complete(
    make_store: StoreFactory, db_path: Path
) -> None:
    await seed(make_store)
    store = await make_store()  # a new store: every session is cold
    cold = iter(range(SESSIONS))

    async def export() -> None:
        async for _ in store.export_user("victim"):
            pass

    async def cold_loads_work() -> None:
        i = next(cold)
        loaded = await store.get_session(f"s{i:03d}", user_id="victim")
        assert [m.content for m in loaded.messages] == [f"{MARKER} {i}"]
        record = await store.backend.load_session("bystander")
        assert record is not None and record.user_id == "other"

    assert await cancel_at_every_step(export, cold_loads_work) >= 1
    assert MARKER.encode() in raw_bytes(db_path)
    assert await store.delete_user("victim") == SESSIONS
    # The truncating checkpoint after the erasure was not held back by a reader's snapshot.
    assert MARKER.encode() not in raw_bytes(db_path)
    assert [s.id for s in await store.list_sessions("other")] == ["bystander"]


async def test_backend_export_pages_and_loads_cancelled_anywhere(
    make_store: StoreFactory, db_path: Path
) -> None:
    await seed(make_store)
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:

        async def export() -> None:
            async for _ in backend.iter_user_sessions("victim"):
                pass

        async def load() -> None:
            await backend.load_session("s007")

        async def reads_work() -> None:
            record = await backend.load_session("s001")
            assert record is not None and [m.seq for m in record.messages] == [1]
            assert len(await backend.list_sessions("victim")) == SESSIONS

        assert await cancel_at_every_step(export, reads_work) >= 1
        assert await cancel_at_every_step(load, reads_work) >= 1
        assert len([r async for r in backend.iter_user_sessions("victim")]) == SESSIONS
    finally:
        await backend.close()


async def test_a_consumer_that_stops_between_pages_leaves_nothing_open(
    make_store: StoreFactory, db_path: Path
) -> None:
    await seed(make_store)
    store = await make_store()
    pages = store.export_user_json("victim")
    assert isinstance(pages, AsyncGenerator)  # what a streaming response closes on a disconnect
    chunks = [await anext(pages) for _ in range(60)]  # into the second page
    assert chunks
    await pages.aclose()  # the client went away
    assert await store.delete_user("victim") == SESSIONS
    assert MARKER.encode() not in raw_bytes(db_path)


async def test_a_write_cancelled_anywhere_leaves_the_writer_outside_a_transaction(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open()
    runs = iter(range(1000))
    current = ""

    def batch() -> Coroutine[Any, Any, object]:
        nonlocal current
        current = f"w{next(runs)}"
        now = utcnow()
        messages = tuple(StoredMessage(f"m{k}", k, "user", f"text {k}", now, now) for k in range(1, 4))
        return backend.write_batch([SessionDelta(SessionRecord(current, 7, now, now, now), messages, 3)])

    async def nothing_left_open() -> None:
        # The writer's queue runs in order: once this is answered, whatever the cancelled
        # call had queued has run.
        async with backend.writer.execute("SELECT 1"):
            pass
        assert not backend.writer.in_transaction
        record = await backend.load_session(current)
        assert record is None or [m.seq for m in record.messages] == [1, 2, 3]  # all or nothing

    try:
        assert await cancel_at_every_step(batch, nothing_left_open) >= 1
        assert await cancel_at_every_step(lambda: backend.delete_user(7), nothing_left_open) >= 1
        assert await backend.list_sessions(7) == []
    finally:
        await backend.close()
