"""The dirty index: what changed in the hot tier since it last reached disk.

Granularity is the message: 500 streamed tokens into one message between two
flushes leave one mark (its `seq`), so they become one row write. The index pins
every session it holds (or has in flight) in the hot tier, so a dirty session is
never evicted before it is on disk.

`take` moves marks out to a batch and snapshots the rows; `done` forgets them
once committed; `restore` puts them back after a failure, unless the session
was deleted meanwhile (so a failed flush cannot resurrect a deleted session).

It is also the one place that records what the database holds of an entry: its
row `version` and its persisted `last_access_at` (reads move `last_access_at`
in memory; `touch` queues it for the disk only once it has moved by
`access_resolution`, without a version change).

`room` is set (and at once cleared) whenever the backlog shrinks, so that writes
waiting under back-pressure wake as soon as there may be room.

`bytes` is the text the pending writes added (see `mark`), in code points: each session's
marks carry their own share, so a batch that commits releases exactly what it took, and
what was written to its sessions while it was in flight stays counted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Final

from .backends.base import SessionDelta
from .store import Entry, HotTier

__all__ = ["POISON_AFTER", "DirtyIndex", "Taken"]

POISON_AFTER: Final = 3
_MAX_SPARE_MARKS: Final = 10_000


@dataclass(slots=True)
class _Marks:
    row: bool = False
    full: bool = False
    seqs: set[int] = field(default_factory=set)
    # The lowest message count since the last flush (`pop_message`): the disk's messages
    # above it go. None: no message was removed.
    truncate: int | None = None
    # The text these marks' writes added (`DirtyIndex.bytes` is the sum over every marks,
    # dirty or in flight).
    bytes: int = 0

    def merge(self, other: _Marks) -> None:
        self.row |= other.row
        self.full |= other.full
        self.seqs |= other.seqs
        self.bytes += other.bytes
        if other.truncate is not None and (self.truncate is None or other.truncate < self.truncate):
            self.truncate = other.truncate


@dataclass(frozen=True, slots=True)
class Taken:
    """One session's part of a batch in flight."""

    session: Entry
    marks: _Marks
    delta: SessionDelta


class DirtyIndex:
    def __init__(self, tier: HotTier, access_resolution: timedelta = timedelta(hours=1)) -> None:
        self._hot = tier
        # Insertion order is age: the oldest dirty session is flushed first.
        self._dirty: dict[str, _Marks] = {}
        self._inflight: dict[str, int] = {}
        # Sessions whose own data the backend refused, and how often in a row.
        self._refusals: dict[str, int] = {}
        # Reads to persist: session -> last_access_at. Not pinned, no back-pressure: a
        # touch lost to an eviction or a crash only makes retention a little early.
        self._touches: dict[str, datetime] = {}
        self._access_resolution = access_resolution
        # Marks of committed batches, cleared for the next sessions that become dirty: see
        # `_recycle`.
        self._spare: list[_Marks] = []
        self.room = asyncio.Event()
        # Read by the store's per-token fast path (an attribute, not a call); changed only
        # here. Never negative: every marks' share is added once and released once.
        self.bytes = 0
        # The share of poisoned sessions (refused `POISON_AFTER` times, no longer tried): out
        # of `bytes`, or one such session would hold every other write back for good; the
        # store bounds writes to poisoned sessions by this figure alone.
        self.poisoned_bytes = 0

    def __len__(self) -> int:
        return len(self._dirty)

    def backlog(self) -> int:
        """Sessions not yet known to be on disk: dirty or in flight (an upper bound: a
        session both dirty again and in flight counts twice). Back-pressure uses this."""
        return len(self._dirty) + len(self._inflight)

    def holds(self, session_id: str) -> bool:
        """Dirty or in flight: already counted in the backlog."""
        return session_id in self._dirty or session_id in self._inflight

    def pending(self) -> int:
        """Distinct sessions dirty or in flight."""
        return len(self._dirty.keys() | self._inflight.keys())

    def _marks(self, session_id: str) -> _Marks:
        marks = self._dirty.get(session_id)
        if marks is None:
            spare = self._spare
            marks = self._dirty[session_id] = spare.pop() if spare else _Marks()
            self._hot.pin(session_id)
        return marks

    def mark(self, session_id: str, seq: int | None = None, full: bool = False, size: int = 0) -> int:
        """Mark the session row (and message `seq`, or every message), counting `size`, the
        text the write added, until the batch that takes these marks commits; returns how
        many sessions are dirty. The hottest call of a streaming reply: when the session is
        already dirty it is one dict lookup."""
        marks = self._dirty.get(session_id)
        if marks is None:
            marks = self._marks(session_id)
        marks.row = True
        marks.bytes += size
        if self._refusals and self._refusals.get(session_id, 0) >= POISON_AFTER:
            self.poisoned_bytes += size  # bounded on its own (see `poisoned_bytes`)
        else:
            self.bytes += size
        if seq is not None:
            marks.seqs.add(seq)
        if full:
            marks.full = True
        return len(self._dirty)

    def truncate(self, session_id: str, after: int) -> None:
        """The session's messages above `after` were removed: the next flush deletes them on
        disk first, and an appended message not yet written above it is no longer to write
        (a seq appended again after this is marked again)."""
        marks = self._marks(session_id)
        marks.row = True
        if marks.truncate is None or after < marks.truncate:
            marks.truncate = after
        marks.seqs = {seq for seq in marks.seqs if seq <= after}

    def mark_full(self, session_id: str) -> None:
        marks = self._marks(session_id)
        marks.row = True
        marks.full = True

    def discard(self, session_id: str) -> None:
        """Forget the session's marks (it was deleted)."""
        marks = self._dirty.pop(session_id, None)
        poisoned = self.is_poisoned(session_id)
        self._refusals.pop(session_id, None)
        self._touches.pop(session_id, None)
        if session_id not in self._inflight:
            self._hot.unpin(session_id)
        if marks is not None:
            # A batch in flight keeps its own share until it commits or comes back.
            if poisoned:
                self.poisoned_bytes -= marks.bytes
            else:
                self.bytes -= marks.bytes
            self._shrunk()

    def touch(self, entry: Entry) -> None:
        """A read moved `entry.last_access_at`: persist it if the disk's is older than the
        resolution (retention counts days, so an hour is plenty), without a version change."""
        on_disk = entry.disk_access_at
        if on_disk is not None and entry.last_access_at - on_disk >= self._access_resolution:
            self._touches[entry.id] = entry.last_access_at

    def take_touches(self, limit: int) -> list[tuple[str, datetime]]:
        """Up to `limit` pending touches of sessions not also in this flush's deltas."""
        touches = self._touches
        taken = []
        for sid in list(islice(touches, limit)):
            taken.append((sid, touches.pop(sid)))
        return taken

    def touches_done(self, touches: list[tuple[str, datetime]]) -> None:
        for sid, at in touches:
            entry = self._hot.peek(sid)
            if entry is not None and entry.disk_access_at is not None:
                entry.disk_access_at = max(entry.disk_access_at, at)

    def restore_touches(self, touches: list[tuple[str, datetime]]) -> None:
        for sid, at in touches:
            if sid in self._hot:
                self._touches.setdefault(sid, at)

    def rewrite(self, entry: Entry) -> None:
        """The database lost the row (a purge raced a load): write the whole session again,
        as a new row."""
        entry.version = 0
        entry.disk_access_at = None
        self.mark_full(entry.id)

    def adopt(self, entry: Entry, version: int) -> None:
        """`entry` replaces the session's entry (a merge after a conflict): pin it if it
        has marks, and record the database's version it was merged onto."""
        entry.version = version
        if entry.id in self._dirty or entry.id in self._inflight:
            self._hot.pin(entry.id)

    def _shrunk(self) -> None:
        self.room.set()
        self.room.clear()

    def dirty_messages(self) -> int:
        total = 0
        for sid, marks in self._dirty.items():
            if marks.full:
                session = self._hot.peek(sid)
                total += 0 if session is None else len(session.messages)
            else:
                total += len(marks.seqs)
        return total

    def take(self, max_sessions: int, max_messages: int) -> list[Taken]:
        """Move up to `max_sessions` of the oldest dirty sessions into a batch.

        Stops early once the batch holds `max_messages` rows (at least one session is
        always taken) so that building it never holds the event loop for long.
        """
        batch: list[Taken] = []
        messages = 0
        poisoned = self.poisoned()
        candidates = list(islice(self._dirty, max_sessions + len(poisoned)))
        for sid in candidates:
            if len(batch) >= max_sessions or (batch and messages >= max_messages):
                break
            if sid in poisoned:
                continue
            marks = self._dirty.pop(sid)
            session = self._hot.peek(sid)
            if session is None:
                # Deleted without going through `discard` cannot happen; be safe anyway.
                self._hot.unpin(sid)
                self.bytes -= marks.bytes
                self._shrunk()
                continue
            self._touches.pop(sid, None)  # the delta carries last_access_at
            if marks.full:
                rows = tuple(session.messages)
            else:
                all_messages = session.messages
                count = len(all_messages)
                seqs = marks.seqs
                low = min(seqs, default=1)
                high = max(seqs, default=0)
                if high - low + 1 == len(seqs) and high <= count:
                    # A run of seqs (what was appended since the last flush, the usual
                    # case): one slice instead of a sort and a lookup a message.
                    rows = tuple(all_messages[low - 1 : high])
                else:
                    # A seq above the count was popped after these marks were taken by a
                    # batch that failed and came back (`restore`): `truncate` deletes it.
                    rows = tuple(all_messages[seq - 1] for seq in sorted(seqs) if seq <= count)
            delta = SessionDelta(
                session.snapshot(with_messages=False), rows, len(session.messages), marks.truncate
            )
            batch.append(Taken(session, marks, delta))
            self._inflight[sid] = self._inflight.get(sid, 0) + 1
            messages += len(rows)
        return batch

    def take_these(self, session_ids: list[str]) -> list[Taken]:
        """A batch of just these sessions (those still dirty and not poisoned)."""
        poisoned = self.poisoned()
        wanted = {
            sid: self._dirty.pop(sid) for sid in session_ids if sid in self._dirty and sid not in poisoned
        }
        if not wanted:
            return []
        count = len(wanted)
        self._to_front(wanted)
        return self.take(count, 1 << 62)

    def to_front(self, session_ids: list[str]) -> None:
        """Flush these first (sessions merged after a conflict, to write again at once)."""
        self._to_front({sid: self._dirty.pop(sid) for sid in session_ids if sid in self._dirty})

    def done(self, batch: list[Taken], versions: dict[str, int]) -> None:
        """The batch committed: record each written session's new version."""
        for taken in batch:
            sid = taken.delta.record.id
            version = versions.get(sid)
            if version is not None:
                taken.session.version = version
                taken.session.disk_access_at = taken.delta.record.last_access_at
            self.bytes -= taken.marks.bytes
            self._settle(sid)
            self._refusals.pop(sid, None)
            self._recycle(taken.marks)

    def _recycle(self, marks: _Marks) -> None:
        # A session's marks live from its first write after a flush to the next flush, long
        # enough for the cyclic GC to move them to its oldest generation, whose growth
        # triggers a full collection (250-400 ms, every stream paused, at 1,000 streams). A
        # streaming server dirties its sessions again every interval: reused marks add
        # nothing there, new ones would each time (benchmarks/test_sse_load.py).
        spare = self._spare
        if len(spare) < _MAX_SPARE_MARKS:
            marks.row = marks.full = False
            marks.seqs.clear()
            marks.truncate = None
            marks.bytes = 0
            spare.append(marks)

    def refused(self, session_id: str) -> int:
        """Count a refusal of this session's data; returns how many in a row."""
        count = self._refusals.get(session_id, 0) + 1
        self._refusals[session_id] = count
        if count == POISON_AFTER:
            marks = self._dirty.get(session_id)
            if marks is not None:  # from now on its share is the poisoned sessions'
                self.bytes -= marks.bytes
                self.poisoned_bytes += marks.bytes
                self._shrunk()
        return count

    def is_poisoned(self, session_id: str) -> bool:
        return self._refusals.get(session_id, 0) >= POISON_AFTER

    def poisoned(self) -> set[str]:
        """Sessions refused `POISON_AFTER` times in a row: kept in memory, no longer tried."""
        return {sid for sid, n in self._refusals.items() if n >= POISON_AFTER}

    def restore(self, batch: list[Taken]) -> None:
        back: dict[str, _Marks] = {}
        for taken in batch:
            sid = taken.delta.record.id
            if self._hot.peek(sid) is not taken.session:
                self.bytes -= taken.marks.bytes
                self._settle(sid)
                continue  # deleted (or deleted and re-created) meanwhile: nothing to put back
            marks = self._dirty.get(sid)
            if marks is None:
                back[sid] = taken.marks
                self._hot.pin(sid)
            else:
                marks.merge(taken.marks)
            self._settle(sid)
        if back:
            # Back to the front: they are older than anything marked since they were taken.
            self._to_front(back)

    def _to_front(self, first: dict[str, _Marks]) -> None:
        # In place, not a new dict: the store reads this one on its fast path.
        rest = list(self._dirty.items())
        self._dirty.clear()
        self._dirty.update(first)
        self._dirty.update(rest)

    def _settle(self, sid: str) -> None:
        count = self._inflight.pop(sid, 0) - 1
        if count > 0:
            self._inflight[sid] = count
        else:
            if sid not in self._dirty:
                self._hot.unpin(sid)
            self._shrunk()

    def unsaved(self) -> list[Entry]:
        """Every session not known to be on disk: dirty or in flight (at shutdown)."""
        entries = []
        for sid in self._dirty.keys() | self._inflight.keys():
            entry = self._hot.peek(sid)
            if entry is not None:
                entries.append(entry)
        return entries
