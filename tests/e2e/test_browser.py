"""A person's view: headless Chromium (Debian's package, driven by Playwright's Python
client) opens the page, chats, reloads mid-reply and sees the reply resume. The
screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import re
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from writebehind.server.responder import EchoResponder

from .server import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)"
)


@needs_chromium
def test_chat_in_a_browser_survives_a_reload_mid_reply(tmp_path: Path) -> None:
    server = Server(tmp_path / "browser.db", delay_ms=60)
    expected = "".join(EchoResponder().reply_to("hello from the browser"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#token", "tok-alice")
            page.click("#signin")
            expect(page.locator("#who")).to_have_text("signed in")
            page.click("#new")
            page.fill("#text", "hello from the browser")
            page.press("#text", "Enter")
            expect(page.locator("#sessions li")).to_have_count(1)
            reply = page.locator(".msg.assistant")
            expect(reply).to_contain_text("token3", timeout=15_000)
            assert "token30" not in reply.inner_text()  # still streaming when we reload
            page.reload()
            reply = page.locator(".msg.assistant")
            expect(reply).to_have_text(expected, timeout=30_000)
            expect(reply).not_to_have_class("msg assistant streaming")
            expect(page.locator(".msg.user")).to_have_text("hello from the browser")
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            browser.close()
        assert (tmp_path / "chat.png").stat().st_size > 1000
    finally:
        server.close()


def _signed_in_chat(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", "tok-alice")
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")
    page.click("#new")  # nothing is created before the first message
    expect(page.locator("#sessions li")).to_have_count(0)


@needs_chromium
def test_a_reply_with_emoji_cjk_and_combining_marks_resumes_through_a_reload(tmp_path: Path) -> None:
    said = "emoji 😀🎉👍🏽 漢字かな 한국어 e\u0301 a\u0308 🇫🇷"
    expected = "".join(EchoResponder().reply_to(said))
    server = Server(tmp_path / "browser.db", delay_ms=60)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page()
            _signed_in_chat(page, server.url)
            page.fill("#text", said)
            page.press("#text", "Enter")
            reply = page.locator(".msg.assistant")
            expect(reply).to_contain_text("token3", timeout=15_000)  # the astral characters are in
            assert "token30" not in reply.inner_text()  # still streaming when we reload
            page.reload()
            reply = page.locator(".msg.assistant")
            expect(reply).to_have_text(expected, timeout=30_000)
            expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
            expect(page.locator(".msg.user")).to_have_text(said)
            browser.close()
    finally:
        server.close()


@needs_chromium
def test_a_page_open_across_a_crash_shows_the_cut_reply_as_interrupted(tmp_path: Path) -> None:
    db_path = tmp_path / "browser.db"
    env = {"CHAT_SESSION_FLUSH_INTERVAL_MS": "100"}
    server = Server(db_path, delay_ms=150, extra_env=env)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page()
            _signed_in_chat(page, server.url)
            page.fill("#text", "a reply the crash will cut")
            page.press("#text", "Enter")
            reply = page.locator(".msg.assistant")
            expect(reply).to_contain_text("token4", timeout=15_000)
            with sqlite3.connect(db_path) as conn:
                deadline = time.monotonic() + 30
                while not conn.execute("SELECT content FROM messages WHERE seq = 2").fetchone()[0]:
                    assert time.monotonic() < deadline, "nothing of the reply reached the disk"
                    time.sleep(0.05)
            server.stop(signal.SIGKILL)
            with sqlite3.connect(db_path) as conn:
                (survived,) = conn.execute("SELECT content FROM messages WHERE seq = 2").fetchone()
            assert "token39" not in survived
            server = Server(db_path, port=server.port)  # the page reconnects by itself
            expect(reply).to_have_class(re.compile(r"\binterrupted\b"), timeout=30_000)
            expect(reply).to_have_text(survived)
            expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"))
            page.reload()
            reply = page.locator(".msg.assistant")
            expect(reply).to_have_text(survived)
            expect(reply).to_have_class(re.compile(r"\binterrupted\b"))
            browser.close()
    finally:
        server.close()
