"""`python -m writebehind.server [--host H] [--port P] [--workers N]`: the chat server on uvicorn.

Host and port default to CHAT_SERVER_HOST and CHAT_SERVER_PORT (127.0.0.1:8000). The
port is bound before anything is printed, so a busy port is one line and exit status 1.
Without CHAT_DEMO_TOKENS it signs in one demo user (token `demo-token`, user "demo") and
says so. Logs are quiet: the banner, then warnings and errors, one line each (no access
log; `--access-log` adds one line at most a request). uvicorn turns SIGTERM and SIGINT into the app's
shutdown, whose lifespan ends the open streams and closes the store: everything dirty is
flushed before the process exits.

SQLite allows one server worker: `--workers` above 1 needs PostgreSQL (CHAT_SESSION_DB_URL)
and is refused otherwise, before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
from typing import Any

import uvicorn

from . import create_app
from .application import ONE_WORKER
from .settings import ServerSettings


def _logging(access_log: bool) -> dict[str, Any]:
    """What uvicorn applies in every process it runs (workers included): warnings and
    errors, one line each, plus the server's own few lines (a reply cut by a crash, the
    store closed). With `access_log`, writebehind's access lines too: at most one a request
    (who read or erased which session, who opened which stream); never uvicorn's, which
    would make two."""
    loggers: dict[str, Any] = {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        "writebehind": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "writebehind.server": {"level": "INFO"},
    }
    if access_log:
        loggers["writebehind.access"] = {"level": "INFO"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
        },
        "loggers": loggers,
    }


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound the way uvicorn binds it; exits with one line if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        sys.exit(
            f"error: cannot listen on {host}:{port}: {why} (choose another with --port or CHAT_SERVER_PORT)"
        )
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once the app has started (not before: a
    store that refuses to start says so alone)."""

    def __init__(self, config: uvicorn.Config, banner: list[str]) -> None:
        super().__init__(config)
        self.banner = banner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print("\n".join(self.banner), flush=True)


def _port(value: str) -> int:
    # ASCII digits only: int() reads fullwidth digits too ("\\uff18\\uff10" as 80).
    port = int(value) if value.isascii() and value.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a port number, 0-65535 (--port or CHAT_SERVER_PORT)"
        )
    return port


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m writebehind.server")
    parser.add_argument("--host", default=os.environ.get("CHAT_SERVER_HOST", "127.0.0.1"))
    # A string default goes through `type` too: a bad CHAT_SERVER_PORT is one line, as a bad --port.
    parser.add_argument("--port", type=_port, default=os.environ.get("CHAT_SERVER_PORT", "8000"))
    parser.add_argument(
        "--workers", type=int, default=1, help="several need PostgreSQL (CHAT_SESSION_DB_URL)"
    )
    parser.add_argument("--access-log", action="store_true", help="log who reads and erases what")
    args = parser.parse_args(argv)
    os.environ.setdefault("CHAT_DEMO_TOKENS", "demo-token:demo")
    db_url = os.environ.get("CHAT_SESSION_DB_URL")
    try:
        settings = ServerSettings.from_env()
        if args.workers > 1 and settings.persist and not db_url:
            raise ValueError(ONE_WORKER)
        app = create_app(settings=settings)  # a bad setting fails here, before anything starts
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    sock = _listen(args.host, args.port)
    db = db_url or os.environ.get("CHAT_SESSION_DB_PATH", "./chat_sessions.db")
    banner = [f"writebehind chat on http://{args.host}:{args.port}/  (sessions in {db})"]
    banner += [
        f"  sign in with the demo token {t!r} (user {u!r}), or chat anonymously"
        for t, u in settings.tokens.items()
    ]
    options: dict[str, Any] = {
        "log_config": _logging(args.access_log),
        "access_log": False,
        "timeout_graceful_shutdown": 30,
    }
    if args.workers > 1:
        # uvicorn's supervisor: each worker makes the app from the environment.
        sock.close()
        print("\n".join(banner), flush=True)
        uvicorn.run("writebehind.server:app", host=args.host, port=args.port, workers=args.workers, **options)
        return
    server = _Server(uvicorn.Config(app, **options), banner)
    # uvicorn raises the SIGINT it handled again once it has shut down: Ctrl-C's end.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(3)  # the app refused to start and said why (uvicorn's code for it)


if __name__ == "__main__":
    main()
