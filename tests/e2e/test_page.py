"""The page as a person uses it, in headless Chromium (Debian's, driven by Playwright's
Python client): the conversation list, Stop and Regenerate (an alternative: 2/2),
Markdown that never runs a script, multi-line input, errors shown with the typed text
kept, the settings menu, the phone layout, and a clean console.

`WB_SCREENSHOT_DIR=docs/screenshots .venv/bin/pytest tests/e2e/test_page.py -k screenshots`
refreshes the README's screenshots (by default they go to the test's tmp dir)."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from writebehind.server.responder import EchoResponder

from .server import Server, client
from .test_browser import ARGS, CHROMIUM, needs_chromium

pytestmark = needs_chromium
TIMEOUT = 30_000  # bounds a failure; nothing asserts how fast anything is


def _reply_to(text: str) -> str:
    return "".join(EchoResponder().reply_to(text))


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _serve(tmp_path: Path, delay_ms: int) -> Server:
    return Server(tmp_path / "page.db", delay_ms=delay_ms)


def _sign_in(page: Page, url: str, token: str = "tok-alice") -> None:
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")


def _say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def _last_reply_done(page: Page, expected: str | re.Pattern[str]) -> None:
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_text(expected, timeout=TIMEOUT)
    expect(reply).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=TIMEOUT)


def test_the_sidebar_titles_dates_orders_renames_and_deletes_conversations(
    tmp_path: Path, browser: Browser
) -> None:
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        page.click("#new")
        page.click("#new")
        expect(page.locator("#sessions li")).to_have_count(0)  # no pile of empty chats
        _say(page, "Plan a three-day trip to Lisbon\nwith museums")
        _last_reply_done(page, _reply_to("Plan a three-day trip to Lisbon\nwith museums"))
        items = page.locator("#sessions li")
        expect(items).to_have_count(1)
        expect(items.first.locator(".title")).to_have_text("Plan a three-day trip to Lisbon")
        expect(items.first.locator(".date")).to_have_text(re.compile(r"\d"))
        expect(page.locator("#title")).to_have_text("Plan a three-day trip to Lisbon")
        page.click("#new")
        _say(page, "A second conversation")
        expect(items).to_have_count(2)
        expect(items.locator(".title")).to_have_text(
            ["A second conversation", "Plan a three-day trip to Lisbon"]
        )
        # Rename the open one, in place.
        items.first.locator(".rename").click()
        page.fill("#sessions li input", "Renamed chat")
        page.press("#sessions li input", "Enter")
        expect(items.first.locator(".title")).to_have_text("Renamed chat")
        expect(page.locator("#title")).to_have_text("Renamed chat")
        # Delete the other one, after a confirmation.
        page.once("dialog", lambda dialog: dialog.accept())
        items.nth(1).locator(".delete").click()
        expect(items.locator(".title")).to_have_text(["Renamed chat"])
        page.reload()
        expect(page.locator("#sessions li .title")).to_have_text(["Renamed chat"])
    finally:
        server.close()


def test_stop_a_streaming_reply_then_regenerate_it(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=60)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        _say(page, "tell me everything")
        reply = page.locator(".msg.assistant")
        expect(reply).to_contain_text("token2", timeout=TIMEOUT)
        expect(page.locator(".regen")).to_have_count(0)  # not while it streams
        page.click("#stop")
        expect(reply).to_have_class(re.compile(r"\bstopped\b"), timeout=TIMEOUT)
        expect(page.locator(".turn.assistant .flag")).to_have_text("stopped")
        expect(page.locator("#stop")).to_be_hidden()
        cut = reply.inner_text()
        assert "token39" not in cut
        page.reload()  # the server kept it, marked
        expect(reply).to_have_text(cut)
        expect(reply).to_have_class(re.compile(r"\bstopped\b"))
        page.click(".regen")
        _last_reply_done(page, _reply_to("tell me everything"))
        expect(reply).not_to_have_class(re.compile(r"\bstopped\b"))
        expect(page.locator(".turn.assistant .flag")).to_have_text("")
        # The stopped reply stays, an alternative (2/2), and the previous arrow steps back to it.
        expect(page.locator(".msg")).to_have_count(2)
        expect(page.locator(".turn.assistant .alts .count")).to_have_text("2/2")
        page.click(".turn.assistant .alts .prev")
        expect(page.locator(".turn.assistant .alts .count")).to_have_text("1/2")
        expect(reply).to_have_text(cut)
        expect(page.locator(".turn.assistant .flag")).to_have_text("stopped")
    finally:
        server.close()


def test_markdown_is_rendered_and_no_script_in_a_message_ever_runs(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=0)
    hostile = '**bold** `code` <script>window.pwned=1</script> <img src=x onerror="window.pwned=2">'
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        _say(page, hostile)
        _last_reply_done(page, re.compile(r"token40$"))
        reply = page.locator(".msg.assistant")
        expect(reply.locator("strong")).to_have_text("bold")
        expect(reply.locator("code")).to_have_text("code")
        expect(reply).to_contain_text('<script>window.pwned=1</script> <img src=x onerror="window.pwned=2">')
        expect(page.locator(".msg.user")).to_have_text(hostile)  # as typed, as text
        assert page.locator("#log script, #log img, #log [onerror]").count() == 0
        page.reload()
        expect(page.locator(".msg.assistant strong")).to_have_text("bold")
        assert page.evaluate("window.pwned") is None
    finally:
        server.close()


def test_shift_enter_is_a_new_line_and_each_message_has_a_timestamp(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        page.fill("#text", "line one")
        page.press("#text", "Shift+Enter")
        page.keyboard.type("line two")
        expect(page.locator("#text")).to_have_value("line one\nline two")
        expect(page.locator(".msg")).to_have_count(0)  # Shift+Enter did not send
        page.press("#text", "Enter")
        expect(page.locator(".msg.user")).to_have_text("line one\nline two")
        assert page.locator(".msg.user").inner_text() == "line one\nline two"
        expect(page.locator("#text")).to_have_value("")
        _last_reply_done(page, _reply_to("line one\nline two"))
        expect(page.locator(".turn .meta time")).to_have_count(2)
        for time_el in page.locator(".turn .meta time").all():
            expect(time_el).to_have_text(re.compile(r"\d{1,2}:\d{2}"))
            assert time_el.get_attribute("datetime")
    finally:
        server.close()


def test_errors_are_shown_and_the_typed_text_is_kept(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        expect(page.locator("#anon")).to_be_visible()
        expect(page.locator("#anon")).to_contain_text("not kept")
        expect(page.locator("#anon")).to_contain_text("Sign in to keep it")
        # A wrong token: said, and nobody is signed in.
        page.fill("#token", "not-a-token")
        page.click("#signin")
        expect(page.locator("#notice")).to_contain_text("token was not accepted")
        expect(page.locator("#who")).to_have_text("anonymous")
        # A 4xx (a body over the server's limit): said, and the text stays in the box.
        too_long = "x" * 5000
        _say(page, too_long)
        expect(page.locator("#notice")).to_contain_text("over 4096 bytes")
        expect(page.locator("#text")).to_have_value(too_long)
        # A message that goes through clears the notice and the box.
        _say(page, "short enough")
        _last_reply_done(page, _reply_to("short enough"))
        expect(page.locator("#notice")).to_be_empty()
        # The server down: said, and the text stays in the box.
        server.stop(signal.SIGKILL)
        _say(page, "typed while the server is down")
        expect(page.locator("#notice")).to_contain_text("Cannot reach the server")
        expect(page.locator("#text")).to_have_value("typed while the server is down")
    finally:
        server.close()


def test_a_refused_first_message_leaves_no_empty_chat(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        too_long = "長" * 3000  # over the server's 4096-byte body in UTF-8
        _say(page, too_long)
        expect(page.locator("#notice")).to_contain_text("over 4096 bytes")
        expect(page.locator("#text")).to_have_value(too_long)
        alice = client(server, "alice")
        listed = alice.get("/api/sessions", params={"archived": "include"}).json()["sessions"]
        assert listed == [], listed  # the chat made for it is gone with it
        _say(page, "short 👍")
        _last_reply_done(page, _reply_to("short 👍"))
        listed = alice.get("/api/sessions").json()["sessions"]
        assert [s["message_count"] for s in listed] == [2]
    finally:
        server.close()


def test_new_chat_clicked_while_a_message_is_sent_stays_a_new_chat(tmp_path: Path, browser: Browser) -> None:
    """The message goes to the chat it was sent in; the page stays on the new, empty chat
    the user asked for, and the next message starts that one."""
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        held: list[Route] = []
        page.route("**/api/sessions/*/messages", lambda route: held.append(route))  # held by the test
        _say(page, "first chat 🚀")
        while not held:
            page.wait_for_timeout(20)
        page.click("#new")
        held[0].continue_()
        page.unroute("**/api/sessions/*/messages")
        expect(page.locator("#sessions li")).to_have_count(1, timeout=TIMEOUT)  # the first chat, listed
        page.wait_for_timeout(300)  # what a late answer would have shown
        expect(page.locator("#log .msg")).to_have_count(0)
        _say(page, "second chat 🌱")
        _last_reply_done(page, _reply_to("second chat 🌱"))
        expect(page.locator("#log .msg")).to_have_text(["second chat 🌱", _reply_to("second chat 🌱")])
        alice = client(server, "alice")
        chats = alice.get("/api/sessions").json()["sessions"]
        assert sorted(s["title"] for s in chats) == ["first chat 🚀", "second chat 🌱"]
        assert [s["message_count"] for s in chats] == [2, 2]
    finally:
        server.close()


def test_export_and_erase_from_the_settings_menu(tmp_path: Path, browser: Browser) -> None:
    server = _serve(tmp_path, delay_ms=0)
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#settings summary")
        expect(page.locator("#export")).to_be_disabled()  # anonymous: nothing is stored
        _sign_in(page, server.url)
        _say(page, "export me")
        _last_reply_done(page, _reply_to("export me"))
        page.click("#settings summary")
        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text())
        (session,) = exported["sessions"]
        assert [m["content"] for m in session["messages"]] == ["export me", _reply_to("export me")]
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#erase")
        expect(page.locator("#notice")).to_contain_text("Erased: 1 chat")
        expect(page.locator("#sessions li")).to_have_count(0)
        expect(page.locator(".msg")).to_have_count(0)
        page.reload()
        expect(page.locator("#sessions li")).to_have_count(0)
    finally:
        server.close()


def test_desktop_and_phone_layouts_with_a_clean_console_and_screenshots(
    tmp_path: Path, browser: Browser
) -> None:
    shots = Path(os.environ.get("WB_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    server = _serve(tmp_path, delay_ms=0)
    problems: list[str] = []
    try:
        for name, viewport in (
            ("desktop", {"width": 1280, "height": 800}),
            ("phone", {"width": 390, "height": 844}),
        ):
            context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
            page = context.new_page()
            page.on(
                "console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None
            )
            page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(server.url) or r.url.startswith("data:")
                    else problems.append(f"fetched {r.url}")
                ),
            )
            if name == "phone":  # the conversations and the account are behind the menu
                page.goto(server.url + "/")
                expect(page.locator("#sidebar")).not_to_be_in_viewport()
                page.click("#menu")
                expect(page.locator("#sidebar")).to_be_in_viewport()
                page.fill("#token", "tok-bob")
                page.click("#signin")
                expect(page.locator("#who")).to_have_text("signed in")
                page.click("#new")  # closes the menu
                expect(page.locator("#sidebar")).not_to_be_in_viewport()
            else:
                _sign_in(page, server.url)
            if name == "desktop":  # an earlier conversation in the list
                _say(page, "Plan a three-day trip to Lisbon")
                _last_reply_done(page, _reply_to("Plan a three-day trip to Lisbon"))
                page.click("#new")
            _say(page, "How does write-behind caching keep a chat fast?")
            _last_reply_done(page, _reply_to("How does write-behind caching keep a chat fast?"))
            _say(page, "Is anything lost if the server **crashes**? Say `flush` too")
            _last_reply_done(page, re.compile(r"^You said: .Is anything lost.*token40$"))
            expect(page.locator(".msg.assistant").last.locator("strong")).to_have_text("crashes")
            # The last reply regenerated: its versions (2/2) under it.
            page.click(".regen")
            expect(page.locator(".turn.assistant").last.locator(".alts .count")).to_have_text("2/2")
            _last_reply_done(page, re.compile(r"^You said: .Is anything lost.*token40$"))
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], (name, width)
            page.screenshot(path=str(shots / f"{name}.png"))
            context.close()
        assert problems == []
        for name in ("desktop", "phone"):
            assert (shots / f"{name}.png").stat().st_size > 5000
    finally:
        server.close()
