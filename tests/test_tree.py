"""`get_tree`: a session's shape (its summary, where its messages branch, the end of its
active path) without a copy of its messages, on both stores and both engines, with the
ownership rules of `get_messages`; on PostgreSQL a session another instance keeps is read
the way `get_messages` reads it there."""

from __future__ import annotations

import random
from typing import Any

import pytest

from writebehind import (
    NotFound,
    SessionRecord,
    SessionStore,
    SessionTree,
    ValidationError,
    WriteBehindStore,
)
from writebehind.branches import Branches, siblings
from writebehind.store import Entry

from .conftest import Opener
from .pg import new_schema, postgres_schema, store_on

TEXTS = ["héllo 👋🏽", "你好 世界", "שלום עולם", "e\u0301\u0301 combining", "plain"]


def _expected(record: SessionRecord) -> SessionTree:
    """What the tree must say: the whole record, read the expensive way."""
    return SessionTree(
        record.id,
        record.status,
        record.title,
        record.created_at,
        record.updated_at,
        len(record.messages),
        record.branches,
    )


def _no_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any copy of a whole session from here on fails the test."""

    def refuse(self: Entry, with_messages: bool = True) -> Any:
        raise AssertionError(f"session {self.id} was copied whole")

    monkeypatch.setattr(Entry, "snapshot", refuse)


async def _branched(store: SessionStore | WriteBehindStore, sid: str, user: Any, **who: Any) -> None:
    """q1 a1 q2 a2, then an edit of q2 (5, reply 6) and a regenerated reply to it (7)."""
    await store.ensure_session(sid, user_id=user, title="🌳 ветки", **who)
    for i in range(2):
        await store.append_message(sid, user_id=user, role="user", content=TEXTS[i], **who)
        await store.append_message(sid, user_id=user, role="assistant", content=TEXTS[i + 2], **who)
    await store.append_message(sid, user_id=user, role="user", content="q2 編集 ✍️", parent_seq=2, **who)
    await store.append_message(sid, user_id=user, role="assistant", content="a2 again", **who)
    await store.append_message(sid, user_id=user, role="assistant", content="🔁 مرة", parent_seq=5, **who)


async def test_the_plain_store_answers_without_copying_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SessionStore()
    await store.ensure_session("long", user_id=1, title="長い 💬")
    for i in range(2_000):
        await store.append_message("long", user_id=1, role="user", content=TEXTS[i % len(TEXTS)])
    expected = _expected(await store.get_session("long", user_id=1))
    _no_snapshots(monkeypatch)
    tree = await store.get_tree("long", user_id=1)
    assert tree == expected
    assert (tree.message_count, tree.branches, tree.leaf, tree.parent(2_000)) == (2_000, None, 2_000, 1_999)


async def test_the_tree_places_every_message_and_follows_switches(open_store: Opener) -> None:
    store = await open_store()
    await _branched(store, "tree", "alice")
    record = await store.get_session("tree", user_id="alice")
    tree = await store.get_tree("tree", user_id="alice")
    assert tree == _expected(record)
    assert tree.branches == Branches({5: 2, 7: 5})
    assert tree.leaf == record.path[-1].seq == 7
    assert [tree.parent(m.seq) for m in record.path] == [0, 1, 2, 5]
    assert siblings(tree.branches, tree.message_count, (3, 7)) == {3: [3, 5], 7: [6, 7]}
    # Back to the first q2: the leaf moves, nothing else does.
    await store.switch_branch("tree", 3, user_id="alice")
    switched = await store.get_tree("tree", user_id="alice")
    assert switched.leaf == 4 and switched.message_count == 7
    assert switched == _expected(await store.get_session("tree", user_id="alice"))


async def test_the_tree_of_a_cold_session_is_read_from_disk(open_store: Opener) -> None:
    store = await open_store()
    await _branched(store, "cold", "alice")
    expected = _expected(await store.get_session("cold", user_id="alice"))
    await store.aclose()
    again = await open_store()
    assert "cold" not in again.hot.tier
    assert await again.get_tree("cold", user_id="alice") == expected


async def test_another_users_session_looks_missing(open_store: Opener) -> None:
    store = await open_store()
    await _branched(store, "mine", "alice")
    await store.ensure_session("anon", user_id=None, binding_token="tok-🔑")
    with pytest.raises(NotFound) as theirs:
        await store.get_tree("mine", user_id="mallory")
    with pytest.raises(NotFound) as missing:
        await store.get_tree("nowhere", user_id="mallory")
    assert str(theirs.value) == str(missing.value).replace("nowhere", "mine")
    for who in ({"user_id": None}, {"user_id": None, "binding_token": "wrong"}, {"user_id": "alice"}):
        with pytest.raises(NotFound):
            await store.get_tree("anon", **who)
    anon = await store.get_tree("anon", user_id=None, binding_token="tok-🔑")
    assert (anon.message_count, anon.leaf, anon.branches) == (0, 0, None)
    with pytest.raises(ValidationError):
        await store.get_tree("not an id!", user_id="alice")


async def test_the_write_behind_store_answers_without_copying_the_session(
    open_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store()
    await _branched(store, "hot", "alice")
    expected = _expected(await store.get_session("hot", user_id="alice"))
    _no_snapshots(monkeypatch)
    assert await store.get_tree("hot", user_id="alice") == expected


async def test_a_session_another_instance_keeps_is_read_where_it_is() -> None:
    """A reply is being written on A (`hold`): B reads the tree from the database, with every
    write A acknowledged, and leaves the session with A; another user still finds nothing."""
    schema = new_schema()
    async with postgres_schema(schema), store_on(schema) as a, store_on(schema) as b:
        await _branched(a, "kept", "alice")
        async with a.hold("kept"):
            reply = await a.append_message(
                "kept", user_id="alice", role="assistant", content="…", parent_seq=5, metadata={"done": False}
            )
            tree = await b.get_tree("kept", user_id="alice")
            assert tree == _expected(await a.get_session("kept", user_id="alice"))
            assert tree.leaf == reply.seq == 8 and tree.branches == Branches({5: 2, 7: 5, 8: 5})
            assert b.kept_elsewhere("kept") and "kept" in a.hot.tier
            with pytest.raises(NotFound):
                await b.get_tree("kept", user_id="mallory")
        # The hold is over: wherever the session is now, both read the same tree.
        assert await b.get_tree("kept", user_id="alice") == await a.get_tree("kept", user_id="alice")


def test_the_servers_alternatives_match_the_library_s_for_random_trees() -> None:
    """The server's `Family` finds a message's siblings from the branch points alone; it must
    say what `writebehind.branches.siblings` (a walk over every message) says."""
    pytest.importorskip("fastapi")
    from writebehind.server.schemas import Family

    rng = random.Random(20261127)
    for _ in range(300):
        count = rng.randint(0, 40)
        parents = {seq: rng.randint(0, seq - 2) for seq in range(2, count + 1) if rng.random() < 0.2}
        branches = Branches(parents) if parents else None
        seqs = rng.sample(range(1, count + 1), min(count, 8))
        family = Family(branches, count, seqs)
        expected = siblings(branches, count, seqs)
        for seq in seqs:
            assert family.alternatives(seq) == expected.get(seq, [seq]), (parents, seq)
            assert family.parent(seq) == parents.get(seq, seq - 1)
