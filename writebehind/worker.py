"""`FlushWorker`: the only path to disk for writes.

Everything that must reach the backend is a request handled by one task, one at
a time: flush cycles, deletes, purges. Ordering therefore comes from that task,
not from locks: a call (a delete, a purge) runs between two batches, after the
batch in flight has committed or been rolled back, so no flush can bring deleted
data back; and it never waits behind a whole flush of `max_dirty` sessions.

A flush cycle writes everything that was dirty when it began, a batch per
transaction. Callers that want durability (`sync()`) wait for the next cycle to
finish; all callers waiting for the same cycle share its transactions (group
commit). A failed cycle keeps the data in memory and retries after an
exponential backoff with full jitter, capped; nothing spins.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from typing import Any, Final, TypeVar

from asyncio_throttle.throttler import Throttler

from .backends.base import Backend, RecordError
from .dirty import DirtyIndex, Taken
from .errors import ClosedError, ConflictError, StorageError
from .model import utcnow

__all__ = ["FlushWorker", "WorkerStats"]

LOG = logging.getLogger("writebehind")

T = TypeVar("T")
LATENCY_BUCKETS_MS: Final = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)
_FLUSH: Final = object()
_STOP: Final = object()
_CALL: Final = object()
_RETRY_BASE_S: Final = 0.05
_MAX_MESSAGES_PER_BATCH: Final = 5000
_MAX_TOUCHES_PER_BATCH: Final = 5000
# How often one cycle re-writes a session merged after a conflict before leaving it to
# the next cycle: two writers fighting over a session cannot hold a cycle forever.
_CONFLICT_ROUNDS: Final = 3
ConflictHandler = Callable[[list[Taken]], Awaitable[list[str]]]


@dataclass(slots=True)
class _Call:
    fn: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class WorkerStats:
    queue_depth: int
    durable_waiters: int
    batches_flushed: int
    sessions_flushed: int
    messages_flushed: int
    flush_latency_last_ms: float | None
    flush_latency_p50_ms: float | None
    flush_latency_p99_ms: float | None
    flush_latency_buckets: tuple[tuple[float, int], ...]
    flush_latency_sum_ms: float
    consecutive_failures: int
    total_failures: int
    last_error: str | None
    last_flush_at: datetime | None
    poisoned_sessions: int


class FlushWorker:
    def __init__(
        self,
        backend: Backend,
        dirty: DirtyIndex,
        *,
        interval_s: float,
        batch_sessions: int,
        max_flushes_per_second: float,
        retry_max_delay_s: float,
        on_conflict: ConflictHandler | None = None,
    ) -> None:
        self._on_conflict = on_conflict
        self._backend = backend
        self._dirty = dirty
        self._interval = interval_s
        self._batch = batch_sessions
        self._retry_max = retry_max_delay_s
        self._throttler = Throttler(rate_limit=max(1, round(max_flushes_per_second)), period=1.0)
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        # Calls wait here, not in the queue (which only wakes the task), so that a flush can
        # serve them between its batches.
        self._calls: deque[_Call] = deque()
        self._task: asyncio.Task[None] | None = None
        self._flush_queued = False
        self._waiters: list[asyncio.Future[None]] = []
        self._retry_at: float | None = None
        self._next_flush = 0.0
        self._stopping = False
        # stats
        self._batches = 0
        self._sessions = 0
        self._messages = 0
        self._latencies: deque[float] = deque(maxlen=1024)
        # A histogram for metrics: counts per bucket (the last one is +Inf), and the sum.
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._latency_sum = 0.0
        self._failures = 0
        self._total_failures = 0
        self._last_error: str | None = None
        self._last_flush_at: datetime | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="writebehind-flush-worker")
            self._task.add_done_callback(self._exited)

    def _exited(self, task: asyncio.Task[None]) -> None:
        if not self._stopping:
            reason = "was cancelled" if task.cancelled() else f"crashed: {task.exception()!r}"
            LOG.error(
                "flush worker %s; %d dirty sessions kept in memory, it restarts on the next request",
                reason,
                len(self._dirty),
            )

    def _revive(self) -> None:
        # The task is the only path to disk: if something outside cancelled it (or it
        # crashed) while the store runs, the next request starts another rather than let
        # dirty data sit in memory for good. Not from the done-callback: that also fires
        # while the event loop shuts down, when no new task may start.
        task = self._task
        if task is not None and task.done() and not self._stopping:
            self.start()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, grace: float | None = None) -> bool:
        """Let the queue drain (every call queued so far is answered), then end the task.

        After `grace` seconds, a task still busy (a hung disk) is cancelled: what it had
        in flight goes back to the dirty index. Returns whether it ended by itself.
        """
        self._stopping = True
        task = self._task
        clean = True
        if task is not None and not task.done():
            self._queue.put_nowait(_STOP)
            done, _ = await asyncio.wait([task], timeout=grace)
            if not done:
                clean = False
                LOG.error("the flush worker did not stop within %.1fs (a hung disk?); cancelled", grace)
                task.cancel()
                # Bounded too: a task stuck in a thread cannot be made to answer.
                await asyncio.wait([task], timeout=1.0)
        self._task = None
        self._fail_pending(ClosedError("the store is closed"))
        return clean

    def cancel(self) -> None:
        """End the task without waiting for it (a shutdown that was itself cancelled)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self._fail_pending(ClosedError("the store is closed"))

    async def abandon(self) -> None:
        """End the task at once, writing nothing more (a simulated crash, for tests)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._fail_pending(ClosedError("the store is closed"))

    def _fail_pending(self, exc: BaseException) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        calls, self._calls = self._calls, deque()
        for call in calls:
            if not call.future.done():
                call.future.set_exception(exc)

    # -- requests ------------------------------------------------------------------------------

    def kick(self) -> None:
        """Ask for a flush cycle soon (a batch has filled, or a durable caller is waiting)."""
        self._revive()
        if not self._flush_queued:
            self._flush_queued = True
            self._queue.put_nowait(_FLUSH)

    async def sync(self) -> None:
        """Return once everything dirty now is on disk; raise StorageError if that failed."""
        self._require_running()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.kick()
        await waiter

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` in queue order (after everything queued before it), return its result."""
        self._require_running()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._calls.append(_Call(fn, future))
        self._queue.put_nowait(_CALL)
        return await future

    def _require_running(self) -> None:
        self._revive()
        if not self.running:
            raise ClosedError("the store is not running (call start(), or it was closed)")

    # -- the task ------------------------------------------------------------------------------

    async def _run(self) -> None:
        self._next_flush = time.monotonic() + self._interval
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 a cancelled wait_for around a
                # queue get could wait out the whole timeout (a long backoff) first.
                try:
                    async with asyncio.timeout(self._timeout()):
                        item = await self._queue.get()
                except TimeoutError:
                    item = None
                await self.serve_calls()
                if item is _STOP:
                    return
                if item is _FLUSH:
                    self._flush_queued = False
                    await self._cycle()
                if time.monotonic() >= self._due():
                    await self._cycle()
        except asyncio.CancelledError:
            self._flush_queued = False
            self._fail_pending(ClosedError("the flush worker was cancelled"))
            raise

    def _due(self) -> float:
        """When the next cycle runs unasked: the interval, or the end of a backoff."""
        return self._next_flush if self._retry_at is None else self._retry_at

    def _timeout(self) -> float:
        return max(0.0, self._due() - time.monotonic())

    async def serve_calls(self) -> None:
        """Run the calls waiting now, in order (between batches, and when woken)."""
        calls = self._calls
        while calls:
            call = calls.popleft()
            if call.future.done():  # the caller gave up (cancelled)
                continue
            try:
                result = await call.fn()
            except Exception as exc:
                if not call.future.done():
                    call.future.set_exception(exc)
            else:
                if not call.future.done():
                    call.future.set_result(result)

    async def _cycle(self) -> None:
        self._next_flush = time.monotonic() + self._interval
        waiters, self._waiters = self._waiters, []
        if self._retry_at is not None and time.monotonic() < self._retry_at:
            # Backing off after a failure: durable callers learn now rather than wait it out.
            _settle(waiters, StorageError(f"storage is failing, retrying later: {self._last_error}"))
            return
        try:
            # A durable caller waits for this cycle: it never waits for the throttle too
            # (which exists to keep background flushes from hogging the disk).
            await self.flush_all(throttle=not waiters)
        except (RecordError, ConflictError) as exc:
            # The backend works; it refused some sessions' data, or another writer won.
            # Those are retried (or dropped) on the interval, not on a failure's backoff.
            self._retry_at = None
            _settle(waiters, exc)
        except StorageError as exc:
            _settle(waiters, exc)
        except BaseException:
            _settle(waiters, ClosedError("the flush worker stopped"))
            raise
        else:
            # Nothing failed this time (perhaps nothing was left to write: the dirty data of
            # a failed flush may have been deleted since). Without this, an expired backoff
            # deadline would stay due and the loop would spin.
            self._retry_at = None
            self._failures = 0
            _settle(waiters, None)

    async def flush_all(self, *, throttle: bool = True) -> None:
        """Write everything dirty when called, in batches. Called only from the task (or
        by the store at shutdown, once the task has stopped).

        Raises StorageError when the backend failed (everything not written stays dirty),
        or RecordError, after writing all the rest, naming sessions whose own data the
        backend refused.
        """
        refused: list[str] = []
        conflicts: list[Taken] = []
        unresolved: list[str] = []
        remaining = len(self._dirty)
        rounds = 0
        while True:
            while remaining > 0:
                batch = self._dirty.take(min(self._batch, remaining), _MAX_MESSAGES_PER_BATCH)
                if not batch:
                    break
                remaining -= len(batch)
                await self._write(batch, refused, conflicts, throttle)
                if self._task is not None and asyncio.current_task() is self._task:
                    # A delete or an erasure never waits behind a whole flush.
                    await self.serve_calls()
            touches = self._dirty.take_touches(_MAX_TOUCHES_PER_BATCH)
            if touches:
                await self._write_touches(touches)
            if not conflicts:
                break
            rounds += 1
            merged = await self._resolve(conflicts)
            conflicts = []
            if rounds >= _CONFLICT_ROUNDS:
                unresolved = merged
                break
            remaining = len(merged)
            self._dirty.to_front(merged)
        if unresolved:
            raise ConflictError(unresolved)
        if refused:
            raise RecordError(
                f"the backend refused the data of {len(refused)} session(s), kept in memory: "
                + ", ".join(refused[:10])
            )

    async def _resolve(self, conflicts: list[Taken]) -> list[str]:
        """Hand the sessions another writer changed to the store, which merges this
        instance's messages after the winner's; returns those left to write again."""
        if self._on_conflict is None:
            return []
        return await self._on_conflict(conflicts)

    async def _write_touches(self, touches: list[tuple[str, datetime]]) -> None:
        """Persist read times. Never a durable caller's failure: their data is written by
        then, and a touch is retried with the next flush."""
        try:
            await self._backend.write_batch([], touches)
        except Exception as exc:  # a storage failure, or a bug: either way a read's time waits
            self._dirty.restore_touches(touches)
            LOG.warning("persisting %d sessions' last access failed, retrying later: %s", len(touches), exc)
            return
        except BaseException:
            self._dirty.restore_touches(touches)
            raise
        self._dirty.touches_done(touches)

    async def _write(
        self, batch: list[Taken], refused: list[str], conflicts: list[Taken], throttle: bool = True
    ) -> None:
        try:
            try:
                if throttle:
                    async with self._throttler:
                        pass
                started = time.perf_counter()
                deltas = [t.delta for t in batch]
                result = await self._backend.write_batch(deltas)
                # The job is done with them, but a backend's thread may hold on to its last job
                # (aiosqlite's does, until its next one: up to an interval): emptied, the list
                # no longer keeps the batch's snapshots (and the messages' old versions) alive
                # that long, old enough for the cyclic GC to move to its oldest generation.
                # Not on an exception: a cancelled write may still be running in that thread.
                deltas.clear()
            except StorageError:
                raise
            except Exception as exc:
                # Not the database failing but this batch's data (a value the driver could
                # not take): isolate it like a refused record, never let it kill the worker.
                raise RecordError(f"write_batch failed on its data: {type(exc).__name__}: {exc}") from exc
        except RecordError as exc:
            self._dirty.restore(batch)
            if len(batch) == 1:
                self._poison(batch[0].delta.record.id, exc)
                refused.append(batch[0].delta.record.id)
                return
            # Some session's data is refused: bisect, so the rest lands in a few
            # transactions and the bad one ends up alone.
            ids = [t.delta.record.id for t in batch]
            half = len(ids) // 2
            for part in (ids[:half], ids[half:]):
                again = self._dirty.take_these(part)
                if again:
                    await self._write(again, refused, conflicts, throttle)
            return
        except StorageError as exc:
            self._dirty.restore(batch)
            self._failed(exc)
            raise
        except BaseException:
            self._dirty.restore(batch)
            raise
        latency = (time.perf_counter() - started) * 1000
        lost = [t for t in batch if t.delta.record.id in result.conflicts]
        if lost:
            # Not written: back to the dirty index before the store merges them.
            self._dirty.restore(lost)
        self._dirty.done([t for t in batch if t.delta.record.id not in result.conflicts], result.versions)
        self._succeeded([t for t in batch if t.delta.record.id in result.versions], latency)
        conflicts.extend(lost)

    def _poison(self, sid: str, exc: StorageError) -> None:
        tries = self._dirty.refused(sid)
        if sid in self._dirty.poisoned():
            LOG.error(
                "session %s refused by the backend %d times; kept in memory, no longer retried: %s",
                sid,
                tries,
                exc,
            )
        else:
            LOG.warning("session %s refused by the backend (try %d): %s", sid, tries, exc)

    def _succeeded(self, batch: list[Taken], latency_ms: float) -> None:
        if self._failures:
            LOG.info("storage recovered after %d failed attempts", self._failures)
        self._failures = 0
        self._retry_at = None
        self._batches += 1
        self._sessions += len(batch)
        self._messages += sum(len(t.delta.messages) for t in batch)
        self._latencies.append(latency_ms)
        self._latency_sum += latency_ms
        self._latency_counts[bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self._last_flush_at = utcnow()

    def _failed(self, exc: StorageError) -> None:
        self._failures += 1
        self._total_failures += 1
        self._last_error = str(exc)
        cap = min(self._retry_max, _RETRY_BASE_S * 2 ** min(self._failures, 30))
        delay = random.uniform(cap / 2, cap)
        self._retry_at = time.monotonic() + delay
        LOG.warning(
            "flush failed (%d in a row, %d dirty sessions kept in memory), retrying in %.2fs: %s",
            self._failures,
            len(self._dirty),
            delay,
            exc,
        )

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        latencies = sorted(self._latencies)
        return WorkerStats(
            queue_depth=len(self._calls),
            durable_waiters=len(self._waiters),
            batches_flushed=self._batches,
            sessions_flushed=self._sessions,
            messages_flushed=self._messages,
            flush_latency_last_ms=self._latencies[-1] if self._latencies else None,
            flush_latency_p50_ms=_quantile(latencies, 0.50),
            flush_latency_p99_ms=_quantile(latencies, 0.99),
            flush_latency_buckets=tuple(
                zip((*LATENCY_BUCKETS_MS, math.inf), accumulate(self._latency_counts), strict=True)
            ),
            flush_latency_sum_ms=self._latency_sum,
            consecutive_failures=self._failures,
            total_failures=self._total_failures,
            last_error=self._last_error,
            last_flush_at=self._last_flush_at,
            poisoned_sessions=len(self._dirty.poisoned()),
        )


def _settle(waiters: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
