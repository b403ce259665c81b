"""An openai-agents `Session` kept in a `WriteBehindStore` (`pip install 'writebehind[openai-agents]'`).

    from agents import Agent, Runner
    from writebehind import WriteBehindStore
    from writebehind.integrations.openai_agents import WriteBehindSession

    async with WriteBehindStore.from_config() as store:
        session = WriteBehindSession("conversation-1", store, user_id=42)
        result = await Runner.run(agent, "Hi!", session=session)

What a caller may rely on:

- One agents session is one writebehind session (same id) owned by `user_id`; each item is
  one message. A session it creates has status `"openai-agents"` (`STATUS`), so a listing
  can tell it apart; an existing one keeps its own. `user_id=None` is an anonymous
  session: memory only, never on disk.
  Another user's session reads as empty, and writing to it raises `NotFound`.
- An item is stored as its JSON text in the message's `content` (so an export shows it
  whole), with metadata `{"format": "openai-agents"}` and a role taken from the item
  (`user`, `assistant`, `system`; `developer` as `system`; a tool's output as `tool`;
  other items, such as function calls and reasoning, as `assistant`). `get_items` returns
  items deep-equal to those added. An item that would not come back equal from JSON
  (a tuple, NaN, a non-str key), or whose JSON is larger than the store's
  `max_message_bytes` (1 MB by default), is refused with a `ValidationError` naming
  `items[i]`, before anything is written.
- `add_items` is atomic: every item is checked first, then all are appended with no
  suspension in between, so another task sees all of them or none. Like every write it
  is acknowledged from memory (`durable=True` on the session waits for the disk).
- `pop_item` and `clear_session` are durable when they return. Cancelled, they finish
  first and then re-raise the cancellation (as openai-agents' own SQLiteSession does).
- `get_items(limit)` returns the latest `limit` items, oldest first; on a session in
  memory it copies and decodes only those (the session's length is remembered from the
  last call, and checked).
- Messages in the session that this adapter did not write (an app's own `append_message`)
  are returned as `{"role": ..., "content": ...}`.

It implements the `Session` protocol of openai-agents 0.24: `session_id`,
`session_settings`, `get_items`, `add_items`, `pop_item`, `clear_session`. The
optional context-aware form (a `wrapper` argument) and the compaction hooks are not
implemented; the runner calls the plain forms then.
"""

from __future__ import annotations

import contextlib
from typing import Any, Final, TypeVar, cast

import orjson
from agents.items import TResponseInputItem
from agents.memory.session_settings import (
    SessionSettings,
    coerce_session_settings,
    resolve_session_limit,
)

from ..errors import NotFound, ValidationError
from ..model import StoredMessage, UserId, check_id, check_user_id, content_size
from ..writebehind import WriteBehindStore
from ._common import finish, plain_json

__all__ = ["STATUS", "WriteBehindSession"]

T = TypeVar("T")

STATUS: Final = "openai-agents"
"""The status of the sessions this adapter creates, so that listings (a chat app's sidebar)
can tell them apart; a session the app made itself keeps its own."""

_FORMAT: Final = "openai-agents"
_METADATA: Final = {"format": _FORMAT}
_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class WriteBehindSession:
    """An openai-agents `Session` whose items live in `store`, for the user `user_id`."""

    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        store: WriteBehindStore,
        *,
        user_id: UserId | None,
        binding_token: str | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        durable: bool = False,
    ) -> None:
        """`session_id` is the writebehind session's id (1-128 of A-Z a-z 0-9 . _ : -).
        `binding_token`: for an anonymous session, the token that binds it to its client.
        `session_settings.limit` is `get_items`' default limit. `durable`: `add_items`
        returns only once the items are on disk."""
        self.session_id = check_id("session_id", session_id)
        self._user_id = check_user_id(user_id)
        self._binding_token = binding_token
        self._store = store
        self._durable = durable
        self.session_settings = (
            SessionSettings() if session_settings is None else coerce_session_settings(session_settings)
        )
        # The session's message count as last seen here: lets `get_items(limit)` read only
        # the tail. A guess, checked on every use (another writer may have changed it).
        self._count = 0

    def __repr__(self) -> str:
        return f"WriteBehindSession({self.session_id!r}, user_id={self._user_id!r})"

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The session's items, oldest first: all of them, or the latest `limit` (default:
        `session_settings.limit`). As openai-agents' SQLiteSession: 0 gives none, a negative
        limit all. A session that does not exist (or is another user's) has none."""
        wanted = resolve_session_limit(limit, self.session_settings)
        if wanted is not None and wanted < 0:
            wanted = None
        if wanted == 0:
            return []
        after = 0 if wanted is None else max(0, self._count - wanted)
        messages = await self._read(after)
        if after and len(messages) < cast(int, wanted):
            after = 0  # it shrank since it was last seen here: read from the start
            messages = await self._read(after)
        self._count = messages[-1].seq if messages else 0
        if wanted is not None:
            messages = messages[-wanted:]
        return [_decode(m) for m in messages]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append the items, all or none (see the module's docstring)."""
        if not items:
            return
        store = self._store
        limit = store.hot.max_message_bytes
        encoded = [_encode(i, item, limit) for i, item in enumerate(items)]
        sid, uid, token = self.session_id, self._user_id, self._binding_token
        role, content = encoded[0]
        try:
            # No ensure_session on the way: on a session in memory it would cost as much as
            # the append itself (a snapshot of the session), on every call (measured by
            # benchmarks/test_integrations.py). Only a session that does not exist yet is
            # created, and then its first append is made again.
            message = await store.append_message(
                sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
            )
        except NotFound:
            await store.ensure_session(sid, user_id=uid, binding_token=token, status=STATUS)
            message = await store.append_message(
                sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
            )
        appended = 1
        try:
            # The first append made the session hot (a load, if it had to wait, came before
            # it was applied): the rest apply without suspending, so no other task sees a
            # part of the batch. Should one fail anyway, the ones before it are taken back.
            for role, content in encoded[1:]:
                message = await store.append_message(
                    sid, user_id=uid, role=role, content=content, metadata=_METADATA, binding_token=token
                )
                appended += 1
        except BaseException:
            for _ in range(appended):
                await store.pop_message(sid, user_id=uid, binding_token=token)
            raise
        self._count = message.seq
        if self._durable and uid is not None:
            await finish(store.flush())

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove the latest item and return it (None if there is none); on disk when it
        returns."""
        try:
            message = await finish(
                self._store.pop_message(
                    self.session_id, user_id=self._user_id, binding_token=self._binding_token, durable=True
                )
            )
        except NotFound:
            return None
        if message is None:
            self._count = 0
            return None
        self._count = message.seq - 1
        return _decode(message)

    async def clear_session(self) -> None:
        """Remove every item: the writebehind session is deleted, durably (the next
        `add_items` creates it again)."""
        with contextlib.suppress(NotFound):  # none, or another user's: nothing to clear
            await finish(
                self._store.delete_session(
                    self.session_id, user_id=self._user_id, binding_token=self._binding_token
                )
            )
        self._count = 0

    async def _read(self, after: int) -> tuple[StoredMessage, ...]:
        try:
            return await self._store.get_messages(
                self.session_id, user_id=self._user_id, after_seq=after, binding_token=self._binding_token
            )
        except NotFound:
            return ()


def _encode(index: int, item: object, limit: int) -> tuple[str, str]:
    """(role, content) of an item, refusing one that would not come back deep-equal."""
    field = f"items[{index}]"
    if not isinstance(item, dict):
        raise ValidationError(field, f"must be a dict (a response input item), not {type(item).__name__}")
    try:
        text = orjson.dumps(item).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValidationError(field, f"cannot be encoded as JSON ({exc})") from None
    # orjson refused what JSON cannot hold (other types, non-str keys, ints past 64 bits,
    # lone surrogates, nesting past 254); what it accepted comes back equal unless it holds
    # a tuple, a subclass or a NaN/infinity: one walk of the item finds those, without
    # decoding the text again (half the cost of an add, measured).
    if not plain_json(item):
        raise ValidationError(field, "does not survive a JSON round trip unchanged (a tuple, NaN, ...)")
    content_size(text, limit, field)
    return _role(item), text


def _role(item: dict[str, Any]) -> str:
    role = item.get("role")
    if isinstance(role, str) and role in _ROLES:
        return _ROLES[role]
    kind = item.get("type")
    if isinstance(kind, str) and kind.endswith("_output"):
        return "tool"  # function_call_output, computer_call_output, ...
    return "assistant"  # what the model produced: function calls, reasoning, ...


def _decode(message: StoredMessage) -> TResponseInputItem:
    metadata = message.metadata_json
    if metadata is not None and orjson.loads(metadata) == _METADATA:
        return cast(TResponseInputItem, orjson.loads(message.content))
    return cast(TResponseInputItem, {"role": message.role, "content": message.content})
