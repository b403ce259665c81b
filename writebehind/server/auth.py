"""Who is calling: a signed-in user, or an anonymous visitor bound to a random HttpOnly
cookie. The store does the rest: another user's session, or another visitor's, looks
exactly like a missing one.

Authentication is one FastAPI dependency that returns the user's id, or None for an
anonymous caller, and raises (401) for credentials it refuses. `create_app(auth=...)`
installs it; the built-in ones are `DemoTokens` (`CHAT_DEMO_TOKENS`, what `make run` uses)
and `JWTBearer` (`CHAT_AUTH_JWT_*`). The anonymous cookie is this module's whatever the
auth: an auth dependency only says who the user is.

Your own, for example a session cookie your app already sets::

    async def my_user(request: Request) -> str | None:
        session = await my_sessions.get(request.cookies.get("my_session"))
        return None if session is None else session.user_id

    app = create_app(auth=my_user)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import Depends, Request, Response

from .. import UserId, ValidationError
from ..model import check_user_id
from .errors import ApiError
from .settings import JWTSettings, ServerSettings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    # What `create_app(auth=...)` takes: any FastAPI dependency (sync or async, with
    # sub-dependencies of its own) whose value is the user's id, or None for anonymous.
    Auth = Callable[..., UserId | None] | Callable[..., Awaitable[UserId | None]]

__all__ = [
    "COOKIE",
    "Caller",
    "DemoTokens",
    "JWTBearer",
    "auth_from_settings",
    "authenticate",
    "bearer_token",
    "caller",
    "invalid_token",
    "remember",
]

COOKIE: Final = "wb_anon"
_COOKIE_VALUE: Final = re.compile(r"[A-Za-z0-9_-]{20,100}")
# RFC 6750 §3: a request without credentials is told the scheme only; one whose token is
# refused is told `invalid_token` too.
_ASK: Final = {"WWW-Authenticate": "Bearer"}
_REFUSED: Final = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


@dataclass(frozen=True, slots=True)
class Caller:
    """A signed-in user (`user_id`), or an anonymous one bound to a cookie (`binding`)."""

    user_id: UserId | None
    binding: str | None
    new_cookie: bool = False

    @property
    def who(self) -> dict[str, Any]:
        """The store's keyword arguments that say who asks."""
        return {"user_id": self.user_id, "binding_token": self.binding}


def invalid_token(why: str) -> ApiError:
    """The 401 for a bearer token that is refused (`WWW-Authenticate: Bearer
    error="invalid_token"`). `why` is said to the client: never put the token in it."""
    return ApiError(401, "unauthorized", f"invalid bearer token: {why}", _REFUSED)


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer <token>`; None without an Authorization header.
    401 for one that is not a bearer token (another scheme, or no token)."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "the Authorization header is not `Bearer <token>`", _ASK)
    return token


async def authenticate(request: Request) -> UserId | None:
    """The app's auth dependency, the one every route depends on. `create_app` puts the
    app's own in its place (FastAPI's `dependency_overrides`, which is per app), so one
    router serves apps with different auth."""
    raise RuntimeError("no auth is installed: make the app with writebehind.server.create_app(auth=...)")


async def caller(request: Request, user: Annotated[UserId | None, Depends(authenticate)]) -> Caller:
    """The caller of `request`: the user the auth names, or an anonymous visitor bound to
    the `wb_anon` cookie (a new one when it has none)."""
    cookie = request.cookies.get(COOKIE)
    if user is not None:
        return Caller(user, cookie)  # the cookie names what a sign-in may claim
    if cookie and _COOKIE_VALUE.fullmatch(cookie):
        return Caller(None, cookie)
    return Caller(None, secrets.token_urlsafe(24), new_cookie=True)


def remember(response: Response, who: Caller, request: Request) -> None:
    """Set the anonymous caller's new cookie on `response`: HttpOnly always, `Secure` and
    `SameSite` as the settings say."""
    if who.new_cookie and who.binding:
        settings: ServerSettings = request.app.state.settings
        response.set_cookie(
            COOKIE,
            who.binding,
            httponly=True,
            samesite=settings.cookie_samesite,
            secure=settings.secure_cookies,
            path="/",
        )


class DemoTokens:
    """Bearer tokens from a fixed table (`CHAT_DEMO_TOKENS=token:user,...`): the demo's
    sign-in. No header: anonymous; a token not in the table: 401."""

    def __init__(self, tokens: Mapping[str, UserId]) -> None:
        self._tokens = dict(tokens)

    async def __call__(self, request: Request) -> UserId | None:
        token = bearer_token(request)
        if token is None:
            return None
        user = self._tokens.get(token)
        if user is None:
            raise invalid_token("unknown token")
        return user


class JWTBearer:
    """Bearer tokens that are JWTs (PyJWT, the `jwt` extra): the signature (HS256 with a
    shared secret, or RS256 with a public key: only that one algorithm, so `alg: none`
    and algorithm confusion are refused), `exp`, `iss` and `aud` are checked, and the user
    id is `sub`. No header: anonymous; any refused token: 401 with `WWW-Authenticate:
    Bearer error="invalid_token"` and a reason that never quotes the token.

    Raises `ValueError` naming the variable at construction for a key it cannot use (not
    a public key, an RSA key under 2048 bits), and `ImportError` without PyJWT."""

    def __init__(self, settings: JWTSettings) -> None:
        try:
            import jwt  # noqa: F401  (here: a missing extra fails at start, not at the first token)
        except ImportError:  # pragma: no cover - the `jwt` extra is in `test`
            raise ImportError("JWT auth needs PyJWT: pip install 'writebehind[jwt]'") from None
        self._settings = settings
        self._key: Any = settings.key
        if settings.algorithm == "RS256":
            self._key = _rsa_public_key(settings.key, settings.key_source)

    async def __call__(self, request: Request) -> UserId | None:
        token = bearer_token(request)
        if token is None:
            return None
        # Imported by name (a lookup in sys.modules once imported), so that the type checker
        # sees each one: an exception class that does not exist would fail only while an
        # `except` clause is being matched, as a 500.
        from jwt import decode
        from jwt.exceptions import (
            ExpiredSignatureError,
            ImmatureSignatureError,
            InvalidAlgorithmError,
            InvalidAudienceError,
            InvalidIssuerError,
            InvalidSignatureError,
            InvalidSubjectError,
            MissingRequiredClaimError,
            PyJWTError,
        )

        s = self._settings
        try:
            claims = decode(
                token,
                self._key,
                algorithms=[s.algorithm],
                issuer=s.issuer,
                audience=s.audience,
                leeway=s.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except ExpiredSignatureError:
            raise invalid_token("expired") from None
        except InvalidSignatureError:
            raise invalid_token("bad signature") from None
        except InvalidAlgorithmError:
            raise invalid_token(f"not signed with {s.algorithm}") from None
        except InvalidIssuerError:
            raise invalid_token("wrong issuer") from None
        except InvalidAudienceError:
            raise invalid_token("wrong audience") from None
        except InvalidSubjectError:
            raise invalid_token("its 'sub' is not a string") from None
        except MissingRequiredClaimError as exc:
            raise invalid_token(f"no {exc.claim!r} claim") from None
        except ImmatureSignatureError:
            raise invalid_token("not valid yet") from None
        except (PyJWTError, ValueError, TypeError):
            # Malformed in any other way (not three parts, bad base64 or JSON, a header
            # PyJWT cannot read): one answer, never a 500.
            raise invalid_token("malformed") from None
        try:
            return check_user_id(claims.get("sub"), "sub")
        except ValidationError:
            raise invalid_token("its 'sub' is not a usable user id") from None


def _rsa_public_key(pem: str, source: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: not a PEM public key ({exc})") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"{source}: RS256 needs an RSA public key, not {type(key).__name__}")
    if key.key_size < 2048:
        raise ValueError(f"{source}: the RSA key is {key.key_size} bits; RS256 needs at least 2048")
    return key


def auth_from_settings(settings: ServerSettings) -> Auth:
    """The built-in auth the settings choose: `JWTBearer` when a JWT key is configured,
    else `DemoTokens` (an empty table: everyone is anonymous)."""
    if settings.jwt is not None:
        return JWTBearer(settings.jwt)
    return DemoTokens(settings.tokens)
