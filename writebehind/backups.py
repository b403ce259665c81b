"""Scheduled backups of the SQLite database, their rotation, and restoring one.

    scheduler = BackupScheduler(db_path, backup_dir, interval_hours=6, keep=28, retention_days=90)
    scheduler.start()              # a store does this itself when CHAT_SESSION_BACKUP_DIR is set
    ...
    await scheduler.aclose()

What a caller may rely on:

- **A backup is a consistent copy** of the database as it was at one moment, made while
  the app keeps writing: SQLite's online backup API, from a read-only connection of its
  own in a thread of its own (never the store's reader, so loads do not queue behind it).
  It is named `<db stem>-<YYYYmmddTHHMMSS.mmmZ><db suffix>` after the UTC time the copy
  started (`chat_sessions-20261127T060000.000Z.db`), written under a temporary name
  (`.<name>.tmp`), switched to a self-contained single file (rollback journal, so it opens
  read-only anywhere), checked with `PRAGMA integrity_check`, synced, then linked to its
  name: a file under a backup's name is always whole and checked. Mode 0600; the
  directory is created (0700) if missing. Use one directory per database: rotation
  deletes every file that has this database's backup names. Relative paths are taken
  from the working directory at construction (a later chdir moves nothing).
  `copy_database()` makes one the same way at a path of the caller's (`writebehind backup`).
- **Flushes are not held up.** The copy is one read transaction, and in WAL mode a
  reader never blocks the writer. It reads in steps of `_STEP_PAGES` inside that one
  transaction, holding its snapshot from the first step to the last: a copy in steps that
  lets go of its snapshot between them starts again from its first page whenever the
  writer commits (`tests/test_backups.py` shows it; measured once on this project's VM,
  a 51 MB file and a commit every 20 ms: steps of 256 pages had restarted 918 times after
  20 s), one that holds it never does. Only a checkpoint cannot pass the copy's snapshot
  while it runs: the WAL grows for that long. An erasure ends with a truncating
  checkpoint, which waits for readers (up to `busy_timeout`), and the flushes queued
  behind the erasure wait with it: `interrupt()` stops the copy within a step (a few ms)
  so that it need not wait; that copy is no failure and is made again a minute later.
  (Measured without it: an erasure during a copy of more than `busy_timeout`'s worth held
  a flush for 5 s and left the erased pages in the WAL.)
- **When.** The first backup is due one interval after the newest backup already in the
  directory, or at once if there is none or the newest is older than one interval: a
  restart neither skips a backup nor repeats one. Then one every interval after the end
  of the last attempt. A backup dated after now (made while the clock was wrong) puts
  nothing off, and is the first to rotate out.
- **Failures** are logged (the error, no content), counted in `stats()`
  (`backup_failures`, `consecutive_backup_failures`, `last_backup_error`) and in the
  metrics, and the backup is tried again a minute later, then 2, 4, 8... minutes after
  each failure in a row, up to the interval. A failing backup never touches
  the flushes: it has no part in their path.
- **Rotation** runs after every attempt, failed ones too: the newest `keep` backups are
  kept, and any backup older than `retention_days` is deleted whatever `keep` says; the
  schedule also wakes when the oldest passes that age, between two backups (an interval
  longer than the retention period, a backup left from before a long stop). So a session
  retention removes from the database is gone from every backup at most `retention_days`
  later (while the app runs: a stopped app deletes nothing). With the defaults (28
  backups, 6 hours apart) a backup lives 7 days.
- **Shutdown.** `aclose()` stops the schedule. A copy in progress is told to stop (at its
  next step, or its integrity check is interrupted) and waited for up to `grace` seconds; one still
  running then is left to end on its own and remove its temporary file (a stale one is
  removed at the next start).

`restore_backup()` is the other way: see its docstring (the command line's
`writebehind restore`).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from .backends.sqlite import SCHEMA_VERSION
from .config import Config
from .errors import ClosedError, ConfigError, SchemaError, StorageError
from .model import utcnow
from .ownership import FileLock
from .stats import StoreStats

__all__ = [
    "Backup",
    "BackupContents",
    "BackupScheduler",
    "backup_name",
    "copy_database",
    "list_backups",
    "restore_backup",
]

LOG = logging.getLogger("writebehind")

_STAMP: Final = "%Y%m%dT%H%M%S"
# How long the schedule sleeps at most before it looks at the clock again: a wall clock
# that jumps (a suspended VM) is followed within this.
_RECHECK_S: Final = 60.0
# A backup named more than this after the clock's now was made while the clock was wrong (or
# copied from elsewhere): it must neither put the next backup off until that date nor be kept
# as the newest until then.
_FUTURE_SKEW: Final = timedelta(minutes=1)
# Pages a copy step reads (4 MB at SQLite's default page size; ~10 ms here): how long a
# copy takes at most to stop when told to.
_STEP_PAGES: Final = 1024
# A copy stopped for an erasure's checkpoint (`interrupt()`) is made again this much later;
# after this many stopped in a row, the next is let finish.
_RETRY_INTERRUPTED_S: Final = 60.0
_MAX_INTERRUPTS: Final = 3
# A failed backup is tried again this much later, doubled at each failure in a row, up to
# the interval: a disk full for a minute must not cost the 6 hours to the next backup,
# and a disk that stays broken is not hammered.
_RETRY_FAILED_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class Backup:
    """One backup file: where it is, the time its copy started (from its name), its size."""

    path: Path
    taken_at: datetime
    size: int


def backup_name(db_path: Path, taken_at: datetime) -> str:
    """The file name of `db_path`'s backup started at `taken_at` (UTC, to the millisecond:
    a backup made by hand right after a scheduled one still gets a name of its own)."""
    return f"{db_path.stem}-{_stamp(taken_at)}{db_path.suffix}"


def _stamp(at: datetime) -> str:
    at = at.astimezone(UTC)
    return f"{at.strftime(_STAMP)}.{at.microsecond // 1000:03d}Z"


def _name_pattern(db_path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(db_path.stem) + r"-(\d{8}T\d{6}\.\d{3})Z" + re.escape(db_path.suffix))


def list_backups(directory: Path, db_path: Path) -> list[Backup]:
    """The backups of `db_path` in `directory`, newest first. A missing directory has none;
    one that cannot be read raises `StorageError`."""
    pattern = _name_pattern(db_path)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list the backups in {directory}: {exc.strerror}") from exc
    found: list[Backup] = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        try:
            taken_at = datetime.strptime(match[1], _STAMP + ".%f").replace(tzinfo=UTC)
            size = (directory / name).stat().st_size
        except ValueError:  # a name that looks like one but is no date (month 13)
            continue
        except FileNotFoundError:  # rotated away meanwhile
            continue
        except OSError as exc:
            raise StorageError(f"cannot read the backup {directory / name}: {exc.strerror}") from exc
        found.append(Backup(directory / name, taken_at, size))
    found.sort(key=lambda b: b.taken_at, reverse=True)
    return found


class BackupScheduler:
    """Backups of the SQLite file at `db_path` into `directory`, every `interval_hours`,
    rotated (see the module's docstring). An owned background task: `start()` /
    `aclose()`. `clock` (aware UTC datetimes) names the backups and drives the schedule
    and the rotation: tests inject one."""

    def __init__(
        self,
        db_path: Path,
        directory: Path,
        *,
        interval_hours: float = 6.0,
        keep: int = 28,
        retention_days: int = 90,
        busy_timeout_ms: int = 5000,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")
        if not interval_hours > 0:
            raise ValueError(f"interval_hours must be > 0, got {interval_hours!r}")
        # Absolute now: a relative path means the working directory the store started in,
        # not the one a later chdir (a daemon's, a test runner's) leaves.
        self.db_path = Path(db_path).absolute()
        self.directory = Path(directory).absolute()
        self._interval = timedelta(hours=interval_hours)
        self._keep = keep
        self._retention_days = retention_days
        self._busy_timeout_ms = busy_timeout_ms
        self._clock = clock
        self._due: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._one_at_a_time = asyncio.Lock()
        self._job: _Job | None = None
        self._swept = False
        self._made = 0
        self._failures = 0
        self._consecutive = 0
        self._interrupted_in_a_row = 0
        self._last_at: datetime | None = None
        self._last_error: str | None = None
        self._kept: int | None = None
        # The oldest backup kept (not counting any dated in the future): when it passes the
        # retention period the schedule wakes to delete it, not only at the next backup.
        self._oldest: datetime | None = None
        self._retry_soon = False

    def __repr__(self) -> str:
        return f"BackupScheduler({str(self.db_path)!r} -> {str(self.directory)!r})"

    @property
    def next_run_at(self) -> datetime | None:
        """When the schedule makes the next backup (None before `start()`)."""
        return self._due

    @property
    def next_expiry_at(self) -> datetime | None:
        """When the oldest backup kept passes the retention period: the schedule deletes it
        then, between two backups if need be (None: no backup, or not known yet)."""
        if self._oldest is None:
            return None
        try:
            return self._oldest + timedelta(days=self._retention_days)
        except OverflowError:
            return None

    @classmethod
    def from_config(cls, config: Config, db_path: str | os.PathLike[str] | None) -> BackupScheduler | None:
        """The schedule `config` asks for (`backup_dir` and the rest) for the SQLite file at
        `db_path`; None when `backup_dir` is unset. `ConfigError` if it is set for a store
        whose backend is no SQLite file."""
        if config.backup_dir is None:
            return None
        if db_path is None:
            raise ConfigError(
                "backup_dir is for SQLite only: this store's backend has no database file; use the "
                "database's own backups (pg_dump for PostgreSQL), and unset it"
            )
        return cls(
            Path(db_path),
            config.backup_dir,
            interval_hours=config.backup_interval_hours,
            keep=config.backup_keep,
            retention_days=config.retention_days,
            busy_timeout_ms=config.busy_timeout_ms,
        )

    def start(self) -> None:
        """Work out when the first backup is due (see the module's docstring) and start the
        schedule. Never fails for the directory's sake: a directory it cannot read makes the
        first attempt due at once, and that attempt's failure is what shows. (It lists the
        directory once, here: a store's start does file work of this size anyway.)"""
        if self._closed:
            raise ClosedError("a closed backup schedule cannot be started again")
        if self._task is not None:
            return
        now = self._clock()
        try:
            existing = list_backups(self.directory, self.db_path)
        except StorageError:
            existing = []
        past = [b for b in existing if b.taken_at <= now + _FUTURE_SKEW]
        if len(past) < len(existing):
            LOG.warning(
                "backups: %d in %s are dated after now (%s): the clock was wrong when they were made; "
                "they are rotated out first",
                len(existing) - len(past),
                self.directory,
                now.isoformat(),
            )
        self._due = now if not past else max(now, past[0].taken_at + self._interval)
        self._kept = len(existing)
        self._oldest = past[-1].taken_at if past else None
        self._task = asyncio.create_task(self._run(), name="writebehind-backups")

    async def _run(self) -> None:
        while True:
            assert self._due is not None
            now = self._clock()
            if now >= self._due:
                self._retry_soon = False
                with contextlib.suppress(StorageError):  # logged and counted by run_once
                    await self.run_once()
                self._due = self._clock() + self._wait()
                continue
            expiry = self.next_expiry_at
            if expiry is not None and now > expiry:
                await self._expire(now)
                continue
            until = self._due if expiry is None else min(self._due, expiry)
            # At least a millisecond: a backup expires once the clock is past its expiry.
            await asyncio.sleep(min(max((until - now).total_seconds(), 0.001), _RECHECK_S))

    def _wait(self) -> timedelta:
        """How long after an attempt the next one is due: a minute after a copy stopped for
        an erasure; after failures in a row, `_RETRY_FAILED_S` doubled at each, up to the
        interval; else the interval."""
        if self._retry_soon:
            return timedelta(seconds=_RETRY_INTERRUPTED_S)
        if self._consecutive:
            backoff = _RETRY_FAILED_S * 2 ** min(self._consecutive - 1, 30)
            return min(self._interval, timedelta(seconds=backoff))
        return self._interval

    async def _expire(self, now: datetime) -> None:
        """Between two backups: delete those that have just passed the retention period (a
        retention shorter than the interval, or a backup left from before a long stop)."""
        async with self._one_at_a_time:
            await self._previous_ended()
            if self._closed:
                return
            try:
                kept, deleted, oldest = await asyncio.to_thread(self._prune, now)
            except (OSError, StorageError) as exc:
                self._oldest = None  # tried again by the next backup's rotation, not in a loop
                LOG.error("backups: rotation in %s failed: %s", self.directory, _describe(exc))
                return
        self._kept, self._oldest = kept, oldest
        if deleted:
            LOG.info(
                "backups: deleted %d in %s older than the retention period (%d days)",
                len(deleted),
                self.directory,
                self._retention_days,
            )

    async def run_once(self) -> Backup:
        """Make a backup now, then rotate; returns it. Raises `StorageError` if it failed
        (also logged and counted in `stats()`). One at a time: a second call waits."""
        async with self._one_at_a_time:
            await self._previous_ended()
            if self._closed:
                raise ClosedError("the backup schedule is closed")
            now = self._clock().astimezone(UTC)
            # To the millisecond, as its name says: the time listings give back.
            started = now.replace(microsecond=now.microsecond // 1000 * 1000)
            job = _Job(
                source=self.db_path,
                final=self.directory / backup_name(self.db_path, started),
                taken_at=started,
                busy_timeout_ms=self._busy_timeout_ms,
                sweep=not self._swept,
                prune=lambda: self._prune(started),
            )
            self._job = job
            # Shielded: a cancelled caller stops waiting, and aclose() still waits for the
            # thread (which a cancellation cannot stop) through the same future.
            try:
                outcome = await asyncio.shield(job.start())
            except asyncio.CancelledError:
                job.stop()
                raise
            self._swept = True
            return self._record(outcome, started)

    async def _previous_ended(self) -> None:
        """Wait for the thread of a copy whose caller was cancelled (it was told to stop):
        one copy at a time, or the next one's sweep of stale temporary files could remove
        that copy's, or that copy's sweep the next one's."""
        job = self._job
        if job is not None and job.future is not None and not job.future.done():
            await asyncio.wait([job.future])

    def interrupt(self) -> bool:
        """Stop a copy that is reading the database, within one step (a few ms), so that a
        checkpoint waiting for its snapshot can pass: call it before an erasure's truncating
        checkpoint. Such a copy is no failure: it leaves no file and is made again a minute
        later. Returns whether a copy was stopped. From the event loop's thread."""
        job = self._job
        if job is None or job.future is None or job.future.done():
            return False
        if self._interrupted_in_a_row >= _MAX_INTERRUPTS:
            # Erasures so frequent that no copy would ever end: this one is let finish (the
            # erasure waits for its snapshot, as it would for any reader).
            return False
        stopped = job.interrupt()
        self._interrupted_in_a_row += stopped
        return stopped

    def _record(self, outcome: _Outcome, started: datetime) -> Backup:
        if outcome.kept is not None:
            self._kept, self._oldest = outcome.kept, outcome.oldest
        if outcome.deleted:
            LOG.info(
                "backups: deleted %d in %s (%s)",
                len(outcome.deleted),
                self.directory,
                f"keeping the newest {self._keep} and none older than {self._retention_days} days",
            )
        if outcome.prune_error is not None:
            LOG.error("backups: rotation in %s failed: %s", self.directory, _describe(outcome.prune_error))
        if outcome.backup is None and self._job is not None and self._job.interrupted:
            self._retry_soon = True
            LOG.info(
                "backups: a copy into %s stopped for an erasure; made again in %.0f s",
                self.directory,
                _RETRY_INTERRUPTED_S,
            )
            raise _Stopped(f"the backup of {self.db_path} was interrupted; it is made again soon")
        if outcome.backup is None:
            error = outcome.error or StorageError("the copy did not finish")
            self._failures += 1
            self._consecutive += 1
            self._last_error = _describe(error)
            LOG.error(
                "backup of %s into %s failed (%s); tried again in %.0f s",
                self.db_path,
                self.directory,
                self._last_error,
                self._wait().total_seconds(),
            )
            raise StorageError(f"backup of {self.db_path} failed: {self._last_error}") from error
        self._made += 1
        self._interrupted_in_a_row = 0
        self._consecutive = 0
        self._last_error = None
        self._last_at = started
        LOG.info("backup written to %s (%d bytes, integrity ok)", outcome.backup.path, outcome.backup.size)
        return outcome.backup

    def _prune(self, now: datetime) -> tuple[int, list[Path], datetime | None]:
        """In a thread: delete what rotation and retention say; returns (how many are kept,
        the paths deleted, the time of the oldest kept that is not dated in the future)."""
        # Newest first, but a backup dated in the future (a wrong clock once) counts as the
        # oldest: it rotates out first instead of being kept as the newest until that date.
        backups = sorted(
            list_backups(self.directory, self.db_path), key=lambda b: b.taken_at > now + _FUTURE_SKEW
        )
        try:
            cutoff: datetime | None = now - timedelta(days=self._retention_days)
        except OverflowError:  # a retention longer than the calendar: nothing is that old
            cutoff = None
        doomed = [
            b
            for i, b in enumerate(backups)
            if i >= self._keep or (cutoff is not None and b.taken_at < cutoff)
        ]
        deleted: list[Path] = []
        for b in doomed:
            try:
                b.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot delete the backup {b.path}: {exc.strerror}") from exc
            deleted.append(b.path)
        left = [b.taken_at for b in backups if b.path not in deleted and b.taken_at <= now + _FUTURE_SKEW]
        return len(backups) - len(deleted), deleted, min(left, default=None)

    def fill(self, stats: StoreStats) -> StoreStats:
        """`stats` with this schedule's figures."""
        return replace(
            stats,
            backups_made=self._made,
            backup_failures=self._failures,
            consecutive_backup_failures=self._consecutive,
            last_backup_at=self._last_at,
            last_backup_error=self._last_error,
            backups_kept=self._kept,
        )

    async def aclose(self, grace: float = 1.0) -> None:
        """Stop the schedule; tell a copy in progress to stop and wait for it up to
        `grace` seconds (see the module's docstring). Idempotent."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        job = self._job
        if job is None or job.future is None or job.future.done():
            return
        job.stop()
        done, _ = await asyncio.wait([job.future], timeout=grace)
        if not done:
            LOG.warning(
                "backups: a copy into %s was still running at shutdown; left to end on its own "
                "(its temporary file is removed then, or at the next start)",
                self.directory,
            )


@dataclass(slots=True)
class _Outcome:
    backup: Backup | None = None
    error: BaseException | None = None
    kept: int | None = None
    oldest: datetime | None = None
    deleted: list[Path] = field(default_factory=list)
    prune_error: BaseException | None = None


class _Stopped(StorageError):
    """The copy was told to stop (shutdown) before it was done."""


class _Job:
    """One backup, run in a daemon thread of its own (a copy cannot be cancelled half way,
    and must not keep the interpreter from exiting). Its future is set from the thread."""

    def __init__(
        self,
        *,
        source: Path,
        final: Path,
        taken_at: datetime,
        busy_timeout_ms: int,
        sweep: bool,
        prune: Callable[[], tuple[int, list[Path], datetime | None]],
        make_directory: bool = True,
    ) -> None:
        self._source = source
        self._make_directory = make_directory
        self._final = final
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._taken_at = taken_at
        self._busy_timeout_ms = busy_timeout_ms
        self._sweep = sweep
        self._prune = prune
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._target: sqlite3.Connection | None = None
        # Until the copy has let go of its snapshot, `interrupt()` stops it: before it took
        # one as well (a copy whose snapshot was taken just before an erasure's DELETE must
        # not finish with the erased rows), not only while it reads.
        self._released = False
        # Stopped by `interrupt()` (an erasure), not by shutdown: not a failure, made again soon.
        self.interrupted = False
        self.future: asyncio.Future[_Outcome] | None = None

    def start(self) -> asyncio.Future[_Outcome]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Outcome] = loop.create_future()
        self.future = future

        def deliver(outcome: _Outcome) -> None:
            if not future.done():
                future.set_result(outcome)

        def run() -> None:
            outcome = self._run()
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(deliver, outcome)

        threading.Thread(target=run, name="writebehind-backup", daemon=True).start()
        return future

    def stop(self) -> None:
        """From any thread: no rename after this, and an integrity check running stops."""
        self._stop.set()
        with self._guard:
            if self._target is not None:
                self._target.interrupt()

    def _run(self) -> _Outcome:
        outcome = _Outcome()
        try:
            outcome.backup = self.make()
        except BaseException as exc:  # in a thread of its own: everything goes back to the loop
            outcome.error = exc
        if not self._stop.is_set():
            try:
                outcome.kept, outcome.deleted, outcome.oldest = self._prune()
            except (OSError, StorageError) as exc:
                outcome.prune_error = exc
        return outcome

    def make(self) -> Backup:
        """The copy, in the calling thread."""
        directory = self._final.parent
        if self._make_directory:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._sweep:
            _remove_stale_temps(directory, self._source)
        if self._final.exists() or self._final.is_symlink():
            raise StorageError(f"{self._final} exists; refusing to overwrite it")
        # O_EXCL: never through a file or link someone planted under the temporary name.
        try:
            os.close(os.open(self._tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StorageError(f"cannot create {self._final}: {exc.strerror}") from exc
        try:
            self._copy()
            if self._stop.is_set():
                raise _Stopped("stopped by shutdown before it was done")
            _fsync(self._tmp)
            # A hard link, not a rename: it never replaces an existing file.
            os.link(self._tmp, self._final)
            _fsync(directory)
        finally:
            _remove_with_journal(self._tmp)
        return Backup(self._final, self._taken_at, self._final.stat().st_size)

    def interrupt(self) -> bool:
        """From the loop: stop the copy unless it is done reading the source (its snapshot is
        what a checkpoint waits for, and may hold rows about to be erased); returns whether
        it did."""
        with self._guard:
            if self._released:
                return False
            self.interrupted = True
        self._stop.set()
        return True

    def _progress(self, status: int, remaining: int, total: int) -> None:
        # Between two steps: the place a copy can stop (raised out of `backup()`).
        if self._stop.is_set():
            raise _Stopped(
                "stopped for an erasure's checkpoint"
                if self.interrupted
                else "stopped by shutdown before it was done"
            )

    def _copy(self) -> None:
        source = sqlite3.connect(_readonly_uri(self._source), uri=True, isolation_level=None)
        try:
            source.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            target = sqlite3.connect(self._tmp, isolation_level=None, check_same_thread=False)
            try:
                # In steps, inside one read transaction held from the first to the last: every
                # step reads the same snapshot, which the writer never waits for in WAL mode,
                # and which no commit restarts (a copy in steps that lets go of its snapshot
                # between them starts over at each commit: see the module's docstring). Steps
                # let the copy stop between two of them (shutdown; an erasure: `interrupt()`).
                source.execute("BEGIN")
                source.execute("SELECT count(*) FROM sqlite_master").fetchone()
                try:
                    # Told to stop before or while it took its snapshot: stop before a page.
                    self._progress(0, 0, 0)
                    source.backup(target, pages=_STEP_PAGES, progress=self._progress)
                finally:
                    with self._guard:
                        self._released = True
                    source.close()  # the snapshot goes now: the integrity check needs none
                with self._guard:
                    self._target = target
                if self._stop.is_set():
                    raise _Stopped("stopped by shutdown before the integrity check")
                # The copy carries the WAL flag of its source; as a backup it is one file.
                target.execute("PRAGMA journal_mode = DELETE")
                problems = _integrity(target)
            finally:
                with self._guard:
                    self._target = None
                target.close()
        except sqlite3.OperationalError as exc:
            if self._stop.is_set():
                raise _Stopped("stopped by shutdown during the integrity check") from exc
            raise
        finally:
            source.close()
        if problems:
            raise StorageError(
                f"the backup at {self._final} failed its integrity check: {'; '.join(problems)}"
            )


_TABLES: Final = "SELECT name FROM sqlite_master WHERE type = 'table'"


def _readonly_uri(path: Path) -> str:
    """SQLite opens it read-only: it never writes to it, and never creates it."""
    return path.absolute().as_uri() + "?mode=ro"


def _integrity(conn: sqlite3.Connection) -> list[str]:
    """What `PRAGMA integrity_check` finds wrong (its first lines), or [] if ok."""
    rows = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else rows[:3] or ["no answer"]


def _remove_with_journal(path: Path) -> None:
    for name in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
        with contextlib.suppress(FileNotFoundError):
            name.unlink()


def _remove_stale_temps(directory: Path, db_path: Path) -> None:
    """The temporary files of backups of this database that a crash or a shutdown left: its
    backups' names exactly (`chat-old.db`'s backup in progress in the same directory is not
    `chat.db`'s to remove)."""
    pattern = re.compile(r"\." + _name_pattern(db_path).pattern + r"\.tmp(?:-journal|-wal|-shm)?")
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if pattern.fullmatch(name):
                with contextlib.suppress(OSError):
                    (directory / name).unlink()
                    LOG.info("backups: removed a stale temporary file %s", directory / name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


def copy_database(db_path: Path, dest: Path, *, busy_timeout_ms: int = 5000) -> Backup:
    """A backup of the SQLite file at `db_path` made now at `dest`, as the schedule makes
    them (see the module's docstring): consistent while an app writes, one self-contained
    file, integrity-checked, mode 0600, under a temporary name until it is whole. `dest`'s
    directory must exist, and `dest` must not. Raises `StorageError`, leaving nothing at
    `dest` (a full disk included)."""
    if not Path(db_path).is_file():
        raise StorageError(f"{db_path} does not exist")
    job = _Job(
        source=Path(db_path),
        final=Path(dest),
        taken_at=utcnow(),
        busy_timeout_ms=busy_timeout_ms,
        sweep=False,
        prune=lambda: (0, [], None),
        make_directory=False,
    )
    try:
        return job.make()
    except sqlite3.Error as exc:
        raise StorageError(f"{db_path}: backup to {dest} failed: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"{db_path}: backup to {dest} failed: {exc.strerror or exc}") from exc


# -- restoring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupContents:
    """What a restore found in a backup's encrypted sessions (all zero for a plain one):
    how many data keys its sessions are sealed with, and how many of those the keys file
    holds destroyed (users erased since: their sessions in it stay unreadable)."""

    data_keys: int = 0
    erased: int = 0


def restore_backup(
    backup: Path,
    db_path: Path,
    *,
    confirm: Callable[[], None] | None = None,
    keys_path: Path | None = None,
    checked: Callable[[BackupContents], None] | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> Path | None:
    """Put the backup at `backup` in place of the database at `db_path`.

    - Refuses a database a store holds: it takes the database's lock (`FileLock`) first and
      holds it to the end, so `DatabaseLockedError` names the app, and no app can start on
      the file halfway.
    - Checks before it touches anything: the backup is copied beside the database (mode
      0600) and the copy must pass `integrity_check` and be a writebehind database of a
      schema version this writebehind can open (`SchemaError` otherwise). `confirm` is
      called then (it may raise to abort, and nothing has changed).
    - Checks an encrypted backup against the keys file (`keys_path`, default `<db>.keys`,
      as the app finds it) before anything changes: refused (`StorageError`) when the keys
      file is missing or holds none of some data key the backup's sessions are sealed with
      (another database's, or an older copy of this one's): restored, they would never
      decrypt. Keys the file holds destroyed are those of users erased since the backup: their
      sessions stay unreadable, as the erasure promised. `checked` is told what was found
      (`BackupContents`) before `confirm` is called.
    - A database path that is a symbolic link is restored where it points (the link stays),
      and the locks of both the link's name and the file's are taken.
    - Keeps the database it replaces: `<db>.before-restore-<time>` (with its WAL, if it
      had one), which this returns (None when there was no database). That file is a copy
      that retention and erasure do not reach: delete it once the restore is right.
    - The swap is a rename: the database is the old file or the restored one, never a mix;
      the old WAL and shared-memory files go first, so neither can meet the restored file.
    """
    backup, named = Path(backup), Path(db_path)
    keys = keys_path or named.with_name(named.name + ".keys")
    if not backup.is_file():
        raise StorageError(f"{backup} is not a file")
    # Through a link, the file itself is what gets replaced (or an app on it would go on
    # with the old one while the link became a plain file beside it); its lock is the one
    # any app on it holds, by whatever name it opened it (a FileLock resolves links).
    db_path = named.resolve() if named.is_symlink() else named
    if db_path.exists() and os.path.samefile(backup, db_path):
        raise StorageError(f"{backup} is the database itself")
    lock = FileLock(db_path)
    lock.acquire()
    try:
        aside = _restore_locked(backup, db_path, keys, confirm, checked, clock)
    finally:
        lock.release()
    LOG.info("restored %s from the backup %s (the old file: %s)", db_path, backup, aside)
    return aside


def _restore_locked(
    backup: Path,
    db_path: Path,
    keys: Path,
    confirm: Callable[[], None] | None,
    checked: Callable[[BackupContents], None] | None,
    clock: Callable[[], datetime],
) -> Path | None:
    """`restore_backup` once the locks are held."""
    tmp = db_path.with_name(f".{db_path.name}.restoring")
    _remove_with_journal(tmp)  # a restore that crashed before (we hold the lock: no other runs)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise StorageError(f"cannot create {tmp}: {exc.strerror}") from exc
    try:
        _copy_checked(backup, tmp)
        contents = _check_keys(backup, tmp, keys)
        _fsync(tmp)
        if checked is not None:
            checked(contents)
        if confirm is not None:
            confirm()
        aside = _set_aside(db_path, clock())
        os.replace(tmp, db_path)
        _fsync(db_path.parent)
    finally:
        _remove_with_journal(tmp)
    return aside


# The data key ids the sealed values name: the bytes form (version byte 1, then the key id),
# and the text form ("wbe1:" and base64 whose first 12 characters hold the id). Every sealed
# session has a sealed title (a missing one is sealed as such), and the messages are scanned
# too, for a session whose row predates the key.
_SEALED_IDS: Final = """
SELECT DISTINCT substr(title, 2, 8), 0 FROM sessions
    WHERE typeof(title) = 'blob' AND substr(title, 1, 1) = x'01'
UNION SELECT DISTINCT substr(title, 6, 12), 1 FROM sessions
    WHERE typeof(title) = 'text' AND substr(title, 1, 5) = 'wbe1:'
UNION SELECT DISTINCT substr(content, 2, 8), 0 FROM messages
    WHERE typeof(content) = 'blob' AND substr(content, 1, 1) = x'01'
UNION SELECT DISTINCT substr(content, 6, 12), 1 FROM messages
    WHERE typeof(content) = 'text' AND substr(content, 1, 5) = 'wbe1:'
"""


def _sealed_key_ids(conn: sqlite3.Connection) -> set[bytes]:
    """The data key ids the sealed values of the database on `conn` name (empty: a plain
    database)."""
    found: set[bytes] = set()
    for value, text in conn.execute(_SEALED_IDS):
        if text:
            with contextlib.suppress(binascii.Error, TypeError):
                found.add(binascii.a2b_base64(str(value))[:8])
        elif isinstance(value, bytes) and len(value) == 8:
            found.add(value)
    return found


def _check_keys(backup: Path, copy: Path, keys: Path) -> BackupContents:
    conn = sqlite3.connect(_readonly_uri(copy), uri=True, isolation_level=None)
    try:
        needed = _sealed_key_ids(conn)
    finally:
        conn.close()
    if not needed:
        return BackupContents()
    if not keys.exists():
        raise StorageError(
            f"{backup} holds encrypted sessions ({len(needed)} data key(s)), and their keys file "
            f"{keys} does not exist: put the keys file back first (from its own backup), or name it "
            "with CHAT_SESSION_ENCRYPTION_KEYS_PATH; without it nothing in the backup is readable; "
            "nothing was changed"
        )
    try:
        conn = sqlite3.connect(_readonly_uri(keys), uri=True, isolation_level=None)
        try:
            stored = {
                bytes(kid): destroyed
                for kid, destroyed in conn.execute("SELECT key_id, wrapped IS NULL FROM keys")
            }
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read the keys file {keys}: {exc}; nothing was changed") from exc
    missing = needed - stored.keys()
    if missing:
        raise StorageError(
            f"the keys file {keys} holds no key for {len(missing)} of the backup's {len(needed)} "
            "user key(s): "
            "it is another database's keys file, or an older copy of this one's (restored, those sessions "
            "would never decrypt); nothing was changed"
        )
    return BackupContents(data_keys=len(needed), erased=sum(1 for kid in needed if stored[kid]))


def _copy_checked(backup: Path, dest: Path) -> None:
    try:
        source = sqlite3.connect(_readonly_uri(backup), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the backup {backup}: {exc}; nothing was changed") from exc
    try:
        target = sqlite3.connect(dest, isolation_level=None)
        try:
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")
                problems = _integrity(target)
                version = int(target.execute("PRAGMA user_version").fetchone()[0])
                tables = {row[0] for row in target.execute(_TABLES)}
            except sqlite3.DatabaseError as exc:
                raise SchemaError(
                    f"{backup} is not a usable SQLite database: {exc}; nothing was changed"
                ) from exc
        finally:
            target.close()
    finally:
        source.close()
    if problems:
        raise SchemaError(f"{backup} failed its integrity check: {'; '.join(problems)}; nothing was changed")
    if not 1 <= version <= SCHEMA_VERSION or not {"sessions", "messages"} <= tables:
        raise SchemaError(
            f"{backup} is not a writebehind database this version can open (schema version {version}, "
            f"this writebehind: {SCHEMA_VERSION}); nothing was changed"
        )


def _set_aside(db_path: Path, now: datetime) -> Path | None:
    """Keep the current database (and its WAL or journal) under a `before-restore` name,
    then clear the way: hard links first, so that whatever happens next the old state is
    whole under the new name; then the old WAL goes, so that it can never be replayed onto
    the restored file."""
    if not db_path.exists():
        for suffix in ("-wal", "-journal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                db_path.with_name(db_path.name + suffix).unlink()
        return None
    aside = db_path.with_name(f"{db_path.name}.before-restore-{_stamp(now)}")
    try:
        os.link(db_path, aside)
        for suffix in ("-wal", "-journal"):
            side = db_path.with_name(db_path.name + suffix)
            if side.exists():
                os.link(side, aside.with_name(aside.name + suffix))
        for suffix in ("-wal", "-journal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                db_path.with_name(db_path.name + suffix).unlink()
    except FileExistsError:
        raise StorageError(f"{aside} exists already; nothing was changed") from None
    except OSError as exc:
        raise StorageError(f"cannot keep the current database aside as {aside}: {exc.strerror}") from exc
    return aside
