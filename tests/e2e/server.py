"""A real server process for the end-to-end tests: uvicorn on 127.0.0.1, a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, db_path: Path, delay_ms: int = 20, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CHAT_SESSION_", "CHAT_DEMO", "CHAT_SERVER"))
        }
        env.update(
            CHAT_SESSION_DB_PATH=str(db_path),
            CHAT_DEMO_TOKENS="tok-alice:1,tok-bob:2",
            CHAT_DEMO_TOKEN_DELAY_MS=str(delay_ms),
            CHAT_SERVER_MAX_BODY_BYTES="4096",
            CHAT_SERVER_PING_SECONDS="1",
        )
        env.update(extra_env or {})
        # A file, not a pipe: nobody drains a pipe while the test runs, and a server whose
        # log fills one blocks on its next line.
        self.log_path = db_path.with_name(f"{db_path.name}.{self.port}.log")
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "writebehind.server", "--port", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
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

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()


def client(server: Server, who: str | None = None) -> httpx.Client:
    headers = {} if who is None else {"Authorization": f"Bearer {TOKENS[who]}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=10)


def events(c: httpx.Client, sid: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
    """The session's SSE events, parsed, each with its `event_id`."""
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    with c.stream("GET", f"/api/sessions/{sid}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if fields.get("event") == "message":
                    yield {**orjson.loads(fields["data"]), "event_id": fields["id"]}
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name] = value.lstrip(" ")
