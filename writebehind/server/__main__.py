"""`python -m writebehind.server [--host H] [--port P]`: the chat server on uvicorn.

Without CHAT_DEMO_TOKENS it signs in one demo user (token `demo-token`, user 1) and
says so. uvicorn turns SIGTERM and SIGINT into the app's shutdown, whose lifespan
closes the store: everything dirty is flushed before the process exits.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from . import create_app
from .app import ServerSettings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m writebehind.server")
    parser.add_argument("--host", default=os.environ.get("CHAT_SERVER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("CHAT_SERVER_PORT", "8000")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    os.environ.setdefault("CHAT_DEMO_TOKENS", "demo-token:1")
    settings = ServerSettings.from_env()
    db = os.environ.get("CHAT_SESSION_DB_URL") or os.environ.get("CHAT_SESSION_DB_PATH", "./chat_sessions.db")
    print(f"writebehind chat on http://{args.host}:{args.port}/  (sessions in {db})", flush=True)
    for token, user in settings.tokens.items():
        print(f"  sign in with the demo token {token!r} (user {user!r}), or chat anonymously", flush=True)
    uvicorn.run(create_app(settings=settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
