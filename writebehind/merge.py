"""Merging two versions of one session, so that no acknowledged message is dropped.

Two writers can end up with different versions of a session: another instance wrote
it while this one held it (ownership lost in a partition), or a recovery file is
replayed onto a database that moved on. The database's version (the winner's) is
kept as it is; this writer's messages that the winner does not have are appended
after the winner's, in their order, with new `seq` numbers; a message both have
takes the more recently updated content. Nothing is dropped; what moved is counted
so that the caller can log it.

Branches (`branches.py`) are the winner's: this writer's messages follow the winner's last
message as one line, which ends the active path (an alternative this writer started is
kept as messages, in that line, rather than guessed onto the winner's tree).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .branches import normalized
from .model import SessionRecord, StoredMessage

__all__ = ["Merged", "merge_sessions"]


@dataclass(frozen=True, slots=True)
class Merged:
    record: SessionRecord
    appended: int  # this writer's messages added after the winner's
    resequenced: int  # of those, how many got a different seq than they had here
    updated: int  # messages both had, where this writer's edit was newer


def merge_sessions(winner: SessionRecord, mine: SessionRecord) -> Merged:
    """`mine` merged onto `winner` (the stored one); the result carries `winner.version`.

    Session fields come from whichever was updated last; the owner is the winner's;
    the in-memory secrets are `mine`'s.
    """
    position = {m.id: i for i, m in enumerate(winner.messages)}
    messages: list[StoredMessage] = list(winner.messages)
    appended = resequenced = updated = 0
    for message in mine.messages:
        i = position.get(message.id)
        if i is None:
            seq = len(messages) + 1
            messages.append(message if message.seq == seq else replace(message, seq=seq))
            position[message.id] = seq - 1
            appended += 1
            resequenced += message.seq != seq
        elif message.updated_at > messages[i].updated_at:
            messages[i] = replace(message, seq=messages[i].seq)
            updated += 1
    newer = mine if mine.updated_at >= winner.updated_at else winner
    branches = winner.branches
    if branches is not None and appended:
        branches = normalized(branches.parents, None, len(messages))
    record = replace(
        mine,
        user_id=winner.user_id,
        created_at=min(winner.created_at, mine.created_at),
        updated_at=newer.updated_at,
        last_access_at=max(winner.last_access_at, mine.last_access_at),
        status=newer.status,
        title=newer.title,
        messages=tuple(messages),
        version=winner.version,
        branches=branches,
    )
    return Merged(record, appended, resequenced, updated)
