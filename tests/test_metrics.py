"""The Prometheus collector exposes stats() and nothing else: no ids, no content."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from writebehind.metrics import StoreCollector

from .conftest import StoreFactory


async def test_metrics_expose_stats_and_no_content(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("secret-session-id", user_id="alice", csrf_token="CSRF-TOKEN")
    await store.append_message("secret-session-id", user_id="alice", role="user", content="PRIVATE")
    await store.flush()
    await store.append_message("secret-session-id", user_id="alice", role="user", content="PRIVATE 2")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()

    def value(name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[-1])

    assert value("writebehind_batches_flushed_total") == 1
    assert value("writebehind_messages_flushed_total") == 1
    assert value("writebehind_dirty_sessions") == 1
    assert value("writebehind_dirty_bytes") == len("PRIVATE 2")
    assert value("writebehind_hot_sessions") == 1
    assert value("writebehind_consecutive_failures") == 0
    assert value("writebehind_last_successful_flush_timestamp_seconds") > 1.7e9
    assert value("writebehind_flush_duration_seconds_count") == 1
    assert 'writebehind_flush_duration_seconds_bucket{le="+Inf"} 1.0' in text
    for private in ("secret-session-id", "alice", "PRIVATE", "CSRF-TOKEN"):
        assert private not in text
