"""`WriteBehindSaver`: LangGraph's checkpointer contract on a real store and a real SQLite
file, a real graph run (a fake chat model, no network) interrupted and resumed across a
restart, deltas, durability modes, ownership, export and erasure, and cancellation.

LangGraph's own conformance suite runs in test_langgraph_conformance.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import orjson
import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint, CheckpointTuple
from langgraph.checkpoint.base.id import uuid6
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt

from writebehind import Config, SessionStore, SQLiteBackend, ValidationError, WriteBehindStore
from writebehind.integrations.langgraph import STATUS, WriteBehindSaver

# Emoji, CJK, RTL, a combining mark, and a character outside the BMP.
WORLD = "héllo 👋🏽 世界 שלום مرحبا é 𝄞"


def _config(db_path: Path, **overrides: Any) -> Config:
    return Config(db_path=db_path, **{"flush_interval_ms": 3_600_000, **overrides})


@asynccontextmanager
async def opened(db_path: Path, **overrides: Any) -> AsyncIterator[WriteBehindStore]:
    store = WriteBehindStore.from_config(_config(db_path, **overrides))
    async with store:
        yield store


def cfg(thread: str, **more: Any) -> RunnableConfig:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": "", **more}}


def checkpoint(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        v=1,
        id=str(uuid6(clock_seq=-1)),
        ts="2024-01-01T00:00:00+00:00",
        channel_values=values,
        channel_versions=versions,
        versions_seen={},
        updated_channels=None,
    )


async def put(
    saver: WriteBehindSaver,
    config: RunnableConfig,
    values: dict[str, Any],
    versions: dict[str, Any],
    new: dict[str, Any] | None = None,
    **meta: Any,
) -> RunnableConfig:
    return await saver.aput(
        config,
        checkpoint(values, versions),
        {"source": "loop", "step": 0, **meta},
        versions if new is None else new,
    )


def stored_bytes(messages: Sequence[Any]) -> int:
    return sum(len(m.content.encode()) for m in messages)


# -- a real graph: a fake chat model, a human approval (interrupt), a restart in between --------


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]
    approved: str


def chat_graph(saver: BaseCheckpointSaver[Any], replies: list[str]) -> Any:
    model = FakeListChatModel(responses=replies)

    async def draft(state: Chat) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def approve(state: Chat) -> dict[str, Any]:
        answer = interrupt({"question": "send it?", "draft": state["messages"][-1].content})
        return {"approved": answer}

    builder = StateGraph(Chat)
    builder.add_node("draft", draft)
    builder.add_node("approve", approve)
    builder.add_edge(START, "draft")
    builder.add_edge("draft", "approve")
    builder.add_edge("approve", END)
    return builder.compile(checkpointer=saver)


async def test_a_run_interrupted_resumes_after_a_restart_with_its_history(db_path: Path) -> None:
    thread = f"trip-{WORLD}"
    config = cfg(thread)
    async with opened(db_path) as store:
        graph = chat_graph(WriteBehindSaver(store, user_id=42), [f"draft: {WORLD}"])
        out = await graph.ainvoke({"messages": [HumanMessage(f"plan a trip {WORLD}")]}, config)
        assert out["__interrupt__"][0].value == {"question": "send it?", "draft": f"draft: {WORLD}"}
        before = [s.config["configurable"]["checkpoint_id"] async for s in graph.aget_state_history(config)]
    # The store is closed (flushed) and a new one opens the same file: a new process would
    # see exactly this.
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=42)
        graph = chat_graph(saver, ["unused"])
        state = await graph.aget_state(config)
        assert state.next == ("approve",)
        assert [m.content for m in state.values["messages"]] == [f"plan a trip {WORLD}", f"draft: {WORLD}"]
        assert [
            s.config["configurable"]["checkpoint_id"] async for s in graph.aget_state_history(config)
        ] == before
        done = await graph.ainvoke(Command(resume=f"yes {WORLD}"), config)
        assert done["approved"] == f"yes {WORLD}"
        assert [m.content for m in done["messages"]] == [f"plan a trip {WORLD}", f"draft: {WORLD}"]
        history = [s async for s in graph.aget_state_history(config)]
        assert len(history) == len(before) + 1
        assert history[0].next == ()
    async with opened(db_path) as store:
        state = await chat_graph(WriteBehindSaver(store, user_id=42), []).aget_state(config)
        assert state.values["approved"] == f"yes {WORLD}"
        # Another user asking for the same thread id sees a new, empty thread.
        other = await chat_graph(WriteBehindSaver(store, user_id=43), []).aget_state(config)
        assert other.values == {}


# -- deltas: unchanged channels are not written again -------------------------------------------


class Counting(TypedDict):
    doc: str
    n: int


def counting_graph(saver: BaseCheckpointSaver[Any], every: int) -> Any:
    def step(state: Counting) -> dict[str, Any]:
        return {"n": state["n"] + 1}

    builder = StateGraph(Counting)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: END if s["n"] % every == 0 else "step")
    return builder.compile(checkpointer=saver)


async def test_a_200_step_thread_grows_linearly_not_with_the_state(db_path: Path) -> None:
    doc = WORLD * 2000  # ~50 KB, written once: a full-state writer would store it per step
    config = cfg("long")
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        graph = counting_graph(saver, every=50)
        sid = saver._owner().session_id("long")
        sizes = []
        await graph.ainvoke({"doc": doc, "n": 0}, {**config, "recursion_limit": 1000})
        sizes.append(stored_bytes(await store.get_messages(sid, user_id=1)))
        for done in (50, 100, 150):  # three more runs of 50 steps each: 200 steps in all
            await graph.ainvoke({"n": done}, {**config, "recursion_limit": 1000})
            sizes.append(stored_bytes(await store.get_messages(sid, user_id=1)))
        state = await graph.aget_state(config)
        assert state.values == {"doc": doc, "n": 200}
        steps = [s async for s in graph.aget_state_history(config)]
        assert len(steps) >= 200
        # The document's value was written once, with the first checkpoint, and never again
        # (not even in place); every later checkpoint reads it from there.
        messages = await store.get_messages(sid, user_id=1)
        [holder] = [m for m in messages if any(ch == "doc" for ch, _ in (m.metadata or {}).get("blobs", ()))]
        assert holder.updated_at == holder.created_at
    doc_bytes = len(doc.encode()) * 4 // 3  # as stored: base64
    growth = [b - a for a, b in itertools.pairwise(sizes)]
    # Each 50 steps add the same amount (linear), far less than one copy of the document
    # per step would (50 copies). The document is stored where LangGraph hands it over: the
    # input, the input's writes and the channel, once each; never again per step.
    assert max(growth) <= min(growth) * 1.2, (sizes, growth)
    assert max(growth) < doc_bytes / 2, (growth, doc_bytes)
    assert sizes[0] < 3.1 * doc_bytes + growth[0], (sizes, doc_bytes)


# -- durability: what the saver sees of LangGraph's `durability` -----------------------------------


@pytest.mark.parametrize(
    ("durability", "saver_durable", "survives"),
    [("sync", False, True), ("async", False, False), ("exit", False, False), ("async", True, True)],
)
async def test_durability_sync_is_on_disk_when_the_run_returns(
    db_path: Path, durability: str, saver_durable: bool, survives: bool
) -> None:
    config = cfg("crash")
    store = WriteBehindStore.from_config(_config(db_path))
    await store.start()
    graph = counting_graph(WriteBehindSaver(store, user_id=5, durable=saver_durable), every=3)
    await graph.ainvoke({"doc": WORLD, "n": 0}, config, durability=durability)
    await store._abandon()  # a crash: no final flush, no recovery file
    async with opened(db_path) as store:
        state = await counting_graph(WriteBehindSaver(store, user_id=5), every=3).aget_state(config)
        if survives:
            assert state.values == {"doc": WORLD, "n": 3}
        else:
            # The flush interval is an hour: write-behind had written nothing yet.
            assert state.values == {}


# -- the protocol, beyond the conformance suite ------------------------------------------------------


async def test_users_are_isolated_by_config_and_by_for_user(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id="default")
        alice, bob = cfg("shared-name", user_id="alice"), cfg("shared-name", user_id="bob")
        await put(saver, alice, {"who": "alice"}, {"who": 1})
        await put(saver, bob, {"who": "bob"}, {"who": 1})
        a, b = await saver.aget_tuple(alice), await saver.aget_tuple(bob)
        assert a is not None and b is not None
        assert (a.checkpoint["channel_values"], b.checkpoint["channel_values"]) == (
            {"who": "alice"},
            {"who": "bob"},
        )
        assert await saver.aget_tuple(cfg("shared-name")) is None  # the saver's own user has none
        listed = [t.checkpoint["channel_values"] async for t in saver.for_user("alice").alist(None)]
        assert listed == [{"who": "alice"}]
        await saver.for_user("bob").adelete_thread("shared-name")
        assert await saver.aget_tuple(bob) is None
        assert await saver.aget_tuple(alice) is not None
        # The sessions are the users' own, marked as LangGraph threads.
        assert [(s.status, s.title) for s in await store.list_sessions("alice")] == [(STATUS, "shared-name")]
        assert await store.list_sessions("bob") == []


async def test_non_ascii_everywhere_round_trips(db_path: Path) -> None:
    thread, ns = f"スレッド {WORLD}", f"child:{WORLD}"
    config: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ns}}
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=f"usér {WORLD}")
        stored = await put(saver, config, {WORLD: [WORLD, {"k": WORLD}]}, {WORLD: 1}, note=WORLD)
        await saver.aput_writes(stored, [(WORLD, WORLD)], f"task {WORLD}", task_path=WORLD)
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=f"usér {WORLD}")
        got = await saver.aget_tuple(config)
        assert got is not None
        assert got.checkpoint["channel_values"] == {WORLD: [WORLD, {"k": WORLD}]}
        assert got.metadata["note"] == WORLD  # type: ignore[typeddict-item]
        assert got.pending_writes == [(f"task {WORLD}", WORLD, WORLD)]
        assert got.config["configurable"] == {
            "thread_id": thread,
            "checkpoint_ns": ns,
            "checkpoint_id": got.checkpoint["id"],
        }


async def test_values_larger_than_a_message_are_split_and_replaced_whole(db_path: Path) -> None:
    async with opened(db_path, max_message_bytes=1000) as store:
        saver = WriteBehindSaver(store, user_id=1)
        big, bigger = WORLD * 300, "x" * 9000 + WORLD
        first = await put(saver, cfg("big"), {"v": big, "w": bigger}, {"v": 1, "w": 1})
        got = await saver.aget_tuple(first)
        assert got is not None and got.checkpoint["channel_values"] == {"v": big, "w": bigger}
        sid = saver._owner().session_id("big")
        assert all(len(m.content.encode()) <= 1000 for m in await store.get_messages(sid, user_id=1))
        # The same checkpoint put again (as a retry would) replaces it whole: the first
        # version's parts are emptied, what is left holds one copy of the values.
        again = checkpoint({"v": bigger, "w": big}, {"v": 1, "w": 1})
        again["id"] = first["configurable"]["checkpoint_id"]
        await saver.aput(cfg("big"), again, {"source": "loop", "step": 0}, {"v": 1, "w": 1})
        got = await saver.aget_tuple(first)
        assert got is not None and got.checkpoint["channel_values"] == {"v": bigger, "w": big}
        live = sum(len(m.content) for m in await store.get_messages(sid, user_id=1))
        encoded = (len(big.encode()) + len(bigger.encode())) * 4 // 3
        assert encoded < live < encoded + 2000


async def test_repeated_task_write_is_kept_once_and_special_writes_replace(db_path: Path) -> None:
    from langgraph.checkpoint.serde.types import ERROR

    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        stored = await put(saver, cfg("w"), {}, {})
        await saver.aput_writes(stored, [("ch", "first"), (ERROR, "boom 1")], "task")
        await saver.aput_writes(stored, [("ch", "second"), (ERROR, f"boom 2 {WORLD}")], "task")
        got = await saver.aget_tuple(stored)
        assert got is not None
        assert sorted(got.pending_writes or []) == sorted(
            [("task", "ch", "first"), ("task", ERROR, f"boom 2 {WORLD}")]
        )


async def test_prune_keeps_the_ancestors_the_latest_reads_through_and_erases_the_rest(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)

        async def chain(thread: str, steps: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
            parent: RunnableConfig = cfg(thread)
            ids = []
            for values, versions in steps:
                new = {k: v for k, v in versions.items() if k in values or k == "d"}
                parent = await put(saver, parent, values, versions, new)
                ids.append(parent["configurable"]["checkpoint_id"])
            return ids

        # Channel d is stored "empty" at versions 2 and 3 (a DeltaChannel between
        # snapshots): the latest checkpoint reads it through p2 down to p1's seed, so p1
        # and p2 (with their writes) survive, and only p0 goes.
        p0, p1, p2, p3 = await chain(
            "p",
            [
                ({"a": "ZERO-VALUE"}, {"a": 1}),
                ({"a": "OLD-A-VALUE", "d": "D-SEED"}, {"a": 2, "d": 1}),
                ({"a": "A2"}, {"a": 3, "d": 2}),
                ({"a": "A3"}, {"a": 4, "d": 3}),
            ],
        )
        await saver.aput_writes(cfg("p", checkpoint_id=p2), [("d", "delta-on-p2")], "task")
        await saver.aprune(["p"])
        assert [t.checkpoint["id"] async for t in saver.alist(cfg("p"))] == [p3, p2, p1]
        kept = await saver.aget_tuple(cfg("p", checkpoint_id=p2))
        assert kept is not None and kept.pending_writes == [("task", "d", "delta-on-p2")]
        # Without such a channel only the latest stays.
        _, q1 = await chain("q", [({"a": "Q-OLD-VALUE"}, {"a": 1}), ({"a": "Q-NEW"}, {"a": 2})])
        await saver.aprune(["q"])
        assert [t.checkpoint["id"] async for t in saver.alist(cfg("q"))] == [q1]
        latest = await saver.aget_tuple(cfg("q"))
        assert latest is not None and latest.checkpoint["channel_values"] == {"a": "Q-NEW"}
        # A dropped checkpoint that holds a value the kept one still reads (stored once,
        # with the checkpoint that changed it) keeps that value and nothing else.
        r0, r1 = await chain(
            "r",
            [
                ({"big": "SHARED-VALUE", "x": "R-OLD-X"}, {"big": 1, "x": 1}),
                ({"x": "x1"}, {"big": 1, "x": 2}),
            ],
        )
        await saver.aprune(["r"])
        assert [t.checkpoint["id"] async for t in saver.alist(cfg("r"))] == [r1]
        kept_r = await saver.aget_tuple(cfg("r"))
        assert kept_r is not None and kept_r.checkpoint["channel_values"] == {
            "big": "SHARED-VALUE",
            "x": "x1",
        }
        assert await saver.aget_tuple(cfg("r", checkpoint_id=r0)) is None
        with pytest.raises(ValidationError) as bad:
            await saver.aprune(["q"], strategy="keep_some")
        assert bad.value.field == "strategy"
        assert p0 not in [t.checkpoint["id"] async for t in saver.alist(None)]
    # What was pruned is not on disk either.
    with sqlite3.connect(db_path) as db:
        decoded = " ".join(_b64_text(row[0]) for row in db.execute("SELECT content FROM messages"))
    assert "ZERO-VALUE" not in decoded and "Q-OLD-VALUE" not in decoded and "R-OLD-X" not in decoded
    assert "D-SEED" in decoded and "OLD-A-VALUE" in decoded and "SHARED-VALUE" in decoded


def _b64_text(content: str) -> str:
    out = []
    for line in content.split("\n"):
        try:
            out.append(base64.b64decode(line, validate=True).decode("utf-8", "replace"))
        except ValueError:
            out.append(line)
    return "\n".join(out)


async def test_delete_for_runs_reaches_every_thread_of_the_user_only(db_path: Path) -> None:
    async with opened(db_path) as store:
        alice, bob = WriteBehindSaver(store, user_id="alice"), WriteBehindSaver(store, user_id="bob")
        for saver in (alice, bob):
            for thread in ("t1", "t2"):
                await put(saver, cfg(thread), {"x": f"doomed {thread}"}, {"x": 1}, run_id="run-1")
                await put(saver, cfg(thread), {"x": f"kept {thread}"}, {"x": 2}, run_id="run-2")
        await alice.adelete_for_runs(["run-1"])
        for thread in ("t1", "t2"):
            runs = [t.metadata.get("run_id") async for t in alice.alist(cfg(thread))]
            assert runs == ["run-2"]
            assert len([t async for t in bob.alist(cfg(thread))]) == 2


def extend(state: list[str], writes: Sequence[list[str]]) -> list[str]:
    return state + [x for w in writes for x in w]


class Log(TypedDict):
    log: Annotated[list[str], DeltaChannel(extend, snapshot_frequency=3)]
    n: int


def log_graph(saver: BaseCheckpointSaver[Any]) -> Any:
    def step(state: Log) -> dict[str, Any]:
        return {"log": [f"{WORLD} {state['n']}"], "n": state["n"] + 1}

    builder = StateGraph(Log)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_conditional_edges("step", lambda s: END if s["n"] >= 7 else "step")
    return builder.compile(checkpointer=saver)


async def test_delta_channel_history_matches_the_reference_walk_across_a_restart(db_path: Path) -> None:
    config = cfg("delta")
    async with opened(db_path) as store:
        await log_graph(WriteBehindSaver(store, user_id=1)).ainvoke({"log": [], "n": 0}, config)
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        state = await log_graph(saver).aget_state(config)
        assert state.values["log"] == [f"{WORLD} {i}" for i in range(7)]
        mine = await saver.aget_delta_channel_history(config=config, channels=["log", "n"])
        reference = await BaseCheckpointSaver.aget_delta_channel_history(
            saver, config=config, channels=["log", "n"]
        )
        assert mine == reference
        assert mine["log"]["writes"]  # the walk did collect writes between snapshots


# -- privacy: export, erasure, anonymous -----------------------------------------------------------


async def test_export_and_delete_user_include_the_threads(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=42)
        await counting_graph(saver, every=2).ainvoke({"doc": f"secret {WORLD}", "n": 0}, cfg("mine"))
        exported = orjson.loads(b"".join([chunk async for chunk in store.export_user_json(42)]))
        [session] = exported["sessions"]
        assert (session["status"], session["title"]) == (STATUS, "mine")
        kinds = {m["metadata"]["lg"] for m in session["messages"]}
        assert kinds == {"checkpoint", "writes"}
        assert any(f"secret {WORLD}" in _b64_text(m["content"]) for m in session["messages"])
        assert await store.delete_user(42) == 1
        assert await saver.aget_tuple(cfg("mine")) is None
    async with opened(db_path) as store:
        assert await WriteBehindSaver(store, user_id=42).aget_tuple(cfg("mine")) is None
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


async def test_anonymous_threads_stay_in_memory_and_sealed(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store)  # user_id=None: anonymous
        await counting_graph(saver, every=2).ainvoke({"doc": "anon", "n": 0}, cfg("a"))
        assert (await counting_graph(saver, every=2).aget_state(cfg("a"))).values == {"doc": "anon", "n": 2}
        assert len([t async for t in saver.alist(None)]) >= 2
        # Another anonymous saver (another visitor) cannot open it, even by its thread id.
        assert await WriteBehindSaver(store).aget_tuple(cfg("a")) is None
        await store.flush()
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)


# -- errors, the sync bridge ------------------------------------------------------------------------


async def test_bad_input_is_a_validation_error_naming_the_field(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        cases: list[tuple[RunnableConfig, str]] = [
            ({"configurable": {"checkpoint_ns": ""}}, "thread_id"),
            (cfg("t", user_id=1.5), "user_id"),
            (cfg("bad\x00thread"), "thread_id"),
            (cfg("lone \ud800"), "thread_id"),
        ]
        for config, field in cases:
            with pytest.raises(ValidationError) as err:
                await put(saver, config, {}, {})
            assert err.value.field == field
        with pytest.raises(ValidationError) as err:
            await saver.aput_writes(cfg("t"), [("ch", 1)], "task")
        assert err.value.field == "checkpoint_id"
        assert await store.list_sessions(1) == []  # nothing was written by any of them


async def test_a_bad_user_id_is_refused_when_the_saver_is_made_not_at_its_first_use(db_path: Path) -> None:
    async with opened(db_path) as store:
        for bad in (1.5, True, "", "tab\there", 2**70):
            with pytest.raises(ValidationError) as err:
                WriteBehindSaver(store, user_id=bad)  # type: ignore[arg-type]
            assert err.value.field == "user_id"
            with pytest.raises(ValidationError) as err:
                WriteBehindSaver(store, user_id=1).for_user(bad)  # type: ignore[arg-type]
            assert err.value.field == "user_id"
        assert WriteBehindSaver(store, user_id="ünï 世界").for_user(None) is not None


async def test_sync_methods_work_from_another_thread_and_refuse_the_loop(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        stored = await put(saver, cfg("s"), {"k": WORLD}, {"k": 1})
        got: CheckpointTuple | None = await asyncio.to_thread(saver.get_tuple, stored)
        assert got is not None and got.checkpoint["channel_values"] == {"k": WORLD}
        listed = await asyncio.to_thread(lambda: list(saver.list(cfg("s"))))
        assert [t.checkpoint["id"] for t in listed] == [got.checkpoint["id"]]
        with pytest.raises(asyncio.InvalidStateError):
            saver.get_tuple(stored)
        await asyncio.to_thread(saver.delete_thread, "s")
        assert await saver.aget_tuple(cfg("s")) is None


# -- cancellation ------------------------------------------------------------------------------------


class YieldingStore(WriteBehindStore):
    """A real store whose every write first yields to the loop: each becomes a point where a
    cancellation can land (the real store runs a hot session's writes without suspending)."""

    async def append_message(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().append_message(*args, **kwargs)

    async def update_message(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().update_message(*args, **kwargs)


async def test_a_cancelled_aput_leaves_the_old_or_the_new_checkpoint_whole(db_path: Path) -> None:
    config = _config(db_path, max_message_bytes=500)
    store = YieldingStore(
        SessionStore(max_message_bytes=config.max_message_bytes), SQLiteBackend(db_path), config=config
    )
    async with store:
        saver = WriteBehindSaver(store, user_id=1)
        old_values = {"a": "old " + WORLD * 40, "b": "b-old"}
        base = await put(saver, cfg("c"), old_values, {"a": 1, "b": 1})
        old = await saver.aget_tuple(cfg("c"))
        assert old is not None
        cancelled_somewhere = False
        for k in range(60):
            new_values = {"a": f"new {k} " + WORLD * 40, "b": "b-new"}
            task = asyncio.ensure_future(
                put(
                    saver,
                    {**cfg("c"), "configurable": {**base["configurable"]}},
                    new_values,
                    {"a": 100 + k, "b": 2},
                )
            )
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled_somewhere = True
            latest = await saver.aget_tuple(cfg("c"))
            assert latest is not None
            values = latest.checkpoint["channel_values"]
            # The old values, or one whole new set (an earlier round's, whose aput finished).
            whole = {f"new {j} " + WORLD * 40 for j in range(k + 1)}
            assert values == old_values or (values["b"] == "b-new" and values["a"] in whole)
            # Every checkpoint in the thread reads whole.
            async for item in saver.alist(cfg("c")):
                assert set(item.checkpoint["channel_values"]) == {"a", "b"}
        assert cancelled_somewhere
        # The same checkpoint put again (its records replaced in place, new parts first):
        # a cancelled replacement leaves each value whole, the old one or the new one.
        fixed = checkpoint({"a": "first " + WORLD * 40, "b": "b first"}, {"a": 7, "b": 7})
        at = await saver.aput(cfg("r"), fixed, {"source": "loop", "step": 0}, {"a": 7, "b": 7})
        seen_a, seen_b = {fixed["channel_values"]["a"]}, {fixed["channel_values"]["b"]}
        for k in range(60):
            values = {"a": f"again {k} " + WORLD * 40, "b": f"b {k}"}
            seen_a.add(values["a"])
            seen_b.add(values["b"])
            task = asyncio.ensure_future(
                saver.aput(
                    cfg("r"),
                    {**fixed, "channel_values": values},
                    {"source": "loop", "step": k},
                    {"a": 7, "b": 7},
                )
            )
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            got = await saver.aget_tuple(at)
            assert got is not None
            assert got.checkpoint["channel_values"]["a"] in seen_a
            assert got.checkpoint["channel_values"]["b"] in seen_b


async def test_an_aput_cancelled_while_its_thread_loads_writes_nothing(db_path: Path) -> None:
    class SlowLoad(SQLiteBackend):
        async def load_session(self, session_id: str) -> Any:
            await asyncio.sleep(0.05)
            return await super().load_session(session_id)

    async with opened(db_path) as store:
        await put(WriteBehindSaver(store, user_id=1), cfg("cold"), {"k": "v1"}, {"k": 1})
    config = _config(db_path)
    async with WriteBehindStore(SessionStore(), SlowLoad(db_path), config=config) as store:
        saver = WriteBehindSaver(store, user_id=1)
        task = asyncio.ensure_future(put(saver, cfg("cold"), {"k": "v2"}, {"k": 2}))
        await asyncio.sleep(0.01)  # inside the load of the thread from disk
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await saver.aget_tuple(cfg("cold"))
        assert got is not None and got.checkpoint["channel_values"] == {"k": "v1"}
        assert len([t async for t in saver.alist(cfg("cold"))]) == 1
        await put(saver, cfg("cold"), {"k": "v3"}, {"k": 3})  # and the thread goes on
        got = await saver.aget_tuple(cfg("cold"))
        assert got is not None and got.checkpoint["channel_values"] == {"k": "v3"}


async def test_list_filters_limit_and_before_across_threads(db_path: Path) -> None:
    async with opened(db_path) as store:
        saver = WriteBehindSaver(store, user_id=1)
        made = []
        for i in range(4):
            made.append(
                await put(saver, cfg(f"t{i % 2}"), {}, {}, step=i, source="input" if i % 2 else "loop")
            )
        ids = [c["configurable"]["checkpoint_id"] for c in made]
        everything = [t.checkpoint["id"] async for t in saver.alist(None)]
        assert everything == list(reversed(ids))
        assert [t.metadata["step"] async for t in saver.alist(None, filter={"source": "input"})] == [3, 1]
        assert [t.checkpoint["id"] async for t in saver.alist(None, before=made[2], limit=1)] == [ids[1]]
        assert [t async for t in saver.alist(None, limit=0)] == []
        assert [t.checkpoint["id"] async for t in saver.alist(cfg("t1", checkpoint_id=ids[1]))] == [ids[1]]
