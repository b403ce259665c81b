"""An app instance for the multi-instance tests, in its own process.

    python instance.py DSN SCHEMA [HANDOFF_TIMEOUT_S]

Reads one JSON command a line on stdin, answers one JSON line on stdout (`{"ok": ...}`, or
`{"error": "<class>", "message": ...}` for a WriteBehindError):
  ["get", sid, user]              -> the session's message contents
  ["append", sid, user, text]     -> the new message's seq (the session is created if new)
  ["append_bg", sid, user, text]  -> starts that append in the background; ["bg"] waits for
                                     its answer, ["bg_done"] says whether it has one
  ["hold", sid, user]             -> enters store.hold(sid), appends an empty assistant
                                     message under it: its id (a reply being produced)
  ["token", sid, user, mid, text] -> appends text to that message
  ["end_hold", sid]               -> leaves the hold
  ["owns", sid]                   -> is the session in this instance's hot tier
  ["pending", sid]                -> handoff requests waiting here for the session's hold
  ["ownership"]                   -> this instance's ownership stats (OwnershipStats)
  ["fill", n, user, tail]         -> n new sessions of one message each, flushed, then (tail
                                     true) one more message each, not flushed: their ids
  ["flush"], ["stats"], ["disk", sid], ["delete_user", user]
  ["close"]                       -> aclose(), then exits
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from typing import Any

import orjson

from writebehind import Config, SessionStore, WriteBehindError, WriteBehindStore
from writebehind.backends.pg_ownership import PostgresOwnership
from writebehind.backends.postgres import PostgresBackend


def failure(exc: WriteBehindError) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": str(exc)}


async def main(dsn: str, schema: str, handoff_timeout_s: float) -> None:
    config = Config(db_url=dsn, db_schema=schema, flush_interval_ms=3_600_000)
    backend = PostgresBackend(dsn, schema=schema, handoff_timeout_s=handoff_timeout_s)
    store = WriteBehindStore(SessionStore(config.cache_size), backend, config=config)
    await store.start()
    ownership = store._ownership
    assert isinstance(ownership, PostgresOwnership)
    holds: dict[str, contextlib.AsyncExitStack] = {}
    background: asyncio.Task[dict[str, Any]] | None = None

    async def append(sid: str, user: Any, text: str) -> dict[str, Any]:
        try:
            if sid not in store.hot.tier:
                await store.ensure_session(sid, user_id=user)
            message = await store.append_message(sid, user_id=user, role="user", content=text)
        except WriteBehindError as exc:
            return failure(exc)
        return {"ok": message.seq}

    async def fill(n: int, user: Any, tail: bool) -> list[str]:
        ids: list[str] = []
        for start in range(0, n, 100):
            records = await asyncio.gather(
                *(store.ensure_session(user_id=user) for _ in range(start, min(n, start + 100)))
            )
            for record in records:
                await store.append_message(record.id, user_id=user, role="user", content="x")
                ids.append(record.id)
        await store.flush()
        if tail:
            for sid in ids:
                await store.append_message(sid, user_id=user, role="assistant", content="y")
        return ids

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = orjson.loads(line)
        reply: dict[str, Any]
        try:
            match command:
                case ["get", sid, user]:
                    record = await store.get_session(sid, user_id=user)
                    reply = {"ok": [m.content for m in record.messages]}
                case ["append", sid, user, text]:
                    reply = await append(sid, user, text)
                case ["append_bg", sid, user, text]:
                    background = asyncio.create_task(append(sid, user, text))
                    reply = {"ok": "started"}
                case ["bg"]:
                    assert background is not None
                    reply = await background
                case ["bg_done"]:
                    reply = {"ok": background is not None and background.done()}
                case ["hold", sid, user]:
                    stack = holds[sid] = contextlib.AsyncExitStack()
                    await stack.enter_async_context(store.hold(sid))
                    message = await store.append_message(sid, user_id=user, role="assistant", content="")
                    reply = {"ok": message.id}
                case ["token", sid, user, mid, text]:
                    message = await store.update_message(sid, mid, user_id=user, append=text)
                    reply = {"ok": message.seq}
                case ["end_hold", sid]:
                    await holds.pop(sid).aclose()
                    reply = {"ok": None}
                case ["owns", sid]:
                    reply = {"ok": sid in store.hot.tier}
                case ["pending", sid]:
                    reply = {"ok": ownership.pending_handoffs(sid)}
                case ["ownership"]:
                    reply = {"ok": dataclasses.asdict(ownership.stats())}
                case ["fill", n, user, *tail]:
                    reply = {"ok": await fill(n, user, bool(tail and tail[0]))}
                case ["flush"]:
                    await store.flush()
                    reply = {"ok": None}
                case ["stats"]:
                    reply = {"ok": {"conflicts": store.stats().conflicts}}
                case ["disk", sid]:
                    stored = await store.backend.load_session(sid)
                    reply = {"ok": None if stored is None else [m.content for m in stored.messages]}
                case ["delete_user", user]:
                    reply = {"ok": await store.delete_user(user)}
                case ["close"]:
                    await store.aclose()
                    sys.stdout.write(orjson.dumps({"ok": None}).decode() + "\n")
                    sys.stdout.flush()
                    return
                case _:
                    reply = {"error": f"unknown command {command!r}"}
        except WriteBehindError as exc:
            reply = failure(exc)
        sys.stdout.write(orjson.dumps(reply).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 5.0))
