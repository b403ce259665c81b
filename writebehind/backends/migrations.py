"""Schema migrations. `SQLITE[n]` takes a database from `user_version` n to n + 1.

Append only: a released migration is never edited, a change is a new one.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SQLITE"]

# Timestamps are INTEGER microseconds since the epoch (UTC): exact round trips, cheap
# comparisons. `user_id` has no declared type on purpose: with no affinity an int stays
# an INTEGER and a str stays TEXT, so user 1 and user "1" are different users.
#
# `messages` is a rowid table whose (session_id, seq) primary key is a unique index:
# measured here with 500-byte messages it inserts about 3.5x faster than the same table
# WITHOUT ROWID (python /tmp/layout.py, see README). Message ids are kept unique by the
# store in memory rather than by a second index, which cost about 30% of insert speed.
_INITIAL: Final[tuple[str, ...]] = (
    """
    CREATE TABLE sessions (
        id             TEXT PRIMARY KEY NOT NULL,
        user_id,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL,
        last_access_at INTEGER NOT NULL,
        status         TEXT NOT NULL,
        title          TEXT,
        client_ip      TEXT,
        user_agent     TEXT,
        message_count  INTEGER NOT NULL DEFAULT 0,
        version        INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX sessions_user_updated ON sessions (user_id, updated_at);
    CREATE INDEX sessions_updated ON sessions (updated_at);
    CREATE INDEX sessions_last_access ON sessions (last_access_at);
    CREATE TABLE messages (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,
        id         TEXT NOT NULL,
        role       TEXT NOT NULL,
        content    TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        metadata   TEXT,
        PRIMARY KEY (session_id, seq)
    );
    """,
)

# No full-text index. Migration 2 was an FTS5 trigram index kept by triggers in the flush's
# transaction; measured on 1,000,000 messages of 10,000 users it made the flush 25x slower
# (4% of the flush without it), each erasure on SQLite < 3.42 had to rebuild it (40 s), and
# a scan of the user's own rows answered queries faster (p99 0.44 vs 2.2 ms): search scans
# the user's rows (`SQLiteBackend.search`). It never shipped.
#
# 2: where a session's messages branch (an edit, a regenerated reply) and its active path,
# a small JSON value on the session row, NULL for a session that never branched (see
# writebehind/branches.py). Adding a nullable column rewrites nothing.
_BRANCHES: Final = "ALTER TABLE sessions ADD COLUMN branches TEXT;"

SQLITE: Final[tuple[str, ...]] = (*_INITIAL, _BRANCHES)
