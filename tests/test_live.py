"""The changes an owner sends its followers (`writebehind.live`): whatever happened to the
messages, applying what was sent to what the follower had gives what the owner has."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from writebehind.live import apply_changes, encode_changes
from writebehind.model import StoredMessage

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
PIECES = ["a", " token", "👋🏽", "你好", "שלום", "e\u0301", "\u0000", '"\\', "\n", "ß" * 40]


def message(seq: int, content: str, meta: str | None = None, mid: str | None = None) -> StoredMessage:
    stamp = T0 + timedelta(microseconds=seq * 1_000 + len(content))
    return StoredMessage(mid or f"m{seq}", seq, "assistant", content, T0, stamp, meta)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("token"), st.sampled_from(PIECES)),
        st.tuples(st.just("new"), st.sampled_from(PIECES)),
        st.tuples(st.just("rewrite"), st.sampled_from(PIECES)),
        st.tuples(st.just("meta"), st.sampled_from(['{"done":false}', '{"done":true}', None])),
        st.tuples(st.just("send"), st.just("")),
    ),
    max_size=40,
)


@given(ops)
@settings(max_examples=200, deadline=None)
def test_a_follower_applying_what_was_sent_has_what_the_owner_has(steps: list[tuple[str, str]]) -> None:
    owner = [message(1, "hi"), message(2, "")]
    sent = list(owner)
    follower = list(owner)
    lowest = len(owner)
    for op, arg in steps:
        last = owner[-1]
        if op == "token":
            owner[-1] = message(last.seq, last.content + arg, last.metadata_json, last.id)
        elif op == "new":
            owner.append(message(last.seq + 1, arg))
        elif op == "rewrite":
            owner[-1] = message(last.seq, arg, '{"attempt":2}', f"r{last.seq}")
        elif op == "meta":
            owner[-1] = message(last.seq, last.content, arg, last.id)
        lowest = min(lowest, len(owner) - 1)
        if op == "send":
            payloads = encode_changes(owner, sent, lowest)
            assert payloads is not None
            for payload in payloads:
                assert len(payload.encode()) < 7_700
                assert apply_changes(follower, payload)
                assert apply_changes(follower, payload), "a change the follower has is skipped"
            lowest = len(owner)
    for payload in encode_changes(owner, sent, 0) or []:
        assert apply_changes(follower, payload)
    assert follower == owner


def test_a_long_message_is_sent_in_pieces_that_each_fit_a_notification() -> None:
    owner = [message(1, "x"), message(2, "🙂" * 5_000 + "\u0001" * 3_000)]
    sent = [owner[0]]
    payloads = encode_changes(owner, sent, 0)
    assert payloads is not None and len(payloads) > 2
    assert all(len(p.encode()) < 7_700 for p in payloads)
    follower = [owner[0]]
    for payload in payloads:
        assert apply_changes(follower, payload)
    assert follower == owner


def test_a_gap_or_a_mismatch_asks_for_a_reload() -> None:
    owner = [message(1, "hello world")]
    sent = [message(1, "hello")]
    payloads = encode_changes(owner, sent, 0)
    assert payloads is not None
    assert not apply_changes([message(1, "hel")], payloads[0]), "a gap"
    assert not apply_changes([message(1, "hello_w")], payloads[0]), "not the text sent"
    assert not apply_changes([], payloads[0]), "a message the follower does not have"
    assert not apply_changes([message(1, "x")], "not json")
    assert not apply_changes([message(1, "x")], orjson.dumps([{"s": 1}]).decode())


def test_removed_messages_can_only_be_reloaded() -> None:
    assert encode_changes([message(1, "a")], [message(1, "a"), message(2, "b")], 0) is None


def test_changes_past_what_was_sent_can_only_be_reloaded() -> None:
    """A follower registered while the owner did not hold the session in memory: what it
    has is unknown, so the first change asks for a reload rather than guessing."""
    owner = [message(1, "a"), message(2, "b"), message(3, "c")]
    assert encode_changes(owner, [], 2) is None
