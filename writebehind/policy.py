"""Persistence policies: which sessions the write-behind store may write to disk, and the
per-session and per-user choices that override them (temporary chats, "don't keep my
history").

Three things decide whether a session is ever written, checked in this order:

1. A **temporary** session (`ensure_session(..., persist=False)`, or created for a user
   whose preference is `keep_history=False`) is never written, whatever the policy says:
   not by the flush worker, not to the recovery file, not by a claim, and its text is
   never sent to other instances. It lives in memory only, expires after the anonymous
   idle TTL, is bounded by the LRU, and never becomes persistent. The flag is on the hot
   tier's entry, so the check on the write path is one attribute read.
2. The `PersistencePolicy` (default `authenticated_only`).
3. Nothing else: a claim, a merge or a replay never turns a temporary session into a kept one.

The per-user preference is itself stored as a small session owned by the user (id
`preferences_id(user_id)`, status `preferences`), so that it inherits what sessions
already have: written behind and durable when set, in the recovery file at a failed
shutdown, one owner at a time across PostgreSQL instances (read-your-writes), erased by
`delete_user` (from the disk, its WAL and the recovery files), exported with the user's
data, and no schema change on either backend. Its ids start with `PREFERENCES_PREFIX`,
which `ensure_session` refuses, so nobody can create it in another user's place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from .errors import ValidationError
from .model import StoredMessage, UserId

__all__ = [
    "PREFERENCES_PREFIX",
    "PREFERENCES_STATUS",
    "PREFERENCES_TITLE",
    "PersistencePolicy",
    "UserPreferences",
    "authenticated_only",
    "check_keep_history",
    "check_not_reserved",
    "is_preferences_id",
    "persist_nothing",
    "preferences_id",
    "preferences_of",
]

PREFERENCES_PREFIX: Final = "wb:prefs:"
"""Session ids that start with this are the store's own (a user's preferences): refused by
`ensure_session`. Random ids (`new_id`, 32 hex digits) never start with it."""
PREFERENCES_STATUS: Final = "preferences"
PREFERENCES_TITLE: Final = "Preferences"


class PersistencePolicy(Protocol):
    """Decides, per session, whether it is ever written to the backend.

    Called on the request path whenever a session changes, so it must be cheap
    and must not do I/O. A temporary session is never written, whatever this says.

    A policy that persists anonymous sessions: their binding tokens are secrets and never
    stored, so an anonymous session that has left memory (evicted, expired, a restart)
    comes back sealed: no anonymous caller can open it by its id. Claim it at sign-in to
    keep it.
    """

    def __call__(self, session_id: str, user_id: UserId | None) -> bool: ...


def authenticated_only(session_id: str, user_id: UserId | None) -> bool:
    """The default: signed-in users persist, anonymous ones stay in memory (privacy by default)."""
    return user_id is not None


def persist_nothing(session_id: str, user_id: UserId | None) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class UserPreferences:
    """What a user chose about their data. `keep_history=False`: every new session of
    theirs is temporary unless it is created with `persist=True`."""

    keep_history: bool = True


def preferences_id(user_id: UserId) -> str:
    """The id of the session that holds the user's preferences: derived from the user id
    (the type too: user 42 and user "42" are two users), so any instance finds it without
    an index; a hash, so the id says nothing about the user."""
    kind = "i" if isinstance(user_id, int) else "s"
    digest = hashlib.sha256(f"{kind}:{user_id}".encode("utf-8", "surrogatepass")).hexdigest()
    return PREFERENCES_PREFIX + digest[:40]


def is_preferences_id(session_id: object) -> bool:
    return isinstance(session_id, str) and session_id.startswith(PREFERENCES_PREFIX)


def check_not_reserved(session_id: object) -> None:
    """Refuse a chosen session id the store keeps for itself (`ValidationError` naming
    `session_id`): otherwise another user could create a user's preferences session first
    and so lock them out of their own setting."""
    if is_preferences_id(session_id):
        raise ValidationError("session_id", f"ids starting with {PREFERENCES_PREFIX!r} are reserved")


def check_keep_history(value: object) -> bool:
    if type(value) is not bool:
        raise ValidationError("keep_history", f"must be a bool, not {type(value).__name__}")
    return value


def preferences_of(messages: Sequence[StoredMessage]) -> UserPreferences:
    """The preferences a preferences session holds (in its last message's metadata). The
    session exists only while the user keeps `keep_history=False`, so anything unreadable
    in it errs on the side of privacy: history not kept."""
    if not messages:
        return UserPreferences(keep_history=False)
    metadata = messages[-1].metadata
    return UserPreferences(keep_history=metadata is not None and metadata.get("keep_history") is True)
