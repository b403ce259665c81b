"""Apps made with `create_app(...)` the way an integrating app makes them, for the tests
that serve them with `uvicorn --factory tests.e2e.apps:<name>` in a process of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException

from writebehind import StoredMessage
from writebehind.server import create_app
from writebehind.server.responder import ResponderError

__all__ = ["copy_counting_app", "header_auth_app", "responder_app"]


async def header_user(x_test_user: Annotated[str | None, Header()] = None) -> str | None:
    """An app's own auth, with a dependency of its own (a header, as a gateway in front of
    the app might set): `X-Test-User: name` is that user, none is anonymous, `nobody` is
    refused with the app's own exception."""
    if x_test_user == "nobody":
        raise HTTPException(401, "no such user here", headers={"WWW-Authenticate": 'Bearer realm="test"'})
    return x_test_user or None


def header_auth_app() -> FastAPI:
    return create_app(auth=header_user)


async def reversing_responder(history: Sequence[StoredMessage]) -> AsyncIterator[str]:
    """An app's own responder: the last message backwards, character by character, after
    how many messages it was given; "boom" fails in words for the user after a first
    token, "crash" fails as a bug would."""
    last = history[-1].content
    yield f"[{len(history)}] "
    if last == "boom":
        raise ResponderError("the calculator tool is down", "tool down")
    if last == "crash":
        raise RuntimeError("a bug")
    for character in reversed(last):
        yield character


def responder_app() -> FastAPI:
    return create_app(responder=reversing_responder)


# A "long" session for `copy_counting_app`: a copy of one of these on a request is the cost
# `get_tree` exists to avoid.
LONG = 1_000


def copy_counting_app() -> FastAPI:
    """The default app, counting the whole copies (`Entry.snapshot` with its messages) of
    sessions of `LONG` messages or more: `GET /test/copies` says how many were made."""
    from writebehind.store import Entry

    copies: dict[str, int] = {}
    snapshot = Entry.snapshot

    def counted(self: Entry, with_messages: bool = True) -> Any:
        if with_messages and len(self.messages) >= LONG:
            copies[self.id] = copies.get(self.id, 0) + 1
        return snapshot(self, with_messages)

    Entry.snapshot = counted  # type: ignore[method-assign]
    app = create_app()

    @app.get("/test/copies")
    async def read_copies() -> dict[str, int]:
        return copies

    return app
