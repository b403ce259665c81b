"""N chat clients in one process, each with its own SSE stream, against a running chat server.

    python -m benchmarks.sse_clients --url http://127.0.0.1:8000 --streams 1000 --server-pid PID

Prints one JSON object (see `Result`). Run by `test_sse_load.py`; usable alone against any
server started with `CHAT_DEMO_TOKENS=tok-alice:...` and the default `EchoResponder`.

Each client, as a browser tab would: creates a session, opens its event stream and waits
for the response headers (its stream is open). Once all N streams are open, the timed
phase starts: each client posts one message (the posts are spread over `--ramp-s`, so that
the replies do not tick in lockstep) and follows its reply to its `done` event, noting
when each piece of text arrives. The timed phase ends when every reply is done; then
each client checks its reply against what the server stored and what the
`EchoResponder` says to that message (every token, in order, nothing else, offsets
contiguous).

HTTP is spoken by hand over asyncio streams, not with httpx: the client shares the two
cores with the server, so whatever it spends a piece of text is taken from the server's
figures. Here a piece of text costs a chunk header, a split and an `orjson.loads`; the
whole process used 0.1-0.15 of a core at 1,000 streams and 2,500 tokens/s (`client_cpu_s`
says so for every run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

from writebehind.server.responder import EchoResponder

__all__ = ["Result", "main", "run"]

# Each client holds two sockets at most (its stream and one request), plus the loop's own.
_FDS_PER_CLIENT = 2
_SETUP_CONCURRENCY = 64  # sessions and streams opened at once before the timed phase
_IO_TIMEOUT_S = 120.0  # a stuck server fails the run instead of hanging it


class ClientError(Exception):
    """A client saw something other than a complete, correct reply."""


@dataclass
class Result:
    """What one run measured. `gaps_ms`: for every piece of reply text after the first,
    the time since the previous one on that stream (what its user waits between two
    updates). `tokens`: the responder's tokens delivered (a piece of text may carry several
    when the stream fell behind; `events` counts the pieces)."""

    streams: int
    completed: int = 0
    tokens: int = 0
    events: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    first_token_p50_ms: float = 0.0
    first_token_p99_ms: float = 0.0
    server_cpu_s: float = 0.0  # user + sys of the server process over the timed phase
    server_cpu_us_per_token: float = 0.0
    server_utilisation: float = 0.0  # server CPU seconds per wall second (1.0 = one core busy)
    client_cpu_s: float = 0.0  # this process, over the timed phase
    client_utilisation: float = 0.0
    machine_busy: float = 0.0  # all cores, every process: 1.0 = every core busy
    other_cores: float = 0.0  # cores busy with neither the server nor this process
    setup_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (the SQLite thread too)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class _Http:
    """One HTTP/1.1 connection to the server, spoken by hand (see the module docstring)."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> _Http:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):  # the server may have closed first
                await writer.wait_closed()

    async def send(self, method: str, path: str, body: Any = None, close: bool = True) -> None:
        assert self.writer is not None
        payload = b"" if body is None else orjson.dumps(body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.token}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n"
        )
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def body(self, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        parts = []
        while (chunk := await self.chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def chunk(self) -> bytes | None:
        """The next chunk of a chunked body; None at its end."""
        assert self.reader is not None
        size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await self.reader.readuntil(b"\r\n")
            return None
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """One request on this connection (`Connection: close`), its JSON answer."""
        await self.send(method, path, body)
        status, headers = await self.head()
        data = await self.body(headers)
        if status != expect:
            raise ClientError(f"{method} {path}: {status} {data[:200]!r}")
        return orjson.loads(data)


class _Client:
    def __init__(self, index: int, host: str, port: int, token: str) -> None:
        self.index = index
        self.host, self.port, self.token = host, port, token
        self.content = f"load test {index} \u2014 \u4f60\u597d \U0001f680"  # non-ASCII on the wire
        self.expected = EchoResponder(0).reply_to(self.content)
        self.sid = ""
        self.stream = _Http(host, port, token)
        self.text = ""
        self.arrivals: list[float] = []  # when each piece of reply text arrived
        self.tokens = 0
        self.posted_at = 0.0

    def http(self) -> _Http:
        return _Http(self.host, self.port, self.token)

    async def open(self) -> None:
        """Create the session and open its stream: the headers mean the server follows it."""
        async with self.http() as c:
            self.sid = (await c.call("POST", "/api/sessions", {}, expect=201))["id"]
        await self.stream.__aenter__()
        await self.stream.send("GET", f"/api/sessions/{self.sid}/events", close=False)
        status, headers = await self.stream.head()
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            raise ClientError(f"client {self.index}: the stream answered {status} {headers}")

    async def chat(self, start_at: float) -> None:
        """Post the message at `start_at`, then follow the reply to its end."""
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        async with self.http() as c:
            self.posted_at = time.perf_counter()
            await c.call("POST", f"/api/sessions/{self.sid}/messages", {"content": self.content}, expect=202)
        buffer = b""
        while True:
            chunk = await self.stream.chunk()
            now = time.perf_counter()
            if chunk is None:
                raise ClientError(f"client {self.index}: the stream ended before the reply did")
            buffer = (buffer + chunk).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if self._take(event, now):
                    await self.stream.__aexit__()  # as a tab that has its answer and goes
                    return

    def _take(self, event: bytes, now: float) -> bool:
        """One SSE event; True once the reply is done."""
        data = None
        kind = "message"
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                data = orjson.loads(line[5:])
            elif line.startswith(b"event:"):
                kind = line[6:].strip().decode()
        if data is None:
            return False  # a ping
        if kind != "message":
            raise ClientError(f"client {self.index}: unexpected {kind!r} event")
        if data["role"] != "assistant":
            if data["role"] != "user" or data["text"] != self.content:
                raise ClientError(f"client {self.index}: another message on my stream: {data['role']}")
            return False
        text = data["text"]
        if data["offset"] != _utf16_len(self.text):
            raise ClientError(f"client {self.index}: offset {data['offset']} after {_utf16_len(self.text)}")
        if text:
            self.text += text
            self.arrivals.append(now)
        if data["interrupted"] or data["stopped"] or data["error"]:
            raise ClientError(f"client {self.index}: the reply was cut: {data}")
        return bool(data["done"])

    async def check(self) -> None:
        """The reply streamed is the reply the responder wrote and the server stored."""
        if self.text != "".join(self.expected):
            raise ClientError(f"client {self.index}: streamed {len(self.text)} chars, not the expected reply")
        async with self.http() as c:
            page = await c.call("GET", f"/api/sessions/{self.sid}/messages")
        stored = [(m["role"], m["content"]) for m in page["messages"]]
        if stored != [("user", self.content), ("assistant", self.text)]:
            raise ClientError(f"client {self.index}: the server stored something else")
        self.tokens = len(self.expected)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _raise_fd_limit(streams: int) -> None:
    """One process holding N streams needs more descriptors than the usual soft limit (1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = streams * _FDS_PER_CLIENT + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            raise SystemExit(
                f"error: {streams} streams need {want} file descriptors; the hard limit is {hard}"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def run(url: str, streams: int, token: str, server_pid: int, ramp_s: float, settle_s: float) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    clients = [_Client(i, host, port, token) for i in range(streams)]
    result = Result(streams=streams)
    setup_started = time.perf_counter()
    gate = asyncio.Semaphore(_SETUP_CONCURRENCY)

    async def open_one(client: _Client) -> None:
        async with gate:
            await client.open()

    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(c) for c in clients)), _IO_TIMEOUT_S)
        result.setup_s = time.perf_counter() - setup_started
        # The timed phase: from the first post to the last reply's end.
        cpu0, client0 = process_cpu_s(server_pid), time.process_time()
        busy0, total0 = machine_ticks()
        started = time.perf_counter() + 0.05
        order = random.Random(0).sample(range(streams), streams)  # who posts when: spread, fixed
        chats = (c.chat(started + ramp_s * order[c.index] / streams) for c in clients)
        outcomes = await asyncio.wait_for(asyncio.gather(*chats, return_exceptions=True), _IO_TIMEOUT_S)
        ended = time.perf_counter()
        client1 = time.process_time()
        busy1, total1 = machine_ticks()
        # The server's CPU is read a little later: the write-behind server's last flush (of
        # what changed in the last interval) belongs to these tokens too.
        await asyncio.sleep(settle_s)
        cpu1 = process_cpu_s(server_pid)
        chatted = [c for c, outcome in zip(clients, outcomes, strict=True) if outcome is None]
        checks = await asyncio.gather(*(c.check() for c in chatted), return_exceptions=True)
    finally:
        for c in clients:
            await c.stream.__aexit__()
    for outcome in (*outcomes, *checks):
        if isinstance(outcome, BaseException):
            result.failures.append(f"{type(outcome).__name__}: {outcome}")
    done = [c for c in clients if c.tokens]
    gaps = sorted(b - a for c in done for a, b in zip(c.arrivals, c.arrivals[1:], strict=False))
    first = sorted(c.arrivals[0] - c.posted_at for c in done if c.arrivals)
    result.completed = len(done)
    result.tokens = sum(c.tokens for c in done)
    result.events = sum(len(c.arrivals) for c in done)
    result.elapsed_s = ended - started
    result.tokens_per_s = result.tokens / result.elapsed_s
    result.p50_ms, result.p90_ms = _quantile(gaps, 0.5) * 1000, _quantile(gaps, 0.9) * 1000
    result.p99_ms, result.max_ms = _quantile(gaps, 0.99) * 1000, (gaps[-1] * 1000 if gaps else 0.0)
    result.first_token_p50_ms = _quantile(first, 0.5) * 1000
    result.first_token_p99_ms = _quantile(first, 0.99) * 1000
    result.server_cpu_s = cpu1 - cpu0
    result.server_cpu_us_per_token = result.server_cpu_s / max(result.tokens, 1) * 1e6
    result.server_utilisation = result.server_cpu_s / (result.elapsed_s + settle_s)
    result.client_cpu_s = client1 - client0
    result.client_utilisation = result.client_cpu_s / result.elapsed_s
    result.machine_busy = (busy1 - busy0) / max(total1 - total0, 1)
    cores = result.machine_busy * (os.cpu_count() or 1)
    result.other_cores = max(0.0, cores - result.server_utilisation - result.client_utilisation)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sse_clients")
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--token", default="tok-alice", help="a bearer token the server knows")
    parser.add_argument("--server-pid", type=int, required=True, help="whose CPU time to count")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="the posts are spread over this long")
    parser.add_argument(
        "--settle-s", type=float, default=1.5, help="then the server's CPU is read (after its next flush)"
    )
    args = parser.parse_args(argv)
    if args.streams < 1:
        parser.error("--streams: must be at least 1")
    _raise_fd_limit(args.streams)
    result = asyncio.run(run(args.url, args.streams, args.token, args.server_pid, args.ramp_s, args.settle_s))
    sys.stdout.write(orjson.dumps(asdict(result)).decode() + "\n")


if __name__ == "__main__":
    main()
