"""What the reliability tests share: a reference model and a look at what is really on disk."""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

from writebehind import WriteBehindStore


class Model:
    """The reference: what every acknowledged write says each session holds."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[int, str]] = defaultdict(dict)
        self.owners: dict[str, int | str] = {}

    async def append(self, store: WriteBehindStore, sid: str, user: int | str, content: str) -> None:
        message = await store.append_message(sid, user_id=user, role="user", content=content)
        self.sessions[sid][message.seq] = content
        self.owners[sid] = user


def on_disk(db_path: Path) -> dict[str, dict[int, str]]:
    """Every message on disk, read with a plain sqlite3 connection."""
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            "SELECT session_id, seq, content FROM messages ORDER BY session_id, seq"
        ).fetchall()
    found: dict[str, dict[int, str]] = defaultdict(dict)
    for sid, seq, content in rows:
        found[sid][seq] = content
    return dict(found)


def integrity(db_path: Path) -> str:
    with sqlite3.connect(db_path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def assert_prefixes(db_path: Path) -> dict[str, int]:
    """Every session on disk holds seq 1..n with no gap, and its row's count agrees."""
    with sqlite3.connect(db_path) as conn:
        counts = dict(conn.execute("SELECT id, message_count FROM sessions").fetchall())
    lengths = {}
    for sid, messages in on_disk(db_path).items():
        assert sorted(messages) == list(range(1, len(messages) + 1)), f"gap in {sid}"
        assert counts[sid] == len(messages), f"{sid}: row says {counts[sid]}, {len(messages)} rows"
        lengths[sid] = len(messages)
    return lengths
