"""A real server process for the end-to-end tests: uvicorn on 127.0.0.1, a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
# A stream pings every second (CHAT_SERVER_PING_SECONDS below), so a reader checks this
# bound at least once a second: a stream that never ends fails the test instead of
# hanging it. It bounds a failure; no test asserts how fast anything is.
GIVE_UP_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(db_path: Path, delay_ms: int = 20, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test server: this one, less any chat setting, plus the test's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            (
                "CHAT_SESSION_",
                "CHAT_DEMO",
                "CHAT_SERVER",
                "CHAT_AUTH_",
                "CHAT_COOKIE_",
                "CHAT_MODEL_",
                "WEB_CONCURRENCY",
            )
        )
    }
    env.update(
        CHAT_SESSION_DB_PATH=str(db_path),
        CHAT_DEMO_TOKENS="tok-alice:1,tok-bob:2",
        CHAT_DEMO_TOKEN_DELAY_MS=str(delay_ms),
        CHAT_SERVER_MAX_BODY_BYTES="4096",
        CHAT_SERVER_PING_SECONDS="1",
    )
    env.update(extra_env or {})
    return env


class Server:
    """`python -m writebehind.server` (or `command`, where `{port}` is replaced) on a free
    port (or `port`), waited for until /healthz answers."""

    def __init__(
        self,
        db_path: Path,
        delay_ms: int = 20,
        extra_env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = server_env(db_path, delay_ms, extra_env)
        argv = (
            [sys.executable, "-m", "writebehind.server", "--port", "{port}"] if command is None else command
        )
        # A file, not a pipe: nobody drains a pipe while the test runs, and a server whose
        # log fills one blocks on its next line.
        self.log_path = db_path.with_name(f"{db_path.name}.{self.port}.{time.monotonic_ns()}.log")
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [a.replace("{port}", str(self.port)) for a in argv],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"the server did not start: {self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Send `sig`, wait for the exit, return what the server printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        return self.output()

    def close(self) -> str:
        """The end of a test: a graceful stop (so that the server's coverage data is saved),
        a SIGKILL if it does not end in time."""
        try:
            return self.stop(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            return self.stop(signal.SIGKILL)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


def client(server: Server, who: str | None = None) -> httpx.Client:
    headers = {} if who is None else {"Authorization": f"Bearer {TOKENS[who]}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=10)


def sse(
    c: httpx.Client, sid: str, last_event_id: str | None = None, give_up_s: float = GIVE_UP_S
) -> Iterator[dict[str, Any]]:
    """Every SSE event of the session, parsed: `{"event", "id", "data"}` (data decoded from
    JSON). Ends when the server ends the stream; fails if it is still open after
    `give_up_s` while the caller still wants events."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    deadline = time.monotonic() + give_up_s
    seen: list[str] = []
    with c.stream("GET", f"/api/sessions/{sid}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise AssertionError(f"the stream was still open after {give_up_s} s; events: {seen}")
            if line == "":
                if "event" in fields or "data" in fields:
                    seen.append(f"{fields.get('event')}:{fields.get('id')}")
                    data = orjson.loads(fields["data"]) if fields.get("data") else None
                    yield {"event": fields.get("event", "message"), "id": fields.get("id"), "data": data}
                fields = {}
                continue
            if line.startswith(":"):
                continue  # a ping
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def events(c: httpx.Client, sid: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
    """The session's `message` events, parsed, each with its `event_id`."""
    for e in sse(c, sid, last_event_id):
        if e["event"] == "message":
            yield {**e["data"], "event_id": e["id"]}


def utf16_len(text: str) -> int:
    """What JavaScript's `text.length` says: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2
