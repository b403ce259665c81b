"""`Replies.stop()` interrupted half-way (its request cancelled, as a client leaving or a
server stopping does): the replies it ended must not be taken as still being written, or
every edit, regenerate and switch of the session would be a 409 until a restart."""

from __future__ import annotations

import asyncio
import contextlib

from writebehind import SessionStore
from writebehind.server.auth import Caller
from writebehind.server.replies import Replies
from writebehind.server.responder import EchoResponder

WHO = Caller(user_id=7, binding=None)


async def test_a_cancelled_stop_leaves_the_session_free_for_the_next_change() -> None:
    store = SessionStore(1000)
    replies = Replies(store, EchoResponder(delay_s=0.05, words=200), lambda sid: None)
    await store.ensure_session("s", user_id=7)
    await replies.start("s", "héllo 词🙂 שלום", WHO)
    await asyncio.sleep(0.2)  # the reply is being written
    stopping = asyncio.create_task(replies.stop("s", WHO))
    await asyncio.sleep(0)  # stop() waits for the reply's task
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stopping
    await asyncio.sleep(0.1)
    (_question, reply) = await store.get_messages("s", user_id=7)
    assert reply.metadata is not None and reply.metadata["done"] is True
    # Nothing writes on the session: a regenerate goes through (it would be a 409).
    regenerated, _ = await replies.regenerate("s", WHO)
    assert regenerated.seq == 3
    await replies.aclose()
