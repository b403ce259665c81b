"""Load: N concurrent SSE clients chatting at once against a real uvicorn, the chat server
with the write-behind store on SQLite next to the same server on the plain in-memory
SessionStore, in the same run, alternating rounds.

Reports tokens per second and the p50/p99 gap between two tokens of one stream as seen
by the client. Target: with persistence on, p99 within 1.2x of the in-memory server at
200 concurrent streams. `STREAMS` and `ROUNDS` may be lowered with env variables for a
quick look.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

import httpx
import orjson
from pytest_benchmark.fixture import BenchmarkFixture

from tests.e2e.server import Server

STREAMS = int(os.environ.get("WRITEBEHIND_LOAD_STREAMS", "200"))
ROUNDS = int(os.environ.get("WRITEBEHIND_LOAD_ROUNDS", "3"))
TOKEN_DELAY_MS = 20


async def one_chat(c: httpx.AsyncClient, gaps: list[float]) -> int:
    sid = (await c.post("/api/sessions", json={})).json()["id"]
    await c.post(f"/api/sessions/{sid}/messages", json={"content": "load test"})
    tokens = 0
    last = None
    async with c.stream("GET", f"/api/sessions/{sid}/events") as response:
        data = None
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = orjson.loads(line[5:])
            elif line == "" and data is not None:
                if data["role"] == "assistant" and data["text"]:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                    tokens += 1
                if data["role"] == "assistant" and data["done"]:
                    return tokens
                data = None
    return tokens


async def load(url: str) -> dict[str, float]:
    gaps: list[float] = []
    limits = httpx.Limits(max_connections=STREAMS * 2, max_keepalive_connections=STREAMS * 2)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": "Bearer tok-alice"}, timeout=60, limits=limits
    ) as c:
        started = time.perf_counter()
        counts = await asyncio.gather(*(one_chat(c, gaps) for _ in range(STREAMS)))
        elapsed = time.perf_counter() - started
    gaps.sort()
    return {
        "tokens_per_s": sum(counts) / elapsed,
        "p50_ms": gaps[len(gaps) // 2] * 1000,
        "p99_ms": gaps[int(len(gaps) * 0.99)] * 1000,
    }


def test_sse_load(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    benchmark.group = f"SSE load, {STREAMS} concurrent streams"
    persistent = Server(tmp_path / "load.db", delay_ms=TOKEN_DELAY_MS)
    memory = Server(tmp_path / "unused.db", delay_ms=TOKEN_DELAY_MS, extra_env={"CHAT_SERVER_PERSIST": "0"})
    results: dict[str, list[dict[str, float]]] = {"write-behind": [], "in-memory": []}
    try:
        for _ in range(ROUNDS):
            results["in-memory"].append(asyncio.run(load(memory.url)))
            results["write-behind"].append(asyncio.run(load(persistent.url)))

        def summary(name: str) -> dict[str, float]:
            runs = results[name]
            return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

        wb, mem = summary("write-behind"), summary("in-memory")
        benchmark.extra_info.update(
            streams=STREAMS,
            rounds=ROUNDS,
            write_behind=wb,
            in_memory=mem,
            p99_ratio=wb["p99_ms"] / mem["p99_ms"],
            p50_ratio=wb["p50_ms"] / mem["p50_ms"],
        )
        benchmark.pedantic(lambda: None, rounds=1)
        print(f"\nwrite-behind: {wb}\nin-memory:    {mem}\np99 ratio {wb['p99_ms'] / mem['p99_ms']:.2f}")
    finally:
        persistent.stop(signal.SIGTERM)
        memory.stop(signal.SIGKILL)
