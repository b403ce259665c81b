"""The live side of a session: the broker that wakes its streams, the resume point a client
names with `Last-Event-ID`, and the SSE generator.

Wire format (one `message` event per change of one message)::

    id: <seq>:<offset>[d]
    event: message
    data: {"seq", "id", "role", "offset", "text", "done", "interrupted", "stopped", "rewound", "error"}

`offset` and the id's offset count UTF-16 code units, the unit of JavaScript's
`String.length` and `slice`, so that a page computes its resume point from the text it
shows. `text` is what follows `offset` in message `seq`; `d` says the client now has the
whole message.

Order: a stream delivers messages in `seq` order and each one whole (to its `done`)
before the next, so one `<seq>:<offset>` names everything a client has. Replies on a
session run one at a time (see `replies`), so a stream never waits behind a message
that is not being written.

Resume: `Last-Event-ID: <seq>:<offset>` gets the rest of message `seq` from `offset`,
then every later message, then the live tail (from memory, or from disk after a
restart); `<seq>:<offset>d` starts at message `seq + 1`. A position the session does not
have (ahead of what survived a crash, or inside a character) gets that message again
from its start, flagged `"rewound": true`: the client replaces what it had from there.
So does a reply rewritten in place by a regenerate, on every stream that had some of it.
(A client that reconnects with `<seq>:<offset>d` after the last reply was rewritten to the
same length keeps what it had: the event id does not name the attempt.)

A session erased while streaming ends its streams with a `gone` event; a server that
stops ends them cleanly (the client reconnects later with its `Last-Event-ID`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

import orjson
from sse_starlette import ServerSentEvent

from .. import NotFound, SessionStore, StoredMessage, UserId, WriteBehindStore
from ..live import LiveView
from .auth import Caller
from .errors import ApiError
from .replies import Replies, attempt, error_of

__all__ = ["EVENT_ID_PATTERN", "Broker", "Position", "resume_point", "stream", "utf16_len"]

Store = SessionStore | WriteBehindStore
# `0:0` (nothing yet), or `<seq>:<offset>`, with `d` once the client has the whole message.
EVENT_ID_PATTERN: Final = r"^(0:0|[1-9][0-9]{0,8}:[0-9]{1,12}d?)$"
_EVENT_ID: Final = re.compile(r"0:0|([1-9][0-9]{0,8}):([0-9]{1,12})(d?)")


class Broker:
    """Wakes the SSE streams of a session when it changes. One event per session,
    replaced at each notification, so a waiter never misses one that came after it
    read the session. Streams subscribe and unsubscribe, so a session nobody follows
    holds nothing here. `close()` (the server stops) wakes every stream for good."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._listeners: dict[str, int] = {}
        self._by_user: dict[UserId, dict[str, int]] = {}
        self.closed = False

    def subscribe(self, session_id: str, user_id: UserId | None = None) -> None:
        self._listeners[session_id] = self._listeners.get(session_id, 0) + 1
        if user_id is not None:
            mine = self._by_user.setdefault(user_id, {})
            mine[session_id] = mine.get(session_id, 0) + 1

    def unsubscribe(self, session_id: str, user_id: UserId | None = None) -> None:
        left = self._listeners.pop(session_id, 1) - 1
        if left > 0:
            self._listeners[session_id] = left
        else:
            self._events.pop(session_id, None)
        if user_id is None or (mine := self._by_user.get(user_id)) is None:
            return
        count = mine.pop(session_id, 1) - 1
        if count > 0:
            mine[session_id] = count
        elif not mine:
            del self._by_user[user_id]

    def waiter(self, session_id: str) -> asyncio.Event:
        if self.closed:
            done = asyncio.Event()
            done.set()
            return done
        return self._events.setdefault(session_id, asyncio.Event())

    def notify(self, session_id: str) -> None:
        event = self._events.pop(session_id, None)
        if event is not None:
            event.set()

    def notify_user(self, user_id: UserId) -> None:
        """Wake every stream a user follows (their data changed wholesale: an erasure)."""
        for session_id in list(self._by_user.get(user_id, ())):
            self.notify(session_id)

    def close(self) -> None:
        self.closed = True
        for session_id in list(self._events):
            self.notify(session_id)

    def __len__(self) -> int:
        return len(self._events)


def utf16_len(text: str) -> int:
    """The length of `text` in UTF-16 code units (JavaScript's `text.length`)."""
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2


def _code_points(text: str, units: int) -> int | None:
    """Where the first `units` UTF-16 code units of `text` end, as an index into `text`;
    None if that is past its end or inside a surrogate pair."""
    if text.isascii():
        return units if units <= len(text) else None
    encoded = text.encode("utf-16-le")
    if 2 * units > len(encoded):
        return None
    if units and 0xD800 <= int.from_bytes(encoded[2 * units - 2 : 2 * units], "little") <= 0xDBFF:
        return None  # the last unit is the first half of a pair
    return len(encoded[: 2 * units].decode("utf-16-le"))


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream starts: message `seq`, after `chars` code points (`units` UTF-16
    code units) of it; `rewound` when the client asked for a position the session does
    not have and gets the message again from its start."""

    seq: int = 1
    chars: int = 0
    units: int = 0
    rewound: bool = False


def resume_point(header: str | None, messages: Sequence[StoredMessage]) -> Position:
    """The position of a client that sent `Last-Event-ID: header` (None: a new client).
    400 for a header that is not `<seq>:<offset>[d]`."""
    if header is None or header.strip() == "":
        return Position()
    match = _EVENT_ID.fullmatch(header.strip())
    if match is None:
        raise ApiError(
            400, "bad_last_event_id", "Last-Event-ID must look like <seq>:<offset>, or <seq>:<offset>d"
        )
    if match[1] is None:
        return Position()  # 0:0
    seq, units, whole = int(match[1]), int(match[2]), bool(match[3])
    if seq <= len(messages):
        content = messages[seq - 1].content
        chars = _code_points(content, units)
        if chars is not None and not whole:
            return Position(seq, chars, units)
        if chars == len(content) and whole:
            return Position(seq + 1)
    if not messages:
        return Position()
    # Ahead of this session (a crash lost what the client saw), or a position no client
    # reads from this stream: the message again, whole, flagged.
    return Position(min(seq, len(messages)), rewound=True)


async def stream(
    store: Store,
    broker: Broker,
    replies: Replies,
    session_id: str,
    who: Caller,
    start: Position,
) -> AsyncIterator[ServerSentEvent]:
    """The session's events from `start`, then the live tail, until the client leaves, the
    session is erased (`gone`) or the server stops."""
    # The attempt (see `replies.attempt`) of the message this stream last sent from: the
    # one it stands on, or the one it has whole. A regenerate rewrites that message in
    # place; a different attempt means the client must take it again from its start.
    seen: dict[int, int] = {}
    broker.subscribe(session_id, who.user_id)
    try:
        async with _view(store, broker, session_id, who) as view:
            async for event in _events(view, broker, replies, session_id, start, seen):
                yield event
    finally:  # the client left, the session is gone or the server stops: forget this listener
        broker.unsubscribe(session_id, who.user_id)


class _Local:
    """A stream's view of a plain `SessionStore` (one process, nothing to follow)."""

    remote = False

    def __init__(self, store: SessionStore, session_id: str, who: Caller) -> None:
        self._store, self._session_id, self._who = store, session_id, who

    async def messages(self, after_seq: int) -> tuple[StoredMessage, ...]:
        return await self._store.get_messages(self._session_id, after_seq=after_seq, **self._who.who)


@contextlib.asynccontextmanager
async def _view(
    store: Store, broker: Broker, session_id: str, who: Caller
) -> AsyncIterator[_Local | LiveView]:
    """What the stream reads through: with several instances, a session another instance
    keeps is followed live (`WriteBehindStore.follow`), its changes waking this stream."""
    if isinstance(store, WriteBehindStore):
        async with store.follow(
            session_id, user_id=who.user_id, binding_token=who.binding, on_change=broker.notify
        ) as view:
            yield view
    else:
        yield _Local(store, session_id, who)


async def _events(
    view: _Local | LiveView,
    broker: Broker,
    replies: Replies,
    session_id: str,
    start: Position,
    seen: dict[int, int],
) -> AsyncIterator[ServerSentEvent]:
    seq, chars, units, rewound = start.seq, start.chars, start.units, start.rewound
    while not broker.closed:
        changed = broker.waiter(session_id)  # before reading: a change after the read wakes us
        try:
            window = await view.messages(max(seq - 2, 0))
        except NotFound:
            yield ServerSentEvent(event="gone", data="{}")
            return
        rewritten = next((m for m in window if seen.get(m.seq, attempt(m)) != attempt(m)), None)
        if rewritten is not None:
            seq, chars, units, rewound = rewritten.seq, 0, 0, True
        for m in window:
            if m.seq == seq - 1 or (m.seq == seq and chars):
                seen.setdefault(m.seq, attempt(m))
        for m in window:
            if m.seq < seq:
                continue
            progress = replies.progress(session_id, m, elsewhere=view.remote)
            text = m.content[chars:]
            if text or progress.done or rewound:
                end = units + utf16_len(text)
                data = {"seq": m.seq, "id": m.id, "role": m.role, "offset": units, "text": text,
                        "done": progress.done, "interrupted": progress.interrupted,
                        "stopped": progress.stopped, "rewound": rewound,
                        "error": error_of(m)}  # fmt: skip
                yield ServerSentEvent(
                    id=f"{m.seq}:{end}{'d' if progress.done else ''}",
                    event="message",
                    data=orjson.dumps(data).decode(),
                )
                chars, units, rewound = len(m.content), end, False
                seen = {m.seq: attempt(m)}
            if not progress.done:
                break  # the next message waits until this one is whole
            seq, chars, units = m.seq + 1, 0, 0
        await changed.wait()
