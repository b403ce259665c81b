"""A Google ADK session service (`BaseSessionService`) over a `WriteBehindStore`.

    store = WriteBehindStore.from_config()
    async with store:
        service = WriteBehindSessionService(store)
        app = App(name="trips", root_agent=agent, plugins=[service.streaming_plugin()])
        runner = Runner(app=app, session_service=service)

`append_event` is an in-memory append (no commit per event); the store's worker batches
what changed to SQLite or PostgreSQL. Every piece of an ADK session is an ordinary
writebehind message, so the user's export has their sessions and their `user:` state,
`delete_user` erases both, and anonymous users never touch the disk.

How it is stored (the mapping):

- **An ADK session is one writebehind session** owned by the ADK `user_id` (status `"adk"`,
  title `"<app>: <session id>"`). Its id is a hash of (app, user, session id), so two
  users' sessions named alike never meet. Its first message (id `"state"`) holds the
  session-scoped state and a revision; each event is one message whose content is the
  `Event` model's JSON (`model_dump_json(exclude_none=True)`, as ADK's SQLite service), so
  events round-trip exactly.
- **`user:` state** (shared by a user's sessions of one app) is a session of its own owned
  by that user (status `"adk-user-state"`): it is in the user's export and erasure.
- **`app:` state** belongs to no user. It is a session owned by the pseudo-user
  `app_state_user` (default `"adk:app-state"`, status `"adk-app-state"`): persisted like
  any signed-in data, so it survives restarts, and neither exported with nor erased by any
  real user. Pick an id no real user can have.
- **`temp:` state** is applied to the session object in memory and never stored, as ADK's
  own services do (the event's delta is trimmed before it is written).
- State values are made JSON-safe with ADK's own helper (`extract_json_safe_state_delta`,
  as its database services), so what `get_session` returns is what they would return.
- **Anonymous users**: `anonymous(user_id) -> bool` names the ADK user ids to keep in memory
  only (their sessions and user state; an app-state change they cause is not personal
  and persists). Their sessions are sealed to this service by a secret binding token.

Partial (streamed) events: ADK's runner never hands them to the session service, and its
services drop them. Here they are kept, **coalesced**: `streaming_plugin()` (an ADK plugin)
or a direct `append_event` of a partial event appends the chunk's text to one "draft"
message per model response (`update_message(append=...)`: a streamed reply costs one row,
written once per flush, not one row per chunk). When the final event of that response is
appended, the draft becomes the event in place (or, if other messages came after it, is
emptied and the event appended). A draft whose final event never came (a crash, a cancel)
stays: `get_partial_events()` returns it as one partial `Event` (an app can show the
interrupted reply or resume a stream after a reconnect). `session.events` stays what ADK
defines: complete events only.

The stale-session check (as `DatabaseSessionService`): a session object carries the
revision it was read at; `append_event` with an object older than the stored session
raises `StaleSessionError`. Objects without a revision (built by hand) are stale when the
stored session has a newer update whose last event is not theirs. An equal re-delivery of
the last event is not appended twice (as `InMemorySessionService`).

Atomicity: the writes of one `append_event` go to up to three sessions (app state, user
state, the session); the store has no transaction across sessions. They are done in that
order, under per-session locks of this service, and once begun they are finished even if
the caller is cancelled. If one fails (say `BackPressureError`), the state written before
it stays and the event is not appended: a retry applies the same deltas again (harmless)
and appends the event. One service instance per store is assumed (locks and draft
tracking are per instance).

Durability: write-behind (on disk at the next flush, `flush_interval_ms`, and at
shutdown); `durable=True` makes every `append_event` return once on disk; `flush()` waits
for everything written before it.

Limits: an event's JSON and each state are stored as one message, so each must fit the
store's `max_message_bytes` (a `ValidationError` naming `event` or `state` before anything
is written). `list_sessions(user_id=None)` (every user's sessions) is refused: writebehind
lists one user's data at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar
from weakref import WeakValueDictionary

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.platform import time as platform_time
from google.adk.plugins.base_plugin import BasePlugin
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from google.genai import types
from typing_extensions import override

from ..errors import NotFound, ValidationError
from ..model import StoredMessage, UserId
from ..writebehind import WriteBehindStore
from ._common import digest, finish

__all__ = ["APP_STATE_STATUS", "STATUS", "USER_STATE_STATUS", "WriteBehindSessionService"]

STATUS: Final = "adk"
USER_STATE_STATUS: Final = "adk-user-state"
APP_STATE_STATUS: Final = "adk-app-state"

_STATE_ID: Final = "state"
_EVENT: Final = "event"
_DRAFT: Final = "draft"
_GONE: Final = {"adk": "gone"}
_MAX_TITLE_CHARS: Final = 200
_MAX_SEQ: Final = 2**63 - 1
_T = TypeVar("_T")


def _text(field_name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a str, not {type(value).__name__}")
    if not value:
        raise ValidationError(field_name, "must not be empty")
    if "\x00" in value:
        raise ValidationError(field_name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field_name, "contains a lone surrogate") from None
    return value


def _dumps(field_name: str, value: Any) -> str:
    try:
        # The stdlib's json: exact for ints beyond 64 bits and for NaN, which ADK's state
        # may hold (its database services store them the same way).
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValidationError(field_name, f"cannot be stored as JSON ({exc})") from None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """The session's "state" message: its state and revision, as of event `upto` (a seq)."""

    state: dict[str, Any]
    nonce: str
    rev: int
    upto: int
    last_event_id: str | None
    last_update_time: float

    @property
    def marker(self) -> str:
        # The nonce tells a session deleted and created again under the same id apart.
        return f"{self.nonce}:{self.rev}"

    @classmethod
    def parse(cls, content: str) -> _Snapshot:
        data = json.loads(content)
        return cls(
            state=data["state"],
            nonce=data["nonce"],
            rev=data["rev"],
            upto=data["upto"],
            last_event_id=data["last_event_id"],
            last_update_time=data["last_update_time"],
        )

    def dumps(self) -> str:
        return _dumps(
            "state",
            {
                "state": self.state,
                "nonce": self.nonce,
                "rev": self.rev,
                "upto": self.upto,
                "last_event_id": self.last_event_id,
                "last_update_time": self.last_update_time,
            },
        )

    def after(self, event: Event, seq: int, session_delta: dict[str, Any]) -> _Snapshot:
        return replace(
            self,
            state={**self.state, **session_delta},
            rev=self.rev + 1,
            upto=seq,
            last_event_id=event.id,
            last_update_time=event.timestamp,
        )

    def folded(self, tail: tuple[StoredMessage, ...]) -> _Snapshot:
        """With the events after `upto` applied: normally there are none (the snapshot is
        written with its event); this keeps a read right if a write stopped in between."""
        snap = self
        for message in tail:
            if message.seq > snap.upto and _kind(message) == _EVENT:
                event = Event.model_validate_json(message.content)
                delta = _session_util.extract_json_safe_state_delta(event.actions.state_delta or {})
                snap = snap.after(event, message.seq, delta["session"])
        return snap


def _kind(message: StoredMessage) -> str | None:
    meta = message.metadata
    return None if meta is None else meta.get("adk")


@dataclass(frozen=True, slots=True)
class _Owner:
    """Who a session belongs to in the store: the ADK user, or (anonymous) nobody, sealed
    by a binding token only this service can derive."""

    user_id: UserId | None
    binding_token: str | None

    @property
    def kw(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "binding_token": self.binding_token}


class WriteBehindSessionService(BaseSessionService):
    """ADK's `BaseSessionService` on a `WriteBehindStore` (see the module docstring).

    Raises ADK's errors where ADK defines them (`AlreadyExistsError`,
    `SessionNotFoundError`, `StaleSessionError`) and the store's otherwise:
    `ValidationError` naming the field for bad input, `BackPressureError`, `ClosedError`.
    """

    def __init__(
        self,
        store: WriteBehindStore,
        *,
        anonymous: Callable[[str], bool] | None = None,
        app_state_user: str = "adk:app-state",
        durable: bool = False,
    ) -> None:
        self._store = store
        self._anonymous = anonymous
        self._app_user = _text("app_state_user", app_state_user)
        self._durable = durable
        self._secret = secrets.token_bytes(32)
        # Anonymous sessions have no listing in the store: (app, user) -> their session ids.
        self._anon_index: dict[tuple[str, str], dict[str, str]] = {}
        self._locks: WeakValueDictionary[str, asyncio.Lock] = WeakValueDictionary()
        # Open drafts of streamed responses: (store session id, event id) -> the draft's seq.
        self._drafts: dict[tuple[str, str], int] = {}

    # -- who and where -------------------------------------------------------------------------

    def _owner(self, app_name: str, user_id: str) -> _Owner:
        if self._anonymous is not None and self._anonymous(user_id):
            token = hmac.new(self._secret, f"{app_name}\x00{user_id}".encode(), hashlib.sha256).hexdigest()
            return _Owner(None, token)
        return _Owner(user_id, None)

    def _session_sid(self, owner: _Owner, app_name: str, user_id: str, session_id: str) -> str:
        kind = "anon" if owner.user_id is None else "user"
        return f"adk.s.{digest(kind, app_name, user_id, session_id)}"

    def _user_sid(self, owner: _Owner, app_name: str, user_id: str) -> str:
        kind = "anon" if owner.user_id is None else "user"
        return f"adk.u.{digest(kind, app_name, user_id)}"

    @staticmethod
    def _app_sid(app_name: str) -> str:
        return f"adk.a.{digest(app_name)}"

    def _lock(self, sid: str) -> asyncio.Lock:
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        return lock

    # -- reading -------------------------------------------------------------------------------

    async def _messages(self, sid: str, owner: _Owner, **window: Any) -> tuple[StoredMessage, ...] | None:
        try:
            return await self._store.get_messages(sid, **owner.kw, **window)
        except NotFound:
            return None

    async def _snapshot(self, sid: str, owner: _Owner) -> _Snapshot | None:
        head = await self._messages(sid, owner, limit=1)
        if not head or head[0].id != _STATE_ID:
            return None  # no such session (or a creation that never finished)
        snap = _Snapshot.parse(head[0].content)
        tail = await self._messages(sid, owner, after_seq=snap.upto)
        return snap.folded(tail or ())

    async def _scope(self, sid: str, owner: _Owner) -> dict[str, Any]:
        """The user or app state kept in session `sid` ({} if none yet)."""
        return await self._stored_scope(sid, owner) or {}

    async def _stored_scope(self, sid: str, owner: _Owner) -> dict[str, Any] | None:
        head = await self._messages(sid, owner, limit=1)
        if not head or head[0].id != _STATE_ID:
            return None
        state: dict[str, Any] = json.loads(head[0].content)["state"]
        return state

    async def _merged(
        self, app_name: str, user_id: str, owner: _Owner, session_state: dict[str, Any]
    ) -> dict[str, Any]:
        merged = dict(session_state)
        app_owner = _Owner(self._app_user, None)
        for key, value in (await self._scope(self._app_sid(app_name), app_owner)).items():
            merged[State.APP_PREFIX + key] = value
        for key, value in (await self._scope(self._user_sid(owner, app_name, user_id), owner)).items():
            merged[State.USER_PREFIX + key] = value
        return merged

    # -- writing -------------------------------------------------------------------------------

    async def _append(
        self,
        sid: str,
        owner: _Owner,
        content: str,
        *,
        role: str,
        message_id: str | None,
        metadata: dict[str, Any],
    ) -> StoredMessage | None:
        """Append; None if `message_id` is taken."""
        try:
            return await self._store.append_message(
                sid, **owner.kw, role=role, content=content, message_id=message_id, metadata=metadata
            )
        except ValidationError as exc:
            if exc.field == "message_id" and message_id is not None:
                return None
            raise

    async def _put_scope(self, sid: str, owner: _Owner, app_name: str, kind: str, content: str) -> None:
        """Write a user or app state (`content`), creating its session on first use."""
        try:
            await self._store.update_message(sid, _STATE_ID, **owner.kw, content=content)
            return
        except NotFound:
            pass
        title = f"{app_name}: {'app' if kind == APP_STATE_STATUS else 'user'} state"
        await self._store.ensure_session(sid, **owner.kw, title=_title(title), status=kind)
        meta = {"adk": kind, "app": app_name}
        if (
            await self._append(sid, owner, content, role="system", message_id=_STATE_ID, metadata=meta)
            is None
        ):
            await self._store.update_message(sid, _STATE_ID, **owner.kw, content=content)

    def _check_size(self, field_name: str, content: str) -> None:
        limit = self._store.hot.max_message_bytes
        size = len(content.encode("utf-8"))
        if size > limit:
            raise ValidationError(field_name, f"is {size} bytes as JSON, more than max_message_bytes={limit}")

    async def _scoped_writes(
        self,
        app_name: str,
        user_id: str,
        owner: _Owner,
        deltas: dict[str, dict[str, Any]],
        *,
        create: bool = False,
    ) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Read the app and user state the deltas change and return the writes that apply
        them (checked for size: nothing is written yet). With `create`, also the writes
        that create them if they do not exist yet: once they exist, every read of them is
        answered from memory (a read of one that does not exist asks the disk each time)."""
        writes: list[Callable[[], Coroutine[Any, Any, None]]] = []
        for kind, delta, sid, who in (
            (APP_STATE_STATUS, deltas["app"], self._app_sid(app_name), _Owner(self._app_user, None)),
            (USER_STATE_STATUS, deltas["user"], self._user_sid(owner, app_name, user_id), owner),
        ):
            current = await self._stored_scope(sid, who) if delta or create else None
            if not delta and not (create and current is None):
                continue
            state = {**(current or {}), **delta}
            content = _dumps("state", {"state": state})
            self._check_size("state", content)

            def write(
                sid: str = sid, who: _Owner = who, kind: str = kind, content: str = content
            ) -> Coroutine[Any, Any, None]:
                return self._put_scope(sid, who, app_name, kind, content)

            writes.append(write)
        return writes

    async def _acquire(self, stack: contextlib.AsyncExitStack, *sids: str) -> None:
        for sid in sids:
            await stack.enter_async_context(self._lock(sid))

    # -- the protocol --------------------------------------------------------------------------

    @override
    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        app_name = _text("app_name", app_name)
        user_id = _text("user_id", user_id)
        # As InMemorySessionService: a given id is used stripped, a missing one generated.
        session_id = session_id.strip() if isinstance(session_id, str) and session_id.strip() else None
        session_id = _text("session_id", session_id or str(uuid.uuid4()))
        owner = self._owner(app_name, user_id)
        sid = self._session_sid(owner, app_name, user_id, session_id)
        deltas = _session_util.extract_json_safe_state_delta(state or {})
        now = _now()
        snap = _Snapshot(deltas["session"], secrets.token_hex(8), 0, 0, None, now)
        content = snap.dumps()
        self._check_size("state", content)
        async with contextlib.AsyncExitStack() as stack:
            await self._acquire(stack, sid, self._user_sid(owner, app_name, user_id), self._app_sid(app_name))
            if await self._snapshot(sid, owner) is not None:
                raise AlreadyExistsError(f"Session with id {session_id} already exists.")
            writes = await self._scoped_writes(app_name, user_id, owner, deltas, create=True)

            async def commit() -> None:
                for write in writes:
                    await write()
                title = _title(f"{app_name}: {session_id}")
                await self._store.ensure_session(sid, **owner.kw, title=title, status=STATUS)
                meta = {"adk": "session", "app": app_name, "user": user_id, "session": session_id}
                if (
                    await self._append(
                        sid, owner, content, role="system", message_id=_STATE_ID, metadata=meta
                    )
                    is None
                ):
                    raise AlreadyExistsError(f"Session with id {session_id} already exists.")
                if owner.user_id is None:
                    self._anon_index.setdefault((app_name, user_id), {})[sid] = session_id

            await finish(commit())
        if self._durable:
            await self._store.flush()
        session = Session(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=await self._merged(app_name, user_id, owner, snap.state),
            last_update_time=now,
        )
        session._storage_update_marker = snap.marker
        return session

    def _lock_order(
        self, sid: str, owner: _Owner, app_name: str, user_id: str, deltas: dict[str, dict[str, Any]]
    ) -> list[str]:
        sids = [sid]
        if deltas["user"]:
            sids.append(self._user_sid(owner, app_name, user_id))
        if deltas["app"]:
            sids.append(self._app_sid(app_name))
        return sids

    @override
    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        app_name = _text("app_name", app_name)
        user_id = _text("user_id", user_id)
        session_id = _text("session_id", session_id.strip() if isinstance(session_id, str) else session_id)
        owner = self._owner(app_name, user_id)
        sid = self._session_sid(owner, app_name, user_id, session_id)
        messages = await self._messages(sid, owner)
        if not messages or messages[0].id != _STATE_ID:
            return None
        snap = _Snapshot.parse(messages[0].content).folded(messages)
        chosen: list[StoredMessage] = []
        if config is None or config.num_recent_events != 0:
            chosen = [m for m in messages if _kind(m) == _EVENT]
            if config is not None and config.after_timestamp is not None:
                after = config.after_timestamp
                chosen = [m for m in chosen if (m.metadata or {})["ts"] >= after]
            if config is not None and config.num_recent_events is not None:
                chosen = chosen[-config.num_recent_events :]
        session = Session(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=await self._merged(app_name, user_id, owner, snap.state),
            events=[Event.model_validate_json(m.content) for m in chosen],
            last_update_time=snap.last_update_time,
        )
        session._storage_update_marker = snap.marker
        return session

    @override
    async def list_sessions(self, *, app_name: str, user_id: str | None = None) -> ListSessionsResponse:
        """The user's sessions of the app, without events, with their merged state, least
        recently updated first (as ADK's services order them)."""
        app_name = _text("app_name", app_name)
        if user_id is None:
            raise ValidationError("user_id", "is required: writebehind lists one user's sessions at a time")
        user_id = _text("user_id", user_id)
        owner = self._owner(app_name, user_id)
        if owner.user_id is None:
            sids = list(self._anon_index.get((app_name, user_id), {}))
        else:
            sids = [s.id for s in await self._store.list_sessions(owner.user_id) if s.status == STATUS]
        sessions = []
        for sid in sids:
            head = await self._messages(sid, owner, limit=1)
            if not head or head[0].id != _STATE_ID:
                if owner.user_id is None:  # gone (deleted, or the anonymous TTL expired it)
                    self._anon_index.get((app_name, user_id), {}).pop(sid, None)
                continue
            meta = head[0].metadata or {}
            if meta.get("app") != app_name:
                continue
            snap = await self._snapshot(sid, owner)
            if snap is None:
                continue
            session = Session(
                id=meta["session"],
                app_name=app_name,
                user_id=user_id,
                state=await self._merged(app_name, user_id, owner, snap.state),
                last_update_time=snap.last_update_time,
            )
            session._storage_update_marker = snap.marker
            sessions.append(session)
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    @override
    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Erase the session from memory and disk (durable when it returns). Its user and app
        state stay: they are not the session's."""
        app_name = _text("app_name", app_name)
        user_id = _text("user_id", user_id)
        session_id = _text("session_id", session_id.strip() if isinstance(session_id, str) else session_id)
        owner = self._owner(app_name, user_id)
        sid = self._session_sid(owner, app_name, user_id, session_id)
        async with self._lock(sid):
            with contextlib.suppress(NotFound):
                await self._store.delete_session(sid, **owner.kw)
        self._anon_index.get((app_name, user_id), {}).pop(sid, None)
        for key in [k for k in self._drafts if k[0] == sid]:
            del self._drafts[key]

    @override
    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        app_name = _text("app_name", app_name)
        user_id = _text("user_id", user_id)
        owner = self._owner(app_name, user_id)
        return await self._scope(self._user_sid(owner, app_name, user_id), owner)

    @override
    async def flush(self) -> None:
        """Return once everything written before the call is on disk."""
        await self._store.flush()

    @override
    async def append_event(self, session: Session, event: Event) -> Event:
        """Append the event and apply its state delta (session, `user:`, `app:`; `temp:`
        only to the object in memory). A partial event is coalesced into its response's
        draft instead (see the module docstring)."""
        app_name = _text("app_name", session.app_name)
        user_id = _text("user_id", session.user_id)
        owner = self._owner(app_name, user_id)
        sid = self._session_sid(owner, app_name, user_id, _text("session_id", session.id))
        if event.partial:
            await self._record_partial(sid, owner, session, event)
            return event
        async with contextlib.AsyncExitStack() as stack:
            await self._acquire(stack, sid)
            snap = await self._snapshot(sid, owner)
            if snap is None:
                raise SessionNotFoundError(f"Session {session.id} not found.")
            if event.id and event.id == snap.last_event_id and await self._is_last(sid, owner, snap, event):
                return event  # an equal re-delivery of the last event: already appended
            if session._storage_update_marker is not None:
                if session._storage_update_marker != snap.marker:
                    raise StaleSessionError(_STALE)
            elif snap.last_update_time > session.last_update_time and (
                (session.events[-1].id if session.events else None) != snap.last_event_id
            ):
                raise StaleSessionError(_STALE)
            self._apply_temp_state(session, event)
            event = self._trim_temp_delta_state(event)
            deltas = _session_util.extract_json_safe_state_delta(event.actions.state_delta or {})
            content = event.model_dump_json(exclude_none=True)
            self._check_size("event", content)
            # The largest seq the snapshot could carry: its size checked before any write.
            after = snap.after(event, _MAX_SEQ, deltas["session"])
            self._check_size("state", after.dumps())
            more = self._lock_order(sid, owner, app_name, user_id, deltas)[1:]
            await self._acquire(stack, *more)
            writes = await self._scoped_writes(app_name, user_id, owner, deltas)

            async def commit() -> _Snapshot:
                # The user and app state first, the event last: if a write fails, the event
                # is not appended and a retry of this call applies the same deltas again.
                for write in writes:
                    await write()
                seq = await self._write_event(sid, owner, event, content)
                done = replace(after, upto=seq)
                await self._store.update_message(sid, _STATE_ID, **owner.kw, content=done.dumps())
                return done

            if writes:
                after = await finish(commit())
            else:
                # One session: the event's write is the only one that can wait (a load,
                # back-pressure), before it is applied; the snapshot's then never waits. So a
                # cancellation lands before anything is written, and no task is needed.
                after = await commit()
        if self._durable:
            await self._store.flush()
        session.last_update_time = after.last_update_time
        session._storage_update_marker = after.marker
        return self._commit_event_to_session(session, event)

    async def _is_last(self, sid: str, owner: _Owner, snap: _Snapshot, event: Event) -> bool:
        last = await self._messages(sid, owner, after_seq=snap.upto - 1, limit=1)
        return last is not None and len(last) == 1 and Event.model_validate_json(last[0].content) == event

    async def _write_event(self, sid: str, owner: _Owner, event: Event, content: str) -> int:
        """Append the event (its draft, if one is open and last, becomes it); its seq."""
        role = "user" if event.author == "user" else "assistant"
        meta = {"adk": _EVENT, "id": event.id, "ts": event.timestamp}
        draft = self._drafts.pop((sid, event.id), None)
        if draft is not None:
            mid = _draft_id(event.id)
            later = await self._messages(sid, owner, after_seq=draft, limit=1)
            try:
                if later == ():
                    await self._store.update_message(sid, mid, **owner.kw, content=content, metadata=meta)
                    return draft
                await self._store.update_message(sid, mid, **owner.kw, content="", metadata=dict(_GONE))
            except NotFound:
                pass  # the draft went (a concurrent delete): append as usual
        message = await self._append(sid, owner, content, role=role, message_id=None, metadata=meta)
        assert message is not None  # a store-chosen id is never taken
        return message.seq

    async def _record_partial(self, sid: str, owner: _Owner, session: Session, event: Event) -> None:
        parts = event.content.parts if event.content is not None else None
        text = "".join(part.text for part in parts or () if part.text and not part.thought)
        if not text or not event.id:
            return  # a chunk of a function call's arguments, say: the final event has it whole
        key = (sid, event.id)
        async with self._lock(sid):
            try:
                if key in self._drafts:
                    await self._store.update_message(sid, _draft_id(event.id), **owner.kw, append=text)
                    return
                meta = {
                    "adk": _DRAFT,
                    "id": event.id,
                    "author": event.author,
                    "invocation_id": event.invocation_id,
                    "branch": event.branch,
                    "ts": event.timestamp,
                }
                message = await self._append(
                    sid, owner, text, role="assistant", message_id=_draft_id(event.id), metadata=meta
                )
                if message is None:
                    await self._store.update_message(sid, _draft_id(event.id), **owner.kw, append=text)
                    return
                self._drafts[key] = message.seq
            except NotFound:
                raise SessionNotFoundError(f"Session {session.id} not found.") from None

    async def get_partial_events(self, *, app_name: str, user_id: str, session_id: str) -> list[Event]:
        """The session's streamed responses that never got their final event (a crash or a
        cancel cut them), each coalesced into one partial `Event`; oldest first."""
        app_name = _text("app_name", app_name)
        user_id = _text("user_id", user_id)
        session_id = _text("session_id", session_id.strip() if isinstance(session_id, str) else session_id)
        owner = self._owner(app_name, user_id)
        messages = await self._messages(self._session_sid(owner, app_name, user_id, session_id), owner)
        found = []
        for message in messages or ():
            meta = message.metadata
            if meta is None or meta.get("adk") != _DRAFT:
                continue
            found.append(
                Event(
                    id=meta["id"],
                    author=meta["author"],
                    invocation_id=meta["invocation_id"],
                    branch=meta["branch"],
                    timestamp=meta["ts"],
                    partial=True,
                    content=types.Content(role="model", parts=[types.Part(text=message.content)]),
                )
            )
        return found

    def streaming_plugin(self) -> BasePlugin:
        """An ADK plugin that hands this service every partial event the runner yields
        (the runner itself only appends complete ones): add it to the `App`'s plugins."""
        return _PartialEvents(self)


class _PartialEvents(BasePlugin):
    def __init__(self, service: WriteBehindSessionService) -> None:
        super().__init__(name="writebehind_partial_events")
        self._service = service

    async def on_event_callback(self, *, invocation_context: Any, event: Event) -> Event | None:
        if event.partial and invocation_context.session is not None:
            await self._service.append_event(invocation_context.session, event)
        return None


_STALE: Final = (
    "The session has been modified in storage since it was loaded. "
    "Please reload the session before appending more events."
)


def _draft_id(event_id: str) -> str:
    return f"d.{digest(event_id)}"


def _title(text: str) -> str:
    return text if len(text) <= _MAX_TITLE_CHARS else text[: _MAX_TITLE_CHARS - 1] + "…"


def _now() -> float:
    return float(platform_time.get_time())
