"""LangGraph's own checkpointer conformance suite (`langgraph-checkpoint-conformance`), run
unchanged against `WriteBehindSaver` over a real store (a real SQLite file, and the real
PostgreSQL): every capability the saver declares (all eight: the five base ones and
delete_for_runs, copy_thread, prune) must be detected and pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.conformance.report import ProgressCallbacks

from writebehind import Config, SessionStore, WriteBehindStore
from writebehind.backends.postgres import PostgresBackend
from writebehind.integrations.langgraph import WriteBehindSaver

from ..pg import DSN, new_schema, postgres_schema


@pytest.mark.parametrize(
    ("user_id", "flush_interval_ms", "engine"),
    [
        ("alice", 3_600_000, "sqlite"),  # signed in, everything in memory until shutdown
        (7, 1, "sqlite"),  # signed in, the worker flushing all the time meanwhile
        (None, 3_600_000, "sqlite"),  # anonymous: memory only
        ("bob", 1, "postgres"),  # the scale-out engine, flushing all the time
    ],
)
async def test_conformance_suite_passes_in_full(
    tmp_path: Path, user_id: str | int | None, flush_interval_ms: int, engine: str
) -> None:
    async def factory() -> AsyncIterator[WriteBehindSaver]:
        # A fresh database per capability suite, as the package's own examples do.
        async with AsyncExitStack() as stack:
            config = Config(
                db_path=tmp_path / f"suite-{len(list(tmp_path.iterdir()))}.db",
                flush_interval_ms=flush_interval_ms,
            )
            if engine == "postgres":
                schema = new_schema()
                await stack.enter_async_context(postgres_schema(schema))  # dropped at the end
                store = WriteBehindStore(SessionStore(), PostgresBackend(DSN, schema=schema), config=config)
            else:
                store = WriteBehindStore.from_config(config)
            await stack.enter_async_context(store)
            yield WriteBehindSaver(store, user_id=user_id)

    registered = checkpointer_test(name=f"WriteBehindSaver[{user_id!r}]")(factory)
    failures: list[str] = []

    def record(capability: str, test: str, passed: bool, error: str | None) -> None:
        if not passed:
            failures.append(f"{capability}.{test}:\n{error}")

    report = await validate(registered, progress=ProgressCallbacks(on_test_result=record))
    assert not failures, "\n".join(failures)
    detected = {name for name, result in report.results.items() if result.detected}
    assert detected == {c.value for c in ALL_CAPABILITIES}
    assert report.conformance_level() == "FULL"
    assert all(r.tests_passed > 0 and r.tests_failed == 0 for r in report.results.values())
