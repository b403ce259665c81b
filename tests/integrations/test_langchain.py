"""`WriteBehindChatMessageHistory` held to langchain-core's `BaseChatMessageHistory`
contract: the async methods, the sync forms from sync code (another thread, or a sync
program driving its own loop) and their clear refusal inside a running loop, exact round
trips of every message type, user isolation, anonymous sessions, export and erasure, and
a real `RunnableWithMessageHistory` run with a fake model whose history survives a
restart. Real SQLite files throughout."""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core._api import LangChainDeprecationWarning
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ChatMessageChunk,
    FunctionMessage,
    FunctionMessageChunk,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    ToolMessage,
    ToolMessageChunk,
    messages_from_dict,
    messages_to_dict,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory

from writebehind import ClosedError, Config, NotFound, ValidationError, WriteBehindError, WriteBehindStore
from writebehind.integrations.langchain import STATUS, SyncCallInEventLoopError, WriteBehindChatMessageHistory

from ..conftest import StoreFactory
from ..reliability.helpers import on_disk


def every_kind() -> list[BaseMessage]:
    """One of each message type, with tool calls, chunks, ids, names and non-ASCII text."""
    return [
        SystemMessage("Réponds en français. 日本語も OK。"),
        HumanMessage(
            "Quel temps fait-il à Lisboa? 👋🏽", id="h1", name="alice", additional_kwargs={"n": [1, 2.5]}
        ),
        AIMessage(
            "",
            id="a1",
            tool_calls=[{"name": "weather", "args": {"city": "Lisboa", "days": 2}, "id": "call_1"}],
            usage_metadata={"input_tokens": 10, "output_tokens": 3, "total_tokens": 13},
            response_metadata={"model_name": "fake", "finish_reason": "tool_calls"},
        ),
        ToolMessage("ensoleillé ☀️", tool_call_id="call_1", name="weather", artifact={"raw": [1, None]}),
        AIMessage("Il fait beau. مرحبا e\u0301"),
        AIMessageChunk(
            content="par",
            tool_call_chunks=[{"name": "weather", "args": '{"city": "Por', "id": "call_2", "index": 0}],
        ),
        HumanMessageChunk(content="שלום"),
        SystemMessageChunk(content="s"),
        ToolMessageChunk(content="t", tool_call_id="call_2"),
        ChatMessage(role="critic", content="meh"),
        ChatMessageChunk(role="assistant", content="chunk"),
        FunctionMessage(name="f", content="r"),
        FunctionMessageChunk(name="f", content="r2"),
        AIMessage(
            content=[{"type": "text", "text": "blocks"}, {"type": "image_url", "image_url": {"url": "x"}}]
        ),
    ]


def exactly(messages: list[BaseMessage]) -> list[Any]:
    """Equal and of the same classes (a chunk is not a message)."""
    return [(type(m), m) for m in messages]


# -- the contract, async --------------------------------------------------------------------------


async def test_it_is_a_chat_message_history_that_starts_empty(make_store: StoreFactory) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    assert isinstance(history, BaseChatMessageHistory)
    assert await history.aget_messages() == []
    await history.aclear()  # nothing to clear is fine
    await history.aadd_messages([])
    assert await store.list_sessions(1) == []  # an empty add creates nothing


async def test_every_message_type_round_trips_exactly_across_a_restart(make_store: StoreFactory) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id="u")
    sent = every_kind()
    await history.aadd_messages(sent[:5])
    await history.aadd_messages(sent[5:])  # a second add appends
    assert exactly(await history.aget_messages()) == exactly(sent)
    await store.aclose()
    store = await make_store()
    back = await WriteBehindChatMessageHistory("chat-1", store, user_id="u").aget_messages()
    assert exactly(back) == exactly(sent)
    assert messages_to_dict(back) == messages_to_dict(sent)
    assert back[2].tool_calls == sent[2].tool_calls  # type: ignore[attr-defined]


async def test_aclear_removes_everything_durably(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    await history.aadd_messages(every_kind()[:3])
    await store.flush()
    await history.aclear()
    assert await history.aget_messages() == []
    assert on_disk(db_path) == {}  # no flush needed
    await history.aadd_messages([HumanMessage("again")])
    assert await history.aget_messages() == [HumanMessage("again")]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (HumanMessage("x", additional_kwargs={"t": ("a", "tuple")}), "messages[1]"),
        (HumanMessage("x", additional_kwargs={"f": float("inf")}), "messages[1]"),
        (HumanMessage("lone \ud800 surrogate"), "messages[1]"),
        ("just a string", "messages[1]"),
    ],
)
async def test_a_message_that_would_not_come_back_equal_is_refused_and_nothing_is_added(
    make_store: StoreFactory, bad: Any, field: str
) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    await history.aadd_messages([HumanMessage("first")])
    with pytest.raises(ValidationError) as raised:
        await history.aadd_messages([AIMessage("ok"), bad])
    assert raised.value.field == field
    assert await history.aget_messages() == [HumanMessage("first")]


async def test_a_message_past_the_size_limit_is_refused_one_below_it_kept(make_store: StoreFactory) -> None:
    store = await make_store(max_message_bytes=200_000)
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    big = AIMessage("語" * 60_000)  # 180 KB: far past the 64 KiB metadata limit
    await history.aadd_messages([big])
    with pytest.raises(ValidationError) as raised:
        await history.aadd_messages([HumanMessage("x" * 200_000)])
    assert raised.value.field == "messages[0]"
    assert await history.aget_messages() == [big]


async def test_messages_the_app_appended_itself_come_back_as_plain_messages(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("chat-1", user_id=1)
    for role in ("user", "assistant", "system", "tool"):
        await store.append_message("chat-1", user_id=1, role=role, content=f"{role} text")
    back = await WriteBehindChatMessageHistory("chat-1", store, user_id=1).aget_messages()
    assert exactly(back) == exactly(
        [
            HumanMessage("user text"),
            AIMessage("assistant text"),
            SystemMessage("system text"),
            ChatMessage(role="tool", content="tool text"),
        ]
    )


async def test_aadd_messages_to_a_history_in_memory_is_one_store_append_per_message(
    make_store: StoreFactory,
) -> None:
    """The request path the benchmark measures: once the session exists, an add is its
    appends and nothing else; a cleared history is created again on first use."""
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    await history.aadd_messages([HumanMessage("first")])
    calls: list[str] = []
    for name in ("ensure_session", "get_session", "get_messages", "append_message"):
        real = getattr(store, name)

        async def counting(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            calls.append(_name)
            return await _real(*args, **kwargs)

        setattr(store, name, counting)
    await history.aadd_messages(every_kind()[:3])
    assert calls == ["append_message"] * 3
    await history.aclear()
    calls.clear()
    await history.aadd_messages([HumanMessage("again ✓")])
    assert "ensure_session" in calls
    assert await history.aget_messages() == [HumanMessage("again ✓")]


async def test_concurrent_adds_to_a_cold_history_never_interleave_and_a_cancelled_one_adds_nothing(
    make_store: StoreFactory,
) -> None:
    first = await make_store()
    await WriteBehindChatMessageHistory("chat-1", first, user_id=1).aadd_messages([HumanMessage("0")])
    await first.aclose()
    store = await make_store()  # cold: the first append of each task waits for the load
    batches = [[HumanMessage(f"{k}.{i} 世界") for i in range(10)] for k in range(1, 5)]
    cancelled = asyncio.create_task(
        WriteBehindChatMessageHistory("chat-1", store, user_id=1).aadd_messages([AIMessage("never")] * 5)
    )
    adds = [
        asyncio.create_task(WriteBehindChatMessageHistory("chat-1", store, user_id=1).aadd_messages(b))
        for b in batches
    ]
    await asyncio.sleep(0)  # they have all started: the load is in flight
    cancelled.cancel()
    await asyncio.gather(*adds)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    stored = await WriteBehindChatMessageHistory("chat-1", store, user_id=1).aget_messages()
    assert stored[0] == HumanMessage("0")
    runs = [stored[i : i + 10] for i in range(1, len(stored), 10)]
    assert sorted(json.dumps(messages_to_dict(r)) for r in runs) == sorted(
        json.dumps(messages_to_dict(b)) for b in batches
    )


# -- the sync forms -------------------------------------------------------------------------------


async def test_the_sync_forms_work_from_another_thread_while_the_loop_runs(make_store: StoreFactory) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)  # made on the store's loop
    sent = every_kind()

    def sync_code() -> list[BaseMessage]:
        assert threading.current_thread() is not threading.main_thread()
        history.add_messages(sent[:4])
        history.add_user_message("and a user message")  # BaseChatMessageHistory's helpers too
        history.add_ai_message(AIMessage("and an AI one"))
        return history.messages

    got = await asyncio.to_thread(sync_code)
    assert exactly(got) == exactly(
        [*sent[:4], HumanMessage("and a user message"), AIMessage("and an AI one")]
    )
    assert exactly(await history.aget_messages()) == exactly(got)
    await asyncio.to_thread(history.clear)
    assert await history.aget_messages() == []


async def test_the_sync_forms_refuse_inside_the_running_loop_instead_of_deadlocking(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    await history.aadd_messages([HumanMessage("kept")])
    with pytest.raises(SyncCallInEventLoopError) as raised:
        _ = history.messages
    assert "aget_messages" in str(raised.value)
    assert isinstance(raised.value, WriteBehindError)
    with pytest.raises(SyncCallInEventLoopError):
        history.add_messages([HumanMessage("not added")])
    with pytest.raises(SyncCallInEventLoopError):
        history.clear()
    assert await history.aget_messages() == [HumanMessage("kept")]


def test_a_sync_program_driving_its_own_loop(db_path: Path) -> None:
    """No loop is running anywhere: the sync forms run the store's loop themselves."""
    loop = asyncio.new_event_loop()
    stores: list[WriteBehindStore] = []

    def opened() -> WriteBehindStore:
        store = WriteBehindStore.from_config(Config(db_path=db_path))
        stores.append(store)
        loop.run_until_complete(store.start())
        return store

    try:
        idle = WriteBehindStore.from_config(Config(db_path=db_path))
        with pytest.raises(ClosedError):  # not started: no loop to run on
            _ = WriteBehindChatMessageHistory("chat-1", idle, user_id=1).messages
        store = opened()
        history = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
        history.add_messages([HumanMessage("bonjour"), AIMessage("salut 👋")])
        assert history.messages == [HumanMessage("bonjour"), AIMessage("salut 👋")]
        history.clear()
        history.add_messages([HumanMessage("kept")])
        loop.run_until_complete(store.aclose())
        history = WriteBehindChatMessageHistory("chat-1", opened(), user_id=1)
        assert history.messages == [HumanMessage("kept")]
    finally:
        # Closed whatever happened: a store left open would keep its SQLite thread, and
        # with it this process, alive after a failure.
        for store in stores:
            loop.run_until_complete(store.aclose())
        loop.close()
    with pytest.raises(ClosedError):
        _ = history.messages  # its loop is closed


# -- whose data, and where it goes ---------------------------------------------------------------


async def test_another_user_cannot_read_or_change_the_history(make_store: StoreFactory) -> None:
    store = await make_store()
    mine = WriteBehindChatMessageHistory("chat-1", store, user_id=1)
    await mine.aadd_messages([HumanMessage("private")])
    for intruder in (2, "1", None):
        theirs = WriteBehindChatMessageHistory("chat-1", store, user_id=intruder)
        assert await theirs.aget_messages() == []
        await theirs.aclear()
        with pytest.raises(NotFound):
            await theirs.aadd_messages([HumanMessage("intrusion")])
        assert await asyncio.to_thread(lambda h=theirs: h.messages) == []  # type: ignore[misc]
    assert await mine.aget_messages() == [HumanMessage("private")]


async def test_histories_it_creates_are_marked_for_listings_and_an_apps_own_keeps_its_status(
    make_store: StoreFactory,
) -> None:
    """A chat app's sidebar lists a user's sessions: it can tell the chains' ones apart."""
    store = await make_store()
    await WriteBehindChatMessageHistory("chain-1", store, user_id=1).aadd_messages([HumanMessage("hi")])
    await store.ensure_session("chat-1", user_id=1, title="my chat", status="active")
    await WriteBehindChatMessageHistory("chat-1", store, user_id=1).aadd_messages([HumanMessage("hi")])
    assert {s.id: s.status for s in await store.list_sessions(1)} == {"chain-1": STATUS, "chat-1": "active"}
    assert STATUS == "langchain"


async def test_anonymous_histories_stay_in_memory(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    anon = WriteBehindChatMessageHistory("anon-1", store, user_id=None, binding_token="tok")
    await anon.aadd_messages([HumanMessage("hi"), AIMessage("hello")])
    assert len(await anon.aget_messages()) == 2
    assert await WriteBehindChatMessageHistory("anon-1", store, user_id=None).aget_messages() == []
    await store.flush()
    assert on_disk(db_path) == {}


async def test_export_and_erasure_include_the_history(make_store: StoreFactory, db_path: Path) -> None:
    store = await make_store()
    sent = every_kind()
    await WriteBehindChatMessageHistory("chat-1", store, user_id=42).aadd_messages(sent)
    await WriteBehindChatMessageHistory("chat-2", store, user_id=7).aadd_messages([HumanMessage("other")])
    await store.flush()
    document = json.loads(b"".join([part async for part in store.export_user_json(42)]))
    [session] = document["sessions"]
    assert session["id"] == "chat-1"
    exported = messages_from_dict([json.loads(m["content"]) for m in session["messages"]])
    assert exactly(exported) == exactly(sent)
    assert {m["metadata"]["format"] for m in session["messages"]} == {"langchain"}
    assert [m["role"] for m in session["messages"]][:5] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert await store.delete_user(42) == 1
    assert await WriteBehindChatMessageHistory("chat-1", store, user_id=42).aget_messages() == []
    assert set(on_disk(db_path)) == {"chat-2"}


# -- a real run -----------------------------------------------------------------------------------


class Recorder:
    """What the model was given, each call (a step of the chain, no network)."""

    def __init__(self) -> None:
        self.prompts: list[list[BaseMessage]] = []

    def __call__(self, value: PromptValue) -> PromptValue:
        self.prompts.append(value.to_messages())
        return value


def chain_with_history(
    store: WriteBehindStore, user_id: int | str, replies: list[BaseMessage], recorder: Recorder
) -> RunnableWithMessageHistory:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are terse."), MessagesPlaceholder("history"), ("human", "{input}")]
    )
    model = FakeMessagesListChatModel(responses=replies)
    with warnings.catch_warnings():
        # Deprecated since langchain-core 1.6.4 (removal in 2.0), still the documented way
        # to give a chain a BaseChatMessageHistory.
        warnings.simplefilter("ignore", LangChainDeprecationWarning)
        return RunnableWithMessageHistory(
            prompt | RunnableLambda(recorder) | model,
            lambda session_id: WriteBehindChatMessageHistory(session_id, store, user_id=user_id),
            input_messages_key="input",
            history_messages_key="history",
        )


@pytest.fixture
def no_langchain_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("LANGCHAIN_TRACING_V2", "LANGSMITH_TRACING", "LANGCHAIN_API_KEY", "LANGSMITH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.mark.usefixtures("no_langchain_tracing")
async def test_a_chain_with_history_survives_a_restart(make_store: StoreFactory) -> None:
    config = {"configurable": {"session_id": "trip-1"}}
    recorder = Recorder()
    store = await make_store()
    replies: list[BaseMessage] = [
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "東京"}, "id": "call_1"}]),
        AIMessage("Il fait beau à 東京 ☀️"),
    ]
    chain = chain_with_history(store, "alice", replies, recorder)
    first = await chain.ainvoke({"input": "Quel temps à 東京?"}, config)
    assert first.tool_calls[0]["args"] == {"city": "東京"}
    # the sync path too, from a worker thread, as a sync caller inside an async app does
    second = await asyncio.to_thread(chain.invoke, {"input": "Et alors?"}, config)
    assert second.content == "Il fait beau à 東京 ☀️"
    before = await WriteBehindChatMessageHistory("trip-1", store, user_id="alice").aget_messages()
    assert exactly(before) == exactly(
        [HumanMessage("Quel temps à 東京?"), first, HumanMessage("Et alors?"), second]
    )
    await store.aclose()

    store = await make_store()  # a new process's store on the same file
    chain = chain_with_history(store, "alice", [AIMessage("مع السلامة")], recorder)
    third = await chain.ainvoke({"input": "Merci"}, config)
    # the model was given everything from before the restart, between the system prompt
    # and the new input
    assert exactly(recorder.prompts[-1]) == exactly(
        [SystemMessage("You are terse."), *before, HumanMessage("Merci")]
    )
    after = await WriteBehindChatMessageHistory("trip-1", store, user_id="alice").aget_messages()
    assert exactly(after) == exactly([*before, HumanMessage("Merci"), third])
    assert await WriteBehindChatMessageHistory("trip-1", store, user_id="bob").aget_messages() == []
