"""The framework adapters on PostgreSQL with two instances (two stores on one schema, in one
process): one session, thread or ADK session used from both in turn. One owner at a time
(the store hands a session over on a write elsewhere): every acknowledged item, checkpoint
and event is kept, in order, batches never interleave, ADK's stale-session check holds
across instances, and a third instance opened afterwards finds it all on disk."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypedDict

import pytest
from google.adk.errors import StaleSessionError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.genai import types
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from writebehind.integrations.adk import WriteBehindSessionService
from writebehind.integrations.langchain import WriteBehindChatMessageHistory
from writebehind.integrations.langgraph import WriteBehindSaver
from writebehind.integrations.openai_agents import WriteBehindSession

from ..pg import new_schema, postgres_schema, store_on

WORLD = ["héllo 👋🏽", "世界", "שלום", "مرحبا", "e\u0301", "𝄞"]


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = new_schema()
    async with postgres_schema(name):  # created (migrated) here, dropped afterwards
        yield name


def item(n: int) -> dict[str, Any]:
    return {"role": "user" if n % 2 == 0 else "assistant", "content": f"{n} {WORLD[n % len(WORLD)]}"}


async def test_an_agents_session_used_from_two_instances_keeps_every_item_in_order(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        on_a = WriteBehindSession("conv-1", a, user_id=42)
        on_b = WriteBehindSession("conv-1", b, user_id=42)
        await on_a.add_items([item(0), item(1)])  # type: ignore[list-item]
        await on_b.add_items([item(2)])  # type: ignore[list-item]  # B takes the session over
        assert await on_a.get_items() == [item(n) for n in range(3)]  # and A reads it from B
        await on_a.add_items([item(3)])  # type: ignore[list-item]  # and takes it back
        assert await on_b.pop_item() == item(3)
        # batches from both at once: each lands whole, none interleaves
        batches = [[item(100 * k + i) for i in range(5)] for k in range(1, 7)]
        sessions = [on_a, on_b] * 3
        await asyncio.gather(*(s.add_items(batch) for s, batch in zip(sessions, batches, strict=True)))  # type: ignore[arg-type]
        stored = await on_b.get_items()
        assert stored[:3] == [item(n) for n in range(3)]
        runs = [stored[i : i + 5] for i in range(3, len(stored), 5)]
        assert sorted(map(json.dumps, runs)) == sorted(map(json.dumps, batches))
        assert await WriteBehindSession("conv-1", a, user_id=7).get_items() == []  # another user
        assert a.stats().conflicts == b.stats().conflicts == 0
    async with store_on(schema) as c:
        assert await WriteBehindSession("conv-1", c, user_id=42).get_items() == stored


async def test_a_chat_history_used_from_two_instances_keeps_every_message(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        histories = [WriteBehindChatMessageHistory("chat-1", s, user_id="u") for s in (a, b)]
        sent = []
        for n in range(8):
            message = HumanMessage(WORLD[n % len(WORLD)]) if n % 2 == 0 else AIMessage(f"re {n}")
            await histories[n % 3 % 2].aadd_messages([message])
            sent.append(message)
        assert await histories[0].aget_messages() == sent
    async with store_on(schema) as c:
        assert await WriteBehindChatMessageHistory("chat-1", c, user_id="u").aget_messages() == sent


class Chat(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def chat_graph(saver: WriteBehindSaver) -> Any:
    def reply(state: Chat) -> dict[str, Any]:
        last = state["messages"][-1].content
        return {"messages": [AIMessage(f"{len(state['messages'])}: {last}")]}

    builder = StateGraph(Chat)
    builder.add_node("reply", reply)
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    return builder.compile(checkpointer=saver)


async def test_a_langgraph_thread_run_on_two_instances_in_turn_keeps_its_whole_history(schema: str) -> None:
    config: RunnableConfig = {"configurable": {"thread_id": "trip"}}
    async with store_on(schema) as a, store_on(schema) as b:
        graphs = [chat_graph(WriteBehindSaver(a, user_id=42)), chat_graph(WriteBehindSaver(b, user_id=42))]
        for turn in range(6):  # A, B, A, B, ...: each turn reads the thread the other wrote
            result = await graphs[turn % 2].ainvoke({"messages": [HumanMessage(WORLD[turn])]}, config)
            assert len(result["messages"]) == 2 * (turn + 1)
        texts = [m.content for m in result["messages"]]
        assert texts[0::2] == WORLD
        assert texts[1::2] == [f"{2 * t + 1}: {WORLD[t]}" for t in range(6)]
        history = [c async for c in WriteBehindSaver(a, user_id=42).alist(config)]
        assert len(history) == 6 * 3  # input, start, reply per turn: none lost to a handoff
        other = chat_graph(WriteBehindSaver(b, user_id=7))
        assert (await other.aget_state(config)).values == {}  # another user has no such thread
    async with store_on(schema) as c:
        state = await chat_graph(WriteBehindSaver(c, user_id=42)).aget_state(config)
        assert [m.content for m in state.values["messages"]] == texts


def text_event(author: str, text: str, **state: Any) -> Event:
    return Event(
        invocation_id="inv-1",
        author=author,
        content=types.Content(role="user" if author == "user" else "model", parts=[types.Part(text=text)]),
        actions=EventActions(state_delta=state),
    )


async def test_an_adk_session_on_two_instances_keeps_its_events_and_refuses_a_stale_copy(schema: str) -> None:
    async with store_on(schema) as a, store_on(schema) as b:
        service_a, service_b = WriteBehindSessionService(a), WriteBehindSessionService(b)
        created = await service_a.create_session(app_name="trips", user_id="u1", session_id="s1")
        await service_a.append_event(created, text_event("user", WORLD[0], **{"user:lang": "fr"}))
        on_b = await service_b.get_session(app_name="trips", user_id="u1", session_id="s1")
        assert on_b is not None and on_b.state == {"user:lang": "fr"}
        await service_b.append_event(on_b, text_event("agent", WORLD[1], step=1))
        with pytest.raises(StaleSessionError):  # A's copy is older than what B wrote
            await service_a.append_event(created, text_event("user", "late"))
        fresh = await service_a.get_session(app_name="trips", user_id="u1", session_id="s1")
        assert fresh is not None and fresh.state == {"user:lang": "fr", "step": 1}
        await service_a.append_event(fresh, text_event("user", WORLD[2]))
    async with store_on(schema) as c:
        found = await WriteBehindSessionService(c).get_session(
            app_name="trips", user_id="u1", session_id="s1"
        )
        assert found is not None
        assert [e.content.parts[0].text for e in found.events if e.content and e.content.parts] == WORLD[:3]
        assert found.state == {"user:lang": "fr", "step": 1}
