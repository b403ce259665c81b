"""End to end, with real processes: uvicorn serving the chat app on a real SQLite file,
real SIGTERM, and clients that reconnect with Last-Event-ID."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from .server import Server, client, events, utf16_len


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def server(db_path: Path) -> Iterator[Server]:
    s = Server(db_path)
    yield s
    s.close()


def test_sigterm_mid_reply_then_restart_and_resume_from_last_event_id(db_path: Path) -> None:
    first = Server(db_path, delay_ms=40)
    alice = client(first, "alice")
    sid = alice.post("/api/sessions", json={"title": "resume me"}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "tell me a long story"})
    seen = ""
    last_id = None
    for event in events(alice, sid):
        last_id = event["event_id"]
        if event["role"] == "assistant":
            assert event["offset"] == len(seen)
            seen += event["text"]
            if len(seen) > 60:
                break  # the client drops here, mid-reply
    # graceful: uvicorn runs the lifespan's shutdown, which closes (flushes) the store
    assert "store closed: flushed" in first.stop(signal.SIGTERM)

    with sqlite3.connect(db_path) as conn:
        (stored,) = conn.execute(
            "SELECT content FROM messages WHERE session_id = ? AND seq = 2", (sid,)
        ).fetchone()
    assert stored.startswith(seen)

    second = Server(db_path)
    try:
        alice = client(second, "alice")
        record = alice.get(f"/api/sessions/{sid}").json()
        assert record["title"] == "resume me" and [m["role"] for m in record["messages"]] == [
            "user",
            "assistant",
        ]
        rest = ""
        for event in events(alice, sid, last_event_id=last_id):
            assert event["seq"] == 2 and event["offset"] == len(seen) + len(rest)
            rest += event["text"]
            if event["done"]:
                break
        assert seen + rest == stored == record["messages"][1]["content"]
        assert record["messages"][1]["done"] is True  # marked: interrupted by the shutdown
    finally:
        second.close()


def test_a_stream_open_at_sigterm_ends_with_the_reply_marked_interrupted(db_path: Path) -> None:
    """Ctrl-C or SIGTERM mid-reply: the open stream's last event is the reply's end, `done`
    and `interrupted`, with everything said up to it (what the page shows), and then the
    stream ends; it is not cut with the reply still "streaming"."""
    server = Server(db_path, delay_ms=40)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={"title": "cut 🎬"}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "a long story, 長い話"})
        said = ""
        last: dict[str, object] = {}
        for event in events(alice, sid):
            if event["role"] != "assistant":
                continue
            assert event["offset"] == utf16_len(said)
            said += str(event["text"])
            last = event
            if len(said) > 20 and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        assert last["done"] is True and last["interrupted"] is True, last
        server.proc.wait(timeout=30)
    finally:
        server.close()
    with sqlite3.connect(db_path) as conn:
        query = "SELECT content FROM messages WHERE session_id = ? AND seq = 2"
        (stored,) = conn.execute(query, (sid,)).fetchone()
    assert stored == said


def test_anonymous_session_is_gone_after_a_restart(db_path: Path) -> None:
    first = Server(db_path, delay_ms=0)
    anon = client(first)
    created = anon.post("/api/sessions", json={})
    assert created.status_code == 201
    cookie = created.cookies.get("wb_anon")
    assert cookie and "httponly" in created.headers["set-cookie"].lower()
    assert "samesite=strict" in created.headers["set-cookie"].lower()
    sid = created.json()["id"]
    anon.post(f"/api/sessions/{sid}/messages", json={"content": "remember me?"})
    assert anon.get(f"/api/sessions/{sid}").status_code == 200
    assert [s["id"] for s in anon.get("/api/sessions").json()["sessions"]] == [sid]
    assert client(first).get(f"/api/sessions/{sid}").status_code == 404  # another anonymous client
    assert "store closed: flushed" in first.stop(signal.SIGTERM)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    second = Server(db_path)
    try:
        anon = client(second)
        anon.cookies.set("wb_anon", cookie)
        assert anon.get(f"/api/sessions/{sid}").status_code == 404
    finally:
        second.close()


def test_another_users_session_answers_exactly_like_a_missing_one(server: Server) -> None:
    alice, bob = client(server, "alice"), client(server, "bob")
    sid = alice.post("/api/sessions", json={"title": "private"}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "secret"})
    missing = bob.get("/api/sessions/no-such-session")
    for response in (
        bob.get(f"/api/sessions/{sid}"),
        bob.get(f"/api/sessions/{sid}/events"),
        bob.post(f"/api/sessions/{sid}/messages", json={"content": "mine now"}),
        bob.patch(f"/api/sessions/{sid}", json={"title": "mine"}),
        bob.delete(f"/api/sessions/{sid}"),
    ):
        assert response.status_code == 404
        assert (
            response.json()["error"]["message"].replace(sid, "no-such-session")
            == missing.json()["error"]["message"]
        )
    assert bob.get("/api/sessions").json()["sessions"] == []
    assert alice.get(f"/api/sessions/{sid}").json()["title"] == "private"


def test_bad_input_gets_a_4xx_with_a_json_body_never_a_500(server: Server) -> None:
    alice = client(server, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "hi"})
    cases = {
        "malformed JSON": alice.post(
            "/api/sessions", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        "wrong content type": alice.post(
            "/api/sessions", content=b"title=x", headers={"Content-Type": "text/plain"}
        ),
        "oversized body": alice.post(f"/api/sessions/{sid}/messages", json={"content": "x" * 5000}),
        "unknown field": alice.post("/api/sessions", json={"title": "t", "owner": 2}),
        "empty content": alice.post(f"/api/sessions/{sid}/messages", json={"content": ""}),
        "lone surrogate": alice.post(
            f"/api/sessions/{sid}/messages",
            content=b'{"content": "\\ud800"}',
            headers={"Content-Type": "application/json"},
        ),
        "unknown id": alice.get("/api/sessions/does-not-exist"),
        "malformed id": alice.get("/api/sessions/..%2F..%2Fetc"),
        "garbage Last-Event-ID": alice.get(
            f"/api/sessions/{sid}/events", headers={"Last-Event-ID": "yesterday"}
        ),
        "Last-Event-ID that names no message": alice.get(
            f"/api/sessions/{sid}/events", headers={"Last-Event-ID": "0:5"}
        ),
        "bad status": alice.patch(f"/api/sessions/{sid}", json={"status": "Not OK!"}),
        "bad bearer": client(server).get("/api/sessions", headers={"Authorization": "Bearer nope"}),
        "bad pagination": alice.get("/api/sessions?limit=0"),
    }
    for case, response in cases.items():
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
        body = response.json()
        assert set(body.get("error", {})) == {"type", "message"}, (case, body)
    assert cases["oversized body"].status_code == 413
    assert cases["wrong content type"].status_code == 415
    assert cases["bad bearer"].status_code == 401


def test_export_and_erase_me(server: Server, db_path: Path) -> None:
    alice = client(server, "alice")
    sid = alice.post("/api/sessions", json={"title": "mine"}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "export me"})
    exported = alice.get("/api/me/export")
    assert (
        exported.status_code == 200
        and exported.json()["sessions"][0]["messages"][0]["content"] == "export me"
    )
    assert client(server).get("/api/me/export").status_code == 401
    # A preference set: stored as a session of its own, erased too, not one of the chats.
    assert alice.patch("/api/me/preferences", json={"keep_history": False}).status_code == 200
    assert alice.delete("/api/me").json() == {"deleted_sessions": 2, "deleted_chats": 1}
    assert alice.get(f"/api/sessions/{sid}").status_code == 404
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


def test_signing_in_claims_the_anonymous_session(server: Server) -> None:
    anon = client(server)
    created = anon.post("/api/sessions", json={"title": "before login"})
    sid = created.json()["id"]
    anon.post(f"/api/sessions/{sid}/messages", json={"content": "typed before signing in"})
    alice = client(server, "alice")
    alice.cookies.set("wb_anon", created.cookies["wb_anon"])
    claimed = alice.post(f"/api/sessions/{sid}/claim")
    assert claimed.status_code == 200
    assert [s["id"] for s in alice.get("/api/sessions").json()["sessions"]] == [sid]
    assert client(server, "bob").post(f"/api/sessions/{sid}/claim").status_code == 404
