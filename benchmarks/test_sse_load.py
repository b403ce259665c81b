"""Load: 1,000 concurrent SSE streams against a real uvicorn, the clients in a process of
their own (`sse_clients.py`): the chat server with the write-behind store on SQLite next to
the same server on the plain in-memory `SessionStore`, alternating rounds in one run.

Each round, every client opens its stream, posts a message and follows its reply (41
tokens) to its end. Reported per side (median of the rounds): the p50/p99 gap between two
pieces of reply text on one stream as its client sees it, tokens/s over all streams, and
the server's CPU time (user + sys, all its threads) per token delivered. The ratios are
the median of each round's paired ratio (the two servers ran back to back; see
paired.py for why). Target: p99 within 1.2x of the in-memory server.

The demo responder's token delay sets the load. The in-memory server spends about 200 us
of CPU a token, the write-behind one 250-350 us (its flush, and since full-text search
the FTS5 triggers that re-index a growing reply at every flush); this VM's two cores are
shared with the client process and whatever else runs, which left the server about half
a core in our runs. At 600 ms, 1,000 streams ask for 1,667 tokens/s: 0.35-0.6 of a core,
loaded, with p50 at the responder's pace on both sides. At 400 ms (2,500 tokens/s) the
write-behind server fell behind whenever the VM was busy (p50 465 ms, not 400), and at
100 ms (10,000 tokens/s) both do: tokens/s is then each server's ceiling (4,100 and
3,200 in one run each, before the FTS5 triggers), and p99 measures a queue, not the
store. The streams' pings are at the default 15 s (the e2e tests' 1 s would add 1,000
events a second of pure overhead).

`WRITEBEHIND_LOAD_STREAMS`, `_ROUNDS` and `_DELAY_MS` change it for a quick look.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tests.e2e.server import Server
from writebehind.server.responder import EchoResponder

from .sse_clients import Result

STREAMS = int(os.environ.get("WRITEBEHIND_LOAD_STREAMS", "1000"))
# Five rounds a side: one round's p99 ratio ranged from 0.6 to 1.8 within one run here.
ROUNDS = int(os.environ.get("WRITEBEHIND_LOAD_ROUNDS", "5"))
TOKEN_DELAY_MS = int(os.environ.get("WRITEBEHIND_LOAD_DELAY_MS", "600"))
# The posts are spread over 4 s (250 a second): all at once, the burst of 1,000 new replies
# is itself a saturating load, and the first tokens of every stream would measure it.
RAMP_S = 4.0
_REPLY = EchoResponder(0).reply_to("x")  # the demo responder's: its opening sentence and 40 words
REPLY_TOKENS = len(_REPLY)
_REPO = Path(__file__).resolve().parents[1]
_FIGURES = ("tokens_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_token", "server_utilisation",
            "client_utilisation", "machine_busy", "other_cores", "first_token_p50_ms")  # fmt: skip


def run_clients(server: Server) -> dict[str, Any]:
    """One round: the client process against `server`; fails unless every client got its
    whole reply, token for token, and the server stored it."""
    argv = [sys.executable, "-m", "benchmarks.sse_clients", "--url", server.url, "--streams", str(STREAMS),
            "--server-pid", str(server.proc.pid), "--ramp-s", str(RAMP_S)]  # fmt: skip
    done = subprocess.run(argv, cwd=_REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = orjson.loads(done.stdout)
    assert set(result) == set(Result.__dataclass_fields__)
    assert result["failures"] == [], result["failures"][:5]
    assert result["completed"] == STREAMS
    assert result["tokens"] == STREAMS * REPLY_TOKENS
    assert server.proc.poll() is None, server.output()
    return result


def stored_replies(db: Path) -> int:
    """Whole replies on disk (after a graceful stop): every token, marked done, not cut."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM messages WHERE role = 'assistant' AND content LIKE ?"
            " AND json_extract(metadata, '$.done') = 1 AND json_extract(metadata, '$.interrupted') IS NULL",
            ("%" + _REPLY[-1],),
        ).fetchone()
    return int(count)


@pytest.mark.timeout(30 * 60)
def test_sse_load(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    benchmark.group = f"SSE load, {STREAMS} concurrent streams"
    env = {"CHAT_SERVER_PING_SECONDS": "15"}
    db = tmp_path / "load.db"
    persistent = Server(db, delay_ms=TOKEN_DELAY_MS, extra_env=env)
    memory = Server(
        tmp_path / "unused.db", delay_ms=TOKEN_DELAY_MS, extra_env={**env, "CHAT_SERVER_PERSIST": "0"}
    )
    sides = {"write-behind": persistent, "in-memory": memory}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    try:
        for round_ in range(ROUNDS):
            # Alternate who goes first, so neither side always follows the other's round.
            for name in sorted(sides, reverse=round_ % 2 == 1):
                results[name].append(run_clients(sides[name]))
    finally:
        memory.stop(signal.SIGKILL)
        persistent.close()
    # Nothing acknowledged was lost: after its graceful stop, every reply is whole on disk.
    assert stored_replies(db) == ROUNDS * STREAMS, persistent.output()

    def summary(name: str) -> dict[str, float]:
        return {key: statistics.median(r[key] for r in results[name]) for key in _FIGURES}

    def paired(key: str) -> list[float]:
        return [w[key] / m[key] for w, m in zip(results["write-behind"], results["in-memory"], strict=True)]

    wb, mem = summary("write-behind"), summary("in-memory")
    p99_ratios = paired("p99_ms")
    benchmark.extra_info.update(
        streams=STREAMS,
        rounds=ROUNDS,
        token_delay_ms=TOKEN_DELAY_MS,
        reply_tokens=REPLY_TOKENS,
        write_behind=wb,
        in_memory=mem,
        p99_ratio=statistics.median(p99_ratios),
        p99_ratios=p99_ratios,
        p50_ratio=statistics.median(paired("p50_ms")),
        cpu_ratio=statistics.median(paired("server_cpu_us_per_token")),
        rounds_write_behind=[{k: r[k] for k in _FIGURES} for r in results["write-behind"]],
        rounds_in_memory=[{k: r[k] for k in _FIGURES} for r in results["in-memory"]],
    )
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\nwrite-behind: {wb}\nin-memory:    {mem}")
    each = ", ".join(f"{r:.2f}" for r in p99_ratios)
    print(f"p99 ratio {statistics.median(p99_ratios):.2f} (rounds: {each})")
