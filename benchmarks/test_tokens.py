"""Tokens into one growing message: the cost of the 9,001st to 10,000th token next to the
1st to 1,000th.

A streamed reply is one `update_message(append=token)` per token. Each token's cost must
not grow with the reply: the store keeps a running size for the limit check and appends
without copying the text before it. A round of the baseline appends TOKENS tokens to a
fresh empty message; a round of the contender appends TOKENS more to a message already
holding 9 x TOKENS (added untimed, through the same API). Both on a write-behind store
on SQLite with its worker live, interleaved round by round (paired.py); the ratio is
time(late tokens) / time(early tokens): 1.00 is flat.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

from writebehind import Config, WriteBehindStore

from .paired import run_paired

TOKENS = 1000
BEFORE = 9 * TOKENS
ROUNDS = 30
TOKEN = " tokén"  # 7 UTF-8 bytes: a 10,000-token reply is 70 KB
USER = 3
_ids = itertools.count()


def test_tokens_flat(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    benchmark.group = f"update_message(append=token), tokens {BEFORE + 1:,}-{BEFORE + TOKENS:,} of a reply"
    store = WriteBehindStore.from_config(
        Config(db_path=tmp_path / "tokens.db", cache_size=100_000, max_dirty=100_000)
    )
    loop.run_until_complete(store.start())

    async def reply(tokens_before: int) -> tuple[str, str]:
        sid = (await store.ensure_session(f"t{next(_ids)}", user_id=USER)).id
        mid = (await store.append_message(sid, user_id=USER, role="assistant", content="")).id
        for _ in range(tokens_before):
            await store.update_message(sid, mid, user_id=USER, append=TOKEN)
        return sid, mid

    def prepare(tokens_before: int) -> Callable[[], Coroutine[Any, Any, None]]:
        sid, mid = loop.run_until_complete(reply(tokens_before))

        async def body() -> None:
            for _ in range(TOKENS):
                await store.update_message(sid, mid, user_id=USER, append=TOKEN)

        return body

    try:
        run_paired(
            benchmark,
            loop=loop,
            name=f"tokens {BEFORE + 1:,}-{BEFORE + TOKENS:,}",
            baseline_name=f"tokens 1-{TOKENS:,}",
            baseline=lambda: prepare(0),
            contender=lambda: prepare(BEFORE),
            rounds=ROUNDS,
            per_round=TOKENS,
            unit="token",
            target="flat: <= 1.10x",
        )
        last = loop.run_until_complete(reply(BEFORE + TOKENS))
        messages = loop.run_until_complete(store.get_messages(last[0], user_id=USER))
    finally:
        loop.run_until_complete(store.aclose())
    assert messages[0].content == TOKEN * (BEFORE + TOKENS)
