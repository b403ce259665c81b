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
- `aclose()` flushes everything and returns within `shutdown_timeout_seconds` (plus
  a second or two for a hung disk's threads): what the backend did not take by then
  goes to the recovery file, replayed by the next `start()`. Only if that fails too
  does `aclose()` raise, and `unsaved()` hands the caller the records. A cancelled
  `aclose()` still writes the recovery file before the cancellation goes on.
- Several instances on one PostgreSQL schema: a session has one owner at a time, and
  only the owner serves it from memory. A miss on a session another instance owns
  waits for it to be handed over (the owner flushes it and lets go; a reply it is
  producing under `hold()` is waited for), except a read, which meanwhile gets it
  flushed and reads it from the database. An owner that does not answer in time
  raises `OwnershipError`; a dead one's sessions are taken at once.
- Another writer of the same session (ownership lost in a partition, a replayed
  recovery file) never makes a write disappear: the version fence detects it and
  this instance's messages are merged after the winner's, re-sequenced and logged.
  An erasure that won is kept: the erased session is dropped here too.
- `delete_session` / `delete_user` are on disk when they return, and nothing queued
  or in flight can bring the data back.
- Back-pressure: when `max_dirty` sessions wait for the disk, a write that would
  dirty one more waits up to `backpressure_timeout_ms` for the worker, then raises
  `BackPressureError` having changed nothing. When the text the pending writes added
  reaches `max_dirty_bytes` (in code points), every write to a persisted session waits
  and is refused the same way, already-dirty ones included (a reply streaming into a
  session whose flush hangs): a write is let through below the bound, so the backlog
  exceeds it by one write at most. Writes to anonymous or temporary sessions are never
  refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, cast

from .backends.base import Backend, RecordError, SearchableBackend, SessionDelta
from .backups import BackupScheduler
from .branches import Branches, active_path
from .config import Config
from .dirty import DirtyIndex, Taken
from .errors import (
    BackPressureError,
    ClosedError,
    ConfigError,
    NotFound,
    OwnershipError,
    StorageError,
    ValidationError,
)
from .export import export_json
from .live import LiveView, Relay, Transport
from .merge import merge_sessions
from .model import (
    Metadata,
    SessionRecord,
    SessionSummary,
    StoredMessage,
    UserId,
    check_id,
    check_user_id,
    check_window,
    new_id,
    newest_first,
    require_user,
    utcnow,
)
from .ownership import Access, Holds, ownership_for
from .policy import (
    PREFERENCES_STATUS,
    PREFERENCES_TITLE,
    PersistencePolicy,
    UserPreferences,
    authenticated_only,
    check_keep_history,
    check_not_reserved,
    preferences_id,
    preferences_of,
)
from .recovery import read_recovery, recovery_path_for, scrub_recovery, write_recovery
from .search import Order, SearchPage, SearchRow, check_search, disk_window, memory_rows, merge_pages
from .stats import DiskMonitor, StoreStats, status_path_for
from .store import UNSET, Applied, Entry, SessionStore, SessionTree
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
# What aclose() allows beyond shutdown_timeout_seconds for the steps after the final
# flush: writing the recovery file and closing the backend (whose threads may hang).
_CLOSE_MARGIN_S: Final = 1.0
_REPLAY_ROUNDS: Final = 3
_INT64_MAX: Final = 2**63 - 1
# How often a handoff flushes a session that keeps being written (outside `hold()`) before
# it answers "held" rather than chase it.
_LET_GO_FLUSHES: Final = 2
# How often a miss takes a session again that was handed to another instance between its
# load and its use (each round is a handoff: in practice one is enough).
# A change that names no message (see `_write`): the relay compares only the count.
_NO_SEQ: Final = 2**62
_TAKE_ROUNDS: Final = 10
# How stale a user's preferences session's last_access_at may be on disk before a read takes
# it to move it (retention deletes what is idle for `retention_days`, at least one day).
_PREFERENCES_REFRESH: Final = timedelta(days=1)


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
        self._tier = hot.tier
        self._backend = backend
        self._policy = policy
        if recovery_path is None:
            recovery_path = config.recovery_path
        if recovery_path is None:
            db_path = getattr(backend, "path", None)
            recovery_path = recovery_path_for(Path(db_path)) if db_path is not None else None
        self._recovery_path = recovery_path
        self._dirty = DirtyIndex(self._tier)
        self._max_dirty = config.max_dirty
        self._max_dirty_bytes = config.max_dirty_bytes
        self._flush_batch = config.flush_batch
        self._worker = FlushWorker(
            backend,
            self._dirty,
            interval_s=config.flush_interval_ms / 1000,
            batch_sessions=config.flush_batch,
            max_flushes_per_second=config.max_flushes_per_second,
            retry_max_delay_s=config.retry_max_delay_ms / 1000,
            on_conflict=self._merge_conflicts,
        )
        self._merges = 0
        self._state = _NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loading: dict[str, asyncio.Task[bool]] = {}
        # Sessions deleted while a load of theirs was in flight: that load may have read
        # the row before the delete committed, so it must read again.
        self._stale_loads: set[str] = set()
        self._unsaved: list[SessionRecord] = []
        self._loads = 0
        self._cold_hits = 0
        self._rejections = 0
        self._housekeeping: asyncio.Task[None] | None = None
        # Several instances on one database (PostgreSQL): which sessions this one owns, and
        # the replies being produced here (a handoff waits for them).
        self._ownership = ownership_for(backend)
        self._holds = Holds()
        # Streams here following sessions other instances keep, and the followers of the
        # sessions kept here (see `live`); None with one instance per database.
        self._relay: Relay | None = None
        self._signal_handlers: list[Callable[[str, str], None]] = []
        # Sessions a miss is taking (`_own`), and how often each was let go meanwhile.
        self._watching: dict[str, int] = {}
        self._gone: dict[str, int] = {}
        self._purged = 0
        self._last_cleanup_at: datetime | None = None
        self._cleanup_failures = 0
        # The disk's figures for stats(), refreshed by the housekeeping (writebehind.stats),
        # and the scheduled backups (writebehind.backups; None unless backup_dir is set).
        db_file = getattr(backend, "path", None)
        self._monitor = DiskMonitor(
            getattr(backend, "disk_usage", None),
            status_path=None if db_file is None else status_path_for(Path(db_file)),
        )
        self._backups = BackupScheduler.from_config(config, db_file)

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

            backend = PostgresBackend(
                config.db_url,
                schema=config.db_schema,
                handoff_timeout_s=config.handoff_timeout_seconds,
                hold_timeout_s=config.hold_timeout_seconds,
            )
        else:
            backend = SQLiteBackend(
                config.db_path,
                synchronous=config.synchronous,
                busy_timeout_ms=config.busy_timeout_ms,
            )
        if config.encryption_key is not None or config.encryption_key_file is not None:
            # Imported only then: `cryptography` is the optional `encryption` extra.
            try:
                from .encryption import encrypted_backend
            except ImportError as exc:
                raise ConfigError(
                    "CHAT_SESSION_ENCRYPTION_KEY is set, but encryption needs the `cryptography` "
                    f"package ({exc.name} is missing): pip install 'writebehind[encryption]'"
                ) from exc

            backend = encrypted_backend(backend, config)
        elif config.db_url is None:
            # A file whose data keys exist holds ciphertext: served without its key, its
            # messages would come back as bytes, and new ones be written in the clear.
            keys = config.encryption_keys_path or config.db_path.with_name(config.db_path.name + ".keys")
            if keys.exists():
                raise ConfigError(
                    f"CHAT_SESSION_ENCRYPTION_KEY: {config.db_path} is encrypted (its keys are in "
                    f"{keys}); set the key (or CHAT_SESSION_ENCRYPTION_KEY_FILE) to open it"
                )
        # The recovery file: CHAT_SESSION_RECOVERY_PATH, else beside the SQLite file (for
        # PostgreSQL: beside db_path, on this machine).
        return cls(
            hot,
            backend,
            config=config,
            policy=policy,
            recovery_path=config.recovery_path or recovery_path_for(config.db_path),
        )

    @property
    def hot(self) -> SessionStore:
        return self._hot

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop `start()` ran on (None before): the one its worker and every call
        belong to. Sync code in another thread hands its calls to this loop (the framework
        adapters' sync forms do)."""
        return self._loop

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the backend (migrating it), replay a recovery file if one is there, take
        part in session ownership (PostgreSQL), start the worker. Raises
        `SchemaError`/`StorageError` and stays unstarted on failure."""
        if self._state == _RUNNING:
            return
        if self._state == _CLOSED:
            raise ClosedError("a closed store cannot be started again; make a new one")
        await self._backend.open()
        try:
            await self._replay_recovery()
            await self._ownership.start(self._let_go, self.flush)
        except BaseException:
            await self._backend.close()
            raise
        attach = getattr(self._ownership, "attach", None)
        if attach is not None:
            self._relay = Relay(
                cast(Transport, self._ownership), self._peek_messages, branches_of=self._peek_branches
            )
            self._relay.signal_handlers = self._signal_handlers
            attach(self._relay)
            self._relay.start()
        self._worker.start()
        self._housekeeping = asyncio.create_task(self._housekeep(), name="writebehind-housekeeping")
        if self._backups is not None:
            self._backups.start()
        self._loop = asyncio.get_running_loop()
        self._state = _RUNNING

    async def _replay_recovery(self) -> None:
        """Write a recovery file's sessions, merging each onto what the database holds now
        if another writer changed it since; a session the backend refuses outright is kept
        in a side file for a person, and the store starts all the same."""
        path = self._recovery_path
        if path is None or not path.exists():
            return
        pending = {r.id: r for r in read_recovery(path)}
        written = merged = 0
        refused: list[SessionRecord] = []
        for _ in range(_REPLAY_ROUNDS):
            if not pending:
                break
            # Truncated to the saved count: the disk may still hold messages popped after
            # its last flush.
            deltas = [
                SessionDelta(replace(r, messages=()), r.messages, len(r.messages), len(r.messages))
                for r in pending.values()
            ]
            try:
                result = await self._backend.write_batch(deltas)
            except RecordError:
                result = None
            if result is None:
                # One by one, to find the records the backend refuses.
                for delta in deltas:
                    try:
                        one = await self._backend.write_batch([delta])
                    except RecordError as exc:
                        LOG.error("recovery: session %s refused by the backend: %s", delta.record.id, exc)
                        refused.append(pending.pop(delta.record.id))
                        continue
                    written += len(one.versions)
                    for sid in one.versions:
                        pending.pop(sid, None)
                continue
            written += len(result.versions)
            for sid in result.versions:
                pending.pop(sid, None)
            for sid in result.conflicts:
                winner = await self._backend.load_session(sid)
                if winner is None:
                    # It was on disk and someone deleted it since (an erasure, through the
                    # command line while the app was down, or another instance): erasure
                    # wins, as it does for a flush.
                    LOG.warning("recovery: session %s was deleted since it was saved; not restored", sid)
                    del pending[sid]
                    continue
                pending[sid] = merge_sessions(winner, pending[sid]).record
                merged += 1
        refused.extend(pending.values())
        if refused:
            kept = path.with_name(f"{path.name}.refused-{int(time.time())}")
            write_recovery(kept, refused)
            LOG.error(
                "recovery: %d sessions could not be written (%s); kept in %s for a person to look at",
                len(refused),
                ", ".join(r.id for r in refused[:10]),
                kept,
            )
        path.unlink()
        LOG.warning(
            "replayed %d sessions from the recovery file %s (%d merged onto newer versions)",
            written,
            path,
            merged,
        )

    async def aclose(self) -> None:
        """Flush everything and close. Idempotent.

        Bounded: returns within `shutdown_timeout_seconds` plus about a second, even on a
        hung disk; whatever was not written by then goes to the recovery file. Cancelling
        it still leaves the recovery file written. Raises `StorageError` only if some
        sessions could be neither written nor saved to the recovery file (the message
        says how many; `unsaved()` returns them).
        """
        if self._state != _RUNNING:
            self._state = _CLOSED
            return
        self._state = _CLOSED
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout_seconds
        saved = False
        try:
            if self._backups is not None:
                # A copy in progress is only a reader: it gets a second at most, then is
                # left to end on its own (writebehind.backups).
                await self._backups.aclose(grace=min(1.0, max(0.0, deadline - loop.time())))
            if self._housekeeping is not None:
                # Whatever it raised was logged there; shutdown goes on regardless.
                self._housekeeping.cancel()
                await asyncio.wait([self._housekeeping])
            await self._worker.stop(grace=max(0.0, deadline - loop.time()))
            await self._final_flush(deadline)
            saved = True
            self._save_unsaved()
            # The app's last word for `writebehind stats` (its backups, failures), unless
            # the disk hangs: a status file is never worth a shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, min(1.0, deadline - loop.time()))):
                    await self._monitor.report(self.stats)
        finally:
            if not saved:
                # Cancelled, or something unexpected: the recovery file all the same, at
                # once (a blocking write of a few files, at shutdown), then go on raising.
                self._save_unsaved(quiet=True)
                self._worker.cancel()  # it must not go on writing to a closed backend
            # Everything is on disk (or in the recovery file): the others may have it all.
            if self._relay is not None:
                await self._relay.aclose()
            await self._ownership.close()
            await self._close_backend()

    async def _close_backend(self) -> None:
        task = asyncio.ensure_future(self._backend.close())
        done, _ = await asyncio.wait([task], timeout=_CLOSE_MARGIN_S)
        if not done:
            task.cancel()
            LOG.error("the backend did not close within %.1fs (a hung disk?); abandoned", _CLOSE_MARGIN_S)
        elif not task.cancelled() and task.exception() is not None:
            LOG.error("closing the backend failed: %s", task.exception())

    def unsaved(self) -> list[SessionRecord]:
        """The sessions the last `aclose()` could neither write nor save to the recovery file
        (empty when it returned normally): the caller's last chance to keep them."""
        return list(self._unsaved)

    async def _abandon(self) -> None:
        """Stop as a SIGKILL would: no final flush, nothing saved. For crash tests only."""
        self._state = _CLOSED
        if self._backups is not None:
            await self._backups.aclose(grace=0)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.wait([self._housekeeping])
        await self._worker.abandon()
        if self._relay is not None:
            await self._relay.aclose(tell=False)
        await self._ownership.abandon()
        await self._backend.close()

    async def _final_flush(self, deadline: float) -> None:
        """Flush until nothing is dirty or the deadline passes; a hung write is cancelled at
        the deadline (its batch goes back to the dirty index)."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        while len(self._dirty) > len(self._dirty.poisoned()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._worker.flush_all(throttle=False)
            except TimeoutError:
                LOG.error("the final flush did not finish within shutdown_timeout_seconds")
                break
            except Exception as exc:  # any failure: the recovery file takes what is left
                LOG.warning("final flush failed (%s); retrying until shutdown_timeout_seconds", exc)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    def _save_unsaved(self, *, quiet: bool = False) -> None:
        """Write every session not known to be on disk to the recovery file. Synchronous on
        purpose: it must also run where no await can (a cancelled aclose)."""
        records = [entry.snapshot() for entry in self._dirty.unsaved()]
        if not records:
            return
        problem = None
        if self._recovery_path is None:
            problem = "no recovery file is configured"
        else:
            try:
                write_recovery(self._recovery_path, records)
            except (OSError, ValueError, StorageError) as exc:
                problem = f"the recovery file {self._recovery_path} could not be written ({exc})"
        if problem is None:
            LOG.error(
                "the backend did not take %d sessions at shutdown; saved to %s for the next start",
                len(records),
                self._recovery_path,
            )
            self._unsaved = []
            return
        self._unsaved = records
        message = (
            f"{len(records)} sessions could not be saved: the backend refused them and {problem}; "
            "WriteBehindStore.unsaved() returns them"
        )
        LOG.critical(message)
        if not quiet:
            raise StorageError(message)

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

    async def _ready(
        self,
        session_id: str,
        user_id: UserId | None,
        *,
        creating: bool = False,
        reading: bool = False,
        follow: bool = False,
    ) -> SessionRecord | None:
        """Make sure the session is in memory, owned by this instance, if it exists anywhere.
        Suspends only on a miss. The caller goes on without an await in between, so no
        handoff can take the session away before it is used.

        `reading`: a session another instance keeps (a reply is streaming into it there) is
        not taken; its owner flushes it and this returns it as read from the database (kept
        out of memory). Otherwise returns None.
        """
        self._require_running()
        if type(session_id) is str and session_id in self._tier:
            return None
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        # Creating with a chosen id must see a persisted session of that id, whoever asks,
        # or an anonymous caller could shadow a signed-in user's session in memory.
        if creating or self._policy(sid, uid):
            return await self._own(sid, reading, follow)
        return None

    async def _own(self, sid: str, reading: bool, follow: bool = False) -> SessionRecord | None:
        """`_ready`'s miss: take the session (its owner elsewhere hands it over) and load it.
        Between the load's end and this caller's turn another instance may have been handed
        it: then it is taken again, never used (or created) unowned."""
        watching = self._watching
        watching[sid] = watching.get(sid, 0) + 1
        try:
            for _ in range(_TAKE_ROUNDS):
                gone = self._gone.get(sid, 0)
                owned = False
                if reading:
                    if follow and self._relay is not None:
                        self._relay.begin(sid)
                    if await self._ownership.acquire(sid, reading=True, follow=follow) is Access.ELSEWHERE:
                        return await self._backend.load_session(sid)
                    owned = True
                found = await self._load(sid, owned=owned)
                if sid in self._tier:
                    return None
                if not found and self._gone.get(sid, 0) == gone:
                    return None  # nowhere: the caller creates it, or it is not found
                # Loaded, then pushed out of the LRU by other loads before this caller's turn
                # (a small hot tier under many cold requests), or handed away: again.
        finally:
            left = watching[sid] - 1
            if left:
                watching[sid] = left
            else:
                del watching[sid]
                self._gone.pop(sid, None)
        raise OwnershipError(sid, f"handed to other instances {_TAKE_ROUNDS} times before it could be used")

    async def _load(self, session_id: str, *, owned: bool = False) -> bool:
        """Load the session into memory (one load however many callers ask); whether the
        database had it."""
        task = self._loading.get(session_id)
        if task is None:
            task = asyncio.create_task(self._do_load(session_id, owned), name="writebehind-load")
            self._loading[session_id] = task
            task.add_done_callback(lambda _: self._loading.pop(session_id, None))
        # Shielded: a caller that gives up does not cancel the others' load.
        return await asyncio.shield(task)

    async def _do_load(self, session_id: str, owned: bool = False) -> bool:
        """Own the session (another instance hands it over first), then load it."""
        try:
            if not owned:
                await self._ownership.acquire(session_id)
            while True:
                self._stale_loads.discard(session_id)
                self._loads += 1
                record = await self._backend.load_session(session_id)
                if session_id in self._stale_loads:
                    continue  # deleted meanwhile: what we read may be gone
                if record is not None and session_id not in self._tier:
                    self._cold_hits += 1
                    if record.user_id is None:
                        # An anonymous session (a policy persisted it) comes back without
                        # its binding token, which is never stored: seal it, so that no
                        # anonymous caller who merely knows its id can open it.
                        record = replace(record, user_binding_token=secrets.token_urlsafe(32))
                    self._tier.insert(record)
                return record is not None
        finally:
            self._stale_loads.discard(session_id)

    def _deleted(self, session_ids: Iterable[str]) -> None:
        """These sessions' rows are gone: a load of one of them in flight reads again."""
        loading = self._loading
        for sid in session_ids:
            if sid in loading:
                self._stale_loads.add(sid)

    async def _admit(
        self, session_id: str, user_id: UserId | None, creating: bool = False, transient: bool = False
    ) -> None:
        """`_ready`, plus back-pressure for a write that would dirty one more session, or for
        any write while the text waiting for the disk is at `max_dirty_bytes` (`transient`:
        it creates a temporary one, which is never dirty)."""
        await self._ready(session_id, user_id, creating=creating)
        dirty = self._dirty
        if (
            dirty.bytes < self._max_dirty_bytes
            and (dirty.backlog() < self._max_dirty or dirty.holds(session_id))
            and (dirty.poisoned_bytes < self._max_dirty_bytes or not dirty.is_poisoned(session_id))
        ):
            return
        session = self._tier.peek(session_id)
        if transient or not (
            self._policy(session_id, user_id) if session is None else self._persists(session)
        ):
            return
        await self._make_room(session_id)
        await self._ready(session_id, user_id, creating=creating)

    async def _make_room(self, session_id: str | None = None) -> None:
        """Kick the worker and wait until the backlog is below both bounds, for at most
        `backpressure_timeout_ms`; then `BackPressureError`. The sessions bound lets a write
        to `session_id` through if that session is already counted (None: a new one)."""
        dirty = self._dirty
        timeout = self.config.backpressure_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Checked again after every wake: the session may have left the backlog meanwhile.
            # A session the disk refuses for good is bounded by the text of such sessions.
            over_bytes = dirty.bytes >= self._max_dirty_bytes or (
                session_id is not None
                and dirty.is_poisoned(session_id)
                and dirty.poisoned_bytes >= self._max_dirty_bytes
            )
            over_sessions = dirty.backlog() >= self._max_dirty and (
                session_id is None or not dirty.holds(session_id)
            )
            if not (over_bytes or over_sessions):
                return
            self._worker.kick()
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._rejections += 1
                over = []
                if over_sessions:
                    over.append(f"{dirty.backlog()} sessions (max_dirty={self.config.max_dirty})")
                if over_bytes and dirty.bytes >= self._max_dirty_bytes:
                    over.append(f"{dirty.bytes} characters of text (max_dirty_bytes={self._max_dirty_bytes})")
                elif over_bytes:
                    over.append(
                        f"{dirty.poisoned_bytes} characters of text of sessions the disk refuses, this "
                        f"one among them (max_dirty_bytes={self._max_dirty_bytes})"
                    )
                raise BackPressureError(
                    f"{' and '.join(over)} are waiting for the disk; the write was not applied, retry later"
                )
            # Woken whenever the backlog shrinks: a batch committed, a delete, an erasure.
            try:
                async with asyncio.timeout(remaining):
                    await self._dirty.room.wait()
            except TimeoutError:
                pass

    def _hot_now(self, session_id: object) -> bool:
        """The fast path: running, in memory, no back-pressure. Then nothing awaits."""
        return (
            self._state is _RUNNING
            and type(session_id) is str
            and session_id in self._tier
            and self._dirty.backlog() < self._max_dirty
            and self._dirty.bytes < self._max_dirty_bytes
            and self._dirty.poisoned_bytes < self._max_dirty_bytes
        )

    def _persists(self, session: Entry) -> bool:
        """Whether the session is ever written: never a temporary one, whatever the policy."""
        return not session.temporary and self._policy(session.id, session.user_id)

    async def _write(
        self,
        session_id: str | None,
        user_id: UserId | None,
        durable: bool,
        apply: Callable[..., Applied],
        *args: Any,
        creating: bool = False,
        transient: bool = False,
        size: int = 0,
        metadata: bool = False,
    ) -> Any:
        """The one path of every write: admit (load on a miss, back-pressure), apply to the
        hot tier (`apply(session_id, *args)`, one of `SessionStore.do_*`), mark what it
        changed, and wait for the disk only if `durable`. Returns the caller's result.

        `size`: the text the write adds (code points), counted against `max_dirty_bytes`
        until it is on disk; `metadata`: the result is a message whose metadata the write
        set, its JSON counted too (known only once `apply` has encoded it).

        A bound method and its arguments rather than a closure: this is the hot path of
        every streamed token (a closure cost about 0.4 us a call here).
        """
        if session_id is None:
            # A fresh random id: nothing on disk to look for.
            self._require_running()
            session_id = new_id()
            # A temporary session is owned by no one but this instance's memory, as an
            # anonymous one: nothing to register, no back-pressure (it is never dirty).
            if not transient and self._policy(session_id, user_id):
                # Owned before anyone can know the id, so that another instance asked for
                # it right after finds it here (no row until the first flush).
                await self._ownership.acquire(session_id)
                if self._dirty.backlog() >= self._max_dirty or self._dirty.bytes >= self._max_dirty_bytes:
                    await self._make_room()
                # aclose() may have begun while this waited: its final flush would not see
                # a write applied now, so refuse it rather than acknowledge it and lose it.
                self._require_running()
        elif not self._hot_now(session_id):
            await self._admit(session_id, user_id, creating=creating, transient=transient)
            self._require_running()  # the same, after a load or back-pressure
        entry, seq, full, result = apply(session_id, *args)
        if metadata:
            size += len(result.metadata_json or "")
        relay = self._relay
        if relay is not None and session_id in relay.followers:
            # No seq: a change of the session's row, or a pop (the relay sees fewer messages).
            relay.changed(session_id, _NO_SEQ if seq is None else seq)
        if self._wrote(entry, seq, full, size) and durable:
            await self._worker.sync()
        return result

    def _wrote(self, session: Entry, seq: int | None = None, full: bool = False, size: int = 0) -> bool:
        """Mark what a write changed (`size`: the text it added), if this session persists;
        True if it does."""
        if session.temporary or not self._policy(session.id, session.user_id):
            return False
        if self._dirty.mark(session.id, seq, full, size) >= self._flush_batch:
            self._worker.kick()
        return True

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
        persist: bool | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """`SessionStore.ensure_session`. A temporary session (`persist=False`, or `None` for a
        user whose preference is `keep_history=False`) is never written: not by the worker,
        `flush()`, `durable=True`, `aclose()` or its recovery file, nor after a `claim`; it is
        served by this instance only (like an anonymous one), expires after
        `anon_ttl_seconds` idle, and is in `list_sessions` and `export_user` while it exists."""
        check_not_reserved(session_id)
        if persist is not None and type(persist) is not bool:
            raise ValidationError("persist", f"must be a bool or None, not {type(persist).__name__}")
        keep = True
        exists = type(session_id) is str and session_id in self._tier
        if persist is None and user_id is not None and not exists:
            # Creating, most likely: the user's default decides (one read of their
            # preferences session, from memory once loaded; never on a token's path).
            keep = (await self.user_preferences(user_id)).keep_history
        entry: Entry = await self._write(
            session_id,
            user_id,
            durable,
            self._hot.do_ensure,
            user_id,
            title,
            status,
            client_ip,
            user_agent,
            binding_token,
            csrf_token,
            persist,
            keep,
            creating=True,
            transient=persist is False or (persist is None and not keep),
            # The title, if this creates the session (a session loaded from disk meanwhile
            # counts it once, until the next flush: an estimate may err on the safe side).
            size=len(title) if isinstance(title, str) and not exists else 0,
        )
        return entry.snapshot()

    async def get_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionRecord:
        if not self._hot_now(session_id):
            elsewhere = await self._ready(session_id, user_id, reading=True)
            if elsewhere is not None:
                return self._read_elsewhere(session_id, user_id, elsewhere)
        session = self._hot.owned(session_id, user_id, binding_token)
        self._dirty.touch(session)
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
        elsewhere = None
        if not self._hot_now(session_id):
            elsewhere = await self._ready(session_id, user_id, reading=True)
        start, count = check_window(after_seq, limit)
        if elsewhere is not None:
            record = self._read_elsewhere(session_id, user_id, elsewhere)
            path = active_path(record.messages, record.branches, start)
            return tuple(path if count is None else path[:count])
        session = self._hot.owned(session_id, user_id, binding_token)
        self._dirty.touch(session)
        # DEBUG: a streaming client reads a session once a token; `get_session`, exports and
        # erasures are the INFO-level record of who read what.
        if ACCESS.isEnabledFor(logging.DEBUG):
            ACCESS.debug("read messages session=%s user=%s after_seq=%s", session_id, user_id, after_seq)
        return session.window(start, count)

    async def get_tree(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> SessionTree:
        """`SessionStore.get_tree`: the session without its messages, and where they branch,
        read the way `get_messages` reads it (a session another instance keeps: from the
        database, after its owner flushed it). O(1) when it is in memory here."""
        if not self._hot_now(session_id):
            elsewhere = await self._ready(session_id, user_id, reading=True)
            if elsewhere is not None:
                return SessionTree.of(self._read_elsewhere(session_id, user_id, elsewhere))
        session = self._hot.owned(session_id, user_id, binding_token)
        self._dirty.touch(session)
        return SessionTree.of(session)

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
        """Append a message after the end of the active path, or after `parent_seq` to
        start an alternative (see `SessionStore.append_message`)."""
        message: StoredMessage = await self._write(
            session_id,
            user_id,
            durable,
            self._hot.do_append,
            user_id,
            role,
            content,
            message_id,
            metadata,
            binding_token,
            parent_seq,
            size=len(content) if isinstance(content, str) else 0,
            metadata=metadata is not None,
        )
        return message

    async def pop_message(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> StoredMessage | None:
        """Remove the last message of the active path and return it (None if there is none).

        The session's last message is deleted and its `seq` is re-used by the next append,
        so seqs stay gap-free; an SSE client that had the popped message must be told to
        drop it (its event id now names another). In a session whose active path ends
        before its last message, the path's end only leaves the path (see
        `SessionStore.pop_message`).
        Acknowledged from memory like any write; with `durable=True` it returns once the
        message is gone from disk too.
        """
        message: StoredMessage | None = await self._write(
            session_id, user_id, durable, self._do_pop, user_id, binding_token
        )
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
        """Make the active path go through message `seq`, on to its most recent
        continuation, and return it. Writes the session row only (nothing is copied)."""
        path: tuple[StoredMessage, ...] = await self._write(
            session_id, user_id, durable, self._hot.do_switch, user_id, seq, binding_token
        )
        return path

    def _do_pop(self, session_id: str, user_id: UserId | None, binding_token: str | None) -> Applied:
        """`SessionStore.do_pop`, and the dirty index told what to delete on disk."""
        applied = self._hot.do_pop(session_id, user_id, binding_token)
        entry, _, _, message = applied
        # Only a message that left the session is deleted on disk (see `SessionStore.pop_message`).
        if message is not None and message.seq > len(entry.messages) and self._persists(entry):
            self._dirty.truncate(entry.id, message.seq - 1)
        return applied

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
        message: StoredMessage = await self._write(
            session_id,
            user_id,
            durable,
            self._hot.do_update_message,
            message_id,
            user_id,
            content,
            append,
            metadata,
            binding_token,
            # The token (or the new text): O(1) on the path of every streamed token.
            size=len(append) if isinstance(append, str) else len(content) if isinstance(content, str) else 0,
            metadata=metadata is not UNSET,
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
        entry: Entry = await self._write(
            session_id,
            user_id,
            durable,
            self._hot.do_update_session,
            user_id,
            status,
            title,
            binding_token,
            size=len(title) if isinstance(title, str) else 0,
        )
        return entry.snapshot()

    async def claim(
        self,
        session_id: str,
        *,
        user_id: UserId,
        binding_token: str | None = None,
        durable: bool = False,
    ) -> SessionRecord:
        """Hand an anonymous session to the user who signed in; from now on it persists whole
        (a temporary one stays temporary: never written, this instance's only)."""
        require_user(user_id)
        entry = self._tier.peek(session_id) if type(session_id) is str else None
        size = 0
        if entry is not None and not entry.temporary:
            # From now on it persists: owned here before another instance can ask for it.
            # (A temporary session never does: it stays this instance's, in memory.)
            await self._ownership.acquire(session_id)
            # Its whole history becomes text waiting for the disk: counted against
            # `max_dirty_bytes` like any write (a pass over it, once, at a sign-in).
            size = len(entry.title or "") + sum(
                len(m.content) + len(m.metadata_json or "") for m in entry.messages
            )
            # Back-pressure as for any write that dirties a session: `_write` would not
            # apply it, the session being anonymous (never written) until this call.
            dirty = self._dirty
            if self._policy(session_id, user_id) and (
                dirty.bytes >= self._max_dirty_bytes or dirty.backlog() >= self._max_dirty
            ):
                await self._make_room(session_id)
        claimed: Entry = await self._write(
            session_id, user_id, durable, self._hot.do_claim, user_id, binding_token, size=size
        )
        return claimed.snapshot()

    def is_temporary(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> bool:
        """Whether the caller's session is in memory here and temporary (no I/O)."""
        return self._hot.is_temporary(session_id, user_id=user_id, binding_token=binding_token)

    async def user_preferences(self, user_id: UserId) -> UserPreferences:
        """The user's preferences (the defaults if they never set any)."""
        self._require_running()
        uid = require_user(user_id)
        sid = preferences_id(uid)
        entry = self._tier.peek(sid)
        if entry is not None:
            if not entry.owned_by(uid, None):
                return UserPreferences()
            # Read like a session (LRU, last_access_at): retention keeps it while in use.
            self._dirty.touch(self._hot.owned(sid, uid, None))
            return preferences_of(entry.messages)
        if not self._policy(sid, uid):
            return UserPreferences()  # this store never writes it: nothing to read
        # Not in memory here: read from the database without taking it. Setting it is
        # durable, so the database has the last value set on any instance; taking it instead
        # passed it to and fro between instances creating sessions for one user at once.
        record = await self._backend.load_session(sid)
        if record is None or record.user_id != uid:
            return UserPreferences()
        if utcnow() - record.last_access_at >= _PREFERENCES_REFRESH:
            # Once a day at most: take it and mark it read, so that retention (idle days)
            # never deletes the setting of a user who is active. A failure only postpones it.
            with contextlib.suppress(StorageError):
                await self._ready(sid, uid)
                taken = self._tier.peek(sid)
                if taken is not None and taken.owned_by(uid, None):
                    self._dirty.touch(self._hot.owned(sid, uid, None))
        return preferences_of(record.messages)

    async def set_user_preferences(self, user_id: UserId, *, keep_history: bool) -> UserPreferences:
        """Set the user's preferences; on disk when it returns. `keep_history=False`: their
        new sessions are temporary unless created with `persist=True` (existing sessions
        keep what they are). Stored as a session of the user's own (`policy.preferences_id`),
        which `list_sessions` leaves out and `delete_user` erases; back to the default
        (`keep_history=True`) it is deleted, so a user who never opted out has nothing stored."""
        self._require_running()
        uid = require_user(user_id)
        check_keep_history(keep_history)
        sid = preferences_id(uid)
        if keep_history:
            with contextlib.suppress(NotFound):
                # Taken first: another instance may hold it in memory, and would go on
                # reading it there after a delete of the row alone.
                await self._ready(sid, uid)
                await self.delete_session(sid, user_id=uid)
            return UserPreferences(keep_history=True)
        # Through the one write path, as a kept session: created if need be (`persist=True`
        # whatever the current default), then the value in its one message's metadata.
        entry: Entry = await self._write(
            sid, uid, False, self._hot.do_ensure, uid, PREFERENCES_TITLE, PREFERENCES_STATUS,
            None, None, None, None, True, True, creating=True,
        )  # fmt: skip
        value: Metadata = {"keep_history": False}
        if entry.messages:
            last = entry.messages[-1].id
            await self._write(sid, uid, True, self._hot.do_update_message, last, uid, None, None, value, None)
        else:
            await self._write(sid, uid, True, self._hot.do_append, uid, "system", "", None, value, None)
        return UserPreferences(keep_history=False)

    async def list_sessions(
        self, user_id: UserId, *, limit: int | None = None, offset: int = 0
    ) -> list[SessionSummary]:
        """The user's sessions from memory and disk (memory's newer state wins), newest first;
        temporary ones included while they exist, the user's preferences session never."""
        self._require_running()
        check_window(offset, limit, "offset")
        in_memory = await self._hot.list_sessions(user_id)  # validates user_id
        if user_id is None:
            return []
        # Any session in the merged top (offset + limit) is either in memory or within the
        # disk's top (offset + limit + len(in_memory)): in-memory rows can only displace.
        # One more: the user's preferences session (never listed) may be among them.
        want = None if limit is None else offset + limit + len(in_memory) + 1
        if want is not None and want > _INT64_MAX:
            want = None  # past any table's size: the same as no limit, and SQL takes it
        on_disk = await self._backend.list_sessions(user_id, limit=want, offset=0)
        merged = {s.id: s for s in on_disk}
        merged.update((s.id, s) for s in in_memory)
        merged.pop(preferences_id(user_id), None)
        ordered = sorted(merged.values(), key=newest_first)
        return ordered[offset : None if limit is None else offset + limit]

    async def search(
        self,
        user_id: UserId,
        query: str,
        *,
        limit: int = 20,
        offset: int = 0,
        order: str = "relevance",
    ) -> SearchPage:
        """The user's messages holding every word of `query` (case-insensitive substrings,
        any script), with snippets, best (`"relevance"`) or newest first, a page at a time
        (`SearchPage.next_offset`). Sessions held in memory are searched there (their
        unflushed messages included) and left out of the disk's answer: nothing twice.
        `query` is words, never a query language. `ValidationError` names a bad argument;
        a backend without `search` (e.g. one that only sees ciphertext) raises StorageError.
        """
        self._require_running()
        uid = require_user(user_id)
        words = check_search(query, limit, offset, order)
        # Looked up on the class: a wrapper that forwards unknown attributes to the backend
        # it wraps (encryption) must not pass for one that can search its own data.
        if getattr(type(self._backend), "search", None) is None:
            raise StorageError(f"{type(self._backend).__name__} does not support search")
        ordering = cast(Order, order)
        hot = [e for e in self._tier.sessions_of(uid) if e.id != preferences_id(uid)]
        in_memory = memory_rows(((e.id, e.title, list(e.messages)) for e in hot), words)
        want, skip = disk_window(limit=limit, offset=offset)
        on_disk: list[SearchRow] = await cast(SearchableBackend, self._backend).search(
            uid, words, limit=want, offset=skip, order=ordering, exclude={e.id for e in hot}
        )
        return merge_pages(in_memory, on_disk, words, limit=limit, offset=offset, order=ordering)

    async def delete_session(
        self, session_id: str, *, user_id: UserId | None, binding_token: str | None = None
    ) -> None:
        """Delete the caller's session from memory and disk; durable when it returns."""
        self._require_running()
        sid = check_id("session_id", session_id)
        uid = check_user_id(user_id)
        session = self._tier.peek(sid)
        if session is not None and not session.owned_by(uid, binding_token):
            raise NotFound(sid)
        if session is not None and not self._persists(session):
            # Never on disk: memory is all there is.
            await self._hot.delete_session(sid, user_id=uid, binding_token=binding_token)
            return
        if session is None and (uid is None or not self._policy(sid, uid)):
            # Not in memory: the disk row is deleted by id and owner, and an anonymous
            # caller owns no row there (persisted anonymous sessions come back sealed).
            raise NotFound(sid)

        async def erase() -> bool:
            self._stop_backup_copy()
            on_disk = await self._backend.delete_session(sid, uid)
            current = self._tier.peek(sid)
            in_memory = current is not None and current.owned_by(uid, binding_token)
            if in_memory:
                self._forget(sid)
            if on_disk or in_memory:
                self._deleted([sid])
            kept = self._scrub_recovery(lambda record: record.id == sid and record.user_id == uid)
            return on_disk or in_memory or bool(kept)

        if not await self._worker.call(erase):
            raise NotFound(sid)
        ACCESS.info("erased session=%s user=%s", sid, uid)

    async def delete_user(self, user_id: UserId) -> int:
        """Erase every session of the user from memory and disk; returns how many there were."""
        self._require_running()
        uid = require_user(user_id)

        async def erase() -> int:
            self._stop_backup_copy()
            on_disk = set(await self._backend.delete_user(uid))
            in_memory = {s.id for s in self._tier.remove_user(uid)}
            for sid in in_memory:
                self._dirty.discard(sid)
            self._deleted(on_disk | in_memory)
            kept = self._scrub_recovery(lambda record: record.user_id == uid)
            return len(on_disk | in_memory | kept)

        count = await self._worker.call(erase)
        ACCESS.info("erased user=%s sessions=%d", uid, count)
        return count

    def _stop_backup_copy(self) -> None:
        """Before an erasure: a scheduled backup still copying holds a snapshot that the
        erasure's truncating checkpoint would wait for (up to `busy_timeout`, the erased
        pages left in the WAL meanwhile). It stops within a step, leaves no file, and is
        made again a minute later, after the erasure."""
        if self._backups is not None and self._backups.interrupt():
            LOG.info("a backup copy was stopped for an erasure; it is made again shortly")

    async def _merge_conflicts(self, lost: list[Taken]) -> list[str]:
        """Another writer changed these sessions since this instance last read them (the
        flush worker found their versions moved). Merge this instance's messages after the
        winner's and return the ids to write again; a session the winner deleted (an
        erasure elsewhere) is dropped here too. Never a silent side channel: each is logged.
        """
        again: list[str] = []
        for taken in lost:
            sid = taken.delta.record.id
            entry = self._tier.peek(sid)
            if entry is not taken.session:
                continue  # deleted or replaced meanwhile
            winner = await self._backend.load_session(sid)
            if self._tier.peek(sid) is not entry:
                continue
            self._merges += 1
            if winner is None:
                LOG.warning("session %s was deleted by another writer; dropped here too", sid)
                self._forget(sid)
                self._deleted([sid])
                continue
            merged = merge_sessions(winner, entry.snapshot())
            replacement = self._tier.insert(merged.record)
            self._dirty.adopt(replacement, winner.version)
            self._dirty.mark_full(sid)
            again.append(sid)
            LOG.warning(
                "session %s was also written by another writer (version %d): %d of this "
                "instance's messages appended after its %d (%d re-numbered), %d edits kept",
                sid,
                winner.version,
                merged.appended,
                len(winner.messages),
                merged.resequenced,
                merged.updated,
            )
        return again

    def _scrub_recovery(self, erased: Callable[[SessionRecord], bool]) -> set[str]:
        """Erasure reaches the copies a failed shutdown or replay kept on disk (the recovery
        file, its `.refused-*` files): returns the ids removed there."""
        path = self._recovery_path
        if path is None:
            return set()
        found: set[str] = set()

        def pick(record: SessionRecord) -> bool:
            if erased(record):
                found.add(record.id)
                return True
            return False

        try:
            scrub_recovery(path, pick)
        except (OSError, StorageError) as exc:
            LOG.error("erasure could not reach the recovery files beside %s: %s", path, exc)
        return found

    def _forget(self, session_id: str) -> None:
        self._dirty.discard(session_id)
        self._tier.remove(session_id)
        if self._relay is not None:
            self._relay.dropped(session_id)

    # -- live streams (several instances) ------------------------------------------------------

    def _peek_messages(self, session_id: str) -> list[StoredMessage] | None:
        """What the relay sends followers on other instances: nothing of a session that is
        never written (temporary, or anonymous), whose text must not leave this process
        (a NOTIFY goes through the database server, and may spill to its disk)."""
        entry = self._tier.peek(session_id)
        return None if entry is None or not self._persists(entry) else entry.messages

    def _peek_branches(self, session_id: str) -> Branches | None:
        entry = self._tier.peek(session_id)
        return None if entry is None else entry.branches

    def on_signal(self, handler: Callable[[str, str], None]) -> None:
        """Call `handler(session_id, name)` when another instance `signal()`s a session kept
        here (with one instance per database nothing ever arrives)."""
        self._signal_handlers.append(handler)

    async def signal(self, session_id: str, name: str) -> bool:
        """Send the app's signal `name` (an identifier, e.g. "stop") to the instance that
        keeps the session, if another one does; whether one was told. Fire and forget: the
        receiver's handler acts on it as it sees fit. Raises StorageError."""
        sid = check_id("session_id", session_id)
        if not name.isidentifier():
            raise ValidationError("name", "must be an identifier")
        if self._relay is None:
            return False
        return await cast(Transport, self._ownership).signal(sid, name)

    def kept_elsewhere(self, session_id: str) -> bool:
        """Whether the session's last read here came from another instance that keeps it
        (a reply is being written there): only possible with several instances sharing a
        database. A reply read that way that is not done is being written, not cut."""
        return self._relay is not None and session_id not in self._tier

    @contextlib.asynccontextmanager
    async def follow(
        self,
        session_id: str,
        *,
        user_id: UserId | None,
        on_change: Callable[[str], None],
        binding_token: str | None = None,
    ) -> AsyncIterator[LiveView]:
        """`async with store.follow(sid, user_id=..., on_change=...) as view:` for a stream
        of the session: `await view.messages(after_seq)` reads it, `on_change(sid)` is
        called when another instance that keeps it changed it (changes made here are the
        app's to announce). With one instance per database it is `get_messages`."""
        sid = check_id("session_id", session_id)
        view = LiveView(sid, user_id, binding_token, self._followed_messages)
        relay = self._relay
        if relay is None:
            yield view
            return
        relay.listen(sid, on_change)
        try:
            yield view
        finally:
            relay.unlisten(sid, on_change)

    async def _followed_messages(self, view: LiveView, after_seq: int) -> tuple[StoredMessage, ...]:
        sid, relay = view.session_id, self._relay
        for _ in range(_TAKE_ROUNDS):
            if relay is None or self._hot_now(sid):
                break
            replica = relay.replica(sid)
            if replica is not None and not replica.stale and not replica.loading:
                if replica.user_id is None or replica.user_id != view.user_id:
                    raise NotFound(sid)
                view.remote = True
                check_window(after_seq, None)
                return tuple(active_path(replica.messages, replica.branches, after_seq))
            record = await self._ready(sid, view.user_id, reading=True, follow=True)
            if record is None:
                break  # kept here now (or nowhere: NotFound below)
            owner = cast(Transport, self._ownership).kept_by(sid)
            relay.adopt(sid, self._read_elsewhere(sid, view.user_id, record), owner)
        view.remote = False
        if relay is not None:
            relay.discard(sid)
        return await self.get_messages(
            sid, user_id=view.user_id, after_seq=after_seq, binding_token=view.binding_token
        )

    # -- several instances (PostgreSQL): ownership ---------------------------------------------

    @staticmethod
    def _read_elsewhere(session_id: str, user_id: UserId | None, record: SessionRecord) -> SessionRecord:
        """A session read from the database while another instance keeps it: the caller's
        (signed in: anonymous sessions are not shared), or the `NotFound` of a missing one."""
        if record.user_id is None or record.user_id != user_id:
            raise NotFound(session_id)
        if ACCESS.isEnabledFor(logging.INFO):
            ACCESS.info("read session=%s user=%s (kept by another instance)", session_id, user_id)
        return record

    def hold(self, session_id: str) -> AbstractAsyncContextManager[None]:
        """`async with store.hold(session_id):` around producing a reply into the session.

        While held, this instance keeps the session: another instance that needs it for a
        write waits until the last hold ends (then the session is flushed and handed over);
        one that reads it meanwhile gets it flushed and reads it from the database. Costs a
        dict update, no I/O; any number of holds may overlap. Does not load the session.
        With one instance per database (SQLite) it changes nothing.
        """
        return self._holds(check_id("session_id", session_id))

    def _went(self, session_id: str) -> None:
        """The session was let go: a miss taking it meanwhile takes it again."""
        if self._relay is not None:
            self._relay.dropped(session_id)
        if session_id in self._watching:
            self._gone[session_id] = self._gone.get(session_id, 0) + 1

    async def _let_go(self, session_id: str, wait: bool) -> bool:
        """Another instance asks for the session: flush it and drop it from the hot tier.

        Returns True once it is neither in memory nor being loaded here; from that return
        to the ownership's release of it there is no await. A session a reply is streaming
        into (`hold()`) is kept until its holds end; with `wait` False it is only flushed
        and False returned (also for one that keeps being written outside a hold). Raises
        what the flush raises (StorageError): the session stays here.
        """
        flushes = 0
        while True:
            load = self._loading.get(session_id)
            if load is not None and not load.done():
                await asyncio.wait([load])
                continue
            entry = self._tier.peek(session_id)
            if entry is None or not self._persists(entry):
                # Not here (evicted: the claim was kept lazily), or never persisted (an
                # anonymous session of this instance only): nothing to hand over.
                self._went(session_id)
                return True
            held = self._holds.held(session_id)
            if held and wait:
                await self._holds.ended(session_id)
                continue
            if self._dirty.holds(session_id):
                if session_id in self._dirty.poisoned():
                    raise StorageError(
                        f"session {session_id!r} cannot be handed over: the backend refuses its data"
                    )
                if wait or flushes < _LET_GO_FLUSHES:
                    flushes += 1
                    await self._worker.sync()
                    continue
                return False
            if held:
                return False
            self._forget(session_id)
            self._went(session_id)
            return True

    def stats(self) -> StoreStats:
        hot = self._hot.stats()
        worker = self._worker.stats()
        stats = replace(
            hot,
            hot_hits=max(0, hot.hot_hits - self._cold_hits),
            cold_hits=self._cold_hits,
            loads=self._loads,
            dirty_sessions=self._dirty.pending(),
            dirty_messages=self._dirty.dirty_messages(),
            dirty_bytes=self._dirty.bytes + self._dirty.poisoned_bytes,
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
            conflicts=self._merges,
            last_cleanup_at=self._last_cleanup_at,
            cleanup_failures=self._cleanup_failures,
        )
        if self._relay is not None:
            ownership = cast(Transport, self._ownership).stats()
            stats = replace(
                stats,
                instance_id=ownership.instance_id,
                handoffs=ownership.handoffs,
                takeovers=ownership.takeovers,
                sessions_given=ownership.given,
                reads_elsewhere=ownership.reads_elsewhere,
                ownership_timeouts=ownership.timeouts,
                followed_sessions=self._relay.followed_count(),
                followers=self._relay.follower_count(),
                live_messages_sent=self._relay.sent_messages,
            )
        # The disk's figures and the backups' come from what their background work found:
        # stats() does no I/O.
        stats = self._monitor.fill(stats)
        return stats if self._backups is None else self._backups.fill(stats)

    @property
    def backups(self) -> BackupScheduler | None:
        """The scheduled backups (CHAT_SESSION_BACKUP_DIR), None when they are off."""
        return self._backups

    async def refresh_stats(self) -> StoreStats:
        """Take the disk's figures now (size, sessions and users on disk) rather than at the
        housekeeping's next round, and return `stats()`. For a health check that must be
        current; a metrics scrape reads `stats()`, which does no I/O."""
        self._require_running()
        await self._monitor.refresh(counts=True, report=self.stats)
        return self.stats()

    # -- the user's rights and the operator's tools -------------------------------------------

    async def export_user(self, user_id: UserId) -> AsyncIterator[SessionRecord]:
        """Every session of the user, whole, exactly once: each that exists from the start of
        the export to its end, whatever the consumer's pace and whatever the LRU evicts
        meanwhile. Memory's newer state wins over the disk's. Streams: only a page of
        sessions is held at a time. Secrets are never in what `encode_record` makes of these.
        """
        self._require_running()
        uid = require_user(user_id)
        # In memory at the start: each is yielded from the disk pass, or after it (from
        # memory, or from disk if it was flushed and evicted meanwhile). The disk pass
        # pages by id, so it yields each stored session once; only the ids owed from
        # memory need remembering (a 10,000-session export must not hold 10,000 ids).
        owed = self._tier.session_ids_of(uid)
        count = 0
        async for record in self._backend.iter_user_sessions(uid):
            entry = self._tier.peek(record.id)  # memory is newer
            if entry is None and record.id in owed:
                # It had writes in memory at the start and was flushed and evicted since:
                # the page may predate that flush, so read it again.
                fresh = await self._backend.load_session(record.id)
                entry = self._tier.peek(record.id)
                if entry is None:
                    owed.discard(record.id)
                    if fresh is not None and fresh.user_id == uid:
                        count += 1
                        yield fresh
                    continue
            if entry is not None and entry.user_id != uid:
                continue
            owed.discard(record.id)
            count += 1
            yield entry.snapshot() if entry is not None else record
        for sid in sorted(owed):
            entry = self._tier.peek(sid)
            if entry is None:
                loaded = await self._backend.load_session(sid)  # flushed and evicted meanwhile
                entry = self._tier.peek(sid)
                if entry is None:
                    if loaded is not None and loaded.user_id == uid:
                        count += 1
                        yield loaded
                    continue  # deleted meanwhile: it did not exist to the end
            if entry.user_id == uid:
                count += 1
                yield entry.snapshot()
        ACCESS.info("exported user=%s sessions=%d", uid, count)

    def export_user_json(self, user_id: UserId) -> AsyncIterator[bytes]:
        """The user's data as one JSON document, in pieces (the format: `writebehind.export`)."""
        return export_json(user_id, self.export_user(user_id))

    async def purge_expired(self, now: datetime | None = None) -> int:
        """Delete sessions idle for longer than `retention_days`, from disk and memory, in
        small transactions; returns how many. Runs every `cleanup_interval_hours` on its
        own; an active session is never removed, even one whose disk row is stale.

        `now` (default: the current time) must be a timezone-aware datetime.
        """
        self._require_running()
        cutoff = _cutoff(utcnow() if now is None else now, self.config.retention_days)
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
        """One transaction of retention: (rows the disk deleted, sessions really removed).

        Once the DELETE has committed, the rest is plain bookkeeping on validated values
        that cannot raise, so a purge is never left half done.
        """
        ids = await self._backend.purge_older_than(cutoff, limit=_PURGE_CHUNK)
        removed = 0
        for sid in ids:
            entry = self._tier.peek(sid)
            if entry is not None and (entry.last_access_at >= cutoff or self._dirty.holds(sid)):
                # Active in memory, only its disk row was old: write it back whole, as a
                # new row (this purge deleted the old one). Not counted as purged.
                self._dirty.rewrite(entry)
                continue
            if entry is not None:
                self._forget(sid)
            removed += 1
        self._deleted(ids)
        return len(ids), removed

    def _purge_memory(self, cutoff: datetime) -> int:
        """Signed-in sessions idle past the cutoff that are only in memory (clean, so they
        were on disk and just went): none should be left, but drop any that are."""
        stale = [e.id for e in self._tier.idle_signed_in(cutoff) if not self._dirty.holds(e.id)]
        for sid in stale:
            self._forget(sid)
        return len(stale)

    async def backup(self, dest: str | Path) -> None:
        """Flush, then write a consistent online copy of the database to `dest` (0600),
        checked with `integrity_check`. Only for backends that can (SQLite). The copy reads
        a snapshot: flushes and deletes go on meanwhile."""
        self._require_running()
        backup = getattr(self._backend, "backup", None)
        if backup is None:
            raise StorageError(f"{type(self._backend).__name__} has no backup; use the database's tools")
        await self.flush()
        await backup(dest)
        LOG.info("backup written to %s", dest)

    # -- background housekeeping ---------------------------------------------------------------

    async def _housekeep(self) -> None:
        """Retention on its interval, the disk's figures for stats() (every round: sizes;
        counts every few minutes and after a cleanup) and the anonymous TTL sweep. Any
        failure is logged and the task carries on: it must never be what stops a shutdown's
        final flush."""
        period = max(0.5, min(60.0, self.config.anon_ttl_seconds / 2))
        loop = asyncio.get_running_loop()
        cleanup_every = self.config.cleanup_interval_hours * 3600
        next_cleanup = loop.time()  # once at start, then on the interval
        while True:
            cleaned = False
            if loop.time() >= next_cleanup:
                next_cleanup = loop.time() + cleanup_every
                cleaned = True
                try:
                    await self.purge_expired()
                except Exception:
                    self._cleanup_failures += 1
                    LOG.exception("retention cleanup failed; retrying at the next interval")
            await self._monitor.refresh(counts=cleaned, report=self.stats)
            await asyncio.sleep(min(period, max(0.0, next_cleanup - loop.time())))
            expired = 1000
            while expired == 1000:
                # In slices, yielding between them, so requests never wait behind a sweep.
                try:
                    expired = self._tier.expire_idle(limit=1000)
                except Exception:
                    LOG.exception("the anonymous-session sweep failed; retrying later")
                    break
                await asyncio.sleep(0)


def _cutoff(now: object, retention_days: int) -> datetime:
    """`now` minus the retention period, checked: an aware datetime, not so early that the
    subtraction leaves the calendar."""
    if not isinstance(now, datetime):
        raise ValidationError("now", f"must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValidationError("now", "must be timezone-aware (UTC), not naive")
    try:
        return now.astimezone(UTC) - timedelta(days=retention_days)
    except OverflowError:
        raise ValidationError("now", f"is too early for a retention of {retention_days} days") from None
