"""`WriteBehindSession` held to openai-agents' `Session` protocol (0.24): the contract as the
protocol and its reference implementation (`SQLiteSession`) define it, run side by side
with that implementation; exact round trips; atomic `add_items`; durable `pop_item` and
`clear_session`; user isolation, anonymous sessions, export and erasure; and a real agent
run with a fake model whose history survives a restart. Real SQLite files throughout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, Model, ModelResponse, RunConfig, Runner, Usage, function_tool
from agents.items import TResponseInputItem
from agents.memory import Session, SessionSettings, SQLiteSession
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from writebehind import BackPressureError, Config, NotFound, ValidationError, WriteBehindStore
from writebehind.integrations.openai_agents import STATUS, WriteBehindSession

from ..conftest import StoreFactory
from ..reliability.helpers import on_disk

NO_TRACING = RunConfig(tracing_disabled=True)  # no network: the trace exporter stays off

TEXTS = ["hello 👋🏽", "你好\uff0c世界", "مرحبا بالعالم", "שלום", "e\u0301 a\u0308 \u0915\u094d\u0937", ""]


class Text(str):
    """A str subclass: JSON gives back a plain str, so it would not come back the same."""


def item(n: int) -> dict[str, Any]:
    """Items of the shapes a run produces, with non-ASCII text, numbers and nesting."""
    text = TEXTS[n % len(TEXTS)]
    shapes: list[dict[str, Any]] = [
        {"role": "user", "content": f"{n}: {text}"},
        {
            "id": f"msg_{n}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        },
        {
            "type": "function_call",
            "call_id": f"call_{n}",
            "name": "lookup",
            "arguments": json.dumps({"q": text, "n": n}),
            "id": f"fc_{n}",
        },
        {"type": "function_call_output", "call_id": f"call_{n}", "output": text},
        {
            "type": "reasoning",
            "id": f"rs_{n}",
            "summary": [{"type": "summary_text", "text": text}],
            "extra": {"score": 0.1 + n, "ok": True, "none": None, "big": 2**62, "neg": -1.5e-300},
        },
        {"role": "developer", "content": [{"type": "input_text", "text": text}]},
    ]
    return shapes[n % len(shapes)]


def items(start: int, count: int) -> list[TResponseInputItem]:
    return [item(n) for n in range(start, start + count)]  # type: ignore[misc]


# -- the protocol ---------------------------------------------------------------------------------


async def test_it_is_an_agents_session_with_default_settings(make_store: StoreFactory) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    assert isinstance(session, Session)  # the runtime-checkable protocol
    assert session.session_id == "c1"
    assert session.session_settings == SessionSettings()
    assert await session.get_items() == []
    assert await session.pop_item() is None
    await session.clear_session()  # nothing to clear is fine
    assert await session.get_items() == []


async def test_it_behaves_as_sqlite_session_step_by_step(make_store: StoreFactory, tmp_path: Path) -> None:
    """openai-agents' own SQLite implementation is the reference: the same calls, the same
    answers, at every step."""
    store = await make_store()
    ours = WriteBehindSession("c1", store, user_id=1)
    reference = SQLiteSession("c1", tmp_path / "reference.db")
    try:
        steps: list[tuple[str, Any]] = (
            [
                ("get", None),
                ("add", items(0, 3)),
                ("get", None),
                ("get", 2),
                ("get", 10),
                ("get", 0),
                ("get", -1),
                ("add", []),
                ("add", items(3, 5)),
                ("get", 4),
                ("pop", None),
                ("get", 3),
                ("pop", None),
                ("add", items(8, 1)),
                ("get", 1),
                ("get", None),
                ("clear", None),
                ("get", None),
                ("get", 5),
                ("pop", None),
                ("add", items(9, 12)),
                ("get", 7),
            ]
            + [("pop", None)] * 13
            + [("get", None), ("add", items(21, 2)), ("get", None)]
        )
        for number, (op, arg) in enumerate(steps):
            results = []
            for session in (ours, reference):
                if op == "get":
                    results.append(await session.get_items(arg))
                elif op == "add":
                    results.append(await session.add_items(list(arg)))
                elif op == "pop":
                    results.append(await session.pop_item())
                else:
                    results.append(await session.clear_session())
            assert results[0] == results[1], f"step {number}: {op}({arg!r})"
    finally:
        reference.close()


async def test_session_settings_give_the_default_limit(make_store: StoreFactory) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1, session_settings={"limit": 2})
    assert session.session_settings == SessionSettings(limit=2)
    await session.add_items(items(0, 5))
    assert await session.get_items() == items(3, 2)
    assert await session.get_items(limit=4) == items(1, 4)  # an explicit limit wins


async def test_items_round_trip_exactly_across_a_restart(make_store: StoreFactory) -> None:
    store = await make_store()
    added = items(0, 12)
    await WriteBehindSession("c1", store, user_id="u").add_items(added)
    await store.aclose()
    store = await make_store()
    back = await WriteBehindSession("c1", store, user_id="u").get_items()
    assert back == added
    # exactly: the same types (an int stays an int, a float a float) and key order
    assert json.dumps(back) == json.dumps(added)


async def test_latest_items_of_a_hot_session_read_only_the_tail(make_store: StoreFactory) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 500))
    read: list[int] = []
    real = store.get_messages

    async def counting(*args: Any, **kwargs: Any) -> Any:
        found = await real(*args, **kwargs)
        read.append(len(found))
        return found

    store.get_messages = counting  # type: ignore[method-assign]
    assert await session.get_items(3) == items(497, 3)
    assert read == [3]  # not the 500
    # another writer of the same session in between: still right, read again if it shrank
    other = WriteBehindSession("c1", store, user_id=1)
    for _ in range(4):
        await other.pop_item()
    assert await session.get_items(3) == items(493, 3)
    await other.add_items(items(900, 2))
    assert await session.get_items(3) == [*items(495, 1), *items(900, 2)]


async def test_messages_the_app_appended_itself_come_back_as_easy_input_messages(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 1))
    await store.append_message("c1", user_id=1, role="assistant", content="from the app ✓")
    assert await session.get_items() == [item(0), {"role": "assistant", "content": "from the app ✓"}]
    assert await session.pop_item() == {"role": "assistant", "content": "from the app ✓"}


async def test_add_items_to_a_session_in_memory_is_one_store_append_per_item(
    make_store: StoreFactory,
) -> None:
    """The request path the benchmark measures: once the session exists, an add is its
    appends and nothing else (no ensure_session, no read). A new or cleared session is
    still created on first use."""
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 1))  # creates it
    calls: list[str] = []
    for name in ("ensure_session", "get_session", "get_messages", "append_message"):
        real = getattr(store, name)

        async def counting(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls.append(_name)
            return await _real(*args, **kwargs)

        setattr(store, name, counting)
    await session.add_items(items(1, 3))
    assert calls == ["append_message"] * 3
    await session.clear_session()
    calls.clear()
    await session.add_items(items(10, 2))  # gone: created again on the way
    assert "ensure_session" in calls
    assert await session.get_items() == items(10, 2)


# -- what gets refused, and atomicity ------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"role": "user", "content": ("a", "tuple")}, "round trip"),
        ({"role": "user", "content": "x", "score": float("nan")}, "round trip"),
        ({"role": "user", "content": "x", 1: "int key"}, "JSON"),
        ({"role": "user", "content": "lone \ud800 surrogate"}, "JSON"),
        ({"role": "user", "content": "x", "n": 2**70}, "JSON"),
        (["not", "a", "dict"], "dict"),
        ({"role": "user", "content": "x", "n": float("inf")}, "round trip"),
        ({"role": "user", "content": Text("a str subclass")}, "round trip"),
        ({"role": "user", "content": [{"nested": ("t",)}]}, "round trip"),
        ({"role": "user", "content": "x", "when": object()}, "JSON"),
    ],
)
async def test_an_item_that_would_not_come_back_equal_is_refused_and_nothing_is_added(
    make_store: StoreFactory, bad: Any, why: str
) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 1))
    with pytest.raises(ValidationError) as raised:
        await session.add_items([*items(1, 2), bad])
    assert raised.value.field == "items[2]" and why in str(raised.value)
    assert await session.get_items() == items(0, 1)


async def test_json_values_of_every_kind_are_kept_with_their_types(make_store: StoreFactory) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    odd = {
        "role": "user",
        "content": [],
        "t": True,
        "f": False,
        "none": None,
        "one": 1,
        "one_f": 1.0,
        "neg_zero": -0.0,
        "max": 2**63 - 1,
        "min": -(2**63),
        "tiny": 5e-324,
        "deep": {"a": [[], {}, [{"b": [1, 2.5, "三"]}]]},
        "": "empty key",
    }
    await session.add_items([odd])  # type: ignore[list-item]
    [back] = await session.get_items()
    assert back == odd
    assert [type(v) for v in back.values()] == [type(v) for v in odd.values()]  # type: ignore[union-attr]


async def test_large_items_work_up_to_the_message_limit_and_are_refused_past_it(
    make_store: StoreFactory,
) -> None:
    store = await make_store(max_message_bytes=300_000)
    session = WriteBehindSession("c1", store, user_id=1)
    big = {"role": "user", "content": "大" * 80_000}  # 240 KB of UTF-8: far past 64 KiB metadata
    await session.add_items([big])  # type: ignore[list-item]
    too_big = {"role": "user", "content": "x" * 300_000}
    with pytest.raises(ValidationError) as raised:
        await session.add_items([*items(0, 1), too_big])  # type: ignore[list-item]
    assert raised.value.field == "items[1]"
    await store.aclose()
    store = await make_store(max_message_bytes=300_000)
    assert await WriteBehindSession("c1", store, user_id=1).get_items() == [big]


async def test_concurrent_add_items_never_interleave(make_store: StoreFactory) -> None:
    first = await make_store()
    await WriteBehindSession("c1", first, user_id=1).add_items(items(0, 1))
    await first.aclose()
    store = await make_store()  # cold: the first add of each task waits for the load
    batches = [items(100 * k, 20) for k in range(1, 6)]
    await asyncio.gather(*(WriteBehindSession("c1", store, user_id=1).add_items(b) for b in batches))
    stored = await WriteBehindSession("c1", store, user_id=1).get_items()
    assert stored[0] == item(0)
    rest = stored[1:]
    assert sorted(json.dumps(b) for b in (rest[i : i + 20] for i in range(0, 100, 20))) == sorted(
        json.dumps(b) for b in batches
    )


async def test_add_items_failing_half_way_takes_back_what_it_added(
    make_store: StoreFactory, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 2))
    await store.flush()
    real = store.append_message
    calls = 0

    async def failing_third(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise BackPressureError("the disk is behind (injected)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "append_message", failing_third)
    with pytest.raises(BackPressureError):
        await session.add_items(items(2, 5))
    assert await session.get_items() == items(0, 2)
    await store.flush()
    assert len(on_disk(db_path)["c1"]) == 2


async def test_add_items_cancelled_while_the_session_loads_adds_nothing(make_store: StoreFactory) -> None:
    first = await make_store()
    await WriteBehindSession("c1", first, user_id=1).add_items(items(0, 2))
    await first.aclose()
    store = await make_store()
    task = asyncio.create_task(WriteBehindSession("c1", store, user_id=1).add_items(items(2, 3)))
    await asyncio.sleep(0)  # it has started: the load is in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await WriteBehindSession("c1", store, user_id=1).get_items() == items(0, 2)


# -- durability -----------------------------------------------------------------------------------


async def test_pop_item_and_clear_session_are_on_disk_when_they_return(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()  # no interval flush: only durable calls reach the file now
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 3))
    await store.flush()
    assert await session.pop_item() == item(2)
    assert sorted(on_disk(db_path)["c1"]) == [1, 2]
    await session.add_items(items(10, 1))
    await session.clear_session()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (0,)
    await session.add_items(items(20, 1))  # a cleared session is used again
    assert await session.get_items() == items(20, 1)


async def test_durable_sessions_add_items_on_disk(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await WriteBehindSession("c1", store, user_id=1, durable=True).add_items(items(0, 4))
    assert sorted(on_disk(db_path)["c1"]) == [1, 2, 3, 4]


async def test_a_cancelled_pop_item_finishes_before_the_cancellation(
    make_store: StoreFactory, db_path: Path
) -> None:
    """As SQLiteSession: a pop that started is completed, on disk, before the caller sees
    the CancelledError; one cancelled before it started removes nothing."""
    first = await make_store()
    await WriteBehindSession("c1", first, user_id=1).add_items(items(0, 40))
    await first.aclose()
    count = 40
    for turns in range(30):
        store = await make_store()  # cold each time: the pop loads, pops, waits for the disk
        task = asyncio.create_task(WriteBehindSession("c1", store, user_id=1).pop_item())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if turns > 0:
            count -= 1
        assert sorted(on_disk(db_path)["c1"]) == list(range(1, count + 1))  # no flush needed
        assert await WriteBehindSession("c1", store, user_id=1).get_items() == items(0, count)
        await store.aclose()


# -- whose data, and where it goes ---------------------------------------------------------------


async def test_another_user_cannot_read_or_change_the_session(make_store: StoreFactory) -> None:
    store = await make_store()
    mine = WriteBehindSession("c1", store, user_id=1)
    await mine.add_items(items(0, 3))
    for intruder in (2, "1", None):
        theirs = WriteBehindSession("c1", store, user_id=intruder)
        assert await theirs.get_items() == []  # as if it did not exist
        assert await theirs.get_items(1) == []
        assert await theirs.pop_item() is None
        await theirs.clear_session()
        with pytest.raises(NotFound):
            await theirs.add_items(items(50, 1))
    assert await mine.get_items() == items(0, 3)


async def test_sessions_it_creates_are_marked_for_listings_and_an_apps_own_keeps_its_status(
    make_store: StoreFactory,
) -> None:
    """A chat app's sidebar lists a user's sessions: it can tell the agents' ones apart."""
    store = await make_store()
    await WriteBehindSession("agent-1", store, user_id=1).add_items(items(0, 2))
    await store.ensure_session("chat-1", user_id=1, title="my chat", status="active")
    await WriteBehindSession("chat-1", store, user_id=1).add_items(items(2, 1))
    assert {s.id: s.status for s in await store.list_sessions(1)} == {"agent-1": STATUS, "chat-1": "active"}
    assert STATUS == "openai-agents"


async def test_anonymous_sessions_stay_in_memory(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    anon = WriteBehindSession("anon-1", store, user_id=None, binding_token="tok")
    await anon.add_items(items(0, 3))
    assert await anon.pop_item() == item(2)
    stranger = WriteBehindSession("anon-1", store, user_id=None)  # without the token
    assert await stranger.get_items() == []
    with pytest.raises(NotFound):
        await stranger.add_items(items(9, 1))
    await store.flush()
    assert on_disk(db_path) == {}
    await store.aclose()
    store = await make_store()
    assert await WriteBehindSession("anon-1", store, user_id=None, binding_token="tok").get_items() == []


async def test_export_and_erasure_include_the_sessions_items(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    await WriteBehindSession("c1", store, user_id=42).add_items(items(0, 6))
    await WriteBehindSession("c2", store, user_id=7).add_items(items(0, 1))
    await store.flush()
    exported = b"".join([part async for part in store.export_user_json(42)])
    document = json.loads(exported)
    [session] = document["sessions"]
    assert session["id"] == "c1"
    assert [json.loads(m["content"]) for m in session["messages"]] == items(0, 6)
    assert {json.dumps(m["metadata"]) for m in session["messages"]} == {'{"format": "openai-agents"}'}
    assert [m["role"] for m in session["messages"]] == [
        "user",
        "assistant",
        "assistant",
        "tool",
        "assistant",
        "system",
    ]
    assert await store.delete_user(42) == 1
    assert await WriteBehindSession("c1", store, user_id=42).get_items() == []
    assert set(on_disk(db_path)) == {"c2"}


async def test_a_bad_session_id_or_user_id_is_refused_at_construction(make_store: StoreFactory) -> None:
    store = await make_store()
    with pytest.raises(ValidationError) as raised:
        WriteBehindSession("has spaces", store, user_id=1)
    assert raised.value.field == "session_id"
    with pytest.raises(ValidationError) as raised:
        WriteBehindSession("c1", store, user_id=1.5)  # type: ignore[arg-type]
    assert raised.value.field == "user_id"


# -- a real agent run -------------------------------------------------------------------------------


class CannedModel(Model):
    """A model that answers from a script and records what it was given: no network."""

    def __init__(self, turns: list[list[Any]]) -> None:
        self.turns = list(turns)
        self.inputs: list[Any] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: Any,
        tools: Any,
        output_schema: Any,
        handoffs: Any,
        tracing: Any,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        self.inputs.append(input)
        return ModelResponse(output=self.turns.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("this test runs without streaming")


def say(text: str, message_id: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=message_id,
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


@function_tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city} ☀️"


async def test_an_agent_run_keeps_its_history_across_a_restart(make_store: StoreFactory) -> None:
    model = CannedModel(
        [
            [
                ResponseFunctionToolCall(
                    type="function_call",
                    call_id="call_1",
                    name="weather",
                    arguments='{"city": "Lisboa"}',
                    id="fc_1",
                    status="completed",
                )
            ],
            [say("Il fait beau à Lisboa 🌞", "msg_1")],
            [say("مع السلامة", "msg_2")],
        ]
    )
    agent = Agent(name="assistant", model=model, tools=[weather])
    store = await make_store()
    session = WriteBehindSession("trip-1", store, user_id="alice")
    result = await Runner.run(agent, "What is the weather in Lisboa?", session=session, run_config=NO_TRACING)
    assert result.final_output == "Il fait beau à Lisboa 🌞"
    history = await session.get_items()
    assert [i.get("type", "message") for i in history] == [
        "message",
        "function_call",
        "function_call_output",
        "message",
    ]
    await store.aclose()

    store = await make_store()  # a new process's store on the same file
    session = WriteBehindSession("trip-1", store, user_id="alice")
    assert await session.get_items() == history
    result = await Runner.run(agent, "Merci, au revoir", session=session, run_config=NO_TRACING)
    assert result.final_output == "مع السلامة"
    # the model saw the whole conversation from before the restart, then the new input
    assert model.inputs[-1] == [*history, {"content": "Merci, au revoir", "role": "user"}]
    assert len(await session.get_items()) == 6
    # the same conversation is invisible to another user
    assert await WriteBehindSession("trip-1", store, user_id="bob").get_items() == []


async def test_the_store_is_closed_cleanly_by_a_new_user_typing_the_readme_example(db_path: Path) -> None:
    model = CannedModel([[say("Hello!", "msg_1")]])
    agent = Agent(name="assistant", model=model)
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        session = WriteBehindSession("conversation-1", store, user_id=42)
        await Runner.run(agent, "Hi!", session=session, run_config=NO_TRACING)
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        items_back = await WriteBehindSession("conversation-1", store, user_id=42).get_items()
    assert [i.get("role") for i in items_back] == ["user", "assistant"]


async def test_a_session_the_app_branched_is_read_along_its_active_path(make_store: StoreFactory) -> None:
    """An app that offers "regenerate" stores the new answer as an alternative: the agent
    sees the active path only, pops its end and appends after it."""
    store = await make_store()
    session = WriteBehindSession("c1", store, user_id=1)
    await session.add_items(items(0, 3))  # seqs 1, 2, 3
    await store.append_message("c1", user_id=1, role="assistant", content="another answer 🌏", parent_seq=2)
    assert await session.get_items() == [
        item(0),
        item(1),
        {"role": "assistant", "content": "another answer 🌏"},
    ]
    assert await session.get_items(limit=2) == [
        item(1),
        {"role": "assistant", "content": "another answer 🌏"},
    ]
    await store.switch_branch("c1", 3, user_id=1)
    assert await session.get_items(limit=1) == [item(2)]
    assert await session.pop_item() == item(2)  # off the path; kept as an alternative
    assert await session.get_items() == [item(0), item(1)]
    await session.add_items(items(5, 1))
    assert await session.get_items() == [item(0), item(1), item(5)]
    record = await store.get_session("c1", user_id=1)
    assert [m.seq for m in record.path] == [1, 2, 5] and record.alternatives(5) == (3, 4, 5)
