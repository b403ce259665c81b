"""`python -m writebehind.demo`: a scripted chat, a shutdown, a restart, and what survived.

One signed-in user and one anonymous user chat; the assistant's replies stream in
token by token (each token an `update_message`, as an SSE handler would do). The
store is closed (the shutdown hook flushes), opened again on the same file, and
the demo prints what came back: the signed-in conversation, whole; the anonymous
one, gone (it was never written).
"""

from __future__ import annotations

import asyncio
import time

from . import Config, NotFound, WriteBehindStore

__all__ = ["main"]

SCRIPT = (
    ("What is write-behind caching?", "Writes land in memory first and reach disk in batches."),
    ("And if the server stops?", "A graceful shutdown flushes everything that is dirty."),
)
USER = 1


async def _stream(store: WriteBehindStore, sid: str, user: int | None, reply: str) -> int:
    message = await store.append_message(sid, user_id=user, role="assistant", content="")
    tokens = reply.split(" ")
    for i, token in enumerate(tokens):
        await store.update_message(sid, message.id, user_id=user, append=token if i == 0 else " " + token)
    return len(tokens)


async def _play(config: Config) -> tuple[str, str]:
    async with WriteBehindStore.from_config(config) as store:
        signed_in = await store.ensure_session(user_id=USER, title="Signed-in demo chat")
        anonymous = await store.ensure_session(user_id=None, title="Anonymous demo chat")
        tokens = 0
        started = time.perf_counter()
        for question, answer in SCRIPT:
            for sid, user in ((signed_in.id, USER), (anonymous.id, None)):
                await store.append_message(sid, user_id=user, role="user", content=question)
                tokens += await _stream(store, sid, user, answer)
        elapsed = time.perf_counter() - started
        stats = store.stats()
        print(f"played {len(SCRIPT)} turns for 2 users: {tokens} streamed tokens in {elapsed * 1000:.1f} ms")
        dirty = f"{stats.dirty_sessions} dirty session(s), {stats.dirty_messages} dirty messages"
        print(f"  before shutdown: {dirty}")
    print(f"shut down: the store flushed to {config.db_path}")
    return signed_in.id, anonymous.id


async def _reopen(config: Config, signed_in: str, anonymous: str) -> None:
    async with WriteBehindStore.from_config(config) as store:
        print("reopened:")
        record = await store.get_session(signed_in, user_id=USER)
        print(f"  signed-in session {record.id} ({record.title!r}): {len(record.messages)} messages")
        for message in record.messages:
            print(f"    #{message.seq} {message.role:9} {message.content}")
        try:
            await store.get_session(anonymous, user_id=None)
            print(f"  anonymous session {anonymous}: still there (unexpected)")
        except NotFound:
            print(f"  anonymous session {anonymous}: gone, it was never written to disk")
        sessions = await store.list_sessions(USER)
        print(f"  user {USER} has {len(sessions)} session(s) on disk (one per run of this demo)")


async def main() -> None:
    config = Config.from_env()
    signed_in, anonymous = await _play(config)
    await _reopen(config, signed_in, anonymous)


if __name__ == "__main__":
    asyncio.run(main())
