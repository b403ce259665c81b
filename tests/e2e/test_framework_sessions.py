"""A signed-in user's agent-framework threads (`writebehind.integrations`) share the store
with their chats; the chat page's listings leave them out (they are not chats), while an
export still carries them (they are the user's data)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
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


NEEDLE = "needle 🧵 針"


async def _seed_threads(db_path: Path) -> None:
    """A chat with a message and its reply, then every framework's thread (newer: first in a
    search by date), each with messages holding the chat's word too."""
    async with WriteBehindStore.from_config(Config(db_path=db_path)) as store:
        await store.ensure_session("a-chat", user_id=1, title="שלום chat")
        await store.append_message("a-chat", user_id=1, role="user", content=f"where is the {NEEDLE}?")
        await store.append_message("a-chat", user_id=1, role="assistant", content=f"the {NEEDLE} is here")
        for status in sorted(FRAMEWORK_STATUSES):
            sid = f"thread-{status}"
            await store.ensure_session(sid, user_id=1, title=f"{status} 🤖", status=status)
            await store.append_message(sid, user_id=1, role="user", content=f"agent {NEEDLE} e\u0301")
            await store.append_message(sid, user_id=1, role="assistant", content=f"tool says {NEEDLE}")


def _by_id(c: httpx.Client, sid: str) -> dict[str, httpx.Response]:
    """Every by-id route, asked about `sid`."""
    return {
        "get": c.get(f"/api/sessions/{sid}"),
        "patch": c.patch(f"/api/sessions/{sid}", json={"title": "renamed by a chat ✎"}),
        "claim": c.post(f"/api/sessions/{sid}/claim"),
        "messages": c.get(f"/api/sessions/{sid}/messages"),
        "post": c.post(f"/api/sessions/{sid}/messages", json={"content": "a chat message 💬"}),
        "edit": c.post(f"/api/sessions/{sid}/messages", json={"content": "an edit", "parent_seq": 0}),
        "stop": c.post(f"/api/sessions/{sid}/stop"),
        "regenerate": c.post(f"/api/sessions/{sid}/regenerate"),
        "branch": c.post(f"/api/sessions/{sid}/branch", json={"seq": 1}),
        "events": c.get(f"/api/sessions/{sid}/events"),
        "delete": c.delete(f"/api/sessions/{sid}"),
    }


def test_a_framework_thread_is_missing_to_every_by_id_route_and_to_search(tmp_path: Path) -> None:
    db_path = tmp_path / "chat.db"
    asyncio.run(_seed_threads(db_path))
    server = Server(db_path)
    try:
        with client(server, "alice") as c:
            for status in sorted(FRAMEWORK_STATUSES):
                sid = f"thread-{status}"
                missing = f"nothing-{status}"  # the same length: the same body but for the id
                asked, expected = _by_id(c, sid), _by_id(c, missing)
                for route, answer in asked.items():
                    assert answer.status_code == 404, (route, status, answer.text)
                    assert answer.text == expected[route].text.replace(missing, sid), (route, answer.text)
                    assert answer.headers["content-type"] == expected[route].headers["content-type"]
            # Nothing of any thread changed; the chat answers as ever.
            exported = orjson.loads(c.get("/api/me/export").content)
            threads = {s["id"]: s for s in exported["sessions"] if s["id"].startswith("thread-")}
            assert set(threads) == {f"thread-{status}" for status in FRAMEWORK_STATUSES}
            for status in FRAMEWORK_STATUSES:
                thread = threads[f"thread-{status}"]
                assert thread["title"] == f"{status} 🤖" and thread["status"] == status
                assert [m["content"] for m in thread["messages"]] == [
                    f"agent {NEEDLE} e\u0301",
                    f"tool says {NEEDLE}",
                ]
            assert c.get("/api/sessions/a-chat/messages").json()["messages"][0]["content"].endswith("?")
            # A chat cannot be made a thread either (it would leave the chat API for good).
            refused = c.patch("/api/sessions/a-chat", json={"status": "langgraph"})
            assert refused.status_code == 422 and "status" in refused.json()["error"]["message"]
            # Search: the chat's two messages only, whatever the page size; the threads'
            # hits (newer, so first by date) are skipped, and paging still ends.
            for order in ("newest", "relevance"):
                for limit in (1, 2, 20):
                    seen, offset = [], 0
                    for _ in range(20):
                        page = c.get(
                            "/api/search",
                            params={"q": "針 needle", "order": order, "limit": limit, "offset": offset},
                        ).json()
                        assert len(page["hits"]) <= limit
                        seen += [(h["session_id"], h["seq"]) for h in page["hits"]]
                        if page["next_offset"] is None:
                            break
                        offset = page["next_offset"]
                    assert sorted(seen) == [("a-chat", 1), ("a-chat", 2)], (order, limit, seen)
    finally:
        server.close()
