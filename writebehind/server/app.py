"""The ASGI app: FastAPI, SSE through sse-starlette, the store created in the lifespan.

The store is made from `Config.from_env()` in the lifespan, started there and closed
there, so uvicorn's SIGTERM/SIGINT handling flushes everything before the process
exits. Nothing is global and nothing is created at import.

SSE event ids are `"<seq>:<offset>"` (plus `d` once the message is complete): the
client has message `seq` up to character `offset`. A client that reconnects with
`Last-Event-ID` gets exactly the rest of that message, every later one, then the
live tail; from memory, or from disk after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from cachetools import TTLCache
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Config
from ..errors import (
    BackPressureError,
    ConflictError,
    NotFound,
    StorageError,
    ValidationError,
    WriteBehindError,
)
from ..model import SessionRecord, SessionSummary, StoredMessage, UserId
from ..store import SessionStore
from ..writebehind import WriteBehindStore
from .responder import EchoResponder, Responder

__all__ = ["ServerSettings", "create_app"]

LOG = logging.getLogger("writebehind.server")
ACCESS = logging.getLogger("writebehind.access")
COOKIE: Final = "wb_anon"
_EVENT_ID: Final = re.compile(r"(\d{1,9}):(\d{1,12})(d?)")
STATIC: Final = Path(__file__).with_name("static")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The server's own settings (the store's are `Config`'s)."""

    tokens: Mapping[str, UserId] = field(default_factory=dict)
    token_delay_ms: int = 30
    max_body_bytes: int = 64 * 1024
    ping_seconds: float = 15.0
    secure_cookies: bool = False
    persist: bool = True  # False: the plain in-memory SessionStore (the load benchmark's baseline)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """`CHAT_DEMO_TOKENS=token:user,other:42` (digits mean an int user id),
        `CHAT_DEMO_TOKEN_DELAY_MS`, `CHAT_SERVER_MAX_BODY_BYTES`, `CHAT_SERVER_PING_SECONDS`."""
        env = os.environ if environ is None else environ
        tokens: dict[str, UserId] = {}
        for pair in filter(None, (p.strip() for p in env.get("CHAT_DEMO_TOKENS", "").split(","))):
            token, sep, user = pair.partition(":")
            if not sep or not token or not user:
                raise ValueError(f"CHAT_DEMO_TOKENS: {pair!r} is not token:user")
            tokens[token] = int(user) if user.isdigit() else user
        try:
            return cls(
                tokens=tokens,
                token_delay_ms=int(env.get("CHAT_DEMO_TOKEN_DELAY_MS", "30")),
                max_body_bytes=int(env.get("CHAT_SERVER_MAX_BODY_BYTES", str(64 * 1024))),
                ping_seconds=float(env.get("CHAT_SERVER_PING_SECONDS", "15")),
                persist=env.get("CHAT_SERVER_PERSIST", "1") not in ("0", "false", "no"),
            )
        except ValueError as exc:
            raise ValueError(f"bad server setting: {exc}") from None


# -- request and response models ---------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewSession(_Strict):
    title: str | None = Field(default=None, max_length=500)


class SessionPatch(_Strict):
    title: str | None = Field(default=None, max_length=500)
    status: str | None = Field(default=None, max_length=32)


class NewMessage(_Strict):
    content: str = Field(min_length=1)


class MessageOut(BaseModel):
    id: str
    seq: int
    role: str
    content: str
    created_at: str
    updated_at: str
    done: bool

    @classmethod
    def of(cls, m: StoredMessage) -> MessageOut:
        return cls(
            id=m.id,
            seq=m.seq,
            role=m.role,
            content=m.content,
            created_at=m.created_at.isoformat(),
            updated_at=m.updated_at.isoformat(),
            done=_done(m),
        )


class SessionOut(BaseModel):
    id: str
    title: str | None
    status: str
    created_at: str
    updated_at: str
    message_count: int
    messages: list[MessageOut] | None = None

    @classmethod
    def of(cls, s: SessionRecord | SessionSummary, with_messages: bool = False) -> SessionOut:
        messages = s.messages if isinstance(s, SessionRecord) else ()
        return cls(
            id=s.id,
            title=s.title,
            status=s.status,
            created_at=s.created_at.isoformat(),
            updated_at=s.updated_at.isoformat(),
            message_count=s.message_count if isinstance(s, SessionSummary) else len(messages),
            messages=[MessageOut.of(m) for m in messages] if with_messages else None,
        )


class SessionList(BaseModel):
    sessions: list[SessionOut]
    limit: int
    offset: int


class Turn(BaseModel):
    user_message: MessageOut
    assistant_message: MessageOut


def _done(m: StoredMessage) -> bool:
    return m.role != "assistant" or bool(m.metadata and m.metadata.get("done"))


# -- who is who ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """A signed-in user (`user_id`), or an anonymous one bound to a cookie (`binding`)."""

    user_id: UserId | None
    binding: str | None
    new_cookie: bool = False


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _caller(request: Request) -> Caller:
    settings: ServerSettings = request.app.state.settings
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        user = settings.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, "unauthorized", "unknown or malformed bearer token")
        return Caller(user, request.cookies.get(COOKIE))
    cookie = request.cookies.get(COOKIE)
    if cookie and re.fullmatch(r"[A-Za-z0-9_-]{20,100}", cookie):
        return Caller(None, cookie)
    return Caller(None, secrets.token_urlsafe(24), new_cookie=True)


def _remember(response: Response, caller: Caller, request: Request) -> None:
    if caller.new_cookie and caller.binding:
        settings: ServerSettings = request.app.state.settings
        response.set_cookie(
            COOKIE, caller.binding, httponly=True, samesite="strict", secure=settings.secure_cookies
        )


# -- the app -------------------------------------------------------------------------------------


class _BodyLimit:
    """413 for a request body over the limit, whether it says its length or streams it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_error(send, 413, "too_large", f"the body is over {self.limit} bytes")
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "too_large", f"the body is over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


async def _send_error(send: Send, status: int, kind: str, message: str) -> None:
    body = orjson.dumps({"error": {"type": kind, "message": message}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Broker:
    """Wakes the SSE streams of a session when it changes. One event per session,
    replaced at each notification, so a waiter never misses one that came after it
    read the session. Streams subscribe and unsubscribe, so a session nobody follows
    holds nothing here."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._listeners: dict[str, int] = {}

    def subscribe(self, session_id: str) -> None:
        self._listeners[session_id] = self._listeners.get(session_id, 0) + 1

    def unsubscribe(self, session_id: str) -> None:
        left = self._listeners.pop(session_id, 1) - 1
        if left > 0:
            self._listeners[session_id] = left
        else:
            self._events.pop(session_id, None)

    def waiter(self, session_id: str) -> asyncio.Event:
        return self._events.setdefault(session_id, asyncio.Event())

    def notify(self, session_id: str) -> None:
        event = self._events.pop(session_id, None)
        if event is not None:
            event.set()

    def __len__(self) -> int:
        return len(self._events)


def create_app(
    config: Config | None = None,
    settings: ServerSettings | None = None,
    responder: Responder | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = config or Config.from_env()
        store: Store
        if app.state.settings.persist:
            store = WriteBehindStore.from_config(cfg)
            await store.start()
        else:
            store = SessionStore(
                cfg.cache_size, anon_ttl_seconds=cfg.anon_ttl_seconds, max_message_bytes=cfg.max_message_bytes
            )
        app.state.store = store
        app.state.replies = set()
        try:
            yield
        finally:
            replies: set[asyncio.Task[None]] = app.state.replies
            for task in replies:
                task.cancel()
            await asyncio.gather(*replies, return_exceptions=True)
            if isinstance(store, WriteBehindStore):
                await store.aclose()  # the shutdown hook: everything dirty reaches disk
                LOG.info("store closed: flushed")

    app = FastAPI(
        title="writebehind chat", lifespan=lifespan, docs_url="/api/docs", openapi_url="/api/openapi.json"
    )
    app.state.settings = settings = settings or ServerSettings.from_env()
    app.state.responder = responder or EchoResponder(settings.token_delay_ms / 1000)
    app.state.broker = Broker()
    # The anonymous "my sessions" list, per cookie; bounded and forgotten when idle, like
    # the anonymous sessions themselves.
    app.state.anon_sessions = TTLCache(maxsize=100_000, ttl=(config or Config.from_env()).anon_ttl_seconds)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    _routes(app)
    _errors(app)
    return app


Store = SessionStore | WriteBehindStore


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _require_json(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")


def _check_id(session_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", session_id) is None:
        raise ApiError(404, "not_found", f"session {session_id!r} not found")
    return session_id


def _routes(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        stats = _store(request).stats()
        healthy = stats.consecutive_failures == 0
        return {
            "status": "ok" if healthy else "degraded",
            "dirty_sessions": stats.dirty_sessions,
            "consecutive_failures": stats.consecutive_failures,
            "last_flush_at": None if stats.last_flush_at is None else stats.last_flush_at.isoformat(),
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        try:
            from prometheus_client import CollectorRegistry, generate_latest

            from ..metrics import StoreCollector
        except ImportError:
            raise ApiError(404, "not_found", "install writebehind[metrics] for /metrics") from None
        registry = CollectorRegistry()
        registry.register(StoreCollector(_store(request)))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/api/sessions", status_code=201, dependencies=[Depends(_require_json)])
    async def create_session(body: NewSession, request: Request, response: Response) -> SessionOut:
        caller = _caller(request)
        record = await _store(request).ensure_session(
            user_id=caller.user_id,
            title=body.title,
            binding_token=caller.binding if caller.user_id is None else None,
            client_ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent", "")[:512] or None,
        )
        if caller.user_id is None and caller.binding:
            owned: dict[str, list[str]] = request.app.state.anon_sessions
            ids = owned.setdefault(caller.binding, [])
            ids.append(record.id)
            del ids[:-100]
        _remember(response, caller, request)
        return SessionOut.of(record)

    @app.get("/api/sessions")
    async def list_sessions(request: Request, limit: int = 50, offset: int = 0) -> SessionList:
        if not 1 <= limit <= 200 or offset < 0:
            raise ApiError(422, "validation", "limit must be 1-200 and offset >= 0")
        caller = _caller(request)
        store = _store(request)
        if caller.user_id is not None:
            summaries = await store.list_sessions(caller.user_id, limit=limit, offset=offset)
            return SessionList(sessions=[SessionOut.of(s) for s in summaries], limit=limit, offset=offset)
        records = []
        for sid in reversed(request.app.state.anon_sessions.get(caller.binding or "", [])):
            with contextlib.suppress(NotFound):
                records.append(await store.get_session(sid, user_id=None, binding_token=caller.binding))
        page = records[offset : offset + limit]
        return SessionList(sessions=[SessionOut.of(r) for r in page], limit=limit, offset=offset)

    @app.get("/api/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> SessionOut:
        caller = _caller(request)
        record = await _store(request).get_session(
            _check_id(session_id), user_id=caller.user_id, binding_token=caller.binding
        )
        return SessionOut.of(record, with_messages=True)

    @app.patch("/api/sessions/{session_id}", dependencies=[Depends(_require_json)])
    async def patch_session(session_id: str, body: SessionPatch, request: Request) -> SessionOut:
        caller = _caller(request)
        changes: dict[str, Any] = {k: v for k, v in body.model_dump(exclude_unset=True).items()}
        if "status" in changes and changes["status"] is None:
            raise ApiError(422, "validation", "status cannot be null")
        record = await _store(request).update_session(
            _check_id(session_id), user_id=caller.user_id, binding_token=caller.binding, **changes
        )
        return SessionOut.of(record)

    @app.delete("/api/sessions/{session_id}", status_code=204)
    async def delete_session(session_id: str, request: Request) -> Response:
        caller = _caller(request)
        await _store(request).delete_session(
            _check_id(session_id), user_id=caller.user_id, binding_token=caller.binding
        )
        return Response(status_code=204)

    @app.post("/api/sessions/{session_id}/claim")
    async def claim(session_id: str, request: Request) -> SessionOut:
        caller = _caller(request)
        if caller.user_id is None:
            raise ApiError(401, "unauthorized", "sign in to claim a session")
        record = await _store(request).claim(
            _check_id(session_id), user_id=caller.user_id, binding_token=caller.binding
        )
        return SessionOut.of(record)

    @app.post("/api/sessions/{session_id}/messages", status_code=202, dependencies=[Depends(_require_json)])
    async def post_message(session_id: str, body: NewMessage, request: Request) -> Turn:
        caller = _caller(request)
        store = _store(request)
        sid = _check_id(session_id)
        who: dict[str, Any] = {"user_id": caller.user_id, "binding_token": caller.binding}
        user_message = await store.append_message(sid, role="user", content=body.content, **who)
        reply = await store.append_message(sid, role="assistant", content="", metadata={"done": False}, **who)
        broker: Broker = request.app.state.broker
        broker.notify(sid)
        task = asyncio.create_task(
            _reply(store, broker, request.app.state.responder, sid, reply.id, who), name=f"reply-{sid}"
        )
        replies: set[asyncio.Task[None]] = request.app.state.replies
        replies.add(task)
        task.add_done_callback(replies.discard)
        return Turn(user_message=MessageOut.of(user_message), assistant_message=MessageOut.of(reply))

    @app.get("/api/sessions/{session_id}/events")
    async def events(session_id: str, request: Request) -> EventSourceResponse:
        caller = _caller(request)
        store = _store(request)
        sid = _check_id(session_id)
        who: dict[str, Any] = {"user_id": caller.user_id, "binding_token": caller.binding}
        messages = await store.get_messages(sid, **who)  # 404 before the stream starts
        position = _resume_point(request.headers.get("last-event-id"), messages)
        ACCESS.info("stream session=%s user=%s from=%s", sid, caller.user_id, position)
        settings: ServerSettings = request.app.state.settings
        return EventSourceResponse(
            _stream(store, request.app.state.broker, sid, who, position),
            ping=settings.ping_seconds,
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/api/me/export")
    async def export(request: Request) -> StreamingResponse:
        caller = _caller(request)
        if caller.user_id is None:
            raise ApiError(401, "unauthorized", "anonymous sessions are not stored; nothing to export")
        store = _store(request)
        if not isinstance(store, WriteBehindStore):
            raise ApiError(404, "not_found", "this server keeps nothing: persistence is off")
        return StreamingResponse(
            store.export_user_json(caller.user_id),
            media_type="application/json",
            headers={"Content-Disposition": 'attachment; filename="my-chats.json"'},
        )

    @app.delete("/api/me")
    async def erase_me(request: Request) -> dict[str, int]:
        caller = _caller(request)
        if caller.user_id is None:
            raise ApiError(401, "unauthorized", "sign in to erase your data")
        return {"deleted_sessions": await _store(request).delete_user(caller.user_id)}


async def _reply(
    store: Store,
    broker: Broker,
    responder: Responder,
    sid: str,
    message_id: str,
    who: dict[str, Any],
) -> None:
    """Stream the assistant's reply into its message, one `update_message` a token."""
    done: dict[str, Any] = {"done": True}
    try:
        history = await store.get_messages(sid, **who)
        async for token in responder(history[:-1]):
            await store.update_message(sid, message_id, append=token, **who)
            broker.notify(sid)
    except asyncio.CancelledError:
        done["interrupted"] = True  # the server is stopping: keep what was said, mark it
        raise
    except NotFound:
        return  # the session was deleted mid-reply
    finally:
        with contextlib.suppress(WriteBehindError):
            await store.update_message(sid, message_id, metadata=done, **who)
            broker.notify(sid)


def _resume_point(header: str | None, messages: tuple[StoredMessage, ...]) -> tuple[int, int, bool]:
    """(seq, offset, done) the client already has; (0, 0, False) for a new client."""
    if header is None or header == "":
        return 0, 0, False
    match = _EVENT_ID.fullmatch(header.strip())
    if match is None:
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID must look like <seq>:<offset>")
    seq, offset, done = int(match[1]), int(match[2]), bool(match[3])
    if seq == 0 and offset == 0:
        return 0, 0, False
    if not 1 <= seq <= len(messages) or offset > len(messages[seq - 1].content):
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID is ahead of this session")
    return seq, offset, done


async def _stream(
    store: Store,
    broker: Broker,
    sid: str,
    who: dict[str, Any],
    position: tuple[int, int, bool],
) -> AsyncIterator[ServerSentEvent]:
    seq, offset, sent_done = position
    broker.subscribe(sid)
    try:
        while True:
            changed = broker.waiter(sid)  # before reading: a change after the read wakes us
            try:
                messages = await store.get_messages(sid, after_seq=max(seq - 1, 0), **who)
            except NotFound:
                yield ServerSentEvent(event="gone", data="{}")
                return
            for m in messages:
                if m.seq < seq:
                    continue
                if m.seq > seq:
                    seq, offset, sent_done = m.seq, 0, False
                done = _done(m)
                if len(m.content) > offset or (done and not sent_done):
                    data = {"seq": m.seq, "id": m.id, "role": m.role, "offset": offset,
                            "text": m.content[offset:], "done": done}  # fmt: skip
                    offset, sent_done = len(m.content), done
                    yield ServerSentEvent(
                        id=f"{m.seq}:{offset}{'d' if done else ''}",
                        event="message",
                        data=orjson.dumps(data).decode(),
                    )
            await changed.wait()
    finally:  # the client left (or the server stops): forget this listener
        broker.unsubscribe(sid)


def _errors(app: FastAPI) -> None:
    def error(status: int, kind: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error(exc.status, exc.kind, exc.message)

    async def store_error(request: Request, exc: Exception) -> JSONResponse:
        table: list[tuple[type[Exception], int, str]] = [
            (NotFound, 404, "not_found"),
            (ValidationError, 422, "validation"),
            (BackPressureError, 503, "busy"),
            (ConflictError, 409, "conflict"),
            (StorageError, 503, "storage"),
            (WriteBehindError, 500, "error"),
        ]
        for kind, status, name in table:
            if isinstance(exc, kind):
                return error(status, name, str(exc))
        raise exc

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, "validation", problems or "invalid request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
        return error(exc.status_code, kind, str(exc.detail))

    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        StarletteHTTPException: http_error,
        ApiError: api_error,
        WriteBehindError: store_error,
        RequestValidationError: invalid,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
