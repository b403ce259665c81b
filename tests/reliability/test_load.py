"""Concurrency load: many sessions streamed by many concurrent tasks through a small hot
tier with a short flush interval. The reopened database must equal the model, and memory
must stay bounded as the number of sessions grows (dirty sessions are pinned only until
their flush, clean ones are evicted)."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from pathlib import Path

from writebehind import Config, WriteBehindStore

from .helpers import assert_prefixes, integrity, on_disk

SOAK = bool(os.environ.get("WRITEBEHIND_SOAK"))
TOKENS = 200
TASKS = 100


def reply(sid: str) -> str:
    return "".join(f"{sid}-t{i} " for i in range(TOKENS))


async def stream_sessions(db_path: Path, sessions: int) -> int:
    """Stream `sessions` conversations from TASKS tasks; returns tracemalloc's peak (bytes)."""
    config = Config(db_path=db_path, flush_interval_ms=50, cache_size=64, max_dirty=5_000)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(sessions):
        queue.put_nowait(n)
    tracemalloc.start()
    tracemalloc.reset_peak()
    async with WriteBehindStore.from_config(config) as store:

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                user = n % 37
                sid = f"load-{n}"
                await store.ensure_session(sid, user_id=user)
                await store.append_message(sid, user_id=user, role="user", content=f"question {n}")
                message = await store.append_message(sid, user_id=user, role="assistant", content="")
                for i in range(TOKENS):
                    await store.update_message(sid, message.id, user_id=user, append=f"{sid}-t{i} ")
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # interleave, as concurrent streams do

        await asyncio.gather(*(worker() for _ in range(TASKS)))
        stats = store.stats()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stats.hot_sessions <= config.cache_size + stats.dirty_sessions + TASKS
    return peak


async def test_many_concurrent_streams_land_exactly_and_memory_stays_bounded(tmp_path: Path) -> None:
    small, large = (250, 1000) if not SOAK else (1000, 5000)
    peaks = {}
    for sessions in (small, large):
        db_path = tmp_path / f"load-{sessions}.db"
        peaks[sessions] = await stream_sessions(db_path, sessions)
        disk = on_disk(db_path)
        assert len(disk) == sessions
        for n in range(sessions):
            sid = f"load-{n}"
            assert disk[sid] == {1: f"question {n}", 2: reply(sid)}
        assert integrity(db_path) == "ok"
        assert_prefixes(db_path)
    print(
        f"\ntracemalloc peak: {peaks[small] / 1e6:.1f} MB for {small} sessions, "
        f"{peaks[large] / 1e6:.1f} MB for {large}"
    )
    # 4x the sessions may not cost anything like 4x the memory: only the hot tier, the
    # dirty sessions and one batch in flight are ever held.
    assert peaks[large] < 1.6 * peaks[small], peaks
