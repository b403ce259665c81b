"""Live following on PostgreSQL, in one process: a store follows, token by token, a session
another store keeps and writes a reply into (`WriteBehindStore.follow`, `writebehind.live`);
it follows it to its next owner after a handoff, finds it gone after an erasure, and takes
it over when its owner dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from writebehind import Config, NotFound, SessionStore, WriteBehindStore
from writebehind.backends.postgres import PostgresBackend

from ..pg import DSN, new_schema, postgres_schema, store_on

USER = "alice"
TOKENS = ["You said", ": ", "👋🏽", " 你好", " שלום", " e\u0301", " end"]


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    async with postgres_schema(name):
        yield name


class Follower:
    """One stream's reads on `store`, woken by the relay."""

    def __init__(self) -> None:
        self.woken = asyncio.Event()

    def __call__(self, session_id: str) -> None:
        self.woken.set()


async def _wait(follower: Follower, view: object, predicate: object) -> tuple[object, ...]:
    async with asyncio.timeout(15):
        while True:
            follower.woken.clear()
            messages = await view.messages(0)  # type: ignore[attr-defined]
            if predicate(messages):  # type: ignore[operator]
                return tuple(messages)
            try:
                async with asyncio.timeout(1.0):
                    await follower.woken.wait()
            except TimeoutError:
                pass


async def test_a_store_follows_a_reply_another_writes_token_by_token(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        await a.ensure_session("s1", user_id=USER)
        await a.append_message("s1", user_id=USER, role="user", content="hi")
        async with a.hold("s1"):
            reply = await a.append_message(
                "s1", user_id=USER, role="assistant", content="", metadata={"done": False}
            )
            follower = Follower()
            async with b.follow("s1", user_id=USER, on_change=follower) as view:
                first = await view.messages(0)
                assert view.remote and [m.content for m in first] == ["hi", ""]
                text = ""
                for token in TOKENS:
                    text += token
                    await a.update_message("s1", reply.id, user_id=USER, append=token)
                    got = await _wait(follower, view, lambda ms, t=text: ms[-1].content == t)
                    assert got[-1].content == text  # each token, as it is written
                stats_a, stats_b = a.stats(), b.stats()
                assert (stats_a.followers, stats_b.followed_sessions) == (1, 1)
                assert stats_a.live_messages_sent >= len(TOKENS) // 2  # several tokens may share one
                assert stats_b.reads_elsewhere >= 1 and stats_a.instance_id != stats_b.instance_id
                await a.update_message("s1", reply.id, user_id=USER, metadata={"done": True})
                done = await _wait(follower, view, lambda ms: (ms[-1].metadata or {}).get("done") is True)
                assert done == tuple((await a.get_session("s1", user_id=USER)).messages)
                # Another user following it sees nothing.
                async with b.follow("s1", user_id="mallory", on_change=Follower()) as theirs:
                    with pytest.raises(NotFound):
                        await theirs.messages(0)


async def test_a_follower_follows_the_session_to_its_next_owner_and_to_its_erasure(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b, store_on(schema) as c:
        await a.ensure_session("s2", user_id=USER)
        async with a.hold("s2"):
            r1 = await a.append_message(
                "s2", user_id=USER, role="assistant", content="one", metadata={"done": False}
            )
            follower = Follower()
            async with b.follow("s2", user_id=USER, on_change=follower) as view:
                assert [m.content for m in await view.messages(0)] == ["one"]
                await a.update_message("s2", r1.id, user_id=USER, append=" two", metadata={"done": True})
                await _wait(follower, view, lambda ms: ms[-1].content == "one two")
                # C takes the session over (a write there) once A's hold ends, and writes more.
                take = asyncio.create_task(c.append_message("s2", user_id=USER, role="user", content="three"))
                await asyncio.sleep(0.05)
        await take
        async with c.hold("s2"):
            r2 = await c.append_message(
                "s2", user_id=USER, role="assistant", content="", metadata={"done": False}
            )
            async with b.follow("s2", user_id=USER, on_change=follower) as view:
                await c.update_message("s2", r2.id, user_id=USER, append="four 👋🏽")
                got = await _wait(follower, view, lambda ms: len(ms) == 3 and ms[-1].content == "four 👋🏽")
                assert [m.content for m in got] == ["one two", "three", "four 👋🏽"]
                assert view.remote
                await c.delete_session("s2", user_id=USER)
                with pytest.raises(NotFound):
                    await _wait(follower, view, lambda ms: False)


async def test_a_follower_takes_over_within_seconds_when_the_owner_dies(schema: str) -> None:
    async with store_on(schema) as b:
        a = WriteBehindStore(
            SessionStore(),
            PostgresBackend(DSN, schema=schema, pool_size=4),
            config=Config(db_url=DSN, db_schema=schema, flush_interval_ms=3_600_000),
        )
        await a.start()
        await a.ensure_session("s3", user_id=USER)
        hold = a.hold("s3")
        await hold.__aenter__()
        reply = await a.append_message(
            "s3", user_id=USER, role="assistant", content="cut", metadata={"done": False}
        )
        await a.flush()
        follower = Follower()
        async with b.follow("s3", user_id=USER, on_change=follower) as view:
            assert (await view.messages(0))[-1].content == "cut" and view.remote
            await a._abandon()  # as a SIGKILL: its lock goes with its connection
            loop = asyncio.get_running_loop()
            died = loop.time()
            await _wait(follower, view, lambda ms: not view.remote)
            assert loop.time() - died < 2.0 + 0.5
            assert (await view.messages(0))[-1].id == reply.id


async def test_two_followers_of_an_idle_session_leave_it_where_it_is(schema: str) -> None:
    """A follow of a session its owner keeps in memory does not take it: two streams on
    two other instances would otherwise pass it to and fro for as long as they are open."""
    async with store_on(schema) as a, store_on(schema) as b, store_on(schema) as c:
        await a.ensure_session("idle", user_id=USER)
        await a.append_message("idle", user_id=USER, role="user", content="quiet ✓")
        fb, fc = Follower(), Follower()
        async with (
            b.follow("idle", user_id=USER, on_change=fb) as vb,
            c.follow("idle", user_id=USER, on_change=fc) as vc,
        ):
            for _ in range(5):
                assert [m.content for m in await vb.messages(0)] == ["quiet ✓"]
                assert [m.content for m in await vc.messages(0)] == ["quiet ✓"]
                await asyncio.sleep(0.2)
            assert vb.remote and vc.remote
            given = [s._ownership.stats().given for s in (a, b, c)]  # type: ignore[attr-defined]
            assert given == [0, 0, 0], given
            # A write on the owner reaches both.
            await a.append_message("idle", user_id=USER, role="user", content="again")
            await _wait(fb, vb, lambda ms: len(ms) == 2)
            await _wait(fc, vc, lambda ms: len(ms) == 2)


async def test_a_pop_on_the_owner_reaches_its_followers(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        await a.ensure_session("popped", user_id=USER)
        for text in ("one", "two ✓", "three"):
            await a.append_message("popped", user_id=USER, role="user", content=text)
        follower = Follower()
        async with b.follow("popped", user_id=USER, on_change=follower) as view:
            assert len(await view.messages(0)) == 3
            await a.pop_message("popped", user_id=USER)
            got = await _wait(follower, view, lambda ms: len(ms) == 2)
            assert [m.content for m in got] == ["one", "two ✓"]
            await a.append_message("popped", user_id=USER, role="assistant", content="3 again")
            got = await _wait(follower, view, lambda ms: len(ms) == 3)
            assert [m.content for m in got] == ["one", "two ✓", "3 again"]


async def test_a_follower_sees_the_active_path_through_a_regenerate_and_a_switch(schema: str) -> None:
    """Deltas carry messages; a new alternative or a switch on the owner reaches followers
    as a resync, so a follower never shows a mixed path."""
    async with store_on(schema) as a, store_on(schema) as b:
        await a.ensure_session("s3", user_id=USER)
        await a.append_message("s3", user_id=USER, role="user", content="question 你好")
        async with a.hold("s3"):
            first = await a.append_message("s3", user_id=USER, role="assistant", content="answer one 👋🏽")
            follower = Follower()
            async with b.follow("s3", user_id=USER, on_change=follower) as view:
                assert [m.seq for m in await view.messages(0)] == [1, 2]
                again = await a.append_message(
                    "s3", user_id=USER, role="assistant", content="", parent_seq=1, metadata={"done": False}
                )
                await a.update_message("s3", again.id, user_id=USER, append="answer two e\u0301")
                got = await _wait(follower, view, lambda ms: [m.seq for m in ms] == [1, 3] and ms[-1].content)
                assert [m.content for m in got] == ["question 你好", "answer two e\u0301"]
                await a.switch_branch("s3", first.seq, user_id=USER)
                got = await _wait(follower, view, lambda ms: [m.seq for m in ms] == [1, 2])
                assert got[-1].content == "answer one 👋🏽"
                assert [m.seq for m in await view.messages(1)] == [2]
