"""The server's wake-up broker: a change wakes every stream of the session, an erasure
wakes every stream of the user, a stopping server wakes them all for good, and a session
nobody follows any more holds nothing."""

from __future__ import annotations

import asyncio

from writebehind.server.streaming import Broker


async def test_a_notification_wakes_the_waiters_and_a_left_session_holds_nothing() -> None:
    broker = Broker()
    broker.subscribe("s")
    broker.subscribe("s")
    first, second = broker.waiter("s"), broker.waiter("s")
    assert first is second and not first.is_set()
    broker.notify("s")
    await asyncio.wait_for(first.wait(), 1)
    assert broker.waiter("s") is not first  # a fresh event for the next change
    broker.unsubscribe("s")
    assert len(broker) == 1  # one listener is still there
    broker.unsubscribe("s")
    assert len(broker) == 0
    broker.notify("nobody-listens")  # harmless
    assert len(broker) == 0


async def test_an_erased_user_wakes_their_streams_only_and_leaves_nothing_behind() -> None:
    broker = Broker()
    broker.subscribe("a1", user_id=1)
    broker.subscribe("a2", user_id=1)
    broker.subscribe("b1", user_id=2)
    waiters = {sid: broker.waiter(sid) for sid in ("a1", "a2", "b1")}
    broker.notify_user(1)
    assert waiters["a1"].is_set() and waiters["a2"].is_set() and not waiters["b1"].is_set()
    for sid, user in (("a1", 1), ("a2", 1), ("b1", 2)):
        broker.unsubscribe(sid, user_id=user)
    broker.notify_user(1)  # harmless
    assert len(broker) == 0


async def test_a_closed_broker_wakes_every_stream_for_good() -> None:
    broker = Broker()
    broker.subscribe("s")
    waiter = broker.waiter("s")
    broker.close()
    assert waiter.is_set() and broker.closed
    assert broker.waiter("s").is_set()  # a stream that reads again does not wait
