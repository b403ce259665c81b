"""A LangChain `BaseChatMessageHistory` kept in a `WriteBehindStore`
(`pip install 'writebehind[langchain]'`).

    from writebehind import WriteBehindStore
    from writebehind.integrations.langchain import WriteBehindChatMessageHistory

    async with WriteBehindStore.from_config() as store:
        chain = RunnableWithMessageHistory(
            prompt | model,
            lambda session_id: WriteBehindChatMessageHistory(session_id, store, user_id=42),
        )
        await chain.ainvoke({"input": "Hi!"}, {"configurable": {"session_id": "chat-1"}})

What a caller may rely on:

- One history is one writebehind session (same id) owned by `user_id`; each message is
  one writebehind message. A session it creates has status `"langchain"` (`STATUS`), so a
  listing can tell it apart; an existing one keeps its own. `user_id=None` is an
  anonymous session: memory only. Another
  user's session reads as empty, and writing to it raises `NotFound`.
- A message is stored as the JSON of `messages_to_dict` in the writebehind message's
  `content` (an export shows it whole), with metadata `{"format": "langchain"}` and the
  role of its type (human: `user`, ai: `assistant`, system: `system`, tool and function:
  `tool`, a `ChatMessage`'s own role when it is one of those). Every message type comes
  back equal through `messages_from_dict`, chunks and tool calls included. A message
  whose dict would not survive JSON unchanged, or whose JSON is larger than the store's
  `max_message_bytes`, is refused with a `ValidationError` naming `messages[i]`, before
  anything is written. Messages this adapter did not write (an app's own
  `append_message`) come back as Human/AI/System messages, or a `ChatMessage` for `tool`.
- `aadd_messages` is atomic (all checked first, then appended with no suspension in
  between) and acknowledged from memory, or on disk with `durable=True`; `aclear`
  deletes the session, durably.
- The sync forms (`messages`, `add_messages`, `clear`) run the async ones on the store's
  event loop: from another thread while that loop runs (they wait for it), or on the loop
  itself when nothing runs it (a sync program that drives its own loop). Called where an
  event loop is running they raise `SyncCallInEventLoopError` instead of blocking it (on
  the store's own loop that would deadlock): use the `a`-forms there. With the store not
  started, or its loop closed, they raise `ClosedError`.

langchain-core marks `BaseChatMessageHistory` deprecated since 1.6.4 (removal in 2.0); this
follows its 1.x contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import orjson
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    message_to_dict,
    messages_from_dict,
)

from ..errors import ClosedError, NotFound, ValidationError, WriteBehindError
from ..model import ROLES, StoredMessage, UserId, check_id, check_user_id, content_size
from ..writebehind import WriteBehindStore
from ._common import plain_json

__all__ = ["STATUS", "SyncCallInEventLoopError", "WriteBehindChatMessageHistory"]

T = TypeVar("T")

STATUS: Final = "langchain"
"""The status of the sessions this adapter creates, so that listings (a chat app's sidebar)
can tell them apart; a session the app made itself keeps its own."""

_METADATA: Final = {"format": "langchain"}
_ROLE_OF_TYPE: Final = {
    "human": "user",
    "HumanMessageChunk": "user",
    "ai": "assistant",
    "AIMessageChunk": "assistant",
    "system": "system",
    "SystemMessageChunk": "system",
    "tool": "tool",
    "ToolMessageChunk": "tool",
    "function": "tool",
    "FunctionMessageChunk": "tool",
}
_PLAIN: Final[dict[str, Callable[[str], BaseMessage]]] = {
    "user": lambda text: HumanMessage(content=text),
    "assistant": lambda text: AIMessage(content=text),
    "system": lambda text: SystemMessage(content=text),
}


class SyncCallInEventLoopError(WriteBehindError, RuntimeError):
    """A sync method was called where an event loop is running: it would block that loop
    (and deadlock it, if it is the store's). Await the async form instead."""


class WriteBehindChatMessageHistory(BaseChatMessageHistory):
    """LangChain chat history in `store`, for the user `user_id`."""

    def __init__(
        self,
        session_id: str,
        store: WriteBehindStore,
        *,
        user_id: UserId | None,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> None:
        """`session_id` is the writebehind session's id (1-128 of A-Z a-z 0-9 . _ : -).
        `binding_token`: for an anonymous session, the token that binds it to its client.
        `durable`: `aadd_messages` returns only once the messages are on disk."""
        super().__init__()
        self.session_id = check_id("session_id", session_id)
        self._user_id = check_user_id(user_id)
        self._binding_token = binding_token
        self._store = store
        self._durable = durable

    def __repr__(self) -> str:
        return f"WriteBehindChatMessageHistory({self.session_id!r}, user_id={self._user_id!r})"

    # -- async: the real work ------------------------------------------------------------------

    async def aget_messages(self) -> list[BaseMessage]:
        """The history, oldest first; none if the session does not exist (or is another
        user's)."""
        try:
            stored = await self._store.get_messages(
                self.session_id, user_id=self._user_id, binding_token=self._binding_token
            )
        except NotFound:
            return []
        return _decode(stored)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append the messages, all or none."""
        if not messages:
            return
        store = self._store
        limit = store.hot.max_message_bytes
        encoded = [_encode(i, message, limit) for i, message in enumerate(messages)]
        sid, uid, token = self.session_id, self._user_id, self._binding_token
        role, content = encoded[0]
        try:
            # No ensure_session on the way: on a session in memory it would cost as much as
            # the append itself (a snapshot of the session), on every call (measured by
            # benchmarks/test_integrations.py). Only a session that does not exist yet is
            # created, and then its first append is made again.
            await store.append_message(
                sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
            )
        except NotFound:
            await store.ensure_session(sid, user_id=uid, binding_token=token, status=STATUS)
            await store.append_message(
                sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
            )
        appended = 1
        try:
            # The first append made the session hot (a load, if it had to wait, came before
            # it was applied): the rest apply without suspending, so no other task sees a
            # part of the batch. Should one fail anyway, the ones before it are taken back.
            for role, content in encoded[1:]:
                await store.append_message(
                    sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
                )
                appended += 1
        except BaseException:
            for _ in range(appended):
                await store.pop_message(sid, user_id=uid, binding_token=token)
            raise
        if self._durable and uid is not None:
            await store.flush()

    async def aclear(self) -> None:
        """Delete the session, durably (the next message creates it again)."""
        try:
            await self._store.delete_session(
                self.session_id, user_id=self._user_id, binding_token=self._binding_token
            )
        except NotFound:
            return  # none, or another user's: nothing to clear

    # -- sync: the async forms on the store's loop ----------------------------------------------

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """`aget_messages`, from sync code (see the module's docstring)."""
        return self._run_sync("messages", self.aget_messages)

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        self._run_sync("add_messages", lambda: self.aadd_messages(messages))

    def clear(self) -> None:
        self._run_sync("clear", self.aclear)

    def _run_sync(self, name: str, make: Callable[[], Awaitable[T]]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise SyncCallInEventLoopError(
                f"{type(self).__name__}.{name} was called where an event loop is running; it "
                f"would block that loop (the store's own: a deadlock). Await the async form "
                f"(aget_messages, aadd_messages, aclear) instead"
            )
        loop = self._store.loop
        if loop is None or loop.is_closed():
            raise ClosedError(
                f"{type(self).__name__}.{name}: the store is not started, or its event loop is closed"
            )

        async def call() -> T:
            return await make()

        if loop.is_running():  # in another thread: hand it over and wait
            return asyncio.run_coroutine_threadsafe(call(), loop).result()
        return loop.run_until_complete(call())


def _encode(index: int, message: object, limit: int) -> tuple[str, str]:
    """(role, content) of a message, refusing one that would not come back equal."""
    field = f"messages[{index}]"
    if not isinstance(message, BaseMessage):
        raise ValidationError(field, f"must be a BaseMessage, not {type(message).__name__}")
    as_dict = message_to_dict(message)
    try:
        text = orjson.dumps(as_dict).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValidationError(field, f"cannot be encoded as JSON ({exc})") from None
    # What orjson accepted comes back equal unless it holds a tuple, a subclass or a
    # NaN/infinity: one walk finds those without decoding the text again.
    if not plain_json(as_dict):
        raise ValidationError(field, "does not survive a JSON round trip unchanged (a tuple, NaN, ...)")
    content_size(text, limit, field)
    role = _ROLE_OF_TYPE.get(message.type)
    if role is None:
        own = getattr(message, "role", None)
        role = own if isinstance(own, str) and own in ROLES else "user"
    return role, text


def _decode(stored: Sequence[StoredMessage]) -> list[BaseMessage]:
    result: list[BaseMessage] = []
    for m in stored:
        metadata = m.metadata_json
        if metadata is not None and orjson.loads(metadata) == _METADATA:
            result.extend(messages_from_dict([orjson.loads(m.content)]))
        else:
            plain = _PLAIN.get(m.role)
            result.append(
                plain(m.content) if plain is not None else ChatMessage(role=m.role, content=m.content)
            )
    return result
