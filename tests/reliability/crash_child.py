"""A chat server stand-in for the crash tests, run as its own process.

    python crash_child.py DB_PATH

Streams messages for many signed-in users into a WriteBehindStore on DB_PATH and
reports on stdout, one line each:
  ACK <session> <seq>          the write was acknowledged (in memory)
  FLUSHED <json {sid: seq}>    a flush() returned: everything up to these seqs is on disk
  CLOSED                       SIGTERM was handled: the store closed gracefully
It stops by itself after a bounded time; the parent usually kills it first.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from writebehind import Config, WriteBehindStore

USERS = 20
TOKENS = 5


def content(sid: str, seq: int) -> str:
    return f"{sid} message {seq} " + "p" * 200


async def main(db_path: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    store = WriteBehindStore.from_config(Config(db_path=db_path, flush_interval_ms=50))
    await store.start()
    acked: dict[str, int] = {}
    deadline = time.monotonic() + 60
    out = sys.stdout
    try:
        for user in range(USERS):
            await store.ensure_session(f"u{user}", user_id=user)
        n = 0
        while not stop.is_set() and time.monotonic() < deadline:
            for user in range(USERS):
                sid = f"u{user}"
                seq = acked.get(sid, 0) + 1
                text = content(sid, seq)
                # streamed: the message grows token by token, as an SSE reply would
                step = len(text) // TOKENS + 1
                message = await store.append_message(sid, user_id=user, role="assistant", content="")
                for i in range(0, len(text), step):
                    await store.update_message(sid, message.id, user_id=user, append=text[i : i + step])
                assert message.seq == seq
                acked[sid] = seq
                out.write(f"ACK {sid} {seq}\n")
            n += 1
            if n % 5 == 0:
                covered = dict(acked)
                await store.flush()
                out.write(f"FLUSHED {json.dumps(covered)}\n")
            out.flush()
            await asyncio.sleep(0)
    finally:
        if stop.is_set():
            await store.aclose()
            out.write("CLOSED\n")
            out.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
