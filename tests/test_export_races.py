"""An export racing erasures and re-creations (GDPR Art. 15/20 against Art. 17): a session
erased while the export runs is not exported after its erasure, and a session id another
user takes meanwhile never brings that user's data into this user's export. Real SQLite
file; the consumer is slow on purpose and acts between two records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from writebehind.model import SessionRecord

from .conftest import StoreFactory


async def test_an_export_skips_what_is_erased_during_it_and_never_yields_another_users_session(
    make_store: StoreFactory, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="writebehind.access")
    store = await make_store()
    for sid in ("a-first", "b-kept", "c-erased", "d-taken"):
        await store.ensure_session(sid, user_id=1)
        await store.append_message(sid, user_id=1, role="user", content=f"user 1 in {sid}")
    await store.flush()  # on disk, and still in memory
    for sid in ("z-memory-only", "z-taken"):
        await store.ensure_session(sid, user_id=1)  # only in memory when the export starts
        await store.append_message(sid, user_id=1, role="user", content=f"user 1 in {sid}")

    exported: list[SessionRecord] = []
    async for record in store.export_user(1):
        exported.append(record)
        if len(exported) == 1:
            # The consumer is slow; meanwhile user 1 erases some sessions, and user 2 takes
            # two of the freed ids for sessions of their own.
            for sid in ("c-erased", "d-taken", "z-memory-only", "z-taken"):
                await store.delete_session(sid, user_id=1)
            for sid in ("d-taken", "z-taken"):
                await store.ensure_session(sid, user_id=2)
                await store.append_message(sid, user_id=2, role="user", content="USER-2-PRIVATE")

    assert [r.id for r in exported] == ["a-first", "b-kept"]
    assert all(r.user_id == 1 for r in exported)
    assert not any("USER-2-PRIVATE" in m.content for r in exported for m in r.messages)
    access = [r.getMessage() for r in caplog.records if r.name == "writebehind.access"]
    assert "exported user=1 sessions=2" in access
    # User 2's sessions are theirs, whole.
    for sid in ("d-taken", "z-taken"):
        record = await store.get_session(sid, user_id=2)
        assert [m.content for m in record.messages] == ["USER-2-PRIVATE"]
