"""Cross-instance follow: a stream on instance B follows a reply instance A writes, next to
a stream on A itself.

Two app instances on one PostgreSQL schema, in this process. A holds a session and writes
a reply into it, a token every TOKEN_GAP_S. The baseline follows it on A (woken at each
write, as the server's broker does); the contender follows it on B through
`WriteBehindStore.follow` (each change sent by NOTIFY, applied to B's replica). Each
round times one reply on each side, interleaved (paired.py). The figure that matters is
the inter-token latency a client sees, p50 and p99 over every round, B against A (target:
p99 <= 1.5x).

Needs the PostgreSQL server on 127.0.0.1:5432 (database `test`); skipped without it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, SessionStore, StorageError, WriteBehindStore
from writebehind.backends.postgres import PostgresBackend

from .paired import run_paired

DSN = "postgresql://postgres@127.0.0.1:5432/test"
TOKENS = 60
TOKEN_GAP_S = 0.005
ROUNDS = 12
WARMUP = 2
USER = 7
_rounds = itertools.count()


def _store(schema: str) -> WriteBehindStore:
    config = Config(db_url=DSN, db_schema=schema, flush_interval_ms=200)
    return WriteBehindStore(SessionStore(), PostgresBackend(DSN, schema=schema, pool_size=4), config=config)


@pytest.fixture
def pair(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[WriteBehindStore, WriteBehindStore]]:
    schema = f"wb_bench_{uuid.uuid4().hex[:12]}"
    a, b = _store(schema), _store(schema)
    try:
        loop.run_until_complete(a.start())
    except StorageError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
    loop.run_until_complete(b.start())
    yield a, b
    loop.run_until_complete(b.aclose())
    loop.run_until_complete(a.aclose())
    backend = a.backend
    assert isinstance(backend, PostgresBackend)
    loop.run_until_complete(backend.open())
    loop.run_until_complete(backend.drop_schema())
    loop.run_until_complete(backend.close())


def _gaps(arrivals: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def test_cross_instance_follow(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    pair: tuple[WriteBehindStore, WriteBehindStore],
) -> None:
    benchmark.group = f"follow a reply of {TOKENS} tokens: on another instance vs on its own"
    a, b = pair
    local: list[float] = []
    remote: list[float] = []

    def reply(
        follower_store: WriteBehindStore | None, into: list[float]
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        sid = f"follow-{next(_rounds)}"

        async def body() -> None:
            await a.ensure_session(sid, user_id=USER)
            woken = asyncio.Event()
            arrivals: list[float] = []

            def wake(_sid: str) -> None:
                woken.set()

            async with a.hold(sid):
                message = await a.append_message(
                    sid, user_id=USER, role="assistant", content="", metadata={"done": False}
                )
                store = follower_store or a
                async with store.follow(sid, user_id=USER, on_change=wake) as view:
                    await view.messages(0)

                    async def produce() -> None:
                        for i in range(TOKENS):
                            await asyncio.sleep(TOKEN_GAP_S)
                            await a.update_message(sid, message.id, user_id=USER, append=f" token{i} 👋🏽")
                            if follower_store is None:
                                wake(sid)  # the server's broker, on the instance that writes

                    producer = asyncio.create_task(produce())
                    seen = 0
                    while seen < TOKENS:
                        woken.clear()
                        messages = await view.messages(0)
                        count = messages[-1].content.count("token")
                        if count > seen:
                            arrivals.append(time.perf_counter())
                            seen = count
                            continue
                        await woken.wait()
                    await producer
            into.extend(_gaps(arrivals))

        return body

    run_paired(
        benchmark,
        loop=loop,
        name="follow on another instance (NOTIFY)",
        baseline_name="follow on the writing instance",
        baseline=lambda: reply(None, local),
        contender=lambda: reply(b, remote),
        rounds=ROUNDS,
        per_round=TOKENS,
        unit="token",
        target="inter-token p99 <= 1.5x",
    )

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    ratio = ms(remote, 0.99) / ms(local, 0.99)
    figures = (
        f"inter-token p50 {ms(remote, 0.5):.2f} vs {ms(local, 0.5):.2f} ms, "
        f"p99 {ms(remote, 0.99):.2f} vs {ms(local, 0.99):.2f} ms: p99 ratio {ratio:.2f}"
    )
    benchmark.extra_info.update(target=f"target p99 <= 1.5x: {figures}", follow_p99_ratio=ratio)
    print(f"\n{figures}")
