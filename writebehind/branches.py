"""Alternatives in a conversation: an edited question, a regenerated reply ("< 2/3 >").

A session's messages form a tree. Each message has a parent, the message it answers or
follows (0 for a message at the start), and siblings, the other messages with the same
parent: an edit of a sent message is a sibling of it, a regenerated reply a sibling of the
reply it replaces. The *active path* runs from the start to one leaf; it is what
`get_messages` returns, what a model is sent, what an SSE stream shows.

Nothing is copied: every message is stored once, in `seq` order (1, 2, 3… over the whole
tree, gap-free as ever), and a child always has a higher `seq` than its parent, so a seq
is still a position along any path. Almost every message follows the one before it, so
`Branches` keeps only the exceptions, a sparse map `seq -> parent` of the messages whose
parent is not `seq - 1`, and the active leaf when it is not the last message. A session
that never branched has none (`SessionRecord.branches is None`) and costs nothing.

Both live on the session row (one small JSON column): switching the active branch writes
that one row, and an append that starts a branch writes the row the append writes anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .errors import SchemaError

__all__ = ["Branches", "active_path", "children_of", "leaf_below", "normalized", "parent_of", "siblings"]

_EMPTY: Final[Mapping[int, int]] = {}


@dataclass(frozen=True, slots=True)
class Branches:
    """Where a session's messages branch.

    `parents`: the parent of each message whose parent is not the message before it
    (`seq -> parent seq`, 0 for a message at the start). `active`: the leaf of the active
    path, or None when it is the session's last message (the usual case, so that an
    append needs no change here). Never mutated: a change makes a new one (it holds a
    pair per branch point, not per message)."""

    parents: Mapping[int, int]
    active: int | None = None

    def parent(self, seq: int) -> int:
        return self.parents.get(seq, seq - 1)

    def encode(self) -> str:
        """The session row's `branches` column."""
        return orjson.dumps({"active": self.active, "parents": sorted(self.parents.items())}).decode()

    @staticmethod
    def decode(value: str | None, where: str = "branches") -> Branches | None:
        """The column back (None: a session that never branched)."""
        if value is None:
            return None
        try:
            data: Any = orjson.loads(value)
            parents = {int(seq): int(parent) for seq, parent in data["parents"]}
            active = data["active"]
            if active is not None:
                active = int(active)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SchemaError(f"{where}: not a branches value ({type(exc).__name__})") from exc
        return Branches(parents, active)


def normalized(parents: Mapping[int, int], active: int | None, count: int) -> Branches | None:
    """`Branches` for a session of `count` messages, in its one canonical form: no entry
    saying what the default says, `active` None when it is the last message, None for a
    session that is a single line again (after pops)."""
    parents = {seq: p for seq, p in parents.items() if seq <= count and p != seq - 1}
    if active is not None and active >= count:
        active = None
    if not parents and active is None:
        return None
    return Branches(parents, active)


def parent_of(branches: Branches | None, seq: int) -> int:
    return seq - 1 if branches is None else branches.parents.get(seq, seq - 1)


def active_path(messages: Sequence[Any], branches: Branches | None, after_seq: int = 0) -> list[Any]:
    """The messages of the active path with `seq > after_seq`, in order. `messages` are the
    session's, in seq order (message `seq` at index `seq - 1`). O(length of the path)."""
    if branches is None:
        return list(messages[after_seq:])
    parents = branches.parents
    seq = len(messages) if branches.active is None else branches.active
    path = []
    while seq > after_seq:
        path.append(messages[seq - 1])
        seq = parents.get(seq, seq - 1)
    path.reverse()
    return path


def children_of(branches: Branches | None, count: int) -> dict[int, list[int]]:
    """Each message's children (and 0's: the messages at the start), in seq order. O(count)."""
    children: dict[int, list[int]] = {}
    parents = _EMPTY if branches is None else branches.parents
    for seq in range(1, count + 1):
        children.setdefault(parents.get(seq, seq - 1), []).append(seq)
    return children


def siblings(branches: Branches | None, count: int, seqs: Iterable[int]) -> dict[int, list[int]]:
    """For each of `seqs`, the seqs of it and its siblings in order (only where there are
    several): what a page shows as "< 2/3 >"."""
    if branches is None:
        return {}
    children = children_of(branches, count)
    out: dict[int, list[int]] = {}
    for seq in seqs:
        family = children.get(branches.parents.get(seq, seq - 1), [])
        if len(family) > 1:
            out[seq] = family
    return out


def leaf_below(branches: Branches | None, count: int, seq: int) -> int:
    """The leaf reached from `seq` by following, at each step, the newest child: where a
    switch to `seq` lands (the most recent conversation that went through it)."""
    if branches is None:
        return count
    children = children_of(branches, count)
    while True:
        below = children.get(seq)
        if not below:
            return seq
        seq = below[-1]
