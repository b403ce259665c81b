"""What the API reads and writes: request bodies (strict: an unknown field is a 422) and
responses."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from .. import SessionRecord, SessionSummary, SessionTree, StoredMessage
from ..branches import Branches, parent_of
from .replies import Progress, error_of

__all__ = [
    "ACTIVE",
    "ARCHIVED",
    "ArchivedFilter",
    "ErrorBody",
    "ErrorDetail",
    "Family",
    "MessageOut",
    "MessagePage",
    "NewMessage",
    "NewSession",
    "Preferences",
    "PreferencesPatch",
    "SessionList",
    "SessionOut",
    "SessionPatch",
    "Stopped",
    "SwitchBranch",
    "Turn",
]

# What the store accepts (writebehind.model), said in the schema too.
SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
STATUS_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
# Archiving is a session status: `PATCH {"status": "archived"}` archives, `{"status":
# "active"}` (the store's default status) brings it back. Any other status counts as not
# archived. Listings leave archived sessions out unless asked (`archived=only|include`).
ACTIVE: Final = "active"
ARCHIVED: Final = "archived"
ArchivedFilter = Literal["exclude", "only", "include"]
SearchOrder = Literal["relevance", "newest"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewSession(_Strict):
    title: str | None = Field(default=None, max_length=500)
    temporary: StrictBool | None = Field(
        default=None,
        description="true: a temporary chat, never written to disk, gone after an idle hour or a restart, "
        "never kept by a claim; false: kept (for a signed-in user); absent or null: the user's default "
        "(`/api/me/preferences`)",
    )


class Preferences(BaseModel):
    keep_history: bool = Field(
        description="false: my new chats are temporary unless created with `temporary: false` "
        "(an anonymous visitor's history is never kept)"
    )


class PreferencesPatch(_Strict):
    keep_history: StrictBool


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class SessionPatch(_Strict):
    """Only the fields given change; `title: null` clears the title."""

    title: str | None = Field(default=None, max_length=500)
    # A status can be changed, not removed: absent is allowed, null is not.
    status: str = Field(  # type: ignore[assignment]
        default=None, pattern=STATUS_PATTERN, validate_default=False, json_schema_extra=_no_default
    )


_MAX_SEQ: Final = 1_000_000_000


def _a_number(value: Any) -> Any:
    """JSON Schema's integer, and only that: 3 and 3.0 are one (a JSON encoder may write
    either); "3" and true are not (pydantic's lax mode would take them)."""
    if isinstance(value, (str, bool)):
        raise ValueError("must be an integer")  # pydantic reports a ValueError as a 422
    return value


class NewMessage(_Strict):
    content: str = Field(min_length=1)
    parent_seq: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_SEQ,
        description="where the message goes: after message `parent_seq` (0: at the start), as an "
        "alternative to that message's other continuations. To edit a sent message, give the "
        "`parent_seq` of the message it replaces: the edit becomes its sibling (2 of 2) and gets a "
        "reply. Absent or null: after the end of the active path (a new turn). With it, 409 while a "
        "reply is being written (stop it first)",
    )

    @field_validator("parent_seq", mode="before")
    @classmethod
    def integer_only(cls, value: Any) -> Any:
        return _a_number(value)


class SwitchBranch(_Strict):
    seq: int = Field(
        ge=1,
        le=_MAX_SEQ,
        description="a message: the active path goes through it, on to its most recent continuation",
    )

    @field_validator("seq", mode="before")
    @classmethod
    def integer_only(cls, value: Any) -> Any:
        return _a_number(value)


class ErrorDetail(BaseModel):
    type: str = Field(description="stable and machine-readable: not_found, validation, unauthorized, ...")
    message: str = Field(description="for a person; names the field or the session, never content")


class ErrorBody(BaseModel):
    """Every answer that is not a success."""

    error: ErrorDetail


class Family:
    """Where messages stand in their session's tree (`writebehind.branches`): each one's
    parent and alternatives, for a few messages of one session. Built from the branch
    points alone (`SessionTree.branches`, or a record's): O(branch points + messages asked
    about), whatever the session's length; nothing of its messages is read."""

    __slots__ = ("_branches", "_siblings")

    def __init__(self, branches: Branches | None, message_count: int, seqs: Iterable[int]) -> None:
        self._branches = branches
        self._siblings: dict[int, list[int]] = {}
        if branches is None:
            return  # a session that never branched: no message has an alternative
        parents = branches.parents
        # A message's children are the one after it (unless that one starts elsewhere) and
        # the branch points that start at it: only the latter need a table.
        starts: dict[int, list[int]] = {}
        for seq, parent in parents.items():
            if seq <= message_count:
                starts.setdefault(parent, []).append(seq)
        for seq in seqs:
            parent = parents.get(seq, seq - 1)
            family = set(starts.get(parent, ()))
            after = parent + 1
            if after <= message_count and parents.get(after, parent) == parent:
                family.add(after)
            if len(family) > 1:
                self._siblings[seq] = sorted(family)

    def parent(self, seq: int) -> int:
        return parent_of(self._branches, seq)

    def alternatives(self, seq: int) -> list[int]:
        return self._siblings.get(seq) or [seq]


class MessageOut(BaseModel):
    id: str
    seq: int
    role: str
    content: str
    parent_seq: int = Field(
        description="the message this one follows (0: at the start of the session): on the active "
        "path, the one before it"
    )
    alternatives: list[int] = Field(
        description="the seqs of this message and its siblings (its edits, or the regenerations of a "
        "reply), in order: a page shows `i/n` where this message's seq is number i of n; "
        "`[seq]` when it has none. `POST .../branch` switches to another"
    )
    created_at: str
    updated_at: str
    done: bool = Field(description="the message is whole: false only while its reply is being written")
    interrupted: bool = Field(
        description="the reply was cut before its end by the server (a shutdown, a crash, a failure)"
    )
    stopped: bool = Field(description="the user stopped the reply (`POST .../stop`): what was said is kept")
    error: str | None = Field(
        default=None,
        description="why the reply failed (the model server could not be reached, answered an error, "
        "broke off...), as its user is told; null for a reply that did not fail",
    )

    @classmethod
    def of(cls, m: StoredMessage, progress: Progress, family: Family) -> MessageOut:
        return cls(
            id=m.id,
            seq=m.seq,
            role=m.role,
            content=m.content,
            parent_seq=family.parent(m.seq),
            alternatives=family.alternatives(m.seq),
            created_at=m.created_at.isoformat(),
            updated_at=m.updated_at.isoformat(),
            done=progress.done,
            interrupted=progress.interrupted,
            stopped=progress.stopped,
            error=error_of(m),
        )


class SessionOut(BaseModel):
    id: str
    title: str | None
    status: str
    created_at: str
    updated_at: str
    message_count: int = Field(description="every message of the session, on every branch")
    temporary: bool = Field(description="a temporary chat: never written to disk, not kept")
    messages: list[MessageOut] | None = Field(
        default=None,
        description="the active path, in order (one session's answer; null in a listing): what the "
        "page shows and a reply is written to",
    )

    @classmethod
    def of(
        cls,
        s: SessionRecord | SessionSummary | SessionTree,
        messages: list[MessageOut] | None = None,
        *,
        temporary: bool = False,
    ) -> SessionOut:
        return cls(
            id=s.id,
            title=s.title,
            status=s.status,
            created_at=s.created_at.isoformat(),
            updated_at=s.updated_at.isoformat(),
            message_count=len(s.messages) if isinstance(s, SessionRecord) else s.message_count,
            temporary=temporary,
            messages=messages,
        )


class SessionList(BaseModel):
    sessions: list[SessionOut]
    limit: int
    offset: int
    q: str | None = Field(default=None, description="the search this page answers (null: none)")
    archived: ArchivedFilter = Field(default="exclude", description="which sessions this page lists")


class SearchSegment(BaseModel):
    text: str
    match: bool = Field(description="this text matched a word of the query (render it marked)")


class SearchHitOut(BaseModel):
    session_id: str
    title: str | None
    message_id: str
    seq: int
    role: str
    created_at: str
    snippet: list[SearchSegment] = Field(
        description="about 160 characters of the message around its first match, in segments: "
        "text, never markup (an ellipsis segment where it was cut)"
    )


class SearchResults(BaseModel):
    hits: list[SearchHitOut]
    q: str
    order: SearchOrder
    limit: int
    offset: int
    next_offset: int | None = Field(description="the offset of the next page; null on the last page")


class Turn(BaseModel):
    user_message: MessageOut
    assistant_message: MessageOut


class MessagePage(BaseModel):
    messages: list[MessageOut] = Field(description="messages of the active path, in order")
    after_seq: int
    limit: int
    next_after_seq: int | None = Field(
        description="the `after_seq` of the next page; null when this page is the last"
    )


class Stopped(BaseModel):
    stopped: list[MessageOut] = Field(
        description="the replies this stop ended, in order (empty: none was being written)"
    )
