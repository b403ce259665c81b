"""A LangGraph checkpointer (`BaseCheckpointSaver`) over a `WriteBehindStore`.

    store = WriteBehindStore.from_config()
    async with store:
        saver = WriteBehindSaver(store, user_id=42)
        graph = builder.compile(checkpointer=saver)
        await graph.ainvoke(inputs, {"configurable": {"thread_id": "trip"}})

An `aput` is one in-memory append (no commit on the request path); the store's
worker batches them to SQLite or PostgreSQL. Because every record is an ordinary message
of an ordinary session, the user's export contains their threads, `delete_user` erases
them, anonymous threads never touch the disk, and one instance owns a thread at a time.

How a thread is stored (the mapping):

- **A thread is one writebehind session** (every `checkpoint_ns` of it included), with
  status `"langgraph"` and the thread id as its title. Its id is a hash of the owner and
  the thread id, so two users' threads named alike never meet, and `adelete_thread` is
  one `delete_session` (on disk when it returns).
- **The owner** is `config["configurable"][user_key]` when the config names one
  (`user_key` is `"user_id"` by default; None turns that off), else the saver's
  `user_id`. Methods that take no config (`adelete_thread`, `adelete_for_runs`,
  `acopy_thread`, `aprune`) act for the saver's `user_id`: `saver.for_user(uid)` gives a
  saver bound to another user. `user_id=None` is anonymous: the threads live in memory
  only, sealed to this saver (and its `for_user(None)` copies) by a random binding token.
- **Records are messages** (role `"tool"`), two per step: an `aput` is one message (the
  checkpoint, its metadata, and the values of the channels in `new_versions`), an
  `aput_writes` one message (that task's writes). The metadata says what the message holds
  (`{"lg": "checkpoint", "ns", "id", "parent", "thread", "run", "blobs": [[channel,
  version], ...]}`, or `"writes"` with the task, path and `[[index, channel], ...]`); the
  content is LangGraph's typed serializer output, two lines per value (`type`, base64).
  Message ids are hashes of the record's key: putting a checkpoint again replaces it, and
  a task's regular writes are kept once (the reference savers' `INSERT OR IGNORE`; a
  special write, an error or an interrupt, replaces the one before, as theirs).
- **Checkpoints are deltas.** As in `InMemorySaver` and the PostgreSQL saver, a channel
  value is stored once per version: `aput` stores only the values of `new_versions`, and a
  checkpoint names the versions it reads, found in the record that stored each (the
  latest, if a version was stored twice). A 200-step thread whose large channels do not
  change grows by the changed values only (see the test), not by the whole state per step.
- **Large values** are split over several messages (the store's `max_message_bytes` each);
  the head message is written last, so a record is either whole or invisible.
- **Deleting single checkpoints** (`adelete_for_runs`, `aprune`): the store has no
  per-message delete, so their messages are emptied in place (content `""`, metadata
  `{"lg": "gone"}`): the data is gone from memory and, at the next flush, from disk; an
  empty row per record remains. A dropped checkpoint whose message holds a value a kept
  one still reads is rewritten to hold only those values (`{"lg": "blobs"}`). A pruned
  checkpoint's ancestors are kept while the kept one still reads through them (a
  `DeltaChannel` or an empty channel), as `BaseCheckpointSaver.prune` asks.

Durability: LangGraph passes a run's `durability` to the saver only when the caller gave it
(`graph.ainvoke(..., durability="sync")` puts it in the config under
`CONFIG_KEY_DURABILITY`; the default `"async"` is not passed). A saver sees `"sync"`, so:

- `"sync"`: every `aput` / `aput_writes` of that run returns once it is on disk (the
  store's group commit: concurrent runs share transactions). Pregel awaits each `aput`
  before the next step, so a step is on disk before the next one starts.
- `"async"` (the default) and `"exit"`: write-behind; on disk at the next flush
  (`flush_interval_ms`) and at shutdown. A crash loses at most the last interval.
- `WriteBehindSaver(..., durable=True)` makes every write durable whatever the run says.

Atomicity and cancellation: a record is one message, or (when split) parts first and the
head that makes them visible last; a replaced record gets new parts before its head moves
to them. So every prefix of a call's writes is a consistent thread, and a cancelled or
failed `aput` leaves the previous checkpoint as the latest (and at most unread parts).

The sync methods (`get_tuple`, `put`, ...) work from another thread than the event loop the
saver is used on (as `AsyncSqliteSaver`'s), and raise `InvalidStateError` on that loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import orjson
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..errors import NotFound, ValidationError
from ..model import StoredMessage, UserId, check_user_id
from ..writebehind import WriteBehindStore
from ._common import digest

try:  # where Pregel puts a run's durability mode into the config it hands the saver
    from langgraph._internal._constants import CONFIG_KEY_DURABILITY
except ImportError:  # pragma: no cover - a LangGraph that moved it: the value it has had
    CONFIG_KEY_DURABILITY = "__pregel_durability"

__all__ = ["STATUS", "WriteBehindSaver"]

STATUS: Final = "langgraph"
"""The status of the sessions that hold LangGraph threads (listings can tell them apart)."""

_ROLE: Final = "tool"
_CHECKPOINT: Final = "checkpoint"
_BLOBS: Final = "blobs"
_WRITES: Final = "writes"
_GONE_META: Final = {"lg": "gone"}
_PART_META: Final = {"lg": "part"}
_MAX_TITLE_CHARS: Final = 200
_T = TypeVar("_T")


def _ns_tag(ns: str) -> str:
    """A short tag of the namespace in every record's id: a read of one namespace skips the
    others' messages without decoding their metadata."""
    return digest("ns", ns)[:8]


def _version_key(version: object) -> str:
    # 1, "1" and 1.0 are different versions to LangGraph: keep their JSON forms apart.
    return orjson.dumps(version).decode()


def _text(field_name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(field_name, "contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field_name, "contains a lone surrogate") from None
    return value


def _encode(typed: tuple[str, bytes]) -> str:
    """A serializer's typed value as two lines of text: its type tag and base64."""
    kind, data = typed
    if "\n" in kind:
        raise ValidationError("serde", f"type tag {kind!r} contains a newline")
    return f"{kind}\n{base64.b64encode(data).decode('ascii')}"


def _decode(kind: str, data: str) -> tuple[str, bytes]:
    return kind, base64.b64decode(data)


@dataclass(slots=True)
class _Record:
    """A record's head message and its decoded metadata."""

    message: StoredMessage
    meta: dict[str, Any]

    @property
    def mid(self) -> str:
        return self.message.id

    @property
    def blob_offset(self) -> int:
        """Where its blobs start among its lines (a checkpoint's own four lines first)."""
        return 4 if self.meta["lg"] == _CHECKPOINT else 0


@dataclass(slots=True)
class _Thread:
    """What one session holds, indexed (one pass over its messages, in seq order)."""

    messages: tuple[StoredMessage, ...]
    checkpoints: dict[str, dict[str, _Record]] = field(default_factory=dict)  # ns -> id -> record
    # (ns, channel, version) -> the record holding that blob and its index there; a later
    # record holding the same key replaces it (the reference savers' INSERT OR REPLACE).
    blobs: dict[tuple[str, str, str], tuple[_Record, int]] = field(default_factory=dict)
    writes: dict[tuple[str, str], list[_Record]] = field(default_factory=dict)  # (ns, checkpoint id)
    others: list[_Record] = field(default_factory=list)  # blob-only records
    parts: dict[str, StoredMessage] = field(default_factory=dict)
    _lines: dict[str, list[str] | None] = field(default_factory=dict)

    @classmethod
    def scan(cls, messages: tuple[StoredMessage, ...], ns: str | None = None) -> _Thread:
        thread = cls(messages)
        tag = None if ns is None else _ns_tag(ns)
        for message in messages:
            mid = message.id
            if mid.startswith("p."):
                thread.parts[mid] = message
                continue
            if tag is not None and mid[2:10] != tag:
                continue
            meta = message.metadata
            if meta is None:
                continue
            kind = meta.get("lg")
            record = _Record(message, meta)
            if kind == _CHECKPOINT:
                thread.checkpoints.setdefault(meta["ns"], {})[meta["id"]] = record
            elif kind == _WRITES:
                thread.writes.setdefault((meta["ns"], meta["cp"]), []).append(record)
                continue
            elif kind == _BLOBS:
                thread.others.append(record)
            else:
                continue
            for i, (channel, version) in enumerate(meta["blobs"]):
                thread.blobs[(meta["ns"], channel, _version_key(version))] = (record, i)
        return thread

    def lines(self, record: _Record) -> list[str] | None:
        """The record's content as lines, None if a part is missing (a head whose parts
        went: a torn multi-part write never got its head, so it is invisible anyway)."""
        mid = record.mid
        if mid in self._lines:
            return self._lines[mid]
        count = record.meta.get("parts", 0)
        chunks = [record.message.content]
        for i in range(1, count + 1):
            part = self.parts.get(_part_id(mid, record.meta["gen"], i))
            if part is None:
                self._lines[mid] = None
                return None
            chunks.append(part.content)
        lines = "".join(chunks).split("\n")
        self._lines[mid] = lines
        return lines

    def heads(self) -> list[_Record]:
        """Every record (its head message), checkpoints, value-only ones and writes."""
        found = [r for by_id in self.checkpoints.values() for r in by_id.values()]
        found += self.others
        found += [r for records in self.writes.values() for r in records]
        return found

    def part_ids(self, record: _Record) -> list[str]:
        count = record.meta.get("parts", 0)
        return [_part_id(record.mid, record.meta["gen"], i) for i in range(1, count + 1)]

    def blob(self, key: tuple[str, str, str]) -> tuple[str, str] | None:
        """The stored (type, base64) of a blob, None if there is none or it cannot be read."""
        found = self.blobs.get(key)
        if found is None:
            return None
        record, i = found
        lines = self.lines(record)
        if lines is None:
            return None
        at = record.blob_offset + 2 * i
        return lines[at], lines[at + 1]


def _part_id(head: str, gen: str, i: int) -> str:
    return f"p.{head}.{gen}.{i}"


@dataclass(frozen=True, slots=True)
class _Owner:
    user_id: UserId | None
    binding_token: str | None

    def session_id(self, thread_id: str) -> str:
        who = (
            f"anon:{self.binding_token}"
            if self.user_id is None
            else f"{type(self.user_id).__name__}:{self.user_id}"
        )
        return f"lg.{digest('thread', who, thread_id)}"


@dataclass(frozen=True, slots=True)
class _Target:
    """The session a write goes to, and what creating it takes."""

    owner: _Owner
    sid: str
    thread_id: str


class WriteBehindSaver(BaseCheckpointSaver[str]):
    """LangGraph's checkpointer on a `WriteBehindStore` (see the module docstring).

    Raises the store's errors: `ValidationError` (naming the field) for a bad thread id or
    user id, `BackPressureError` when the store refuses a write, `ClosedError` when it is
    closed. A missing thread reads as None / nothing, as LangGraph expects.
    """

    def __init__(
        self,
        store: WriteBehindStore,
        *,
        user_id: UserId | None = None,
        user_key: str | None = "user_id",
        durable: bool = False,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self._store = store
        self._user_id = check_user_id(user_id)  # refused here, not at the first checkpoint
        self._user_key = user_key
        self._durable = durable
        # Anonymous threads: sealed to this saver (and its copies) by a token nobody else has;
        # and, since anonymous sessions have no listing, indexed here (session -> thread).
        self._anon_token = secrets.token_urlsafe(32)
        self._anon_threads: dict[str, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def for_user(self, user_id: UserId | None) -> WriteBehindSaver:
        """This saver, acting for `user_id` where no config names a user."""
        checked = check_user_id(user_id)
        clone = WriteBehindSaver.__new__(WriteBehindSaver)
        clone.__dict__.update(self.__dict__)
        clone._user_id = checked
        return clone

    # -- who and where -------------------------------------------------------------------------

    def _owner(self, config: RunnableConfig | None = None) -> _Owner:
        user_id = self._user_id
        if config is not None and self._user_key is not None:
            configured = _configurable(config).get(self._user_key)
            if configured is not None:
                user_id = configured
        return _Owner(user_id, self._anon_token if user_id is None else None)

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    def _durable_for(self, config: RunnableConfig) -> bool:
        return self._durable or _configurable(config).get(CONFIG_KEY_DURABILITY) == "sync"

    def _target(self, owner: _Owner, thread_id: str) -> _Target:
        sid = owner.session_id(thread_id)
        if owner.user_id is None:
            self._anon_threads[sid] = thread_id
        return _Target(owner, sid, thread_id)

    async def _create(self, target: _Target) -> None:
        thread_id = target.thread_id
        title = thread_id if len(thread_id) <= _MAX_TITLE_CHARS else thread_id[: _MAX_TITLE_CHARS - 1] + "…"
        owner = target.owner
        await self._store.ensure_session(
            target.sid, user_id=owner.user_id, title=title, status=STATUS, binding_token=owner.binding_token
        )

    async def _messages(self, owner: _Owner, sid: str) -> tuple[StoredMessage, ...] | None:
        try:
            return await self._store.get_messages(
                sid, user_id=owner.user_id, binding_token=owner.binding_token
            )
        except NotFound:
            return None

    async def _threads(self, owner: _Owner) -> list[str]:
        """The session ids of the owner's threads."""
        if owner.user_id is None:
            return list(self._anon_threads)
        return [s.id for s in await self._store.list_sessions(owner.user_id) if s.status == STATUS]

    # -- writing records ----------------------------------------------------------------------

    async def _append(self, target: _Target, mid: str, content: str, meta: Mapping[str, Any]) -> bool:
        """Append a message under a chosen id, creating the thread's session on first use
        (ensure_session only then: it returns a snapshot of the whole session); False if
        the id is taken."""
        owner = target.owner
        for attempt in (1, 2):
            try:
                await self._store.append_message(
                    target.sid,
                    user_id=owner.user_id,
                    binding_token=owner.binding_token,
                    role=_ROLE,
                    content=content,
                    message_id=mid,
                    metadata=dict(meta),
                )
            except NotFound:
                if attempt == 2:
                    raise
                await self._create(target)
            except ValidationError as exc:
                if exc.field != "message_id":
                    raise
                return False  # our ids are valid by construction: this is "already exists"
            else:
                return True
        raise AssertionError("unreachable")  # pragma: no cover

    async def _erase(self, owner: _Owner, sid: str, mids: Sequence[str]) -> None:
        for mid in mids:
            try:
                await self._store.update_message(
                    sid,
                    mid,
                    user_id=owner.user_id,
                    binding_token=owner.binding_token,
                    content="",
                    metadata=dict(_GONE_META),
                )
            except NotFound:
                continue

    async def _put_record(
        self, target: _Target, mid: str, meta: dict[str, Any], payload: str, *, replace: bool
    ) -> None:
        """Write one record: its extra parts first, its head (what makes it visible) last.

        An existing record of the id is replaced (`replace`) or kept as it is. Replacing
        writes new parts under a new generation, then the head, then empties the old
        parts, so that every prefix of the sequence reads as the old record or the new one.
        """
        limit = max(1, self._store.hot.max_message_bytes)
        chunks = [payload[i : i + limit] for i in range(0, len(payload), limit)] or [""]
        head = dict(meta)
        parts: list[str] = []
        if len(chunks) > 1:
            gen = secrets.token_hex(4)
            head["gen"] = gen
            head["parts"] = len(chunks) - 1
            for i, chunk in enumerate(chunks[1:], 1):
                parts.append(_part_id(mid, gen, i))
                await self._append(target, parts[-1], chunk, _PART_META)
        if await self._append(target, mid, chunks[0], head):
            return
        owner = target.owner
        if not replace:
            await self._erase(owner, target.sid, parts)  # the fresh parts of a write not kept
            return
        messages = await self._messages(owner, target.sid) or ()
        old = next((m for m in messages if m.id == mid), None)
        await self._store.update_message(
            target.sid,
            mid,
            user_id=owner.user_id,
            binding_token=owner.binding_token,
            content=chunks[0],
            metadata=head,
        )
        if old is not None and (old_meta := old.metadata) and old_meta.get("parts"):
            stale = _Thread(messages).part_ids(_Record(old, old_meta))
            await self._erase(owner, target.sid, [p for p in stale if p not in parts])

    # -- the async protocol -------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        self._bind_loop()
        owner = self._owner(config)
        thread_id = _thread_id(config)
        ns = _namespace(config)
        messages = await self._messages(owner, owner.session_id(thread_id))
        if messages is None:
            return None
        thread = _Thread.scan(messages, ns)
        by_id = thread.checkpoints.get(ns, {})
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id:
            record = by_id.get(checkpoint_id)
            return None if record is None else self._tuple(thread_id, thread, record, config)
        for cid in sorted(by_id, reverse=True):
            found = self._tuple(thread_id, thread, by_id[cid])
            if found is not None:
                return found
        return None

    def _stored_checkpoint(self, thread: _Thread, record: _Record) -> tuple[Checkpoint, list[str]] | None:
        lines = thread.lines(record)
        if lines is None:
            return None
        stored: Checkpoint = self.serde.loads_typed(_decode(lines[0], lines[1]))
        return stored, lines

    def _tuple(
        self, thread_id: str, thread: _Thread, record: _Record, config: RunnableConfig | None = None
    ) -> CheckpointTuple | None:
        """The tuple of a checkpoint record, None if it cannot be read whole."""
        loaded = self._stored_checkpoint(thread, record)
        if loaded is None:
            return None
        stored, lines = loaded
        meta = record.meta
        ns = meta["ns"]
        values: dict[str, Any] = {}
        for channel, version in stored["channel_versions"].items():
            blob = thread.blob((ns, channel, _version_key(version)))
            if blob is not None and blob[0] != "empty":
                values[channel] = self.serde.loads_typed(_decode(*blob))
        here: RunnableConfig = {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": meta["id"]}
        }
        parent = meta.get("parent")
        return CheckpointTuple(
            config=config if config is not None else here,
            checkpoint={**stored, "channel_values": values},
            metadata=self.serde.loads_typed(_decode(lines[2], lines[3])),
            parent_config=(
                {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": parent}}
                if parent
                else None
            ),
            pending_writes=self._pending(thread, ns, meta["id"]),
        )

    def _pending(self, thread: _Thread, ns: str, checkpoint_id: str) -> list[PendingWrite]:
        """The checkpoint's writes in `writes_sort_key` order. A task's regular write is the
        first one stored for its index (INSERT OR IGNORE); a special one (error, interrupt)
        the last (INSERT OR REPLACE)."""
        chosen: dict[tuple[str, int], tuple[tuple[str, str, int], str, str, str]] = {}
        for record in thread.writes.get((ns, checkpoint_id), ()):
            lines = thread.lines(record)
            if lines is None:
                continue
            meta = record.meta
            task = meta["task"]
            for i, (idx, channel) in enumerate(meta["w"]):
                if idx >= 0 and (task, idx) in chosen:
                    continue
                sort = writes_sort_key(meta["path"], task, idx)
                chosen[(task, idx)] = (sort, channel, lines[2 * i], lines[2 * i + 1])
        ordered = sorted(chosen.items(), key=lambda item: item[1][0])
        return [
            (task, ch, self.serde.loads_typed(_decode(kind, data)))
            for (task, _), (_, ch, kind, data) in ordered
        ]

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first (by checkpoint id, across the threads and namespaces
        searched). `config=None` searches every thread of the saver's user."""
        self._bind_loop()
        owner = self._owner(config)
        if limit is not None and limit <= 0:
            return
        ns_wanted: str | None = None
        cid_wanted: str | None = None
        if config is not None:
            sids = [owner.session_id(_thread_id(config))]
            ns_wanted = _configurable(config).get("checkpoint_ns")
            cid_wanted = get_checkpoint_id(config)
        else:
            sids = await self._threads(owner)
        before_id = get_checkpoint_id(before) if before else None
        found: list[tuple[str, str, _Thread, _Record]] = []
        for sid in sids:
            messages = await self._messages(owner, sid)
            if messages is None:
                continue
            thread = _Thread.scan(messages, ns_wanted)
            for ns, by_id in thread.checkpoints.items():
                if ns_wanted is not None and ns != ns_wanted:
                    continue
                for cid, record in by_id.items():
                    if cid_wanted and cid != cid_wanted:
                        continue
                    if before_id and cid >= before_id:
                        continue
                    found.append((cid, record.meta["thread"], thread, record))
        found.sort(key=lambda item: item[0], reverse=True)
        left = limit
        for _, thread_id, thread, record in found:
            item = self._tuple(thread_id, thread, record)
            if item is None:
                continue
            if filter and not all(item.metadata.get(k) == v for k, v in filter.items()):
                continue
            yield item
            if left is not None:
                left -= 1
                if left <= 0:
                    return

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store the checkpoint and, in the same message, the values of the channels in
        `new_versions` (only those: the others are read from the records that hold them)."""
        self._bind_loop()
        owner = self._owner(config)
        thread_id = _thread_id(config)
        ns = _namespace(config)
        parent = _configurable(config).get("checkpoint_id")
        # Everything is encoded before the first write: a value the serializer refuses
        # leaves nothing behind.
        stored = checkpoint.copy()
        values: dict[str, Any] = stored.pop("channel_values")  # type: ignore[misc]
        full_meta = get_checkpoint_metadata(config, metadata)
        lines = [_encode(self.serde.dumps_typed(stored)), _encode(self.serde.dumps_typed(full_meta))]
        blobs = []
        for channel, version in new_versions.items():
            lines.append(
                _encode(self.serde.dumps_typed(values[channel]) if channel in values else ("empty", b""))
            )
            blobs.append([channel, version])
        run_id = full_meta.get("run_id")
        record_meta = {
            "lg": _CHECKPOINT,
            "ns": ns,
            "id": checkpoint["id"],
            "parent": parent,
            "thread": thread_id,
            "run": run_id if isinstance(run_id, str) else None,
            "blobs": blobs,
        }
        target = self._target(owner, thread_id)
        mid = f"c.{_ns_tag(ns)}.{digest(ns, checkpoint['id'])}"
        await self._put_record(target, mid, record_meta, "\n".join(lines), replace=True)
        if self._durable_for(config):
            # Everything written before this call, this checkpoint included (group commit).
            await self._store.flush()
        return {
            "configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": checkpoint["id"]}
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes for the checkpoint in `config`, as one message. A regular
        write already stored for `(task_id, index)` is kept; a special one (an error, an
        interrupt) replaces the one stored before."""
        self._bind_loop()
        if not writes:
            return
        owner = self._owner(config)
        thread_id = _thread_id(config)
        ns = _namespace(config)
        checkpoint_id = _configurable(config).get("checkpoint_id")
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise ValidationError("checkpoint_id", "is required in config['configurable'] for writes")
        indexes = [WRITES_IDX_MAP.get(channel, i) for i, (channel, _) in enumerate(writes)]
        payload = "\n".join(_encode(self.serde.dumps_typed(value)) for _, value in writes)
        meta = {
            "lg": _WRITES,
            "ns": ns,
            "cp": checkpoint_id,
            "task": task_id,
            "path": task_path,
            "w": [[idx, channel] for idx, (channel, _) in zip(indexes, writes, strict=True)],
        }
        key = digest(ns, checkpoint_id, task_id, ",".join(map(str, indexes)))
        if any(idx < 0 for idx in indexes):
            # A special write replaces the one before it, regular ones never do: the reader
            # settles each (task, index) (the first regular write, the last special one), so
            # a call with special writes is always a message of its own.
            key += "." + secrets.token_hex(4)
        await self._put_record(
            self._target(owner, thread_id), f"w.{_ns_tag(ns)}.{key}", meta, payload, replace=False
        )
        if self._durable_for(config):
            await self._store.flush()

    async def adelete_thread(self, thread_id: str) -> None:
        """Erase the thread, every namespace of it, from memory and disk (durable on return)."""
        self._bind_loop()
        owner = self._owner()
        sid = owner.session_id(_text("thread_id", str(thread_id)))
        with contextlib.suppress(NotFound):
            await self._store.delete_session(sid, user_id=owner.user_id, binding_token=owner.binding_token)
        self._anon_threads.pop(sid, None)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Erase the checkpoints (and their writes) that these runs made, in every thread of
        the saver's user, and the values only they held."""
        self._bind_loop()
        runs = set(run_ids)
        if not runs:
            return
        owner = self._owner()
        for sid in await self._threads(owner):
            await self._collect(owner, sid, lambda thread: _without_runs(thread, runs))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, value and write of the source thread into the target one."""
        self._bind_loop()
        owner = self._owner()
        source = _text("thread_id", str(source_thread_id))
        target = _text("thread_id", str(target_thread_id))
        messages = await self._messages(owner, owner.session_id(source))
        if messages is None:
            return
        thread = _Thread.scan(messages)
        into = self._target(owner, target)
        # In the source's order (seq): a copy cut short shows a prefix of its history, and a
        # value stored twice under one key is replaced in the same order.
        for record in sorted(thread.heads(), key=lambda r: r.message.seq):
            lines = thread.lines(record)
            if lines is None:
                continue
            meta = {k: v for k, v in record.meta.items() if k not in ("gen", "parts")}
            if meta["lg"] == _CHECKPOINT:
                meta["thread"] = target
            await self._put_record(into, record.mid, meta, "\n".join(lines), replace=True)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`"keep_latest"`: keep each namespace's newest checkpoint (with its writes, the
        values it reads, and the ancestors it still reads through); `"delete"`: the threads go."""
        self._bind_loop()
        if strategy not in ("keep_latest", "delete"):
            raise ValidationError("strategy", "must be 'keep_latest' or 'delete'")
        owner = self._owner()
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.adelete_thread(thread_id)
            else:
                sid = owner.session_id(_text("thread_id", str(thread_id)))
                await self._collect(owner, sid, self._latest_only)

    async def _collect(self, owner: _Owner, sid: str, survivors: Callable[[_Thread], set[str]]) -> None:
        """Keep the checkpoints `survivors(thread)` names (message ids), their writes and the
        values they read; empty the rest. A dropped checkpoint that holds a value a kept one
        reads becomes a record of those values only."""
        try:
            # A no-op write first: it may wait (a load, back-pressure), and afterwards the
            # session is in memory and dirty, so the read and the writes below run with no
            # suspension between them: no aput can slip in between what is read and erased.
            record = await self._store.update_session(
                sid, user_id=owner.user_id, binding_token=owner.binding_token
            )
        except NotFound:
            return
        thread = _Thread.scan(record.path)
        kept = survivors(thread)
        keep: set[str] = set()  # message ids that stay as they are
        read: set[tuple[str, str, str]] = set()
        thread_id = ""
        for by_id in thread.checkpoints.values():
            for rec in by_id.values():
                thread_id = rec.meta["thread"]
                if rec.mid not in kept:
                    continue
                keep.add(rec.mid)
                keep.update(thread.part_ids(rec))
                loaded = self._stored_checkpoint(thread, rec)
                if loaded is not None:
                    ns = rec.meta["ns"]
                    read.update((ns, ch, _version_key(v)) for ch, v in loaded[0]["channel_versions"].items())
                for write in thread.writes.get((rec.meta["ns"], rec.meta["id"]), ()):
                    keep.add(write.mid)
                    keep.update(thread.part_ids(write))
        # Dropped records still holding a value that is read: rewritten to hold just those.
        needed: dict[str, list[int]] = {}
        for key, (holder, i) in thread.blobs.items():
            if key in read and holder.mid not in keep:
                needed.setdefault(holder.mid, []).append(i)
        holders = {r.mid: r for by_id in thread.checkpoints.values() for r in by_id.values()}
        holders.update((r.mid, r) for r in thread.others)
        target = _Target(owner, sid, thread_id)
        for mid, indexes in needed.items():
            holder = holders[mid]
            lines = thread.lines(holder)
            if lines is None:
                continue
            indexes.sort()
            if holder.meta["lg"] == _BLOBS and len(indexes) == len(holder.meta["blobs"]):
                keep.add(mid)
                keep.update(thread.part_ids(holder))
                continue
            at = holder.blob_offset
            meta = {
                "lg": _BLOBS,
                "ns": holder.meta["ns"],
                "blobs": [holder.meta["blobs"][i] for i in indexes],
            }
            payload = "\n".join(line for i in indexes for line in lines[at + 2 * i : at + 2 * i + 2])
            await self._put_record(target, mid, meta, payload, replace=True)
            keep.add(mid)
        # Read again (the rewrites gave their records new parts): everything else goes.
        fresh = await self._messages(owner, sid) or ()
        live = _Thread.scan(fresh)
        for rec in live.heads():
            if rec.mid in keep:
                keep.update(live.part_ids(rec))
        doomed = [
            m.id
            for m in fresh
            if m.id not in keep
            and m.id[:2] in ("c.", "w.", "p.")
            and not (m.content == "" and m.metadata == _GONE_META)
        ]
        await self._erase(owner, sid, doomed)

    def _latest_only(self, thread: _Thread) -> set[str]:
        """Each namespace's newest checkpoint, and the ancestors it reads through: while a
        channel it names has no stored value at its version (a `DeltaChannel` between
        snapshots, or an empty channel), its value comes from further up the chain."""
        kept: set[str] = set()
        for ns, by_id in thread.checkpoints.items():
            if not by_id:
                continue
            record: _Record | None = by_id[max(by_id)]
            pending: set[str] | None = None
            while record is not None:
                kept.add(record.mid)
                loaded = self._stored_checkpoint(thread, record)
                if loaded is None:
                    break
                unresolved = set()
                for channel, version in loaded[0]["channel_versions"].items():
                    blob = thread.blob((ns, channel, _version_key(version)))
                    if blob is None or blob[0] == "empty":
                        unresolved.add(channel)
                pending = unresolved if pending is None else pending & unresolved
                if not pending:
                    break
                parent = record.meta.get("parent")
                record = by_id.get(parent) if parent else None
        return kept

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        """The default walks `aget_tuple` once per ancestor (a read of the whole thread
        each); this reads the thread once and walks the chain in memory."""
        self._bind_loop()
        if not channels:
            return {}
        owner = self._owner(config)
        thread_id = _thread_id(config)
        ns = _namespace(config)
        messages = await self._messages(owner, owner.session_id(thread_id))
        result: dict[str, DeltaChannelHistory] = {c: {"writes": []} for c in channels}
        if messages is None:
            return result
        thread = _Thread.scan(messages, ns)
        by_id = thread.checkpoints.get(ns, {})
        target_id = get_checkpoint_id(config) or max(by_id, default="")
        target = by_id.get(target_id)
        parent = target.meta.get("parent") if target is not None else None
        collected: dict[str, list[PendingWrite]] = {c: [] for c in channels}
        remaining = set(channels)
        while parent and remaining:
            record = by_id.get(parent)
            if record is None:
                break
            item = self._tuple(thread_id, thread, record)
            if item is None:
                break
            for write in reversed(item.pending_writes or ()):
                if write[1] in remaining:
                    collected[write[1]].append(write)
            for channel in list(remaining):
                if channel in item.checkpoint["channel_values"]:
                    result[channel]["seed"] = item.checkpoint["channel_values"][channel]
                    remaining.discard(channel)
            parent = record.meta.get("parent")
        for channel in channels:
            result[channel]["writes"] = list(reversed(collected[channel]))
        return result

    def get_next_version(self, current: str | None, channel: None) -> str:
        """As `InMemorySaver`: a zero-padded counter and a random fraction (so that two
        writers of one version never collide), compared as strings."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # -- the sync protocol: from another thread, through the loop the saver runs on -------------

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            coro.close()
            raise asyncio.InvalidStateError(
                "WriteBehindSaver's sync methods work from another thread than its event loop; "
                "on the loop use the async ones (graph.ainvoke, saver.aget_tuple, ...)"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._run(self.aget_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        yield from self._run(collect())

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._run(self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._run(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._run(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(self.aprune(thread_ids, strategy=strategy))


def _configurable(config: RunnableConfig) -> dict[str, Any]:
    configurable = config.get("configurable") if isinstance(config, dict) else None
    if not isinstance(configurable, dict):
        raise ValidationError("config", "must be a dict with a 'configurable' dict")
    return configurable


def _thread_id(config: RunnableConfig) -> str:
    value = _configurable(config).get("thread_id")
    if value is None or value == "":
        raise ValidationError("thread_id", "is required in config['configurable']")
    # LangGraph itself turns a non-str thread id into its str (the reference savers too).
    return _text("thread_id", str(value))


def _namespace(config: RunnableConfig) -> str:
    return _text("checkpoint_ns", _configurable(config).get("checkpoint_ns") or "")


def _without_runs(thread: _Thread, runs: set[str]) -> set[str]:
    return {
        record.message.id
        for by_id in thread.checkpoints.values()
        for record in by_id.values()
        if record.meta.get("run") not in runs
    }
