"""Who owns a database file, and who owns a session.

SQLite: one store per file, held by an operating-system lock (`FileLock`); that store
owns every session in the file (`NoOwnership`). PostgreSQL: several stores share one
schema and each session has one owner at a time (`Ownership`, implemented by
`backends.pg_ownership.PostgresOwnership`). Either way the store marks the replies it is
producing with `Holds`, so that a session is not handed over in the middle of one.

A write-behind store acknowledges writes from memory, so it may accept a write only where
it can later persist it, and only the file's one owner can promise that (DESIGN.md,
"Several processes"). A SQLite store therefore holds `FileLock` on its database for its
lifetime; a second store, in another process or in the same one, is refused with
`DatabaseLockedError` naming the holder. Read-only tools take no lock.

The lock is `flock(2)` on `<db>.lock`, exclusive and non-blocking:

- the kernel drops it when the holder's process ends, SIGKILL included, so there is never
  a stale lock to guess about or clean up. The lock file itself stays (removing it would
  let two openers lock two different files of one name); its content ("pid host") only
  names the holder for the error message and is emptied at release.
- `flock`, not `fcntl` record locks: a record lock belongs to the process, so a second
  open in the same process would silently share it; a `flock` belongs to the open file
  description, so a second store in the same process is refused too.
- a child forked while the lock is held shares that open file description, and would keep
  the lock alive after its parent released it: a fork handler closes the child's copy as
  the child starts (`exec` closes it anyway: the descriptor is close-on-exec).

On network file systems `flock` may be emulated with record locks or not supported at
all (an error at open, never a silent pass); keep the database on a local disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import socket
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Protocol, cast

from .errors import DatabaseLockedError, StorageError

__all__ = [
    "Access",
    "FileLock",
    "Flush",
    "Holder",
    "Holds",
    "LetGo",
    "LiveSink",
    "NoOwnership",
    "Ownership",
    "lock_path_for",
    "ownership_for",
]

# Bounds what is read back from a lock file someone else may have written to.
_MAX_HOLDER_BYTES = 512


class Holder(NamedTuple):
    """Who holds a lock, as it wrote itself into the lock file; None if unreadable."""

    pid: int | None
    host: str | None


def lock_path_for(db_path: Path) -> Path:
    """`<db>.lock`, beside the database."""
    return db_path.with_name(db_path.name + ".lock")


class FileLock:
    """The exclusive lock of one database file, for one store's lifetime.

    `acquire()` never waits: it either holds the lock when it returns or raises
    `DatabaseLockedError` (someone holds it) or `StorageError` (the lock file cannot be
    created or locked). `release()` is idempotent.
    """

    def __init__(self, database: str | os.PathLike[str]) -> None:
        self.database = Path(database)
        # Beside the file itself, whatever link or relative name it was opened by: an app
        # opened through a link and a restore (or a second app) through the real path must
        # see each other's lock.
        self.path = lock_path_for(self.database.resolve())
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"FileLock({str(self.database)!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            # O_NOFOLLOW: the file is truncated and written, so never through a planted link.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DatabaseLockedError(self.database, holder.pid, holder.host) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"cannot lock {self.path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)  # releases the lock
            raise StorageError(f"cannot write the lock file {self.path}: {exc.strerror}") from exc
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            # Emptied while still locked, so that it can never blank a next holder's name.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def _forget(self) -> None:
        # In a forked child: close the inherited copy without unlocking (LOCK_UN would
        # unlock the parent's open file description too).
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_holder(fd: int) -> Holder:
    try:
        text = os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8", "replace")
    except OSError:
        return Holder(None, None)
    pid, _, host = text.strip().partition(" ")
    return Holder(int(pid) if pid.isdigit() else None, host.strip() or None)


_HELD: weakref.WeakSet[FileLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_HELD):
        lock._forget()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- sessions --------------------------------------------------------------------------------


class Access(enum.Enum):
    """What `Ownership.acquire` obtained."""

    # This instance owns the session now: load it into the hot tier and serve it.
    OWNED = "owned"
    # Another instance keeps it (a reply is streaming into it there) and has flushed every
    # write it acknowledged before the request: read it from the database, do not keep it.
    ELSEWHERE = "elsewhere"


LetGo = Callable[[str, bool], Awaitable[bool]]
"""The store's side of a handoff, `let_go(session_id, wait)`: flush the session and drop it
from the hot tier; True once it is neither in memory nor being loaded. A session a reply
is streaming into is kept until its holds end, or, with `wait` False, only flushed (False)."""

Flush = Callable[[], Awaitable[None]]
"""The store's `flush()`: every write acknowledged so far is on disk when it returns."""


class LiveSink(Protocol):
    """The store's side of live following (`writebehind.live.Relay`), told by the ownership
    what other instances send about sessions."""

    def followed(self, session_id: str, follower: int) -> None:
        """Instance `follower` follows a session kept here: send it every change from now."""

    def unfollowed(self, session_id: str, follower: int) -> None:
        """Instance `follower` no longer follows the session."""

    def received(self, session_id: str, owner: int, payload: str | None) -> None:
        """Changes to a session `owner` keeps (None: it let the session go; read it again)."""

    def signalled(self, session_id: str, name: str) -> None:
        """Another instance sent the app's signal `name` about a session kept here."""

    def keeps(self, session_id: str) -> bool:
        """Whether the session is in memory here (a follower then leaves it here)."""


class Ownership(Protocol):
    """Who owns which session, for a store whose backend is shared by several instances."""

    async def start(self, let_go: LetGo, flush: Flush) -> None:
        """After the backend opened: take part (register, listen for requests)."""

    async def acquire(self, session_id: str, *, reading: bool = False, follow: bool = False) -> Access:
        """Own the session before loading it (its previous owner lets go first)."""

    async def close(self) -> None:
        """After the final flush: release every session, stop taking part."""

    async def abandon(self) -> None:
        """Stop as a crash would, releasing nothing (crash tests)."""


class NoOwnership:
    """A backend used by one store only (SQLite, held by `FileLock`): it owns every session,
    and nothing ever waits."""

    async def start(self, let_go: LetGo, flush: Flush) -> None:
        return None

    async def acquire(self, session_id: str, *, reading: bool = False, follow: bool = False) -> Access:
        return Access.OWNED

    async def close(self) -> None:
        return None

    async def abandon(self) -> None:
        return None


def ownership_for(backend: object) -> Ownership:
    """The backend's session ownership (`backend.ownership()`), or `NoOwnership`."""
    factory = getattr(backend, "ownership", None)
    if factory is None:
        return NoOwnership()
    return cast(Ownership, factory())


class Holds:
    """Replies being produced into sessions: while a session is held, a handoff to another
    instance waits for the hold to end (readers elsewhere get it flushed meanwhile)."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._ended: dict[str, asyncio.Event] = {}

    def __call__(self, session_id: str) -> _Hold:
        return _Hold(self, session_id)

    def held(self, session_id: str) -> bool:
        return session_id in self._count

    async def ended(self, session_id: str) -> None:
        """Return once the session is not held (at once if it is not)."""
        while session_id in self._count:
            event = self._ended.get(session_id)
            if event is None:
                event = self._ended[session_id] = asyncio.Event()
            await event.wait()

    def _enter(self, session_id: str) -> None:
        self._count[session_id] = self._count.get(session_id, 0) + 1

    def _exit(self, session_id: str) -> None:
        left = self._count[session_id] - 1
        if left:
            self._count[session_id] = left
            return
        del self._count[session_id]
        event = self._ended.pop(session_id, None)
        if event is not None:
            event.set()


class _Hold:
    """`async with store.hold(session_id):` (re-entrant, any number at once)."""

    __slots__ = ("_holds", "_session_id")

    def __init__(self, holds: Holds, session_id: str) -> None:
        self._holds = holds
        self._session_id = session_id

    async def __aenter__(self) -> None:
        self._holds._enter(self._session_id)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._holds._exit(self._session_id)
