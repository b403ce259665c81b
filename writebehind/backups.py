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
  deletes every file that has this database's backup names.
- **Flushes are not held up.** The copy is one step of the backup API, that is one read
  transaction, and in WAL mode a reader never blocks the writer. Not several steps: a
  copy in steps from another connection starts again from its first page whenever the
  writer commits between two of them (`tests/test_backups.py` shows it), so under steady
  writes it would never end (measured once on this project's VM, a 51 MB file and a commit
  every 20 ms: steps of 256 pages had restarted 918 times after 20 s; one step took 0.12 s). Only a checkpoint
  cannot pass the copy's snapshot while it runs: the WAL grows for that long. One
  exception: an erasure ends with a truncating checkpoint, which waits for readers (up to
  `busy_timeout`); during a copy it waits for the copy's end, and the flushes queued behind
  the erasure with it.
- **When.** The first backup is due one interval after the newest backup already in the
  directory, or at once if there is none or the newest is older than one interval: a
  restart neither skips a backup nor repeats one. Then one every interval after the end
  of the last attempt.
- **Failures** are logged (the error, no content), counted in `stats()`
  (`backup_failures`, `consecutive_backup_failures`, `last_backup_error`) and in the
  metrics, and the backup is retried at the next interval. A failing backup never touches
  the flushes: it has no part in their path.
- **Rotation** runs after every attempt, failed ones too: the newest `keep` backups are
  kept, and any backup older than `retention_days` is deleted whatever `keep` says, so no
  copy outlives the retention policy by more than that policy (a session retention removes
  from the database is gone from every backup at most `retention_days` later). With the
  defaults (28 backups, 6 hours apart) a backup lives 7 days.
- **Shutdown.** `aclose()` stops the schedule. A copy in progress is told to stop (its
  integrity check is interrupted) and waited for up to `grace` seconds; one still
  running then is left to end on its own and remove its temporary file (a stale one is
  removed at the next start).

`restore_backup()` is the other way: see its docstring (the command line's
`writebehind restore`).
"""

from __future__ import annotations

import asyncio
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

__all__ = ["Backup", "BackupScheduler", "backup_name", "list_backups", "restore_backup"]

LOG = logging.getLogger("writebehind")

_STAMP: Final = "%Y%m%dT%H%M%S"
# How long the schedule sleeps at most before it looks at the clock again: a wall clock
# that jumps (a suspended VM) is followed within this.
_RECHECK_S: Final = 60.0


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
        self.db_path = Path(db_path)
        self.directory = Path(directory)
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
        self._last_at: datetime | None = None
        self._last_error: str | None = None
        self._kept: int | None = None

    def __repr__(self) -> str:
        return f"BackupScheduler({str(self.db_path)!r} -> {str(self.directory)!r})"

    @property
    def next_run_at(self) -> datetime | None:
        """When the schedule makes the next backup (None before `start()`)."""
        return self._due

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
        self._due = now if not existing else max(now, existing[0].taken_at + self._interval)
        self._kept = len(existing)
        self._task = asyncio.create_task(self._run(), name="writebehind-backups")

    async def _run(self) -> None:
        while True:
            assert self._due is not None
            wait = (self._due - self._clock()).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, _RECHECK_S))
                continue
            with contextlib.suppress(StorageError):  # logged and counted by run_once
                await self.run_once()
            self._due = self._clock() + self._interval

    async def run_once(self) -> Backup:
        """Make a backup now, then rotate; returns it. Raises `StorageError` if it failed
        (also logged and counted in `stats()`). One at a time: a second call waits."""
        async with self._one_at_a_time:
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

    def _record(self, outcome: _Outcome, started: datetime) -> Backup:
        if outcome.kept is not None:
            self._kept = outcome.kept
        if outcome.deleted:
            LOG.info(
                "backups: deleted %d in %s (%s)",
                len(outcome.deleted),
                self.directory,
                f"keeping the newest {self._keep} and none older than {self._retention_days} days",
            )
        if outcome.prune_error is not None:
            LOG.error("backups: rotation in %s failed: %s", self.directory, _describe(outcome.prune_error))
        if outcome.backup is None:
            error = outcome.error or StorageError("the copy did not finish")
            self._failures += 1
            self._consecutive += 1
            self._last_error = _describe(error)
            LOG.error(
                "backup of %s into %s failed (%s); retrying in %.1f hours",
                self.db_path,
                self.directory,
                self._last_error,
                self._interval.total_seconds() / 3600,
            )
            raise StorageError(f"backup of {self.db_path} failed: {self._last_error}") from error
        self._made += 1
        self._consecutive = 0
        self._last_error = None
        self._last_at = started
        LOG.info("backup written to %s (%d bytes, integrity ok)", outcome.backup.path, outcome.backup.size)
        return outcome.backup

    def _prune(self, now: datetime) -> tuple[int, list[Path]]:
        """In the backup's thread: delete what rotation and retention say; returns (how
        many are kept, the paths deleted)."""
        backups = list_backups(self.directory, self.db_path)
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
        return len(backups) - len(deleted), deleted

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
        prune: Callable[[], tuple[int, list[Path]]],
    ) -> None:
        self._source = source
        self._final = final
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._taken_at = taken_at
        self._busy_timeout_ms = busy_timeout_ms
        self._sweep = sweep
        self._prune = prune
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._target: sqlite3.Connection | None = None
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
            outcome.backup = self._make()
        except BaseException as exc:  # in a thread of its own: everything goes back to the loop
            outcome.error = exc
        if not self._stop.is_set():
            try:
                outcome.kept, outcome.deleted = self._prune()
            except (OSError, StorageError) as exc:
                outcome.prune_error = exc
        return outcome

    def _make(self) -> Backup:
        directory = self._final.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._sweep:
            _remove_stale_temps(directory, self._source)
        if self._final.exists():
            raise StorageError(f"{self._final} exists already (two backups in one millisecond?)")
        # O_EXCL: never through a file or link someone planted under the temporary name.
        os.close(os.open(self._tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
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

    def _copy(self) -> None:
        source = sqlite3.connect(_readonly_uri(self._source), uri=True, isolation_level=None)
        try:
            source.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            target = sqlite3.connect(self._tmp, isolation_level=None, check_same_thread=False)
            try:
                # One step (pages=-1, the default): one read transaction, which the writer
                # never waits for in WAL mode (see the module's docstring for why not steps).
                source.backup(target)
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
            raise StorageError(f"the copy failed its integrity check: {'; '.join(problems)}")


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
    """The temporary files of backups of this database that a crash or a shutdown left."""
    prefix = f".{db_path.stem}-"
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(prefix) and ".tmp" in name:
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


# -- restoring ---------------------------------------------------------------------------------


def restore_backup(
    backup: Path,
    db_path: Path,
    *,
    confirm: Callable[[], None] | None = None,
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
    - Keeps the database it replaces: `<db>.before-restore-<time>` (with its WAL, if it
      had one), which this returns (None when there was no database). That file is a copy
      that retention and erasure do not reach: delete it once the restore is right.
    - The swap is a rename: the database is the old file or the restored one, never a mix;
      the old WAL and shared-memory files go first, so neither can meet the restored file.
    """
    backup, db_path = Path(backup), Path(db_path)
    if not backup.is_file():
        raise StorageError(f"{backup} is not a file")
    if db_path.exists() and os.path.samefile(backup, db_path):
        raise StorageError(f"{backup} is the database itself")
    lock = FileLock(db_path)
    lock.acquire()
    try:
        tmp = db_path.with_name(f".{db_path.name}.restoring")
        _remove_with_journal(tmp)  # a restore that crashed before (we hold the lock: no other runs)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StorageError(f"cannot create {tmp}: {exc.strerror}") from exc
        try:
            _copy_checked(backup, tmp)
            _fsync(tmp)
            if confirm is not None:
                confirm()
            aside = _set_aside(db_path, clock())
            os.replace(tmp, db_path)
            _fsync(db_path.parent)
        finally:
            _remove_with_journal(tmp)
    finally:
        lock.release()
    LOG.info("restored %s from the backup %s (the old file: %s)", db_path, backup, aside)
    return aside


def _copy_checked(backup: Path, dest: Path) -> None:
    try:
        source = sqlite3.connect(_readonly_uri(backup), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the backup {backup}: {exc}") from exc
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
                raise SchemaError(f"{backup} is not a usable SQLite database: {exc}") from exc
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
