"""Edit, regenerate and step between alternatives through the API, end to end against a real
uvicorn: the session's active path is what GET, the messages page and the event stream
give; a switch, an edit or a regenerate from another client reaches an open stream as a
`branch` event and the new path, never a mixed one; `Last-Event-ID` resumes along the path
(no gap, no duplicate), also from a message another branch holds; all of it the same after
a SIGTERM and a restart; another user gets 404."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from writebehind.server.responder import EchoResponder

from .server import GIVE_UP_S, Server, client, sse, utf16_len

# Emoji (astral, with a skin-tone modifier), CJK, RTL, stacked combining marks.
Q1 = "héllo 👋🏽 world"
Q3 = "你好世界 🌏 and e\u0301\u0301 stacked"
EDIT = "مرحبا 👩🏽‍💻 e\u0301 edited"


def _reply_to(text: str) -> str:
    return "".join(EchoResponder().reply_to(text))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


def _wait_done(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """The session's active path once every reply on it has ended (a bound on failure only)."""
    deadline = time.monotonic() + GIVE_UP_S
    while True:
        messages: list[dict[str, Any]] = c.get(f"/api/sessions/{sid}").json()["messages"]
        if all(m["done"] for m in messages):
            return messages
        assert time.monotonic() < deadline, messages
        time.sleep(0.02)


def _path(messages: list[dict[str, Any]]) -> list[tuple[int, int, list[int], str]]:
    return [(m["seq"], m["parent_seq"], m["alternatives"], m["content"]) for m in messages]


def _say(c: httpx.Client, sid: str, text: str, parent_seq: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"content": text}
    if parent_seq is not None:
        body["parent_seq"] = parent_seq
    answer = c.post(f"/api/sessions/{sid}/messages", json=body)
    assert answer.status_code == 202, answer.text
    turn: dict[str, Any] = answer.json()
    _wait_done(c, sid)
    return turn


def test_edit_regenerate_and_switch_round_trip_and_survive_a_restart(db: Path) -> None:
    server = Server(db, delay_ms=0)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        _say(alice, sid, Q1)
        _say(alice, sid, Q3)
        regenerated = alice.post(f"/api/sessions/{sid}/regenerate").json()
        assert (regenerated["seq"], regenerated["parent_seq"], regenerated["alternatives"]) == (5, 3, [4, 5])
        _wait_done(alice, sid)
        # Edit question 3: the edit is its sibling (the same parent, 2) and gets its own reply.
        turn = _say(alice, sid, EDIT, parent_seq=2)
        said, reply = turn["user_message"], turn["assistant_message"]
        assert (said["seq"], said["parent_seq"], said["alternatives"]) == (6, 2, [3, 6])
        assert (reply["seq"], reply["parent_seq"], reply["alternatives"]) == (7, 6, [7])
        edited = [
            (1, 0, [1], Q1), (2, 1, [2], _reply_to(Q1)), (6, 2, [3, 6], EDIT), (7, 6, [7], _reply_to(EDIT)),
        ]  # fmt: skip
        assert _path(_wait_done(alice, sid)) == edited
        # Back to the original question: on to its most recent continuation, the regenerated reply.
        back = alice.post(f"/api/sessions/{sid}/branch", json={"seq": 3})
        assert back.status_code == 200, back.text
        assert _path(back.json()["messages"]) == [
            (1, 0, [1], Q1), (2, 1, [2], _reply_to(Q1)), (3, 2, [3, 6], Q3), (5, 3, [4, 5], _reply_to(Q3)),
        ]  # fmt: skip
        first = alice.post(f"/api/sessions/{sid}/branch", json={"seq": 4}).json()["messages"]
        assert [(m["seq"], m["alternatives"]) for m in first] == [
            (1, [1]),
            (2, [2]),
            (3, [3, 6]),
            (4, [4, 5]),
        ]
        # The messages page pages along the path (seqs grow along it).
        page = alice.get(f"/api/sessions/{sid}/messages", params={"after_seq": 2, "limit": 1}).json()
        assert ([m["seq"] for m in page["messages"]], page["next_after_seq"]) == ([3], 3)
        page = alice.get(f"/api/sessions/{sid}/messages", params={"after_seq": 3}).json()
        assert ([(m["seq"], m["alternatives"]) for m in page["messages"]], page["next_after_seq"]) == (
            [(4, [4, 5])], None,
        )  # fmt: skip
        before = alice.get(f"/api/sessions/{sid}").json()
        assert before["message_count"] == 7

        # Another user: every one of these is a missing session.
        bob = client(server, "bob")
        assert bob.post(f"/api/sessions/{sid}/branch", json={"seq": 3}).status_code == 404
        assert (
            bob.post(f"/api/sessions/{sid}/messages", json={"content": "x", "parent_seq": 2}).status_code
            == 404
        )
        assert bob.post(f"/api/sessions/{sid}/regenerate").status_code == 404
        # Bad input changes nothing and says which field: malformed, 422; a message the
        # session does not have, 409. A whole number written 3.0 is 3.
        for body in ({"seq": 0}, {}, {"seq": "3"}, {"seq": True}, {"seq": 3.5}, {"seq": 3, "extra": 1}):
            bad = alice.post(f"/api/sessions/{sid}/branch", json=body)
            assert bad.status_code == 422, (body, bad.text)
        bad = alice.post(f"/api/sessions/{sid}/branch", json={"seq": 8})
        assert bad.status_code == 409 and bad.json()["error"]["message"].startswith("seq: "), bad.text
        for parent, status in ((8, 409), (-1, 422), ("2", 422)):
            bad = alice.post(f"/api/sessions/{sid}/messages", json={"content": "x", "parent_seq": parent})
            assert bad.status_code == status and "parent_seq" in bad.json()["error"]["message"], bad.text
        assert alice.post(f"/api/sessions/{sid}/branch", json={"seq": 4.0}).status_code == 200
        assert alice.get(f"/api/sessions/{sid}").json() == before
    finally:
        server.stop(signal.SIGTERM)

    server = Server(db, delay_ms=0)  # the path and the alternatives, as they were
    try:
        alice = client(server, "alice")
        after = alice.get(f"/api/sessions/{sid}").json()
        assert after == before
        # A stream from before the restart resumes along the path: from message 5 (another
        # branch now) it is told where the paths part, then gets the path's message 4.
        stream = sse(alice, sid, last_event_id=f"5:{utf16_len(_reply_to(Q3))}d")
        branch, message = next(stream), next(stream)
        assert branch == {"event": "branch", "id": f"3:{utf16_len(Q3)}d", "data": {"after_seq": 3}}
        assert (message["data"]["seq"], message["data"]["parent_seq"], message["data"]["text"]) == (
            4, 3, _reply_to(Q3),
        )  # fmt: skip
        stream.close()
        # The conversation goes on where the path is: the new turn follows message 4.
        turn = _say(alice, sid, "and then? 🤔")
        assert [turn[k]["parent_seq"] for k in ("user_message", "assistant_message")] == [4, 8]
        switched = alice.post(f"/api/sessions/{sid}/branch", json={"seq": 6}).json()["messages"]
        assert [m["seq"] for m in switched] == [1, 2, 6, 7]
        # The export has every branch: each message with its parent, and the active leaf.
        exported = orjson.loads(alice.get("/api/me/export").content)
        (session,) = [s for s in exported["sessions"] if s["id"] == sid]
        assert [(m["seq"], m["parent_seq"]) for m in session["messages"]] == [
            (1, 0), (2, 1), (3, 2), (4, 3), (5, 3), (6, 2), (7, 6), (8, 4), (9, 8),
        ]  # fmt: skip
        assert session["active_seq"] == 7
    finally:
        server.close()


class Follower:
    """Reads a session's stream in a thread: `events` as they come, `wait_for(n)` until
    there are n of them (a bound on failure only)."""

    def __init__(self, c: httpx.Client, sid: str, last_event_id: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, args=(c, sid, last_event_id), daemon=True)
        self._thread.start()

    def _read(self, c: httpx.Client, sid: str, last_event_id: str | None) -> None:
        try:
            for e in sse(c, sid, last_event_id, give_up_s=2 * GIVE_UP_S):
                self.events.append(e)
        except (AssertionError, httpx.HTTPError) as exc:
            self.events.append({"event": "failed", "id": None, "data": str(exc)})

    def wait_for(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + GIVE_UP_S
        while not done(self.events):
            assert time.monotonic() < deadline, self.events
            assert not any(e["event"] == "failed" for e in self.events), self.events
            time.sleep(0.02)
        return list(self.events)


def shown_after(events: list[dict[str, Any]], had: dict[int, str] | None = None) -> dict[int, str]:
    """What a client that applies `events` shows (seq -> text), checking on the way that
    every event continues exactly what it has (no gap, no duplicate) and follows the
    message before it on its path (never a mixed path)."""
    shown: dict[int, str] = dict(had or {})
    for e in events:
        if e["event"] == "branch":
            keep = e["data"]["after_seq"]
            shown = {seq: text for seq, text in shown.items() if seq <= keep}
            continue
        m = e["data"]
        assert e["event"] == "message", e
        if m["rewound"]:
            shown = {seq: text for seq, text in shown.items() if seq < m["seq"]}
        before = [seq for seq in shown if seq < m["seq"]]
        assert m["parent_seq"] == (max(before) if before else 0), (m, shown)
        assert all(seq <= m["seq"] for seq in shown), (m, shown)
        have = "" if m["rewound"] else shown.get(m["seq"], "")
        assert m["offset"] == utf16_len(have), (m, shown)
        shown[m["seq"]] = have + m["text"]
    return shown


def test_a_stream_follows_the_active_path_and_resumes_along_it(db: Path) -> None:
    server = Server(db, delay_ms=3)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        _say(alice, sid, Q1)
        _say(alice, sid, Q3)
        path = {1: Q1, 2: _reply_to(Q1), 3: Q3, 4: _reply_to(Q3)}
        # A stream open while the reply is regenerated: it is told that its reply left the
        # path, keeps what it shares with the new one, and gets the new reply token by token.
        live = Follower(alice, sid)
        live.wait_for(lambda got: len(got) == 4)
        assert alice.post(f"/api/sessions/{sid}/regenerate").status_code == 202
        got = live.wait_for(lambda got: any(e["data"].get("seq") == 5 and e["data"]["done"] for e in got[4:]))
        assert got[4] == {"event": "branch", "id": f"3:{utf16_len(Q3)}d", "data": {"after_seq": 3}}
        assert shown_after(got) == {1: Q1, 2: _reply_to(Q1), 3: Q3, 5: _reply_to(Q3)}
        regenerated = got[5:]
        assert len(regenerated) > 3, "streamed token by token"

        # Resume from any event along the path: exactly the rest, nothing twice.
        for i, e in enumerate(got):
            if e["event"] != "message" or e["data"]["seq"] != 5 or e["data"]["done"]:
                continue
            rest = []
            for later in sse(alice, sid, last_event_id=e["id"]):
                rest.append(later)
                if later["data"]["done"]:
                    break
            assert shown_after(got[: i + 1] + rest) == {1: Q1, 2: _reply_to(Q1), 3: Q3, 5: _reply_to(Q3)}, e[
                "id"
            ]
        # After the question, the path goes on with 5, not 4 (another branch's).
        nxt = next(sse(alice, sid, last_event_id=f"3:{utf16_len(Q3)}d"))
        assert (nxt["data"]["seq"], nxt["data"]["parent_seq"], nxt["data"]["offset"]) == (5, 3, 0)
        # A client that still shows reply 4 (it was away during the regenerate), whole or in
        # part: told where the paths part, then the new path's rest.
        for away in (f"4:{utf16_len(path[4])}d", "4:3"):
            stream = sse(alice, sid, last_event_id=away)
            branch, message = next(stream), next(stream)
            assert branch == {"event": "branch", "id": f"3:{utf16_len(Q3)}d", "data": {"after_seq": 3}}, away
            assert (message["data"]["seq"], message["data"]["text"]) == (5, _reply_to(Q3))
            stream.close()
        # Ahead of the session (a crash lost it): the path's last message again, flagged.
        again = next(sse(alice, sid, last_event_id="9:0"))
        assert (again["data"]["seq"], again["data"]["rewound"], again["data"]["text"]) == (
            5,
            True,
            _reply_to(Q3),
        )

        # A switch and an edit from another client reach an open stream as the new path.
        end = got[-1]["id"]
        live = Follower(alice, sid, last_event_id=f"2:{utf16_len(path[2])}d")
        live.wait_for(lambda got: len(got) == 2)  # 3 and 5: it is live now
        assert alice.post(f"/api/sessions/{sid}/branch", json={"seq": 4}).status_code == 200
        got = live.wait_for(lambda got: len(got) == 4)
        assert got[2] == {"event": "branch", "id": f"3:{utf16_len(Q3)}d", "data": {"after_seq": 3}}
        assert (got[3]["data"]["seq"], got[3]["data"]["parent_seq"], got[3]["id"]) == (
            4, 3, f"4:{utf16_len(path[4])}d",
        )  # fmt: skip
        turn = alice.post(f"/api/sessions/{sid}/messages", json={"content": EDIT, "parent_seq": 0}).json()
        assert (turn["user_message"]["seq"], turn["user_message"]["alternatives"]) == (6, [1, 6])
        got = live.wait_for(lambda got: any(e["data"].get("seq") == 7 and e["data"]["done"] for e in got[4:]))
        assert got[4] == {"event": "branch", "id": "0:0", "data": {"after_seq": 0}}
        assert shown_after(got, {1: Q1, 2: path[2]}) == {6: EDIT, 7: _reply_to(EDIT)}
        # And an old position resumes onto the path as it is now.
        had = {1: Q1, 2: path[2], 3: Q3, 5: path[4]}
        assert shown_after(list(_until_done(alice, sid, end, 7)), had) == {6: EDIT, 7: _reply_to(EDIT)}
    finally:
        server.close()


def _until_done(c: httpx.Client, sid: str, last_event_id: str, seq: int) -> Iterator[dict[str, Any]]:
    for e in sse(c, sid, last_event_id=last_event_id):
        yield e
        if e["event"] == "message" and e["data"]["seq"] == seq and e["data"]["done"]:
            return


def test_the_path_does_not_change_while_a_reply_is_written(db: Path) -> None:
    server = Server(db, delay_ms=60)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": Q1})
        for refused in (
            alice.post(f"/api/sessions/{sid}/messages", json={"content": EDIT, "parent_seq": 0}),
            alice.post(f"/api/sessions/{sid}/branch", json={"seq": 1}),
            alice.post(f"/api/sessions/{sid}/regenerate"),
        ):
            assert refused.status_code == 409, refused.text
            assert "stop it first" in refused.json()["error"]["message"]
        # A new turn after the path's end still waits its turn, as before.
        assert alice.post(f"/api/sessions/{sid}/messages", json={"content": Q3}).status_code == 202
        assert [m["seq"] for m in alice.post(f"/api/sessions/{sid}/stop").json()["stopped"]] == [2, 4]
        # Stopped: the edit goes through, and its reply is written to the edit alone.
        turn = _say(alice, sid, EDIT, parent_seq=0)
        assert (turn["user_message"]["seq"], turn["user_message"]["alternatives"]) == (5, [1, 5])
        assert _path(_wait_done(alice, sid)) == [(5, 0, [1, 5], EDIT), (6, 5, [6], _reply_to(EDIT))]
    finally:
        server.close()


def test_a_question_cannot_follow_a_question(db: Path) -> None:
    """An edit is posted with the parent of the message it replaces: the start or a reply.
    A `parent_seq` naming a question (on the path or off it) is a 409 naming the field,
    and changes nothing."""
    server = Server(db, delay_ms=0)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        _say(alice, sid, Q1)
        _wait_done(alice, sid)
        _say(alice, sid, EDIT, parent_seq=0)  # seq 3, 4: question 1 is now off the path
        _wait_done(alice, sid)
        for parent in (3, 1):
            refused = alice.post(
                f"/api/sessions/{sid}/messages", json={"content": "两个问题?", "parent_seq": parent}
            )
            assert refused.status_code == 409, refused.text
            assert "parent_seq" in refused.json()["error"]["message"]
        assert len(alice.get(f"/api/sessions/{sid}").json()["messages"]) == 2
        page = alice.get(f"/api/sessions/{sid}/messages").json()["messages"]
        assert [m["seq"] for m in page] == [3, 4]
        turn = _say(alice, sid, "after the reply ✓", parent_seq=4)  # a reply: fine
        assert turn["user_message"]["parent_seq"] == 4
    finally:
        server.close()


def test_concurrent_regenerates_and_switches_make_one_alternative_each_time(db: Path) -> None:
    """Eight clients press Regenerate at once: one new reply, the others told 409 (it is
    being written); then a switch races an edit. The tree stays well formed whatever the
    order."""
    server = Server(db, delay_ms=30)  # a reply takes a while: the others find it being written
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        _say(alice, sid, Q1)
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: client(server, "alice").post(f"/api/sessions/{sid}/regenerate"), range(8))
            )
        assert sorted(a.status_code for a in answers) == [202] + [409] * 7, [a.text for a in answers]
        assert [m["seq"] for m in alice.post(f"/api/sessions/{sid}/stop").json()["stopped"]] == [3]
        assert [(m["seq"], m["alternatives"]) for m in _wait_done(alice, sid)] == [(1, [1]), (3, [2, 3])]
        with ThreadPoolExecutor(2) as pool:
            edit, switch = pool.map(
                lambda request: request(client(server, "alice")),
                [
                    lambda c: c.post(
                        f"/api/sessions/{sid}/messages", json={"content": EDIT, "parent_seq": 0}
                    ),
                    lambda c: c.post(f"/api/sessions/{sid}/branch", json={"seq": 2}),
                ],
            )
        assert edit.status_code == 202, edit.text
        assert switch.status_code in (200, 409), switch.text  # 409 when the edit's reply came first
        alice.post(f"/api/sessions/{sid}/stop")
        messages = _wait_done(alice, sid)
        assert [m["seq"] for m in messages] == [4, 5], "the edit, sent last or first, ends the path"
        assert messages[0]["alternatives"] == [1, 4]
    finally:
        server.close()
