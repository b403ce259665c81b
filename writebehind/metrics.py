"""Prometheus metrics for a store (`pip install writebehind[metrics]`).

    from prometheus_client import REGISTRY
    REGISTRY.register(StoreCollector(store))

The collector reads `store.stats()` at scrape time: nothing is counted twice, nothing is
kept in a second place. Only numbers: no ids, no content, no secrets.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .store import SessionStore
from .writebehind import WriteBehindStore

__all__ = ["StoreCollector"]

_COUNTERS = (
    ("hot_hits", "Lookups answered from memory."),
    ("cold_hits", "Misses that a backend load found on disk."),
    ("misses", "Lookups found nowhere (including another user's session)."),
    ("loads", "Backend loads made (single flight)."),
    ("evictions", "Sessions the LRU dropped."),
    ("expired", "Anonymous sessions dropped after their idle TTL."),
    ("batches_flushed", "Flush transactions committed."),
    ("sessions_flushed", "Session rows written by flushes."),
    ("messages_flushed", "Message rows written by flushes."),
    ("total_failures", "Flush attempts that failed."),
    ("backpressure_rejections", "Writes refused with BackPressureError."),
    ("sessions_purged", "Sessions deleted by retention."),
    ("cleanup_failures", "Scheduled retention cleanups that failed."),
    ("backups_made", "Scheduled backups written (integrity-checked)."),
    ("backup_failures", "Scheduled backups that failed."),
    ("handoffs", "Sessions taken from another live instance (PostgreSQL)."),
    ("takeovers", "Sessions taken from an instance that had died (PostgreSQL)."),
    ("sessions_given", "Sessions let go to another instance (PostgreSQL)."),
    ("reads_elsewhere", "Reads answered from the database while another instance kept the session."),
    ("ownership_timeouts", "Requests that gave up waiting for another instance."),
    ("live_messages_sent", "Change notifications sent to instances following sessions kept here."),
)
_GAUGES = (
    ("hot_sessions", "Sessions in memory."),
    ("parked", "Dirty sessions the LRU wanted to evict, held until flushed."),
    ("dirty_sessions", "Sessions with changes not yet on disk."),
    ("dirty_messages", "Messages with changes not yet on disk."),
    ("dirty_bytes", "Text (code points) of changes not yet on disk; bounded by max_dirty_bytes."),
    ("queue_depth", "Requests waiting for the flush worker."),
    ("durable_waiters", "Callers waiting for a durable flush."),
    ("consecutive_failures", "Flush failures since the last success."),
    ("poisoned_sessions", "Sessions whose data the backend refused; kept in memory."),
    ("consecutive_backup_failures", "Scheduled backups failed since the last one that worked."),
    ("followed_sessions", "Sessions kept by other instances that streams here follow."),
    ("followers", "Instances following sessions kept here, summed over those sessions."),
)
# Known only once the store's background work has measured them (and never for a plain
# SessionStore): left out until then, rather than a zero that would read as "empty".
_MEASURED = (
    ("db_bytes", "database_bytes", "Database size: SQLite file plus WAL, or PostgreSQL tables with indexes."),
    ("wal_bytes", "wal_bytes", "SQLite's WAL file."),
    ("sessions_on_disk", "sessions_on_disk", "Sessions in the database (counted every few minutes)."),
    ("users_on_disk", "users_on_disk", "Users with sessions in the database (counted every few minutes)."),
    ("backups_kept", "backups_kept", "Backup files in the backup directory after the last rotation."),
)
_TIMES = (
    ("last_flush_at", "last_successful_flush", "When a flush last committed"),
    ("last_cleanup_at", "last_successful_cleanup", "When a retention cleanup last completed"),
    ("last_backup_at", "last_successful_backup", "When the last backup that worked started"),
    ("disk_counted_at", "disk_counted", "When sessions and users on disk were last counted"),
)


class StoreCollector(Collector):
    def __init__(self, store: SessionStore | WriteBehindStore, namespace: str = "writebehind") -> None:
        self._store = store
        self._ns = namespace

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        stats = self._store.stats()
        for name, doc in _COUNTERS:
            yield CounterMetricFamily(f"{self._ns}_{name}", doc, value=getattr(stats, name))
        for name, doc in _GAUGES:
            yield GaugeMetricFamily(f"{self._ns}_{name}", doc, value=getattr(stats, name))
        for name, metric, doc in _MEASURED:
            value = getattr(stats, name)
            if value is not None:
                yield GaugeMetricFamily(f"{self._ns}_{metric}", doc, value=value)
        for name, metric, doc in _TIMES:
            at = getattr(stats, name)
            yield GaugeMetricFamily(
                f"{self._ns}_{metric}_timestamp_seconds",
                f"{doc} (Unix time; 0 if never).",
                value=0.0 if at is None else at.timestamp(),
            )
        if stats.flush_latency_buckets:
            buckets = [
                ("+Inf" if bound == float("inf") else repr(bound / 1000), count)
                for bound, count in stats.flush_latency_buckets
            ]
            yield HistogramMetricFamily(
                f"{self._ns}_flush_duration_seconds",
                "Time a flush transaction took.",
                buckets=buckets,
                sum_value=stats.flush_latency_sum_ms / 1000,
            )
