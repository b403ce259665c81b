"""Configuration: one frozen dataclass, every field with a default that works out of the box."""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError

__all__ = ["ENV_VARS", "Config", "decode_kek"]

SYNCHRONOUS_MODES: Final = ("OFF", "NORMAL", "FULL", "EXTRA")
_SCHEMA_RE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_YEAR_HOURS: Final = 366 * 24


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of a `WriteBehindStore` and its SQLite backend.

    Invalid values raise `ConfigError` naming the field (or, from `from_env`,
    the environment variable).
    """

    db_path: Path = Path("./chat_sessions.db")
    db_url: str | None = None
    db_schema: str = "writebehind"
    retention_days: int = 90
    cleanup_interval_hours: float = 24.0
    flush_interval_ms: int = 1000
    # 100, not 500: a transaction's snapshots (a few objects a session) stay below the cyclic
    # GC's young-generation threshold (700), so a flush triggers next to no collection. At
    # 500, flushing 1,000 streaming sessions a second triggered a dozen young collections
    # each promoting every stream's in-flight objects, hence a full collection (250-400 ms,
    # every stream paused) every 10-15 s; see benchmarks/test_sse_load.py.
    flush_batch: int = 100
    cache_size: int = 10_000
    max_dirty: int = 10_000
    # The text the pending writes added (content, tokens, metadata JSON, titles), counted in
    # code points: a few sessions streamed into faster than a slow disk takes them are few
    # sessions but unbounded memory. Reached, writes to persisted sessions wait for the disk
    # like `max_dirty`'s.
    max_dirty_bytes: int = 256 * 1024 * 1024
    anon_ttl_seconds: float = 3600.0
    synchronous: str = "NORMAL"
    # Transactions a second of the background flush: 250 of 100 sessions, the same ceiling
    # of sessions a second as the 50 of 500 it was before flush_batch was 100.
    max_flushes_per_second: float = 250.0
    busy_timeout_ms: int = 5000
    backpressure_timeout_ms: int = 1000
    shutdown_timeout_seconds: float = 10.0
    max_message_bytes: int = 1_000_000
    retry_max_delay_ms: int = 30_000
    # Several instances on PostgreSQL: how long a request waits for another instance to
    # answer a handoff, and for a reply streaming into the session there to end.
    handoff_timeout_seconds: float = 5.0
    hold_timeout_seconds: float = 120.0
    # Where dirty sessions go when the backend refuses them at shutdown; None: beside the
    # database file. Put it on another disk than the database's, the one most likely full.
    recovery_path: Path | None = None
    # Scheduled backups (writebehind.backups): a consistent copy of the SQLite file every
    # `backup_interval_hours` into `backup_dir`, the newest `backup_keep` kept and none older
    # than `retention_days`. None: no scheduled backups.
    backup_dir: Path | None = None
    backup_interval_hours: float = 6.0
    backup_keep: int = 28
    # Encryption at rest (writebehind.encryption): the key-encryption key, base64 of 32 bytes,
    # given inline or in a file (not both); None: nothing is encrypted. Never in repr().
    # `encryption_keys_path`: SQLite's data-keys file; None: beside the database, `<db>.keys`.
    encryption_key: str | None = field(default=None, repr=False)
    encryption_key_file: Path | None = None
    encryption_keys_path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.db_path, Path):
            object.__setattr__(self, "db_path", Path(self.db_path))
        if self.recovery_path is not None and not isinstance(self.recovery_path, Path):
            object.__setattr__(self, "recovery_path", Path(self.recovery_path))
        if self.backup_dir is not None and not isinstance(self.backup_dir, Path):
            object.__setattr__(self, "backup_dir", Path(self.backup_dir))
        for name in ("encryption_key_file", "encryption_keys_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Path):
                object.__setattr__(self, name, Path(getattr(self, name)))
        self._check_encryption()
        if not isinstance(self.db_schema, str) or _SCHEMA_RE.fullmatch(self.db_schema) is None:
            raise ConfigError(
                f"db_schema must be a lower-case SQL identifier (a-z, 0-9, _; at most 63), "
                f"got {self.db_schema!r}"
            )
        positive = (
            "cleanup_interval_hours",
            "flush_interval_ms",
            "flush_batch",
            "cache_size",
            "max_dirty",
            "max_dirty_bytes",
            "anon_ttl_seconds",
            "max_flushes_per_second",
            "max_message_bytes",
            "retry_max_delay_ms",
            "handoff_timeout_seconds",
            "hold_timeout_seconds",
            "backup_interval_hours",
            "backup_keep",
        )
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "retention_days",
            "busy_timeout_ms",
            "backpressure_timeout_ms",
            "shutdown_timeout_seconds",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.db_url is not None and not self.db_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"db_url must be a postgresql:// URL (unset means SQLite), got {self.db_url!r}")
        if self.backup_interval_hours > _YEAR_HOURS:
            raise ConfigError(
                f"backup_interval_hours must be at most {_YEAR_HOURS} (a year), "
                f"got {self.backup_interval_hours!r}"
            )
        if self.backup_dir is not None:
            if self.db_url is not None:
                raise ConfigError(
                    "backup_dir is for SQLite only: scheduled backups copy the database file; with "
                    "PostgreSQL (db_url) use pg_dump or the server's own backups, and unset it"
                )
            if self.retention_days == 0:
                raise ConfigError(
                    "backup_dir with retention_days 0: every backup would be deleted as soon as it "
                    "is made (backups are kept no longer than the retention period)"
                )
        mode = self.synchronous.upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {self.synchronous!r}")
        object.__setattr__(self, "synchronous", mode)

    def _check_encryption(self) -> None:
        if self.encryption_key is not None:
            decode_kek(self.encryption_key, "encryption_key")
            if self.encryption_key_file is not None:
                raise ConfigError("encryption_key and encryption_key_file are both set: give the key one way")
        on = self.encryption_key is not None or self.encryption_key_file is not None
        if self.encryption_keys_path is not None and (self.db_url is not None or not on):
            raise ConfigError(
                "encryption_keys_path is the SQLite data-keys file: it needs an encryption key, and with "
                "PostgreSQL the keys live in the schema <db_schema>_keys"
            )
        if on and self.db_url is not None and len(self.db_schema) > 58:
            raise ConfigError(
                "db_schema must be at most 58 characters with encryption (the keys live in <db_schema>_keys)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read `CHAT_SESSION_*` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (var, parse) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = parse(raw.strip())
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not a valid {parse.__name__}") from None
        try:
            return cls(**values)
        except ConfigError as exc:
            # Re-say the problem in terms of the variable the operator actually set.
            text = str(exc)
            for name, (var, _) in ENV_VARS.items():
                if text.startswith(name + " "):
                    raise ConfigError(f"{var}: {text}") from None
            raise


def decode_kek(text: str, name: str) -> bytes:
    """A key-encryption key from its base64 text; `ConfigError` naming `name` (never the key)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(
            f'{name} must be base64 of 32 random bytes (make one with: python -c "import base64, os; '
            'print(base64.b64encode(os.urandom(32)).decode())")'
        )
    return key


def _path(raw: str) -> Path:
    return Path(raw)


def _str(raw: str) -> str:
    return raw


_path.__name__ = "path"
_str.__name__ = "string"

ENV_VARS: Final[dict[str, tuple[str, Callable[[str], Any]]]] = {
    "db_path": ("CHAT_SESSION_DB_PATH", _path),
    "db_url": ("CHAT_SESSION_DB_URL", _str),
    "db_schema": ("CHAT_SESSION_DB_SCHEMA", _str),
    "retention_days": ("CHAT_SESSION_RETENTION_DAYS", int),
    "cleanup_interval_hours": ("CHAT_SESSION_CLEANUP_INTERVAL_HOURS", float),
    "flush_interval_ms": ("CHAT_SESSION_FLUSH_INTERVAL_MS", int),
    "flush_batch": ("CHAT_SESSION_FLUSH_BATCH", int),
    "cache_size": ("CHAT_SESSION_CACHE_SIZE", int),
    "max_dirty": ("CHAT_SESSION_MAX_DIRTY", int),
    "max_dirty_bytes": ("CHAT_SESSION_MAX_DIRTY_BYTES", int),
    "anon_ttl_seconds": ("CHAT_SESSION_ANON_TTL_SECONDS", float),
    "synchronous": ("CHAT_SESSION_SYNCHRONOUS", _str),
    "max_flushes_per_second": ("CHAT_SESSION_MAX_FLUSHES_PER_SECOND", float),
    "busy_timeout_ms": ("CHAT_SESSION_BUSY_TIMEOUT_MS", int),
    "backpressure_timeout_ms": ("CHAT_SESSION_BACKPRESSURE_TIMEOUT_MS", int),
    "shutdown_timeout_seconds": ("CHAT_SESSION_SHUTDOWN_TIMEOUT_SECONDS", float),
    "max_message_bytes": ("CHAT_SESSION_MAX_MESSAGE_BYTES", int),
    "retry_max_delay_ms": ("CHAT_SESSION_RETRY_MAX_DELAY_MS", int),
    "handoff_timeout_seconds": ("CHAT_SESSION_HANDOFF_TIMEOUT_SECONDS", float),
    "hold_timeout_seconds": ("CHAT_SESSION_HOLD_TIMEOUT_SECONDS", float),
    "recovery_path": ("CHAT_SESSION_RECOVERY_PATH", _path),
    "backup_dir": ("CHAT_SESSION_BACKUP_DIR", _path),
    "backup_interval_hours": ("CHAT_SESSION_BACKUP_INTERVAL_HOURS", float),
    "backup_keep": ("CHAT_SESSION_BACKUP_KEEP", int),
    "encryption_key": ("CHAT_SESSION_ENCRYPTION_KEY", _str),
    "encryption_key_file": ("CHAT_SESSION_ENCRYPTION_KEY_FILE", _path),
    "encryption_keys_path": ("CHAT_SESSION_ENCRYPTION_KEYS_PATH", _path),
}

assert set(ENV_VARS) == {f.name for f in fields(Config)}
