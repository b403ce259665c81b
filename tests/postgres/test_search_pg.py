"""Full-text search on the real PostgreSQL: isolation, memory and disk merged, non-ASCII,
query syntax taken as text, paging, deletion and erasure, and the planner's use of the user
filter."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from writebehind import WriteBehindStore
from writebehind.search import SearchPage

from ..pg import DSN, new_schema, postgres_schema, store_on


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    async with postgres_schema(name):  # created (migrated) here, dropped afterwards
        yield name


def found(page: SearchPage) -> list[tuple[str, int]]:
    return [(h.session_id, h.seq) for h in page.hits]


async def chat(store: WriteBehindStore, sid: str, user: int | str, *texts: str) -> None:
    await store.ensure_session(sid, user_id=user, title=f"title of {sid}")
    for text in texts:
        await store.append_message(sid, user_id=user, role="user", content=text)


async def test_isolation_memory_and_disk_non_ascii_and_syntax(schema: str) -> None:
    texts = [
        "the quick brown fox",
        "東京タワーに行きました",
        "party 🎉🎉 tonight",
        "שלום עולם",
        "cafe\u0301 noir",
    ]
    async with store_on(schema) as store:
        await chat(store, "a1", 1, *texts)
        await chat(store, "b1", 2, *texts)
        await chat(store, "c1", "1", *texts)
        await store.flush()
    async with store_on(schema) as store:
        await chat(store, "a2", 1, "quick, and only in memory")
        assert sorted(found(await store.search(1, "QUICK"))) == [("a1", 1), ("a2", 1)]
        for query, seq in (("京タワ", 2), ("東京", 2), ("🎉🎉", 3), ("עולם", 4), ("cafe\u0301", 5)):
            assert found(await store.search(1, query)) == [("a1", seq)], query
            assert found(await store.search("1", query)) == [("c1", seq)], query
        for query in (
            '"',
            "fox*",
            "NEAR(fox)",
            "-fox",
            "body:fox",
            "(fox",
            "%",
            "_",
            "\\",
            "'; DROP TABLE x; --",
        ):
            page = await store.search(2, query)  # never raises
            assert all(h.session_id == "b1" for h in page.hits)
        assert found(await store.search(2, "%")) == []  # a literal %, not a wildcard
        assert found(await store.search(2, "o_n")) == []
        page = await store.search(1, "brown fox")
        assert [t for t, hit in page.hits[0].snippet if hit] == ["brown", "fox"]


async def test_deleted_popped_and_erased_are_not_found(schema: str) -> None:
    async with store_on(schema) as store:
        await chat(store, "gone", 1, "needle one")
        await chat(store, "kept", 1, "needle two", "needle popped")
        await chat(store, "victim", "v", "needle of the victim")
        await store.flush()
        await store.delete_session("gone", user_id=1)
        await store.pop_message("kept", user_id=1)
        assert await store.delete_user("v") == 1
        await store.flush()
    async with store_on(schema) as store:
        assert found(await store.search(1, "needle")) == [("kept", 1)]
        assert found(await store.search("v", "needle")) == []
    conn = await asyncpg.connect(DSN)
    try:
        assert (
            await conn.fetchval(f"SELECT count(*) FROM {schema}.messages WHERE content LIKE '%victim%'") == 0
        )
    finally:
        await conn.close()


async def test_paging_is_stable_and_complete(schema: str) -> None:
    async with store_on(schema) as store:
        for i in range(6):
            await chat(store, f"s{i}", 1, *(f"paging {i}-{k}" + " paging" * (k % 3) for k in range(5)))
        await store.flush()
    async with store_on(schema) as store:
        await chat(store, "hot", 1, "paging in memory")
        for order in ("relevance", "newest"):
            every = found(await store.search(1, "paging", limit=100, order=order))
            assert len(every) == 31 and len(set(every)) == 31
            pages: list[tuple[str, int]] = []
            offset: int | None = 0
            while offset is not None:
                page = await store.search(1, "paging", limit=4, offset=offset, order=order)
                pages += found(page)
                offset = page.next_offset
            assert pages == every
