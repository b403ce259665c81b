"""`PostgresOwnership`: one owner per session across app instances sharing a PostgreSQL schema.

A write-behind store acknowledges writes from memory, so only the instance that will
persist a session may serve it from its hot tier (DESIGN.md, "Several processes"). With
PostgreSQL, several instances share one schema; this module gives each session one owner
at a time, with PostgreSQL's own primitives and no other server:

- **Liveness: one advisory lock per instance.** At `start()` an instance takes a number
  from `{schema}.instance_ids`, holds the session-level advisory lock `lock_key` (that
  number in this schema's namespace) on a connection it keeps for its lifetime, and
  registers in `{schema}.instances` (id, lock_key, pid, host). The server frees the lock
  when that connection ends, SIGKILL and lost machines included, so "is the owner alive"
  is `pg_try_advisory_xact_lock(lock_key)` failing. One lock per instance, never one per
  session: the lock table (max_locks_per_transaction x max_connections, 6,400 slots by
  default) would run out at a few thousand hot sessions.
- **Who owns what: `{schema}.owners` (session_id, owner).** Not a column of `sessions`:
  a session created on one instance has no row until its first flush, and a GET on
  another instance right after the creation must still find its owner (and two
  instances creating one id must not both accept writes). Taking a session is one
  statement (`_take_sql`): insert the claim, or overwrite it if it is already this
  instance's, its instance is unregistered, or that instance's lock is free (dead); if a
  live instance holds it, the same statement notifies that owner. The claim stays while
  the session is in memory here and after the LRU evicted it (released lazily: a
  request for it is answered at once), until a handoff, `close()`, or this instance's
  death. The row's `version` stays the fence for the case where ownership is lost all
  the same (a partition): the loser's messages are merged after the winner's.
- **Handoff: LISTEN/NOTIFY on the kept connection.** Each instance listens on its own
  channel. The owner asked for a session flushes it, waits for any `hold()` on it to end
  (a reply streaming into it), drops it from its hot tier, and in one statement moves
  its claim to the requester and answers; the requester loads it. Three round trips in
  all when the session is clean: take-and-ask, move-and-answer, load.

The messages (`n` numbers a request, so that an answer is matched to the one it answers):

    handoff <sid> <requester> <n>   "let go of it"      -> held <sid> <n> at once if a reply is
                                                           streaming into it; once let go:
                                                           given <sid> <n> (the claim is the
                                                           requester's now) or released <sid> <n>
                                                           (to the others: take it, or ask again)
    read <sid> <requester> <n>      "let go if you can  -> given / released, or (held) after
                                     at once, else just    flushing it: flushed <sid> <n>
                                     flush it"

    follow <sid> <requester> <n>    a `read` that also     -> as `read`; until the session leaves
                                     registers the            the owner, each change to it is sent
                                     requester as a           to the requester as `live <sid> <json>`
                                     follower                 (see `writebehind.live`), and when it
                                                              leaves, `resync <sid>`
    unfollow <sid> <requester>      "stop sending"          (no answer)

A `read` is the sketch's `flush` folded into the handoff request: one round trip instead
of two when the session is held, and nothing left pending at the owner after a read. A
`follow` registers the follower before the flush, so that every change after what the
follower will load reaches it as a `live` message (one it already has is recognised by
its offset and skipped).
Handing the claim over (`given`) rather than deleting it saves the requester a take.

Waits are bounded: an owner whose lock says it is alive but that does not answer within
`answer_timeout_s`, or whose hold outlasts `hold_timeout_s`, makes `acquire` raise
`OwnershipError`; nothing changed. A requester polls every `poll_s` meanwhile, so a dead
owner (its lock freed) is taken over within that, and a lost notification costs a poll.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from ..errors import ClosedError, OwnershipError, StorageError, ValidationError, WriteBehindError
from ..model import check_id
from ..ownership import Access, Flush, LetGo, LiveSink

if TYPE_CHECKING:
    from .postgres import PostgresBackend

__all__ = ["OwnershipStats", "PostgresOwnership"]

LOG = logging.getLogger("writebehind")

# How long close() may spend releasing this instance's sessions before it just drops its
# connection (which frees its lock: the others then take its sessions as a dead one's).
_CLOSE_TIMEOUT_S: Final = 1.0
_RECONNECT_MAX_DELAY_S: Final = 5.0
_MAX_KEY_TRIES: Final = 100
# Bounds `kept_by` (the owner of each session last read elsewhere).
_MAX_KEPT_BY: Final = 10_000
_REQUESTS: Final = frozenset({"handoff", "read", "follow"})
_REPLIES: Final = frozenset({"held", "flushed", "given", "released"})


def namespace_of(schema: str) -> int:
    """The high half of this schema's lock keys: advisory locks and NOTIFY channels are
    per database, shared by every schema in it."""
    return zlib.crc32(f"writebehind:{schema}".encode()) & 0x7FFFFFFF


def lock_key_of(namespace: int, instance_id: int) -> int:
    return (namespace << 32) | (instance_id & 0xFFFFFFFF)


def channel_of(namespace: int, instance_id: int | None) -> str:
    """The instance's NOTIFY channel (None: the prefix all of this schema's share)."""
    return f"writebehind_{namespace:08x}_{'' if instance_id is None else instance_id}"


@dataclass(frozen=True, slots=True)
class OwnershipStats:
    instance_id: int | None
    handoffs: int  # sessions taken from a live owner once it let go
    takeovers: int  # sessions taken from an owner whose lock was free (dead)
    given: int  # sessions this instance let go to another
    reads_elsewhere: int  # reads answered from the database while the owner kept the session
    timeouts: int  # acquires that gave up (OwnershipError)


@dataclass(frozen=True, slots=True)
class _Request:
    verb: str
    requester: int
    number: int


@dataclass(slots=True)
class _Serving:
    """The owner's side of one session's handoff."""

    new: list[_Request] = field(default_factory=list)  # not answered yet
    waiting: list[_Request] = field(default_factory=list)  # handoffs told "held"
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    handed: int = 0  # times `_give` let go and answered everything pending

    def pending(self) -> list[_Request]:
        """Everything to answer once the session is let go (and forget it here)."""
        requests = [*self.waiting, *self.new]
        self.waiting.clear()
        self.new.clear()
        self.handed += 1
        return requests


class _Waiter:
    """The requester's side: the answers to its requests about one session."""

    __slots__ = ("event", "numbers", "replies")

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.replies: deque[tuple[str, int]] = deque()
        self.event = asyncio.Event()

    def put(self, verb: str, number: int) -> None:
        self.replies.append((verb, number))
        self.event.set()

    async def next(self, within: float) -> tuple[str, int] | None:
        """The next answer (verb, the request it answers), or None if none came `within`
        seconds."""
        if not self.replies:
            self.event.clear()
            try:
                async with asyncio.timeout(within):
                    await self.event.wait()
            except TimeoutError:
                return None
        return self.replies.popleft()


@dataclass(frozen=True, slots=True)
class _Owner:
    id: int
    pid: int | None
    host: str | None

    def __str__(self) -> str:
        if self.pid is None:
            return f"instance {self.id}"
        return f"instance {self.id}, pid {self.pid} on host {self.host}"


_AGAIN: Final = _Owner(-1, None, None)


class PostgresOwnership:
    """This instance's ownership of sessions in one PostgreSQL schema (see the module doc).

    Made by `PostgresBackend.ownership()`, started by the store after the backend opened
    (`start`), closed before the backend closes (`close`).
    """

    def __init__(
        self,
        backend: PostgresBackend,
        *,
        answer_timeout_s: float = 5.0,
        hold_timeout_s: float = 120.0,
        poll_s: float = 0.25,
    ) -> None:
        self._backend = backend
        s = backend.schema
        self._schema = s
        self._namespace = namespace_of(s)
        self._answer_timeout = answer_timeout_s
        self._hold_timeout = hold_timeout_s
        self._poll = poll_s
        self._conn: asyncpg.Connection | None = None
        self._id: int | None = None
        self._let_go: LetGo | None = None
        self._flush: Flush | None = None
        self._closing = False
        self._numbers = itertools.count(1)
        self._waiters: dict[str, set[_Waiter]] = {}
        self._serving: dict[str, _Serving] = {}
        # Sessions whose claim is being moved away after they left the hot tier: a local
        # acquire of one waits for that, or it could re-take it just before the move.
        self._releasing: dict[str, asyncio.Future[None]] = {}
        # Sessions let go so far: an acquire that saw this change while it took a session
        # takes it again (the claim it got may be moving away).
        self._releases = 0
        self._parked: list[tuple[str, _Request]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reconnecting: asyncio.Task[None] | None = None
        self._handoffs = self._takeovers = self._given = self._reads_elsewhere = self._timeouts = 0
        # Live following (see `writebehind.live`): who keeps the sessions this instance last
        # read elsewhere, and where `follow`, `unfollow`, `live` and `resync` messages go.
        self._kept_by: dict[str, int] = {}
        self._live: LiveSink | None = None
        # One statement, one round trip, whatever the outcome: `taken` is 1 if the claim is
        # now this instance's; else `owner` (as of the statement's snapshot) holds it and,
        # unless $4 is null, was sent the request $4 on its channel ($3 || owner). A row
        # lock orders concurrent takers: the second re-checks the first's result.
        self._take_sql = f"""
            WITH before AS (
                SELECT o.owner, i.pid, i.host FROM {s}.owners o
                LEFT JOIN {s}.instances i ON i.id = o.owner WHERE o.session_id = $1
            ), taken AS (
                INSERT INTO {s}.owners AS o (session_id, owner) VALUES ($1, $2)
                ON CONFLICT (session_id) DO UPDATE SET owner = excluded.owner
                WHERE o.owner = excluded.owner
                   OR NOT EXISTS (SELECT 1 FROM {s}.instances i WHERE i.id = o.owner)
                   OR (SELECT pg_try_advisory_xact_lock(i.lock_key) FROM {s}.instances i
                       WHERE i.id = o.owner)
                RETURNING 1
            ), asked AS (
                SELECT pg_notify($3 || b.owner, $4) FROM before b
                WHERE $4::text IS NOT NULL AND b.owner <> $2 AND NOT EXISTS (SELECT 1 FROM taken)
            )
            SELECT (SELECT count(*) FROM taken) AS taken, (SELECT count(*) FROM asked) AS asked,
                   b.owner, b.pid, b.host
            FROM (SELECT) AS one LEFT JOIN before b ON true"""
        # The owner let go: its claim goes to the first requester ("given"), the others are
        # told "released"; one statement. If the claim was not this instance's any more,
        # all of them are told "released".
        self._hand_sql = f"""
            WITH moved AS (
                UPDATE {s}.owners SET owner = $3 WHERE session_id = $1 AND owner = $2 RETURNING 1
            )
            SELECT pg_notify(t.c, CASE WHEN t.first AND EXISTS (SELECT 1 FROM moved)
                                       THEN 'given ' ELSE 'released ' END || $1 || ' ' || t.n)
            FROM unnest($4::text[], $5::bigint[], $6::boolean[]) AS t(c, n, first)"""

    def __repr__(self) -> str:
        return f"PostgresOwnership(schema={self._schema!r}, instance={self._id})"

    @property
    def instance_id(self) -> int | None:
        return self._id

    @property
    def lock_key(self) -> int | None:
        return None if self._id is None else lock_key_of(self._namespace, self._id)

    def stats(self) -> OwnershipStats:
        return OwnershipStats(
            self._id, self._handoffs, self._takeovers, self._given, self._reads_elsewhere, self._timeouts
        )

    def attach(self, live: LiveSink) -> None:
        """Where the messages of live following go (the store's `writebehind.live.Relay`)."""
        self._live = live

    def kept_by(self, session_id: str) -> int | None:
        """The instance that kept the session at this instance's last read of it elsewhere."""
        return self._kept_by.get(session_id)

    async def tell(self, session_id: str, instances: Sequence[int], payloads: Sequence[str]) -> None:
        """Send each payload, in order, to each of these instances as `live <sid> <payload>`
        (an empty payload: `resync <sid>`). One statement; NOTIFYs of one transaction arrive
        in order, and this is awaited before the next, so every follower sees them in order."""
        if not instances or not payloads:
            return
        channels = [channel_of(self._namespace, i) for i in instances for _ in payloads]
        me = self._require_id()
        messages = [
            f"live {session_id} {me} {p}" if p else f"resync {session_id} {me}"
            for _ in instances
            for p in payloads
        ]
        async with self._backend.connection("live changes") as conn:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(c, p, n) "
                "ORDER BY n",
                channels,
                messages,
            )

    async def unfollow(self, session_id: str, owner: int) -> None:
        """Tell `owner` to stop sending this instance the session's changes."""
        me = self._require_id()
        async with self._backend.connection("unfollow") as conn:
            await conn.execute(
                "SELECT pg_notify($1, $2)", channel_of(self._namespace, owner), f"unfollow {session_id} {me}"
            )

    async def signal(self, session_id: str, name: str) -> bool:
        """Send `name` to the live instance that owns the session, if that is not this one
        (the app's request, say "stop the reply you are writing"); whether one was told."""
        me = self._require_id()
        async with self._backend.connection("signal") as conn:
            told = await conn.fetchval(
                "SELECT count(pg_notify($2::text || o.owner, "
                "'signal ' || $1::text || ' ' || $3::bigint || ' ' || $4::text)) "
                f"FROM {self._schema}.owners o WHERE o.session_id = $1 AND o.owner <> $3",
                session_id,
                channel_of(self._namespace, None),
                me,
                name,
            )
        return bool(told)

    async def alive(self, instances: Sequence[int]) -> set[int]:
        """Which of these instances are alive (registered, their lock held)."""
        if not instances:
            return set()
        async with self._backend.connection("liveness") as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT id FROM {self._schema}.instances WHERE id = ANY($1::bigint[]) "
                "AND NOT pg_try_advisory_xact_lock(lock_key)",
                list(instances),
            )
        return {int(row["id"]) for row in rows}

    def pending_handoffs(self, session_id: str) -> int:
        """Handoff requests for the session waiting here for its holds to end."""
        serving = self._serving.get(session_id)
        return 0 if serving is None else len(serving.waiting)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, let_go: LetGo, flush: Flush) -> None:
        """Register this instance, hold its lock, listen on its channel, and forget the
        instances that died (their sessions are free). Raises StorageError."""
        if self._conn is not None:
            return
        self._let_go, self._flush = let_go, flush
        self._closing = False
        await self._register()
        try:
            await self._forget_the_dead()
        except BaseException:
            await self._drop_connection()
            raise

    async def _register(self) -> None:
        s = self._schema
        try:
            conn = await asyncpg.connect(self._backend.dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StorageError(f"cannot connect to PostgreSQL for session ownership: {exc}") from exc
        try:
            for _ in range(_MAX_KEY_TRIES):
                # The lock before the row: a row whose lock is free reads as a dead instance.
                instance_id = int(await conn.fetchval(f"SELECT nextval('{s}.instance_ids')"))
                key = lock_key_of(self._namespace, instance_id)
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    break
            else:  # pragma: no cover - only if another schema's keys collide 100 times
                raise StorageError(f"no free advisory lock key for an instance of schema {s}")
            await conn.execute(
                f"INSERT INTO {s}.instances (id, lock_key, pid, host) VALUES ($1, $2, $3, $4)",
                instance_id,
                key,
                os.getpid(),
                socket.gethostname(),
            )
            await conn.add_listener(channel_of(self._namespace, instance_id), self._on_notify)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise StorageError(f"cannot register this instance in {s}.instances: {exc}") from exc
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_lost)
        self._conn, self._id = conn, instance_id
        LOG.info("instance %d registered in PostgreSQL schema %s (lock key %d)", instance_id, s, key)

    async def _forget_the_dead(self) -> None:
        """Delete instances whose lock is free, and their claims (a few at a time: each
        found dead holds its key until the transaction ends)."""
        s = self._schema
        async with self._backend.connection("ownership cleanup") as conn, conn.transaction():
            dead = [
                row["id"]
                for row in await conn.fetch(
                    f"DELETE FROM {s}.instances WHERE id IN (SELECT id FROM {s}.instances "
                    "WHERE id <> $1 AND pg_try_advisory_xact_lock(lock_key) LIMIT 100) RETURNING id",
                    self._id,
                )
            ]
            if dead:
                await conn.execute(f"DELETE FROM {s}.owners WHERE owner = ANY($1)", dead)
        if dead:
            LOG.info("forgot %d instances of schema %s that had died", len(dead), s)

    async def close(self) -> None:
        """Release every session this instance owns and drop its lock. Bounded: if the
        database does not answer, the lock goes with the connection all the same."""
        if self._conn is None:
            return
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        for sid, serving in self._serving.items():
            self._parked.extend((sid, r) for r in [*serving.new, *serving.waiting])
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        s = self._schema
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                async with self._backend.connection("ownership release") as conn, conn.transaction():
                    await conn.execute(f"DELETE FROM {s}.owners WHERE owner = $1", self._id)
                    await conn.execute(f"DELETE FROM {s}.instances WHERE id = $1", self._id)
                for sid, request in self._parked:
                    await self._answer(sid, [(request, "released")])
        except (StorageError, TimeoutError) as exc:
            LOG.warning("could not release this instance's sessions (%s); its lock goes all the same", exc)
        finally:
            self._parked.clear()
            await self._drop_connection()

    async def abandon(self) -> None:
        """Drop the lock connection as a SIGKILL would: nothing released. For crash tests."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.remove_termination_listener(self._on_lost)
            conn.terminate()

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.remove_termination_listener(self._on_lost)
        try:
            await asyncio.wait_for(conn.close(), 1.0)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    def _on_lost(self, conn: asyncpg.Connection) -> None:
        """The lock connection ended while the store runs (the server restarted, a proxy or
        `pg_terminate_backend` cut it): the lock is gone, so the others may take this
        instance's sessions. Register again and keep the claims nobody took meanwhile;
        a session taken meanwhile is written by both until this instance's copy goes,
        and the version fence merges, never drops."""
        if conn is not self._conn or self._closing:
            return
        LOG.error("lost the PostgreSQL connection that holds instance %s's lock; registering again", self._id)
        self._conn = None
        self._reconnecting = asyncio.get_running_loop().create_task(
            self._reregister(), name="writebehind-ownership-reconnect"
        )

    async def _reregister(self) -> None:
        old = self._id
        delay = 0.1
        while not self._closing:
            try:
                await self._register()
                s = self._schema
                async with self._backend.connection("ownership re-registration") as conn, conn.transaction():
                    moved = await conn.execute(
                        f"UPDATE {s}.owners SET owner = $1 WHERE owner = $2", self._id, old
                    )
                    await conn.execute(f"DELETE FROM {s}.instances WHERE id = $1", old)
                kept = moved.split()[-1]
                LOG.warning("instance %s registered again as %s (%s claims kept)", old, self._id, kept)
                return
            except StorageError as exc:
                LOG.warning("registering again failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY_S)

    # -- the requester's side ------------------------------------------------------------------

    async def acquire(self, session_id: str, *, reading: bool = False, follow: bool = False) -> Access:
        """Make this instance the session's owner, asking its current owner to let go if it
        is alive, and return `Access.OWNED` (load it now). With `reading`, an owner that
        keeps the session (a reply streaming into it) flushes it instead, and this returns
        `Access.ELSEWHERE` (read it from the database, do not keep it). `follow` is `reading`,
        and the owner also sends this instance the session's changes from then on.

        Raises `OwnershipError` if the owner did not answer in time, `StorageError` if the
        database failed, `ClosedError` once closing."""
        loop = asyncio.get_running_loop()
        me = self._require_id()
        verb = "follow" if follow else "read" if reading else "handoff"
        waiter = _Waiter()
        waiters = self._waiters.setdefault(session_id, set())
        waiters.add(waiter)
        asked: int | None = None  # the owner asked and not answered yet, since `asked_at`
        asked_at = 0.0
        held_since: float | None = None
        handed = False  # an owner was asked: taking it now is a handoff
        number = 0  # the request asked last
        try:
            while True:
                if self._closing:
                    raise ClosedError("the store is closing")
                await self._settled(session_id)
                releases = self._releases
                request = None  # held: the owner has the request and answers when the hold ends
                if held_since is None:
                    number = next(self._numbers)
                    waiter.numbers.add(number)
                    request = f"{verb} {session_id} {me} {number}"
                owner = await self._take(session_id, request)
                if owner is None:
                    if self._releases != releases:
                        continue  # let go here meanwhile: the claim may be moving away
                    self._handoffs += handed
                    return Access.OWNED
                if owner is _AGAIN:
                    await asyncio.sleep(0.001)
                    continue
                now = loop.time()
                if request is not None:
                    handed = True
                    if asked != owner.id:
                        asked, asked_at = owner.id, now
                elif held_since is not None and now - held_since > self._hold_timeout:
                    self._timeouts += 1
                    raise OwnershipError(
                        session_id,
                        f"a reply streaming into it there has not ended within {self._hold_timeout:g}s",
                        str(owner),
                    )
                answer = await waiter.next(self._poll)
                if answer is None:
                    if asked is not None and loop.time() - asked_at > self._answer_timeout:
                        self._timeouts += 1
                        raise OwnershipError(
                            session_id,
                            f"its owner did not answer within {self._answer_timeout:g}s, "
                            "although its lock says it is alive",
                            str(owner),
                        )
                    continue
                asked = None
                reply, answered = answer
                if reply == "given":
                    if answered != number or self._releases != releases:
                        # Given for an earlier request, or let go here since: it may have
                        # moved on. Take it again (at once if it is still this instance's).
                        continue
                    self._handoffs += 1
                    return Access.OWNED
                if reply == "flushed":
                    self._reads_elsewhere += 1
                    self._kept_by[session_id] = owner.id
                    if len(self._kept_by) > _MAX_KEPT_BY:
                        del self._kept_by[next(iter(self._kept_by))]
                    return Access.ELSEWHERE
                # "released": take it on the next turn (or ask whoever has it now).
                held_since = (held_since or now) if reply == "held" else None
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(session_id) is waiters:
                del self._waiters[session_id]

    async def _settled(self, session_id: str) -> None:
        while (releasing := self._releasing.get(session_id)) is not None:
            await asyncio.wait([releasing])

    async def _take(self, session_id: str, request: str | None) -> _Owner | None:
        """None if the claim is this instance's now; else who holds it, sent `request`
        (`_AGAIN`: nobody as of a moment ago, try again)."""
        me = self._require_id()
        async with self._backend.connection("ownership") as conn:
            row = await conn.fetchrow(
                self._take_sql, session_id, me, channel_of(self._namespace, None), request
            )
        assert row is not None
        previous = row["owner"]
        if row["taken"]:
            if previous is not None and previous != me:
                self._takeovers += 1
                LOG.info("session %s taken over from instance %s, which had died", session_id, previous)
            return None
        if previous is None or previous == me:
            return _AGAIN
        return _Owner(previous, row["pid"], row["host"])

    def _require_id(self) -> int:
        if self._id is None:
            raise ClosedError("session ownership is not started")
        return self._id

    # -- the owner's side ----------------------------------------------------------------------

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        try:
            text = str(payload)
            verb, sid, *rest = text.split(" ", 3 if text.startswith("live ") else -1)
            check_id("session_id", sid)
            if verb in ("live", "resync") and len(rest) == (2 if verb == "live" else 1):
                if self._live is not None:
                    self._live.received(sid, int(rest[0]), rest[1] if verb == "live" else None)
            elif verb == "signal" and len(rest) == 2 and rest[1].isidentifier():
                if self._live is not None:
                    self._live.signalled(sid, rest[1])
            elif verb == "unfollow" and len(rest) == 1:
                if self._live is not None:
                    self._live.unfollowed(sid, int(rest[0]))
            elif verb in _REQUESTS and len(rest) == 2:
                if verb == "follow" and self._live is not None:
                    # Before the flush that answers it: every later change reaches the follower.
                    self._live.followed(sid, int(rest[0]))
                self._request(sid, _Request(verb, int(rest[0]), int(rest[1])))
            elif verb in _REPLIES and len(rest) == 1:
                number = int(rest[0])
                for waiter in self._waiters.get(sid, ()):
                    if verb == "released" or number in waiter.numbers:
                        waiter.put(verb, number)
            else:
                raise ValueError(verb)
        except (ValueError, ValidationError):
            LOG.warning("ignored a malformed ownership message on channel %s", channel)

    def _request(self, session_id: str, request: _Request) -> None:
        if self._closing:
            self._parked.append((session_id, request))  # answered once close() released all
            return
        serving = self._serving.get(session_id)
        if serving is None:
            serving = self._serving[session_id] = _Serving()
            task = asyncio.get_running_loop().create_task(
                self._serve(session_id, serving), name="writebehind-handoff"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        serving.new.append(request)
        serving.wake.set()

    async def _serve(self, sid: str, serving: _Serving) -> None:
        """Answer the requests for one session until none is left: let it go at once if
        nothing holds it; else flush it for readers, tell handoffs "held", and let it go
        when its holds end (bounded by the hold timeout)."""
        loop = asyncio.get_running_loop()
        giving: asyncio.Task[bool] | None = None
        deadline = 0.0
        try:
            while True:
                if serving.new:
                    batch = list(serving.new)
                    handed = serving.handed
                    # Followers of a session kept here in memory do not take it: two streams
                    # on two other instances would pass an idle session to and fro.
                    keep = (
                        giving is None
                        and self._live is not None
                        and self._live.keeps(sid)
                        and all(r.verb == "follow" for r in batch)
                    )
                    if giving is None and not keep:
                        if await self._give(sid, serving, wait=False):
                            continue  # everything pending was answered
                    elif keep or any(r.verb != "handoff" for r in batch):
                        assert self._flush is not None
                        await self._flush()  # flushed after these reads came
                    if serving.handed == handed:  # not let go meanwhile: kept, flushed
                        del serving.new[: len(batch)]
                        serving.waiting.extend(r for r in batch if r.verb == "handoff")
                        answers = [(r, "held" if r.verb == "handoff" else "flushed") for r in batch]
                        await self._answer(sid, answers)
                    continue
                if not serving.waiting:
                    return
                if giving is None:
                    giving = loop.create_task(self._give(sid, serving, wait=True), name="writebehind-let-go")
                    deadline = loop.time() + self._hold_timeout
                serving.wake.clear()
                if not giving.done():
                    woken = loop.create_task(serving.wake.wait())
                    try:
                        await asyncio.wait(
                            [giving, woken],
                            timeout=max(0.0, deadline - loop.time()),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        woken.cancel()
                if giving.done():
                    giving.result()  # its error, if it failed
                    giving = None
                elif loop.time() >= deadline and not serving.new:
                    LOG.warning(
                        "session %s: held here longer than %gs; %d handoff requests dropped",
                        sid,
                        self._hold_timeout,
                        len(serving.waiting),
                    )
                    return
        except WriteBehindError as exc:
            # A flush failed (the data stays here) or the store is closing: the requesters
            # time out, or are answered by close().
            if self._closing or isinstance(exc, ClosedError):
                self._parked.extend((sid, r) for r in [*serving.new, *serving.waiting])
            else:
                LOG.warning("session %s could not be handed over: %s", sid, exc)
        finally:
            if giving is not None:
                giving.cancel()
            if self._serving.get(sid) is serving:
                del self._serving[sid]

    async def _give(self, sid: str, serving: _Serving, *, wait: bool) -> bool:
        """The store lets go of the session (False: a hold keeps it, flushed), then its
        claim goes to the first requester and everything pending is answered. No await
        between the two: a local acquire waits until the claim has moved."""
        assert self._let_go is not None
        if not await self._let_go(sid, wait):
            return False
        requests = serving.pending()
        releasing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releasing[sid] = releasing
        self._releases += 1
        try:
            me = self._require_id()
            async with self._backend.connection("ownership handoff") as conn:
                if requests:
                    await conn.execute(
                        self._hand_sql,
                        sid,
                        me,
                        requests[0].requester,
                        [channel_of(self._namespace, r.requester) for r in requests],
                        [r.number for r in requests],
                        [i == 0 for i in range(len(requests))],
                    )
                else:
                    await conn.execute(
                        f"DELETE FROM {self._schema}.owners WHERE session_id = $1 AND owner = $2", sid, me
                    )
        finally:
            if self._releasing.get(sid) is releasing:
                del self._releasing[sid]
            releasing.set_result(None)
        self._given += 1
        return True

    async def _answer(self, sid: str, answers: Sequence[tuple[_Request, str]]) -> None:
        if not answers:
            return
        async with self._backend.connection("ownership answer") as conn:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)",
                [channel_of(self._namespace, r.requester) for r, _ in answers],
                [f"{verb} {sid} {r.number}" for r, verb in answers],
            )
