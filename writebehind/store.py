"""`SessionStore`: the plain in-memory store, and the hot tier of `WriteBehindStore`.

Every method is async for API compatibility with the write-behind store, but none
of them ever suspends: each call runs to completion on the event loop, so a call
is atomic with respect to every other call.

Ownership: every call names the caller (`user_id`, plus `binding_token` for an
anonymous session created with one). A session that exists but belongs to
someone else raises exactly the `NotFound` a missing one raises.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cachetools import LRUCache

from .branches import Branches, active_path, leaf_below, normalized, parent_of
from .errors import NotFound, ValidationError
from .model import (
    Metadata,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    check_id,
    check_metadata,
    check_optional_text,
    check_role,
    check_status,
    check_user_id,
    check_window,
    content_size,
    edited_message,
    new_id,
    new_message,
    newest_first,
    require_user,
    session_record,
    to_micros,
    utcnow,
)
from .policy import UserPreferences, check_keep_history, check_not_reserved
from .stats import StoreStats

__all__ = ["UNSET", "Applied", "Entry", "HotTier", "SessionStore", "SessionTree"]


class _Unset:
    """The type of `UNSET`: an optional update argument that was not given."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final[Any] = _Unset()
"""Default of optional update arguments: "leave as it is" (as opposed to None, "clear it")."""

_MAX_TITLE_BYTES: Final = 1024
_MAX_CLIENT_FIELD_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class SessionTree:
    """A session without its messages, plus where they branch (`get_tree`): enough to place
    any message in the session's tree (`parent`, and `writebehind.branches.siblings` for its
    alternatives) and to find the end of its active path (`leaf`). Getting one costs the
    same for a session of 2 messages or 2,000: no message is copied."""

    id: str
    status: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    message_count: int
    """Every message of the session, on every branch (its last seq)."""
    branches: Branches | None
    """None for a session that never branched (its active path is every message)."""

    @property
    def leaf(self) -> int:
        """The seq of the active path's last message (0: the path is empty)."""
        branches = self.branches
        return self.message_count if branches is None or branches.active is None else branches.active

    def parent(self, seq: int) -> int:
        """The message that message `seq` follows (0: it is at the start)."""
        return parent_of(self.branches, seq)

    @classmethod
    def of(cls, session: Entry | SessionRecord) -> SessionTree:
        """The tree of a hot-tier entry or of a record (no message copied)."""
        return cls(
            session.id,
            session.status,
            session.title,
            session.created_at,
            session.updated_at,
            len(session.messages),
            session.branches,
        )


class Entry:
    """The mutable entry the hot tier owns for one session. Callers only ever see
    snapshots of it; `WriteBehindStore` and its dirty index read it, and only the dirty
    index changes `version` and `disk_access_at` (what the database holds)."""

    __slots__ = (
        "binding_token",
        "branches",
        "client_ip",
        "created_at",
        "csrf_token",
        "disk_access_at",
        "id",
        "index",
        "last_access_at",
        "last_touch",
        "messages",
        "sizes",
        "status",
        "temporary",
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
        self.branches = record.branches
        # The last_access_at the database holds (None: not stored yet). Reads move
        # last_access_at in memory; it is persisted only once it has moved far enough.
        self.disk_access_at: datetime | None = record.last_access_at if record.version else None
        self.messages: list[StoredMessage] = list(record.messages)
        self.index: dict[str, int] = {m.id: i for i, m in enumerate(self.messages)}
        # UTF-8 size of a message's content, kept as tokens are appended so that the size
        # limit costs O(token), not a re-encoding of the whole reply on every token.
        self.sizes: dict[str, int] = {}
        self.last_touch = last_touch
        # Never written anywhere, whatever the policy (`ensure_session(persist=False)`), and
        # it expires like an anonymous session. Set once, at creation; never cleared.
        self.temporary = False

    def snapshot(self, with_messages: bool = True) -> SessionRecord:
        # `session_record`, not `SessionRecord(...)`: a sixth of the cost, on every call that
        # returns a record and every session a flush writes.
        return session_record(
            self.id,
            self.user_id,
            self.created_at,
            self.updated_at,
            self.last_access_at,
            self.status,
            self.title,
            tuple(self.messages) if with_messages else (),
            self.client_ip,
            self.user_agent,
            self.binding_token,
            self.csrf_token,
            self.version,
            self.branches,
        )

    def window(self, after_seq: int, limit: int | None) -> tuple[StoredMessage, ...]:
        """Up to `limit` messages of the active path with `seq > after_seq`."""
        if self.branches is None:
            return tuple(self.messages[after_seq : None if limit is None else after_seq + limit])
        path = active_path(self.messages, self.branches, after_seq)
        return tuple(path if limit is None else path[:limit])

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

    def owned_by(self, user_id: UserId | None, binding_token: str | None) -> bool:
        """Does this caller own the session? (A signed-in owner by id; an anonymous one by
        its binding token, if the session was created with one.)"""
        if self.user_id is not None:
            return self.user_id == user_id
        if user_id is not None:
            return False
        if self.binding_token is None:
            return True
        return binding_token is not None and secrets.compare_digest(
            self.binding_token.encode(), binding_token.encode()
        )


Applied = tuple["Entry", int | None, bool, Any]
"""What a write did: (the entry, the seq of the message it changed or None, whether the
whole session must be written, the caller's result)."""


class _LRU(LRUCache[str, Entry]):
    """cachetools' LRU with its one eviction hook overridden: a pinned entry the LRU pushes
    out is parked, not dropped, until it is unpinned."""

    def __init__(self, maxsize: int, tier: HotTier) -> None:
        super().__init__(maxsize)
        self.__tier = tier

    def popitem(self) -> tuple[str, Entry]:
        key, value = super().popitem()
        self.__tier._evicted(key, value)
        return key, value


class HotTier:
    """Every session in memory, and the one owner of that state.

    The LRU bounds it; pinned entries (dirty, or in flight to disk) are never dropped:
    the LRU parks them and they go when unpinned. There is one removal path (`remove`,
    plus the LRU's eviction and the anonymous TTL, both of which honour pins).
    `WriteBehindStore` and its dirty index use this API; apps use `SessionStore`.
    """

    def __init__(self, maxsize: int, anon_ttl_seconds: float, monotonic: Callable[[], float]) -> None:
        self.__lru = _LRU(maxsize, self)
        # Every entry, in the LRU or parked: lookups that must not reorder the LRU go here.
        self.__entries: dict[str, Entry] = {}
        self.__parked: dict[str, Entry] = {}
        self.__pins: set[str] = set()
        self.__by_user: dict[UserId, set[str]] = {}
        self.__anon_order: OrderedDict[str, None] = OrderedDict()
        self.__anon_ttl = anon_ttl_seconds
        self.__monotonic = monotonic
        self.evictions = 0
        self.expired = 0

    @property
    def maxsize(self) -> int:
        return int(self.__lru.maxsize)

    def __len__(self) -> int:
        return len(self.__entries)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self.__entries

    @property
    def parked(self) -> int:
        return len(self.__parked)

    def peek(self, session_id: str) -> Entry | None:
        """The entry, without touching the LRU or expiring it."""
        return self.__entries.get(session_id)

    def get(self, session_id: str) -> Entry | None:
        """The entry if it is in memory: LRU-touched (unparked), or expired and removed if it
        is an anonymous one idle past the TTL."""
        entry = self.__entries.get(session_id)
        if entry is None:
            return None
        parked = self.__parked.pop(session_id, None)
        if parked is not None:
            self.__lru[session_id] = entry
        else:
            self.__lru[session_id]  # the LRU's "recently used"
        if (
            (entry.user_id is None or entry.temporary)
            and self.__monotonic() - entry.last_touch > self.__anon_ttl
            and session_id not in self.__pins
        ):
            self.expired += 1
            self.remove(session_id)
            return None
        return entry

    def insert(self, record: SessionRecord, temporary: bool = False) -> Entry:
        """Put a record (new, or loaded from disk) into memory, replacing any entry of its id.
        A `temporary` one (never written) expires like an anonymous one and is still listed
        under its user."""
        if record.id in self.__entries:
            self.remove(record.id)
        entry = Entry(record, self.__monotonic())
        entry.temporary = temporary
        self.__entries[entry.id] = entry
        self.__lru[entry.id] = entry
        if entry.user_id is None or temporary:
            self.__anon_order[entry.id] = None
        if entry.user_id is not None:
            self.__by_user.setdefault(entry.user_id, set()).add(entry.id)
        return entry

    def remove(self, session_id: str) -> Entry | None:
        """Remove the session from memory, pinned or not (a delete): the one removal path."""
        entry = self.__entries.pop(session_id, None)
        if entry is None:
            return None
        self.__pins.discard(session_id)
        if self.__parked.pop(session_id, None) is None:
            del self.__lru[session_id]
        self.__unindex(entry)
        return entry

    def remove_user(self, user_id: UserId) -> list[Entry]:
        removed = []
        for sid in list(self.__by_user.get(user_id, ())):
            entry = self.remove(sid)
            if entry is not None:
                removed.append(entry)
        return removed

    def sessions_of(self, user_id: UserId) -> list[Entry]:
        entries = self.__entries
        return [entries[sid] for sid in self.__by_user.get(user_id, ())]

    def idle_signed_in(self, cutoff: datetime) -> list[Entry]:
        """Signed-in sessions last accessed before `cutoff`. A scan: for retention only,
        once a cleanup interval, never on a request."""
        return [e for e in self.__entries.values() if e.user_id is not None and e.last_access_at < cutoff]

    def session_ids_of(self, user_id: UserId) -> set[str]:
        return set(self.__by_user.get(user_id, ()))

    def claimed(self, entry: Entry, user_id: UserId) -> None:
        """An anonymous entry now belongs to `user_id`: re-index it (a temporary one keeps
        its idle TTL: a claim never makes it persistent)."""
        if not entry.temporary:
            self.__anon_order.pop(entry.id, None)
        entry.user_id = user_id
        entry.binding_token = None
        self.__by_user.setdefault(user_id, set()).add(entry.id)

    def touched(self, entry: Entry) -> None:
        if entry.user_id is None or entry.temporary:
            entry.last_touch = self.__monotonic()
            self.__anon_order[entry.id] = None
            self.__anon_order.move_to_end(entry.id)

    def pin(self, session_id: str) -> None:
        self.__pins.add(session_id)

    def unpin(self, session_id: str) -> None:
        self.__pins.discard(session_id)
        parked = self.__parked.pop(session_id, None)
        if parked is not None:
            self.__drop(session_id, parked)

    def expire_idle(self, limit: int = 8) -> int:
        """Drop up to `limit` anonymous and temporary sessions idle past the TTL, oldest first, skipping
        pinned ones (a policy may persist anonymous sessions). Amortised O(1), never a scan."""
        deadline = self.__monotonic() - self.__anon_ttl
        expired = 0
        order = self.__anon_order
        skipped: list[str] = []
        while order and expired + len(skipped) < limit:
            sid = next(iter(order))
            entry = self.__entries.get(sid)
            if entry is not None and entry.last_touch > deadline:
                break
            order.pop(sid)
            if entry is None:
                continue
            if sid in self.__pins:
                skipped.append(sid)  # its turn comes again once it is on disk
                continue
            expired += 1
            self.expired += 1
            self.remove(sid)
        for sid in skipped:
            order[sid] = None
        return expired

    def _evicted(self, session_id: str, entry: Entry) -> None:
        """The LRU pushed `entry` out: park it if pinned, else drop it."""
        if session_id in self.__pins:
            self.__parked[session_id] = entry
        else:
            self.__drop(session_id, entry)

    def __drop(self, session_id: str, entry: Entry) -> None:
        del self.__entries[session_id]
        self.evictions += 1
        self.__unindex(entry)

    def __unindex(self, entry: Entry) -> None:
        if entry.user_id is None or entry.temporary:
            self.__anon_order.pop(entry.id, None)
        if entry.user_id is None:
            return
        ids = self.__by_user.get(entry.user_id)
        if ids is not None:
            ids.discard(entry.id)
            if not ids:
                del self.__by_user[entry.user_id]


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
        self._tier = HotTier(maxsize, anon_ttl_seconds, monotonic)
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        self._hits = 0
        self._misses = 0
        # Users whose new sessions are temporary by default (`set_user_preferences`). In
        # memory, like everything of this store; `WriteBehindStore` keeps it on disk.
        self._no_history: set[UserId] = set()

    @property
    def maxsize(self) -> int:
        return self._tier.maxsize

    @property
    def tier(self) -> HotTier:
        """The sessions in memory (for `WriteBehindStore`, diagnostics and tests)."""
        return self._tier

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
        persist: bool | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """Return the caller's session `session_id`, creating it if it does not exist.

        With `session_id=None` a new random id is chosen. An existing session is
        returned unchanged (the other arguments only apply on creation).

        `persist=False` creates a temporary session: never written anywhere (under a
        `WriteBehindStore`), expiring after `anon_ttl_seconds` idle like an anonymous one,
        never made persistent by a claim. `None` (the default): the user's preference
        (`set_user_preferences`), else kept. Asking for an existing session with a
        `persist` it does not have raises `ValidationError("persist")`: a session never
        changes between temporary and kept.
        """
        check_not_reserved(session_id)
        uid = check_user_id(user_id)
        keep = uid is None or uid not in self._no_history
        session = self.do_ensure(
            session_id,
            user_id,
            title,
            status,
            client_ip,
            user_agent,
            binding_token,
            csrf_token,
            persist,
            keep,
        )[0]
        return session.snapshot()

    async def get_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionRecord:
        return self.owned(session_id, user_id, binding_token).snapshot()

    async def get_messages(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        after_seq: int = 0,
        limit: int | None = None,
        binding_token: str | None = None,
    ) -> tuple[StoredMessage, ...]:
        """The messages of the active path (every message, unless the session branched)
        with `seq > after_seq`, in order (what an SSE client missed)."""
        start, stop = check_window(after_seq, limit)
        session = self.owned(session_id, user_id, binding_token)
        return session.window(start, stop)

    async def get_tree(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionTree:
        """The session without its messages, and where they branch: O(1), whatever its
        length. Raises `NotFound` as `get_messages` does (another user's session too)."""
        return SessionTree.of(self.owned(session_id, user_id, binding_token))

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
        parent_seq: int | None = None,
    ) -> StoredMessage:
        """Append a message; its `seq` is one more than the last one's. It follows the end
        of the active path, or `parent_seq` (0: at the start) to start an alternative: an
        edited question is appended with the parent of the one it replaces, a regenerated
        reply with the question's seq. The new message ends the active path."""
        message: StoredMessage = self.do_append(
            session_id, user_id, role, content, message_id, metadata, binding_token, parent_seq
        )[3]
        return message

    async def pop_message(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> StoredMessage | None:
        """Remove the last message of the active path and return it (None if there is
        none). The session's last message is deleted, and its `seq` is the next append's:
        seqs stay 1, 2, 3… with no gap. In a session whose active path ends before its last
        message (an older alternative was chosen) the path's end is only taken off the
        path; it stays stored as an alternative. Either way the path now ends at the
        popped message's parent, where the next append goes."""
        message: StoredMessage | None = self.do_pop(session_id, user_id, binding_token)[3]
        return message

    async def switch_branch(
        self,
        session_id: str,
        seq: int,
        *,
        user_id: UserId | None,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> tuple[StoredMessage, ...]:
        """Make the active path go through message `seq` (an alternative "< 2/3 >"), on to
        its most recent continuation; returns the new active path. Writes one row."""
        path: tuple[StoredMessage, ...] = self.do_switch(session_id, user_id, seq, binding_token)[3]
        return path

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
        message: StoredMessage = self.do_update_message(
            session_id, message_id, user_id, content, append, metadata, binding_token
        )[3]
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
        return self.do_update_session(session_id, user_id, status, title, binding_token)[0].snapshot()

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The user's sessions, most recently updated first. Anonymous callers own no list."""
        start, count = check_window(offset, limit, "offset")
        uid = check_user_id(user_id)
        if uid is None:
            return []
        summaries = [s.summary() for s in self._tier.sessions_of(uid)]
        summaries.sort(key=newest_first)
        return summaries[start : None if count is None else start + count]

    async def delete_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> None:
        session = self.owned(session_id, user_id, binding_token, touch=False)
        self._tier.remove(session.id)

    async def delete_user(self, user_id: UserId) -> int:
        """Remove every session of the user, and their preferences; returns how many
        sessions there were in memory."""
        uid = require_user(user_id)
        self._no_history.discard(uid)
        return len(self._tier.remove_user(uid))

    async def set_user_preferences(self, user_id: UserId, *, keep_history: bool) -> UserPreferences:
        """`keep_history=False`: the user's new sessions are temporary unless created with
        `persist=True`. Sessions that exist keep what they are."""
        uid = require_user(user_id)
        check_keep_history(keep_history)
        if keep_history:
            self._no_history.discard(uid)
        else:
            self._no_history.add(uid)
        return UserPreferences(keep_history=keep_history)

    async def user_preferences(self, user_id: UserId) -> UserPreferences:
        return UserPreferences(keep_history=require_user(user_id) not in self._no_history)

    def is_temporary(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> bool:
        """Whether the caller's session `session_id` is in memory here and temporary. False
        for anything else, another user's session included. No I/O, no LRU touch."""
        entry = self._tier.peek(session_id) if type(session_id) is str else None
        return entry is not None and entry.temporary and entry.owned_by(check_user_id(user_id), binding_token)

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
        return self.do_claim(session_id, user_id, binding_token)[0].snapshot()

    def stats(self) -> StoreStats:
        tier = self._tier
        return StoreStats(
            hot_sessions=len(tier),
            hot_hits=self._hits,
            misses=self._misses,
            evictions=tier.evictions,
            expired=tier.expired,
            parked=tier.parked,
        )

    # -- the operations, synchronous, for the write-behind wrapper -------------------------
    # Each validates everything first and only then changes state, so a bad argument
    # changes nothing. Each returns an `Applied`: what `WriteBehindStore` marks dirty.

    def do_ensure(
        self,
        session_id: str | None,
        user_id: UserId | None,
        title: str | None,
        status: str,
        client_ip: str | None,
        user_agent: str | None,
        binding_token: str | None,
        csrf_token: str | None,
        persist: bool | None = None,
        keep_default: bool = True,
    ) -> Applied:
        """The whole session is to be written if it was created (unless it is temporary:
        `persist` False, or None and `keep_default` False)."""
        sid = new_id() if session_id is None else check_id("session_id", session_id)
        uid = check_user_id(user_id)
        title = check_optional_text("title", title, _MAX_TITLE_BYTES)
        status = check_status(status)
        client_ip = check_optional_text("client_ip", client_ip, _MAX_CLIENT_FIELD_BYTES)
        user_agent = check_optional_text("user_agent", user_agent, _MAX_CLIENT_FIELD_BYTES)
        binding_token = check_optional_text("binding_token", binding_token, _MAX_CLIENT_FIELD_BYTES)
        csrf_token = check_optional_text("csrf_token", csrf_token, _MAX_CLIENT_FIELD_BYTES)
        if persist is not None and type(persist) is not bool:
            raise ValidationError("persist", f"must be a bool or None, not {type(persist).__name__}")
        existing = self._tier.get(sid)
        if existing is not None:
            if not existing.owned_by(uid, binding_token):
                self._misses += 1
                raise NotFound(sid)
            if persist is not None and persist == existing.temporary:
                # Refused, not ignored: a caller told "kept" about a temporary session would
                # lose it, one told "temporary" about a kept one would leave it on disk.
                raise ValidationError(
                    "persist",
                    f"session {sid!r} is {'temporary' if existing.temporary else 'kept'}: a session never "
                    "changes between temporary and kept; start a new one",
                )
            self._touch(existing)
            return existing, None, False, existing
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
        self._tier.expire_idle()
        temporary = not (keep_default if persist is None else persist)
        entry = self._tier.insert(record, temporary)
        return entry, None, not temporary, entry

    def do_append(
        self,
        session_id: str,
        user_id: UserId | None,
        role: str,
        content: str,
        message_id: str | None,
        metadata: Metadata | None,
        binding_token: str | None,
        parent_seq: int | None = None,
    ) -> Applied:
        role = check_role(role)
        size = content_size(content, self.max_message_bytes)
        mid = None if message_id is None else check_id("message_id", message_id)
        metadata_json = check_metadata(metadata)
        session = self.owned(session_id, user_id, binding_token, touch=False)
        count = len(session.messages)
        if parent_seq is not None:
            _check_seq("parent_seq", parent_seq, 0, count, session.id)
        if mid is None:
            mid = new_id()
        elif mid in session.index:
            raise ValidationError("message_id", f"{mid!r} already exists in session {session.id!r}")
        old = session.branches
        if parent_seq is not None:
            parent = parent_seq
        elif old is None or old.active is None:
            parent = count  # after the last message: every ordinary append
        else:
            parent = old.active
        if parent != count:
            # A branch point: a new (small) `Branches`, one pair per branch point. An append
            # after the last message, every ordinary one, leaves them as they are.
            parents = dict(old.parents) if old is not None else {}
            parents[count + 1] = parent
            session.branches = Branches(parents)
        elif old is not None and old.active is not None:
            session.branches = normalized(old.parents, None, count + 1)  # the path ends here now
        now = self._clock()
        self._touch(session, now)
        message = new_message(session.id, mid, count + 1, role, content, now, to_micros(now), metadata_json)
        session.sizes[mid] = size
        session.index[mid] = len(session.messages)
        session.messages.append(message)
        session.updated_at = now
        return session, message.seq, False, message

    def do_pop(self, session_id: str, user_id: UserId | None, binding_token: str | None) -> Applied:
        """The removed message is the caller's result, None if there was none; the session
        row is to be written (its count changed). The removal itself is recorded by the
        caller: `WriteBehindStore` tells its dirty index what to delete on disk."""
        session = self.owned(session_id, user_id, binding_token, touch=False)
        now = self._clock()
        self._touch(session, now)
        if not session.messages:
            return session, None, False, None
        branches = session.branches
        if branches is not None and branches.active is not None:
            # The active path ends before the last message (an older alternative was chosen):
            # its end leaves the path, and stays stored as an alternative, since removing a
            # message other than the last would leave a gap in the seqs.
            leaf = branches.active
            if leaf == 0:
                return session, None, False, None
            session.branches = normalized(branches.parents, branches.parent(leaf), len(session.messages))
            session.updated_at = now
            return session, None, False, session.messages[leaf - 1]
        message = session.messages.pop()
        del session.index[message.id]
        session.sizes.pop(message.id, None)
        session.updated_at = now
        if branches is not None:
            # The path that ended at the popped message now ends at its parent.
            session.branches = normalized(
                branches.parents, branches.parent(message.seq), len(session.messages)
            )
        return session, None, False, message

    def do_switch(
        self, session_id: str, user_id: UserId | None, seq: int, binding_token: str | None
    ) -> Applied:
        """The session row is to be written if the active path moved (a switch to where it
        is already is no write)."""
        session = self.owned(session_id, user_id, binding_token, touch=False)
        count = len(session.messages)
        _check_seq("seq", seq, 1, count, session.id)
        old = session.branches
        leaf = leaf_below(old, count, seq)
        branches = None if old is None else normalized(old.parents, leaf, count)
        now = self._clock()
        self._touch(session, now)
        if branches != old:
            session.branches = branches
            session.updated_at = now
        return session, None, False, session.window(0, None)

    def do_update_message(
        self,
        session_id: str,
        message_id: str,
        user_id: UserId | None,
        content: str | None,
        append: str | None,
        metadata: Metadata | None,
        binding_token: str | None,
    ) -> Applied:
        mid = check_id("message_id", message_id)
        if content is not None and append is not None:
            raise ValidationError("append", "give content or append, not both")
        size = 0
        if content is not None:
            size = content_size(content, self.max_message_bytes)
        elif append is not None:
            size = content_size(append, self.max_message_bytes, "append")
        metadata_json: str | _Unset | None = UNSET
        if metadata is not UNSET:
            metadata_json = check_metadata(metadata)
        session = self.owned(session_id, user_id, binding_token, touch=False)
        position = session.index.get(mid)
        if position is None:
            raise NotFound(session.id, mid)
        old = session.messages[position]
        if content is not None:
            session.sizes[mid] = size
        elif append is not None:
            known = session.sizes.get(mid)
            total = (len(old.content.encode()) if known is None else known) + size
            if total > self.max_message_bytes:
                raise ValidationError(
                    "content", f"would be {total} bytes, more than the limit of {self.max_message_bytes}"
                )
            session.sizes[mid] = total
        now = self._clock()
        self._touch(session, now)
        # An appended token copies none of the text before it (see `edited_message`).
        message = edited_message(
            old,
            now,
            content,
            append,
            old.metadata_json if isinstance(metadata_json, _Unset) else metadata_json,
        )
        session.messages[position] = message
        session.updated_at = now
        return session, message.seq, False, message

    def do_update_session(
        self,
        session_id: str,
        user_id: UserId | None,
        status: str,
        title: str | None,
        binding_token: str | None,
    ) -> Applied:
        if status is not UNSET:
            status = check_status(status)
        if title is not UNSET:
            title = check_optional_text("title", title, _MAX_TITLE_BYTES)
        session = self.owned(session_id, user_id, binding_token)
        if status is not UNSET:
            session.status = status
        if title is not UNSET:
            session.title = title
        session.updated_at = self._clock()
        return session, None, False, session

    def do_claim(self, session_id: str, user_id: UserId, binding_token: str | None) -> Applied:
        """The whole session is to be written: it persists from now on."""
        uid = require_user(user_id)
        sid = check_id("session_id", session_id)
        session = self._tier.get(sid)
        if session is None or not (session.user_id == uid or session.owned_by(None, binding_token)):
            self._misses += 1
            raise NotFound(sid)
        if session.user_id != uid:
            self._tier.claimed(session, uid)
            session.updated_at = self._clock()
        self._touch(session)
        return session, None, True, session

    def owned(
        self,
        session_id: str,
        user_id: UserId | None,
        binding_token: str | None,
        touch: bool = True,
    ) -> Entry:
        """The caller's entry, or the `NotFound` a missing session raises too."""
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        session = self._tier.get(sid)
        if session is None or not session.owned_by(uid, binding_token):
            self._misses += 1
            raise NotFound(sid)
        self._hits += 1
        if touch:
            self._touch(session)
        return session

    def _touch(self, session: Entry, now: datetime | None = None) -> None:
        session.last_access_at = self._clock() if now is None else now
        self._tier.touched(session)


def _check_seq(field_name: str, value: object, low: int, high: int, session_id: str) -> int:
    """A message position in a session: an int from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field_name, f"must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValidationError(
            field_name, f"must be from {low} to {high} (the messages of session {session_id!r}), got {value}"
        )
    return value
