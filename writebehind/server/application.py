"""`create_app()` and its lifespan: the store is made from `Config.from_env()` in the
lifespan, started there and closed there, so uvicorn's SIGTERM/SIGINT handling flushes
everything before the process exits. Nothing is global and nothing is created at import.

(This module is `application`, not `app`: `writebehind.server.app` is the ASGI app that
`uvicorn writebehind.server:app` serves, and one name cannot be both.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import anyio
from cachetools import TTLCache
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import Config, SessionStore, WriteBehindError, WriteBehindStore
from .auth import auth_from_settings, authenticate
from .errors import allowed_methods, install_error_handlers
from .middleware import BodyLimit
from .openapi import install_openapi
from .replies import Replies
from .responder import Responder, aclose_responder, responder_from_settings
from .routes import router
from .settings import ServerSettings
from .streaming import Broker

if TYPE_CHECKING:
    from .auth import Auth

__all__ = ["ONE_WORKER", "ServerApp", "create_app", "uvicorn_workers"]

LOG = logging.getLogger("writebehind.server")
ONE_WORKER: Final = (
    "SQLite allows one store per database file: run one server worker (--workers 1), "
    "or use PostgreSQL (CHAT_SESSION_DB_URL) for several."
)


class StartupRefused(Exception):
    """The server cannot start as configured; the message says why and what to do."""


def uvicorn_workers() -> int:
    """How many worker processes uvicorn's supervisor runs this app in: 1 outside one.

    uvicorn gives an app no public way to know it has siblings. Its supervisor starts each
    worker process with its `Config` as an argument (`uvicorn._subprocess.get_subprocess`),
    which the process object keeps; that is what is read here. `--reload` runs one worker
    at a time, whatever `workers` says.
    """
    config = getattr(multiprocessing.current_process(), "_kwargs", {}).get("config")
    if config is None or not type(config).__module__.startswith("uvicorn"):
        return 1
    workers = getattr(config, "workers", 1)
    if getattr(config, "reload", False) or not isinstance(workers, int):
        return 1
    return workers


Store = SessionStore | WriteBehindStore


def create_app(
    config: Config | None = None,
    settings: ServerSettings | None = None,
    responder: Responder | None = None,
    auth: Auth | None = None,
) -> FastAPI:
    """The chat app. `config` (default `Config.from_env()`) is the store's, `settings`
    (default `ServerSettings.from_env()`) the server's. `responder` writes the replies
    (default: `OpenAIChatResponder` when `CHAT_MODEL_BASE_URL` is set, else
    `EchoResponder`). `auth` is a FastAPI dependency returning the caller's user id, or
    None for an anonymous caller, and raising for credentials it refuses (default:
    `JWTBearer` when a `CHAT_AUTH_JWT_*` key is set, else `DemoTokens`). Raises
    `ValueError` for a bad setting."""
    settings = settings or ServerSettings.from_env()
    config = config or Config.from_env()
    auth = auth or auth_from_settings(settings)  # a JWT key it cannot use: ValueError, here
    responder = responder or responder_from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store: Store
        try:
            if settings.persist and config.db_url is None and uvicorn_workers() > 1:
                raise StartupRefused(ONE_WORKER)
            if settings.persist:
                store = WriteBehindStore.from_config(config)
                await store.start()  # a second store on one SQLite file: DatabaseLockedError
            else:
                store = SessionStore(
                    config.cache_size,
                    anon_ttl_seconds=config.anon_ttl_seconds,
                    max_message_bytes=config.max_message_bytes,
                )
        except (StartupRefused, WriteBehindError) as exc:
            app.state.startup_error = str(exc)  # said in one line (`_OneLineStartupError`)
            raise
        broker = Broker()
        replies = Replies(store, app.state.responder, broker.notify)
        if isinstance(store, WriteBehindStore):
            store.on_signal(replies.signalled)  # a Stop sent to another instance
        app.state.store, app.state.broker, app.state.replies = store, broker, replies
        # sse-starlette sets this when the server starts to stop (Ctrl-C, SIGTERM); the
        # streams then end cleanly instead of being cut, which uvicorn reports as an error.
        app.state.stopping = stopping = anyio.Event()

        async def close_streams() -> None:
            await stopping.wait()
            # The replies first: each stores what was said, marked interrupted, and wakes
            # its streams; then each stream sends what it has not sent (those marks
            # included) and ends, within sse-starlette's grace period.
            # Shielded: the lifespan's end cancels this task, and must not cut a reply a
            # second time while it stores its interrupted mark.
            await asyncio.shield(replies.aclose())
            broker.close()

        closer = asyncio.create_task(close_streams(), name="writebehind-close-streams")
        try:
            yield
        finally:
            closer.cancel()
            broker.close()
            await replies.aclose()  # each cut reply keeps what was said, marked interrupted
            await aclose_responder(app.state.responder)  # its connections to a model server
            if isinstance(store, WriteBehindStore):
                await store.aclose()  # the shutdown hook: everything dirty reaches disk
                LOG.info("store closed: flushed")

    app = FastAPI(
        title="writebehind chat", lifespan=lifespan, docs_url="/api/docs", openapi_url="/api/openapi.json"
    )
    app.state.settings = settings
    app.state.responder = responder
    # Every route asks `caller`, which asks `authenticate`: this app's auth answers it.
    app.dependency_overrides[authenticate] = auth
    app.state.startup_error = None
    # The anonymous "my sessions" list, per cookie; bounded and forgotten when idle, like
    # the anonymous sessions themselves.
    app.state.anon_sessions = TTLCache(maxsize=100_000, ttl=config.anon_ttl_seconds)
    app.include_router(router)
    install_openapi(app)
    install_error_handlers(app, allowed_methods([*router.routes, *app.router.routes]))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_OneLineStartupError)
    return app


class _OneLineStartupError:
    """A startup the store refuses (locked, not a database, a bad setting) is reported by
    uvicorn as its message, one line, instead of a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        outer = scope.get("app")

        async def said(message: Message) -> None:
            error = getattr(getattr(outer, "state", None), "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": error}
            await send(message)

        await self.app(scope, receive, said)


class ServerApp:
    """The ASGI app `uvicorn writebehind.server:app` serves: `create_app()` from the
    environment, made when uvicorn first calls it (its lifespan), not at import."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            try:
                self._app = create_app()
            except ValueError as exc:  # a bad setting: say so and do not start
                if scope["type"] != "lifespan":
                    raise
                await receive()
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
        await self._app(scope, receive, send)
