"""The store's lifecycle at its edges: a backend that fails or hangs while closing, a
cancelled shutdown with nowhere to save, a store dropped without `aclose()`, and the
background sweep of idle anonymous sessions. Real SQLite files; faults are thin subclasses
of the real backend; the dropped store is a real child process."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import pytest

from writebehind import (
    Config,
    NotFound,
    SessionStore,
    SQLiteBackend,
    StorageError,
    WriteBehindStore,
)
from writebehind.recovery import recovery_path_for

from .conftest import QUIET
from .reliability.helpers import on_disk


class BadClose(SQLiteBackend):
    """A real backend that closes its connections and lets go of the file, then fails
    (`fails`) or never returns (`hangs`): a driver bug, a thread stuck in the kernel."""

    def __init__(self, path: Path, how: str) -> None:
        super().__init__(path)
        self.how = how

    async def close(self) -> None:
        await super().close()
        if self.how == "fails":
            raise StorageError("closing the reader failed (made by the test)")
        await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("how", "logged"),
    [
        ("fails", "closing the backend failed: closing the reader failed (made by the test)"),
        ("hangs", "the backend did not close within 1.0s (a hung disk?); abandoned"),
    ],
)
async def test_a_backend_that_fails_or_hangs_while_closing_is_logged_and_aclose_returns(
    db_path: Path, caplog: pytest.LogCaptureFixture, how: str, logged: str
) -> None:
    caplog.set_level(logging.ERROR, logger="writebehind")
    store = WriteBehindStore(SessionStore(), BadClose(db_path, how), config=Config(db_path=db_path, **QUIET))
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="acknowledged")
    await asyncio.wait_for(store.aclose(), 10)  # neither raises nor waits for good
    assert logged in [r.getMessage() for r in caplog.records]
    assert on_disk(db_path) == {"s": {1: "acknowledged"}}  # the final flush came first
    assert not recovery_path_for(db_path).exists()
    again = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET))
    async with again:  # the file was let go of
        assert len((await again.get_session("s", user_id=1)).messages) == 1


class HangingWrites(SQLiteBackend):
    """A disk that stops answering: while `hang` is set, writes never return (until cancelled)."""

    hang = False

    async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
        if self.hang:
            await asyncio.Event().wait()
        return await super().write_batch(deltas, touches)


async def test_a_cancelled_aclose_with_nowhere_to_save_hands_the_records_to_unsaved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL, logger="writebehind")
    db_path = tmp_path / "chat.db"
    config = Config(
        db_path=db_path,
        recovery_path=str(tmp_path / "unmounted" / "chat.recovery"),  # a str is taken as a path
        shutdown_timeout_seconds=30,
        **QUIET,
    )
    assert config.recovery_path == tmp_path / "unmounted" / "chat.recovery"
    backend = HangingWrites(db_path)
    store = WriteBehindStore(SessionStore(), backend, config=config)
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="the last copy")
    backend.hang = True
    closing = asyncio.create_task(store.aclose())
    await asyncio.sleep(0.2)  # the final flush hangs now
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):  # the caller's cancel goes on, not a StorageError
        await closing
    (record,) = store.unsaved()
    assert [m.content for m in record.messages] == ["the last copy"]
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and critical[0].startswith("1 sessions could not be saved")
    assert not (tmp_path / "unmounted").exists()


async def test_a_store_dropped_with_unflushed_sessions_warns_how_to_close_it(db_path: Path) -> None:
    store = WriteBehindStore(SessionStore(), SQLiteBackend(db_path), config=Config(db_path=db_path, **QUIET))
    await store.start()
    await store.ensure_session("s", user_id=1)
    await store.append_message("s", user_id=1, role="user", content="never flushed")
    # The app forgets `await store.aclose()`: its loop tears the store's tasks down and drops it.
    await store.backend.close()
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("writebehind-")]
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    del task, tasks
    with pytest.warns(
        ResourceWarning, match=r"dropped with 1 unflushed sessions; use 'async with' or await aclose\(\)"
    ):
        del store
        gc.collect()
    assert on_disk(db_path) == {}  # what the warning is about: that write was never saved


class Monotonic:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_idle_anonymous_sessions_are_swept_in_the_background_without_any_request(db_path: Path) -> None:
    clock = Monotonic()
    config = Config(db_path=db_path, anon_ttl_seconds=1, **QUIET)  # the sweep runs every 0.5 s
    store = WriteBehindStore(
        SessionStore(anon_ttl_seconds=1, monotonic=clock), SQLiteBackend(db_path), config=config
    )
    async with store:
        anonymous = [(await store.ensure_session(user_id=None)).id for _ in range(1001)]  # > one slice
        await store.ensure_session("signed-in", user_id=1)
        assert store.stats().hot_sessions == 1002
        clock.now += 2  # every anonymous session is idle past its TTL; nobody asks for one
        async with asyncio.timeout(10):
            while store.stats().hot_sessions > 1:
                await asyncio.sleep(0.01)
        assert store.stats().expired == 1001
        with pytest.raises(NotFound):
            await store.get_session(anonymous[0], user_id=None)
        assert (await store.get_session("signed-in", user_id=1)).id == "signed-in"
