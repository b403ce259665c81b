"""A small OpenAI-compatible chat-completions server for the tests: plain asyncio on
127.0.0.1, HTTP/1.1 written by hand so that a test decides every byte, every chunk
boundary and every way of failing (an error status, a stream cut without its end, a
stream that goes silent, a malformed one). It records what each request sent.

Each request takes the next script from the queue (the last one repeats):
`Stream(events)` answers 200 with `text/event-stream`, chunked, one HTTP chunk per item;
`Status(code, body)` answers an error. `FakeModel` runs in the test's event loop;
`FakeModelThread` runs one in a thread of its own, for the tests that drive a real
server process synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["FakeModel", "FakeModelThread", "Request", "Status", "Stream", "chunk", "done", "tokens"]


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One `data:` event carrying a chat-completions chunk with `content`."""
    delta = {} if content is None else {"content": content}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
    return b"data: " + orjson.dumps(body) + b"\n\n"


def done() -> bytes:
    return b"data: [DONE]\n\n"


def tokens(*texts: str) -> list[bytes]:
    """A whole, well-formed stream of `texts`: a role chunk, one chunk each, a finish, [DONE]."""
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n'
    return [role, *(chunk(t) for t in texts), chunk(finish="stop"), done()]


@dataclass
class Stream:
    """200 `text/event-stream`, each item one HTTP chunk (bytes as given: a test can split
    a UTF-8 character between two). `end`: "done" ends the body properly; "die" closes the
    connection mid-body (no last chunk); "hang" sends nothing more until the client
    leaves (or `release` is set, then ends properly)."""

    events: list[bytes]
    end: str = "done"
    release: asyncio.Event | None = None
    content_type: str = "text/event-stream"


@dataclass
class Status:
    code: int
    body: bytes = b""
    content_type: str = "application/json"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    raw_head: bytes = b""


class FakeModel:
    """`async with FakeModel() as fake:` listens on 127.0.0.1 (`fake.base_url`)."""

    def __init__(self) -> None:
        self.scripts: list[Stream | Status] = [Stream(tokens("ok"))]
        self.requests: list[Request] = []
        self.arrived = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *scripts: Stream | Status) -> None:
        self.scripts = list(scripts)

    async def __aenter__(self) -> FakeModel:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only `__aexit__` cancels a handler, and its end is all that is asked of it
            # (asyncio's stream server logs a handler task that ends cancelled as an error).
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to close."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(method, path, headers, orjson.loads(raw) if raw else None, raw_head=head)
        self.requests.append(request)
        self.arrived.set()
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        if isinstance(script, Status):
            writer.write(
                f"HTTP/1.1 {script.code} X\r\nContent-Type: {script.content_type}\r\n"
                f"Content-Length: {len(script.body)}\r\n\r\n".encode()
                + script.body
            )
            await writer.drain()
            return True
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {script.content_type}\r\n"
            "Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n".encode()
        )
        await writer.drain()
        for event in script.events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        if script.end == "die":
            writer.transport.abort()  # mid-body: no last chunk, the connection just ends
            request.disconnected.set()
            return False
        if script.end == "hang":
            # Nothing more until the client leaves: its EOF (or reset) is what a test of
            # "a stopped reply closes the upstream stream" waits for.
            leaving = asyncio.ensure_future(reader.read(1))
            waits: set[asyncio.Future[Any]] = {leaving}
            if script.release is not None:
                waits.add(asyncio.ensure_future(script.release.wait()))
            finished, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for other in pending:
                other.cancel()
            if leaving in finished:
                request.disconnected.set()
                return False
            writer.write(b"%x\r\n%s\r\n" % (len(done()), done()))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


class FakeModelThread:
    """A `FakeModel` served from a thread of its own (for synchronous tests)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake = FakeModel()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-model", daemon=True)

    def __enter__(self) -> FakeModelThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.__aenter__(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.__aexit__(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def script(self, *scripts: Stream | Status) -> None:
        """Set what the next requests get (made in the fake's loop: a `release` event is its)."""
        self.loop.call_soon_threadsafe(self.fake.script, *scripts)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` in the fake's loop and return its result."""

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def wait(self, coro_fn: Any, timeout: float = 30) -> Any:
        """Await `coro_fn()` in the fake's loop; fails after `timeout` (a bound on a failure)."""
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro_fn(), timeout), self.loop).result()

    def requests(self) -> list[Request]:
        return list(self.call(lambda: self.fake.requests))

    def event(self) -> asyncio.Event:
        """A new `asyncio.Event` of the fake's loop (for `Stream.release`); set it with `set`."""
        return self.call(asyncio.Event)  # type: ignore[no-any-return]

    def set(self, event: asyncio.Event) -> None:
        self.loop.call_soon_threadsafe(event.set)
