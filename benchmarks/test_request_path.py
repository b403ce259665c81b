"""Request-path latency: `WriteBehindStore` next to the plain in-memory `SessionStore`, same run.

A round is OPS calls made back to back inside one coroutine (the way a streaming
handler makes them); divide a round's time by OPS for the per-call figure. The
write-behind store runs with its worker live on a real SQLite file (1 s interval),
so whatever the flushes take from the event loop shows here too.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, SessionStore, WriteBehindStore

OPS = 1000
CONTENT = "x" * 500
_ids = itertools.count()

Store = SessionStore | WriteBehindStore


@pytest.fixture(params=["SessionStore", "WriteBehindStore"])
def store(request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[Store]:
    if request.param == "SessionStore":
        yield SessionStore(maxsize=100_000)
        return
    config = Config(db_path=tmp_path / "bench.db", cache_size=100_000, max_dirty=100_000)
    wb = WriteBehindStore.from_config(config)
    loop.run_until_complete(wb.start())
    yield wb
    loop.run_until_complete(wb.aclose())


def run_rounds(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    setup: Callable[[], Coroutine[Any, Any, Any]],
    body: Callable[[Any], Coroutine[Any, Any, None]],
) -> None:
    def prepare() -> tuple[tuple[Any], dict[str, Any]]:
        return (loop.run_until_complete(setup()),), {}

    benchmark.pedantic(
        lambda state: loop.run_until_complete(body(state)), setup=prepare, rounds=60, warmup_rounds=3
    )


@pytest.mark.benchmark(group=f"append_message x{OPS}")
def test_append_message(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    async def setup() -> str:
        session = await store.ensure_session(f"s{next(_ids)}", user_id=1)
        return session.id

    async def body(sid: str) -> None:
        for _ in range(OPS):
            await store.append_message(sid, user_id=1, role="user", content=CONTENT)

    run_rounds(benchmark, loop, setup, body)


@pytest.mark.benchmark(group=f"update_message(append=token) x{OPS}")
def test_stream_tokens(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    async def setup() -> tuple[str, str]:
        session = await store.ensure_session(f"s{next(_ids)}", user_id=1)
        message = await store.append_message(session.id, user_id=1, role="assistant", content="")
        return session.id, message.id

    async def body(ids: tuple[str, str]) -> None:
        sid, mid = ids
        for _ in range(OPS):
            await store.update_message(sid, mid, user_id=1, append=" token")

    run_rounds(benchmark, loop, setup, body)


@pytest.mark.benchmark(group=f"get_messages(after_seq) x{OPS}")
def test_resume_reads(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, store: Store) -> None:
    async def setup() -> str:
        session = await store.ensure_session(f"s{next(_ids)}", user_id=1)
        for _ in range(50):
            await store.append_message(session.id, user_id=1, role="user", content=CONTENT)
        return session.id

    async def body(sid: str) -> None:
        for _ in range(OPS):
            await store.get_messages(sid, user_id=1, after_seq=45)

    run_rounds(benchmark, loop, setup, body)
