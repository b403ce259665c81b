"""Full-text search on a real SQLite file: isolation, memory and disk merged, non-ASCII text,
FTS syntax in queries taken as text, paging, deletion, and erasure down to the file's bytes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from writebehind import StorageError, ValidationError, WriteBehindStore
from writebehind.backends.migrations import SQLITE as MIGRATIONS
from writebehind.model import to_micros, utcnow
from writebehind.search import SearchPage

from .conftest import StoreFactory
from .test_privacy import raw_bytes


def found(page: SearchPage) -> list[tuple[str, int]]:
    return [(h.session_id, h.seq) for h in page.hits]


def marked(page: SearchPage) -> list[str]:
    return [text for h in page.hits for text, hit in h.snippet if hit]


async def chat(store: WriteBehindStore, sid: str, user: int | str, *texts: str) -> None:
    await store.ensure_session(sid, user_id=user, title=f"title of {sid}")
    for i, text in enumerate(texts):
        await store.append_message(
            sid, user_id=user, role="user" if i % 2 == 0 else "assistant", content=text
        )


async def test_finds_only_the_callers_messages_on_disk_and_in_memory(make_store: StoreFactory) -> None:
    store = await make_store()
    await chat(store, "a1", 1, "the quick brown fox", "no match here")
    await chat(store, "b1", 2, "another quick brown fox of user two")
    await chat(store, "c1", "1", "quick brown fox of the string user '1'")
    await store.flush()
    await store.aclose()
    store = await make_store()  # all three on disk only, none in memory
    await chat(store, "a2", 1, "a quick reply, only in memory")  # not flushed

    page = await store.search(1, "quick")
    assert sorted(found(page)) == [("a1", 1), ("a2", 1)]
    assert {h.title for h in page.hits} == {"title of a1", "title of a2"}
    assert set(marked(page)) == {"quick"}
    assert found(await store.search(2, "quick")) == [("b1", 1)]
    assert found(await store.search("1", "quick")) == [("c1", 1)]
    assert found(await store.search(3, "quick")).__len__() == 0
    # every word must be there
    assert found(await store.search(1, "quick fox")) == [("a1", 1)]


async def test_an_edited_message_is_found_by_its_new_text_only(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.ensure_session("s", user_id=1)
    reply = await store.append_message("s", user_id=1, role="assistant", content="")
    for token in ("streamed ", "alpha ", "omega"):
        await store.update_message("s", reply.id, user_id=1, append=token)
        await store.flush()
    await store.update_message("s", reply.id, user_id=1, content="rewritten entirely")
    await store.flush()
    await store.aclose()
    store = await make_store()
    assert found(await store.search(1, "rewritten")) == [("s", 1)]
    assert found(await store.search(1, "omega")) == []


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("東京タワーに行きました", "京タワ"),
        ("東京に行きました", "東京"),  # two CJK characters: shorter than a trigram
        ("party time 🎉🎉 tonight", "🎉🎉"),
        ("שלום עולם, מה שלומך", "עולם"),
        ("مرحبا بالعالم", "بالعالم"),
        ("cafe\u0301 au lait", "cafe\u0301"),  # combining acute accent
        ("Straße und STRASSE", "straße"),
        ("ÉCOLE normale", "école"),
        ("ok go", "go"),
    ],
)
async def test_non_ascii_is_found_on_disk_and_in_memory(
    make_store: StoreFactory, text: str, query: str
) -> None:
    store = await make_store()
    await chat(store, "disk", 1, text, "nothing relevant at all")
    await store.flush()
    await store.aclose()
    store = await make_store()
    await chat(store, "memory", 1, text)
    page = await store.search(1, query)
    assert sorted(found(page)) == [("disk", 1), ("memory", 1)]
    for hit in page.hits:
        assert "".join(segment for segment, _ in hit.snippet) == text
        assert [s.lower() for s, matched in hit.snippet if matched] == [query.lower()]


@pytest.mark.parametrize(
    "query",
    ['"', '""', "fox*", "*", "NEAR(fox brown)", "NEAR", "-fox", "fox -brown", "body:fox", "owner:x", ":",
     "(fox", "fox)", "()", "AND", "OR fox", "NOT", "^fox", "{body}:fox", "fox + brown", "'", "\\", "%",
     "_", "a%b"],
)  # fmt: skip
async def test_fts_syntax_in_a_query_is_only_text(make_store: StoreFactory, query: str) -> None:
    store = await make_store()
    await chat(store, "s", 1, "the quick brown fox", f"literal {query} here")
    await store.flush()
    await store.aclose()
    store = await make_store()
    page = await store.search(1, query)  # never raises
    # the message holding the query literally is found (every word as a substring)
    assert ("s", 2) in found(page)
    assert (("s", 1) in found(page)) == all(w.lower() in "the quick brown fox" for w in query.split())


async def test_a_deleted_session_and_a_popped_message_are_not_found(make_store: StoreFactory) -> None:
    store = await make_store()
    await chat(store, "gone", 1, "findable needle")
    await chat(store, "kept", 1, "findable needle", "popped needle")
    await store.flush()
    await store.delete_session("gone", user_id=1)
    await store.pop_message("kept", user_id=1)
    await store.flush()
    assert found(await store.search(1, "needle")) == [("kept", 1)]
    await store.aclose()
    store = await make_store()
    assert found(await store.search(1, "needle")) == [("kept", 1)]


async def test_paging_is_stable_and_complete(make_store: StoreFactory) -> None:
    store = await make_store()
    for i in range(7):
        await chat(store, f"s{i}", 1, *(f"paging word {i}-{k}" + " word" * (k % 3) for k in range(5)))
    await store.flush()
    await store.aclose()
    store = await make_store()
    await chat(store, "hot", 1, "paging in memory", "paging again")  # two in memory too
    for order in ("relevance", "newest"):
        every = found(await store.search(1, "paging", limit=100, order=order))
        assert len(every) == 37 and len(set(every)) == 37
        pages: list[tuple[str, int]] = []
        offset: int | None = 0
        while offset is not None:
            page = await store.search(1, "paging", limit=5, offset=offset, order=order)
            pages += found(page)
            offset = page.next_offset
        assert pages == every
        again = await store.search(1, "paging", limit=5, offset=10, order=order)
        assert found(again) == every[10:15]
    newest = await store.search(1, "paging", limit=100, order="newest")
    times = [h.created_at for h in newest.hits]
    assert times == sorted(times, reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   \t\n"}, "query"),
        ({"query": "x" * 257}, "query"),
        ({"query": " ".join(f"w{i}" for i in range(17))}, "query"),
        ({"query": "\ud800"}, "query"),
        ({"query": "a\x00b"}, "query"),
        ({"query": 5}, "query"),
        ({"query": "ok", "limit": 0}, "limit"),
        ({"query": "ok", "limit": 101}, "limit"),
        ({"query": "ok", "limit": True}, "limit"),
        ({"query": "ok", "offset": -1}, "offset"),
        ({"query": "ok", "offset": 10_001}, "offset"),
        ({"query": "ok", "order": "best"}, "order"),
    ],
)
async def test_bad_input_is_a_validation_error_naming_the_field(
    make_store: StoreFactory, kwargs: dict[str, object], field: str
) -> None:
    store = await make_store()
    query = kwargs.pop("query")
    with pytest.raises(ValidationError) as caught:
        await store.search(1, query, **kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    with pytest.raises(ValidationError) as caught:
        await store.search(None, "ok")  # type: ignore[arg-type]
    assert caught.value.field == "user_id"


async def test_a_backend_without_search_is_a_clear_error(make_store: StoreFactory, db_path: Path) -> None:
    from writebehind import SQLiteBackend

    class Plain(SQLiteBackend):
        search = None  # type: ignore[assignment]

    store = await make_store(backend=Plain(db_path))
    with pytest.raises(StorageError, match="Plain does not support search"):
        await store.search(1, "anything")


# Letters of U+1D51E… (Mathematical Fraktur): their UTF-8 starts F0 9D 94, bytes that no other
# text in this test makes, so any index entry or copy of the victim's words shows up in a
# raw scan of the files whatever FTS5 does to its terms (trigrams, prefix compression).
FRAKTUR = "".join(chr(0x1D51E + i) for i in range(20))
LEAD = "\U0001d51e".encode()[:3]


async def test_erasure_leaves_no_byte_of_the_user_in_the_index_or_the_wal(
    make_store: StoreFactory, db_path: Path
) -> None:
    store = await make_store()
    for i in range(10):
        await store.ensure_session(f"victim-{i}", user_id="victim")
        reply = await store.append_message(f"victim-{i}", user_id="victim", role="assistant", content="")
        for k in range(5):  # several versions of each row through the index and the WAL
            await store.update_message(
                f"victim-{i}", reply.id, user_id="victim", append=f"{FRAKTUR[k:]} {k} "
            )
            await store.flush()
    await chat(store, "bystander", "other", "keep me searchable")
    await store.flush()
    assert found(await store.search("victim", FRAKTUR[4:8])) != []
    assert LEAD in raw_bytes(db_path)  # the scan can fail: the victim's text is there now

    assert await store.delete_user("victim") == 10
    assert LEAD not in raw_bytes(db_path)
    await store.aclose()
    assert LEAD not in raw_bytes(db_path)
    with sqlite3.connect(db_path) as conn:  # no search index: nothing beside the rows to erase
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"sessions", "messages"}
    store = await make_store()
    assert found(await store.search("other", "searchable")) == [("bystander", 1)]
    assert found(await store.search("victim", FRAKTUR[4:8])) == []


async def test_rows_written_by_any_earlier_version_are_found(make_store: StoreFactory, db_path: Path) -> None:
    now = to_micros(utcnow())
    with sqlite3.connect(db_path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO sessions (id, user_id, created_at, updated_at, last_access_at, status) "
            "VALUES ('old', 7, ?1, ?1, ?1, 'active'), ('theirs', 8, ?1, ?1, ?1, 'active')",
            (now,),
        )
        conn.execute(
            "INSERT INTO messages (session_id, seq, id, role, content, created_at, updated_at) "
            "VALUES ('old', 1, 'm1', 'user', 'written before search existed', ?1, ?1), "
            "('theirs', 1, 'm1', 'user', 'also before search', ?1, ?1)",
            (now,),
        )
    store = await make_store()
    assert found(await store.search(7, "before search")) == [("old", 1)]
    assert found(await store.search(8, "before search")) == [("theirs", 1)]
