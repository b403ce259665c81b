"""Search through the real server (uvicorn subprocess, SQLite file): `GET /api/search` for
the signed-in caller only, and the page's search box listing message hits with their
snippets marked, a click opening the chat, in headless Chromium."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .server import Server
from .test_browser import ARGS, CHROMIUM, needs_chromium

TIMEOUT = 30_000  # bounds a failure; nothing asserts how fast anything is


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "search.db", delay_ms=0)
    try:
        yield server
    finally:
        server.close()


def _post(client: httpx.Client, token: str, text: str) -> str:
    auth = {"Authorization": f"Bearer {token}"}
    sid = str(client.post("/api/sessions", json={}, headers=auth).json()["id"])
    answer = client.post(f"/api/sessions/{sid}/messages", json={"content": text}, headers=auth)
    assert answer.status_code == 202, answer.text
    return sid


def test_the_api_searches_the_callers_messages_only(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        mine = _post(client, "tok-alice", "the zebra crossing at 東京駅")
        _post(client, "tok-bob", "bob's zebra is private")
        alice = {"Authorization": "Bearer tok-alice"}
        # the echo reply quotes the message: two hits, both in alice's chat
        found = client.get("/api/search", params={"q": "ZEBRA", "order": "newest"}, headers=alice).json()
        assert [(h["session_id"], h["role"]) for h in found["hits"]] == [(mine, "assistant"), (mine, "user")]
        assert [s["text"] for s in found["hits"][1]["snippet"] if s["match"]] == ["zebra"]
        assert found["next_offset"] is None and found["order"] == "newest"
        first = client.get("/api/search", params={"q": "zebra", "limit": 1}, headers=alice).json()
        assert len(first["hits"]) == 1 and first["next_offset"] == 1
        cjk = client.get("/api/search", params={"q": "東京"}, headers=alice).json()
        assert {h["session_id"] for h in cjk["hits"]} == {mine}
        for hostile in ('"', "zebra*", "NEAR(zebra)", "-zebra", "body:zebra", "(", "%"):
            answer = client.get("/api/search", params={"q": hostile}, headers=alice)
            assert answer.status_code == 200, (hostile, answer.text)
        blank = client.get("/api/search", params={"q": "   "}, headers=alice)
        assert blank.status_code == 422 and "query" in blank.json()["error"]["message"]
        assert client.get("/api/search", params={"q": "zebra"}).status_code == 401  # anonymous
        # the title filter still answers as before
        titles = client.get("/api/sessions", params={"q": "zebra"}, headers=alice).json()
        assert [s["id"] for s in titles["sessions"]] == [mine]


def _sign_in(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", "tok-alice")
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")


@needs_chromium
def test_the_search_box_lists_messages_with_marked_snippets_and_opens_them(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        target = _post(client, "tok-alice", "Packing list: <b>umbrella</b> and boots")
        _post(client, "tok-alice", "Something about the weather")
        _post(client, "tok-bob", "bob also needs an umbrella")
    with sync_playwright() as p:
        browser: Browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            _sign_in(page, server.url)
            page.fill("#search", "umbrella")
            hits = page.locator("#hits li")
            expect(hits).to_have_count(2, timeout=TIMEOUT)  # the message and its echo; not bob's
            for i in range(2):
                assert hits.nth(i).get_attribute("data-id") == target
            expect(hits.first.locator("mark")).to_have_text(["umbrella"])
            expect(hits.first.locator(".snippet")).to_contain_text("<b>umbrella</b>")  # text, not markup
            expect(hits.first.locator(".snippet b")).to_have_count(0)
            hits.first.click()
            expect(page.locator(".msg.user").first).to_contain_text("Packing list", timeout=TIMEOUT)
            assert page.evaluate("localStorage.getItem('wb-session')") == target
            page.fill("#search", "nothing-like-this")
            expect(hits).to_have_text([re.compile("No message with")], timeout=TIMEOUT)
            page.press("#search", "Escape")
            expect(page.locator("#hits")).to_be_hidden()
            assert errors == []
        finally:
            browser.close()


FOUND = "ζήτα東京"  # one search word: Greek and CJK in one run of letters


def _turn(client: httpx.Client, sid: str, text: str, parent_seq: int | None = None) -> None:
    """Post a message (an edit with `parent_seq`) and wait until its reply is whole."""
    auth = {"Authorization": "Bearer tok-alice"}
    body: dict[str, object] = {"content": text}
    if parent_seq is not None:
        body["parent_seq"] = parent_seq
    answer = client.post(f"/api/sessions/{sid}/messages", json=body, headers=auth)
    assert answer.status_code == 202, answer.text
    for _ in range(600):
        if all(m["done"] for m in client.get(f"/api/sessions/{sid}", headers=auth).json()["messages"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"the reply to {text!r} never ended")


def _long(i: int) -> str:
    return f"Turn {i} 🐢\n" + "\n".join(f"line {j} of turn {i}, שורה {j}" for j in range(6))


@needs_chromium
def test_a_hit_opens_its_message_switching_to_its_branch_when_it_is_not_on_the_active_path(
    server: Server,
) -> None:
    """A hit on an inactive branch (an edited question) opens that branch, scrolled to the
    message; a hit on the active path opens it as it is, scrolled to the message."""
    auth = {"Authorization": "Bearer tok-alice"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        branched = str(client.post("/api/sessions", json={"title": "ветки 🌳"}, headers=auth).json()["id"])
        _turn(client, branched, _long(1))
        _turn(client, branched, f"Where is {FOUND}? e\u0301 🦓")  # seq 3, its reply 4
        for i in range(3, 12):
            _turn(client, branched, _long(i))  # seqs 5 to 22
        _turn(client, branched, "edited, no word here ✍️", parent_seq=2)  # 23, reply 24: active
        path = client.get(f"/api/sessions/{branched}", headers=auth).json()["messages"]
        assert [m["seq"] for m in path] == [1, 2, 23, 24]
        plain = str(client.post("/api/sessions", json={"title": "一本道"}, headers=auth).json()["id"])
        _turn(client, plain, "Top: the word مرحبا-🐙 is here")  # seq 1, its reply 2
        for i in range(2, 12):
            _turn(client, plain, _long(i))
    with sync_playwright() as p:
        browser: Browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            _sign_in(page, server.url)
            page.fill("#search", FOUND)
            hit = page.locator("#hits li[data-seq='3']")
            expect(hit).to_have_count(1, timeout=TIMEOUT)
            hit.click()
            found = page.locator("#log .turn[data-seq='3']")
            expect(found).to_contain_text(f"Where is {FOUND}?", timeout=TIMEOUT)
            expect(found).to_be_in_viewport()
            seqs = page.locator("#log .turn").evaluate_all("ts => ts.map(t => Number(t.dataset.seq))")
            assert seqs == list(range(1, 23))  # the message's branch, from the start to its end
            expect(page.locator("#log .turn[data-seq='23']")).to_have_count(0)
            expect(page.locator("#log .turn[data-seq='3'] .alts .count")).to_have_text("1/2")
            with httpx.Client(base_url=server.url, timeout=30) as client:
                now = client.get(f"/api/sessions/{branched}", headers=auth).json()["messages"]
            assert [m["seq"] for m in now][:3] == [1, 2, 3]  # the switch is the session's, not the page's
            # A hit on the active path: no switch, scrolled up to it.
            page.fill("#search", "مرحبا-🐙")
            top = page.locator(f"#hits li[data-id='{plain}'][data-seq='1']")
            expect(top).to_have_count(1, timeout=TIMEOUT)
            top.click()
            first = page.locator("#log .turn[data-seq='1']")
            expect(first).to_contain_text("Top: the word", timeout=TIMEOUT)
            expect(first).to_be_in_viewport()
            expect(page.locator("#log .turn").last).not_to_be_in_viewport()
            expect(page.locator("#log .turn")).to_have_count(22)
            assert page.evaluate("localStorage.getItem('wb-session')") == plain
            assert errors == []
        finally:
            browser.close()
