"""`WriteBehindStore`: a `SessionStore` whose signed-in sessions persist, off the request path.

    store = WriteBehindStore(SessionStore(), SQLiteBackend("chat_sessions.db"))
    async with store:
        await store.append_message(sid, user_id=42, role="user", content="hi")

What a caller may rely on:

- A call on a session that is in memory never awaits the disk. It only suspends
  on a miss (one backend load per session, shared by concurrent callers), under
  back-pressure, or when it asked for `durable=True`.
- Every write is acknowledged from memory and reaches disk with the next flush
  (every `flush_interval_ms`, or sooner when `flush_batch` sessions are dirty).
  `durable=True` / `flush()` return once it is on disk; concurrent durable callers
  share transactions (group commit).
- `aclose()` flushes everything; if the backend still refuses after
  `shutdown_timeout_seconds`, the dirty sessions go to a recovery file replayed by
  the next `start()`. Only if that fails too does `aclose()` raise.
- `delete_session` / `delete_user` are on disk when they return, and nothing queued
  or in flight can bring the data back.
- Back-pressure: when `max_dirty` sessions wait for the disk, a write that would
  dirty one more waits up to `backpressure_timeout_ms` for the worker, then raises
  `BackPressureError` having changed nothing. Writes to already-dirty sessions and
  to anonymous ones are never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from .backends.base import Backend, SessionDelta
from .config import Config
from .dirty import DirtyIndex
from .errors import BackPressureError, ClosedError, NotFound, StorageError, WriteBehindError
from .export import export_json
from .model import (
    Metadata,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    check_id,
    check_user_id,
    utcnow,
)
from .policy import PersistencePolicy, authenticated_only
from .recovery import read_recovery, recovery_path_for, write_recovery
from .stats import StoreStats
from .store import (
    UNSET,
    SessionStore,
    _check_window,
    _new_id,
    _newest_first,
    _owns,
    _require_user,
    _Session,
)
from .worker import FlushWorker

__all__ = ["WriteBehindStore"]

LOG = logging.getLogger("writebehind")
# Who read, exported or erased which session: ids only, never content. A logger of its own
# so that operators can route it (an audit trail) or silence it.
ACCESS = logging.getLogger("writebehind.access")

_NEW: Final = "new"
_RUNNING: Final = "running"
_CLOSED: Final = "closed"
_PURGE_CHUNK: Final = 500


class WriteBehindStore:
    """The hot tier (`hot`) in front of a `Backend`, written behind by a `FlushWorker`."""

    def __init__(
        self,
        hot: SessionStore,
        backend: Backend,
        *,
        config: Config | None = None,
        policy: PersistencePolicy = authenticated_only,
        recovery_path: Path | None = None,
    ) -> None:
        self.config = config = config or Config()
        self._hot = hot
        self._backend = backend
        self._policy = policy
        if recovery_path is None:
            db_path = getattr(backend, "path", None)
            recovery_path = recovery_path_for(Path(db_path)) if db_path is not None else None
        self._recovery_path = recovery_path
        self._dirty = DirtyIndex(hot)
        self._in_memory = hot._sessions  # read-only here: the hot tier owns it
        self._dirty_map = self._dirty.dirty_map
        self._inflight_map = self._dirty.inflight_map
        self._max_dirty = config.max_dirty
        self._flush_batch = config.flush_batch
        self._worker = FlushWorker(
            backend,
            self._dirty,
            interval_s=config.flush_interval_ms / 1000,
            batch_sessions=config.flush_batch,
            max_flushes_per_second=config.max_flushes_per_second,
            retry_max_delay_s=config.retry_max_delay_ms / 1000,
            on_conflict=self._conflicted,
        )
        self._conflicts: dict[str, SessionRecord] = {}
        self._state = _NEW
        self._loading: dict[str, asyncio.Task[None]] = {}
        # Bumped whenever a delete commits: a load that began before it must not
        # put the deleted record back into memory.
        self._epoch = 0
        self._loads = 0
        self._cold_hits = 0
        self._rejections = 0
        self._housekeeping: asyncio.Task[None] | None = None
        self._purged = 0
        self._last_cleanup_at: datetime | None = None

    @classmethod
    def from_config(
        cls, config: Config | None = None, *, policy: PersistencePolicy = authenticated_only
    ) -> WriteBehindStore:
        """The default stack: an LRU hot tier over SQLite at `config.db_path`, or over
        PostgreSQL when `config.db_url` (CHAT_SESSION_DB_URL) is set."""
        from .backends.sqlite import SQLiteBackend

        config = config or Config.from_env()
        hot = SessionStore(
            config.cache_size,
            anon_ttl_seconds=config.anon_ttl_seconds,
            max_message_bytes=config.max_message_bytes,
        )
        backend: Backend
        if config.db_url is not None:
            from .backends.postgres import PostgresBackend

            backend = PostgresBackend(config.db_url, schema=config.db_schema)
        else:
            backend = SQLiteBackend(
                config.db_path,
                synchronous=config.synchronous,
                busy_timeout_ms=config.busy_timeout_ms,
            )
        # The recovery file lies beside the SQLite file, or at db_path for PostgreSQL.
        return cls(
            hot, backend, config=config, policy=policy, recovery_path=recovery_path_for(config.db_path)
        )

    @property
    def hot(self) -> SessionStore:
        return self._hot

    @property
    def backend(self) -> Backend:
        return self._backend

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the backend (migrating it), replay a recovery file if one is there, start
        the worker. Raises `SchemaError`/`StorageError` and stays unstarted on failure."""
        if self._state == _RUNNING:
            return
        if self._state == _CLOSED:
            raise ClosedError("a closed store cannot be started again; make a new one")
        await self._backend.open()
        try:
            await self._replay_recovery()
        except BaseException:
            await self._backend.close()
            raise
        self._worker.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="writebehind-housekeeping")
        self._state = _RUNNING

    async def _replay_recovery(self) -> None:
        path = self._recovery_path
        if path is None or not path.exists():
            return
        records = read_recovery(path)
        deltas = [SessionDelta(replace(r, messages=()), r.messages, len(r.messages)) for r in records]
        result = await self._backend.write_batch(deltas)
        if result.conflicts:
            # Someone else wrote these sessions since: keep the file for a person to look at.
            kept = path.with_name(f"{path.name}.conflicted-{int(time.time())}")
            path.rename(kept)
            LOG.error(
                "the recovery file had %d sessions another writer changed since (%s); kept as %s",
                len(result.conflicts),
                ", ".join(sorted(result.conflicts)[:10]),
                kept,
            )
        else:
            path.unlink()
        LOG.warning("replayed %d sessions from the recovery file %s", len(result.versions), path)

    async def aclose(self) -> None:
        """Flush everything and close. Idempotent.

        Raises `StorageError` only if some dirty sessions could be neither written nor
        saved to the recovery file; the message says how many.
        """
        if self._state != _RUNNING:
            self._state = _CLOSED
            return
        self._state = _CLOSED
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await self._worker.stop()
        try:
            await self._final_flush()
        finally:
            await self._backend.close()

    async def _abandon(self) -> None:
        """Stop as a SIGKILL would: no final flush, nothing saved. For crash tests only."""
        self._state = _CLOSED
        self._worker._stopping = True
        tasks = [t for t in (self._worker._task, self._housekeeping) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._backend.close()

    async def _final_flush(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout_seconds
        delay = 0.05
        while len(self._dirty) > len(self._dirty.poisoned()):
            try:
                await self._worker.flush_all()
            except StorageError:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        left = [self._hot._peek(sid) for sid in self._dirty.session_ids()]
        records = [s.snapshot() for s in left if s is not None]
        if not records:
            return
        if self._recovery_path is None:
            raise StorageError(f"{len(records)} sessions could not be saved (no recovery file)")
        try:
            await asyncio.to_thread(write_recovery, self._recovery_path, records)
        except OSError as exc:
            raise StorageError(
                f"{len(records)} sessions could not be saved: the backend refused them and "
                f"the recovery file {self._recovery_path} could not be written ({exc.strerror})"
            ) from exc
        LOG.error(
            "the backend refused %d sessions at shutdown; saved to %s for the next start",
            len(records),
            self._recovery_path,
        )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == _RUNNING and len(self._dirty):
            warnings.warn(
                f"WriteBehindStore dropped with {len(self._dirty)} unflushed sessions; "
                "use 'async with' or await aclose()",
                ResourceWarning,
                stacklevel=1,
            )

    async def flush(self) -> None:
        """Return once everything written before the call is on disk (raises StorageError
        if the backend refused it; the data stays in memory and is retried)."""
        self._require_running()
        await self._worker.sync()

    # -- the request path ----------------------------------------------------------------------

    def _require_running(self) -> None:
        if self._state != _RUNNING:
            raise ClosedError("the store is closed" if self._state == _CLOSED else "call start() first")

    async def _ready(self, session_id: str, user_id: UserId | None, *, creating: bool = False) -> None:
        """Make sure the session is in memory if it exists anywhere. Suspends only on a miss."""
        self._require_running()
        if type(session_id) is str and session_id in self._in_memory:
            return
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        # Creating with a chosen id must see a persisted session of that id, whoever asks,
        # or an anonymous caller could shadow a signed-in user's session in memory.
        if creating or self._policy(sid, uid):
            await self._load(sid)

    async def _load(self, session_id: str) -> None:
        task = self._loading.get(session_id)
        if task is None:
            task = asyncio.create_task(self._do_load(session_id), name="writebehind-load")
            self._loading[session_id] = task
            task.add_done_callback(lambda _: self._loading.pop(session_id, None))
        # Shielded: a caller that gives up does not cancel the others' load.
        await asyncio.shield(task)

    async def _do_load(self, session_id: str) -> None:
        while True:
            epoch = self._epoch
            self._loads += 1
            record = await self._backend.load_session(session_id)
            if epoch != self._epoch:
                continue  # a delete committed meanwhile: what we read may be gone
            if record is not None and self._hot._peek(session_id) is None:
                self._cold_hits += 1
                self._hot._insert(record)
            return

    async def _admit(self, session_id: str, user_id: UserId | None, creating: bool = False) -> None:
        """`_ready`, plus back-pressure for a write that would dirty one more session."""
        await self._ready(session_id, user_id, creating=creating)
        if self._dirty.backlog() < self._max_dirty or self._dirty.holds(session_id):
            return
        session = self._hot._peek(session_id)
        owner = user_id if session is None else session.user_id
        if not self._policy(session_id, owner):
            return
        await self._make_room()
        await self._ready(session_id, user_id, creating=creating)

    async def _make_room(self) -> None:
        timeout = self.config.backpressure_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._dirty.backlog() >= self._max_dirty:
            self._worker.kick()
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._rejections += 1
                raise BackPressureError(
                    f"{self._dirty.backlog()} sessions are waiting for the disk (max_dirty="
                    f"{self.config.max_dirty}); the write was not applied, retry later"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._worker.room.wait(), remaining)

    def _hot_now(self, session_id: object) -> bool:
        """The fast path: running, in memory, no back-pressure. Then nothing awaits."""
        return (
            self._state is _RUNNING
            and type(session_id) is str
            and session_id in self._in_memory
            and len(self._dirty_map) + len(self._inflight_map) < self._max_dirty
        )

    def _persists(self, session: _Session) -> bool:
        return self._policy(session.id, session.user_id)

    def _wrote(self, session: _Session, seq: int | None = None, *, full: bool = False) -> bool:
        """Mark what a write changed, if this session persists; True if it does."""
        if not self._policy(session.id, session.user_id):
            return False
        if self._dirty.mark(session.id, seq, full) >= self._flush_batch:
            self._worker.kick()
        return True

    def _touched(self, session_id: str) -> None:
        # A read moves last_access_at; persist it with the next flush, but never let a read
        # be the write that trips back-pressure.
        session = self._in_memory.get(session_id)
        if (
            session is not None
            and (self._dirty.holds(session_id) or self._dirty.backlog() < self._max_dirty)
            and self._policy(session_id, session.user_id)
        ):
            self._dirty.mark_row(session_id)

    # -- the public API (the same as SessionStore's) -------------------------------------------

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
        if session_id is None:
            # A fresh random id: nothing on disk to look for.
            self._require_running()
            session_id = _new_id()
            if self._dirty.backlog() >= self._max_dirty and self._policy(session_id, user_id):
                await self._make_room()
        elif not self._hot_now(session_id):
            await self._admit(session_id, user_id, creating=True)
        session, created = self._hot._ensure(
            session_id, user_id, title, status, client_ip, user_agent, binding_token, csrf_token
        )
        if self._wrote(session, full=created) and durable:
            await self._worker.sync()
        return session.snapshot()

    async def get_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionRecord:
        if not self._hot_now(session_id):
            await self._ready(session_id, user_id)
        session = self._hot._owned(session_id, user_id, binding_token)
        self._touched(session_id)
        if ACCESS.isEnabledFor(logging.INFO):
            ACCESS.info("read session=%s user=%s", session_id, user_id)
        return session.snapshot()

    async def get_messages(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        after_seq: int = 0,
        limit: int | None = None,
        binding_token: str | None = None,
    ) -> tuple[StoredMessage, ...]:
        if not self._hot_now(session_id):
            await self._ready(session_id, user_id)
        messages = await self._hot.get_messages(
            session_id,
            user_id=user_id,
            after_seq=after_seq,
            limit=limit,
            binding_token=binding_token,
        )
        self._touched(session_id)
        # DEBUG: a streaming client reads a session once a token; `get_session`, exports and
        # erasures are the INFO-level record of who read what.
        if ACCESS.isEnabledFor(logging.DEBUG):
            ACCESS.debug("read messages session=%s user=%s after_seq=%s", session_id, user_id, after_seq)
        return messages

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
        if not self._hot_now(session_id):
            await self._admit(session_id, user_id)
        session, message = self._hot._append(
            session_id, user_id, role, content, message_id, metadata, binding_token
        )
        if self._wrote(session, message.seq) and durable:
            await self._worker.sync()
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
        if not self._hot_now(session_id):
            await self._admit(session_id, user_id)
        session, message = self._hot._update_message(
            session_id, message_id, user_id, content, append, metadata, binding_token
        )
        if self._wrote(session, message.seq) and durable:
            await self._worker.sync()
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
        if not self._hot_now(session_id):
            await self._admit(session_id, user_id)
        session = self._hot._update_session(session_id, user_id, status, title, binding_token)
        if self._wrote(session) and durable:
            await self._worker.sync()
        return session.snapshot()

    async def claim(
        self,
        session_id: str,
        *,
        user_id: UserId,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """Hand an anonymous session to the user who signed in; from now on it persists whole."""
        _require_user(user_id)
        await self._admit(session_id, user_id)
        session = self._hot._claim(session_id, user_id, binding_token)
        if self._wrote(session, full=True) and durable:
            await self._worker.sync()
        return session.snapshot()

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The user's sessions from memory and disk (memory's newer state wins), newest first."""
        self._require_running()
        _check_window(offset, limit, "offset")
        in_memory = await self._hot.list_sessions(user_id)  # validates user_id
        if user_id is None:
            return []
        # Any session in the merged top (offset + limit) is either in memory or within the
        # disk's top (offset + limit + len(in_memory)): in-memory rows can only displace.
        want = None if limit is None else offset + limit + len(in_memory)
        on_disk = await self._backend.list_sessions(user_id, limit=want, offset=0)
        merged = {s.id: s for s in on_disk}
        merged.update((s.id, s) for s in in_memory)
        ordered = sorted(merged.values(), key=_newest_first)
        return ordered[offset : None if limit is None else offset + limit]

    async def delete_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> None:
        """Delete the caller's session from memory and disk; durable when it returns."""
        self._require_running()
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        session = self._hot._peek(sid)
        if session is not None and not self._persists(session):
            # Never on disk: memory is all there is.
            await self._hot.delete_session(sid, user_id=uid, binding_token=binding_token)
            return
        if session is not None and not _owns(session, uid, binding_token):
            raise NotFound(sid)
        if session is None and not self._policy(sid, uid):
            raise NotFound(sid)

        async def erase() -> bool:
            on_disk = await self._backend.delete_session(sid, uid)
            current = self._hot._peek(sid)
            in_memory = current is not None and _owns(current, uid, binding_token)
            if in_memory:
                self._forget(sid)
            self._epoch += 1
            return on_disk or in_memory

        if not await self._worker.call(erase):
            raise NotFound(sid)
        ACCESS.info("erased session=%s user=%s", sid, uid)

    async def delete_user(self, user_id: UserId) -> int:
        """Erase every session of the user from memory and disk; returns how many there were."""
        self._require_running()
        uid = _require_user(user_id)

        async def erase() -> int:
            on_disk = set(await self._backend.delete_user(uid))
            in_memory = {s.id for s in self._hot._remove_user(uid)}
            for sid in in_memory:
                self._dirty.discard(sid)
            self._epoch += 1
            return len(on_disk | in_memory)

        count = await self._worker.call(erase)
        ACCESS.info("erased user=%s sessions=%d", uid, count)
        return count

    def _conflicted(self, session: _Session, deleted: bool) -> None:
        """Another writer won: keep this instance's version for the caller, and drop the
        session from memory so that the next access loads the winner's. If the winner
        deleted it (an erasure on another instance), this instance's copy goes too."""
        if self._in_memory.get(session.id) is session:
            self._forget(session.id)
        self._epoch += 1
        if deleted:
            LOG.warning("session %s was deleted by another writer; dropped here too", session.id)
            return
        record = session.snapshot()
        self._conflicts[session.id] = record
        LOG.warning(
            "session %s was changed by another writer; this instance's version (%d messages) is "
            "kept in take_conflicts() and the next access loads the winner's",
            session.id,
            len(record.messages),
        )

    def take_conflicts(self) -> dict[str, SessionRecord]:
        """The versions of sessions that lost a write conflict since the last call (this
        instance's, not written); the caller decides whether to re-apply anything."""
        conflicts, self._conflicts = self._conflicts, {}
        return conflicts

    def _forget(self, session_id: str) -> None:
        self._hot._remove(session_id)
        self._dirty.discard(session_id)

    def stats(self) -> StoreStats:
        hot = self._hot.stats()
        worker = self._worker.stats()
        return replace(
            hot,
            hot_hits=max(0, hot.hot_hits - self._cold_hits),
            cold_hits=self._cold_hits,
            loads=self._loads,
            dirty_sessions=self._dirty.pending(),
            dirty_messages=self._dirty.dirty_messages(),
            queue_depth=worker.queue_depth,
            durable_waiters=worker.durable_waiters,
            batches_flushed=worker.batches_flushed,
            sessions_flushed=worker.sessions_flushed,
            messages_flushed=worker.messages_flushed,
            flush_latency_last_ms=worker.flush_latency_last_ms,
            flush_latency_p50_ms=worker.flush_latency_p50_ms,
            flush_latency_p99_ms=worker.flush_latency_p99_ms,
            flush_latency_buckets=worker.flush_latency_buckets,
            flush_latency_sum_ms=worker.flush_latency_sum_ms,
            consecutive_failures=worker.consecutive_failures,
            total_failures=worker.total_failures,
            last_error=worker.last_error,
            last_flush_at=worker.last_flush_at,
            backpressure_rejections=self._rejections,
            poisoned_sessions=worker.poisoned_sessions,
            sessions_purged=self._purged,
            conflicts=len(self._conflicts),
            last_cleanup_at=self._last_cleanup_at,
        )

    # -- the user's rights and the operator's tools -------------------------------------------

    async def export_user(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        """Every session of the user, whole, from memory and disk: memory's newer state wins
        and nothing comes twice. Streams: only a few sessions are held at a time. Secrets
        are never in what `encode_record` makes of these."""
        self._require_running()
        uid = _require_user(user_id)
        in_memory = [s.id for s in self._hot._sessions_of(uid)]
        count = 0
        for sid in in_memory:
            session = self._in_memory.get(sid)
            if session is not None and session.user_id == uid:
                count += 1
                yield session.snapshot()
        seen = set(in_memory)
        async for record in self._backend.iter_user_sessions(uid):
            if record.id in seen:
                continue
            hot = self._in_memory.get(record.id)  # loaded meanwhile: memory is newer
            count += 1
            yield hot.snapshot() if hot is not None and hot.user_id == uid else record
        ACCESS.info("exported user=%s sessions=%d", uid, count)

    def export_user_json(self, user_id: UserId) -> AsyncIterator[bytes]:
        """The user's data as one JSON document, in pieces (the format: `writebehind.export`)."""
        return export_json(user_id, self.export_user(user_id))

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete sessions idle for longer than `retention_days`, from disk and memory, in
        small transactions; returns how many. Runs every `cleanup_interval_hours` on its
        own; an active session is never removed, even one whose disk row is stale."""
        self._require_running()
        cutoff = (now or utcnow()) - timedelta(days=self.config.retention_days)
        total = 0
        while True:
            deleted, removed = await self._worker.call(lambda: self._purge_chunk(cutoff))
            total += removed
            if deleted < _PURGE_CHUNK:
                break
        total += self._purge_memory(cutoff)
        self._purged += total
        self._last_cleanup_at = utcnow()
        LOG.info("retention: purged %d sessions idle since before %s", total, cutoff.isoformat())
        return total

    async def _purge_chunk(self, cutoff: datetime) -> tuple[int, int]:
        """One transaction of retention: (rows the disk deleted, sessions really removed)."""
        ids = await self._backend.purge_older_than(cutoff, limit=_PURGE_CHUNK)
        removed = 0
        for sid in ids:
            session = self._in_memory.get(sid)
            if session is not None and (session.last_access_at >= cutoff or self._dirty.holds(sid)):
                # Active in memory, only its disk row was old: write it back whole, as a
                # new row (this purge deleted the old one). Not counted as purged.
                session.version = 0
                self._dirty.mark_full(sid)
                continue
            if session is not None:
                self._forget(sid)
            removed += 1
        if ids:
            self._epoch += 1
        return len(ids), removed

    def _purge_memory(self, cutoff: datetime) -> int:
        """Signed-in sessions idle past the cutoff that are only in memory (clean, so they
        were on disk and just went): none should be left, but drop any that are."""
        stale = [
            sid
            for sid, s in self._in_memory.items()
            if s.user_id is not None and s.last_access_at < cutoff and not self._dirty.holds(sid)
        ]
        for sid in stale:
            self._forget(sid)
        return len(stale)

    async def backup(self, dest: str | Path) -> None:
        """Flush, then write a consistent online copy of the database to `dest` (0600),
        checked with `integrity_check`. Only for backends that can (SQLite)."""
        self._require_running()
        backup = getattr(self._backend, "backup", None)
        if backup is None:
            raise StorageError(f"{type(self._backend).__name__} has no backup; use the database's tools")
        await self.flush()
        await self._worker.call(lambda: backup(dest))
        LOG.info("backup written to %s", dest)

    # -- background housekeeping ---------------------------------------------------------------

    async def _housekeep(self) -> None:
        period = max(0.5, min(60.0, self.config.anon_ttl_seconds / 2))
        loop = asyncio.get_running_loop()
        cleanup_every = self.config.cleanup_interval_hours * 3600
        next_cleanup = loop.time()  # once at start, then on the interval
        while True:
            if loop.time() >= next_cleanup:
                next_cleanup = loop.time() + cleanup_every
                try:
                    await self.purge_expired()
                except WriteBehindError as exc:
                    LOG.warning("retention cleanup failed, retrying next time: %s", exc)
            await asyncio.sleep(min(period, max(0.0, next_cleanup - loop.time())))
            expired = 1000
            while expired == 1000:
                # In slices, yielding between them, so requests never wait behind a sweep.
                expired = self._hot._expire_idle(limit=1000)
                await asyncio.sleep(0)
