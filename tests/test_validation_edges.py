"""Bad settings and bad input at the edges: each is refused with a typed error that names
the field (or the environment variable an operator set), before anything changes."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from writebehind import Config, ConfigError, SessionStore, ValidationError
from writebehind.metrics import StoreCollector

from .conftest import StoreFactory
from .reliability.helpers import on_disk


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CHAT_SESSION_RETENTION_DAYS", "-1", "retention_days must be >= 0, got -1"),
        ("CHAT_SESSION_SHUTDOWN_TIMEOUT_SECONDS", "-0.5", "shutdown_timeout_seconds must be >= 0, got -0.5"),
        (
            "CHAT_SESSION_DB_URL",
            "mysql://db/chat",
            "db_url must be a postgresql:// URL (unset means SQLite), got 'mysql://db/chat'",
        ),
    ],
)
def test_a_setting_out_of_range_is_refused_naming_the_variable(var: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({var: value})
    assert str(caught.value) == f"{var}: {message}"


def test_a_store_of_no_sessions_is_refused_naming_maxsize() -> None:
    with pytest.raises(ValidationError) as caught:
        SessionStore(0)
    assert caught.value.field == "maxsize"
    assert SessionStore(5).maxsize == 5


def test_an_argument_not_given_reads_as_unset_in_help() -> None:
    # `None` clears a title; UNSET leaves it as it is. help() must show which is the default.
    title = inspect.signature(SessionStore.update_session).parameters["title"]
    assert str(title) == "title: 'str | None' = UNSET"


async def test_metadata_over_64_kib_is_refused_naming_the_field_and_nothing_changes(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    with pytest.raises(ValidationError) as caught:
        await store.append_message("s", user_id=1, role="user", content="x", metadata={"blob": "z" * 70_000})
    assert caught.value.field == "metadata"
    assert "encodes to more than 65536 bytes" in str(caught.value)
    await store.flush()
    assert (await store.get_session("s", user_id=1)).messages == ()
    assert on_disk(db_path) == {}


async def test_metrics_of_a_plain_in_memory_store_have_no_flush_histogram() -> None:
    store = SessionStore()
    await store.ensure_session("s", user_id="alice")
    await store.get_session("s", user_id="alice")
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()
    assert "writebehind_hot_sessions 1.0" in text.splitlines()
    assert "writebehind_hot_hits_total 1.0" in text.splitlines()
    assert "writebehind_last_successful_flush_timestamp_seconds 0.0" in text.splitlines()
    assert "flush_duration_seconds" not in text  # it never flushes: no empty histogram either
    assert "alice" not in text
