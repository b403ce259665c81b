"""What the adapters share: the JSON check of what they store whole, the digest of their
ids, and running a commit to its end under a cancel."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable
from typing import Any, Final, TypeVar, cast

__all__ = ["digest", "finish", "plain_json"]

T = TypeVar("T")

_SCALARS: Final = frozenset({str, int, bool, type(None)})


def plain_json(value: object) -> bool:
    """Whether `value`, which orjson encoded, decodes back deep-equal and of the same types
    all the way down: only exact dicts, lists, str, int, bool, None and finite floats."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(cast(float, value))
    if kind is dict:
        return all(plain_json(v) for v in cast(dict[str, Any], value).values())
    if kind is list:
        return all(plain_json(v) for v in cast(list[Any], value))
    return False


def digest(*parts: str) -> str:
    """A short stable hash of `parts` (ids derived from a framework's names)."""
    return hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


async def finish(awaitable: Awaitable[T]) -> T:
    """Await a mutation to its end even if the caller is cancelled meanwhile, then re-raise
    the cancellation: a commit that has begun is never left half done, nor running unseen."""
    task = asyncio.ensure_future(awaitable)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled
    return task.result()
