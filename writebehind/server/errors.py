"""Every error the server answers has one shape, `{"error": {"type", "message"}}`, and one
place that maps exceptions to it: the store's errors through one table, the framework's
(validation, 404, 405) through their handlers. Nothing becomes a 500 by accident."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Route

from .. import (
    BackPressureError,
    ConflictError,
    NotFound,
    StorageError,
    ValidationError,
    WriteBehindError,
)

__all__ = ["ApiError", "allowed_methods", "error_response", "install_error_handlers"]


class ApiError(Exception):
    """An answer other than success, raised anywhere in a request: `status`, a stable
    machine-readable `kind`, and a message for a person."""

    def __init__(
        self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.headers = headers


def error_response(
    status: int, kind: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


# The store's errors, most specific first (a subclass before its base).
STORE_ERRORS: Final[tuple[tuple[type[WriteBehindError], int, str], ...]] = (
    (NotFound, 404, "not_found"),
    (ValidationError, 422, "validation"),
    (BackPressureError, 503, "busy"),
    (ConflictError, 409, "conflict"),
    (StorageError, 503, "storage"),
    (WriteBehindError, 500, "error"),
)

_HTTP_KINDS: Final = {404: "not_found", 405: "method_not_allowed"}


def allowed_methods(routes: Sequence[BaseRoute]) -> Callable[[Request], str]:
    """The `Allow` header of a 405: every method the path answers to (Starlette's own 405
    names only the methods of the first route that matched the path)."""
    table = [
        (route, frozenset(route.methods))
        for route in routes
        if isinstance(route, Route | APIRoute) and route.methods
    ]

    def allow(request: Request) -> str:
        methods = {m for route, ms in table if route.matches(request.scope)[0] is not Match.NONE for m in ms}
        return ", ".join(sorted(methods))

    return allow


def install_error_handlers(app: FastAPI, allow: Callable[[Request], str]) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    async def store_error(request: Request, exc: Exception) -> JSONResponse:
        for kind, status, name in STORE_ERRORS:
            if isinstance(exc, kind):
                return error_response(status, name, str(exc))
        raise exc

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(422, "validation", problems or "invalid request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = _HTTP_KINDS.get(exc.status_code, "http")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allow(request)
        return error_response(exc.status_code, kind, str(exc.detail), headers)

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        StarletteHTTPException: http_error,
        ApiError: api_error,
        WriteBehindError: store_error,
        RequestValidationError: invalid,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
