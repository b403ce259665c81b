"""The assistant's replies: written by tasks this process owns, one at a time per session.

A message sent while a reply streams is accepted at once (its user message and its reply's
empty placeholder are stored right away, in that order), and its reply starts when the
earlier ones have ended: every reply runs to its end, sees the conversation before it
whole, and a stream never has two messages in flight.

A reply's message says where it stands in its metadata: `{"done": false}` while a task
writes it, `{"done": true}` at its end, plus `"interrupted": true` when it was cut (the
server stopped, or the responder failed) or `"stopped": true` when the user stopped it
(`stop()`: what was said is kept). A reply that is not done and that no task of
this process is writing was cut by a crash: `progress()` reports it as done and
interrupted at once, and `settle()` stores that mark the first time its session is read
after the restart (a store with no scan of every session can only do it then; no reader
can tell the difference).

Alternatives (`writebehind.branches`): `regenerate()` appends a new reply as a sibling of
the last one (its parent is the question both answer), an edit (`start(parent_seq=...)`)
appends the new question as a sibling of the one it replaces, and `switch()` moves the
active path; the old messages stay, nothing is rewritten. Each changes the active path,
so each is refused (409) while a reply is being written or waits to be: a reply task
always writes a message of the active path, and a stream never has two in flight. A
reply is written to the messages before it on its own path.

With several processes sharing a PostgreSQL database, the session's owner is the one
process that writes it, and the reply runs there; this bookkeeping is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from .. import (
    NotFound,
    SessionRecord,
    SessionStore,
    SessionTree,
    StoredMessage,
    ValidationError,
    WriteBehindError,
    WriteBehindStore,
)
from .auth import Caller
from .errors import ApiError
from .responder import Responder, ResponderError, tokens_of

__all__ = ["Progress", "Replies", "error_of", "history_of", "title_from"]

LOG = logging.getLogger("writebehind.server")
Store = SessionStore | WriteBehindStore


class Progress(NamedTuple):
    """Where a message stands: `done` (whole), `interrupted` (cut before its end by the
    server: a shutdown, a crash, a failing responder), `stopped` (ended by the user)."""

    done: bool
    interrupted: bool
    stopped: bool = False


_WHOLE = Progress(True, False)
_CUT = Progress(True, True)
_STOPPED = Progress(True, False, True)
_WRITING = Progress(False, False)
_TITLE_CHARS = 60


def history_of(record: SessionRecord, seq: int) -> list[StoredMessage]:
    """The messages before message `seq` on its path, in order: what its reply is written
    to, whichever path is active. O(length of the path)."""
    branches, messages = record.branches, record.messages
    if branches is None:
        return list(messages[: seq - 1])
    out = []
    at = branches.parent(seq)
    while 0 < at <= len(messages):
        out.append(messages[at - 1])
        at = branches.parent(at)
    out.reverse()
    return out


def error_of(message: StoredMessage) -> str | None:
    """Why the reply `message` failed, as its user is told (a responder's error), or None."""
    value = (message.metadata or {}).get("error")
    return value if isinstance(value, str) else None


def title_from(content: str) -> str:
    """A session's title from its first message: its first line, cut at a word before
    60 characters (with an ellipsis)."""
    line = next((part.strip() for part in content.splitlines() if part.strip()), "")
    line = " ".join(line.split())
    if len(line) <= _TITLE_CHARS:
        return line
    cut = line[: _TITLE_CHARS - 1].rsplit(" ", 1)[0] or line[: _TITLE_CHARS - 1]
    return cut + "\u2026"


@contextlib.contextmanager
def _a_message_it_has(field: str) -> Iterator[None]:
    """A message the session does not have, named by a request that is well formed: a 409
    (the session is not in a state that allows it), the store's message naming `field`."""
    try:
        yield
    except ValidationError as exc:
        if exc.field != field:
            raise
        raise ApiError(409, "conflict", str(exc)) from None


class Replies:
    """Starts, orders and finishes the reply tasks of one app; `aclose()` cuts them all."""

    def __init__(self, store: Store, responder: Responder, notify: Callable[[str], None]) -> None:
        self._store = store
        self._responder = responder
        self._notify = notify
        # per session: the replies a task here will finish whose end is not stored yet (a
        # reply waiting for its turn included). What `_idle` asks, in O(1).
        self._writing: dict[str, set[str]] = {}
        self._last: dict[str, asyncio.Task[None]] = {}  # per session: the reply the next one waits for
        self._tasks: set[asyncio.Task[None]] = set()
        # per session: its reply tasks, in order, by message id (what `stop()` ends)
        self._running: dict[str, dict[str, asyncio.Task[None]]] = {}
        self._callers: dict[str, Caller] = {}  # per session: who its running replies are for
        self._seqs: dict[tuple[str, str], int] = {}  # (session, message) of a running reply: its seq
        self._stopping: set[tuple[str, str]] = set()  # (session, message) the user stopped

    def progress(self, session_id: str, message: StoredMessage, *, elsewhere: bool | None = None) -> Progress:
        """`elsewhere`: the message was read from another instance that keeps the session
        (None: ask the store), where a reply that is not done is being written."""
        if message.role != "assistant":
            return _WHOLE
        meta = message.metadata or {}
        if meta.get("done", True):
            return _CUT if meta.get("interrupted") else _STOPPED if meta.get("stopped") else _WHOLE
        if message.id in self._writing.get(session_id, ()):
            return _WRITING
        if elsewhere is None:
            elsewhere = isinstance(self._store, WriteBehindStore) and self._store.kept_elsewhere(session_id)
        return _WRITING if elsewhere else _CUT

    async def settle(self, session_id: str, messages: Sequence[StoredMessage], who: Caller) -> None:
        """Store the interrupted mark on the replies among `messages` that a crash cut."""
        if isinstance(self._store, WriteBehindStore) and self._store.kept_elsewhere(session_id):
            return  # another instance keeps it, writing its replies: none of them is cut
        for m in messages:
            if m.role != "assistant" or self.progress(session_id, m) is not _CUT:
                continue
            meta = m.metadata or {}
            if meta.get("done", True):
                continue  # already marked
            with contextlib.suppress(NotFound):
                await self._store.update_message(
                    session_id, m.id, metadata={**meta, "done": True, "interrupted": True}, **who.who
                )
                LOG.info("session %s: reply %s was cut by a crash; marked interrupted", session_id, m.id)

    async def start(
        self, session_id: str, content: str, who: Caller, parent_seq: int | None = None
    ) -> tuple[StoredMessage, StoredMessage, SessionTree]:
        """Store the caller's message and an empty reply after it; a task writes the reply
        once the session's earlier replies have ended. `parent_seq`: the message goes after
        that one (an edit: the parent of the message it replaces), not after the end of the
        active path; then 409 while a reply is being written. Returns both messages and
        the session's tree as it is after them."""
        reply_id = secrets.token_hex(16)
        try:
            async with self._hold(session_id):  # the question and its placeholder stay together
                if parent_seq is not None:
                    await self._idle(session_id, who)
                    if parent_seq:
                        await self._after_a_reply(session_id, parent_seq, who)
                # No await since the check: nobody starts a reply meanwhile. Before the
                # placeholder exists: no reader may take it for a cut one.
                self._begin(session_id, reply_id)
                with _a_message_it_has("parent_seq"):
                    said = await self._store.append_message(
                        session_id, role="user", content=content, parent_seq=parent_seq, **who.who
                    )
                reply = await self._placeholder(session_id, reply_id, said.seq, who)
        except BaseException:
            self._end(session_id, reply_id)
            raise
        self._launch(session_id, reply, who)
        tree = await self._store.get_tree(session_id, **who.who)
        if said.seq == 1 and tree.title is None and (title := title_from(content)):
            # An untitled session takes its title from its first message.
            with contextlib.suppress(NotFound):
                await self._store.update_session(session_id, title=title, **who.who)
        return said, reply, tree

    async def _after_a_reply(self, session_id: str, parent_seq: int, who: Caller) -> None:
        """409 unless message `parent_seq` is a reply (or missing: the store says so): a
        question follows the start or a reply, never another question. Read from the
        active path (where an edited message's parent is), else from the whole session."""
        first = await self._store.get_messages(session_id, after_seq=parent_seq - 1, limit=1, **who.who)
        if first and first[0].seq == parent_seq:
            role: str | None = first[0].role
        else:  # on another branch: rare, an API client's
            record = await self._store.get_session(session_id, **who.who)
            role = next((m.role for m in record.messages if m.seq == parent_seq), None)
        if role == "user":
            raise ApiError(
                409,
                "conflict",
                f"parent_seq: message {parent_seq} of session {session_id!r} is a question; "
                "a message follows the start (0) or a reply",
            )

    async def _placeholder(
        self, session_id: str, reply_id: str, parent_seq: int, who: Caller
    ) -> StoredMessage:
        """The reply's empty message, after `parent_seq` (the question it answers: given,
        so that it is never taken for an answer to anything else)."""
        return await self._store.append_message(
            session_id,
            role="assistant",
            content="",
            message_id=reply_id,
            metadata={"done": False},
            parent_seq=parent_seq,
            **who.who,
        )

    async def _idle(self, session_id: str, who: Caller) -> SessionTree:
        """The session's tree, when no reply is being written on it or waits to be (one
        another instance writes included); else 409: a change of its active path waits for
        them. O(1) here; a session another instance keeps is read from the database anyway."""
        tree = await self._store.get_tree(session_id, **who.who)
        # A reply whose end is stored counts as ended even if its task has yet to return:
        # the next one waits for it anyway (`_produce` lets go of it once its end is stored).
        busy = bool(self._writing.get(session_id))
        store = self._store
        if not busy and isinstance(store, WriteBehindStore) and store.kept_elsewhere(session_id):
            # Its replies are written there: one not done on the active path (where they
            # are, and wait) is being written.
            path = await store.get_messages(session_id, **who.who)
            busy = any(not self.progress(session_id, m, elsewhere=True).done for m in path)
        if busy:
            raise ApiError(
                409, "conflict", f"session {session_id!r}: a reply is still being written; stop it first"
            )
        return tree

    async def regenerate(self, session_id: str, who: Caller) -> tuple[StoredMessage, SessionTree]:
        """A new reply to the question the last reply answers, appended as that reply's
        sibling (the old one stays, an alternative: "2/2"), and written like any reply.
        Returns the new (empty) reply and the session's tree after it. 409 when the active
        path does not end with a reply to something, or a reply is still being written (stop
        it first)."""
        reply_id = secrets.token_hex(16)
        try:
            async with self._hold(session_id):
                tree = await self._idle(session_id, who)
                leaf = tree.leaf
                # The path's last message only (seqs grow along a path: it is the one after
                # leaf - 1), not the session.
                last = await self._store.get_messages(
                    session_id, after_seq=max(0, leaf - 1), limit=1, **who.who
                )
                question = tree.parent(leaf) if leaf else 0
                if not last or last[0].role != "assistant" or question == 0:
                    raise ApiError(409, "conflict", f"session {session_id!r} has no reply to regenerate")
                self._begin(session_id, reply_id)  # no await since the check: nobody starts a reply meanwhile
                reply = await self._placeholder(session_id, reply_id, question, who)
        except BaseException:
            self._end(session_id, reply_id)
            raise
        self._launch(session_id, reply, who)
        return reply, await self._store.get_tree(session_id, **who.who)

    async def switch(
        self, session_id: str, seq: int, who: Caller
    ) -> tuple[SessionTree, tuple[StoredMessage, ...]]:
        """Make the active path go through message `seq` (on to its most recent
        continuation); returns the session's tree and its new path. 409 while a reply is
        being written."""
        async with self._hold(session_id):
            await self._idle(session_id, who)
            with _a_message_it_has("seq"):
                path = await self._store.switch_branch(session_id, seq, **who.who)
            tree = await self._store.get_tree(session_id, **who.who)
        self._notify(session_id)  # its open streams show the new path
        return tree, path

    async def stop(self, session_id: str, who: Caller) -> list[StoredMessage]:
        """End the session's replies, the one being written and those waiting behind it:
        each keeps what was said and is marked `stopped`. Returns them, in order, once each
        has its mark. The caller has checked that `who` may see the session."""
        running = dict(self._running.get(session_id, {}))
        if not running:
            return []
        first = min(self._seqs[(session_id, message_id)] for message_id in running)
        for message_id, task in running.items():
            self._stopping.add((session_id, message_id))
            task.cancel()
        try:
            await asyncio.wait(running.values())
            stopped = []
            # The running replies end the active path (they were appended at its end, and it
            # cannot change while they run): its tail from the first of them has them all.
            tail = await self._store.get_messages(session_id, after_seq=first - 1, **who.who)
            found = [m for m in tail if m.id in running]
            if len(found) < len(running):
                # Not there (the app changed the path some other way): wherever a reply is,
                # it gets its mark.
                record = await self._store.get_session(session_id, **who.who)
                found = [m for m in record.messages if m.id in running]
            for m in found:
                meta = m.metadata or {}
                if not meta.get("done", True):  # stopped before its task began: nothing was said
                    m = await self._store.update_message(
                        session_id, m.id, metadata={**meta, "done": True, "stopped": True}, **who.who
                    )
                stopped.append(m)
        finally:
            # Whatever happened to this call (its request cancelled, back-pressure, an
            # erasure), no task writes these replies any more: the session is not "busy".
            for message_id in running:
                self._end(session_id, message_id)
                self._stopping.discard((session_id, message_id))
            self._notify(session_id)
        return stopped

    def signalled(self, session_id: str, name: str) -> None:
        """Another instance was asked to stop this session's replies (`stop_elsewhere`)."""
        callers = self._callers.get(session_id)
        if name == "stop" and callers:
            task = asyncio.get_running_loop().create_task(self._stop_quietly(session_id, callers))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _stop_quietly(self, session_id: str, who: Caller) -> None:
        try:
            await self.stop(session_id, who)
        except WriteBehindError as exc:
            LOG.warning("session %s: a stop sent from another instance failed: %s", session_id, exc)

    async def stop_elsewhere(self, session_id: str, who: Caller, within: float = 5.0) -> list[StoredMessage]:
        """`stop()` for a session another instance keeps (several instances on PostgreSQL):
        ask that instance to stop its replies, then wait (up to `within` seconds) until
        they have their mark. Returns those stopped."""
        store = self._store
        assert isinstance(store, WriteBehindStore)
        before = await store.get_messages(session_id, **who.who)
        writing = {m.id for m in before if m.role == "assistant" and not (m.metadata or {}).get("done", True)}
        if not writing or not await store.signal(session_id, "stop"):
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            now = await store.get_messages(session_id, **who.who)
            mine = [m for m in now if m.id in writing]
            if all((m.metadata or {}).get("done", True) for m in mine) or loop.time() > deadline:
                return [m for m in mine if (m.metadata or {}).get("stopped")]
            await asyncio.sleep(0.05)

    def _launch(self, session_id: str, reply: StoredMessage, who: Caller) -> None:
        """A task writes `reply` once the session's earlier replies have ended."""
        key = (session_id, reply.id)
        task = asyncio.create_task(
            self._write(session_id, reply, who, self._last.get(session_id)), name=f"reply-{session_id}"
        )
        self._last[session_id] = task
        self._tasks.add(task)
        self._running.setdefault(session_id, {})[reply.id] = task
        self._seqs[key] = reply.seq
        self._callers[session_id] = who

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._seqs.pop(key, None)
            if key not in self._stopping:  # else `stop()` lets go of it once it has its mark
                self._end(session_id, reply.id)
            running = self._running.get(session_id, {})
            running.pop(reply.id, None)
            if not running:
                self._running.pop(session_id, None)
                self._callers.pop(session_id, None)
            if self._last.get(session_id) is task:
                del self._last[session_id]
            self._notify(session_id)

        task.add_done_callback(finished)
        self._notify(session_id)

    def _begin(self, session_id: str, message_id: str) -> None:
        """A task here will write reply `message_id` of the session, to its end."""
        self._writing.setdefault(session_id, set()).add(message_id)

    def _end(self, session_id: str, message_id: str) -> None:
        """The reply's end is stored, or no task here will write it any more."""
        writing = self._writing.get(session_id)
        if writing is not None:
            writing.discard(message_id)
            if not writing:
                del self._writing[session_id]

    async def _write(
        self, session_id: str, reply: StoredMessage, who: Caller, previous: asyncio.Task[None] | None
    ) -> None:
        """Stream the reply into its message, one `update_message` a token, holding the
        session (with several instances on PostgreSQL, it stays here until the reply ends;
        others read it meanwhile)."""
        try:
            async with self._hold(session_id):
                await self._produce(session_id, reply, who, previous)
        except asyncio.CancelledError:
            if (session_id, reply.id) not in self._stopping:
                raise
            # Stopped by the user: the reply ended as asked (its mark is stored).

    def _hold(self, session_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        if isinstance(self._store, WriteBehindStore):
            return self._store.hold(session_id)
        return contextlib.nullcontext()

    async def _produce(
        self, session_id: str, reply: StoredMessage, who: Caller, previous: asyncio.Task[None] | None
    ) -> None:
        end: dict[str, Any] = {"done": True}
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its own
            # The reply ends the active path's part before it (a path cannot change while a
            # reply is written or waits): that path, not a copy of the whole session.
            path = await self._store.get_messages(session_id, **who.who)
            at = next((i for i in range(len(path) - 1, -1, -1) if path[i].id == reply.id), None)
            if at is not None:
                history = list(path[:at])
            else:  # the app moved the path some other way: the reply's own path
                history = history_of(await self._store.get_session(session_id, **who.who), reply.seq)
            # `tokens_of` closes the responder however this ends: a stop closes its HTTP stream.
            async with tokens_of(self._responder, history) as tokens:
                async for token in tokens:
                    await self._store.update_message(session_id, reply.id, append=token, **who.who)
                    self._notify(session_id)
        except asyncio.CancelledError:
            # The user stopped it, or the server is stopping: keep what was said, mark which.
            end["stopped" if (session_id, reply.id) in self._stopping else "interrupted"] = True
            raise
        except NotFound:
            return  # the session was erased mid-reply
        except ResponderError as exc:  # said to the user, stored on the reply; the log says only its kind
            end.update(interrupted=True, error=str(exc))
            LOG.warning(
                "session %s: the reply %s failed (%s); kept what was said", session_id, reply.id, exc.kind
            )
        except Exception:
            end.update(interrupted=True, error="the reply failed on the server")
            LOG.exception("session %s: the reply %s failed; kept what was said", session_id, reply.id)
        finally:
            with contextlib.suppress(WriteBehindError):
                await self._store.update_message(session_id, reply.id, metadata=end, **who.who)
                # Ended, though this task has yet to return: the path may change now.
                if (session_id, reply.id) not in self._stopping:
                    self._end(session_id, reply.id)

    async def aclose(self) -> None:
        """Cut every reply (each keeps what was said, marked interrupted) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
