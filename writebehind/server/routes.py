"""The HTTP API and the page. Each handler: who calls (`auth`), what the store says, the
answer (`schemas`); errors are raised and mapped in one place (`errors`)."""

from __future__ import annotations

import contextlib
import logging
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path as FilePath
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from sse_starlette import EventSourceResponse

from .. import (
    NotFound,
    SessionRecord,
    SessionStore,
    SessionSummary,
    SessionTree,
    StoredMessage,
    UserId,
    WriteBehindStore,
)
from ..branches import Branches
from ..integrations import FRAMEWORK_STATUSES
from ..policy import preferences_id
from ..search import MAX_LIMIT, MAX_OFFSET, MAX_QUERY_CHARS, SearchHit, search_memory
from .auth import Caller, caller, remember
from .errors import ApiError
from .replies import Replies
from .schemas import (
    ARCHIVED,
    SESSION_ID_PATTERN,
    ArchivedFilter,
    ErrorBody,
    Family,
    MessageOut,
    MessagePage,
    NewMessage,
    NewSession,
    Preferences,
    PreferencesPatch,
    SearchHitOut,
    SearchOrder,
    SearchResults,
    SearchSegment,
    SessionList,
    SessionOut,
    SessionPatch,
    Stopped,
    SwitchBranch,
    Turn,
)
from .settings import ServerSettings
from .streaming import EVENT_ID_PATTERN, Broker, resume_point, stream

__all__ = ["router"]

ACCESS = logging.getLogger("writebehind.access")
STATIC: Final = FilePath(__file__).with_name("static")
_SESSION_ID: Final = re.compile(SESSION_ID_PATTERN)

Store = SessionStore | WriteBehindStore
router = APIRouter()

# Every error answer a route can give, with the same body (`errors`); the OpenAPI document
# lists exactly these per route.
_WHY: Final = {
    400: "a body that is not JSON, or a Last-Event-ID that is not `<seq>:<offset>[d]`",
    401: "an Authorization header that names nobody (the answer says `WWW-Authenticate: Bearer`, "
    'with `error="invalid_token"` for a refused token)',
    404: "no such session for this caller: another user's answers exactly the same",
    409: "the session is not in a state that allows it (the message says why)",
    413: "a body over CHAT_SERVER_MAX_BODY_BYTES",
    415: "a body that is not `application/json`",
    422: "a request the schema or the store refuses; the message names the field",
    503: "the store is busy (back-pressure) or failing; nothing changed, retry later",
}


def _answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": _WHY[status]} for status in statuses}


_BODY = (400, 401, 413, 415, 422, 503)  # a route that reads a JSON body, and says who calls
SessionId = Annotated[
    str, Path(description="a session id", json_schema_extra={"pattern": SESSION_ID_PATTERN})
]
# Who calls: the app's auth dependency (`create_app(auth=...)`), or an anonymous visitor.
Who = Annotated[Caller, Depends(caller)]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _replies(request: Request) -> Replies:
    replies: Replies = request.app.state.replies
    return replies


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def _require_json(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")


def _check_id(session_id: str) -> str:
    if _SESSION_ID.fullmatch(session_id) is None:
        raise ApiError(404, "not_found", f"session {session_id!r} not found")
    return session_id


def _out(
    store: Store,
    who: Caller,
    s: SessionRecord | SessionSummary | SessionTree,
    messages: list[MessageOut] | None = None,
) -> SessionOut:
    """A session of the caller's, as the API says it (`temporary` from the store's memory)."""
    return SessionOut.of(s, messages, temporary=store.is_temporary(s.id, **who.who))


def _messages_out(
    session: SessionRecord | SessionTree, messages: Sequence[StoredMessage], replies: Replies
) -> list[MessageOut]:
    """`messages` of `session`, each with its progress, parent and alternatives (from the
    session's tree: a `SessionTree` does, no copy of its messages needed)."""
    branches: Branches | None = session.branches
    count = session.message_count if isinstance(session, SessionTree) else len(session.messages)
    family = Family(branches, count, (m.seq for m in messages))
    return [MessageOut.of(m, replies.progress(session.id, m), family) for m in messages]


def _not_a_thread(session: SessionRecord | SessionTree) -> None:
    """An agent framework's thread (`writebehind.integrations`) is not a chat: every by-id
    route answers it exactly as a missing session, so that no chat client appends to it,
    renames, stops, branches or deletes it (the export still carries it)."""
    if session.status in FRAMEWORK_STATUSES:
        raise NotFound(session.id)


async def _chat(store: Store, session_id: str, who: Caller) -> SessionTree:
    """The caller's chat `session_id` (its tree, O(1)); else the `NotFound` of a missing
    session, for another user's session and for a framework's thread alike."""
    tree = await store.get_tree(_check_id(session_id), **who.who)
    _not_a_thread(tree)
    return tree


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    stats = _store(request).stats()
    healthy = stats.consecutive_failures == 0
    return {
        "status": "ok" if healthy else "degraded",
        "dirty_sessions": stats.dirty_sessions,
        "consecutive_failures": stats.consecutive_failures,
        "last_flush_at": None if stats.last_flush_at is None else stats.last_flush_at.isoformat(),
    }


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={404: {"model": ErrorBody, "description": "the `metrics` extra is not installed"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the store (with the `metrics` extra; 404 without it)."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from ..metrics import StoreCollector
    except ImportError:
        raise ApiError(404, "not_found", "install writebehind[metrics] for /metrics") from None
    registry = CollectorRegistry()
    registry.register(StoreCollector(_store(request)))
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.post(
    "/api/sessions", status_code=201, dependencies=[Depends(_require_json)], responses=_answers(*_BODY)
)
async def create_session(body: NewSession, request: Request, who: Who, response: Response) -> SessionOut:
    """A new session: kept (signed in), temporary (`temporary: true`, or the user's default),
    or anonymous (memory only, kept once claimed unless it is temporary)."""
    store = _store(request)
    record = await store.ensure_session(
        user_id=who.user_id,
        title=body.title,
        persist=None if body.temporary is None else not body.temporary,
        binding_token=who.binding if who.user_id is None else None,
        client_ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent", "")[:512] or None,
    )
    if who.user_id is None and who.binding:
        # The anonymous "my sessions" list, per cookie (see `application.create_app`).
        owned: dict[str, list[str]] = request.app.state.anon_sessions
        ids = owned.setdefault(who.binding, [])
        ids.append(record.id)
        del ids[:-100]
    remember(response, who, request)
    return _out(store, who, record)


def _folded(text: str) -> str:
    """`text` for caseless matching: compatibility forms and case folded (so "ﬁ" finds
    "fi", "STRASSE" finds "Straße"), composed (so a typed "é" finds a stored "e" + U+0301)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _matcher(
    q: str | None, archived: ArchivedFilter
) -> Callable[[SessionTree | SessionSummary], bool] | None:
    """Which sessions a listing keeps (None: all of them). `q` matches titles: every word
    of it must appear in the title, in any order and case."""
    terms = _folded(q).split() if q else []

    def keep(s: SessionTree | SessionSummary) -> bool:
        if s.status in FRAMEWORK_STATUSES:
            return False  # an agent framework's thread or state (writebehind.integrations)
        if archived != "include" and (s.status == ARCHIVED) != (archived == "only"):
            return False
        title = _folded(s.title or "")
        return all(term in title for term in terms)

    return keep


@router.get("/api/sessions", responses=_answers(401, 422, 503))
async def list_sessions(
    request: Request,
    who: Who,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    q: Annotated[
        str | None,
        Query(
            max_length=200,
            description="search: the sessions whose title has every word of `q`, in any case "
            "(titles only for now; the same parameter will search message text too)",
        ),
    ] = None,
    archived: Annotated[
        ArchivedFilter,
        Query(
            description="`exclude` archived sessions (status `archived`), list `only` them, or `include` them"
        ),
    ] = "exclude",
) -> SessionList:
    """My sessions, most recently updated first: by default those not archived."""
    store = _store(request)
    keep = _matcher(q, archived)
    page: list[SessionTree] | list[SessionSummary]
    if who.user_id is not None and keep is None:
        page = await store.list_sessions(who.user_id, limit=limit, offset=offset)
    elif who.user_id is not None:
        # The store lists by owner only: the filter runs here, over the user's whole list
        # (summaries, without messages), one read.
        mine = await store.list_sessions(who.user_id)
        page = [s for s in mine if keep is None or keep(s)][offset : offset + limit]
    else:
        trees: list[SessionTree] = []
        for sid in reversed(request.app.state.anon_sessions.get(who.binding or "", [])):
            with contextlib.suppress(NotFound):
                trees.append(await store.get_tree(sid, user_id=None, binding_token=who.binding))
        page = [t for t in trees if keep is None or keep(t)][offset : offset + limit]
    return SessionList(
        sessions=[_out(store, who, s) for s in page], limit=limit, offset=offset, q=q, archived=archived
    )


@router.get("/api/search", responses=_answers(401, 422, 503))
async def search(
    request: Request,
    who: Who,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=MAX_QUERY_CHARS,
            description="words, each to be found (as a substring, in any case) in a message; "
            "plain text: quotes, `*`, `-`, `:` and parentheses are searched for, never syntax",
        ),
    ],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    order: Annotated[SearchOrder, Query(description="`relevance` (best first) or `newest`")] = "relevance",
) -> SearchResults:
    """My messages that hold every word of `q`, with a snippet of each, a page at a time.
    Agent frameworks' threads are not chats: their messages are left out (`offset` and
    `next_offset` count them all the same, so a page may be short: follow `next_offset`)."""
    if who.user_id is None:
        raise ApiError(
            401,
            "unauthorized",
            "sign in to search: anonymous sessions have no history",
            {"WWW-Authenticate": "Bearer"},
        )
    store = _store(request)
    found: list[SearchHit]
    if isinstance(store, WriteBehindStore):
        found, next_offset = await _search_chats(store, who.user_id, q, limit, offset, order)
    else:  # persistence off: the caller's sessions in memory are all there is
        uid, skip = who.user_id, preferences_id(who.user_id)
        mine = [
            (e.id, e.title, list(e.messages))
            for e in store.tier.sessions_of(uid)
            if e.id != skip and e.status not in FRAMEWORK_STATUSES
        ]
        page = search_memory(mine, q, limit=limit, offset=offset, order=order)
        found, next_offset = list(page.hits), page.next_offset
    hits = [
        SearchHitOut(
            session_id=h.session_id,
            title=h.title,
            message_id=h.message_id,
            seq=h.seq,
            role=h.role,
            created_at=h.created_at.isoformat(),
            snippet=[SearchSegment(text=text, match=hit) for text, hit in h.snippet],
        )
        for h in found
    ]
    return SearchResults(hits=hits, q=q, order=order, limit=limit, offset=offset, next_offset=next_offset)


# How many pages of the store's answer one search request reads to fill its page when
# framework threads' hits are left out; a page still short after them says where to go on.
_SEARCH_ROUNDS: Final = 4


async def _search_chats(
    store: WriteBehindStore, user_id: UserId, q: str, limit: int, offset: int, order: SearchOrder
) -> tuple[list[SearchHit], int | None]:
    """A page of the store's search with the hits in framework threads left out, and the
    offset (in the store's answer) of the next page, None on the last."""
    threads: set[str] | None = None
    hits: list[SearchHit] = []
    at, next_offset = offset, None
    for round_ in range(_SEARCH_ROUNDS):
        # The first read is the page asked for: what every search of a user without threads
        # costs. Only after hits were left out, bigger ones fill the rest.
        size = limit if round_ == 0 else MAX_LIMIT
        page = await store.search(user_id, q, limit=size, offset=at, order=order)
        if page.hits and threads is None:
            # Which of the user's sessions are threads: the store's search knows no status
            # (summaries only, one read, as the filtered listing does).
            mine = await store.list_sessions(user_id)
            threads = {s.id for s in mine if s.status in FRAMEWORK_STATUSES}
        used = len(page.hits)
        for i, hit in enumerate(page.hits):
            if threads is None or hit.session_id not in threads:
                hits.append(hit)
            if len(hits) == limit:
                used = i + 1
                break
        at += used
        more = used < len(page.hits) or page.next_offset is not None
        next_offset = at if more and at <= MAX_OFFSET else None
        if len(hits) == limit or next_offset is None:
            break
    return hits, next_offset


@router.get("/api/sessions/{session_id}", responses=_answers(401, 404, 503))
async def get_session(session_id: SessionId, request: Request, who: Who) -> SessionOut:
    """The session with its active path (`messages`), each message with its `parent_seq`
    and its `alternatives`."""
    replies = _replies(request)
    store = _store(request)
    record = await store.get_session(_check_id(session_id), **who.who)
    _not_a_thread(record)
    await replies.settle(record.id, record.messages, who)
    return _out(store, who, record, _messages_out(record, record.path, replies))


@router.patch(
    "/api/sessions/{session_id}", dependencies=[Depends(_require_json)], responses=_answers(*_BODY, 404)
)
async def patch_session(session_id: SessionId, body: SessionPatch, request: Request, who: Who) -> SessionOut:
    changes: dict[str, Any] = body.model_dump(exclude_unset=True)
    store = _store(request)
    await _chat(store, session_id, who)
    if changes.get("status") in FRAMEWORK_STATUSES:
        # A chat made to look like a framework's thread would leave the chat API for good.
        raise ApiError(
            422, "validation", f"status: {changes['status']!r} is reserved for agent-framework threads"
        )
    record = await store.update_session(_check_id(session_id), **who.who, **changes)
    return _out(store, who, record)


@router.delete("/api/sessions/{session_id}", status_code=204, responses=_answers(401, 404, 503))
async def delete_session(session_id: SessionId, request: Request, who: Who) -> Response:
    sid = _check_id(session_id)
    store = _store(request)
    await _chat(store, sid, who)
    await store.delete_session(sid, **who.who)
    _broker(request).notify(sid)  # its open streams find it gone and say so
    return Response(status_code=204)


@router.post("/api/sessions/{session_id}/claim", responses=_answers(401, 404, 503))
async def claim(session_id: SessionId, request: Request, who: Who) -> SessionOut:
    if who.user_id is None:
        raise ApiError(401, "unauthorized", "sign in to claim a session", {"WWW-Authenticate": "Bearer"})
    store = _store(request)
    sid = _check_id(session_id)
    try:  # the user's own already (a no-op), or an anonymous one the caller holds
        tree = await store.get_tree(sid, user_id=who.user_id)
    except NotFound:
        tree = await store.get_tree(sid, user_id=None, binding_token=who.binding)
    _not_a_thread(tree)
    record = await store.claim(sid, user_id=who.user_id, binding_token=who.binding)
    return _out(store, who, record)  # a temporary chat stays temporary


@router.post(
    "/api/sessions/{session_id}/messages",
    status_code=202,
    dependencies=[Depends(_require_json)],
    responses=_answers(*_BODY, 404, 409),
)
async def post_message(session_id: SessionId, body: NewMessage, request: Request, who: Who) -> Turn:
    """Store the message and start its reply; a reply still streaming on the session ends
    first, then this one starts (see `replies`). With `parent_seq`, the message goes after
    that one, an alternative: an edit of a sent message is posted with the `parent_seq`
    of the message it replaces, and becomes its sibling; 409 while a reply is being
    written (stop it first), or for a `parent_seq` the session does not have."""
    replies = _replies(request)
    await _chat(_store(request), session_id, who)
    said, reply, tree = await replies.start(session_id, body.content, who, body.parent_seq)
    user_message, assistant_message = _messages_out(tree, (said, reply), replies)
    return Turn(user_message=user_message, assistant_message=assistant_message)


@router.get("/api/sessions/{session_id}/messages", responses=_answers(401, 404, 422, 503))
async def list_messages(
    session_id: SessionId,
    request: Request,
    who: Who,
    after_seq: Annotated[int, Query(ge=0, le=1_000_000_000, description="messages after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> MessagePage:
    """The messages of the session's active path, in order, one page: those with
    `seq > after_seq`, at most `limit`; `next_after_seq` names the next page. (Seqs grow
    along any path, so `after_seq` is a position on it.)"""
    replies = _replies(request)
    sid = _check_id(session_id)
    store = _store(request)
    # The page (one more: is there a next?), then the tree its alternatives come from (read
    # after it, so that it knows every message of the page). Neither copies the session.
    messages = await store.get_messages(sid, after_seq=after_seq, limit=limit + 1, **who.who)
    tree = await _chat(store, sid, who)
    await replies.settle(sid, messages, who)
    page = messages[:limit]
    return MessagePage(
        messages=_messages_out(tree, page, replies),
        after_seq=after_seq,
        limit=limit,
        next_after_seq=page[-1].seq if len(messages) > limit else None,
    )


@router.post("/api/sessions/{session_id}/stop", responses=_answers(401, 404, 503))
async def stop(session_id: SessionId, request: Request, who: Who) -> Stopped:
    """End the reply being written (and any waiting behind it): each keeps what was said
    and is marked `stopped`. Nothing to stop is not an error: `{"stopped": []}`."""
    replies = _replies(request)
    sid = _check_id(session_id)
    store = _store(request)
    await _chat(store, sid, who)  # 404 for another's, and for a framework's thread
    if isinstance(store, WriteBehindStore) and store.kept_elsewhere(sid):
        stopped = await replies.stop_elsewhere(sid, who)  # its replies run on another instance
    else:
        stopped = await replies.stop(sid, who)
    if not stopped:
        return Stopped(stopped=[])
    tree = await store.get_tree(sid, **who.who)
    return Stopped(stopped=_messages_out(tree, stopped, replies))


@router.post("/api/sessions/{session_id}/regenerate", status_code=202, responses=_answers(401, 404, 409, 503))
async def regenerate(session_id: SessionId, request: Request, who: Who) -> MessageOut:
    """A new reply to the question the last reply answers, written like any reply. It is
    appended as the last reply's sibling: the old one stays, an alternative (its
    `alternatives` lists both; `POST .../branch` goes back to it). 409 when the active path
    does not end with a reply, or a reply is still being written (stop it first)."""
    replies = _replies(request)
    sid = _check_id(session_id)
    await _chat(_store(request), sid, who)
    reply, tree = await replies.regenerate(sid, who)
    (out,) = _messages_out(tree, (reply,), replies)
    return out


@router.post(
    "/api/sessions/{session_id}/branch",
    dependencies=[Depends(_require_json)],
    responses=_answers(*_BODY, 404, 409),
)
async def switch_branch(session_id: SessionId, body: SwitchBranch, request: Request, who: Who) -> SessionOut:
    """Step to an alternative ("2/3"): the active path goes through message `seq`, on to
    its most recent continuation. Answers the session with its new path; open streams are
    told (a `branch` event). Writes one row; nothing is copied. 409 while a reply is being
    written, or for a `seq` the session does not have."""
    store = _store(request)
    replies = _replies(request)
    await _chat(store, session_id, who)
    tree, path = await replies.switch(session_id, body.seq, who)
    return _out(store, who, tree, _messages_out(tree, path, replies))


_EVENTS_DOC: Final = {
    "description": "Server-sent events along the session's active path: one `message` event per "
    "change of one message (`id: <seq>:<offset>[d]`, offsets in UTF-16 code units, `parent_seq` the "
    'message it follows), a `branch` event (`{"after_seq": n}`) when the path the client has is no '
    "longer the session's (keep what you show up to message n; the new path follows), a `gone` "
    "event when the session is erased, comments as pings.",
    "content": {
        "text/event-stream": {
            "schema": {"type": "string"},
            "example": 'id: 2:12\nevent: message\ndata: {"seq": 2, "id": "…", "role": "assistant", '
            '"parent_seq": 1, "offset": 0, "text": "You said: hi", "done": false, "interrupted": false, '
            '"stopped": false, "rewound": false, "error": null}\n\n',
        }
    },
}


@router.get(
    "/api/sessions/{session_id}/events",
    response_class=EventSourceResponse,
    responses={200: _EVENTS_DOC, **_answers(400, 401, 404, 503)},
)
async def events(
    session_id: SessionId,
    request: Request,
    who: Who,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="resume after what the client has: the id of the last event it got",
            json_schema_extra={"pattern": EVENT_ID_PATTERN},
        ),
    ] = None,
) -> EventSourceResponse:
    """The active path from the client's position, then the live tail (see `streaming`)."""
    store = _store(request)
    replies = _replies(request)
    sid = _check_id(session_id)
    record = await store.get_session(sid, **who.who)  # 404 before the stream starts
    _not_a_thread(record)
    await replies.settle(sid, record.path, who)
    start = resume_point(last_event_id, record)
    ACCESS.info("stream session=%s user=%s from=%s:%s", sid, who.user_id, start.seq, start.units)
    settings: ServerSettings = request.app.state.settings
    return EventSourceResponse(
        stream(store, _broker(request), replies, sid, who, start),
        ping=settings.ping_seconds,
        headers={"Cache-Control": "no-store"},
        shutdown_event=request.app.state.stopping,
        shutdown_grace_period=settings.shutdown_grace_seconds,
    )


_EXPORT_DOC: Final = {
    "description": "all my sessions and messages, one JSON document, streamed",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


@router.get(
    "/api/me/export",
    response_class=StreamingResponse,
    responses={200: _EXPORT_DOC, **_answers(401, 404, 503)},
)
async def export(request: Request, who: Who) -> StreamingResponse:
    if who.user_id is None:
        raise ApiError(
            401,
            "unauthorized",
            "anonymous sessions are not stored; nothing to export",
            {"WWW-Authenticate": "Bearer"},
        )
    store = _store(request)
    if not isinstance(store, WriteBehindStore):
        raise ApiError(404, "not_found", "this server keeps nothing: persistence is off")
    return StreamingResponse(
        store.export_user_json(who.user_id),
        media_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="my-chats.json"'},
    )


@router.get("/api/me/preferences", responses=_answers(401, 503))
async def get_preferences(request: Request, who: Who) -> Preferences:
    """My settings. An anonymous visitor's history is never kept: `keep_history` false."""
    if who.user_id is None:
        return Preferences(keep_history=False)
    prefs = await _store(request).user_preferences(who.user_id)
    return Preferences(keep_history=prefs.keep_history)


@router.patch("/api/me/preferences", dependencies=[Depends(_require_json)], responses=_answers(*_BODY))
async def patch_preferences(body: PreferencesPatch, request: Request, who: Who) -> Preferences:
    """`{"keep_history": false}`: my new chats are temporary by default (chats that exist
    keep what they are); on disk when answered, erased with `DELETE /api/me`. An anonymous
    visitor may say false (it is so already); true needs a signed-in user (401)."""
    if who.user_id is None:
        if body.keep_history:
            raise ApiError(
                401, "unauthorized", "sign in to keep your history", {"WWW-Authenticate": "Bearer"}
            )
        return Preferences(keep_history=False)
    prefs = await _store(request).set_user_preferences(who.user_id, keep_history=body.keep_history)
    return Preferences(keep_history=prefs.keep_history)


@router.delete("/api/me", responses=_answers(401, 503))
async def erase_me(request: Request, who: Who) -> dict[str, int]:
    if who.user_id is None:
        raise ApiError(401, "unauthorized", "sign in to erase your data", {"WWW-Authenticate": "Bearer"})
    store = _store(request)
    # What the user knows as their chats (the listing's: not their preferences, nor agent
    # threads), for the page to say; `deleted_sessions` counts everything erased.
    chats = sum(s.status not in FRAMEWORK_STATUSES for s in await store.list_sessions(who.user_id))
    deleted = await store.delete_user(who.user_id)
    _broker(request).notify_user(who.user_id)  # their open streams find it gone and say so
    return {"deleted_sessions": deleted, "deleted_chats": min(chats, deleted)}
