"""The server's own settings (the store's are `writebehind.Config`'s), read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import UserId

__all__ = ["ServerSettings"]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the server does besides storing: who signs in, how replies stream, limits."""

    tokens: Mapping[str, UserId] = field(default_factory=dict)
    token_delay_ms: int = 30
    max_body_bytes: int = 64 * 1024
    ping_seconds: float = 15.0
    secure_cookies: bool = False
    persist: bool = True  # False: the plain in-memory SessionStore (the load benchmark's baseline)
    # How long an open stream may take to end once the server stops (Ctrl-C, SIGTERM):
    # streams end at once, this only bounds a stuck one.
    shutdown_grace_seconds: float = 5.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """`CHAT_DEMO_TOKENS=token:user,other:42` (digits mean an int user id),
        `CHAT_DEMO_TOKEN_DELAY_MS`, `CHAT_SERVER_MAX_BODY_BYTES`, `CHAT_SERVER_PING_SECONDS`,
        `CHAT_SERVER_SECURE_COOKIES`, `CHAT_SERVER_PERSIST`. A bad value raises `ValueError`
        naming the variable."""
        env = os.environ if environ is None else environ
        tokens: dict[str, UserId] = {}
        for pair in filter(None, (p.strip() for p in env.get("CHAT_DEMO_TOKENS", "").split(","))):
            token, sep, user = pair.partition(":")
            if not sep or not token or not user:
                raise ValueError(f"CHAT_DEMO_TOKENS: {pair!r} is not token:user")
            tokens[token] = int(user) if user.isdigit() else user

        def number(name: str, default: str, kind: type[int] | type[float]) -> float:
            raw = env.get(name, default)
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a number") from None
            if value < 0:
                raise ValueError(f"{name}: must be >= 0, got {raw!r}")
            return value

        return cls(
            tokens=tokens,
            token_delay_ms=int(number("CHAT_DEMO_TOKEN_DELAY_MS", "30", int)),
            max_body_bytes=int(number("CHAT_SERVER_MAX_BODY_BYTES", str(64 * 1024), int)),
            ping_seconds=number("CHAT_SERVER_PING_SECONDS", "15", float),
            secure_cookies=_flag(env.get("CHAT_SERVER_SECURE_COOKIES", "0")),
            persist=_flag(env.get("CHAT_SERVER_PERSIST", "1")),
        )


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")
