"""Bad-input fuzzing: arbitrary ids, user ids, roles, content and metadata against every
public method. Each call either succeeds or raises a subclass of WriteBehindError whose
message names the field; after an error, memory and disk are unchanged."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writebehind import UNSET, Config, NotFound, ValidationError, WriteBehindError, WriteBehindStore

SOAK = bool(os.environ.get("WRITEBEHIND_SOAK"))
EXAMPLES = int(os.environ.get("WRITEBEHIND_FUZZ_EXAMPLES", 10_000 if SOAK else 300))

IDS = st.one_of(
    st.sampled_from(["fz", "fz-2", "x" * 129, "", " ", "a/b", "é", "\ud800", "seed\x00"]),
    st.text(max_size=140),
    st.integers(),
    st.none(),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
)
USERS = st.one_of(
    st.sampled_from([1, 2, "1", None, True, 2**63, -(2**63) - 1, "", "\ud800", "x" * 300]),
    st.integers(),
    st.text(max_size=20),
    st.floats(),
)
ROLES = st.one_of(
    st.sampled_from(["user", "assistant", "system", "tool", "robot", "", None]), st.text(max_size=8)
)
CONTENT = st.one_of(
    st.text(max_size=50),
    st.sampled_from(["\ud83d", "a\udc00b", "\x00", "x" * 5000, "é" * 2600]),
    st.binary(max_size=4),
    st.integers(),
    st.none(),
)


class Opaque:
    pass


DEEP: dict[str, Any] = {}
_level = DEEP
for _ in range(300):  # deeper than orjson will encode
    _level["d"] = {}
    _level = _level["d"]


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.text(max_size=5), children, max_size=3),
        st.tuples(children),
    ),
    max_leaves=12,
)
METADATA = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(st.text(max_size=5), st.integers()), st.one_of(JSON, st.builds(Opaque)), max_size=4
    ),
    st.lists(JSON, max_size=2),
    st.just(DEEP),
)
INTS = st.one_of(st.integers(-5, 10**6), st.none(), st.text(max_size=2), st.booleans())


def calls() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    def method(name: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
        return st.fixed_dictionaries(fields).map(lambda kwargs: (name, kwargs))

    return st.one_of(
        method("ensure_session", session_id=IDS, user_id=USERS, title=CONTENT, status=ROLES),
        method("get_session", session_id=IDS, user_id=USERS),
        method("get_messages", session_id=IDS, user_id=USERS, after_seq=INTS, limit=INTS),
        method(
            "append_message", session_id=IDS, user_id=USERS, role=ROLES, content=CONTENT,
            message_id=IDS, metadata=METADATA,
        ),
        method(
            "update_message", session_id=IDS, message_id=IDS, user_id=USERS,
            content=CONTENT, append=CONTENT, metadata=st.one_of(st.just(UNSET), METADATA),
        ),
        method("update_session", session_id=IDS, user_id=USERS, status=ROLES, title=CONTENT),
        method("list_sessions", user_id=USERS, limit=INTS, offset=INTS),
        method("delete_session", session_id=IDS, user_id=USERS),
        method("delete_user", user_id=USERS),
        method("claim", session_id=IDS, user_id=USERS),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[asyncio.AbstractEventLoop, Any, Path]]:
    db_path = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    loop = asyncio.new_event_loop()
    store = WriteBehindStore.from_config(
        Config(db_path=db_path, max_message_bytes=4096, flush_interval_ms=3_600_000)
    )
    loop.run_until_complete(store.start())
    loop.run_until_complete(store.ensure_session("seed", user_id=1, title="seed"))
    loop.run_until_complete(store.append_message("seed", user_id=1, role="user", content="seed content"))
    loop.run_until_complete(store.flush())
    counter = {"calls": 0, "errors": 0}
    yield loop, (store, counter), db_path
    loop.run_until_complete(store.aclose())
    loop.close()
    print(f"\nfuzzed {counter['calls']} calls, {counter['errors']} refused with a typed error")


def disk(db_path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT session_id, seq, content FROM messages ORDER BY 1, 2").fetchall()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(call=calls())
def test_every_call_succeeds_or_raises_a_typed_error_and_changes_nothing(
    fuzz_env: tuple[asyncio.AbstractEventLoop, Any, Path], call: tuple[str, dict[str, Any]]
) -> None:
    loop, (store, counter), db_path = fuzz_env
    name, kwargs = call
    if kwargs.get("session_id") == "seed" or kwargs.get("user_id") == 1:
        kwargs["user_id"] = 2  # leave the seed session's owner alone so it can be compared
    seed = store.hot.tier.peek("seed").snapshot()
    dirty = store.stats().dirty_sessions
    counter["calls"] += 1
    try:
        loop.run_until_complete(getattr(store, name)(**kwargs))
    except WriteBehindError as exc:
        counter["errors"] += 1
        if isinstance(exc, ValidationError):
            assert exc.field in kwargs or exc.field in {"maxsize"}, (exc.field, name)
            assert str(exc).startswith(f"{exc.field}: ")
        else:
            assert isinstance(exc, NotFound), repr(exc)
        assert store.hot.tier.peek("seed").snapshot() == seed
        assert store.stats().dirty_sessions == dirty
    loop.run_until_complete(store.flush())
    assert ("seed", 1, "seed content") in disk(db_path)
