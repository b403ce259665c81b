"""Records, validation and encoding.

Records handed to callers are frozen snapshots: `SessionRecord.messages` is a
tuple, so a caller can keep one without racing the store. Accepted metadata is
kept as the JSON text it was encoded to at the call (`StoredMessage.metadata_json`),
so nothing a caller does afterwards can change what the worker writes, and the
flush never encodes it again; `StoredMessage.metadata` decodes a fresh dict on each
access.

Validation happens here, at the call, before anything changes: a value that
passes can be stored by every backend and comes back equal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from .branches import Branches, active_path, normalized, siblings
from .errors import ValidationError

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ROLES",
    "MessageRow",
    "Metadata",
    "SessionRecord",
    "SessionSummary",
    "StoredMessage",
    "UserId",
    "add_message_rows",
    "check_content",
    "check_id",
    "check_metadata",
    "check_window",
    "content_size",
    "check_optional_text",
    "check_role",
    "check_status",
    "check_user_id",
    "decode_record",
    "edited_message",
    "encode_record",
    "from_micros",
    "message_from_row",
    "new_id",
    "new_message",
    "newest_first",
    "require_user",
    "session_record",
    "to_micros",
    "utcnow",
]

UserId = int | str
Metadata = dict[str, Any]

ROLES: Final = frozenset({"system", "user", "assistant", "tool"})
EXPORT_FORMAT_VERSION: Final = 1

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_STATUS_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_MAX_USER_ID_CHARS: Final = 256
_MAX_METADATA_BYTES: Final = 64 * 1024
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_micros(value: datetime) -> int:
    """Exact microseconds since the epoch (integer arithmetic, no float rounding)."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_Rope = tuple[str, list[str], int, int]
MessageRow = tuple[str, int, str, str, str, int, int, str | None]


def from_micros(value: int) -> datetime:
    # Positional: a third cheaper than timedelta(microseconds=…), and a cold load makes
    # these for every row whose times are read.
    return _EPOCH + timedelta(0, 0, value)


class _MessageSlots:
    """What a `StoredMessage` holds. Its text and times are kept in the form they arrived in,
    the other form made on first use and kept (a frozen record's cache, never its value):

    - text: `_text`, or for a reply being streamed `_rope` = (base, tokens, count, tail):
      the text is `base` followed by the first `count` strings of `tokens`, a list the
      message's later versions append to (so a token copies nothing); `tail` is their
      length in characters.
    - times: integer microseconds since the epoch (`_created_us`, as rows hold them) and
      datetimes (`_created_at`, as the clock gives them); None for a form not made yet.
    - `_row`: an appended message's database row, made with it (the values are at hand
      then) and let go by the flush that writes it: the flush only collects rows.
    """

    __slots__ = (
        "_created_at",
        "_created_us",
        "_rope",
        "_row",
        "_text",
        "_updated_at",
        "_updated_us",
        "id",
        "metadata_json",
        "role",
        "seq",
    )
    id: str
    seq: int
    role: str
    metadata_json: str | None
    _text: str | None
    _rope: _Rope | None
    _row: MessageRow | None
    _created_at: datetime | None
    _created_us: int | None
    _updated_at: datetime | None
    _updated_us: int | None


@dataclass(frozen=True, init=False)
class StoredMessage(_MessageSlots):
    """One message of a session. `seq` is 1, 2, 3… within its session and doubles
    as the SSE event id; `id` is unique within the session.

    `metadata_json` is the metadata as accepted, encoded once (JSON text, or None);
    `metadata` decodes it into a new dict on every access, so mutating what it returns
    changes nothing stored. `created_us` / `updated_us` are the times as integer
    microseconds since the epoch, exactly (what the databases' rows hold).

    A frozen dataclass (`dataclasses.replace` works, equality is by value) whose storage
    is compact: a record loaded from disk makes its datetimes when they are first read,
    and a token appended to a streamed reply does not copy the text before it.
    """

    __slots__ = ()

    id: str
    seq: int
    role: str
    content: str
    created_at: datetime
    updated_at: datetime
    metadata_json: str | None

    def __init__(
        self,
        id: str,
        seq: int,
        role: str,
        content: str,
        created_at: datetime,
        updated_at: datetime,
        metadata_json: str | None = None,
    ) -> None:
        _set_id(self, id)
        _set_seq(self, seq)
        _set_role(self, role)
        _set_text(self, content)
        _set_rope(self, None)
        _set_row(self, None)
        _set_created_at(self, created_at)
        _set_updated_at(self, updated_at)
        _set_created_us(self, None)
        _set_updated_us(self, None)
        _set_metadata_json(self, metadata_json)

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle: rebuilt through __init__ (the slots are not fields).
        return (
            StoredMessage,
            (
                self.id,
                self.seq,
                self.role,
                self.content,
                self.created_at,
                self.updated_at,
                self.metadata_json,
            ),
        )

    @property
    def metadata(self) -> Metadata | None:
        raw = self.metadata_json
        if raw is None:
            return None
        decoded: Metadata = orjson.loads(raw)
        return decoded

    @property
    def created_us(self) -> int:
        us = self._created_us
        if us is None:
            us = to_micros(self._created_at)  # type: ignore[arg-type]  # one form is always set
            _set_created_us(self, us)
        return us

    @property
    def updated_us(self) -> int:
        us = self._updated_us
        if us is None:
            us = to_micros(self._updated_at)  # type: ignore[arg-type]  # one form is always set
            _set_updated_us(self, us)
        return us


def _content(message: StoredMessage) -> str:
    text = message._text
    if text is None:
        base, tokens, count, _ = message._rope  # type: ignore[misc]  # one form is always set
        text = base + "".join(tokens[:count])
        _set_text(message, text)  # safe from any thread: every caller makes the same string
    return text


def _created_at(message: StoredMessage) -> datetime:
    at = message._created_at
    if at is None:
        at = from_micros(message._created_us)  # type: ignore[arg-type]  # one form is always set
        _set_created_at(message, at)
    return at


def _updated_at(message: StoredMessage) -> datetime:
    at = message._updated_at
    if at is None:
        at = from_micros(message._updated_us)  # type: ignore[arg-type]  # one form is always set
        _set_updated_at(message, at)
    return at


# Set after the dataclass is made, so that it sees three plain fields (no defaults); a
# property has no setter, and the frozen __setattr__ refuses an assignment before it.
setattr(StoredMessage, "content", property(_content))  # noqa: B010
setattr(StoredMessage, "created_at", property(_created_at))  # noqa: B010
setattr(StoredMessage, "updated_at", property(_updated_at))  # noqa: B010

_slot_setters = {name: getattr(_MessageSlots, name).__set__ for name in _MessageSlots.__slots__}
_set_id = _slot_setters["id"]
_set_seq = _slot_setters["seq"]
_set_role = _slot_setters["role"]
_set_text = _slot_setters["_text"]
_set_rope = _slot_setters["_rope"]
_set_row = _slot_setters["_row"]
_set_created_at = _slot_setters["_created_at"]
_set_updated_at = _slot_setters["_updated_at"]
_set_created_us = _slot_setters["_created_us"]
_set_updated_us = _slot_setters["_updated_us"]
_set_metadata_json = _slot_setters["metadata_json"]


class _Draft(_MessageSlots):
    """A `StoredMessage` being built by this module: plain slot stores, then its class
    becomes `StoredMessage` (the same slots, so the same layout). A frozen dataclass's own
    `__init__` sets each field through `object.__setattr__`, three to four times slower:
    on every append, every token and every row of a cold load, that was most of the cost."""

    __slots__ = ()


# `object.__setattr__(draft, "__class__", cls)`: a draft becomes the frozen record it was built as.
_BECOME = object.__setattr__
_ROPE_MIN_TOKENS: Final = 64


def new_message(
    session_id: str,
    message_id: str,
    seq: int,
    role: str,
    content: str,
    now: datetime,
    now_us: int,
    metadata_json: str | None,
) -> StoredMessage:
    """A message appended now to session `session_id` (trusted, validated values): created
    and updated at `now`, whose microseconds `now_us` are already known."""
    m = _Draft()
    m.id = message_id
    m.seq = seq
    m.role = role
    m._text = content
    m._rope = None
    m._row = (session_id, seq, message_id, role, content, now_us, now_us, metadata_json)
    m._created_at = m._updated_at = now
    m._created_us = m._updated_us = now_us
    m.metadata_json = metadata_json
    _BECOME(m, "__class__", StoredMessage)
    return m  # type: ignore[return-value]  # it is one now


def message_from_row(
    seq: int,
    message_id: str,
    role: str,
    content: str,
    created_us: int,
    updated_us: int,
    metadata_json: str | None,
) -> StoredMessage:
    """A message as a database row holds it (trusted: it was validated when written). Its
    datetimes are made when first read: a cold load of a long session mostly serves the
    last few messages."""
    m = _Draft()
    m.id = message_id
    m.seq = seq
    m.role = role
    m._text = content
    m._rope = None
    m._row = None
    m._created_at = m._updated_at = None
    m._created_us = created_us
    m._updated_us = updated_us
    m.metadata_json = metadata_json
    _BECOME(m, "__class__", StoredMessage)
    return m  # type: ignore[return-value]  # it is one now


def edited_message(
    old: StoredMessage, now: datetime, content: str | None, append: str | None, metadata_json: str | None
) -> StoredMessage:
    """`old` with its text replaced by `content`, or `append` added to it, and metadata
    `metadata_json` (pass `old.metadata_json` to keep it), updated `now`.

    An append copies nothing: the new version shares a token list with the old one (see
    `_MessageSlots`), and the text is joined when first read. The list is folded into a
    new base string once it is as long as the base, so reading the text stays amortised
    O(1) a character however long the reply grows."""
    m = _Draft()
    m.id = old.id
    m.seq = old.seq
    m.role = old.role
    if append is None:
        m._text = old.content if content is None else content
        m._rope = None
    else:
        text = old._text
        if text is not None:
            rope: _Rope = (text, [append], 1, len(append))
        else:
            base, tokens, count, tail = old._rope  # type: ignore[misc]  # one form is always set
            if count != len(tokens):
                tokens = tokens[:count]  # an older version is appended to: a branch of its own
            tokens.append(append)
            rope = (base, tokens, count + 1, tail + len(append))
        base, tokens, count, tail = rope
        if count >= _ROPE_MIN_TOKENS and tail >= len(base):
            m._text = base + "".join(tokens)
            m._rope = None
        else:
            m._text = None
            m._rope = rope
    m._row = None
    m._created_at = old._created_at
    m._created_us = old._created_us
    m._updated_at = now
    m._updated_us = None  # made by the flush, once for all the tokens since the last one
    m.metadata_json = metadata_json
    _BECOME(m, "__class__", StoredMessage)
    return m  # type: ignore[return-value]  # it is one now


def add_message_rows(
    fresh: list[MessageRow], rows: list[MessageRow], session_id: str, messages: Iterable[StoredMessage]
) -> None:
    """Each message's row, (session_id, seq, id, role, content, created_us, updated_us,
    metadata_json): the flush's one loop over messages.

    A message appended since it was last offered to a flush has its row made already (see
    `new_message`): it goes to `fresh`, and the message lets go of it (a failed flush makes
    it again, as below, into `rows`). Such a row was never written, so it can be inserted
    rather than upserted. Every other row is made here, into `rows`, from the slots (the
    times already integers, but for an edit's updated_us).
    """
    add_fresh = fresh.append
    add = rows.append
    for m in messages:
        row = m._row
        if row is not None and row[0] is session_id:
            _set_row(m, None)  # a cache slot, not a field: the record's value is unchanged
            add_fresh(row)
            continue
        created = m._created_us
        if created is None:
            created = m.created_us
        updated = m._updated_us
        if updated is None:
            updated = m.updated_us
        text = m._text
        if text is None:
            text = m.content
        add((session_id, m.seq, m.id, m.role, text, created, updated, m.metadata_json))


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A snapshot of a session. The secrets compare unequal-blind and are never
    encoded, logged or exported."""

    id: str
    user_id: UserId | None
    created_at: datetime
    updated_at: datetime
    last_access_at: datetime
    status: str = "active"
    title: str | None = None
    messages: tuple[StoredMessage, ...] = ()
    client_ip: str | None = None
    user_agent: str | None = None
    user_binding_token: str | None = field(default=None, repr=False, compare=False)
    csrf_token: str | None = field(default=None, repr=False, compare=False)
    # The stored row's version as last read or written (0: never stored). Several app
    # instances on one database use it to detect each other's writes.
    version: int = field(default=0, compare=False)
    # Where the messages branch (an edit, a regenerated reply) and the active path; None
    # for a session that never branched (see `branches.py`). `messages` holds them all.
    branches: Branches | None = None

    @property
    def path(self) -> tuple[StoredMessage, ...]:
        """The messages of the active path: `messages` unless the session branched."""
        if self.branches is None:
            return self.messages
        return tuple(active_path(self.messages, self.branches))

    def alternatives(self, seq: int) -> tuple[int, ...]:
        """The seqs of message `seq` and its siblings, in order (`(seq,)` if it has none): a
        page's "< 2/3 >". O(messages)."""
        return tuple(siblings(self.branches, len(self.messages), (seq,)).get(seq, (seq,)))


class _RecordDraft:
    """A `SessionRecord` being built by `session_record`: the same slots (so the same layout),
    plain stores, then its class becomes `SessionRecord`. The dataclass's own `__init__`
    sets its thirteen fields through `object.__setattr__`: 1.9 us against 0.3 us here, on
    every snapshot a call returns and every session a flush writes."""

    __slots__ = SessionRecord.__slots__


def session_record(
    session_id: str,
    user_id: UserId | None,
    created_at: datetime,
    updated_at: datetime,
    last_access_at: datetime,
    status: str,
    title: str | None,
    messages: tuple[StoredMessage, ...],
    client_ip: str | None,
    user_agent: str | None,
    user_binding_token: str | None,
    csrf_token: str | None,
    version: int,
    branches: Branches | None = None,
) -> SessionRecord:
    """`SessionRecord(...)` of trusted values (the hot tier's), every field given."""
    r: Any = _RecordDraft()
    r.id = session_id
    r.user_id = user_id
    r.created_at = created_at
    r.updated_at = updated_at
    r.last_access_at = last_access_at
    r.status = status
    r.title = title
    r.messages = messages
    r.client_ip = client_ip
    r.user_agent = user_agent
    r.user_binding_token = user_binding_token
    r.csrf_token = csrf_token
    r.version = version
    r.branches = branches
    _BECOME(r, "__class__", SessionRecord)
    record: SessionRecord = r
    return record


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A session without its messages, as listings return it."""

    id: str
    user_id: UserId | None
    title: str | None
    status: str
    created_at: datetime
    updated_at: datetime
    last_access_at: datetime
    message_count: int


# -- validation ------------------------------------------------------------------------------


def check_id(field_name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a str, not {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        raise ValidationError(
            field_name,
            "must be 1-128 characters of A-Z a-z 0-9 . _ : - and start with a letter or digit",
        )
    return value


def check_user_id(value: object, field_name: str = "user_id") -> UserId | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(field_name, f"must be an int, a str or None, not {type(value).__name__}")
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValidationError(field_name, "int must fit in 64 bits")
        return value
    if not value or len(value) > _MAX_USER_ID_CHARS:
        raise ValidationError(field_name, f"str must be 1-{_MAX_USER_ID_CHARS} characters")
    if not value.isprintable():
        raise ValidationError(field_name, "must be printable text")
    _check_encodable(field_name, value)
    return value


def _check_encodable(field_name: str, value: str) -> int:
    # NUL is refused for every backend alike: PostgreSQL's text cannot hold it, and a
    # session must be movable between backends.
    if "\x00" in value:
        raise ValidationError(field_name, "contains a NUL character, which PostgreSQL cannot store")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(
            field_name, "contains a lone surrogate, which cannot be stored as UTF-8"
        ) from None


def check_content(value: object, max_bytes: int, field_name: str = "content") -> str:
    content_size(value, max_bytes, field_name)
    return value  # type: ignore[return-value]  # content_size checked it is a str


def content_size(value: object, max_bytes: int, field_name: str = "content") -> int:
    """Check `value` as message text and return its size in UTF-8 bytes."""
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a str, not {type(value).__name__}")
    size = _check_encodable(field_name, value)
    if size > max_bytes:
        raise ValidationError(field_name, f"is {size} bytes, more than the limit of {max_bytes}")
    return size


def check_optional_text(field_name: str, value: object, max_bytes: int) -> str | None:
    if value is None:
        return None
    return check_content(value, max_bytes, field_name)


def check_role(value: object) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise ValidationError("role", f"must be one of {sorted(ROLES)}")
    return value


def check_status(value: object) -> str:
    if not isinstance(value, str) or _STATUS_RE.fullmatch(value) is None:
        raise ValidationError("status", "must be 1-32 characters of a-z 0-9 _ - starting with a letter")
    return value


def check_metadata(value: object, field_name: str = "metadata") -> str | None:
    """Encode `value` once, as the JSON text that is stored; refuse what would not come
    back from that text unchanged (tuples, NaN, datetimes, non-str keys), rather than
    silently alter it on its way to disk.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(field_name, f"must be a dict or None, not {type(value).__name__}")
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValidationError(field_name, f"cannot be encoded as JSON ({exc})") from None
    if len(encoded) > _MAX_METADATA_BYTES:
        raise ValidationError(field_name, f"encodes to more than {_MAX_METADATA_BYTES} bytes")
    copy: Metadata = orjson.loads(encoded)
    if not _json_equal(copy, value):
        raise ValidationError(field_name, "does not survive a JSON round trip unchanged")
    return encoded.decode()


def _json_equal(decoded: object, original: object) -> bool:
    # `==` alone would accept a tuple for a list's place only if equal types; check types
    # too so that 1.0 vs 1 or a tuple never passes as what JSON gives back.
    if type(decoded) is not type(original):
        return False
    if isinstance(decoded, dict):
        assert isinstance(original, dict)
        return decoded.keys() == original.keys() and all(
            _json_equal(decoded[k], original[k]) for k in decoded
        )
    if isinstance(decoded, list):
        assert isinstance(original, list)
        return len(decoded) == len(original) and all(
            _json_equal(a, b) for a, b in zip(decoded, original, strict=True)
        )
    return decoded == original


# -- encoding (export, recovery file) --------------------------------------------------------


def _ts(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def _parse_ts(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no timezone")
    return parsed.astimezone(UTC)


def encode_record(record: SessionRecord) -> dict[str, Any]:
    """A JSON-able dict of the record, secrets left out by construction. Every branch is
    in it: a session that branched gives each message its `parent_seq` and names the end
    of its active path (`active_seq`)."""
    branches = record.branches
    data: dict[str, Any] = {
        "id": record.id,
        "user_id": record.user_id,
        "created_at": _ts(record.created_at),
        "updated_at": _ts(record.updated_at),
        "last_access_at": _ts(record.last_access_at),
        "status": record.status,
        "title": record.title,
        "client_ip": record.client_ip,
        "user_agent": record.user_agent,
        "messages": [
            {
                "id": m.id,
                "seq": m.seq,
                "role": m.role,
                "content": m.content,
                "created_at": _ts(m.created_at),
                "updated_at": _ts(m.updated_at),
                "metadata": None if m.metadata_json is None else orjson.Fragment(m.metadata_json),
            }
            for m in record.messages
        ],
    }
    if branches is not None:
        data["active_seq"] = branches.active or len(record.messages)
        for m in data["messages"]:
            m["parent_seq"] = branches.parent(m["seq"])
    return data


def decode_record(data: dict[str, Any]) -> SessionRecord:
    branches = None
    if "active_seq" in data:
        branches = normalized(
            {m["seq"]: m["parent_seq"] for m in data["messages"]}, data["active_seq"], len(data["messages"])
        )
    return SessionRecord(
        id=data["id"],
        user_id=data["user_id"],
        created_at=_parse_ts(data["created_at"]),
        updated_at=_parse_ts(data["updated_at"]),
        last_access_at=_parse_ts(data["last_access_at"]),
        status=data["status"],
        title=data["title"],
        client_ip=data.get("client_ip"),
        user_agent=data.get("user_agent"),
        messages=tuple(
            StoredMessage(
                id=m["id"],
                seq=m["seq"],
                role=m["role"],
                content=m["content"],
                created_at=_parse_ts(m["created_at"]),
                updated_at=_parse_ts(m["updated_at"]),
                metadata_json=None if m["metadata"] is None else check_metadata(m["metadata"]),
            )
            for m in data["messages"]
        ),
        branches=branches,
    )


# -- small shared checks of the stores ---------------------------------------------------------


def require_user(user_id: object) -> UserId:
    """A signed-in user's id (not None), validated."""
    uid = check_user_id(user_id)
    if uid is None:
        raise ValidationError("user_id", "must identify a signed-in user, not None")
    return uid


def check_window(start: object, count: object, start_name: str = "after_seq") -> tuple[int, int | None]:
    """A (start, count) window: ints >= 0 that fit the databases' 64-bit integers."""
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= _INT64_MAX:
        raise ValidationError(start_name, f"must be an int from 0 to {_INT64_MAX}")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= _INT64_MAX
    ):
        raise ValidationError("limit", f"must be an int from 0 to {_INT64_MAX}, or None")
    return start, count


def newest_first(summary: SessionSummary) -> tuple[int, str]:
    """Sort key of listings: most recently updated first, then by id."""
    return (-to_micros(summary.updated_at), summary.id)


def new_id() -> str:
    return os.urandom(16).hex()
