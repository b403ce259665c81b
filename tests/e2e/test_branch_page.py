"""Alternatives on the page, in headless Chromium (Debian's, driven by Playwright): edit a
sent message in place, its versions (2/2) under it, step back and forth with the keyboard, a reload
shows the same path; a second tab on the same chat follows a switch and an edit made in the
first and never shows a mixed path; the console stays clean."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from writebehind.server.responder import EchoResponder

from .server import Server
from .test_browser import ARGS, CHROMIUM, needs_chromium

pytestmark = needs_chromium
TIMEOUT = 30_000  # bounds a failure; nothing asserts how fast anything is
FIRST = "What is 漢字? 👋🏽"
SECOND = "And e\u0301\u0301 combining?"


def _reply_to(text: str) -> str:
    return "".join(EchoResponder().reply_to(text))


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "page.db", delay_ms=0)
    yield s
    s.close()


def _watch(page: Page, problems: list[str]) -> None:
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))


def _sign_in(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", "tok-alice")
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")


def _say(page: Page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator(".msg.assistant").last).to_have_text(_reply_to(text), timeout=TIMEOUT)
    expect(page.locator(".msg.streaming")).to_have_count(0, timeout=TIMEOUT)


def _path(page: Page) -> list[str]:
    return page.locator("#log .msg").all_inner_texts()


def test_edit_a_message_step_between_versions_and_reload(server: Server, browser: Browser) -> None:
    problems: list[str] = []
    page = browser.new_page()
    _watch(page, problems)
    _sign_in(page, server.url)
    _say(page, FIRST)
    _say(page, SECOND)
    assert _path(page) == [FIRST, _reply_to(FIRST), SECOND, _reply_to(SECOND)]
    expect(page.locator(".alts")).to_have_count(0)  # nothing has alternatives yet

    # Edit the second question, with the keyboard only: Edit, a new line, Enter saves.
    second = page.locator(".turn.user").nth(1)
    second.locator(".edit-button").focus()
    page.keyboard.press("Enter")
    editor = second.locator(".edit textarea")
    expect(editor).to_be_focused()
    expect(editor).to_have_value(SECOND)
    page.keyboard.press("Control+A")
    page.keyboard.type("Edited: 你好")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("two lines 🌏")
    expect(editor).to_have_value("Edited: 你好\ntwo lines 🌏")
    page.keyboard.press("Enter")
    edited = "Edited: 你好\ntwo lines 🌏"
    expect(page.locator(".msg.assistant").last).to_have_text(_reply_to(edited), timeout=TIMEOUT)
    expect(page.locator(".msg.streaming")).to_have_count(0, timeout=TIMEOUT)
    assert _path(page) == [FIRST, _reply_to(FIRST), edited, _reply_to(edited)]
    versions = page.locator(".turn.user").nth(1).locator(".alts")
    expect(versions.locator(".count")).to_have_text("2/2")
    expect(versions.locator(".next")).to_be_disabled()

    # Cancel leaves everything as it was (Escape too).
    page.locator(".turn.user").first.locator(".edit-button").click()
    page.locator(".turn.user").first.locator(".edit .cancel").click()
    page.locator(".turn.user").first.locator(".edit-button").click()
    page.keyboard.press("Escape")
    expect(page.locator(".edit")).to_have_count(0)
    assert _path(page) == [FIRST, _reply_to(FIRST), edited, _reply_to(edited)]

    # Step back to the original question, with its own reply; the arrow keeps the focus.
    versions.locator(".prev").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".turn.user").nth(1).locator(".alts .count")).to_have_text("1/2")
    assert _path(page) == [FIRST, _reply_to(FIRST), SECOND, _reply_to(SECOND)]
    expect(page.locator(".turn.user").nth(1).locator(".alts .next")).to_be_focused()
    page.reload()
    expect(page.locator(".turn.user").nth(1).locator(".alts .count")).to_have_text("1/2")
    assert _path(page) == [FIRST, _reply_to(FIRST), SECOND, _reply_to(SECOND)]

    # Regenerate the last reply: 2/2 under it; back to the first reply and forth again.
    page.click(".regen")
    reply = page.locator(".turn.assistant").last
    expect(reply.locator(".alts .count")).to_have_text("2/2", timeout=TIMEOUT)
    expect(page.locator(".msg.streaming")).to_have_count(0, timeout=TIMEOUT)
    reply.locator(".alts .prev").click()
    expect(reply.locator(".alts .count")).to_have_text("1/2")
    reply.locator(".alts .next").click()
    expect(reply.locator(".alts .count")).to_have_text("2/2")
    page.reload()
    expect(page.locator(".turn.assistant").last.locator(".alts .count")).to_have_text("2/2")
    expect(page.locator(".turn.user").nth(1).locator(".alts .count")).to_have_text("1/2")
    assert _path(page) == [FIRST, _reply_to(FIRST), SECOND, _reply_to(SECOND)]
    expect(page.locator("#notice")).to_be_empty()
    assert problems == []


def test_a_second_tab_follows_the_path_and_never_mixes_two(server: Server, browser: Browser) -> None:
    problems: list[str] = []
    context = browser.new_context()
    one, two = context.new_page(), context.new_page()
    two.set_viewport_size({"width": 390, "height": 844})  # a phone, too
    for page in (one, two):
        _watch(page, problems)
    _sign_in(one, server.url)
    _say(one, FIRST)
    _say(one, SECOND)
    two.goto(server.url + "/")  # the same chat, opened from what the first tab left
    expect(two.locator("#log .msg")).to_have_count(4, timeout=TIMEOUT)
    # Log what the second tab ever shows: a path is a prefix of one of the session's paths.
    two.evaluate(
        """() => { window.seen = []; new MutationObserver(() => window.seen.push(
            [...document.querySelectorAll('#log .turn')].map((t) => t.dataset.seq).join(',')))
            .observe(document.getElementById('log'), { childList: true }); }"""
    )

    one.locator(".turn.user").nth(1).locator(".edit-button").click()
    one.fill(".turn.user >> nth=1 >> .edit textarea", "edited in tab one")
    one.click(".edit .save")
    expect(two.locator("#log .msg")).to_have_text(
        [FIRST, _reply_to(FIRST), "edited in tab one", _reply_to("edited in tab one")], timeout=TIMEOUT
    )
    expect(two.locator(".turn.user").nth(1).locator(".alts .count")).to_have_text("2/2")
    one.locator(".turn.user").nth(1).locator(".alts .prev").click()
    expect(two.locator("#log .msg")).to_have_text(
        [FIRST, _reply_to(FIRST), SECOND, _reply_to(SECOND)], timeout=TIMEOUT
    )
    expect(two.locator(".turn.user").nth(1).locator(".alts .count")).to_have_text("1/2")
    paths = {"1,2,3,4", "1,2,5,6"}
    for shown in two.evaluate("window.seen"):
        assert shown == "" or any(p == shown or p.startswith(shown + ",") for p in paths), shown
    width = two.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    for page in (one, two):
        expect(page.locator("#notice")).to_be_empty()
    assert problems == []
    context.close()


def test_an_edit_is_refused_while_a_reply_is_written_and_said(tmp_path: Path, browser: Browser) -> None:
    server = Server(tmp_path / "slow.db", delay_ms=60)
    try:
        page = browser.new_page()
        _sign_in(page, server.url)
        page.fill("#text", FIRST)
        page.press("#text", "Enter")
        expect(page.locator(".msg.assistant")).to_contain_text("token2", timeout=TIMEOUT)
        # While it streams, Edit is disabled (the server would say 409).
        expect(page.locator(".turn.user .edit-button")).to_be_disabled()
        page.click("#stop")
        expect(page.locator(".turn.user .edit-button")).to_be_enabled(timeout=TIMEOUT)
        page.click(".turn.user .edit-button")
        page.fill(".edit textarea", "")
        page.click(".edit .save")  # nothing to send: the editor stays
        expect(page.locator(".edit textarea")).to_be_visible()
        expect(page.locator(".msg.user")).to_have_count(1)
        assert re.search(r"token2", page.locator(".msg.assistant").inner_text())
    finally:
        server.close()


def test_an_edit_being_typed_survives_a_change_made_in_another_tab(server: Server, browser: Browser) -> None:
    """Tab one has an editor open, half typed, when tab two regenerates the last reply: tab
    one takes the new path (a re-render of its log), and the editor is still open on the
    same question with what was typed; Save then sends it as the edit."""
    problems: list[str] = []
    context = browser.new_context()
    one, two = context.new_page(), context.new_page()
    for page in (one, two):
        _watch(page, problems)
    _sign_in(one, server.url)
    _say(one, FIRST)
    _say(one, SECOND)
    two.goto(server.url + "/")
    expect(two.locator("#log .msg")).to_have_count(4, timeout=TIMEOUT)

    first = one.locator(".turn.user").first
    first.locator(".edit-button").click()
    editor = first.locator(".edit textarea")
    editor.fill("half-typed ✍️ 中文 עברית")
    two.locator(".regen").click()  # a new reply beside the last: one's path changes under it
    expect(one.locator(".turn.assistant").last.locator(".alts .count")).to_have_text("2/2", timeout=TIMEOUT)
    expect(one.locator(".msg.streaming")).to_have_count(0, timeout=TIMEOUT)
    editor = one.locator(".turn.user").first.locator(".edit textarea")
    expect(editor).to_have_value("half-typed ✍️ 中文 עברית")
    expect(editor).to_be_focused()
    one.locator(".turn.user").first.locator(".edit .save").click()
    edited = "half-typed ✍️ 中文 עברית"
    expect(one.locator("#log .msg")).to_have_text([edited, _reply_to(edited)], timeout=TIMEOUT)
    assert problems == []
    context.close()
