"""The server's wake-up broker: a change wakes every stream of the session, and a session
nobody follows any more holds nothing."""

from __future__ import annotations

import asyncio

from writebehind.server.app import Broker


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
