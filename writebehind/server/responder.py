"""Responders: what writes the assistant's reply, token by token.

A responder is any callable that takes the conversation so far and returns an async
iterator of text (`Responder`); `create_app(responder=...)` takes one. Two are built in:

- `EchoResponder`, the default, needs no network: a deterministic reply streamed with a
  configurable delay, so that the write-behind coalescing (hundreds of `update_message`
  calls into one row write) is exercised for real.
- `OpenAIChatResponder`, chosen by `CHAT_MODEL_BASE_URL` and `CHAT_MODEL_NAME`: any
  OpenAI-compatible chat-completions endpoint (Ollama, vLLM, llama.cpp's server, the hosted
  APIs), streamed with httpx (the `model` extra).

A responder that fails raises; `ResponderError`'s message is stored on the reply and
shown to its user (so it says what happened and never a secret), any other exception
is stored as a generic failure. What was said before the failure is kept either way. A
reply that is stopped (or cut by a shutdown) closes its iterator (`tokens_of`), which
for `OpenAIChatResponder` closes the HTTP stream to the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import orjson

from ..model import StoredMessage
from .settings import ServerSettings

if TYPE_CHECKING:
    import httpx

__all__ = [
    "EchoResponder",
    "OpenAIChatResponder",
    "Responder",
    "ResponderError",
    "aclose_responder",
    "responder_from_settings",
    "tokens_of",
]

LOG = logging.getLogger("writebehind.server")
# What the store's roles are called in a chat-completions request. A `tool` message
# cannot be sent without the assistant's `tool_calls` it answers, which the store does
# not keep: it is left out rather than sent malformed.
_ROLES: Final = {"system": "system", "user": "user", "assistant": "assistant"}
_ERROR_BODY_BYTES: Final = 8 * 1024  # what is read of an upstream error's body
_WHOLE_BODY_BYTES: Final = 4 * 1024 * 1024  # an endpoint that ignored `stream` and answered whole
_UPSTREAM_SAYS_CHARS: Final = 300
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_MALFORMED: Final = "the model server sent a malformed stream"


class Responder(Protocol):
    def __call__(self, history: Sequence[StoredMessage]) -> AsyncIterator[str]:
        """Yield the reply's tokens, given the conversation so far (last: the user's message)."""
        ...


class ResponderError(Exception):
    """The reply failed. The message is stored on the reply and shown to its user, so it
    says what went wrong in words a user can act on and never a secret. `kind` is short
    and says no text of anyone's: it is what the log says (an upstream's own message may
    quote the conversation)."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


@contextlib.asynccontextmanager
async def tokens_of(
    responder: Responder, history: Sequence[StoredMessage]
) -> AsyncIterator[AsyncIterator[str]]:
    """The responder's tokens, closed on the way out however it is left (the reply ended,
    was stopped, or the server stops): an `async for` left by an exception does not close
    its generator, and a generator left open holds its HTTP stream until the garbage
    collector gets to it."""
    tokens = responder(history)
    try:
        yield tokens
    finally:
        close = getattr(tokens, "aclose", None)
        if close is not None:
            await close()


async def aclose_responder(responder: Responder) -> None:
    """Release what a responder holds (its HTTP connections), if it holds anything."""
    close = getattr(responder, "aclose", None)
    if close is not None:
        await close()


class EchoResponder:
    """Answers every message with the same deterministic reply about it."""

    def __init__(self, delay_s: float = 0.03, words: int = 40) -> None:
        self.delay_s = delay_s
        self.words = words

    def reply_to(self, text: str) -> list[str]:
        said = " ".join(text.split()[:12])
        body = [f"You said: \u201c{said}\u201d."] + [f"token{i}" for i in range(1, self.words + 1)]
        return [word if i == 0 else " " + word for i, word in enumerate(body)]

    async def __call__(self, history: Sequence[StoredMessage]) -> AsyncIterator[str]:
        for token in self.reply_to(history[-1].content if history else ""):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield token


class OpenAIChatResponder:
    """Streams each reply from an OpenAI-compatible `POST {base_url}/chat/completions`
    (`stream: true`; server-sent events whose `data:` is a chunk, until `data: [DONE]`),
    sending the session's last `max_history` messages (user, assistant and system; empty
    ones left out) after `system_prompt`.

    Every failure becomes a `ResponderError` with a message for the user: the endpoint
    cannot be reached, answers an error status (its own message is quoted, except for
    401/403), sends a malformed stream, goes silent for `timeout_s`, or closes the stream
    before its end. The API key is sent only in the Authorization header: no message,
    log line or repr contains it. One connection pool per responder; `aclose()` closes it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        system_prompt: str | None = None,
        max_history: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx is in `test`
            raise ImportError("CHAT_MODEL_BASE_URL needs httpx: pip install 'writebehind[model]'") from None
        self._httpx = httpx
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.system_prompt = system_prompt
        self.max_history = max_history
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"OpenAIChatResponder(url={self.url!r}, model={self.model!r})"

    def messages(self, history: Sequence[StoredMessage]) -> list[dict[str, str]]:
        """What the request sends: the system prompt, then the history, roles mapped."""
        said = [
            {"role": _ROLES[m.role], "content": m.content} for m in history if m.role in _ROLES and m.content
        ][-self.max_history :]
        if self.system_prompt:
            said.insert(0, {"role": "system", "content": self.system_prompt})
        return said

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            httpx = self._httpx
            timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
            self._client = httpx.AsyncClient(timeout=timeout, transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __call__(self, history: Sequence[StoredMessage]) -> AsyncIterator[str]:
        httpx = self._httpx
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        body = {"model": self.model, "messages": self.messages(history), "stream": True}
        joiner = _Surrogates()
        try:
            async with self._http().stream("POST", self.url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    raise ResponderError(await self._refusal(response), f"status {response.status_code}")
                kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind == "application/json":
                    text = _whole_answer(await _read_at_most(response, _WHOLE_BODY_BYTES))
                    if text:
                        yield joiner.push(text)
                    return
                finished = False
                async for data in _sse_data(response.aiter_lines()):
                    if data.strip() == "[DONE]":
                        finished = True
                        break
                    delta, finish = _delta(data, self._redact)
                    finished = finished or finish
                    if delta and (text := joiner.push(delta)):
                        yield text
                if not finished:
                    raise ResponderError(
                        "the model server ended the stream before the reply was finished", "ended early"
                    )
                if tail := joiner.flush():
                    yield tail
        except ResponderError:
            raise
        except httpx.HTTPError as exc:
            raise ResponderError(*_transport_failure(exc, self.timeout_s)) from None

    async def _refusal(self, response: httpx.Response) -> str:
        status = response.status_code
        if status in (401, 403):
            return f"the model server refused the API key ({status})"
        said = _upstream_message(await _read_at_most(response, _ERROR_BODY_BYTES))
        message = f"the model server answered {status}"
        return f"{message}: {self._redact(said)}" if said else message

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[API key]") if self._api_key else text


def _transport_failure(exc: Exception, timeout_s: float) -> tuple[str, str]:
    """One table from httpx's exceptions to what the user is told and the log's kind
    (never the URL, which may carry credentials, nor the exception's own text)."""
    import httpx

    closed = "the model server closed the connection before the reply was finished"
    table: tuple[tuple[type[Exception], str, str], ...] = (
        (httpx.ConnectError, "cannot reach the model server", "unreachable"),
        (httpx.ConnectTimeout, "cannot reach the model server (timed out connecting)", "unreachable"),
        (httpx.ReadTimeout, f"the model server stopped answering (nothing for {timeout_s:g} s)", "timeout"),
        (httpx.TimeoutException, "the model server timed out", "timeout"),
        (httpx.RemoteProtocolError, closed, "closed"),
        (httpx.ReadError, closed, "closed"),
        (httpx.HTTPError, "the request to the model server failed", "failed"),
    )
    return next((message, kind) for cls, message, kind in table if isinstance(exc, cls))


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (its `data:` lines joined by newlines, as the
    spec says); comments, other fields and events without data are skipped."""
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value if colon else "")
    if data:  # the last event, without its blank line
        yield "\n".join(data)


def _delta(data: str, redact: Callable[[str], str]) -> tuple[str, bool]:
    """The text of one chunk and whether it finished the reply; `ResponderError` for a
    chunk that is not one, or that reports an error."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            # orjson refuses a lone surrogate escape ("\ud83d"), which a stream that splits
            # a character between two chunks sends; the standard library's parser takes it.
            chunk = json.loads(data)
        except ValueError:
            raise ResponderError(_MALFORMED, "malformed stream") from None
    if not isinstance(chunk, dict):
        raise ResponderError(_MALFORMED, "malformed stream")
    if chunk.get("error"):
        said = _upstream_message(orjson.dumps(chunk))
        raise ResponderError(
            f"the model server reported an error: {redact(said) or 'no details'}", "error event"
        )
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise ResponderError(_MALFORMED, "malformed stream")
    if not choices:
        return "", False  # e.g. a usage-only chunk
    choice = choices[0]
    if not isinstance(choice, dict):
        raise ResponderError(_MALFORMED, "malformed stream")
    delta = choice.get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    if content is not None and not isinstance(content, str):
        raise ResponderError(_MALFORMED, "malformed stream")
    return content or "", bool(choice.get("finish_reason"))


def _whole_answer(body: bytes) -> str:
    """The reply of an endpoint that answered `stream: true` with one JSON completion."""
    try:
        content = orjson.loads(body)["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        raise ResponderError("the model server sent a malformed answer", "malformed answer") from None
    if content is not None and not isinstance(content, str):
        raise ResponderError("the model server sent a malformed answer", "malformed answer")
    return content or ""


def _upstream_message(body: bytes) -> str:
    """The error message in an upstream body (`{"error": {"message"}}`, `{"error": "..."}`
    or `{"detail": ...}`), one line, shortened; empty when there is none."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    said: object = None
    if isinstance(doc, dict):
        error = doc.get("error", doc.get("detail"))
        said = error.get("message") if isinstance(error, dict) else error
    if not isinstance(said, str):
        return ""
    said = " ".join(said.split())
    return said if len(said) <= _UPSTREAM_SAYS_CHARS else said[: _UPSTREAM_SAYS_CHARS - 1] + "\u2026"


class _Surrogates:
    """Joins a character a stream split between two chunks as JSON escapes (`"\\ud83d"`
    then `"\\ude00"`): the first half waits for the second. A half with no partner
    becomes U+FFFD, since the store refuses text it cannot encode."""

    def __init__(self) -> None:
        self._high = ""

    def push(self, text: str) -> str:
        text, self._high = self._high + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._high = text[:-1], text[-1]
        if _SURROGATE.search(text) is None:
            return text
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")

    def flush(self) -> str:
        high, self._high = self._high, ""
        return "\ufffd" if high else ""


def responder_from_settings(settings: ServerSettings) -> Responder:
    """`OpenAIChatResponder` when `CHAT_MODEL_BASE_URL` is set, else `EchoResponder`."""
    model = settings.model
    if model is None:
        return EchoResponder(settings.token_delay_ms / 1000)
    return OpenAIChatResponder(
        model.base_url,
        model.name,
        model.api_key,
        timeout_s=model.timeout_seconds,
        system_prompt=model.system_prompt,
        max_history=model.max_history,
    )
