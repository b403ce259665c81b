"""Search through the real server (uvicorn subprocess, SQLite file): `GET /api/search` for
the signed-in caller only, and the page's search box listing message hits with their
snippets marked, a click opening the chat, in headless Chromium."""

from __future__ import annotations

import re
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
