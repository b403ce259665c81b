"""`OpenAIChatResponder` against a real (fake) OpenAI-compatible server on 127.0.0.1:
tokens with emoji, CJK, RTL and combining marks, split across chunks in every way a
stream can split them; the history it sends; and each way an upstream fails, which
becomes a `ResponderError` a user can read, never with the API key in it. Closing the
reply (a stop, a shutdown), wherever the reply's task was waiting, closes the HTTP stream."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from writebehind import StoredMessage
from writebehind.server.responder import (
    EchoResponder,
    OpenAIChatResponder,
    ResponderError,
    responder_from_settings,
    tokens_of,
)
from writebehind.server.settings import ServerSettings

from .fake_model import FakeModel, Status, Stream, chunk, done, tokens

KEY = "sk-test-SECRET-0123456789abcdef"
GIVE_UP_S = 30  # bounds a failure; nothing asserts how fast anything is
MALFORMED = "the model server sent a malformed stream"
UNFINISHED = "the model server ended the stream before the reply was finished"


def _history(*turns: tuple[str, str]) -> list[StoredMessage]:
    now = datetime.now(UTC)
    return [
        StoredMessage(id=f"m{i}", seq=i, role=role, content=text, created_at=now, updated_at=now)
        for i, (role, text) in enumerate(turns, 1)
    ]


HISTORY = _history(
    ("system", "Be brief."),
    ("user", "Hello 👋"),
    ("assistant", "Hi! 你好"),
    ("tool", '{"result": 42}'),  # cannot be sent without its tool call: left out
    ("assistant", ""),  # a reply cut before its first token: nothing to send
    ("user", "Say it in Hebrew: שלום, and café with a combining mark: cafe\u0301"),
)


async def _collect(responder: OpenAIChatResponder, history: Sequence[StoredMessage] = HISTORY) -> list[str]:
    async with tokens_of(responder, history) as stream:
        return [token async for token in stream]


async def _until_failure(responder: OpenAIChatResponder) -> tuple[str, ResponderError]:
    said: list[str] = []
    with pytest.raises(ResponderError) as failure:
        async with tokens_of(responder, HISTORY) as stream:
            async for token in stream:
                said.append(token)
    return "".join(said), failure.value


@pytest.fixture
async def fake() -> AsyncIterator[FakeModel]:
    async with FakeModel() as model:
        yield model


@pytest.fixture
async def responder(fake: FakeModel) -> AsyncIterator[OpenAIChatResponder]:
    r = OpenAIChatResponder(fake.base_url, "fake-model", KEY, timeout_s=GIVE_UP_S)
    yield r
    await r.aclose()


async def test_streams_non_ascii_tokens_and_sends_the_history_with_roles_mapped(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    family = "👩\u200d👩\u200d👧"
    # One event split between two HTTP chunks inside a UTF-8 character (東 is 3 bytes),
    # and the event after it split inside its `data:` prefix.
    tokyo = chunk("東京")
    cut = tokyo.index("東".encode()) + 1
    hebrew = chunk(" שלום")
    fake.script(
        Stream(
            [
                *tokens("👩", "\u200d👩", "\u200d👧", " e\u0301")[:-2],  # without finish and [DONE]
                tokyo[:cut],
                tokyo[cut:] + hebrew[:3],
                hebrew[3:],
                chunk(finish="stop") + done(),
            ]
        )
    )
    said = await _collect(responder)
    assert "".join(said) == family + " e\u0301東京 שלום"
    (request,) = fake.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "fake-model" and request.body["stream"] is True
    assert request.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello 👋"},
        {"role": "assistant", "content": "Hi! 你好"},
        {"role": "user", "content": "Say it in Hebrew: שלום, and café with a combining mark: cafe\u0301"},
    ]


async def test_a_system_prompt_goes_first_and_the_history_is_cut_to_its_most_recent(fake: FakeModel) -> None:
    r = OpenAIChatResponder(fake.base_url, "m", system_prompt="You are terse.", max_history=2)
    try:
        await _collect(r)
    finally:
        await r.aclose()
    (request,) = fake.requests
    assert "authorization" not in request.headers  # no key configured: none sent (Ollama needs none)
    assert [m["content"] for m in request.body["messages"]] == [
        "You are terse.",
        "Hi! 你好",
        "Say it in Hebrew: שלום, and café with a combining mark: cafe\u0301",
    ]


async def test_a_character_split_into_two_json_escapes_is_joined(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    # An emoji as a surrogate pair, its halves in two chunks (as a byte-level tokenizer
    # can send it), then a half that never gets its partner, at the end.
    def escaped(content: str) -> bytes:
        return b'data: {"choices":[{"index":0,"delta":{"content":"' + content.encode() + b'"}}]}\n\n'

    fake.script(Stream([escaped("a\\ud83d"), escaped("\\ude00b"), escaped("c\\ud83d"), chunk(finish="stop")]))
    said = await _collect(responder)
    assert said == ["a", "😀b", "c", "\ufffd"]
    assert "".join(said).encode("utf-8")  # all of it storable text: no lone surrogate


async def test_bytes_split_anywhere_by_the_transport_still_make_the_same_reply() -> None:
    # The same stream cut at every byte boundary, each piece delivered alone (httpx's own
    # transport layer, no socket, so the cut is exactly where the test puts it).
    body = b"".join(tokens("Hé", "llo ", "世界", " 🎉", "\u05e9\u05dc\u05d5\u05dd"))
    body = body.replace(b"\n", b"\r\n")  # CRLF line ends are SSE too

    for size in (1, 2, 3, 5, 7):

        async def pieces(size: int = size) -> AsyncIterator[bytes]:
            for i in range(0, len(body), size):
                yield body[i : i + size]

        def handler(request: httpx.Request, size: int = size) -> httpx.Response:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pieces(size))

        r = OpenAIChatResponder("http://model.invalid/v1", "m", transport=httpx.MockTransport(handler))
        try:
            assert "".join(await _collect(r)) == "Héllo 世界 🎉שלום", size
        finally:
            await r.aclose()


async def test_an_upstream_error_status_is_said_with_its_own_message(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    fake.script(Status(500, orjson.dumps({"error": {"message": "the GPU  fell\n over", "type": "server"}})))
    said, error = await _until_failure(responder)
    assert said == ""
    assert str(error) == "the model server answered 500: the GPU fell over"
    assert error.kind == "status 500"


async def test_the_api_key_is_never_in_an_error(fake: FakeModel, responder: OpenAIChatResponder) -> None:
    # A refused key is never quoted back (hosted APIs echo part of it)...
    fake.script(
        Status(401, orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})),
        Status(400, orjson.dumps({"error": f"bad request for key {KEY}"})),
        Stream([chunk("x"), b'data: {"error": {"message": "quota of ' + KEY.encode() + b' used up"}}\n\n']),
    )
    _, refused = await _until_failure(responder)
    assert str(refused) == "the model server refused the API key (401)"
    # ...and any other message that has it gets it blotted out.
    _, bad = await _until_failure(responder)
    assert str(bad) == "the model server answered 400: bad request for key [API key]"
    said, in_stream = await _until_failure(responder)
    assert said == "x" and str(in_stream) == "the model server reported an error: quota of [API key] used up"
    for error in (refused, bad, in_stream):
        assert KEY not in str(error) and KEY not in repr(error)
    assert KEY not in repr(responder)


async def test_a_stream_that_dies_mid_reply_keeps_what_came_and_says_so(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    fake.script(Stream(tokens("one", " two")[:3], end="die"))
    said, error = await _until_failure(responder)
    assert said == "one two"
    assert str(error) == "the model server closed the connection before the reply was finished"
    assert error.kind == "closed"


async def test_a_stream_that_goes_silent_times_out_with_what_came_kept(fake: FakeModel) -> None:
    fake.script(Stream(tokens("still", " here")[:3], end="hang"))
    r = OpenAIChatResponder(fake.base_url, "m", timeout_s=0.2)  # the timeout under test, not a bound
    try:
        said, error = await _until_failure(r)
    finally:
        await r.aclose()
    assert said == "still here"
    assert str(error) == "the model server stopped answering (nothing for 0.2 s)" and error.kind == "timeout"


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([chunk("a"), b"data: {not json\n\n"], MALFORMED),
        ([chunk("a"), b'data: ["a list"]\n\n'], MALFORMED),
        ([chunk("a"), b'data: {"choices": "none"}\n\n'], MALFORMED),
        ([chunk("a"), b'data: {"choices": [{"delta": {"content": 7}}]}\n\n'], MALFORMED),
        ([chunk("a"), b"event: ping\n: a comment\n\n"], UNFINISHED),
    ],
    ids=["not-json", "not-an-object", "no-choices", "content-not-text", "no-end"],
)  # fmt: skip
async def test_a_malformed_or_unfinished_stream_is_an_error_after_what_came(
    fake: FakeModel, responder: OpenAIChatResponder, events: list[bytes], message: str
) -> None:
    fake.script(Stream(events))
    said, error = await _until_failure(responder)
    assert said == "a" and str(error) == message


async def test_an_unreachable_server_is_said_without_its_address() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = OpenAIChatResponder(f"http://user:{KEY}@127.0.0.1:{port}/v1", "m")
    try:
        said, error = await _until_failure(r)
    finally:
        await r.aclose()
    assert said == "" and str(error) == "cannot reach the model server" and error.kind == "unreachable"
    assert str(port) not in str(error) and KEY not in str(error)


async def test_an_endpoint_that_ignores_stream_and_answers_whole_is_read_whole(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "whole 🌍"}}]}
    fake.script(Status(200, orjson.dumps(completion)), Status(200, b'{"choices": []}'))
    assert await _collect(responder) == ["whole 🌍"]
    _, error = await _until_failure(responder)
    assert str(error) == "the model server sent a malformed answer"


async def test_closing_the_reply_wherever_it_waits_closes_the_upstream_stream(
    fake: FakeModel, responder: OpenAIChatResponder
) -> None:
    # A reply task is cancelled (a stop, a shutdown) while it awaits the store, not the
    # responder: the generator is suspended at a yield, and only closing it ends the
    # HTTP stream. `tokens_of` does. (The test keeps the generator referenced, as a
    # traceback can: otherwise the garbage collector's finalizer would close it sooner or
    # later and hide a missing close.)
    fake.script(Stream(tokens("first", " second")[:3], end="hang"))
    got_two = asyncio.Event()
    kept: list[AsyncIterator[str]] = []

    async def reply() -> None:
        async with tokens_of(responder, HISTORY) as stream:
            kept.append(stream)
            count = 0
            async for _ in stream:
                count += 1
                if count == 2:
                    got_two.set()
                    await asyncio.sleep(3600)  # "awaiting the store", until cancelled

    task = asyncio.create_task(reply())
    await asyncio.wait_for(got_two.wait(), GIVE_UP_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (request,) = fake.requests
    await asyncio.wait_for(request.disconnected.wait(), GIVE_UP_S)


async def test_the_settings_choose_the_responder(fake: FakeModel) -> None:
    assert isinstance(responder_from_settings(ServerSettings.from_env({})), EchoResponder)
    settings = ServerSettings.from_env(
        {"CHAT_MODEL_BASE_URL": fake.base_url + "/", "CHAT_MODEL_NAME": "llama3", "CHAT_MODEL_API_KEY": KEY}
    )
    assert settings.model is not None and KEY not in repr(settings)
    r = responder_from_settings(settings)
    assert isinstance(r, OpenAIChatResponder) and r.url == fake.base_url + "/chat/completions"
    try:
        assert await _collect(r) == ["ok"]
    finally:
        await r.aclose()
    assert fake.requests[0].body["model"] == "llama3"
