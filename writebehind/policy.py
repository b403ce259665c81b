"""Persistence policies: which sessions the write-behind store may write to disk."""

from __future__ import annotations

from typing import Protocol

from .model import UserId

__all__ = ["PersistencePolicy", "authenticated_only", "persist_nothing"]


class PersistencePolicy(Protocol):
    """Decides, per session, whether it is ever written to the backend.

    Called on the request path whenever a session changes, so it must be cheap
    and must not do I/O.

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
