"""Several app instances on one PostgreSQL database: stores in separate processes.

One owner per session: a write acknowledged on one instance is visible on the other right
after (the owner hands the session over); a reply being produced under `hold()` keeps
its session where it is, readers elsewhere see every acknowledged token and writers
elsewhere wait for its end; a SIGKILLed instance's sessions are taken at once by the
others; ownership costs one advisory lock per instance, however many sessions. When
ownership is lost all the same (a partition), the version fence merges, never drops.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ..pg import DSN, new_schema, postgres_schema

SCRIPT = Path(__file__).with_name("instance.py")


class Instance:
    def __init__(self, schema: str, handoff_timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), DSN, schema, str(handoff_timeout_s)],
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

    def ok(self, *command: Any) -> Any:
        reply = self(*command)
        assert "ok" in reply, reply
        return reply["ok"]

    def until(self, expected: Any, *command: Any) -> None:
        """Ask again until the answer is `expected` (a state another process reaches)."""
        for _ in range(500):
            if self.ok(*command) == expected:
                return
            time.sleep(0.01)
        raise AssertionError(f"{command} never answered {expected!r}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self("close")
            self.proc.wait(timeout=30)


def sql(query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(DSN)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


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


def test_a_write_acknowledged_on_one_instance_is_read_on_the_other_right_after(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    assert a("append", "s", 1, "from A") == {"ok": 1}  # new, acknowledged from memory, no row yet
    assert b("get", "s", 1) == {"ok": ["from A"]}  # A flushed it and let go; B loaded it
    assert a.ok("owns", "s") is False and b.ok("owns", "s") is True
    assert b("append", "s", 1, "from B") == {"ok": 2}
    assert a("get", "s", 1) == {"ok": ["from A", "from B"]}  # and back, the same way
    assert a.ok("ownership")["handoffs"] == 1 and a.ok("ownership")["given"] == 1
    assert b.ok("ownership")["handoffs"] == 1 and b.ok("ownership")["given"] == 1
    assert a("get", "nobody", 1)["error"] == "NotFound"


def test_writes_through_both_instances_in_turn_make_one_gap_free_sequence(
    schema: str, instances: tuple[Instance, Instance]
) -> None:
    a, b = instances
    for i in range(20):
        assert (a if i % 2 == 0 else b)("append", "s", 1, f"m{i}") == {"ok": i + 1}
    a.close()
    b.close()
    rows = sql(f"SELECT seq, content FROM {schema}.messages WHERE session_id = 's' ORDER BY seq")
    assert [(r["seq"], r["content"]) for r in rows] == [(i + 1, f"m{i}") for i in range(20)]
    # a graceful close releases everything it owned
    assert sql(f"SELECT count(*) AS n FROM {schema}.owners")[0]["n"] == 0
    assert sql(f"SELECT count(*) AS n FROM {schema}.instances")[0]["n"] == 0


def test_a_reply_under_hold_stays_with_its_instance_readers_see_it_writers_wait(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    a.ok("append", "s", 1, "question")
    reply = a.ok("hold", "s", 1)  # A produces a reply into s
    a.ok("token", "s", 1, reply, "Hel")
    a.ok("token", "s", 1, reply, "lo")
    # B reads it while A streams: every acknowledged token, and A keeps the session.
    assert b("get", "s", 1) == {"ok": ["question", "Hello"]}
    assert a.ok("owns", "s") is True and b.ok("owns", "s") is False
    # B's write needs the session: it waits for the reply's end.
    assert b.ok("append_bg", "s", 1, "B's follow-up") == "started"
    a.until(1, "pending", "s")  # B's handoff request is waiting on A's hold
    assert b.ok("bg_done") is False
    a.ok("token", "s", 1, reply, ", world")  # A still owns it: its tokens go on
    assert b("get", "s", 1) == {"ok": ["question", "Hello, world"]}  # the read does not wait
    assert b.ok("bg_done") is False
    a.ok("end_hold", "s")
    assert b("bg") == {"ok": 3}  # then it lands, after the whole reply
    assert b.ok("owns", "s") is True and a.ok("owns", "s") is False
    assert b("get", "s", 1) == {"ok": ["question", "Hello, world", "B's follow-up"]}
    assert b.ok("ownership")["reads_elsewhere"] == 2


def test_a_killed_instances_sessions_are_taken_at_once_and_nothing_of_the_others_is_lost(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    a.ok("append", "s1", 1, "kept")
    a.ok("append", "s2", 1, "kept too")
    a.ok("flush")
    a.ok("append", "s1", 1, "acknowledged, not flushed: lost with A, as in any crash")
    b.ok("append", "b1", 2, "B's own, not flushed")
    a.kill()
    assert b("get", "s1", 1) == {"ok": ["kept"]}
    assert b("get", "s2", 1) == {"ok": ["kept too"]}
    stats = b.ok("ownership")
    assert stats["takeovers"] == 2 and stats["timeouts"] == 0
    assert b("append", "s1", 1, "B goes on") == {"ok": 2}
    assert b("get", "b1", 2) == {"ok": ["B's own, not flushed"]}
    b.ok("flush")
    assert b("disk", "s1") == {"ok": ["kept", "B goes on"]}
    assert b("disk", "b1") == {"ok": ["B's own, not flushed"]}


def test_ten_thousand_owned_sessions_cost_one_advisory_lock_per_instance(
    schema: str, instances: tuple[Instance, Instance]
) -> None:
    # One advisory lock per session would need 10,000 lock-table slots: more than this
    # server's max_locks_per_transaction x max_connections (64 x 100) holds at all.
    a, b = instances
    ids = a.ok("fill", 10_000, 5)
    assert len(set(ids)) == 10_000
    me = a.ok("ownership")["instance_id"]
    assert sql(f"SELECT count(*) AS n FROM {schema}.owners WHERE owner = $1", me)[0]["n"] == 10_000
    held = sql(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
        f"AND ((classid::bigint << 32) | objid::bigint) IN (SELECT lock_key FROM {schema}.instances)"
    )
    assert held[0]["n"] == 2  # A's and B's, nothing per session
    for sid in (ids[0], ids[5_000], ids[-1]):
        assert b("get", sid, 5) == {"ok": ["x"]}
    assert b.ok("ownership")["handoffs"] == 3


def test_an_erasure_on_one_instance_is_not_undone_by_the_owners_flush(
    instances: tuple[Instance, Instance],
) -> None:
    a, b = instances
    a.ok("append", "s", 7, "secret")
    a.ok("flush")
    a.ok("append", "s", 7, "more, still in A's memory")
    assert b("delete_user", 7) == {"ok": 1}
    assert a("flush") == {"ok": None}  # erased elsewhere: the erasure wins, A drops its copy
    assert a("get", "s", 7)["error"] == "NotFound"
    assert a("disk", "s") == {"ok": None}
    assert b("get", "s", 7)["error"] == "NotFound"


def test_when_ownership_is_lost_anyway_the_loser_merges_after_the_winner(
    schema: str, instances: tuple[Instance, Instance]
) -> None:
    a, b = instances
    a.ok("append", "s", 1, "first")
    a.ok("flush")
    # A partition: B took s while A still serves it (simulated: the claim moves behind A's back).
    sql(f"UPDATE {schema}.owners SET owner = $1 WHERE session_id = 's'", b.ok("ownership")["instance_id"])
    assert b("get", "s", 1) == {"ok": ["first"]}  # both now hold version 1
    a.ok("append", "s", 1, "A's second")
    b.ok("append", "s", 1, "B's second")
    assert a("flush") == {"ok": None}  # A wins the row
    # B's flush finds the version moved: B's message goes after A's, re-numbered, and lands.
    assert b("flush") == {"ok": None}
    assert b("get", "s", 1) == {"ok": ["first", "A's second", "B's second"]}
    assert b.ok("stats")["conflicts"] == 1
    assert b("append", "s", 1, "B again") == {"ok": 4}
    assert b("flush") == {"ok": None}
    # A's memory is a flush behind; its next write merges onto B's and loses nothing either.
    assert a("append", "s", 1, "A late") == {"ok": 3}
    assert a("flush") == {"ok": None}
    everything = ["first", "A's second", "B's second", "B again", "A late"]
    assert a("disk", "s") == {"ok": everything}
