"""Full-text search over one user's own history: the query's rules, snippets, and the merge of
what memory holds (messages not flushed yet) with what the backend finds on disk.

A query is words, never a query language: it is split on whitespace, and a message matches
when it holds every word as a case-insensitive substring (in any script: CJK has no spaces,
so "words" inside a CJK sentence are found as substrings). The backend turns the words into
its own syntax with each one quoted (`"`, `*`, `NEAR`, `-`, `:`, parentheses are only text).

A snippet is a tuple of (text, matched) segments, not markup: a page renders each segment
as text (`textContent`) and marks the matched ones, so no content can inject markup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from .errors import ValidationError
from .model import StoredMessage, to_micros

__all__ = [
    "MAX_LIMIT",
    "MAX_OFFSET",
    "MAX_QUERY_CHARS",
    "ORDERS",
    "SearchHit",
    "SearchPage",
    "SearchRow",
    "check_search",
    "make_snippet",
    "matches",
    "disk_window",
    "memory_rows",
    "merge_pages",
    "search_memory",
]

MAX_QUERY_CHARS: Final = 256
MAX_WORDS: Final = 16
MAX_LIMIT: Final = 100
# Offset paging: deep pages cost the database the rows before them; nobody reads 500 pages
# of search results, and the cap keeps a hostile offset from being a cost.
MAX_OFFSET: Final = 10_000
ORDERS: Final = ("relevance", "newest")
SNIPPET_CHARS: Final = 160

Order = Literal["relevance", "newest"]
Segment = tuple[str, bool]


@dataclass(frozen=True, slots=True)
class SearchRow:
    """A message a backend found: what `search` needs to make a hit of it. `rank`: lower is
    better, `rank_of` on every backend, so that rows from anywhere merge."""

    session_id: str
    title: str | None
    message_id: str
    seq: int
    role: str
    content: str
    created_at: datetime
    rank: float


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One message that matched: its session, and a snippet of it with the matches marked."""

    session_id: str
    title: str | None
    message_id: str
    seq: int
    role: str
    created_at: datetime
    snippet: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class SearchPage:
    """A page of hits; `next_offset` is None on the last page."""

    hits: tuple[SearchHit, ...]
    next_offset: int | None


def check_search(query: object, limit: object, offset: object, order: object) -> tuple[str, ...]:
    """The query's words (validated, deduplicated, in order); `ValidationError` naming the
    field that is wrong."""
    if not isinstance(query, str):
        raise ValidationError("query", f"must be a str, not {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise ValidationError("query", f"must be at most {MAX_QUERY_CHARS} characters")
    try:
        query.encode()
    except UnicodeEncodeError:
        raise ValidationError("query", "must be valid Unicode (no lone surrogates)") from None
    if "\x00" in query:
        raise ValidationError("query", "must not contain NUL")
    words = tuple(dict.fromkeys(query.split()))
    if not words:
        raise ValidationError("query", "must contain a word")
    if len(words) > MAX_WORDS:
        raise ValidationError("query", f"must have at most {MAX_WORDS} words")
    for name, value, top in (("limit", limit, MAX_LIMIT), ("offset", offset, MAX_OFFSET)):
        low = 1 if name == "limit" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise ValidationError(name, f"must be an int from {low} to {top}")
    if order not in ORDERS:
        raise ValidationError("order", f"must be one of {list(ORDERS)}")
    return words


def matches(content: str, folded_words: Iterable[str]) -> bool:
    """Does `content` hold every word (already `.lower()`ed) as a case-insensitive substring?"""
    text = content.lower()
    return all(word in text for word in folded_words)


def make_snippet(content: str, words: Sequence[str], width: int = SNIPPET_CHARS) -> tuple[Segment, ...]:
    """About `width` characters of `content` around its first match, as (text, matched)
    segments, with an ellipsis segment where it was cut."""
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)), re.IGNORECASE)
    first = pattern.search(content)
    start = 0 if first is None else max(0, first.start() - width // 3)
    end = min(len(content), start + width)
    if first is not None and end - start < width:
        start = max(0, end - width)
    window = content[start:end]
    segments: list[Segment] = []
    if start > 0:
        segments.append(("…", False))
    at = 0
    for found in pattern.finditer(window):
        if found.start() > at:
            segments.append((window[at : found.start()], False))
        segments.append((found.group(), True))
        at = found.end()
    if at < len(window):
        segments.append((window[at:], False))
    if end < len(content):
        segments.append(("…", False))
    return tuple(segments)


def memory_rows(
    sessions: Iterable[tuple[str, str | None, Sequence[StoredMessage]]], words: Sequence[str]
) -> list[SearchRow]:
    """The matching messages of sessions held in memory: (id, title, messages) each."""
    folded = [w.lower() for w in words]
    found: list[SearchRow] = []
    for sid, title, messages in sessions:
        for m in messages:
            content = m.content
            if matches(content, folded):
                found.append(
                    SearchRow(
                        sid, title, m.id, m.seq, m.role, content, m.created_at, rank_of(content, folded)
                    )
                )
    return found


def rank_of(content: str, folded_words: Sequence[str]) -> float:
    """Relevance (lower is better): minus the words' occurrences per 500 characters, what the
    backends' SQL computes (SQLite's `lower` folds ASCII only, so a non-ASCII word of another
    case ranks a little differently there; the order within a page is all it changes)."""
    text = content.lower()
    return -sum(text.count(w) / 1.0 for w in folded_words) / (1 + len(content) / 500)


def _newest(row: SearchRow) -> tuple[int, str, int]:
    return (-to_micros(row.created_at), row.session_id, -row.seq)


def _best(row: SearchRow) -> tuple[float, int, str, int]:
    return (row.rank, *_newest(row))


def disk_window(*, limit: int, offset: int) -> tuple[int, int]:
    """(limit, offset) to ask the backend for: every row up to the page's end, and one more
    to tell whether a next page exists (memory's rows may come before any of them)."""
    return offset + limit + 1, 0


def merge_pages(
    in_memory: list[SearchRow],
    on_disk: list[SearchRow],
    words: Sequence[str],
    *,
    limit: int,
    offset: int,
    order: Order,
) -> SearchPage:
    """One page of memory's and disk's rows merged, `on_disk` being the backend's answer for
    `disk_window`. Both rank alike (occurrences of the words per length; newest first on a
    tie), so the merge is one sort. The backend left the sessions held in memory out of its
    answer: nothing is listed twice, and a page's rows do not depend on the pages before it
    (stable while nothing is written)."""
    merged = sorted([*in_memory, *on_disk], key=_newest if order == "newest" else _best)
    page = merged[offset : offset + limit]
    hits = tuple(
        SearchHit(
            r.session_id, r.title, r.message_id, r.seq, r.role, r.created_at, make_snippet(r.content, words)
        )
        for r in page
    )
    more = len(merged) > offset + limit
    return SearchPage(hits, offset + len(hits) if more and hits else None)


def search_memory(
    sessions: Iterable[tuple[str, str | None, Sequence[StoredMessage]]],
    query: object,
    *,
    limit: int = 20,
    offset: int = 0,
    order: str = "relevance",
) -> SearchPage:
    """`WriteBehindStore.search` for a store that keeps nothing on disk (`SessionStore`):
    the same rules and answer, over the sessions given (the caller's, from memory)."""
    words = check_search(query, limit, offset, order)
    rows = memory_rows(sessions, words)
    return merge_pages(rows, [], words, limit=limit, offset=offset, order=order)  # type: ignore[arg-type]
