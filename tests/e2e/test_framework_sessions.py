"""A signed-in user's agent-framework threads (`writebehind.integrations`) share the store
with their chats; the chat page's listings leave them out (they are not chats), while an
export still carries them (they are the user's data)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from writebehind import Config, WriteBehindStore
from writebehind.integrations import FRAMEWORK_STATUSES

from .server import Server, client


async def _seed(db_path: Path) -> None:
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        for status in sorted(FRAMEWORK_STATUSES):
            await store.ensure_session(f"thread-{status}", user_id=1, title=f"{status} thread", status=status)
        await store.ensure_session("a-chat", user_id=1, title="a real chat ✓")


def test_framework_threads_stay_out_of_the_chat_listings_but_not_out_of_the_export(tmp_path: Path) -> None:
    db_path = tmp_path / "chat.db"
    asyncio.run(_seed(db_path))
    server = Server(db_path)
    try:
        with client(server, "alice") as c:
            for query in ("", "?archived=include", "?archived=only", "?q=thread"):
                listed = [s["id"] for s in c.get(f"/api/sessions{query}").json()["sessions"]]
                assert not any(sid.startswith("thread-") for sid in listed), (query, listed)
            assert [s["id"] for s in c.get("/api/sessions").json()["sessions"]] == ["a-chat"]
            exported = orjson.loads(c.get("/api/me/export").content)
            ids = {s["id"] for s in exported["sessions"]}
            assert {f"thread-{status}" for status in FRAMEWORK_STATUSES} <= ids
    finally:
        server.close()
