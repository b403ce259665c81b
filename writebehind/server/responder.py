"""Responders: what writes the assistant's reply, token by token.

The default needs no network: a deterministic reply streamed with a configurable
delay, so that the write-behind coalescing (hundreds of `update_message` calls into
one row write) is exercised for real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from ..model import StoredMessage

__all__ = ["EchoResponder", "Responder"]


class Responder(Protocol):
    def __call__(self, history: Sequence[StoredMessage]) -> AsyncIterator[str]:
        """Yield the reply's tokens, given the conversation so far (last: the user's message)."""
        ...


class EchoResponder:
    """Answers every message with the same deterministic reply about it."""

    def __init__(self, delay_s: float = 0.03, words: int = 40) -> None:
        self.delay_s = delay_s
        self.words = words

    def reply_to(self, text: str) -> list[str]:
        said = " ".join(text.split()[:12])
        body = [f"You said: \u201c{said}\u201d."] + [f"token{i}" for i in range(1, self.words + 1)]
        return [word if i == 0 else " " + word for i, word in enumerate(body)]

    async def __call__(self, history: Sequence[StoredMessage]) -> AsyncIterator[str]:
        for token in self.reply_to(history[-1].content if history else ""):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield token
