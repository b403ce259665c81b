"""What an SSE stream promises, end to end against a real uvicorn: every reply on a stream
runs to its end, a reply cut by a crash is closed and flagged, an erased session's stream
is told, and offsets count what a browser counts (UTF-16 code units)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from writebehind.server.responder import EchoResponder

from .server import Server, client, sse, utf16_len


def _reply_to(text: str) -> str:
    return "".join(EchoResponder().reply_to(text))


def test_a_message_sent_while_a_reply_streams_waits_and_every_reply_completes(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", delay_ms=30)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        first = alice.post(f"/api/sessions/{sid}/messages", json={"content": "first question"})
        assert first.status_code == 202
        texts: dict[int, str] = {}
        done: list[int] = []
        second_sent = False
        for e in sse(alice, sid):
            assert e["event"] == "message", e
            m = e["data"]
            assert m["offset"] == utf16_len(texts.get(m["seq"], "")), (m, texts)
            assert not done or m["seq"] > done[-1], "a message is delivered whole, in order"
            texts[m["seq"]] = texts.get(m["seq"], "") + m["text"]
            if m["done"]:
                done.append(m["seq"])
            if m["seq"] == 2 and texts[2] and not m["done"] and not second_sent:
                second = alice.post(f"/api/sessions/{sid}/messages", json={"content": "second question"})
                assert second.status_code == 202
                assert [second.json()[k]["seq"] for k in ("user_message", "assistant_message")] == [3, 4]
                second_sent = True
            if 4 in done:
                break
        assert second_sent
        assert done == [1, 2, 3, 4]
        assert texts == {
            1: "first question",
            2: _reply_to("first question"),
            3: "second question",
            4: _reply_to("second question"),
        }
        stored = alice.get(f"/api/sessions/{sid}").json()["messages"]
        assert [(m["content"], m["done"], m["interrupted"]) for m in stored] == [
            (texts[seq], True, False) for seq in (1, 2, 3, 4)
        ]
    finally:
        server.close()


def _on_disk(db_path: Path, sid: str, seq: int) -> str | None:
    with sqlite3.connect(db_path) as conn:
        row = conn.execute(
            "SELECT content FROM messages WHERE session_id = ? AND seq = ?", (sid, seq)
        ).fetchone()
    return None if row is None else str(row[0])


def test_a_reply_cut_by_a_crash_is_marked_interrupted_and_a_client_ahead_gets_it_again(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "chat.db"
    first = Server(db_path, delay_ms=60, extra_env={"CHAT_SESSION_FLUSH_INTERVAL_MS": "200"})
    alice = client(first, "alice")
    sid = alice.post("/api/sessions", json={"title": "cut"}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "a story cut short"})
    seen, last_id = "", ""
    for e in sse(alice, sid):
        m = e["data"]
        if m["seq"] == 2:
            seen += m["text"]
            last_id = e["id"]
            flushed = _on_disk(db_path, sid, 2)
            if flushed and utf16_len(seen) > utf16_len(flushed):
                break  # part of the reply is on disk, and this client has more than that
    first.stop(signal.SIGKILL)
    survived = _on_disk(db_path, sid, 2)
    full = _reply_to("a story cut short")
    assert survived and full.startswith(survived) and survived != full
    # The client's own position is ahead of what survived unless a last flush caught up
    # with it between the read and the kill; then one a little ahead stands in for it.
    ahead = last_id if utf16_len(seen) > utf16_len(survived) else f"2:{utf16_len(survived) + 3}"

    second = Server(db_path)
    try:
        alice = client(second, "alice")
        reply = alice.get(f"/api/sessions/{sid}").json()["messages"][1]
        assert (reply["content"], reply["done"], reply["interrupted"]) == (survived, True, True)

        again = next(sse(alice, sid, last_event_id=ahead))
        assert again["event"] == "message"
        assert again["data"] == {
            "seq": 2, "id": reply["id"], "role": "assistant", "parent_seq": 1, "offset": 0, "text": survived,
            "done": True, "interrupted": True, "stopped": False, "rewound": True, "error": None,
        }  # fmt: skip
        assert again["id"] == f"2:{utf16_len(survived)}d"

        # A client that had exactly what survived gets the end of the message, flagged.
        end = next(sse(alice, sid, last_event_id=f"2:{utf16_len(survived)}"))
        assert end["data"]["text"] == "" and end["data"]["done"] and end["data"]["interrupted"]
        assert not end["data"]["rewound"]
        # The session goes on: a new message gets a reply that completes.
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "again"})
        for e in sse(alice, sid, last_event_id=again["id"]):
            if e["data"]["seq"] == 4 and e["data"]["done"]:
                break
        assert alice.get(f"/api/sessions/{sid}").json()["messages"][3]["content"] == _reply_to("again")
    finally:
        second.close()


def _follow_in_background(c: Any, sid: str) -> tuple[threading.Thread, list[dict[str, Any]], threading.Event]:
    """Read the session's stream in a thread until it ends; `got_one` is set at its first event."""
    got: list[dict[str, Any]] = []
    got_one = threading.Event()

    def read() -> None:
        try:
            for e in sse(c, sid):
                got.append(e)
                got_one.set()
        except AssertionError as exc:
            got.append({"event": "still-open", "id": None, "data": str(exc)})
        got_one.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got, got_one


def test_erasing_a_session_or_the_user_ends_its_open_stream_with_gone(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", delay_ms=0)
    try:
        alice, anon = client(server, "alice"), client(server)
        cases = []
        for who, c in (("a session's DELETE", anon), ("DELETE /api/me", alice)):
            sid = c.post("/api/sessions", json={}).json()["id"]
            c.post(f"/api/sessions/{sid}/messages", json={"content": "erase me"})
            cases.append((who, c, sid))
        other = alice.post("/api/sessions", json={}).json()["id"]

        for who, c, sid in cases:
            thread, got, got_one = _follow_in_background(c, sid)
            assert got_one.wait(30), who
            erased = c.delete(f"/api/sessions/{sid}") if c is anon else c.delete("/api/me")
            assert erased.status_code in (200, 204), (who, erased.text)
            thread.join(60)
            assert not thread.is_alive(), who
            assert got[-1]["event"] == "gone", (who, got[-3:])
            assert all(e["event"] == "message" for e in got[:-1]), who
        assert alice.get(f"/api/sessions/{other}").status_code == 404  # erased with the user
    finally:
        server.close()


def test_offsets_and_event_ids_count_utf16_code_units(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", delay_ms=5)
    text = "emoji 😀🎉👍🏽 CJK 漢字かな 한국어 combining e\u0301 a\u0308 flags 🇫🇷"
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": text})
        ids: list[tuple[str, str]] = []  # (event id, what the client had after it)
        have = ""
        for e in sse(alice, sid):
            m = e["data"]
            if m["seq"] != 2:
                continue
            assert m["offset"] == utf16_len(have)
            have += m["text"]
            assert e["id"] == f"2:{utf16_len(have)}{'d' if m['done'] else ''}"
            ids.append((e["id"], have))
            if m["done"]:
                break
        assert have == _reply_to(text) and utf16_len(have) > len(have)  # astral characters in it
        # Resuming from any point gives exactly the rest.
        for event_id, had in ids[1:-1:7]:
            rest = ""
            for e in sse(alice, sid, last_event_id=event_id):
                assert e["data"]["offset"] == utf16_len(had + rest)
                rest += e["data"]["text"]
                if e["data"]["done"]:
                    break
            assert had + rest == have
        # An offset inside a surrogate pair is not one a browser produces: the message again.
        inside = utf16_len("You said: \u201cemoji ") + 1
        e = next(sse(alice, sid, last_event_id=f"2:{inside}"))
        assert (e["data"]["offset"], e["data"]["text"], e["data"]["rewound"]) == (0, have, True)
    finally:
        server.close()


def test_a_stream_resumed_after_the_whole_message_gets_the_next_one(tmp_path: Path) -> None:
    """`<seq>:<offset>d`: the client has all of message seq; the stream goes on after it."""
    server = Server(tmp_path / "chat.db", delay_ms=0)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "one"})
        deadline = time.monotonic() + 30
        while not alice.get(f"/api/sessions/{sid}").json()["messages"][1]["done"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "two"})
        first = next(sse(alice, sid, last_event_id=f"2:{utf16_len(_reply_to('one'))}d"))
        assert (first["data"]["seq"], first["data"]["text"]) == (3, "two")
    finally:
        server.close()
