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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from .errors import ValidationError

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "ROLES",
    "Metadata",
    "SessionRecord",
    "SessionSummary",
    "StoredMessage",
    "UserId",
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
    "encode_record",
    "from_micros",
    "new_id",
    "newest_first",
    "require_user",
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


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a session. `seq` is 1, 2, 3… within its session and doubles
    as the SSE event id; `id` is unique within the session.

    `metadata_json` is the metadata as accepted, encoded once (JSON text, or None);
    `metadata` decodes it into a new dict on every access, so mutating what it returns
    changes nothing stored.
    """

    id: str
    seq: int
    role: str
    content: str
    created_at: datetime
    updated_at: datetime
    metadata_json: str | None = None

    @property
    def metadata(self) -> Metadata | None:
        raw = self.metadata_json
        if raw is None:
            return None
        decoded: Metadata = orjson.loads(raw)
        return decoded


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
    """A JSON-able dict of the record, secrets left out by construction."""
    return {
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


def decode_record(data: dict[str, Any]) -> SessionRecord:
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
