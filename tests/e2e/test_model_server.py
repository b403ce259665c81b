"""The chat server with a model behind it (`CHAT_MODEL_BASE_URL`), end to end: a real
uvicorn process, and an OpenAI-compatible fake served by the test on 127.0.0.1. Replies
stream from the model with the session's history sent; an upstream failure is a visible
error stored on the reply, with what was said kept; a stop closes the upstream stream;
the API key and the conversation never reach the log."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.sync_api import expect, sync_playwright

from .fake_model import FakeModelThread, Status, Stream, chunk, tokens
from .server import Server, client, events, free_port
from .test_browser import ARGS, CHROMIUM, needs_chromium

KEY = "sk-live-DO-NOT-LOG-4242424242"


@pytest.fixture
def fake() -> Iterator[FakeModelThread]:
    with FakeModelThread() as model:
        yield model


def _serve(db: Path, fake: FakeModelThread) -> Server:
    return Server(
        db,
        extra_env={
            "CHAT_MODEL_BASE_URL": fake.base_url,
            "CHAT_MODEL_NAME": "fake-llm",
            "CHAT_MODEL_API_KEY": KEY,
        },
    )


def _reply(c: httpx.Client, sid: str, content: str) -> dict[str, Any]:
    """Send `content`, follow the stream until its reply ends; the last event of the reply."""
    turn = c.post(f"/api/sessions/{sid}/messages", json={"content": content})
    assert turn.status_code == 202, turn.text
    seq = turn.json()["assistant_message"]["seq"]
    text = ""
    for event in events(c, sid):
        if event["seq"] != seq:
            continue
        assert event["offset"] == len(text.encode("utf-16-le")) // 2
        text += event["text"]
        if event["done"]:
            return {**event, "text": text}
    raise AssertionError("the stream ended before the reply")


def test_replies_stream_from_the_model_with_the_history_sent(tmp_path: Path, fake: FakeModelThread) -> None:
    fake.script(Stream(tokens("Olá", " 👋🏽", " 東京")), Stream(tokens("שלום", " e\u0301")))
    server = _serve(tmp_path / "chat.db", fake)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        first = _reply(alice, sid, "Greet me in three scripts")
        assert first["text"] == "Olá 👋🏽 東京" and not first["interrupted"] and first["error"] is None
        second = _reply(alice, sid, "And in Hebrew?")
        assert second["text"] == "שלום e\u0301"
        messages = alice.get(f"/api/sessions/{sid}").json()["messages"]
        assert [m["content"] for m in messages] == [
            "Greet me in three scripts", "Olá 👋🏽 東京", "And in Hebrew?", "שלום e\u0301"
        ]  # fmt: skip
        assert all(m["error"] is None for m in messages)
        requests = fake.requests()
        assert len(requests) == 2
        assert requests[1].body["messages"] == [
            {"role": "user", "content": "Greet me in three scripts"},
            {"role": "assistant", "content": "Olá 👋🏽 東京"},
            {"role": "user", "content": "And in Hebrew?"},
        ]
        assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in requests)
        assert all(r.body["model"] == "fake-llm" and r.body["stream"] is True for r in requests)
    finally:
        log = server.close()
    assert KEY not in log


def test_an_upstream_failure_is_a_visible_error_stored_on_the_reply(
    tmp_path: Path, fake: FakeModelThread
) -> None:
    secret_text = "my bank PIN is 0000"
    fake.script(
        Status(500, orjson.dumps({"error": {"message": f"overloaded while reading: {secret_text}"}})),
        Stream([chunk("Half"), chunk(" a reply")], end="die"),
        Stream(tokens("Whole", " again")),
    )
    db = tmp_path / "chat.db"
    server = _serve(db, fake)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        failed = _reply(alice, sid, secret_text)
        assert failed["text"] == "" and failed["interrupted"] is True
        assert failed["error"] == f"the model server answered 500: overloaded while reading: {secret_text}"
        cut = _reply(alice, sid, "try again")
        assert cut["text"] == "Half a reply" and cut["interrupted"] is True  # what came is kept
        assert cut["error"] == "the model server closed the connection before the reply was finished"
        listed = alice.get(f"/api/sessions/{sid}/messages").json()["messages"]
        assert [(m["content"], m["error"]) for m in listed if m["role"] == "assistant"] == [
            ("", failed["error"]),
            ("Half a reply", cut["error"]),
        ]
    finally:
        log = server.close()
    # The log says that replies failed and why in kind, never the conversation nor the key.
    assert "failed (status 500)" in log and "failed (closed)" in log
    assert secret_text not in log and KEY not in log

    second = _serve(db, fake)  # stored: the errors are there after a restart
    try:
        alice = client(second, "alice")
        messages = alice.get(f"/api/sessions/{sid}").json()["messages"]
        assert [m["error"] for m in messages if m["role"] == "assistant"] == [failed["error"], cut["error"]]
        # A regenerate writes a new reply beside the last one; the error stays with the old one.
        regenerated = alice.post(f"/api/sessions/{sid}/regenerate")
        assert regenerated.status_code == 202 and regenerated.json()["error"] is None
        assert (regenerated.json()["seq"], regenerated.json()["alternatives"]) == (5, [4, 5])
        again = None
        for event in events(alice, sid):
            if event["seq"] == 5 and event["done"]:
                again = event
                break
        assert again is not None and again["error"] is None and not again["interrupted"]
        path = alice.get(f"/api/sessions/{sid}").json()["messages"]
        assert [(m["seq"], m["content"], m["error"]) for m in path[2:]] == [
            (3, "try again", None), (5, "Whole again", None),
        ]  # fmt: skip
        old = alice.post(f"/api/sessions/{sid}/branch", json={"seq": 4}).json()["messages"][3]
        assert (old["seq"], old["error"]) == (4, cut["error"])
    finally:
        second.close()


def test_a_stopped_reply_closes_the_upstream_stream(tmp_path: Path, fake: FakeModelThread) -> None:
    fake.script(Stream(tokens("streaming", " on")[:3], end="hang"))
    server = _serve(tmp_path / "chat.db", fake)
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "talk forever"})
        said = ""
        for event in events(alice, sid):
            if event["role"] == "assistant":
                said += event["text"]
                if said == "streaming on":
                    break
        stopped = alice.post(f"/api/sessions/{sid}/stop").json()["stopped"]
        assert [(m["content"], m["stopped"], m["error"]) for m in stopped] == [("streaming on", True, None)]
        (request,) = fake.requests()
        fake.wait(request.disconnected.wait)  # the model's stream was closed, not left hanging
    finally:
        server.stop(signal.SIGTERM)


def test_an_unreachable_model_is_said_on_the_reply(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    server = Server(
        tmp_path / "chat.db",
        extra_env={"CHAT_MODEL_BASE_URL": f"http://127.0.0.1:{port}/v1", "CHAT_MODEL_NAME": "m"},
    )
    try:
        anon = client(server)
        created = anon.post("/api/sessions", json={})
        anon.cookies.set("wb_anon", created.cookies["wb_anon"])
        reply = _reply(anon, created.json()["id"], "anyone there?")
        assert reply["error"] == "cannot reach the model server" and reply["interrupted"] is True
    finally:
        server.close()


def test_an_apps_own_responder_through_create_app(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--factory"]
    server = Server(tmp_path / "chat.db", command=[*command, "tests.e2e.apps:responder_app"])
    try:
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        assert _reply(alice, sid, "abc 😀 日本")["text"] == "[1] 本日 😀 cba"
        failed = _reply(alice, sid, "boom")
        assert (failed["text"], failed["error"]) == ("[3] ", "the calculator tool is down")
        crashed = _reply(alice, sid, "crash")
        assert (crashed["text"], crashed["error"]) == ("[5] ", "the reply failed on the server")
        assert crashed["interrupted"] is True
    finally:
        log = server.close()
    assert "failed (tool down)" in log


@needs_chromium
def test_the_page_shows_why_a_reply_failed(tmp_path: Path, fake: FakeModelThread) -> None:
    fake.script(
        Stream([chunk("Lisbon in three days: **Belém**,"), chunk(" Alfama")], end="die"),
        Status(503, orjson.dumps({"error": {"message": "model is loading"}})),
    )
    server = _serve(tmp_path / "chat.db", fake)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#token", "tok-alice")
            page.click("#signin")
            expect(page.locator("#who")).to_have_text("signed in")
            page.fill("#text", "Plan a trip to Lisbon")
            page.press("#text", "Enter")
            turn = page.locator(".turn.assistant").last
            expect(turn.locator(".error")).to_have_text(
                "the model server closed the connection before the reply was finished", timeout=30_000
            )
            expect(turn.locator(".flag")).to_have_text("interrupted")
            expect(turn.locator(".msg strong")).to_have_text("Belém")  # what came is kept, rendered
            page.fill("#text", "And Porto?")
            page.press("#text", "Enter")
            second = page.locator(".turn.assistant").nth(1)
            expect(second.locator(".error")).to_have_text("the model server answered 503: model is loading")
            expect(second.locator(".msg")).to_be_hidden()  # nothing was said: the error says it all
            page.reload()  # stored: the same after a reload
            expect(page.locator(".turn.assistant .error")).to_have_text(
                [
                    "the model server closed the connection before the reply was finished",
                    "the model server answered 503: model is loading",
                ]
            )
            browser.close()
    finally:
        server.close()
