"""Who is calling: a signed-in user (a bearer token), or an anonymous visitor bound to a
random HttpOnly cookie. The store does the rest: another user's session, or another
visitor's, looks exactly like a missing one."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from fastapi import Request, Response

from .. import UserId
from .errors import ApiError
from .settings import ServerSettings

__all__ = ["COOKIE", "Caller", "caller", "remember"]

COOKIE: Final = "wb_anon"
_COOKIE_VALUE: Final = re.compile(r"[A-Za-z0-9_-]{20,100}")


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


def caller(request: Request) -> Caller:
    """The caller of `request`; 401 for an `Authorization` header that names nobody."""
    settings: ServerSettings = request.app.state.settings
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        user = settings.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(
                401, "unauthorized", "unknown or malformed bearer token", {"WWW-Authenticate": "Bearer"}
            )
        return Caller(user, request.cookies.get(COOKIE))
    cookie = request.cookies.get(COOKIE)
    if cookie and _COOKIE_VALUE.fullmatch(cookie):
        return Caller(None, cookie)
    return Caller(None, secrets.token_urlsafe(24), new_cookie=True)


def remember(response: Response, who: Caller, request: Request) -> None:
    """Set the anonymous caller's new cookie on `response`."""
    if who.new_cookie and who.binding:
        settings: ServerSettings = request.app.state.settings
        response.set_cookie(
            COOKIE, who.binding, httponly=True, samesite="strict", secure=settings.secure_cookies
        )
