"""The export format (GDPR Articles 15 and 20): one JSON document per user.

    {"format": "writebehind-export", "version": 1, "exported_at": "<ISO 8601, UTC>",
     "user_id": <int or str>, "sessions": [<session>, ...]}

Each session is `model.encode_record`: id, user_id, created_at, updated_at,
last_access_at, status, title, client_ip, user_agent, and messages (id, seq, role,
content, created_at, updated_at, metadata). Secrets are never part of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from .model import EXPORT_FORMAT_VERSION, SessionRecord, UserId, encode_record, utcnow

__all__ = ["export_json"]


async def export_json(user_id: UserId, records: AsyncIterator[SessionRecord]) -> AsyncIterator[bytes]:
    """The document in pieces, one session at a time, so that it streams."""
    head = orjson.dumps(
        {
            "format": "writebehind-export",
            "version": EXPORT_FORMAT_VERSION,
            "exported_at": utcnow().isoformat(),
            "user_id": user_id,
        }
    )
    yield head[:-1] + b',"sessions":['
    first = True
    async for record in records:
        yield (b"" if first else b",") + orjson.dumps(encode_record(record))
        first = False
    yield b"]}"
