"""The API the page needs, end to end against a real uvicorn: stop a reply, regenerate the
last one (an alternative of it), read messages by page, and see per message whether a
reply was cut or stopped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from writebehind.server.responder import EchoResponder

from .server import GIVE_UP_S, Server, client, sse, utf16_len


def _reply_to(text: str) -> str:
    return "".join(EchoResponder().reply_to(text))


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "chat.db", delay_ms=60)
    yield s
    s.close()


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "chat.db", delay_ms=0)
    yield s
    s.close()


def _wait_done(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """The session's messages once every reply has ended (a bound on failure only)."""
    deadline = time.monotonic() + GIVE_UP_S
    while True:
        messages: list[dict[str, Any]] = c.get(f"/api/sessions/{sid}").json()["messages"]
        if all(m["done"] for m in messages):
            return messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.05)


def test_stop_ends_the_streaming_reply_keeps_what_was_said_and_marks_it_stopped(slow: Server) -> None:
    alice = client(slow, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "a long answer please"})
    seen, stopped_body, last = "", None, None
    for e in sse(alice, sid):
        m = e["data"]
        if m["seq"] != 2:
            continue
        assert m["offset"] == utf16_len(seen)
        seen += m["text"]
        last = m
        if m["done"]:
            break
        if "token2" in seen and stopped_body is None:
            stop = alice.post(f"/api/sessions/{sid}/stop")
            assert stop.status_code == 200, stop.text
            stopped_body = stop.json()
    assert stopped_body is not None and last is not None
    (reply,) = stopped_body["stopped"]
    assert (reply["seq"], reply["done"], reply["stopped"], reply["interrupted"]) == (2, True, True, False)
    # The stream ends the reply, flagged, with exactly what was said before the stop.
    assert (last["done"], last["stopped"], last["interrupted"]) == (True, True, False)
    assert seen == reply["content"] and seen != _reply_to("a long answer please")
    stored = alice.get(f"/api/sessions/{sid}").json()["messages"][1]
    assert (stored["content"], stored["done"], stored["stopped"]) == (seen, True, True)
    # Nothing left to stop: an empty list, not an error. Another user: 404.
    assert alice.post(f"/api/sessions/{sid}/stop").json() == {"stopped": []}
    assert client(slow, "bob").post(f"/api/sessions/{sid}/stop").status_code == 404
    # The conversation goes on: the next reply is whole and not stopped.
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "go on"})
    messages = _wait_done(alice, sid)
    assert (messages[3]["content"], messages[3]["stopped"]) == (_reply_to("go on"), False)


def test_stop_also_ends_a_reply_waiting_behind_the_streaming_one(slow: Server) -> None:
    alice = client(slow, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "first"})
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "second"})
    stopped = alice.post(f"/api/sessions/{sid}/stop").json()["stopped"]
    assert [m["seq"] for m in stopped] == [2, 4]
    messages = _wait_done(alice, sid)
    assert [(m["done"], m["stopped"]) for m in messages] == [
        (True, False), (True, True), (True, False), (True, True),
    ]  # fmt: skip
    assert messages[3]["content"] == ""


def test_regenerate_appends_an_alternative_and_an_open_stream_follows_it(fast: Server) -> None:
    alice = client(fast, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    nothing = alice.post(f"/api/sessions/{sid}/regenerate")
    assert nothing.status_code == 409 and nothing.json()["error"]["type"] == "conflict"
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "say it twice"})
    expected = _reply_to("say it twice")
    texts: dict[int, str] = {}
    branches: list[dict[str, Any]] = []
    regenerated = None
    for e in sse(alice, sid):
        if e["event"] == "branch":
            branches.append({"id": e["id"], **e["data"]})
            continue
        m = e["data"]
        assert not m["rewound"]
        assert m["offset"] == utf16_len(texts.get(m["seq"], ""))
        texts[m["seq"]] = texts.get(m["seq"], "") + m["text"]
        if m["seq"] == 2 and m["done"]:
            answer = alice.post(f"/api/sessions/{sid}/regenerate")
            assert answer.status_code == 202, answer.text
            regenerated = answer.json()
        if m["seq"] == 3:
            assert m["parent_seq"] == 1  # the question both replies answer
            if m["done"]:
                break
    assert regenerated is not None
    assert (regenerated["seq"], regenerated["parent_seq"], regenerated["done"]) == (3, 1, False)
    assert regenerated["alternatives"] == [2, 3]
    # The stream said that the reply it had was no longer on the path, and where the new
    # path leaves it: after the question, whose id it gives.
    assert branches == [{"id": f"1:{utf16_len('say it twice')}d", "after_seq": 1}]
    assert texts == {1: "say it twice", 2: expected, 3: expected}
    messages = _wait_done(alice, sid)
    assert [(m["seq"], m["parent_seq"], m["alternatives"]) for m in messages] == [(1, 0, [1]), (3, 1, [2, 3])]
    assert alice.get(f"/api/sessions/{sid}").json()["message_count"] == 3  # the old reply is kept
    assert client(fast, "bob").post(f"/api/sessions/{sid}/regenerate").status_code == 404


def test_regenerate_while_the_reply_streams_is_a_conflict(slow: Server) -> None:
    alice = client(slow, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "still talking"})
    busy = alice.post(f"/api/sessions/{sid}/regenerate")
    assert busy.status_code == 409 and "stop" in busy.json()["error"]["message"]
    alice.post(f"/api/sessions/{sid}/stop")
    # A stopped reply can be regenerated: a new one, whole, not stopped; the stopped one stays.
    assert alice.post(f"/api/sessions/{sid}/regenerate").status_code == 202
    _question, reply = _wait_done(alice, sid)
    assert (reply["content"], reply["stopped"], reply["interrupted"], reply["alternatives"]) == (
        _reply_to("still talking"), False, False, [2, 3],
    )  # fmt: skip


def test_messages_by_page(fast: Server) -> None:
    alice = client(fast, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    for text in ("one", "two", "three"):
        alice.post(f"/api/sessions/{sid}/messages", json={"content": text})
    _wait_done(alice, sid)
    first = alice.get(f"/api/sessions/{sid}/messages", params={"limit": 4}).json()
    assert [m["seq"] for m in first["messages"]] == [1, 2, 3, 4]
    assert first["next_after_seq"] == 4
    rest = alice.get(f"/api/sessions/{sid}/messages", params={"after_seq": 4, "limit": 4}).json()
    assert [(m["seq"], m["content"]) for m in rest["messages"]] == [(5, "three"), (6, _reply_to("three"))]
    assert rest["next_after_seq"] is None
    m = rest["messages"][1]
    assert (m["role"], m["done"], m["interrupted"], m["stopped"]) == ("assistant", True, False, False)
    assert alice.get(f"/api/sessions/{sid}/messages", params={"after_seq": 6}).json()["messages"] == []
    assert alice.get(f"/api/sessions/{sid}/messages", params={"limit": 0}).status_code == 422
    assert alice.get(f"/api/sessions/{sid}/messages", params={"after_seq": -1}).status_code == 422
    assert client(fast, "bob").get(f"/api/sessions/{sid}/messages").status_code == 404


def test_the_first_message_titles_an_untitled_session(fast: Server) -> None:
    alice = client(fast, "alice")
    untitled = alice.post("/api/sessions", json={}).json()["id"]
    long = "Plan a three-day trip to Lisbon\nwith a budget, museums and the best pastel de nata"
    alice.post(f"/api/sessions/{untitled}/messages", json={"content": long})
    alice.post(f"/api/sessions/{untitled}/messages", json={"content": "and a second question"})
    titled = alice.post("/api/sessions", json={"title": "mine"}).json()["id"]
    alice.post(f"/api/sessions/{titled}/messages", json={"content": "does not rename it"})
    titles = {s["id"]: s["title"] for s in alice.get("/api/sessions").json()["sessions"]}
    assert titles == {untitled: "Plan a three-day trip to Lisbon", titled: "mine"}
