"""The numbers a store reports about itself: a frozen snapshot, cheap to take.

`stats()` never does I/O: the figures about the disk (its size, what it holds) are taken
in the background by a `DiskMonitor` and read from there, so a Prometheus scrape every few
seconds costs no query and never waits for a busy or hung disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from .model import utcnow

__all__ = ["STATUS_FORMAT", "DiskMonitor", "DiskUsage", "StoreStats", "read_status", "status_path_for"]

LOG = logging.getLogger("writebehind")
STATUS_FORMAT: Final = "writebehind-status"
# Counting sessions and users reads an index end to end: on this project's VM, 5 ms for a
# million sessions and 33 ms for count(DISTINCT user_id) over them (50,000 users, warm
# cache), more when cold. Once every
# five minutes (and after each cleanup, which changes them) is cheap; once per scrape is not.
COUNTS_EVERY_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `stats()` returns. A plain `SessionStore` fills only the hot-tier fields.

    - `hot_hits`: lookups answered from memory; `cold_hits`: misses that a backend load
      found on disk; `misses`: lookups found nowhere (including another user's session).
    - `loads`: backend loads actually made (single flight makes this <= cold lookups).
    - `dirty_sessions` / `dirty_messages`: changes not yet on disk; `parked`: dirty
      sessions the LRU wanted to evict, held until they are flushed.
    - `dirty_bytes`: the text those changes added (content, tokens, metadata JSON,
      titles; in code points), dirty or in a flush not yet committed: what
      `max_dirty_bytes` bounds.
    - flush latencies are per transaction, in milliseconds; `flush_latency_buckets` holds
      cumulative (upper bound, count) pairs over the store's life, the last bound +inf.
    """

    hot_sessions: int = 0
    hot_hits: int = 0
    cold_hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    expired: int = 0
    parked: int = 0
    dirty_sessions: int = 0
    dirty_messages: int = 0
    dirty_bytes: int = 0
    queue_depth: int = 0
    durable_waiters: int = 0
    batches_flushed: int = 0
    sessions_flushed: int = 0
    messages_flushed: int = 0
    flush_latency_last_ms: float | None = None
    flush_latency_p50_ms: float | None = None
    flush_latency_p99_ms: float | None = None
    flush_latency_buckets: tuple[tuple[float, int], ...] = ()
    flush_latency_sum_ms: float = 0.0
    consecutive_failures: int = 0
    total_failures: int = 0
    last_error: str | None = None
    last_flush_at: datetime | None = None
    backpressure_rejections: int = 0
    poisoned_sessions: int = 0
    sessions_purged: int = 0
    conflicts: int = 0
    last_cleanup_at: datetime | None = None
    # Retention cleanups the store's schedule ran that raised (a manual purge_expired()
    # raises to its caller instead).
    cleanup_failures: int = 0
    # The disk, as the last background refresh found it (None until the first one, and for
    # a plain SessionStore). `db_bytes`: SQLite's file plus its WAL; PostgreSQL's
    # pg_total_relation_size of the sessions and messages tables. `wal_bytes`: SQLite only.
    db_bytes: int | None = None
    wal_bytes: int | None = None
    # Counted every five minutes and after each cleanup (`disk_counted_at` says when), not
    # at each stats() call.
    sessions_on_disk: int | None = None
    users_on_disk: int | None = None
    disk_counted_at: datetime | None = None
    # Scheduled backups (CHAT_SESSION_BACKUP_DIR; all zero / None while they are off).
    backups_made: int = 0
    backup_failures: int = 0
    consecutive_backup_failures: int = 0
    last_backup_at: datetime | None = None
    last_backup_error: str | None = None
    backups_kept: int | None = None
    # Several instances on PostgreSQL (all zero / None otherwise): this instance's id;
    # sessions taken from a live owner (`handoffs`) or a dead one (`takeovers`), let go to
    # another (`sessions_given`), read from the database while another kept them
    # (`reads_elsewhere`), requests that gave up (`ownership_timeouts`); sessions kept
    # elsewhere that streams here follow (`followed_sessions`), instances following
    # sessions kept here (`followers`), and the change notifications sent to them.
    instance_id: int | None = None
    handoffs: int = 0
    takeovers: int = 0
    sessions_given: int = 0
    reads_elsewhere: int = 0
    ownership_timeouts: int = 0
    followed_sessions: int = 0
    followers: int = 0
    live_messages_sent: int = 0


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """What a backend reports about its storage (`disk_usage(counts)`).

    `db_bytes`: SQLite's file plus its WAL, or PostgreSQL's tables with their indexes and
    TOAST; `wal_bytes`: SQLite's WAL (None for PostgreSQL). `sessions` and `users` are
    None when the caller did not ask for the counts.
    """

    db_bytes: int
    wal_bytes: int | None
    sessions: int | None = None
    users: int | None = None


def status_path_for(db_path: Path) -> Path:
    """`<db>.status.json`, beside the database: what the running app last reported."""
    return db_path.with_name(db_path.name + ".status.json")


# The StoreStats fields the status file carries: the slow-moving health of the running
# app, for `writebehind stats` (another process) to show. Numbers and times only.
_STATUS_FIELDS: Final = (
    "last_cleanup_at",
    "cleanup_failures",
    "sessions_purged",
    "last_backup_at",
    "last_backup_error",
    "backups_made",
    "backup_failures",
    "consecutive_backup_failures",
    "consecutive_failures",
    "total_failures",
)


class DiskMonitor:
    """The disk figures of `stats()`, refreshed in the background by the store's
    housekeeping (`refresh()`), read without I/O by `fill()`.

    Sizes are refreshed at every call of `refresh()` (the housekeeping's round: at most a
    minute apart); the session and user counts every `counts_every_s` and whenever the
    caller says they changed (`counts=True`, after a cleanup). A failing refresh keeps
    the last figures and is logged, never raised.

    With `status_path`, each refresh also writes what `report()` says of the app's health
    (cleanups, backups, failures: `_STATUS_FIELDS`) to that file, atomically, mode 0600,
    when it changed: `writebehind stats` reads it beside a running app.
    """

    def __init__(
        self,
        usage: Callable[[bool], Awaitable[DiskUsage]] | None,
        *,
        status_path: Path | None = None,
        counts_every_s: float = COUNTS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._usage = usage
        self._status_path = status_path
        self._counts_every = counts_every_s
        self._clock = clock
        self._counted_at: float | None = None
        self._figures: dict[str, Any] = {}
        self._status: dict[str, Any] | None = None

    async def refresh(self, *, counts: bool = False, report: Callable[[], StoreStats] | None = None) -> None:
        """Take the disk's figures now (and count if due or `counts`); write the status
        file if `report` says something new. Never raises (but a cancellation)."""
        if self._usage is not None:
            due = self._counted_at is None or self._clock() - self._counted_at >= self._counts_every
            try:
                usage = await self._usage(counts or due)
            except Exception as exc:  # a disk or server that fails: keep the last figures
                LOG.warning("monitoring: could not read the database's size: %s", exc)
            else:
                self._figures["db_bytes"] = usage.db_bytes
                self._figures["wal_bytes"] = usage.wal_bytes
                if usage.sessions is not None:
                    self._counted_at = self._clock()
                    self._figures["sessions_on_disk"] = usage.sessions
                    self._figures["users_on_disk"] = usage.users
                    self._figures["disk_counted_at"] = utcnow()
        if self._status_path is not None and report is not None:
            await self._write_status(self._status_path, report())

    async def report(self, report: Callable[[], StoreStats]) -> None:
        """Write the status file now if `report` says something new (no disk figures taken):
        at shutdown, so that `writebehind stats` shows the app's last word. Never raises
        (but a cancellation)."""
        if self._status_path is not None:
            await self._write_status(self._status_path, report())

    def fill(self, stats: StoreStats) -> StoreStats:
        """`stats` with the last figures the background refresh found."""
        return replace(stats, **self._figures) if self._figures else stats

    async def _write_status(self, path: Path, stats: StoreStats) -> None:
        status = {name: _plain(getattr(stats, name)) for name in _STATUS_FIELDS}
        if status == self._status:
            return
        header = {
            "format": STATUS_FORMAT,
            "version": 1,
            "pid": os.getpid(),
            "written_at": utcnow().isoformat(),
        }
        payload = orjson.dumps({**header, **status})
        try:
            # In a thread: the disk may be slow, the event loop must not wait for it.
            await asyncio.to_thread(_write_private, path, payload)
        except OSError as exc:
            LOG.warning("monitoring: could not write the status file %s: %s", path, exc.strerror)
            return
        self._status = status


def read_status(path: Path) -> dict[str, Any] | None:
    """What the app last wrote to its status file; None if there is none (or it is not one)."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != STATUS_FORMAT:
        return None
    return data


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _write_private(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` atomically (temporary file, rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
