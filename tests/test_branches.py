"""Edit and regenerate as branches: a message may have siblings, a session has an active
path, `get_messages` returns it, a switch writes one row, nothing is copied. Round trips
through a restart, a recovery file and an export; pops, erasure, bad input; real SQLite
files and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writebehind import Config, SessionStore, SQLiteBackend, StorageError, ValidationError, WriteBehindStore
from writebehind.branches import Branches
from writebehind.model import decode_record, encode_record

from .conftest import QUIET, Opener, StoreFactory

U = 7
TEXTS = ["héllo 👋🏽", "你好世界", "مرحبا بالعالم", "e\u0301\u0301 combining", "plain"]


def seqs(messages: Any) -> list[int]:
    return [m.seq for m in messages]


async def conversation(store: Any, sid: str = "s1") -> None:
    """user 1, assistant 2, user 3, assistant 4."""
    await store.ensure_session(sid, user_id=U)
    for i in range(4):
        await store.append_message(
            sid, user_id=U, role="user" if i % 2 == 0 else "assistant", content=TEXTS[i]
        )


async def test_regenerate_and_edit_are_alternatives_of_one_tree(open_store: Opener) -> None:
    store = await open_store()
    await conversation(store)
    # Regenerate the last reply: a sibling of 4, after question 3.
    regen = await store.append_message("s1", user_id=U, role="assistant", content="again 🌏", parent_seq=3)
    assert regen.seq == 5
    assert seqs(await store.get_messages("s1", user_id=U)) == [1, 2, 3, 5]
    # Edit question 3: a sibling of it (parent 2), then its reply follows the new question.
    edit = await store.append_message("s1", user_id=U, role="user", content="edited 编辑", parent_seq=2)
    reply = await store.append_message("s1", user_id=U, role="assistant", content="reply ✓")
    assert (edit.seq, reply.seq) == (6, 7)
    assert seqs(await store.get_messages("s1", user_id=U)) == [1, 2, 6, 7]
    record = await store.get_session("s1", user_id=U)
    assert seqs(record.messages) == [1, 2, 3, 4, 5, 6, 7]  # every branch, stored once
    assert seqs(record.path) == [1, 2, 6, 7]
    assert record.alternatives(6) == (3, 6)
    assert record.alternatives(4) == (4, 5)
    assert record.alternatives(1) == (1,)
    # Back to the first question: its most recent continuation (the regenerated reply).
    assert seqs(await store.switch_branch("s1", 3, user_id=U)) == [1, 2, 3, 5]
    assert seqs(await store.switch_branch("s1", 4, user_id=U)) == [1, 2, 3, 4]
    # A window along the path: seqs are positions on it.
    assert seqs(await store.get_messages("s1", user_id=U, after_seq=2)) == [3, 4]
    assert seqs(await store.get_messages("s1", user_id=U, after_seq=0, limit=3)) == [1, 2, 3]
    # An append follows the active path's end, wherever it is.
    more = await store.append_message("s1", user_id=U, role="user", content="and then?")
    assert seqs(await store.get_messages("s1", user_id=U)) == [1, 2, 3, 4, more.seq]

    final = await store.get_session("s1", user_id=U)
    await store.aclose()
    again = await open_store()
    assert seqs(await again.get_messages("s1", user_id=U)) == [1, 2, 3, 4, 8]
    back = await again.get_session("s1", user_id=U)
    assert back.branches == final.branches == Branches({5: 3, 6: 2, 8: 4})
    assert back.messages == final.messages
    assert back.alternatives(6) == (3, 6)
    assert seqs(await again.switch_branch("s1", 6, user_id=U)) == [1, 2, 6, 7]
    await again.aclose()
    third = await open_store()
    assert seqs(await third.get_messages("s1", user_id=U)) == [1, 2, 6, 7]


async def test_a_switch_writes_the_session_row_only(make_store: StoreFactory, db_path: Path) -> None:
    db = db_path
    store = await make_store()
    await conversation(store)
    await store.append_message("s1", user_id=U, role="assistant", content="other", parent_seq=3)
    await store.flush()

    def rows() -> tuple[list[Any], Any]:
        with closing(sqlite3.connect(db)) as conn:
            messages = conn.execute("SELECT seq, content, updated_at FROM messages ORDER BY seq").fetchall()
            session = conn.execute("SELECT branches, version FROM sessions").fetchone()
        return messages, session

    messages_before, (branches_before, version_before) = rows()
    assert orjson.loads(branches_before) == {"active": None, "parents": [[5, 3]]}
    await store.switch_branch("s1", 4, user_id=U)
    await store.flush()
    messages_after, (branches_after, version_after) = rows()
    assert messages_after == messages_before  # nothing copied, nothing rewritten
    assert orjson.loads(branches_after) == {"active": 4, "parents": [[5, 3]]}
    assert version_after == version_before + 1
    await store.aclose()


async def test_a_session_that_never_branched_has_no_branches(open_store: Opener) -> None:
    store = await open_store()
    await conversation(store)
    assert (await store.get_session("s1", user_id=U)).branches is None
    # Switching to a message of a single line is allowed and changes nothing.
    assert seqs(await store.switch_branch("s1", 2, user_id=U)) == [1, 2, 3, 4]
    # An explicit parent equal to the default is no branch either.
    await store.append_message("s1", user_id=U, role="user", content="x", parent_seq=4)
    assert (await store.get_session("s1", user_id=U)).branches is None


async def test_pop_ends_the_path_at_the_popped_messages_parent(open_store: Opener) -> None:
    store = await open_store()
    await conversation(store)
    await store.append_message("s1", user_id=U, role="assistant", content="regen", parent_seq=3)  # 5
    await store.switch_branch("s1", 4, user_id=U)
    # The path ends at 4, before the last message (5): 4 leaves the path (what a framework's
    # pop means) but stays stored, since deleting it would leave a gap in the seqs.
    popped = await store.pop_message("s1", user_id=U)
    assert popped is not None and popped.seq == 4
    record = await store.get_session("s1", user_id=U)
    assert seqs(record.path) == [1, 2, 3] and len(record.messages) == 5
    # The next append takes its place on the path: a third alternative after 3.
    replacement = await store.append_message("s1", user_id=U, role="assistant", content="third")
    record = await store.get_session("s1", user_id=U)
    assert seqs(record.path) == [1, 2, 3, 6] and record.alternatives(6) == (4, 5, 6)
    # Popping the last message deletes it: the path ends at its parent.
    popped = await store.pop_message("s1", user_id=U)
    assert popped == replacement
    assert seqs(await store.get_messages("s1", user_id=U)) == [1, 2, 3]
    assert len((await store.get_session("s1", user_id=U)).messages) == 5
    # A branch at the start, then pop its only message: the path ends where the popped
    # message began (nothing), and the next append takes its place.
    first = await store.append_message("s1", user_id=U, role="user", content="new start", parent_seq=0)
    assert seqs(await store.get_messages("s1", user_id=U)) == [first.seq]
    await store.pop_message("s1", user_id=U)
    assert seqs(await store.get_messages("s1", user_id=U)) == []
    assert await store.pop_message("s1", user_id=U) is None  # an empty path: nothing to pop
    await store.flush()
    await store.aclose()
    again = await open_store()
    assert seqs(await again.get_messages("s1", user_id=U)) == []
    assert len((await again.get_session("s1", user_id=U)).messages) == 5
    await again.append_message("s1", user_id=U, role="user", content="replacement")
    record = await again.get_session("s1", user_id=U)
    assert seqs(record.path) == [6] and record.alternatives(6) == (1, 6)
    assert seqs(await again.switch_branch("s1", 1, user_id=U)) == [1, 2, 3, 5]


@pytest.mark.parametrize(
    ("field", "value"),
    [("parent_seq", -1), ("parent_seq", 5), ("parent_seq", "2"), ("parent_seq", True), ("parent_seq", 2.0)],
)
async def test_a_bad_parent_changes_nothing(open_store: Opener, field: str, value: Any) -> None:
    store = await open_store()
    await conversation(store)
    before = await store.get_session("s1", user_id=U)
    with pytest.raises(ValidationError) as raised:
        await store.append_message("s1", user_id=U, role="user", content="x", parent_seq=value)
    assert raised.value.field == field
    after = await store.get_session("s1", user_id=U)
    assert (after.messages, after.branches, after.updated_at) == (
        before.messages,
        before.branches,
        before.updated_at,
    )


@pytest.mark.parametrize("value", [0, 6, -3, "1", None, 1.5])
async def test_a_bad_switch_changes_nothing(open_store: Opener, value: Any) -> None:
    store = await open_store()
    await conversation(store)
    await store.append_message("s1", user_id=U, role="assistant", content="regen", parent_seq=3)
    before = await store.get_session("s1", user_id=U)
    with pytest.raises(ValidationError) as raised:
        await store.switch_branch("s1", value, user_id=U)
    assert raised.value.field == "seq"
    after = await store.get_session("s1", user_id=U)
    assert (after.messages, after.branches, after.updated_at) == (
        before.messages,
        before.branches,
        before.updated_at,
    )


async def test_another_users_session_cannot_be_switched(open_store: Opener) -> None:
    from writebehind import NotFound

    store = await open_store()
    await conversation(store)
    await store.append_message("s1", user_id=U, role="assistant", content="regen", parent_seq=3)
    with pytest.raises(NotFound):
        await store.switch_branch("s1", 4, user_id=U + 1)
    with pytest.raises(NotFound):
        await store.append_message("s1", user_id=U + 1, role="user", content="x", parent_seq=1)


async def test_export_has_every_branch_and_the_recovery_file_keeps_them(
    make_store: StoreFactory, db_path: Path
) -> None:
    db = db_path

    class Refusing(SQLiteBackend):
        refuse = False

        async def write_batch(self, deltas: Any, touches: Any = ()) -> Any:
            if self.refuse:
                raise StorageError("disk says no")
            return await super().write_batch(deltas, touches)

    backend = Refusing(db)
    store = await make_store(backend, shutdown_timeout_seconds=0.5)
    await conversation(store)
    await store.append_message("s1", user_id=U, role="user", content="edit ✍️", parent_seq=2)  # 5
    await store.switch_branch("s1", 3, user_id=U)
    chunks = [chunk async for chunk in store.export_user_json(U)]
    exported = orjson.loads(b"".join(chunks))
    (session,) = exported["sessions"]
    assert session["active_seq"] == 4
    assert [(m["seq"], m["parent_seq"]) for m in session["messages"]] == [
        (1, 0),
        (2, 1),
        (3, 2),
        (4, 3),
        (5, 2),
    ]
    record = await store.get_session("s1", user_id=U)
    assert decode_record(encode_record(record)) == record
    backend.refuse = True  # the disk refuses at shutdown: the recovery file takes the session
    await store.aclose()
    store = await make_store()
    assert seqs(await store.get_messages("s1", user_id=U)) == [1, 2, 3, 4]
    assert (await store.get_session("s1", user_id=U)).alternatives(5) == (3, 5)


async def test_erasure_leaves_no_branch_behind(make_store: StoreFactory, tmp_path: Path) -> None:
    store = await make_store()
    await conversation(store)
    secret = "secret-branch-ℵ"
    await store.append_message("s1", user_id=U, role="assistant", content=secret, parent_seq=3)
    await store.flush()
    await store.delete_user(U)
    await store.aclose()
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path


async def test_a_cancelled_branching_append_is_all_or_nothing(open_store: Opener) -> None:
    store = await open_store()
    await conversation(store)
    await store.aclose()
    store = await open_store()  # s1 is on disk only: the append first loads it
    task = asyncio.create_task(
        store.append_message("s1", user_id=U, role="assistant", content="regen", parent_seq=3)
    )
    await asyncio.sleep(0)
    task.cancel()
    try:
        await task
        landed = True
    except asyncio.CancelledError:
        landed = False
    record = await store.get_session("s1", user_id=U)
    if landed:
        assert seqs(record.path) == [1, 2, 3, 5]
    else:
        assert record.branches is None and seqs(record.path) == [1, 2, 3, 4]


# -- a model: every sequence of appends, switches and pops keeps the tree -------------------------

Op = tuple[str, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(-1, 12)),  # -1: after the path's end
        st.tuples(st.just("switch"), st.integers(1, 12)),
        st.tuples(st.just("pop"), st.just(0)),
    ),
    max_size=25,
)


def model_path(parents: dict[int, int], active: int) -> list[int]:
    path = []
    while active:
        path.append(active)
        active = parents[active]
    return path[::-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=ops)
async def test_the_tree_matches_a_model_and_survives_a_restart(tmp_path: Path, script: list[Op]) -> None:
    db = tmp_path / f"m{abs(hash(tuple(script)))}.db"
    store = WriteBehindStore(SessionStore(), SQLiteBackend(db), config=Config(db_path=db, **QUIET))
    await store.start()
    try:
        await play(store, script)
    finally:
        await store.aclose()
    again = WriteBehindStore(SessionStore(), SQLiteBackend(db), config=Config(db_path=db, **QUIET))
    await again.start()
    try:
        record = await again.get_session("m", user_id=U)
    finally:
        await again.aclose()
    parents, active, count = replay(script)
    assert seqs(record.path) == model_path(parents, active)
    assert len(record.messages) == count
    if record.branches is not None:
        assert all(record.branches.parent(s) == p for s, p in parents.items())
        assert record.branches == Branches.decode(record.branches.encode())


def replay(script: list[Op]) -> tuple[dict[int, int], int, int]:
    """The model: parents, the active leaf, the count after `script`."""
    parents: dict[int, int] = {}
    active = count = 0
    for op, arg in script:
        if op == "append":
            parent = active if arg < 0 or arg > count else arg
            count += 1
            parents[count] = parent
            active = count
        elif op == "switch" and 1 <= arg <= count:
            active = arg
            while children := [s for s, p in parents.items() if p == active]:
                active = max(children)
        elif op == "pop" and active:
            parent = parents[active]
            if active == count:  # the last message is deleted; another only leaves the path
                del parents[count]
                count -= 1
            active = parent
    return parents, active, count


async def play(store: WriteBehindStore, script: list[Op]) -> None:
    await store.ensure_session("m", user_id=U)
    for n in range(1, len(script) + 1):
        op, arg = script[n - 1]
        parents, active, count = replay(script[: n - 1])
        if op == "append":
            parent = active if arg < 0 or arg > count else arg
            await store.append_message(
                "m",
                user_id=U,
                role="user",
                content=TEXTS[count % len(TEXTS)],
                parent_seq=None if arg < 0 else parent,
            )
        elif op == "switch":
            if 1 <= arg <= count:
                await store.switch_branch("m", arg, user_id=U)
            else:
                with pytest.raises(ValidationError):
                    await store.switch_branch("m", arg, user_id=U)
        elif op == "pop":
            await store.pop_message("m", user_id=U)
        parents, active, _ = replay(script[:n])
        assert seqs(await store.get_messages("m", user_id=U)) == model_path(parents, active)
        if n % 3 == 0:
            await store.flush()


async def test_branches_round_trip_with_encryption_at_rest(tmp_path: Path) -> None:
    """The branches column holds seqs only (no content): an encrypting store keeps it as is
    and the tree comes back whole."""
    from writebehind.encryption import new_kek

    db = tmp_path / "enc.db"
    config = Config(db_path=db, encryption_key=new_kek(), **QUIET)
    store = WriteBehindStore.from_config(config)
    async with store:
        await conversation(store)
        await store.append_message(
            "s1", user_id=U, role="assistant", content="secret alternative 秘密", parent_seq=3
        )
        await store.switch_branch("s1", 4, user_id=U)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT branches FROM sessions").fetchone() == ('{"active":4,"parents":[[5,3]]}',)
    assert "秘密".encode() not in db.read_bytes()
    async with WriteBehindStore.from_config(config) as again:
        record = await again.get_session("s1", user_id=U)
        assert seqs(record.path) == [1, 2, 3, 4] and record.alternatives(4) == (4, 5)
        assert record.messages[4].content == "secret alternative 秘密"
