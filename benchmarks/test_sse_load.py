"""Load: 1,000 concurrent SSE streams against a real uvicorn, the clients in a process of
their own (`sse_clients.py`): the chat server with the write-behind store on SQLite next to
the same server on the plain in-memory `SessionStore`, alternating rounds in one run.

Each round, every client opens its stream, posts a message and follows its reply (41
tokens) to its end. Reported per side (median of the rounds): the p50/p99 gap between two
pieces of reply text on one stream as its client sees it, tokens/s over all streams, and
the server's CPU time (user + sys, all its threads) per token delivered. The ratios are
the median of each round's paired ratio (the two servers ran back to back; see
paired.py for why). Target: p99 within 1.2x of the in-memory server.

The demo responder's token delay sets the load: at 600 ms, 1,000 streams ask for 1,667
tokens/s, about a third of a core for either server, with p50 at the responder's pace on
both sides. This VM's two cores are shared with the client process and whatever else runs
(`machine_busy`, `other_cores`). At 100 ms (10,000 tokens/s) both servers saturate:
tokens/s is then each one's ceiling and p99 measures a queue, not the store. The streams'
pings are at the default 15 s (the e2e tests' 1 s would add 1,000 events a second of pure
overhead).

What set the write-behind p99 (1.45-1.51x, then 1.39x with full-text search gone: 857 vs
617 ms) was the cyclic GC, not the flush's own time. Steady streaming in the in-memory
server allocates about as many objects as it frees (each token's replace the last's), so
its GC stays idle. A flush of 500 sessions in one transaction (the old default batch) held
a few thousand new objects at once (its snapshots on the event loop, its rows in the
writer's thread), each time triggering several young collections; every tenth of those
moves whatever is in flight, some 20,000 objects of 1,000 streams' pending awaits, to the
oldest generation, and its growth triggers a full collection: 250-400 ms with every stream
paused, 2-3 times in a round's 25 s (gen0/gen1/gen2 collections in the timed phase, from
gc.callbacks: 367/33/3 against 208/18/0-2). py-spy showed the same as `DirtyIndex.take`
holding the loop 15-70 ms (collections it triggered; alone it takes 2 ms for 500). Two more
things kept a flush's objects alive for up to an interval: aiosqlite's thread keeps its
last job (the batch's deltas, and the messages' previous versions) until its next one, and
each session's dirty marks were new every interval.

Fixed in the library: `flush_batch` 100 (a transaction's objects stay under the young
generation's threshold of 700: flushing 5,000 sessions triggered 18-19 young collections
at 500, 0-1 at 100) with `max_flushes_per_second` 250 (the same sessions/s ceiling); the
worker drops a batch's deltas once written; committed marks are reused. Measured (5
rounds, `uptime` load 1-2 from other work): p99 620 vs 624 ms, ratio 0.99 (rounds
0.96-1.02); p50 601 vs 601 ms; 1,432 vs 1,430 tokens/s; server CPU 276 vs 205 us/token
(1.34x: the flush itself, in the writer's thread and the loop; with the size trigger at
100 dirty sessions a streaming session is also written more often than once an interval).

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
