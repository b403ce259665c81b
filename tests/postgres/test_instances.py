"""Several app instances on one PostgreSQL database: two stores in two processes.

A session written on A is readable on B after A's flush; concurrent writes to one
session end with one winner and a detected conflict, never a silent overwrite; an
erasure on one instance cannot be undone by the other's flush.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..pg import DSN, new_schema, postgres_schema

SCRIPT = Path(__file__).with_name("instance.py")


class Instance:
    def __init__(self, schema: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), DSN, schema],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip

    def __call__(self, *command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(list(command)).decode() + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "the instance died"
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self("close")
            self.proc.wait(timeout=30)


@pytest.fixture
async def schema() -> Any:
    name = new_schema()
    async with postgres_schema(name):  # created (migrated) here, dropped afterwards
        yield name


@pytest.fixture
def instances(schema: str) -> Iterator[tuple[Instance, Instance]]:
    a, b = Instance(schema), Instance(schema)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_a_flushed_session_is_readable_on_the_other_instance(instances: tuple[Instance, Instance]) -> None:
    a, b = instances
    assert a("append", "s", 1, "from A") == {"ok": 1}
    assert b("get", "s", 1) == {"error": "NotFound", "message": "session 's' not found"}  # not flushed yet
    assert a("flush") == {"ok": None}
    assert b("get", "s", 1) == {"ok": ["from A"]}


def test_concurrent_writes_end_with_one_winner_and_a_detected_conflict(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    a("append", "s", 1, "first")
    a("flush")
    assert b("get", "s", 1) == {"ok": ["first"]}  # both now hold version 1
    a("append", "s", 1, "A's second")
    b("append", "s", 1, "B's second")
    assert a("flush") == {"ok": None}  # A wins
    assert b("flush") == {"error": "ConflictError", "sessions": ["s"]}
    assert b("conflicts") == {"ok": {"s": ["first", "B's second"]}}  # B's version, kept, not written
    assert b("get", "s", 1) == {"ok": ["first", "A's second"]}  # B reloaded the winner's
    assert a("get", "s", 1) == {"ok": ["first", "A's second"]}
    # and B can go on from the winner's state
    assert b("append", "s", 1, "B again") == {"ok": 3}
    assert b("flush") == {"ok": None}
    a_view = a("get", "s", 1)["ok"]
    assert a_view == ["first", "A's second"]  # A's memory is one flush behind: documented
    assert a("append", "s", 1, "A stale") == {"ok": 3}
    assert a("flush") == {"error": "ConflictError", "sessions": ["s"]}
    assert a("get", "s", 1) == {"ok": ["first", "A's second", "B again"]}


def test_an_erasure_on_one_instance_is_not_undone_by_the_others_flush(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    a("append", "s", 7, "secret")
    a("flush")
    a("append", "s", 7, "more, still in A's memory")
    assert b("delete_user", 7) == {"ok": 1}
    assert a("flush") == {"error": "ConflictError", "sessions": ["s"]}
    assert a("conflicts") == {"ok": {}}  # erased elsewhere: A keeps no copy either
    assert a("get", "s", 7) == {"error": "NotFound", "message": "session 's' not found"}
    assert b("get", "s", 7)["error"] == "NotFound"
