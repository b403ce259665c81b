"""Model-based test: random histories of the public API against a plain reference model.

A hypothesis state machine drives ensure, append, streamed token updates, status and
title updates, deletes of a session or a whole user, claims, flushes, graceful restarts
and crash-restarts (as SIGKILL would leave it: everything since the last flush gone),
for signed-in and anonymous users, and after every step compares what the store answers
with the model. CI runs a modest number of histories; `make soak` runs 10,000.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from writebehind import Config, NotFound, WriteBehindStore

SOAK = bool(os.environ.get("WRITEBEHIND_SOAK"))
USERS = st.sampled_from([1, 2, "u3", None])
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)


@dataclass
class Session:
    user: int | str | None
    binding: str | None
    messages: list[str] = field(default_factory=list)
    status: str = "active"
    title: str | None = None


class StoreMachine(RuleBasedStateMachine):
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="wb-model-"))
        self.config = Config(
            db_path=self.dir / "model.db", flush_interval_ms=3_600_000, flush_batch=10_000, cache_size=4
        )
        self.store = self.open()
        self.model: dict[str, Session] = {}
        self.durable: dict[str, Session] = {}  # what the disk holds as of the last flush
        self.counter = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def open(self) -> WriteBehindStore:
        store = WriteBehindStore.from_config(self.config)
        self.loop.run_until_complete(store.start())
        return store

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.store.aclose())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def evicted(self, sid: str) -> None:
        """An anonymous session lives in memory only, bounded by the LRU: with a hot tier of
        4 it is the one thing the store may drop. A signed-in one never vanishes."""
        assert self.model[sid].user is None, f"signed-in session {sid} vanished"
        del self.model[sid]

    def persisted(self) -> dict[str, Session]:
        return {sid: copy.deepcopy(s) for sid, s in self.model.items() if s.user is not None}

    # -- rules ---------------------------------------------------------------------------------

    @rule(target=sessions, user=USERS, title=st.none() | TEXT)
    def ensure(self, user: int | str | None, title: str | None) -> str:
        self.counter += 1
        binding = f"b{self.counter}" if user is None else None
        record = self.run(self.store.ensure_session(user_id=user, title=title, binding_token=binding))
        sid = record.id
        self.model[sid] = Session(user, binding, title=title)
        return sid

    def expect(self, sid: str, user: int | str | None) -> Session | None:
        """The model's session if `user` may touch it, else None (the store must say NotFound)."""
        session = self.model.get(sid)
        if session is None or session.user != user:
            return None
        return session

    def call(self, sid: str, user: int | str | None, coro_factory: Callable[[str | None], Any]) -> Any:
        session = self.expect(sid, user)
        binding = session.binding if session else None
        coro = coro_factory(binding)
        if session is not None and session.user is None:
            try:
                return self.run(coro)
            except NotFound:
                self.evicted(sid)
                return None
        if session is None:
            try:
                self.run(coro)
            except NotFound:
                return None
            raise AssertionError(f"{user!r} reached session {sid} it does not own")
        return self.run(coro)

    @rule(sid=sessions, user=USERS, text=TEXT)
    def append(self, sid: str, user: int | str | None, text: str) -> None:
        session = self.expect(sid, user)
        result = self.call(
            sid,
            user,
            lambda b: self.store.append_message(
                sid, user_id=user, role="user", content=text, binding_token=b
            ),
        )
        if session is not None and result is not None:
            session.messages.append(text)
            assert result.seq == len(session.messages)

    @rule(sid=sessions, tokens=st.lists(TEXT, max_size=6))
    def stream(self, sid: str, tokens: list[str]) -> None:
        session = self.model.get(sid)
        if session is None:
            return
        user, b = session.user, session.binding
        try:
            message = self.run(
                self.store.append_message(sid, user_id=user, role="assistant", content="", binding_token=b)
            )
        except NotFound:
            self.evicted(sid)
            return
        for token in tokens:
            self.run(self.store.update_message(sid, message.id, user_id=user, append=token, binding_token=b))
        session.messages.append("".join(tokens))

    @rule(sid=sessions, user=USERS, status=st.sampled_from(["active", "archived"]), title=st.none() | TEXT)
    def update(self, sid: str, user: int | str | None, status: str, title: str | None) -> None:
        session = self.expect(sid, user)
        result = self.call(
            sid,
            user,
            lambda b: self.store.update_session(
                sid, user_id=user, status=status, title=title, binding_token=b
            ),
        )
        if session is not None and result is not None:
            session.status, session.title = status, title

    @rule(sid=sessions, user=USERS)
    def delete(self, sid: str, user: int | str | None) -> None:
        session = self.expect(sid, user)
        self.call(sid, user, lambda b: self.store.delete_session(sid, user_id=user, binding_token=b))
        if session is not None:
            self.model.pop(sid, None)
            self.durable.pop(sid, None)  # durable when it returns

    @rule(user=st.sampled_from([1, 2, "u3"]))
    def delete_user(self, user: int | str) -> None:
        count = self.run(self.store.delete_user(user))
        gone = [sid for sid, s in {**self.durable, **self.model}.items() if s.user == user]
        assert count == len(gone)
        for sid in gone:
            self.model.pop(sid, None)
            self.durable.pop(sid, None)

    @rule(sid=sessions, user=st.sampled_from([1, 2, "u3"]))
    def claim(self, sid: str, user: int | str) -> None:
        session = self.model.get(sid)
        allowed = session is not None and session.user in (None, user)
        b = session.binding if session else None
        try:
            self.run(self.store.claim(sid, user_id=user, binding_token=b))
        except NotFound:
            if allowed and session is not None and session.user is None:
                self.evicted(sid)
                return
            assert not allowed
            return
        assert allowed and session is not None
        session.user, session.binding = user, None

    @rule()
    def flush(self) -> None:
        self.run(self.store.flush())
        self.durable = self.persisted()

    @rule()
    def restart(self) -> None:
        self.run(self.store.aclose())
        self.store = self.open()
        self.model = self.persisted()
        self.durable = copy.deepcopy(self.model)

    @rule()
    def crash_restart(self) -> None:
        self.run(self.store._abandon())
        self.store = self.open()
        self.model = copy.deepcopy(self.durable)

    # -- what must hold after every step ---------------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        for sid, session in list(self.model.items()):
            try:
                record = self.run(
                    self.store.get_session(sid, user_id=session.user, binding_token=session.binding)
                )
            except NotFound:
                self.evicted(sid)
                continue
            assert [m.content for m in record.messages] == session.messages
            assert [m.seq for m in record.messages] == list(range(1, len(session.messages) + 1))
            assert (record.status, record.title) == (session.status, session.title)
        for user in (1, 2, "u3"):
            listed = self.run(self.store.list_sessions(user))
            assert sorted(s.id for s in listed) == sorted(
                sid for sid, s in self.model.items() if s.user == user
            )


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("WRITEBEHIND_MODEL_EXAMPLES", 10_000 if SOAK else 25)),
    stateful_step_count=40 if SOAK else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_against_model = StoreMachine.TestCase
