from __future__ import annotations

from pathlib import Path

import pytest

from writebehind import Config, ConfigError
from writebehind.config import ENV_VARS


def test_defaults_work_out_of_the_box() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert config.db_path == Path("./chat_sessions.db")
    assert config.retention_days == 90 and config.cleanup_interval_hours == 24
    assert config.flush_interval_ms == 1000 and config.synchronous == "NORMAL"


def test_every_variable_is_read() -> None:
    env = {
        "CHAT_SESSION_DB_PATH": "/tmp/x.db",
        "CHAT_SESSION_RETENTION_DAYS": "30",
        "CHAT_SESSION_CLEANUP_INTERVAL_HOURS": "1.5",
        "CHAT_SESSION_FLUSH_INTERVAL_MS": "250",
        "CHAT_SESSION_FLUSH_BATCH": "100",
        "CHAT_SESSION_CACHE_SIZE": "50",
        "CHAT_SESSION_MAX_DIRTY": "60",
        "CHAT_SESSION_ANON_TTL_SECONDS": "120",
        "CHAT_SESSION_SYNCHRONOUS": "full",
        "CHAT_SESSION_MAX_FLUSHES_PER_SECOND": "5",
    }
    config = Config.from_env(env)
    assert config.db_path == Path("/tmp/x.db")
    assert (config.retention_days, config.cleanup_interval_hours) == (30, 1.5)
    assert (config.flush_interval_ms, config.flush_batch, config.cache_size) == (250, 100, 50)
    assert (config.max_dirty, config.anon_ttl_seconds) == (60, 120.0)
    assert config.synchronous == "FULL" and config.max_flushes_per_second == 5.0
    assert {var for var, _ in ENV_VARS.values()} >= set(env)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CHAT_SESSION_FLUSH_INTERVAL_MS", "soon"),
        ("CHAT_SESSION_FLUSH_INTERVAL_MS", "0"),
        ("CHAT_SESSION_CACHE_SIZE", "-1"),
        ("CHAT_SESSION_RETENTION_DAYS", "1.5"),
        ("CHAT_SESSION_SYNCHRONOUS", "sometimes"),
        ("CHAT_SESSION_MAX_FLUSHES_PER_SECOND", "nan-ish"),
        ("CHAT_SESSION_ANON_TTL_SECONDS", "nan"),
        ("CHAT_SESSION_CLEANUP_INTERVAL_HOURS", "inf"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        Config.from_env({var: value})


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().flush_batch = 1  # type: ignore[misc]


def test_the_ownership_timeouts_are_read_and_checked() -> None:
    config = Config.from_env(
        {"CHAT_SESSION_HANDOFF_TIMEOUT_SECONDS": "2.5", "CHAT_SESSION_HOLD_TIMEOUT_SECONDS": "30"}
    )
    assert (config.handoff_timeout_seconds, config.hold_timeout_seconds) == (2.5, 30.0)
    for var in ("CHAT_SESSION_HANDOFF_TIMEOUT_SECONDS", "CHAT_SESSION_HOLD_TIMEOUT_SECONDS"):
        for bad in ("0", "-1", "nan", "soon"):
            with pytest.raises(ConfigError, match=var):
                Config.from_env({var: bad})


def test_max_dirty_bytes_defaults_to_256_mib_and_is_read_and_checked() -> None:
    assert Config().max_dirty_bytes == 256 * 1024 * 1024
    assert Config.from_env({"CHAT_SESSION_MAX_DIRTY_BYTES": "65536"}).max_dirty_bytes == 65536
    for bad in ("0", "-1", "1.5", "256MiB", "nan"):
        with pytest.raises(ConfigError, match="CHAT_SESSION_MAX_DIRTY_BYTES"):
            Config.from_env({"CHAT_SESSION_MAX_DIRTY_BYTES": bad})
    with pytest.raises(ConfigError, match="max_dirty_bytes"):
        Config(max_dirty_bytes=0)
