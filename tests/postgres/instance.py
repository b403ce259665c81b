"""A second app instance for the multi-instance tests, in its own process.

    python instance.py DSN SCHEMA

Reads one JSON command a line on stdin, answers one JSON line on stdout:
  ["get", sid, user]            -> {"ok": [contents...]} or {"error": "NotFound"}
  ["append", sid, user, text]   -> {"ok": seq}
  ["flush"]                     -> {"ok": null} or {"error": "ConflictError", "sessions": [...]}
  ["conflicts"]                 -> {"ok": {sid: [contents...]}}
  ["delete_user", user]         -> {"ok": count}
  ["close"]                     -> {"ok": null}, then exits
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson

from writebehind import Config, ConflictError, WriteBehindError, WriteBehindStore


async def main(dsn: str, schema: str) -> None:
    config = Config(db_url=dsn, db_schema=schema, flush_interval_ms=3_600_000)
    store = WriteBehindStore.from_config(config)
    await store.start()
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
                    if sid not in store.hot._sessions:
                        await store.ensure_session(sid, user_id=user)
                    message = await store.append_message(sid, user_id=user, role="user", content=text)
                    reply = {"ok": message.seq}
                case ["flush"]:
                    await store.flush()
                    reply = {"ok": None}
                case ["conflicts"]:
                    lost = store.take_conflicts()
                    reply = {"ok": {sid: [m.content for m in r.messages] for sid, r in lost.items()}}
                case ["delete_user", user]:
                    reply = {"ok": await store.delete_user(user)}
                case ["close"]:
                    await store.aclose()
                    sys.stdout.write(orjson.dumps({"ok": None}).decode() + "\n")
                    sys.stdout.flush()
                    return
                case _:
                    reply = {"error": f"unknown command {command!r}"}
        except ConflictError as exc:
            reply = {"error": "ConflictError", "sessions": exc.session_ids}
        except WriteBehindError as exc:
            reply = {"error": type(exc).__name__, "message": str(exc)}
        sys.stdout.write(orjson.dumps(reply).decode() + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
