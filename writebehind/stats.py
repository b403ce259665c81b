"""The numbers a store reports about itself: a frozen snapshot, cheap to take."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = ["StoreStats"]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What `stats()` returns. A plain `SessionStore` fills only the hot-tier fields.

    - `hot_hits`: lookups answered from memory; `cold_hits`: misses that a backend load
      found on disk; `misses`: lookups found nowhere (including another user's session).
    - `loads`: backend loads actually made (single flight makes this <= cold lookups).
    - `dirty_sessions` / `dirty_messages`: changes not yet on disk; `parked`: dirty
      sessions the LRU wanted to evict, held until they are flushed.
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
