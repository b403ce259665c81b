"""Live following across instances: a stream on one instance follows, token by token, a
session that another instance keeps (PostgreSQL, several app instances).

A session has one owner at a time (`ownership`), and the owner writes every reply into
it. A client streaming the session from another instance must see those tokens as they
are written, and the database, written on an interval, is too late for that. So:

- **The owner sends changes.** A non-owner that streams a session asks for it with a
  `follow` (a `read` that also registers it as a follower, before the owner's flush).
  From then on, each change of the session on the owner (`Relay.changed`, called on the
  write path: a set lookup, no I/O) is sent by the owner's publisher task as a `live`
  message: per changed message its `seq`, `id`, `role`, the `offset` (code points) where
  the new `text` starts, and its metadata if changed (or the whole message, `x`, when it
  was rewritten). One NOTIFY round trip carries every change collected since the last;
  PostgreSQL delivers the notifications of a sender in order.
- **The follower keeps a replica.** The follower loads the session once from the database
  (after the owner's flush) and applies the changes to a copy, checking each offset: a
  change it already has (it arrived while the copy loaded) is skipped, a gap marks the
  copy stale and the next read loads it again. The database is the log, NOTIFY only the
  fast path: nothing is lost if a notification is (a proxy dropped the connection, the
  payload did not fit).
- **Resync.** When the owner lets the session go (a handoff, an erasure, a shutdown) it
  tells its followers `resync`; they load it again, from its new owner. A follower also
  checks, every `poll_s`, that the owners it follows are alive (a SIGKILLed owner sends
  nothing; its lock says it died), and reloads a copy whose last reply is unfinished and
  that heard nothing for `quiet_s`.

Reads through a replica are for streams only: they are as fresh as the last change that
arrived, not read-your-writes (`get_session` and `get_messages` stay that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson

from .branches import Branches
from .errors import WriteBehindError
from .model import SessionRecord, StoredMessage, UserId, from_micros, to_micros

if TYPE_CHECKING:
    from .backends.pg_ownership import OwnershipStats

__all__ = ["LiveView", "Relay", "Replica", "Transport"]

LOG = logging.getLogger("writebehind")

# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more; the prefix
# (`live <session id> <instance> `) takes at most ~150 of them.
_MAX_BODY_BYTES: Final = 7_600
# A message's text is sent in pieces of at most this many code points (JSON escapes a
# control character as 6 bytes: 1,000 of them still fit).
_PIECE_CHARS: Final = 1_000

Listener = Callable[[str], None]


class Transport(Protocol):
    """What the relay needs from the ownership (`PostgresOwnership`)."""

    async def tell(self, session_id: str, instances: Sequence[int], payloads: Sequence[str]) -> None: ...

    async def unfollow(self, session_id: str, owner: int) -> None: ...

    async def alive(self, instances: Sequence[int]) -> set[int]: ...

    def kept_by(self, session_id: str) -> int | None: ...

    async def signal(self, session_id: str, name: str) -> bool: ...

    def stats(self) -> OwnershipStats: ...


@dataclass(slots=True)
class Replica:
    """A follower's copy of a session another instance keeps."""

    user_id: UserId | None = None
    messages: list[StoredMessage] = field(default_factory=list)
    branches: Branches | None = None  # as loaded: a change of them is sent as a resync
    owner: int | None = None
    loading: bool = True  # between the `follow` request and the load's end: buffer
    stale: bool = True  # load it again before the next read
    heard: float = 0.0  # when the last change arrived (loop time)
    buffered: list[str] = field(default_factory=list)


class LiveView:
    """What a stream reads through (`WriteBehindStore.follow`): `messages()` is the
    session's messages from memory when it is kept here, from the replica when another
    instance keeps it; `remote` says which the last read was."""

    __slots__ = ("_read", "binding_token", "remote", "session_id", "user_id")

    def __init__(
        self,
        session_id: str,
        user_id: UserId | None,
        binding_token: str | None,
        read: Callable[[LiveView, int], Any],
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.binding_token = binding_token
        self.remote = False
        self._read = read

    async def messages(self, after_seq: int = 0) -> tuple[StoredMessage, ...]:
        result: tuple[StoredMessage, ...] = await self._read(self, after_seq)
        return result


def encode_changes(
    messages: Sequence[StoredMessage], sent: list[StoredMessage], start: int
) -> list[str] | None:
    """The `live` payloads that bring a follower from `sent` to `messages` (from index
    `start`), updating `sent`; None when only a reload can (messages were removed, or
    what the follower has is not known up to `start`)."""
    if len(messages) < len(sent) or start > len(sent):
        return None
    items: list[dict[str, Any]] = []
    for i in range(max(start, 0), len(messages)):
        m = messages[i]
        old = sent[i] if i < len(sent) else None
        if old is m:
            continue
        whole = old is None or old.id != m.id or not m.content.startswith(old.content)
        offset = 0 if old is None or whole else len(old.content)
        text = m.content[offset:]
        meta_changed = old is None or whole or old.metadata_json != m.metadata_json
        pieces = [text[k : k + _PIECE_CHARS] for k in range(0, len(text), _PIECE_CHARS)] or [""]
        for n, piece in enumerate(pieces):
            item: dict[str, Any] = {"s": m.seq, "o": offset, "t": piece, "u": to_micros(m.updated_at)}
            if n == 0 and whole:
                item.update(x=1, i=m.id, r=m.role, c=to_micros(m.created_at))
            if n == len(pieces) - 1 and meta_changed:
                item["m"] = m.metadata_json
            items.append(item)
            offset += len(piece)
        if i < len(sent):
            sent[i] = m
        else:
            sent.append(m)
    payloads: list[str] = []
    batch: list[bytes] = []
    size = 2
    for item in items:
        encoded = orjson.dumps(item)
        if batch and size + len(encoded) + 1 > _MAX_BODY_BYTES:
            payloads.append((b"[" + b",".join(batch) + b"]").decode())
            batch, size = [], 2
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        payloads.append((b"[" + b",".join(batch) + b"]").decode())
    return payloads


def apply_changes(messages: list[StoredMessage], payload: str) -> bool:
    """Apply one `live` payload to a replica's messages; False at a gap (reload it)."""
    try:
        items = orjson.loads(payload)
        for item in items:
            seq, offset, text = int(item["s"]), int(item["o"]), str(item["t"])
            updated = from_micros(int(item["u"]))
            count = len(messages)
            if item.get("x"):
                if offset != 0 or seq > count + 1:
                    return False
                message = StoredMessage(
                    str(item["i"]), seq, str(item["r"]), text, from_micros(int(item["c"])), updated,
                    item.get("m"),
                )  # fmt: skip
                if seq == count + 1:
                    messages.append(message)
                else:
                    messages[seq - 1] = message
                continue
            if seq > count:
                return False
            current = messages[seq - 1]
            have = len(current.content)
            if offset > have:
                return False
            overlap = min(have - offset, len(text))
            if current.content[offset : offset + overlap] != text[:overlap]:
                return False
            content = current.content + text[overlap:] if overlap < len(text) else current.content
            meta = item.get("m", current.metadata_json)
            messages[seq - 1] = StoredMessage(
                current.id, seq, current.role, content, current.created_at, updated, meta
            )
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _unfinished(replica: Replica) -> bool:
    if not replica.messages:
        return False
    meta = replica.messages[-1].metadata
    return meta is not None and meta.get("done", True) is False


class Relay:
    """One store's side of live following: as an owner, who follows which of its sessions
    and what was sent to them; as a follower, its replicas and their listeners.

    Owned by the store: `start()` after the ownership started, `aclose()` before it
    closes. Its two tasks (the publisher, the watchdog) are its own and awaited there.
    """

    def __init__(
        self,
        transport: Transport,
        peek: Callable[[str], Sequence[StoredMessage] | None],
        *,
        branches_of: Callable[[str], Branches | None] = lambda _: None,
        poll_s: float = 0.5,
        quiet_s: float = 2.0,
    ) -> None:
        self._transport = transport
        self._peek = peek
        self._branches_of = branches_of
        self.signal_handlers: list[Callable[[str, str], None]] = []
        self._poll = poll_s
        self._quiet = quiet_s
        # owner side
        self.followers: dict[str, set[int]] = {}
        self._sent: dict[str, list[StoredMessage]] = {}
        # The branches followers were last sent (with a load or a resync): deltas carry
        # messages only, so an alternative started or switched to is sent as a resync.
        self._sent_branches: dict[str, Branches | None] = {}
        self._marked: dict[str, int] = {}
        self._resyncs: dict[str, set[int]] = {}
        self._wake = asyncio.Event()
        # follower side
        self._replicas: dict[str, Replica] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent_messages = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for coro, name in ((self._publish(), "writebehind-live"), (self._watch(), "writebehind-live-watch")):
            task = loop.create_task(coro, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self, *, tell: bool = True) -> None:
        """Tell every follower to look elsewhere (unless `tell` is False: a crash test),
        then stop."""
        if tell:
            for sid in list(self.followers):
                self.dropped(sid)
            with contextlib.suppress(WriteBehindError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._send()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sid in list(self._listeners):
            self._wake_listeners(sid)

    # -- the owner's side ----------------------------------------------------------------------

    def followed(self, session_id: str, follower: int) -> None:
        followers = self.followers.setdefault(session_id, set())
        followers.add(follower)
        if session_id not in self._sent:
            messages = self._peek(session_id)
            self._sent[session_id] = list(messages) if messages is not None else []
            self._sent_branches[session_id] = self._branches_of(session_id)

    def unfollowed(self, session_id: str, follower: int) -> None:
        followers = self.followers.get(session_id)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                self._forget(session_id)

    def changed(self, session_id: str, seq: int) -> None:
        """The message `seq` of a followed session changed here (the write path: no I/O)."""
        before = self._marked.get(session_id)
        if before is None or seq < before:
            self._marked[session_id] = seq
        self._wake.set()

    def dropped(self, session_id: str) -> None:
        """The session left this instance (handed over, erased, closing): its followers are
        told to read it again."""
        followers = self.followers.get(session_id)
        if followers:
            self._resyncs.setdefault(session_id, set()).update(followers)
            self._wake.set()
        self._forget(session_id)
        self._wake_listeners(session_id)  # streams here follow it wherever it went

    def _forget(self, session_id: str) -> None:
        self.followers.pop(session_id, None)
        self._sent.pop(session_id, None)
        self._sent_branches.pop(session_id, None)
        self._marked.pop(session_id, None)

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._send()
            except (WriteBehindError, OSError) as exc:
                # The followers see a gap, or hear nothing and reload: nothing is lost.
                LOG.warning("could not send live changes to other instances: %s", exc)

    async def _send(self) -> None:
        resyncs, self._resyncs = self._resyncs, {}
        marked, self._marked = self._marked, {}
        for sid, followers in resyncs.items():
            await self._transport.tell(sid, sorted(followers), [""])
        for sid, seq in marked.items():
            followed = self.followers.get(sid)
            sent = self._sent.get(sid)
            messages = self._peek(sid)
            if not followed or sent is None or messages is None:
                continue
            branches = self._branches_of(sid)
            payloads = (
                None if branches != self._sent_branches.get(sid) else encode_changes(messages, sent, seq - 1)
            )
            if payloads is None:
                self._sent_branches[sid] = branches
                self._sent[sid] = list(messages)
                payloads = [""]
            self._sent_messages += len(payloads)
            await self._transport.tell(sid, sorted(followed), payloads)

    @property
    def sent_messages(self) -> int:
        return self._sent_messages

    def followed_count(self) -> int:
        return len(self._replicas)

    def follower_count(self) -> int:
        return sum(len(f) for f in self.followers.values())

    def keeps(self, session_id: str) -> bool:
        return self._peek(session_id) is not None

    def signalled(self, session_id: str, name: str) -> None:
        for handler in list(self.signal_handlers):
            try:
                handler(session_id, name)
            except Exception:  # one app handler's bug must not stop the ownership's listener
                LOG.exception("a signal handler failed")

    # -- the follower's side -------------------------------------------------------------------

    def listen(self, session_id: str, listener: Listener) -> None:
        self._listeners.setdefault(session_id, []).append(listener)

    def unlisten(self, session_id: str, listener: Listener) -> None:
        listeners = self._listeners.get(session_id, [])
        with contextlib.suppress(ValueError):
            listeners.remove(listener)
        if listeners:
            return
        self._listeners.pop(session_id, None)
        self.discard(session_id)

    def replica(self, session_id: str) -> Replica | None:
        return self._replicas.get(session_id)

    def begin(self, session_id: str) -> None:
        """Before a `follow` request: changes that arrive while the session loads are kept."""
        replica = self._replicas.get(session_id)
        if replica is None:
            self._replicas[session_id] = Replica()
        else:
            replica.loading, replica.buffered = True, []

    def adopt(self, session_id: str, record: SessionRecord, owner: int | None) -> Replica:
        """The session as loaded after its owner's flush, plus what arrived meanwhile."""
        replica = self._replicas.setdefault(session_id, Replica())
        replica.user_id, replica.owner = record.user_id, owner
        replica.messages = list(record.messages)
        replica.branches = record.branches
        replica.stale = False
        for payload in replica.buffered:
            if not apply_changes(replica.messages, payload):
                replica.stale = True
                break
        replica.loading, replica.buffered = False, []
        replica.heard = asyncio.get_running_loop().time()
        return replica

    def discard(self, session_id: str) -> None:
        """No replica of the session any more (nobody here follows it, or it is kept here
        now); its owner is told to stop sending."""
        replica = self._replicas.pop(session_id, None)
        if replica is not None and replica.owner is not None:
            self._spawn(self._transport.unfollow(session_id, replica.owner))

    def received(self, session_id: str, owner: int, payload: str | None) -> None:
        replica = self._replicas.get(session_id)
        if replica is None:
            if payload is not None:
                self._spawn(self._transport.unfollow(session_id, owner))  # a follower no more
            return
        replica.heard = asyncio.get_running_loop().time()
        if payload is None:
            replica.stale = True
        elif replica.loading:
            replica.buffered.append(payload)
            return
        elif not replica.stale:
            replica.owner = owner
            if not apply_changes(replica.messages, payload):
                replica.stale = True
        self._wake_listeners(session_id)

    def _wake_listeners(self, session_id: str) -> None:
        for listener in list(self._listeners.get(session_id, ())):
            listener(session_id)

    async def _watch(self) -> None:
        """Every `poll_s`: replicas whose owner died, or whose unfinished reply went quiet,
        are read again."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._poll)
            replicas = [(sid, r) for sid, r in self._replicas.items() if not r.loading and not r.stale]
            owners = sorted({r.owner for _, r in replicas if r.owner is not None})
            try:
                alive = await self._transport.alive(owners) if owners else set()
            except (WriteBehindError, OSError) as exc:
                LOG.warning("could not check the owners of followed sessions: %s", exc)
                continue
            now = loop.time()
            for sid, replica in replicas:
                dead = replica.owner is not None and replica.owner not in alive
                if dead or (_unfinished(replica) and now - replica.heard > self._quiet):
                    replica.stale = True
                    self._wake_listeners(sid)

    def _spawn(self, coro: Any) -> None:
        async def quietly() -> None:
            with contextlib.suppress(WriteBehindError, OSError):
                await coro

        task = asyncio.get_running_loop().create_task(quietly(), name="writebehind-live-unfollow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def followed_sessions(self) -> Iterable[str]:
        return self._replicas.keys()
