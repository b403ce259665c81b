"""Archive and search, through the API and on the page (headless Chromium).

Archiving is the session status `archived` (`PATCH {"status": "archived"}`; `"active"`
brings it back): listings leave archived sessions out unless asked (`archived=only` or
`include`). The search box asks `GET /api/sessions?q=`: every word of `q` in the title,
in any case, in any script, composed or not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from .server import Server, client, events
from .test_browser import ARGS, CHROMIUM, needs_chromium

TIMEOUT = 30_000  # bounds a failure; nothing asserts how fast anything is

TITLES = [
    "Trip to Lisbon",
    "Straße bauen",
    "東京の天気",
    "שלום עולם",
    "Café crème",  # é precomposed
    "cafe\u0301 noir",  # e + a combining acute
    "ﬁnance report",  # the ﬁ ligature
    "🎉 Party plans",
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "chat.db", delay_ms=0)
    yield s
    s.close()


def _titles(c: httpx.Client, **params: str | int) -> list[str]:
    answer = c.get("/api/sessions", params=params)
    assert answer.status_code == 200, answer.text
    return [s["title"] for s in answer.json()["sessions"]]


def _make(c: httpx.Client, titles: list[str]) -> dict[str, str]:
    ids = {}
    for title in titles:
        created = c.post("/api/sessions", json={"title": title})
        assert created.status_code == 201
        ids[title] = created.json()["id"]
        # A message, so that the page lists it (it hides chats that have none), and its
        # reply's end, so that the list's order (the last change first) is this one.
        assert c.post(f"/api/sessions/{ids[title]}/messages", json={"content": "hi"}).status_code == 202
        assert any(e["seq"] == 2 and e["done"] for e in events(c, ids[title]))
    return ids


def test_an_archived_session_leaves_the_list_until_asked_for_or_unarchived(server: Server) -> None:
    alice, bob = client(server, "alice"), client(server, "bob")
    ids = _make(alice, ["first", "second", "third"])
    archived = alice.patch(f"/api/sessions/{ids['second']}", json={"status": "archived"})
    assert archived.status_code == 200 and archived.json()["status"] == "archived"
    assert _titles(alice) == ["third", "first"]
    assert _titles(alice, archived="only") == ["second"]
    assert set(_titles(alice, archived="include")) == {"first", "second", "third"}
    # Still the user's, whole: read it, write to it.
    assert alice.get(f"/api/sessions/{ids['second']}").json()["status"] == "archived"
    assert alice.post(f"/api/sessions/{ids['second']}/messages", json={"content": "more"}).status_code == 202
    # Another user can neither archive it nor see it.
    assert bob.patch(f"/api/sessions/{ids['first']}", json={"status": "archived"}).status_code == 404
    assert _titles(bob, archived="include") == []
    # Unarchived: listed again.
    assert (
        alice.patch(f"/api/sessions/{ids['second']}", json={"status": "active"}).json()["status"] == "active"
    )
    assert _titles(alice, archived="only") == []
    assert set(_titles(alice)) == {"first", "second", "third"}
    listing = alice.get("/api/sessions", params={"archived": "only", "q": "x"}).json()
    assert (listing["archived"], listing["q"]) == ("only", "x")
    bad = alice.get("/api/sessions", params={"archived": "yes"})
    assert bad.status_code == 422 and "archived" in bad.json()["error"]["message"]


def test_an_anonymous_visitor_archives_and_searches_their_own_chats(server: Server) -> None:
    anon = client(server)
    created = anon.post("/api/sessions", json={"title": "Guest chat ✈"})
    anon.cookies.set("wb_anon", created.cookies["wb_anon"])
    sid = created.json()["id"]
    anon.post("/api/sessions", json={"title": "Другой чат"})
    assert _titles(anon, q="ДРУГОЙ") == ["Другой чат"]
    assert anon.patch(f"/api/sessions/{sid}", json={"status": "archived"}).status_code == 200
    assert _titles(anon) == ["Другой чат"]
    assert _titles(anon, archived="only", q="guest") == ["Guest chat ✈"]
    assert _titles(client(server), archived="include") == []  # another visitor


def test_search_matches_every_word_in_any_case_script_and_composition(server: Server) -> None:
    alice = client(server, "alice")
    _make(alice, TITLES)
    expected = {
        "lisbon TRIP": ["Trip to Lisbon"],
        "STRASSE": ["Straße bauen"],  # ß folds to ss
        "東京": ["東京の天気"],
        "עולם": ["שלום עולם"],
        "café": ["cafe\u0301 noir", "Café crème"],  # precomposed finds decomposed too
        "CAFE\u0301": ["cafe\u0301 noir", "Café crème"],
        "finance": ["ﬁnance report"],  # the ligature is two letters
        "🎉": ["🎉 Party plans"],
        "party 🎉": ["🎉 Party plans"],
        "lisbon tokyo": [],  # every word must be in the title
        "zzz": [],
    }
    for q, titles in expected.items():
        assert _titles(alice, q=q) == titles, q
    assert len(_titles(alice, q="")) == len(TITLES)
    assert len(_titles(alice, q="   ")) == len(TITLES)
    # Paging pages the matches.
    assert _titles(alice, q="café", limit=1, offset=1) == ["Café crème"]
    assert alice.get("/api/sessions", params={"q": "x" * 201}).status_code == 422
    # Search and the archive together.
    sid = next(s["id"] for s in alice.get("/api/sessions", params={"q": "lisbon"}).json()["sessions"])
    alice.patch(f"/api/sessions/{sid}", json={"status": "archived"})
    assert _titles(alice, q="lisbon") == []
    assert _titles(alice, q="lisbon", archived="only") == ["Trip to Lisbon"]


def test_the_openapi_document_declares_the_search_and_the_archive_filter(server: Server) -> None:
    doc = httpx.get(server.url + "/api/openapi.json").json()
    params = {p["name"]: p for p in doc["paths"]["/api/sessions"]["get"]["parameters"]}
    assert params["q"]["in"] == "query" and not params["q"].get("required", False)
    assert params["q"]["schema"]["anyOf"][0]["maxLength"] == 200
    assert params["archived"]["schema"]["enum"] == ["exclude", "only", "include"]
    assert params["archived"]["schema"]["default"] == "exclude"
    listing = doc["components"]["schemas"]["SessionList"]["properties"]
    assert {"q", "archived"} <= set(listing)
    assert "error" in doc["components"]["schemas"]["MessageOut"]["properties"]


# -- the page -----------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _sign_in(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.fill("#token", "tok-alice")
    page.click("#signin")
    expect(page.locator("#who")).to_have_text("signed in")


def _listed(page: Page) -> list[str]:
    return [t.strip() for t in page.locator("#sessions li .title").all_inner_texts()]


@needs_chromium
def test_archive_from_the_list_find_it_under_archived_and_unarchive_it(
    server: Server, browser: Browser
) -> None:
    _make(client(server, "alice"), ["Plan the garden", "Learn Japanese 日本語", "Fix the bike"])
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    _sign_in(page, server.url)
    items = page.locator("#sessions li")
    expect(items.locator(".title")).to_have_text(["Fix the bike", "Learn Japanese 日本語", "Plan the garden"])
    expect(page.locator("#archived-view")).to_have_attribute("aria-pressed", "false")
    # Archive one from the list: it leaves the list.
    items.filter(has_text="日本語").locator(".archive").click()
    expect(items.locator(".title")).to_have_text(["Fix the bike", "Plan the garden"])
    # The Archived view lists it, with Unarchive instead of Archive.
    page.click("#archived-view")
    expect(page.locator("#archived-view")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#list-label")).to_be_visible()
    expect(items.locator(".title")).to_have_text(["Learn Japanese 日本語"])
    expect(items.locator(".archive")).to_have_count(0)
    # Opened, it says it is archived; Unarchive there brings it back.
    items.first.locator(".label").click()
    expect(page.locator("#title")).to_have_text("Learn Japanese 日本語")
    expect(page.locator("#archived-note")).to_be_visible()
    page.click("#unarchive-open")
    expect(page.locator("#archived-note")).to_be_hidden()
    expect(page.locator("#sessions-empty")).to_have_text("No archived chats.")
    page.click("#archived-view")
    expect(items.locator(".title")).to_have_text(["Learn Japanese 日本語", "Fix the bike", "Plan the garden"])
    # Archiving the open chat closes it: archived means out of sight.
    items.first.locator(".archive").click()
    expect(page.locator("#title")).to_have_text("New chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(items.locator(".title")).to_have_text(["Fix the bike", "Plan the garden"])
    page.reload()  # the server keeps it
    expect(page.locator("#sessions li .title")).to_have_text(["Fix the bike", "Plan the garden"])
    page.click("#archived-view")
    expect(page.locator("#sessions li .title")).to_have_text(["Learn Japanese 日本語"])
    assert problems == []


@needs_chromium
def test_the_search_box_filters_the_list_by_title_in_any_script(server: Server, browser: Browser) -> None:
    _make(client(server, "alice"), TITLES)
    page = browser.new_page()
    _sign_in(page, server.url)
    titles = page.locator("#sessions li .title")
    expect(titles).to_have_count(len(TITLES))
    cases = {
        "東京": ["東京の天気"],
        "CAFÉ": ["cafe\u0301 noir", "Café crème"],
        "עולם": ["שלום עולם"],
        "straße": ["Straße bauen"],
        "🎉": ["🎉 Party plans"],
    }
    for q, expected in cases.items():
        page.fill("#search", q)
        expect(titles).to_have_text(expected)
    page.fill("#search", "zzz")
    expect(titles).to_have_count(0)
    expect(page.locator("#sessions-empty")).to_have_text("No chat titled with “zzz”.")
    page.press("#search", "Escape")
    expect(page.locator("#search")).to_have_value("")
    expect(titles).to_have_count(len(TITLES))
    expect(page.locator("#sessions-empty")).to_be_hidden()
    # In the Archived view, the search searches the archived chats.
    page.locator("#sessions li").filter(has_text="Lisbon").locator(".archive").click()
    expect(titles).to_have_count(len(TITLES) - 1)
    page.fill("#search", "lisbon")
    expect(titles).to_have_count(0)
    page.click("#archived-view")
    expect(titles).to_have_text(["Trip to Lisbon"])
    # Typing fast: only the last search's answer is shown.
    page.click("#archived-view")
    page.fill("#search", "")
    page.locator("#search").press_sequentially("café", delay=0)
    expect(titles).to_have_text(["cafe\u0301 noir", "Café crème"])
