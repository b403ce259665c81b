"""`SessionStore`: the plain in-memory store, and the hot tier of `WriteBehindStore`.

Every method is async for API compatibility with the write-behind store, but none
of them ever suspends: each call runs to completion on the event loop, so a call
is atomic with respect to every other call.

Ownership: every call names the caller (`user_id`, plus `binding_token` for an
anonymous session created with one). A session that exists but belongs to
someone else raises exactly the `NotFound` a missing one raises.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

from cachetools import LRUCache

from .errors import NotFound, ValidationError
from .model import (
    Metadata,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    check_content,
    check_id,
    check_metadata,
    check_optional_text,
    check_role,
    check_status,
    check_user_id,
    to_micros,
    utcnow,
)
from .stats import StoreStats

__all__ = ["UNSET", "SessionStore"]


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final[Any] = _Unset()
"""Default of optional update arguments: "leave as it is" (as opposed to None, "clear it")."""

_MAX_TITLE_BYTES: Final = 1024
_MAX_CLIENT_FIELD_BYTES: Final = 1024


class _Session:
    """The mutable entry the hot tier owns. Callers only ever see snapshots of it."""

    __slots__ = (
        "binding_token",
        "client_ip",
        "created_at",
        "csrf_token",
        "id",
        "index",
        "last_access_at",
        "last_touch",
        "messages",
        "status",
        "title",
        "updated_at",
        "user_agent",
        "user_id",
        "version",
    )

    def __init__(self, record: SessionRecord, last_touch: float) -> None:
        self.id = record.id
        self.user_id = record.user_id
        self.created_at = record.created_at
        self.updated_at = record.updated_at
        self.last_access_at = record.last_access_at
        self.status = record.status
        self.title = record.title
        self.client_ip = record.client_ip
        self.user_agent = record.user_agent
        self.binding_token = record.user_binding_token
        self.csrf_token = record.csrf_token
        self.version = record.version
        self.messages: list[StoredMessage] = list(record.messages)
        self.index: dict[str, int] = {m.id: i for i, m in enumerate(self.messages)}
        self.last_touch = last_touch

    def snapshot(self, with_messages: bool = True) -> SessionRecord:
        return SessionRecord(
            id=self.id,
            user_id=self.user_id,
            created_at=self.created_at,
            updated_at=self.updated_at,
            last_access_at=self.last_access_at,
            status=self.status,
            title=self.title,
            messages=tuple(self.messages) if with_messages else (),
            client_ip=self.client_ip,
            user_agent=self.user_agent,
            user_binding_token=self.binding_token,
            csrf_token=self.csrf_token,
            version=self.version,
        )

    def summary(self) -> SessionSummary:
        return SessionSummary(
            id=self.id,
            user_id=self.user_id,
            title=self.title,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            last_access_at=self.last_access_at,
            message_count=len(self.messages),
        )


class _HotCache(LRUCache[str, _Session]):
    """An LRU whose eviction hook is the one place that knows about pinned (dirty) entries:
    a pinned entry the LRU pushes out is parked, not dropped, until it is unpinned."""

    def __init__(self, maxsize: int, on_evict: Callable[[str, _Session], None]) -> None:
        super().__init__(maxsize)
        self.pins: set[str] = set()
        self.parked: dict[str, _Session] = {}
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, _Session]:
        key, value = super().popitem()
        if key in self.pins:
            self.parked[key] = value
        else:
            self._on_evict(key, value)
        return key, value


class SessionStore:
    """An LRU of chat sessions in memory. No I/O, ever.

    `maxsize` bounds the number of sessions held; the least recently used one is
    dropped first (for a plain store that is the session's end; under a
    `WriteBehindStore` a clean persisted session comes back from disk, and a dirty
    one is never dropped). Anonymous sessions also expire after `anon_ttl_seconds`
    without access.
    """

    def __init__(
        self,
        maxsize: int = 10_000,
        *,
        anon_ttl_seconds: float = 3600.0,
        max_message_bytes: int = 1_000_000,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize <= 0:
            raise ValidationError("maxsize", "must be > 0")
        self._cache = _HotCache(maxsize, self._forget)
        # Every session in memory, in the LRU or parked: the one place a lookup that must
        # not reorder the LRU (the worker's, a listing's, a fast-path check) goes.
        self._sessions: dict[str, _Session] = {}
        self._by_user: dict[UserId, set[str]] = {}
        self._anon_order: OrderedDict[str, None] = OrderedDict()
        self._anon_ttl = anon_ttl_seconds
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._monotonic = monotonic
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expired = 0

    @property
    def maxsize(self) -> int:
        return int(self._cache.maxsize)

    # -- the public API ---------------------------------------------------------------------

    async def ensure_session(
        self,
        session_id: str | None = None,
        *,
        user_id: UserId | None,
        title: str | None = None,
        status: str = "active",
        client_ip: str | None = None,
        user_agent: str | None = None,
        binding_token: str | None = None,
        csrf_token: str | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """Return the caller's session `session_id`, creating it if it does not exist.

        With `session_id=None` a new random id is chosen. An existing session is
        returned unchanged (the other arguments only apply on creation).
        """
        session, _created = self._ensure(
            session_id, user_id, title, status, client_ip, user_agent, binding_token, csrf_token
        )
        return session.snapshot()

    async def get_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionRecord:
        return self._owned(session_id, user_id, binding_token).snapshot()

    async def get_messages(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        after_seq: int = 0,
        limit: int | None = None,
        binding_token: str | None = None,
    ) -> tuple[StoredMessage, ...]:
        """Messages with `seq > after_seq`, in order (what an SSE client missed)."""
        start, stop = _check_window(after_seq, limit)
        session = self._owned(session_id, user_id, binding_token)
        return tuple(session.messages[start : None if stop is None else start + stop])

    async def append_message(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        role: str,
        content: str,
        message_id: str | None = None,
        metadata: Metadata | None = None,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> StoredMessage:
        """Append a message; its `seq` is one more than the last one's."""
        _session, message = self._append(
            session_id, user_id, role, content, message_id, metadata, binding_token
        )
        return message

    async def update_message(
        self,
        session_id: str,
        message_id: str,
        *,
        user_id: UserId | None,
        content: str | None = None,
        append: str | None = None,
        metadata: Metadata | None = UNSET,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> StoredMessage:
        """Replace a message's `content`, or `append` a streamed token to it, and/or
        replace its `metadata`."""
        _session, message = self._update_message(
            session_id, message_id, user_id, content, append, metadata, binding_token
        )
        return message

    async def update_session(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        status: str = UNSET,
        title: str | None = UNSET,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        return self._update_session(session_id, user_id, status, title, binding_token).snapshot()

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The user's sessions, most recently updated first. Anonymous callers own no list."""
        start, count = _check_window(offset, limit, "offset")
        uid = check_user_id(user_id)
        if uid is None:
            return []
        summaries = [s.summary() for s in self._sessions_of(uid)]
        summaries.sort(key=_newest_first)
        return summaries[start : None if count is None else start + count]

    async def delete_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> None:
        session = self._owned(session_id, user_id, binding_token, touch=False)
        self._remove(session.id)

    async def delete_user(self, user_id: UserId) -> int:
        """Remove every session of the user; returns how many there were in memory."""
        uid = _require_user(user_id)
        return len(self._remove_user(uid))

    async def claim(
        self,
        session_id: str,
        *,
        user_id: UserId,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """Hand an anonymous session to the user who just signed in.

        Claiming a session the user already owns is a no-op.
        """
        return self._claim(session_id, user_id, binding_token).snapshot()

    def stats(self) -> StoreStats:
        return StoreStats(
            hot_sessions=len(self._sessions),
            hot_hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expired=self._expired,
            parked=len(self._cache.parked),
        )

    # -- the operations, synchronous, for the write-behind wrapper -------------------------
    # Each validates everything first and only then changes state, so a bad argument
    # changes nothing.

    def _ensure(
        self,
        session_id: str | None,
        user_id: UserId | None,
        title: str | None,
        status: str,
        client_ip: str | None,
        user_agent: str | None,
        binding_token: str | None,
        csrf_token: str | None,
    ) -> tuple[_Session, bool]:
        sid = _new_id() if session_id is None else check_id("session_id", session_id)
        uid = check_user_id(user_id)
        title = check_optional_text("title", title, _MAX_TITLE_BYTES)
        status = check_status(status)
        client_ip = check_optional_text("client_ip", client_ip, _MAX_CLIENT_FIELD_BYTES)
        user_agent = check_optional_text("user_agent", user_agent, _MAX_CLIENT_FIELD_BYTES)
        binding_token = check_optional_text("binding_token", binding_token, _MAX_CLIENT_FIELD_BYTES)
        csrf_token = check_optional_text("csrf_token", csrf_token, _MAX_CLIENT_FIELD_BYTES)
        existing = self._find(sid)
        if existing is not None:
            if not _owns(existing, uid, binding_token):
                self._misses += 1
                raise NotFound(sid)
            self._touch(existing)
            return existing, False
        now = self._clock()
        record = SessionRecord(
            id=sid,
            user_id=uid,
            created_at=now,
            updated_at=now,
            last_access_at=now,
            status=status,
            title=title,
            client_ip=client_ip,
            user_agent=user_agent,
            user_binding_token=binding_token,
            csrf_token=csrf_token,
        )
        self._expire_idle()
        return self._insert(record), True

    def _append(
        self,
        session_id: str,
        user_id: UserId | None,
        role: str,
        content: str,
        message_id: str | None,
        metadata: Metadata | None,
        binding_token: str | None,
    ) -> tuple[_Session, StoredMessage]:
        role = check_role(role)
        content = check_content(content, self.max_message_bytes)
        mid = None if message_id is None else check_id("message_id", message_id)
        metadata = check_metadata(metadata)
        session = self._owned(session_id, user_id, binding_token, touch=False)
        if mid is None:
            mid = _new_id()
        elif mid in session.index:
            raise ValidationError("message_id", f"{mid!r} already exists in session {session.id!r}")
        now = self._clock()
        self._touch(session, now)
        message = StoredMessage(mid, len(session.messages) + 1, role, content, now, now, metadata)
        session.index[mid] = len(session.messages)
        session.messages.append(message)
        session.updated_at = now
        return session, message

    def _update_message(
        self,
        session_id: str,
        message_id: str,
        user_id: UserId | None,
        content: str | None,
        append: str | None,
        metadata: Metadata | None,
        binding_token: str | None,
    ) -> tuple[_Session, StoredMessage]:
        mid = check_id("message_id", message_id)
        if content is not None and append is not None:
            raise ValidationError("append", "give content or append, not both")
        if content is not None:
            check_content(content, self.max_message_bytes)
        if append is not None:
            check_content(append, self.max_message_bytes, "append")
        if metadata is not UNSET:
            metadata = check_metadata(metadata)
        session = self._owned(session_id, user_id, binding_token, touch=False)
        position = session.index.get(mid)
        if position is None:
            raise NotFound(session.id, mid)
        old = session.messages[position]
        new_content = old.content
        if content is not None:
            new_content = content
        elif append is not None:
            new_content = old.content + append
            check_content(new_content, self.max_message_bytes)
        now = self._clock()
        self._touch(session, now)
        message = replace(
            old,
            content=new_content,
            metadata=old.metadata if metadata is UNSET else metadata,
            updated_at=now,
        )
        session.messages[position] = message
        session.updated_at = now
        return session, message

    def _update_session(
        self,
        session_id: str,
        user_id: UserId | None,
        status: str,
        title: str | None,
        binding_token: str | None,
    ) -> _Session:
        if status is not UNSET:
            status = check_status(status)
        if title is not UNSET:
            title = check_optional_text("title", title, _MAX_TITLE_BYTES)
        session = self._owned(session_id, user_id, binding_token)
        if status is not UNSET:
            session.status = status
        if title is not UNSET:
            session.title = title
        session.updated_at = self._clock()
        return session

    def _claim(self, session_id: str, user_id: UserId, binding_token: str | None) -> _Session:
        uid = _require_user(user_id)
        sid = check_id("session_id", session_id)
        session = self._find(sid)
        if session is None or not (session.user_id == uid or _owns(session, None, binding_token)):
            self._misses += 1
            raise NotFound(sid)
        if session.user_id == uid:
            self._touch(session)
            return session
        self._anon_order.pop(sid, None)
        session.user_id = uid
        session.binding_token = None
        self._by_user.setdefault(uid, set()).add(sid)
        session.updated_at = self._clock()
        self._touch(session)
        return session

    # -- the hot tier's bookkeeping ------------------------------------------------------------

    def _find(self, session_id: str) -> _Session | None:
        """The entry if it is in memory (LRU-touched, unparked), else None. Never counts."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        cache = self._cache
        if session_id in cache.parked:
            del cache.parked[session_id]
            cache[session_id] = session
        else:
            cache[session_id]  # the LRU's "recently used"
        if session.user_id is None and self._monotonic() - session.last_touch > self._anon_ttl:
            self._expired += 1
            self._remove(session_id)
            return None
        return session

    def _owned(
        self,
        session_id: str,
        user_id: UserId | None,
        binding_token: str | None,
        touch: bool = True,
    ) -> _Session:
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        session = self._find(sid)
        if session is None or not _owns(session, uid, binding_token):
            self._misses += 1
            raise NotFound(sid)
        self._hits += 1
        if touch:
            self._touch(session)
        return session

    def _touch(self, session: _Session, now: datetime | None = None) -> None:
        session.last_access_at = self._clock() if now is None else now
        if session.user_id is None:
            session.last_touch = self._monotonic()
            self._anon_order[session.id] = None
            self._anon_order.move_to_end(session.id)

    def _insert(self, record: SessionRecord) -> _Session:
        """Put a record (new, or loaded from disk) into the hot tier."""
        session = _Session(record, self._monotonic())
        self._sessions[session.id] = session
        self._cache[session.id] = session
        if session.user_id is None:
            self._anon_order[session.id] = None
        else:
            self._by_user.setdefault(session.user_id, set()).add(session.id)
        return session

    def _remove(self, session_id: str) -> _Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            cache = self._cache
            if cache.parked.pop(session_id, None) is None:
                del cache[session_id]
            self._unindex(session)
        return session

    def _remove_user(self, user_id: UserId) -> list[_Session]:
        removed = []
        for sid in list(self._by_user.get(user_id, ())):
            session = self._remove(sid)
            if session is not None:
                removed.append(session)
        return removed

    def _forget(self, session_id: str, session: _Session) -> None:
        """The LRU dropped an unpinned entry."""
        del self._sessions[session_id]
        self._evictions += 1
        self._unindex(session)

    def _unindex(self, session: _Session) -> None:
        if session.user_id is None:
            self._anon_order.pop(session.id, None)
            return
        ids = self._by_user.get(session.user_id)
        if ids is not None:
            ids.discard(session.id)
            if not ids:
                del self._by_user[session.user_id]

    def _expire_idle(self, limit: int = 8) -> int:
        """Drop up to `limit` anonymous sessions idle past the TTL, oldest first.

        Called on each insert so that expiry is amortised O(1) and never a scan.
        """
        deadline = self._monotonic() - self._anon_ttl
        expired = 0
        order = self._anon_order
        while order and expired < limit:
            sid = next(iter(order))
            session = self._sessions.get(sid)
            if session is not None and session.last_touch > deadline:
                break
            expired += 1
            self._expired += 1
            order.pop(sid)
            if session is not None:
                self._remove(sid)
        return expired

    def _pin(self, session_id: str) -> None:
        self._cache.pins.add(session_id)

    def _unpin(self, session_id: str) -> None:
        cache = self._cache
        cache.pins.discard(session_id)
        parked = cache.parked.pop(session_id, None)
        if parked is not None:
            self._forget(session_id, parked)

    def _sessions_of(self, user_id: UserId) -> Iterator[_Session]:
        sessions = self._sessions
        for sid in self._by_user.get(user_id, ()):
            yield sessions[sid]

    def _peek(self, session_id: str) -> _Session | None:
        """The entry without touching the LRU or counting (for the worker and listings)."""
        return self._sessions.get(session_id)


def _owns(session: _Session, user_id: UserId | None, binding_token: str | None) -> bool:
    if session.user_id is not None:
        return session.user_id == user_id
    if user_id is not None:
        return False
    if session.binding_token is None:
        return True
    return binding_token is not None and secrets.compare_digest(
        session.binding_token.encode(), binding_token.encode()
    )


def _require_user(user_id: object) -> UserId:
    uid = check_user_id(user_id)
    if uid is None:
        raise ValidationError("user_id", "must identify a signed-in user, not None")
    return uid


def _check_window(start: object, count: object, start_name: str = "after_seq") -> tuple[int, int | None]:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValidationError(start_name, "must be an int >= 0")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValidationError("limit", "must be an int >= 0 or None")
    return start, count


def _newest_first(summary: SessionSummary) -> tuple[int, str]:
    return (-to_micros(summary.updated_at), summary.id)


def _new_id() -> str:
    return os.urandom(16).hex()
