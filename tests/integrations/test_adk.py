"""`WriteBehindSessionService`: ADK's session-service contract on a real store and a real
SQLite file; a real `Runner` with an `LlmAgent` on a fake model (no network) whose history
survives a restart; state scopes, the stale-session check, streamed (partial) events,
ownership, export and erasure, anonymous users and cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.apps import App
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.sessions.session import Session
from google.genai import types
from pydantic import Field

from writebehind import Config, SessionStore, SQLiteBackend, ValidationError, WriteBehindStore
from writebehind.backends.postgres import PostgresBackend
from writebehind.integrations.adk import STATUS, USER_STATE_STATUS, WriteBehindSessionService

from ..pg import DSN, new_schema, postgres_schema

# Emoji, CJK, RTL, a combining mark, and a character outside the BMP.
WORLD = "héllo 👋🏽 世界 שלום مرحبا é 𝄞"
APP = "trips"


def _config(db_path: Path, **overrides: Any) -> Config:
    return Config(db_path=db_path, **{"flush_interval_ms": 3_600_000, **overrides})


@asynccontextmanager
async def opened(
    db_path: Path, *, schema: str | None = None, **overrides: Any
) -> AsyncIterator[WriteBehindStore]:
    """A started store on the SQLite file, or on PostgreSQL in `schema` when one is given."""
    config = _config(db_path, **overrides)
    if schema is None:
        store = WriteBehindStore.from_config(config)
    else:
        store = WriteBehindStore(SessionStore(), PostgresBackend(DSN, schema=schema), config=config)
    async with store:
        yield store


def text_event(author: str, text: str, *, state: dict[str, Any] | None = None, **more: Any) -> Event:
    return Event(
        invocation_id="inv-1",
        author=author,
        content=types.Content(role="user" if author == "user" else "model", parts=[types.Part(text=text)]),
        actions=EventActions(state_delta=state or {}),
        **more,
    )


def on_disk(db_path: Path, sql: str) -> list[Any]:
    with sqlite3.connect(db_path) as db:
        return list(db.execute(sql))


# -- a real run: Runner + LlmAgent on a fake model, streamed, across a restart -----------------------


class FakeLlm(BaseLlm):
    """Answers with canned replies, streamed in chunks when asked to; remembers what it saw."""

    model: str = "fake-model"
    replies: list[str] = Field(default_factory=list)
    seen: list[list[str]] = Field(default_factory=list)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        self.seen.append(
            [part.text or "" for content in llm_request.contents for part in content.parts or [] if part.text]
        )
        reply = self.replies.pop(0)
        if stream:
            for i in range(0, len(reply), 4):
                yield LlmResponse(
                    content=types.Content(role="model", parts=[types.Part(text=reply[i : i + 4])]),
                    partial=True,
                )
        yield LlmResponse(
            content=types.Content(role="model", parts=[types.Part(text=reply)]), turn_complete=True
        )


def runner_for(service: WriteBehindSessionService, model: FakeLlm) -> Runner:
    agent = LlmAgent(name="helper", model=model, instruction="Plan trips.", output_key="last_reply")
    return Runner(
        app=App(name=APP, root_agent=agent, plugins=[service.streaming_plugin()]), session_service=service
    )


async def turn(runner: Runner, user: str, session_id: str, text: str) -> list[Event]:
    message = types.Content(role="user", parts=[types.Part(text=text)])
    config = RunConfig(streaming_mode=StreamingMode.SSE)
    return [
        e
        async for e in runner.run_async(
            user_id=user, session_id=session_id, new_message=message, run_config=config
        )
    ]


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_a_runner_conversation_survives_a_restart_and_continues(db_path: Path, engine: str) -> None:
    async with AsyncExitStack() as stack:
        schema = None
        if engine == "postgres":
            schema = new_schema()
            await stack.enter_async_context(postgres_schema(schema))  # dropped at the end
        await _conversation_across_a_restart(db_path, schema)


async def _conversation_across_a_restart(db_path: Path, schema: str | None) -> None:
    first = f"Lisbon in May {WORLD}"
    async with opened(db_path, schema=schema) as store:
        service = WriteBehindSessionService(store)
        model = FakeLlm(replies=[first])
        session = await service.create_session(app_name=APP, user_id="ana", state={"user:lang": "pt"})
        events = await turn(runner_for(service, model), "ana", session.id, f"plan a trip {WORLD}")
        assert [e.partial for e in events] == [True] * -(-len(first) // 4) + [None]
        before = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert before is not None
        # The streamed reply was one draft row, turned into the final event in place.
        sid = service._session_sid(service._owner(APP, "ana"), APP, "ana", session.id)
        messages = await store.get_messages(sid, user_id="ana")
        assert len(messages) == 3  # the state, the user's message, the reply
    async with opened(db_path, schema=schema) as store:
        service = WriteBehindSessionService(store)
        after = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert after is not None
        assert after.events == before.events
        assert [
            (e.author, e.content.parts[0].text) for e in after.events if e.content and e.content.parts
        ] == [
            ("user", f"plan a trip {WORLD}"),
            ("helper", first),
        ]
        assert after.state == {"last_reply": first, "user:lang": "pt"}
        model = FakeLlm(replies=["Porto next"])
        await turn(runner_for(service, model), "ana", session.id, "and then?")
        # The model was given the conversation from before the restart.
        assert model.seen[-1][-3:] == [f"plan a trip {WORLD}", first, "and then?"]
        final = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert final is not None and len(final.events) == 4
        assert final.state["last_reply"] == "Porto next"
        assert await service.get_partial_events(app_name=APP, user_id="ana", session_id=session.id) == []


async def test_a_stream_cut_short_keeps_its_text_as_one_partial_event(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(app_name=APP, user_id="ana")
        chunks = ["Dear ", WORLD, " trav", "eller"]
        partials = [text_event("helper", c, partial=True) for c in chunks]
        for p in partials[1:]:
            p.id, p.timestamp = partials[0].id, partials[0].timestamp
        for p in partials:
            assert await service.append_event(session, p) is p
        assert session.events == []  # partial events are not part of the session, as in ADK
        sid = service._session_sid(service._owner(APP, "ana"), APP, "ana", session.id)
        assert len(await store.get_messages(sid, user_id="ana")) == 2  # the state and ONE draft
    async with opened(db_path) as store:  # the process went away before the final event
        service = WriteBehindSessionService(store)
        [cut] = await service.get_partial_events(app_name=APP, user_id="ana", session_id=session.id)
        assert cut.partial and cut.id == partials[0].id and cut.author == "helper"
        assert cut.content is not None and cut.content.parts is not None
        assert cut.content.parts[0].text == "".join(chunks)
        reloaded = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert reloaded is not None and reloaded.events == []


async def test_a_draft_with_messages_after_it_is_emptied_and_the_event_appended(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(app_name=APP, user_id="ana")
        partial = text_event("helper", "streaming…", partial=True)
        await service.append_event(session, partial)
        other = text_event("user", "meanwhile")
        await service.append_event(session, other)
        final = text_event("helper", "streaming… done")
        final.id = partial.id
        await service.append_event(session, final)
        got = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert got is not None and got.events == [other, final]
        assert await service.get_partial_events(app_name=APP, user_id="ana", session_id=session.id) == []


# -- the protocol ------------------------------------------------------------------------------------


async def test_create_get_list_delete(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        made = await service.create_session(
            app_name=APP, user_id="ana", session_id="  s1  ", state={"k": WORLD}
        )
        assert made.id == "s1" and made.state == {"k": WORLD} and made.events == []
        with pytest.raises(AlreadyExistsError):
            await service.create_session(app_name=APP, user_id="ana", session_id="s1")
        generated = await service.create_session(app_name=APP, user_id="ana")
        assert generated.id and generated.id != "s1"
        await service.create_session(app_name="other-app", user_id="ana", session_id="s1")
        await service.create_session(app_name=APP, user_id="bob", session_id="s1")
        await service.append_event(made, text_event("user", "hi"))
        listed = await service.list_sessions(app_name=APP, user_id="ana")
        assert [s.id for s in listed.sessions] == [generated.id, "s1"]  # least recently updated first
        assert all(s.events == [] for s in listed.sessions)
        assert listed.sessions[1].state == {"k": WORLD}
        assert await service.get_session(app_name=APP, user_id="ana", session_id="nope") is None
        await service.delete_session(app_name=APP, user_id="ana", session_id="s1")
        assert await service.get_session(app_name=APP, user_id="ana", session_id="s1") is None
        await service.delete_session(app_name=APP, user_id="ana", session_id="s1")  # no error
        assert await service.get_session(app_name="other-app", user_id="ana", session_id="s1") is not None
        assert await service.get_session(app_name=APP, user_id="bob", session_id="s1") is not None
        with pytest.raises(ValidationError) as err:
            await service.list_sessions(app_name=APP)
        assert err.value.field == "user_id"
        with pytest.raises(SessionNotFoundError):
            await service.append_event(made, text_event("user", "after delete"))


async def test_state_scopes_as_adk_defines_them(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        a1 = await service.create_session(
            app_name=APP, user_id="ana", state={"s": 1, "user:u": 1, "app:a": 1, "temp:t": 1}
        )
        assert a1.state == {"s": 1, "user:u": 1, "app:a": 1}
        await service.append_event(
            a1, text_event("user", "x", state={"s": 2, "user:u": 2, "app:a": 2, "temp:t": 9})
        )
        assert a1.state["temp:t"] == 9  # on the object in memory for this invocation only
        a2 = await service.create_session(app_name=APP, user_id="ana")
        bob = await service.create_session(app_name=APP, user_id="bob")
        elsewhere = await service.create_session(app_name="other", user_id="ana")
        assert a2.state == {"user:u": 2, "app:a": 2}  # user state: the user's sessions of the app
        assert bob.state == {"app:a": 2}  # app state: every user of the app
        assert elsewhere.state == {}
        assert await service.get_user_state(app_name=APP, user_id="ana") == {"u": 2}
        stored = await service.get_session(app_name=APP, user_id="ana", session_id=a1.id)
        assert stored is not None and stored.state == {"s": 2, "user:u": 2, "app:a": 2}
        [event] = stored.events
        assert event.actions.state_delta == {"s": 2, "user:u": 2, "app:a": 2}  # temp: trimmed
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        bob2 = await service.create_session(app_name=APP, user_id="bob")
        assert bob2.state == {"app:a": 2}  # app state survives a restart
    # The app state belongs to no user: not in anybody's listing, export or erasure.
    async with opened(db_path) as store:
        assert {s.status for s in await store.list_sessions("ana")} == {STATUS, USER_STATE_STATUS}
        await store.delete_user("ana")
        await store.delete_user("bob")
        service = WriteBehindSessionService(store)
        assert (await service.create_session(app_name=APP, user_id="cy")).state == {"app:a": 2}


async def test_get_session_config_filters_events(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(app_name=APP, user_id="ana")
        events = []
        for i in range(5):
            event = text_event("user", f"m{i}", timestamp=1000.0 + i)
            events.append(await service.append_event(session, event))

        async def ids(config: GetSessionConfig | None) -> list[str]:
            got = await service.get_session(app_name=APP, user_id="ana", session_id=session.id, config=config)
            assert got is not None
            return [e.id for e in got.events]

        every = [e.id for e in events]
        assert await ids(None) == every
        assert await ids(GetSessionConfig(num_recent_events=2)) == every[-2:]
        assert await ids(GetSessionConfig(num_recent_events=0)) == []
        assert await ids(GetSessionConfig(after_timestamp=1002.0)) == every[2:]
        assert await ids(GetSessionConfig(after_timestamp=1002.0, num_recent_events=1)) == every[-1:]
        assert await ids(GetSessionConfig(after_timestamp=2000.0)) == []


async def test_events_round_trip_exactly(db_path: Path) -> None:
    rich = Event(
        invocation_id=f"inv {WORLD}",
        author="helper",
        branch="root.helper",
        content=types.Content(
            role="model",
            parts=[
                types.Part(text=WORLD),
                types.Part(
                    function_call=types.FunctionCall(
                        id="c1", name="book", args={"to": WORLD, "n": [1, 2.5, None]}
                    )
                ),
                types.Part(inline_data=types.Blob(mime_type="image/png", data=b"\x00\xff" + WORLD.encode())),
            ],
        ),
        actions=EventActions(state_delta={"k": WORLD}),
        long_running_tool_ids={"c1"},
        custom_metadata={"m": WORLD},
    )
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(app_name=APP, user_id=f"usér {WORLD}", session_id=f"s {WORLD}")
        await service.append_event(session, rich)
    async with opened(db_path) as store:
        got = await WriteBehindSessionService(store).get_session(
            app_name=APP, user_id=f"usér {WORLD}", session_id=f"s {WORLD}"
        )
        assert got is not None and got.events == [rich] and got.state == {"k": WORLD}


async def test_stale_session_objects_are_refused(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        made = await service.create_session(app_name=APP, user_id="ana")
        one = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
        two = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
        assert one is not None and two is not None
        await service.append_event(one, text_event("user", "first"))
        await service.append_event(one, text_event("user", "second"))  # its own writes keep it fresh
        with pytest.raises(StaleSessionError):
            await service.append_event(two, text_event("user", "from an old copy"))
        # A session object built by hand (no revision): stale if storage moved on past it.
        by_hand = Session(id=made.id, app_name=APP, user_id="ana", last_update_time=0.0)
        with pytest.raises(StaleSessionError):
            await service.append_event(by_hand, text_event("user", "by hand"))
        # Deleted and created again under the same id: an old object does not match it.
        await service.delete_session(app_name=APP, user_id="ana", session_id=made.id)
        await service.create_session(app_name=APP, user_id="ana", session_id=made.id)
        with pytest.raises(StaleSessionError):
            await service.append_event(one, text_event("user", "old life"))
        fresh = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
        assert fresh is not None
        await service.append_event(fresh, text_event("user", "new life"))
        got = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
        assert got is not None and [
            e.content.parts[0].text for e in got.events if e.content and e.content.parts
        ] == ["new life"]


async def test_an_equal_redelivery_is_appended_once(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(app_name=APP, user_id="ana")
        event = text_event("user", "once", state={"n": 1})
        await service.append_event(session, event)
        await service.append_event(session, event)
        got = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert got is not None and got.events == [event]


async def test_bad_input_is_a_validation_error_naming_the_field_and_writes_nothing(db_path: Path) -> None:
    async with opened(db_path, max_message_bytes=2000) as store:
        service = WriteBehindSessionService(store)
        for kwargs, field in [
            ({"app_name": "", "user_id": "ana"}, "app_name"),
            ({"app_name": APP, "user_id": 7}, "user_id"),
            ({"app_name": APP, "user_id": "ana", "session_id": "bad\x00id"}, "session_id"),
            ({"app_name": APP, "user_id": "lone \ud800"}, "user_id"),
            ({"app_name": APP, "user_id": "ana", "state": {"big": "x" * 3000}}, "state"),
        ]:
            with pytest.raises(ValidationError) as err:
                await service.create_session(**kwargs)
            assert err.value.field == field
        session = await service.create_session(app_name=APP, user_id="ana")
        with pytest.raises(ValidationError) as err:
            await service.append_event(session, text_event("helper", "x" * 3000, state={"user:u": 1}))
        assert err.value.field == "event"
        got = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
        assert got is not None and got.events == []
        assert await service.get_user_state(app_name=APP, user_id="ana") == {}


# -- privacy: isolation, export, erasure, anonymous ----------------------------------------------------


async def test_users_only_ever_see_their_own(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        await service.create_session(app_name=APP, user_id="ana", session_id="mine", state={"secret": WORLD})
        assert await service.get_session(app_name=APP, user_id="bob", session_id="mine") is None
        assert (await service.list_sessions(app_name=APP, user_id="bob")).sessions == []
        await service.delete_session(app_name=APP, user_id="bob", session_id="mine")
        assert await service.get_session(app_name=APP, user_id="ana", session_id="mine") is not None
        assert await store.list_sessions("bob") == []


async def test_export_and_delete_user_include_sessions_and_user_state(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        session = await service.create_session(
            app_name=APP, user_id="ana", state={"user:diet": f"veg {WORLD}"}
        )
        await service.append_event(session, text_event("user", f"my secret {WORLD}", state={"app:n": 1}))
        exported = orjson.loads(b"".join([c async for c in store.export_user_json("ana")]))
        statuses = sorted(s["status"] for s in exported["sessions"])
        assert statuses == [STATUS, USER_STATE_STATUS]
        text = orjson.dumps(exported).decode()
        assert f"my secret {WORLD}" in text and f"veg {WORLD}" in text
        assert await store.delete_user("ana") == 2
        assert await service.get_session(app_name=APP, user_id="ana", session_id=session.id) is None
        assert await service.get_user_state(app_name=APP, user_id="ana") == {}
    contents = " ".join(row[0] for row in on_disk(db_path, "SELECT content FROM messages"))
    assert "my secret" not in contents and "veg" not in contents
    assert '"n":1' in contents  # the app state stays: it is nobody's


async def test_anonymous_users_stay_in_memory_and_sealed(db_path: Path) -> None:
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store, anonymous=lambda user: user.startswith("anon-"))
        session = await service.create_session(
            app_name=APP, user_id="anon-1", state={"user:x": 1, "k": WORLD}
        )
        await service.append_event(session, text_event("user", f"hi {WORLD}"))
        got = await service.get_session(app_name=APP, user_id="anon-1", session_id=session.id)
        assert got is not None and len(got.events) == 1 and got.state == {"user:x": 1, "k": WORLD}
        assert [s.id for s in (await service.list_sessions(app_name=APP, user_id="anon-1")).sessions] == [
            session.id
        ]
        # Another service (another process's, or a forged request) cannot open it.
        other = WriteBehindSessionService(store, anonymous=lambda user: user.startswith("anon-"))
        assert await other.get_session(app_name=APP, user_id="anon-1", session_id=session.id) is None
        await store.flush()
    # On disk: only the app's state (nobody's), none of the anonymous user's data.
    assert on_disk(db_path, "SELECT user_id, status FROM sessions") == [("adk:app-state", "adk-app-state")]
    contents = " ".join(row[0] for row in on_disk(db_path, "SELECT content FROM messages"))
    assert "hi" not in contents and WORLD not in contents and '"x"' not in contents


# -- durability and cancellation ------------------------------------------------------------------------


@pytest.mark.parametrize(("durable", "survives"), [(True, True), (False, False)])
async def test_durable_appends_survive_a_crash(db_path: Path, durable: bool, survives: bool) -> None:
    async with opened(db_path) as store:
        session = await WriteBehindSessionService(store).create_session(
            app_name=APP, user_id="ana", session_id="d"
        )
    store = WriteBehindStore.from_config(_config(db_path))
    await store.start()
    service = WriteBehindSessionService(store, durable=durable)
    fresh = await service.get_session(app_name=APP, user_id="ana", session_id=session.id)
    assert fresh is not None
    await service.append_event(fresh, text_event("user", "kept?", state={"user:u": 1}))
    await store._abandon()  # a crash: no final flush
    async with opened(db_path) as store:
        service = WriteBehindSessionService(store)
        got = await service.get_session(app_name=APP, user_id="ana", session_id="d")
        assert got is not None
        assert (len(got.events), got.state) == ((1, {"user:u": 1}) if survives else (0, {}))


class YieldingStore(WriteBehindStore):
    """A real store whose every call first yields to the loop: each is a point where a
    cancellation can land (the real store runs a hot session's calls without suspending)."""

    async def append_message(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().append_message(*args, **kwargs)

    async def update_message(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().update_message(*args, **kwargs)

    async def get_messages(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().get_messages(*args, **kwargs)

    async def ensure_session(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return await super().ensure_session(*args, **kwargs)


async def test_a_cancelled_append_is_all_or_nothing_across_state_scopes(db_path: Path) -> None:
    config = _config(db_path)
    async with YieldingStore(SessionStore(), SQLiteBackend(db_path), config=config) as store:
        service = WriteBehindSessionService(store)
        made = await service.create_session(app_name=APP, user_id="ana")
        outcomes = set()
        for k in range(30):
            session = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
            assert session is not None
            delta = {"s": k, "user:u": k, "app:a": k}
            task = asyncio.ensure_future(
                service.append_event(session, text_event("user", f"m{k}", state=delta))
            )
            for _ in range(k):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
                outcomes.add("done")
            except asyncio.CancelledError:
                outcomes.add("cancelled")
            got = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
            assert got is not None
            appended = any(
                e.content and e.content.parts and e.content.parts[0].text == f"m{k}" for e in got.events
            )
            scoped = (got.state.get("s"), got.state.get("user:u"), got.state.get("app:a"))
            if appended:
                assert scoped == (k, k, k)
            else:
                # Not begun: nothing of it anywhere.
                assert k not in scoped
        assert outcomes == {"done", "cancelled"}
        final = await service.get_session(app_name=APP, user_id="ana", session_id=made.id)
        assert final is not None
        await service.append_event(final, text_event("user", "still works"))
