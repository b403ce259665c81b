"""A person's view: headless Chromium (Debian's package, driven by Playwright's Python
client) opens the page, chats, reloads mid-reply and sees the reply resume. The
screenshot is saved under the test's tmp dir."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from writebehind.server.responder import EchoResponder

from .server import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make test installs it)"
)
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
            expect(page.locator("#sessions li")).to_have_count(1)
            page.fill("#text", "hello from the browser")
            page.press("#text", "Enter")
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
        server.stop(signal.SIGKILL)
