"""The server's own settings (the store's are `writebehind.Config`'s), read from the environment.

Every variable is checked when the app is made, so a bad value stops the server before it
listens, with the variable's name in the message. Secrets (the JWT secret, the model's API
key) are kept out of every `repr`, so a settings object in a log or a traceback says
nothing it should not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from .. import UserId

__all__ = ["CookieSameSite", "JWTSettings", "ModelSettings", "ServerSettings"]

CookieSameSite = Literal["strict", "lax", "none"]
# RFC 7518 §3.2: an HS256 key at least as long as the hash (256 bits). A shorter secret
# is guessable offline from any one token, so it is refused rather than warned about.
MIN_HS256_SECRET_BYTES: Final = 32
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
_SAMESITE: Final[dict[str, CookieSameSite]] = {"strict": "strict", "lax": "lax", "none": "none"}


@dataclass(frozen=True, slots=True)
class JWTSettings:
    """Bearer tokens are JWTs: HS256 with a shared `key` (a secret), or RS256 with a PEM
    public `key`. `issuer` and `audience` are required and checked on every token, and so
    are `exp` and `sub` (the user id). `key_source` names the variable the key came from,
    for the messages about it."""

    algorithm: Literal["HS256", "RS256"]
    key: str = field(repr=False)
    issuer: str
    audience: str
    leeway_seconds: float = 30.0  # clock skew allowed on exp/nbf/iat
    key_source: str = "CHAT_AUTH_JWT_SECRET"


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """An OpenAI-compatible chat-completions endpoint writes the replies: `base_url` is
    what comes before `/chat/completions` (e.g. `http://127.0.0.1:11434/v1` for Ollama)."""

    base_url: str
    name: str
    api_key: str | None = field(default=None, repr=False)
    # The longest wait for the next bytes of a streamed answer (and for its first ones).
    timeout_seconds: float = 60.0
    system_prompt: str | None = None
    max_history: int = 100  # the most recent messages sent with each request


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the server does besides storing: who signs in, how replies stream, limits."""

    tokens: Mapping[str, UserId] = field(default_factory=dict, repr=False)
    token_delay_ms: int = 30
    max_body_bytes: int = 64 * 1024
    ping_seconds: float = 15.0
    # The anonymous visitor's cookie: always HttpOnly (the page never reads it, so script
    # never needs to); `Secure` and `SameSite` are settings.
    secure_cookies: bool = False
    cookie_samesite: CookieSameSite = "strict"
    persist: bool = True  # False: the plain in-memory SessionStore (the load benchmark's baseline)
    # How long an open stream may take to end once the server stops (Ctrl-C, SIGTERM):
    # streams end at once, this only bounds a stuck one.
    shutdown_grace_seconds: float = 5.0
    jwt: JWTSettings | None = None  # None: the demo tokens (`tokens`) sign people in
    model: ModelSettings | None = None  # None: the deterministic `EchoResponder`

    def __post_init__(self) -> None:
        if self.cookie_samesite not in ("strict", "lax", "none"):
            raise ValueError(f"cookie_samesite: {self.cookie_samesite!r} is not strict, lax or none")
        if self.cookie_samesite == "none" and not self.secure_cookies:
            raise ValueError(
                "CHAT_COOKIE_SAMESITE=none needs CHAT_COOKIE_SECURE=1 (browsers drop it otherwise)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """Read the settings; a bad value raises `ValueError` naming the variable.

        - `CHAT_DEMO_TOKENS=token:user,other:42` (digits mean an int user id): the demo
          sign-in, used unless JWT is configured.
        - `CHAT_AUTH_JWT_SECRET` (HS256, at least 32 bytes) or `CHAT_AUTH_JWT_PUBLIC_KEY`
          (RS256, PEM text) or `CHAT_AUTH_JWT_PUBLIC_KEY_FILE` (a PEM file): bearer tokens
          are JWTs, checked against `CHAT_AUTH_JWT_ISSUER` and `CHAT_AUTH_JWT_AUDIENCE` (both
          required then), with `CHAT_AUTH_JWT_LEEWAY_SECONDS` of clock skew (30). The demo
          tokens are off then, whatever `CHAT_DEMO_TOKENS` says.
        - `CHAT_COOKIE_SECURE` (0/1; `CHAT_SERVER_SECURE_COOKIES`, its older name, is read
          when it is unset), `CHAT_COOKIE_SAMESITE` (strict, lax or none; none needs Secure).
        - `CHAT_MODEL_BASE_URL`, `CHAT_MODEL_NAME` (required with it), `CHAT_MODEL_API_KEY`,
          `CHAT_MODEL_TIMEOUT_SECONDS` (60), `CHAT_MODEL_SYSTEM_PROMPT`,
          `CHAT_MODEL_MAX_HISTORY` (100): replies come from that endpoint.
        - `CHAT_DEMO_TOKEN_DELAY_MS`, `CHAT_SERVER_MAX_BODY_BYTES`, `CHAT_SERVER_PING_SECONDS`,
          `CHAT_SERVER_PERSIST`.
        """
        env = os.environ if environ is None else environ
        jwt = _jwt_from_env(env)
        tokens: dict[str, UserId] = {}
        for pair in filter(None, (p.strip() for p in env.get("CHAT_DEMO_TOKENS", "").split(","))):
            token, sep, user = pair.partition(":")
            if not sep or not token or not user:
                raise ValueError(f"CHAT_DEMO_TOKENS: {pair!r} is not token:user")
            tokens[token] = int(user) if user.isdigit() else user
        secure_name = "CHAT_COOKIE_SECURE" if "CHAT_COOKIE_SECURE" in env else "CHAT_SERVER_SECURE_COOKIES"
        raw_samesite = env.get("CHAT_COOKIE_SAMESITE", "strict").strip().lower()
        samesite = _SAMESITE.get(raw_samesite)
        if samesite is None:
            raise ValueError(f"CHAT_COOKIE_SAMESITE: {raw_samesite!r} is not strict, lax or none")
        return cls(
            tokens={} if jwt is not None else tokens,
            token_delay_ms=int(_number(env, "CHAT_DEMO_TOKEN_DELAY_MS", "30", int)),
            max_body_bytes=int(_number(env, "CHAT_SERVER_MAX_BODY_BYTES", str(64 * 1024), int)),
            ping_seconds=_number(env, "CHAT_SERVER_PING_SECONDS", "15", float),
            secure_cookies=_flag(env, secure_name, "0"),
            cookie_samesite=samesite,
            persist=_flag(env, "CHAT_SERVER_PERSIST", "1"),
            jwt=jwt,
            model=_model_from_env(env),
        )


def _number(env: Mapping[str, str], name: str, default: str, kind: type[int] | type[float]) -> float:
    raw = env.get(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}: {raw!r} is not a number") from None
    if value < 0 or value != value:  # NaN compares unequal to itself
        raise ValueError(f"{name}: must be >= 0, got {raw!r}")
    return value


def _flag(env: Mapping[str, str], name: str, default: str) -> bool:
    raw = env.get(name, default).strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}: {raw!r} is not one of 1, true, yes, on, 0, false, no, off")


def _text(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    value = env.get(name, "").strip()
    return value or None


def _jwt_from_env(env: Mapping[str, str]) -> JWTSettings | None:
    secret = env.get("CHAT_AUTH_JWT_SECRET") or None  # a secret is used as given, spaces included
    pem = _text(env, "CHAT_AUTH_JWT_PUBLIC_KEY")
    pem_file = _text(env, "CHAT_AUTH_JWT_PUBLIC_KEY_FILE")
    issuer = _text(env, "CHAT_AUTH_JWT_ISSUER")
    audience = _text(env, "CHAT_AUTH_JWT_AUDIENCE")
    given = [n for n, v in (("CHAT_AUTH_JWT_SECRET", secret), ("CHAT_AUTH_JWT_PUBLIC_KEY", pem),
                            ("CHAT_AUTH_JWT_PUBLIC_KEY_FILE", pem_file)) if v]  # fmt: skip
    if not given:
        if issuer or audience:
            raise ValueError(
                "CHAT_AUTH_JWT_ISSUER/CHAT_AUTH_JWT_AUDIENCE: set CHAT_AUTH_JWT_SECRET (HS256) or "
                "CHAT_AUTH_JWT_PUBLIC_KEY[_FILE] (RS256) too"
            )
        return None
    if len(given) > 1:
        # One key, one algorithm: accepting both is how a public key ends up used as an
        # HMAC secret (the classic algorithm confusion).
        raise ValueError(f"{' and '.join(given)}: set exactly one JWT key")
    for name, value in (("CHAT_AUTH_JWT_ISSUER", issuer), ("CHAT_AUTH_JWT_AUDIENCE", audience)):
        if value is None:
            raise ValueError(f"{name}: required with JWT auth (every token's claim is checked against it)")
    assert issuer is not None and audience is not None
    leeway = _number(env, "CHAT_AUTH_JWT_LEEWAY_SECONDS", "30", float)
    if secret is not None:
        if len(secret.encode()) < MIN_HS256_SECRET_BYTES:
            raise ValueError(
                f"CHAT_AUTH_JWT_SECRET: must be at least {MIN_HS256_SECRET_BYTES} bytes for HS256 "
                "(RFC 7518 §3.2)"
            )
        return JWTSettings("HS256", secret, issuer, audience, leeway, "CHAT_AUTH_JWT_SECRET")
    if pem_file is not None:
        try:
            pem = Path(pem_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"CHAT_AUTH_JWT_PUBLIC_KEY_FILE: cannot read {pem_file!r}: {exc}") from None
        source = "CHAT_AUTH_JWT_PUBLIC_KEY_FILE"
    else:
        source = "CHAT_AUTH_JWT_PUBLIC_KEY"
    assert pem is not None
    if "-----BEGIN" not in pem:
        raise ValueError(f"{source}: not a PEM public key (-----BEGIN PUBLIC KEY-----)")
    return JWTSettings("RS256", pem, issuer, audience, leeway, source)


def _model_from_env(env: Mapping[str, str]) -> ModelSettings | None:
    base_url = _text(env, "CHAT_MODEL_BASE_URL")
    name = _text(env, "CHAT_MODEL_NAME")
    if base_url is None:
        if name is not None or _text(env, "CHAT_MODEL_API_KEY") is not None:
            raise ValueError("CHAT_MODEL_BASE_URL: required with CHAT_MODEL_NAME/CHAT_MODEL_API_KEY")
        return None
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo the value: a URL may carry credentials.
        raise ValueError("CHAT_MODEL_BASE_URL: must be an http:// or https:// URL with a host")
    if name is None:
        raise ValueError("CHAT_MODEL_NAME: required with CHAT_MODEL_BASE_URL (the model to ask)")
    timeout = _number(env, "CHAT_MODEL_TIMEOUT_SECONDS", "60", float)
    if timeout == 0:
        raise ValueError("CHAT_MODEL_TIMEOUT_SECONDS: must be > 0")
    history = int(_number(env, "CHAT_MODEL_MAX_HISTORY", "100", int))
    if history == 0:
        raise ValueError("CHAT_MODEL_MAX_HISTORY: must be >= 1")
    return ModelSettings(
        base_url=base_url.rstrip("/"),
        name=name,
        api_key=_text(env, "CHAT_MODEL_API_KEY"),
        timeout_seconds=timeout,
        system_prompt=_text(env, "CHAT_MODEL_SYSTEM_PROMPT"),
        max_history=history,
    )
