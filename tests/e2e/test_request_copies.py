"""The request path never copies a whole session: sending a message, a page of messages,
an edit, a regenerate, a switch and a stop on a 2,000-message session each read only the
messages they answer with and the session's tree (`get_tree`), through a real server process
that counts the whole copies it makes (`tests.e2e.apps.copy_counting_app`)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

from writebehind import Config, WriteBehindStore

from .apps import LONG
from .server import Server, client

COUNT = 2 * LONG
TEXTS = ["héllo 👋🏽", "你好 世界", "שלום עולם", "e\u0301\u0301 combining"]


async def _seed(db_path: Path) -> None:
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        await store.ensure_session("long", user_id=1, title="長い 💬")
        for i in range(COUNT // 2):
            await store.append_message("long", user_id=1, role="user", content=f"{i}: {TEXTS[i % 4]}")
            meta = {"done": True}
            await store.append_message("long", user_id=1, role="assistant", content="ok", metadata=meta)


def _idle(c: httpx.Client) -> list[dict[str, object]]:
    """The last page of the path once every reply on it is done."""
    for _ in range(600):
        tail = c.get("/api/sessions/long/messages", params={"after_seq": COUNT - 10, "limit": 200}).json()
        if all(m["done"] for m in tail["messages"]):
            return list(tail["messages"])
        time.sleep(0.05)
    raise AssertionError("the replies never ended")


def test_no_request_copies_a_long_session_whole(tmp_path: Path) -> None:
    db_path = tmp_path / "chat.db"
    asyncio.run(_seed(db_path))
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--factory"]
    server = Server(db_path, delay_ms=50, command=[*command, "tests.e2e.apps:copy_counting_app"])
    try:
        with client(server, "alice") as c:
            page = c.get("/api/sessions/long/messages", params={"after_seq": 100, "limit": 50}).json()
            assert [m["seq"] for m in page["messages"]] == list(range(101, 151))
            assert page["next_after_seq"] == 150 and page["messages"][0]["alternatives"] == [101]
            sent = c.post("/api/sessions/long/messages", json={"content": "and now? 🤔"})
            assert sent.status_code == 202, sent.text
            assert [sent.json()[k]["seq"] for k in ("user_message", "assistant_message")] == [2001, 2002]
            stopped = c.post("/api/sessions/long/stop")  # mid-reply, or just after it
            assert stopped.status_code == 200, stopped.text
            _idle(c)
            edit = c.post("/api/sessions/long/messages", json={"content": "edited ✍️", "parent_seq": 2000})
            assert edit.status_code == 202, edit.text
            assert edit.json()["user_message"]["alternatives"] == [2001, 2003]
            _idle(c)
            again = c.post("/api/sessions/long/regenerate")
            assert again.status_code == 202 and again.json()["alternatives"] == [2004, 2005], again.text
            _idle(c)
            back = c.post("/api/sessions/long/branch", json={"seq": 2001})
            assert back.status_code == 200, back.text
            assert [m["seq"] for m in back.json()["messages"][-2:]] == [2001, 2002]
            assert back.json()["message_count"] == 2005
            assert c.get("/test/copies").json() == {}
            # The route that answers the whole session (allowed to copy it) is counted.
            assert c.get("/api/sessions/long").status_code == 200
            assert c.get("/test/copies").json() == {"long": 1}
    finally:
        server.close()
