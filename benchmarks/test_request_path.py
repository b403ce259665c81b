"""Request-path latency: `WriteBehindStore` next to the plain in-memory `SessionStore`.

A round is OPS calls made back to back inside one coroutine (the way a streaming
handler makes them); a call's time is a round's time / OPS. The write-behind store
runs with its worker live on a real SQLite file (1 s interval, the default), so
whatever its flushes take from the event loop shows here too. The two stores run
interleaved round by round (see paired.py); the ratio is time(write-behind) /
time(plain): 1.00 means persistence costs the request nothing.
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

from .paired import run_paired

OPS = 1000
ROUNDS = 60
CONTENT = "x" * 500
_ids = itertools.count()

Store = SessionStore | WriteBehindStore
Round = Callable[[Store], Coroutine[Any, Any, Callable[[], Coroutine[Any, Any, None]]]]


@pytest.fixture
def stores(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> Iterator[tuple[SessionStore, WriteBehindStore]]:
    config = Config(db_path=tmp_path / "bench.db", cache_size=100_000, max_dirty=100_000)
    wb = WriteBehindStore.from_config(config)
    loop.run_until_complete(wb.start())
    yield SessionStore(maxsize=100_000), wb
    loop.run_until_complete(wb.aclose())


def compare(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    stores: tuple[SessionStore, WriteBehindStore],
    make_round: Round,
    target: str = "",
) -> None:
    plain, wb = stores

    def prepare(store: Store) -> Callable[[], Coroutine[Any, Any, None]]:
        return loop.run_until_complete(make_round(store))

    run_paired(
        benchmark,
        loop=loop,
        name="WriteBehindStore",
        baseline_name="SessionStore",
        baseline=lambda: prepare(plain),
        contender=lambda: prepare(wb),
        rounds=ROUNDS,
        per_round=OPS,
        unit="call",
        target=target,
    )


@pytest.mark.benchmark(group=f"append_message x{OPS}")
def test_append_message(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    stores: tuple[SessionStore, WriteBehindStore],
) -> None:
    async def make_round(store: Store) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = (await store.ensure_session(f"s{next(_ids)}", user_id=1)).id

        async def body() -> None:
            for _ in range(OPS):
                await store.append_message(sid, user_id=1, role="user", content=CONTENT)

        return body

    compare(benchmark, loop, stores, make_round, target="<= 1.30x")


@pytest.mark.benchmark(group=f"update_message(append=token) x{OPS}")
def test_stream_tokens(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    stores: tuple[SessionStore, WriteBehindStore],
) -> None:
    async def make_round(store: Store) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = (await store.ensure_session(f"s{next(_ids)}", user_id=1)).id
        mid = (await store.append_message(sid, user_id=1, role="assistant", content="")).id

        async def body() -> None:
            for _ in range(OPS):
                await store.update_message(sid, mid, user_id=1, append=" token")

        return body

    compare(benchmark, loop, stores, make_round)


@pytest.mark.benchmark(group=f"get_messages(after_seq) x{OPS}")
def test_resume_reads(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    stores: tuple[SessionStore, WriteBehindStore],
) -> None:
    async def make_round(store: Store) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = (await store.ensure_session(f"s{next(_ids)}", user_id=1)).id
        for _ in range(50):
            await store.append_message(sid, user_id=1, role="user", content=CONTENT)

        async def body() -> None:
            for _ in range(OPS):
                await store.get_messages(sid, user_id=1, after_seq=45)

        return body

    compare(benchmark, loop, stores, make_round)
