"""The OpenAPI document, made true where FastAPI cannot infer it: who may call (a bearer
token, or nobody: an anonymous visitor), and one error shape everywhere (FastAPI's own
`{"detail"}` validation shape is never what this server answers)."""

from __future__ import annotations

from typing import Any, Final

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

__all__ = ["install_openapi"]

_BEARER: Final = {
    "type": "http",
    "scheme": "bearer",
    "description": "a token the server maps to a user: a demo token (CHAT_DEMO_TOKENS), a JWT whose "
    "`sub` is the user (CHAT_AUTH_JWT_*), or what the app's own auth accepts. A refused token is a 401 "
    'with `WWW-Authenticate: Bearer error="invalid_token"`. Without one the caller is anonymous, bound '
    "to the HttpOnly `wb_anon` cookie the server sets, and nothing of theirs is written to disk.",
}
# These need a signed-in user; every other /api route also serves anonymous callers.
_SIGNED_IN: Final = {
    ("post", "/api/sessions/{session_id}/claim"),
    ("get", "/api/me/export"),
    ("delete", "/api/me"),
}
_ERROR_BODY: Final = {"$ref": "#/components/schemas/ErrorBody"}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = _BEARER
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if path.startswith("/api/"):
                    signed_in = (method, path) in _SIGNED_IN
                    operation["security"] = [{"bearer": []}] if signed_in else [{}, {"bearer": []}]
                invalid = operation.get("responses", {}).get("422")
                if invalid is not None and "HTTPValidationError" in str(invalid):
                    invalid["content"] = {"application/json": {"schema": _ERROR_BODY}}
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
