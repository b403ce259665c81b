"""The assistant's replies: written by tasks this process owns, one at a time per session.

A message sent while a reply streams is accepted at once (its user message and its reply's
empty placeholder are stored right away, in that order), and its reply starts when the
earlier ones have ended: every reply runs to its end, sees the conversation before it
whole, and a stream never has two messages in flight.

A reply's message says where it stands in its metadata: `{"done": false}` while a task
writes it, `{"done": true}` at its end, plus `"interrupted": true` when it was cut (the
server stopped, or the responder failed). A reply that is not done and that no task of
this process is writing was cut by a crash: `progress()` reports it as done and
interrupted at once, and `settle()` stores that mark the first time its session is read
after the restart (a store with no scan of every session can only do it then; no reader
can tell the difference).

With several processes sharing a PostgreSQL database, the session's owner is the one
process that writes it, and the reply runs there; this bookkeeping is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import NotFound, SessionStore, StoredMessage, WriteBehindError, WriteBehindStore
from .auth import Caller
from .responder import Responder

__all__ = ["Progress", "Replies"]

LOG = logging.getLogger("writebehind.server")
Store = SessionStore | WriteBehindStore


class Progress(NamedTuple):
    """Where a message stands: `done` (whole), `interrupted` (cut before its end)."""

    done: bool
    interrupted: bool


_WHOLE = Progress(True, False)
_CUT = Progress(True, True)
_WRITING = Progress(False, False)


class Replies:
    """Starts, orders and finishes the reply tasks of one app; `aclose()` cuts them all."""

    def __init__(self, store: Store, responder: Responder, notify: Callable[[str], None]) -> None:
        self._store = store
        self._responder = responder
        self._notify = notify
        self._writing: set[tuple[str, str]] = set()  # (session, message) a task here will finish
        self._last: dict[str, asyncio.Task[None]] = {}  # per session: the reply the next one waits for
        self._tasks: set[asyncio.Task[None]] = set()

    def progress(self, session_id: str, message: StoredMessage) -> Progress:
        if message.role != "assistant":
            return _WHOLE
        meta = message.metadata or {}
        if meta.get("done", True):
            return _CUT if meta.get("interrupted") else _WHOLE
        return _WRITING if (session_id, message.id) in self._writing else _CUT

    async def settle(self, session_id: str, messages: Sequence[StoredMessage], who: Caller) -> None:
        """Store the interrupted mark on the replies among `messages` that a crash cut."""
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

    async def start(self, session_id: str, content: str, who: Caller) -> tuple[StoredMessage, StoredMessage]:
        """Store the caller's message and an empty reply after it; a task writes the reply
        once the session's earlier replies have ended. Returns both messages."""
        reply_id = secrets.token_hex(16)
        key = (session_id, reply_id)
        self._writing.add(key)  # before the placeholder exists: no reader may take it for a cut one
        try:
            async with self._hold(session_id):  # the question and its placeholder stay together
                said = await self._store.append_message(session_id, role="user", content=content, **who.who)
                reply = await self._store.append_message(
                    session_id,
                    role="assistant",
                    content="",
                    message_id=reply_id,
                    metadata={"done": False},
                    **who.who,
                )
        except BaseException:
            self._writing.discard(key)
            raise
        task = asyncio.create_task(
            self._write(session_id, reply, who, self._last.get(session_id)), name=f"reply-{session_id}"
        )
        self._last[session_id] = task
        self._tasks.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._writing.discard(key)
            if self._last.get(session_id) is task:
                del self._last[session_id]
            self._notify(session_id)

        task.add_done_callback(finished)
        self._notify(session_id)
        return said, reply

    async def _write(
        self, session_id: str, reply: StoredMessage, who: Caller, previous: asyncio.Task[None] | None
    ) -> None:
        """Stream the reply into its message, one `update_message` a token, holding the
        session (with several instances on PostgreSQL, it stays here until the reply ends;
        others read it meanwhile)."""
        async with self._hold(session_id):
            await self._produce(session_id, reply, who, previous)

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
            history = await self._store.get_messages(session_id, limit=reply.seq - 1, **who.who)
            async for token in self._responder(history):
                await self._store.update_message(session_id, reply.id, append=token, **who.who)
                self._notify(session_id)
        except asyncio.CancelledError:
            end["interrupted"] = True  # the server is stopping: keep what was said, mark it
            raise
        except NotFound:
            return  # the session was erased mid-reply
        except Exception:
            end["interrupted"] = True
            LOG.exception("session %s: the reply %s failed; kept what was said", session_id, reply.id)
        finally:
            with contextlib.suppress(WriteBehindError):
                await self._store.update_message(session_id, reply.id, metadata=end, **who.who)

    async def aclose(self) -> None:
        """Cut every reply (each keeps what was said, marked interrupted) and wait for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
