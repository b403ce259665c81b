"""The live side of a session: the broker that wakes its streams, the resume point a client
names with `Last-Event-ID`, and the SSE generator.

Wire format (one `message` event per change of one message)::

    id: <seq>:<offset>[d]
    event: message
    data: {"seq", "id", "role", "parent_seq", "offset", "text", "done", "interrupted",
           "stopped", "rewound", "error"}

`offset` and the id's offset count UTF-16 code units, the unit of JavaScript's
`String.length` and `slice`, so that a page computes its resume point from the text it
shows. `text` is what follows `offset` in message `seq`; `d` says the client now has the
whole message. `parent_seq` is the message before it on the path (0: none).

A stream follows the session's active path (`writebehind.branches`): it delivers the
path's messages in order (seqs grow along a path) and each one whole (to its `done`)
before the next, so one `<seq>:<offset>` names everything a client has: the path up to
message `seq`, which only that path leads to. Replies on a session run one at a time
(see `replies`), so a stream never waits behind a message that is not being written.

Resume: `Last-Event-ID: <seq>:<offset>` gets the rest of message `seq` from `offset`,
then the rest of the path, then the live tail (from memory, or from disk after a
restart); `<seq>:<offset>d` starts after message `seq`. A position the session does not
have (ahead of what survived a crash, or inside a character) gets that message again
from its start, flagged `"rewound": true`: the client replaces what it had from there.

Branches: when the client's message is no longer on the active path (another tab
switched to an alternative, edited a question, regenerated a reply; or it did so while
the client was away), the stream sends `event: branch`, `data: {"after_seq": n}`, id
`<n>:<length>d`: the client keeps what it shows up to message n, the last one its path
shares with the session's, drops the rest, and the new path's messages follow. A client
never shows a mixed path: a message whose `parent_seq` is not the message it shows
before it says the same (a page reloads the path then).

A session erased while streaming ends its streams with a `gone` event; a server that
stops ends them cleanly (the client reconnects later with its `Last-Event-ID`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

import orjson
from sse_starlette import ServerSentEvent

from .. import NotFound, SessionRecord, SessionStore, StoredMessage, UserId, WriteBehindStore
from ..branches import parent_of
from ..live import LiveView
from .auth import Caller
from .errors import ApiError
from .replies import Replies, error_of

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
    """Where a stream starts: the client has message `seq` (0: nothing yet), whole or its
    first `chars` code points (`units` UTF-16 code units), and `parent` is the message
    before it on the path. `rewound`: the client asked for a position the session does
    not have and gets message `seq` again from its start, flagged. `branch`: the path the
    client shows is not the session's; it keeps what it shows up to message `seq` (a
    `branch` event says so first), and the session's path goes on from there."""

    seq: int = 0
    parent: int = 0
    chars: int = 0
    units: int = 0
    whole: bool = True
    rewound: bool = False
    branch: bool = False


def _fork(path: Sequence[StoredMessage], record: SessionRecord, seq: int) -> tuple[int, int]:
    """Where the path to message `seq` (of `record`) leaves `path`: the last message they
    share, and the one before it ((0, 0): they share nothing, or `seq` is not known)."""
    if seq > len(record.messages):
        return 0, 0
    ancestors = set()
    at = parent_of(record.branches, seq)
    while at > 0:
        ancestors.add(at)
        at = parent_of(record.branches, at)
    fork = parent = 0
    for m in path:
        if m.seq not in ancestors:
            break
        fork, parent = m.seq, fork
    return fork, parent


def resume_point(header: str | None, record: SessionRecord) -> Position:
    """The position of a client that sent `Last-Event-ID: header` (None: a new client) in
    session `record`, along its active path. 400 for a header that is not
    `<seq>:<offset>[d]`."""
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
    path = record.path
    at = bisect.bisect_left(path, seq, key=_seq_of)  # seqs grow along a path
    if at < len(path) and path[at].seq == seq:
        parent = path[at - 1].seq if at else 0
        content = path[at].content
        chars = _code_points(content, units)
        if chars is not None and not whole:
            return Position(seq, parent, chars, units, whole=False)
        if chars == len(content) and whole:
            return Position(seq, parent)
        # A position no client reads from this stream (past the end of what survived a
        # crash, inside a character): the message again, whole, flagged.
        return Position(seq, parent, whole=False, rewound=True)
    if seq <= len(record.messages):  # a message of another branch: the path forked before it
        fork, parent = _fork(path, record, seq)
        return Position(fork, parent, branch=True)
    if not path:
        return Position(branch=True)
    # Ahead of this session (a crash lost what the client saw): the path's last message
    # again, whole, flagged (a client also checks its `parent_seq`).
    return Position(path[-1].seq, path[-2].seq if len(path) > 1 else 0, whole=False, rewound=True)


def _seq_of(message: StoredMessage) -> int:
    return message.seq


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
    broker.subscribe(session_id, who.user_id)
    try:
        async with _view(store, broker, session_id, who) as view:
            async for event in _events(view, store, broker, replies, session_id, who, start):
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
    store: Store,
    broker: Broker,
    replies: Replies,
    session_id: str,
    who: Caller,
    start: Position,
) -> AsyncIterator[ServerSentEvent]:
    # What the client has: message `have` (0: nothing) of the active path, whole or its
    # first `chars` code points (`units` UTF-16 units); `parent` is the one before it.
    have, parent, chars, units, whole = start.seq, start.parent, start.chars, start.units, start.whole
    rewound, branch, refound = start.rewound, start.branch, False
    while True:
        # Once the server stops, one last pass sends what the client has not had yet (a
        # reply's interrupted mark, stored as the server began to stop), then the stream ends.
        last = broker.closed
        changed = broker.waiter(session_id)  # before reading: a change after the read wakes us
        try:
            # The path from `have` on (seqs grow along a path, so what follows `parent`).
            window = await view.messages(parent if have else 0)
        except NotFound:
            yield ServerSentEvent(event="gone", data="{}")
            return
        if have and (not window or window[0].seq != have):
            # `have` left the active path (a switch, an edit, a regenerate): the client keeps
            # what it shares with the new path, told by a `branch` event, and gets the rest.
            # The tree is read only here. If the path moved again meanwhile (or the tree
            # read disagrees with the view's), the path again from its start.
            have, parent = (0, 0) if refound else await _fork_of(store, view, session_id, who, have)
            chars, units, whole, rewound, branch, refound = 0, 0, True, False, True, True
            continue
        refound = False
        if branch:
            event_id = f"{have}:{utf16_len(window[0].content)}d" if have else "0:0"
            yield ServerSentEvent(
                id=event_id, event="branch", data=orjson.dumps({"after_seq": have}).decode()
            )
            branch = False
        before = parent  # the parent of the message at hand: the one before it on the path
        for m in window:
            if m.seq == have and whole:
                before = m.seq
                continue
            skip, skip_units = (chars, units) if m.seq == have else (0, 0)
            progress = replies.progress(session_id, m, elsewhere=view.remote)
            text = m.content[skip:]
            if text or progress.done or rewound:
                end = skip_units + utf16_len(text)
                data = {"seq": m.seq, "id": m.id, "role": m.role, "parent_seq": before, "offset": skip_units,
                        "text": text, "done": progress.done, "interrupted": progress.interrupted,
                        "stopped": progress.stopped, "rewound": rewound, "error": error_of(m)}  # fmt: skip
                yield ServerSentEvent(
                    id=f"{m.seq}:{end}{'d' if progress.done else ''}",
                    event="message",
                    data=orjson.dumps(data).decode(),
                )
                have, parent, whole, rewound = m.seq, before, progress.done, False
                chars, units = len(m.content), end
            if not progress.done:
                break  # the next message waits until this one is whole
            before = m.seq
        if last:
            return
        await changed.wait()


async def _fork_of(
    store: Store, view: _Local | LiveView, session_id: str, who: Caller, have: int
) -> tuple[int, int]:
    """Where the path to message `have` leaves the session's active path (see `_fork`)."""
    try:
        record = await store.get_session(session_id, **who.who)
    except NotFound:
        return 0, 0  # the next read says `gone`
    return _fork(await view.messages(0), record, have)
