"""Temporary chats on the page, in headless Chromium against a real server: the "Temporary
chat" toggle for a new chat, the notice in a temporary chat, the "Don't keep my history"
setting, and what is on disk after the server's SIGTERM (raw bytes of the SQLite file, its
WAL and the recovery file) and after a restart."""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from writebehind.server.responder import EchoResponder

from .server import TOKENS, Server
from .test_browser import ARGS, CHROMIUM, needs_chromium

pytestmark = needs_chromium
TIMEOUT = 30_000  # bounds a failure; nothing asserts how fast anything is
WORDS = " 🦄 秘密の話 שלום e\u0301"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _sign_in(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", TOKENS["alice"])
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")


def _say_and_wait(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_text("".join(EchoResponder().reply_to(text)), timeout=TIMEOUT)
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=TIMEOUT)


def _on_disk(db: Path, text: str) -> list[str]:
    """The files beside the database that hold `text` (UTF-8 or UTF-16)."""
    needles = (text.encode(), text.encode("utf-16-le"))
    return sorted(
        p.name
        for p in db.parent.glob(db.name + "*")
        if p.is_file() and any(n in p.read_bytes() for n in needles)
    )


def _api(server: Server, path: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    return httpx.get(server.url + path, headers=headers, timeout=10)


def test_the_temporary_chat_toggle_and_notice_and_nothing_of_it_on_disk(
    tmp_path: Path, browser: Browser
) -> None:
    db = tmp_path / "page.db"
    temp, kept = f"TEMP-{uuid.uuid4().hex}", f"KEPT-{uuid.uuid4().hex}"
    server = Server(db, delay_ms=0)
    problems: list[str] = []
    try:
        page = browser.new_page()
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        _sign_in(page, server.url)
        toggle = page.locator("#temporary")
        note = page.locator("#temp-note")
        expect(toggle).to_be_visible()
        expect(toggle).to_have_attribute("aria-pressed", "false")
        expect(note).to_be_hidden()
        toggle.click()
        expect(toggle).to_have_attribute("aria-pressed", "true")
        expect(note).to_be_visible()  # said before the first message is sent
        expect(note).to_contain_text("not kept")
        _say_and_wait(page, temp + WORDS)
        expect(toggle).to_be_hidden()  # a chat's kind is chosen once, at its creation
        expect(note).to_be_visible()
        item = page.locator("#sessions li")
        expect(item).to_have_count(1)
        expect(item.first.locator(".temp")).to_have_text("temporary, not kept")
        temp_id = item.first.get_attribute("data-id")
        assert temp_id is not None and _api(server, f"/api/sessions/{temp_id}").json()["temporary"] is True
        page.reload()  # still there while the server runs, still saying so
        expect(page.locator(".msg.user")).to_have_text(temp + WORDS)
        expect(note).to_be_visible()
        # A new chat is kept again (the default), and says nothing of the sort.
        page.click("#new")
        expect(toggle).to_have_attribute("aria-pressed", "false")
        expect(note).to_be_hidden()
        _say_and_wait(page, kept + WORDS)
        expect(note).to_be_hidden()
        expect(page.locator("#sessions li .temp")).to_have_count(1)
        assert problems == []
    finally:
        output = server.stop(signal.SIGTERM)
    assert "store closed: flushed" in output, output
    assert _on_disk(db, kept), "the scan must see what the server wrote"
    assert _on_disk(db, temp) == []
    server = Server(db, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        expect(page.locator("#sessions li .title")).to_have_text([kept + WORDS])
        expect(page.locator("#sessions li .temp")).to_have_count(0)
    finally:
        server.close()


def test_the_dont_keep_my_history_setting_makes_new_chats_temporary_and_survives_a_restart(
    tmp_path: Path, browser: Browser
) -> None:
    db = tmp_path / "page.db"
    temp = f"TEMP-{uuid.uuid4().hex}"
    server = Server(db, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        page.click("#settings summary")
        setting = page.locator("#no-history")
        expect(setting).not_to_be_checked()
        setting.check()
        expect(page.locator("#notice")).to_have_text("New chats are temporary: not kept.")
        expect(page.locator("#temporary")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#temp-note")).to_be_visible()
        _say_and_wait(page, temp + WORDS)
        expect(page.locator("#sessions li .temp")).to_have_count(1)
        # The toggle overrides the default for one chat: this one is kept.
        page.click("#new")
        expect(page.locator("#temporary")).to_have_attribute("aria-pressed", "true")
        page.click("#temporary")
        expect(page.locator("#temp-note")).to_be_hidden()
        _say_and_wait(page, "kept on purpose")
        assert _api(server, "/api/me/preferences").json() == {"keep_history": False}
    finally:
        server.stop(signal.SIGTERM)
    assert _on_disk(db, temp) == []
    assert _on_disk(db, "kept on purpose")
    server = Server(db, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        page.click("#settings summary")
        expect(page.locator("#no-history")).to_be_checked()  # kept across the restart
        expect(page.locator("#sessions li .title")).to_have_text(["kept on purpose"])
        page.click("#new")
        expect(page.locator("#temp-note")).to_be_visible()
        page.locator("#no-history").uncheck()
        expect(page.locator("#notice")).to_have_text("New chats are kept.")
        expect(page.locator("#temporary")).to_have_attribute("aria-pressed", "false")
        expect(page.locator("#temp-note")).to_be_hidden()
        assert _api(server, "/api/me/preferences").json() == {"keep_history": True}
    finally:
        server.close()


def test_an_anonymous_visitor_sees_no_toggle_and_the_setting_is_disabled(
    tmp_path: Path, browser: Browser
) -> None:
    server = Server(tmp_path / "page.db", delay_ms=0)
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#anon")).to_be_visible()
        expect(page.locator("#temporary")).to_be_hidden()
        page.click("#settings summary")
        expect(page.locator("#no-history")).to_be_disabled()
    finally:
        server.close()
