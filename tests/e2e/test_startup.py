"""How the server starts and stops, as a person starts it: `python -m writebehind.server`
(what `make run` runs), `uvicorn writebehind.server:app`, several workers, a busy port,
Ctrl-C with a page open. Real processes, real signals."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .server import Server, client, free_port, server_env, sse

ROOT = Path(__file__).resolve().parents[2]
ONE_WORKER = (
    "SQLite allows one store per database file: run one server worker (--workers 1), "
    "or use PostgreSQL (CHAT_SESSION_DB_URL) for several."
)
UVICORN = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}"]


def _run(argv: list[str], env: dict[str, str], give_up_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=give_up_s, cwd=ROOT)


@pytest.mark.parametrize(
    "command",
    [
        [*UVICORN, "writebehind.server:app"],
        [*UVICORN, "--factory", "writebehind.server:create_app"],
    ],
    ids=["app", "factory"],
)
def test_uvicorn_serves_the_documented_import_paths(tmp_path: Path, command: list[str]) -> None:
    server = Server(tmp_path / "chat.db", command=command)
    try:
        alice = client(server, "alice")
        created = alice.post("/api/sessions", json={"title": "via uvicorn"})
        assert created.status_code == 201 and created.headers["content-type"] == "application/json"
        sid = created.json()["id"]
        assert alice.post(f"/api/sessions/{sid}/messages", json={"content": "hi"}).status_code == 202
        assert alice.get("/api/sessions").json()["sessions"][0]["title"] == "via uvicorn"
        assert "text/html" in httpx.get(server.url + "/").headers["content-type"]
    finally:
        server.stop(signal.SIGTERM)
    with __import__("sqlite3").connect(tmp_path / "chat.db") as conn:
        assert conn.execute("SELECT title FROM sessions").fetchall() == [("via uvicorn",)]


def test_the_server_listens_where_CHAT_SERVER_HOST_and_PORT_say(tmp_path: Path) -> None:
    port = free_port()
    server = Server(
        tmp_path / "chat.db",
        port=port,
        extra_env={"CHAT_SERVER_PORT": str(port), "CHAT_SERVER_HOST": "127.0.0.1"},
        command=[sys.executable, "-m", "writebehind.server"],
    )
    try:
        assert client(server).get("/healthz").json()["status"] == "ok"
    finally:
        server.close()


def test_make_run_installs_only_the_server_extra_and_leaves_host_and_port_to_the_environment() -> None:
    plan = _run(["make", "-n", "-B", "run"], env={"PATH": "/usr/bin:/bin"}).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("[server]" in line and "[test]" not in line for line in installs), plan
    run = [line for line in plan.splitlines() if "-m writebehind.server" in line]
    assert run and not re.search(r"--(port|host)\b", run[-1]), plan


def test_make_demo_keeps_to_its_own_file() -> None:
    plan = _run(["make", "-n", "-B", "demo"], env={"PATH": "/usr/bin:/bin"}).stdout
    demo = [line for line in plan.splitlines() if "writebehind.demo" in line]
    assert demo and "CHAT_SESSION_DB_PATH=" in demo[-1] and "chat_sessions.db" not in demo[-1], plan


def test_a_busy_port_fails_with_one_line_and_no_banner(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run(
            [sys.executable, "-m", "writebehind.server", "--port", str(port)],
            env=server_env(tmp_path / "chat.db"),
        )
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0], lines


@pytest.mark.parametrize("port", ["abc", "70000", "-1", "\uff18\uff10", ""])  # fullwidth "80" too
def test_a_bad_port_in_the_environment_is_an_error_naming_it(tmp_path: Path, port: str) -> None:
    done = _run(
        [sys.executable, "-m", "writebehind.server"],
        env={**server_env(tmp_path / "chat.db"), "CHAT_SERVER_PORT": port},
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "CHAT_SERVER_PORT" in done.stderr.splitlines()[-1] and repr(port) in done.stderr


def test_encryption_without_its_extra_is_an_error_naming_the_extra(tmp_path: Path) -> None:
    """The key set, `cryptography` missing (hidden from the child): one line at start that
    says what to install, not an ImportError's traceback."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "cryptography.py").write_text("raise ImportError('hidden by the test', name='cryptography')\n")
    env = {**server_env(tmp_path / "chat.db"), "CHAT_SESSION_ENCRYPTION_KEY": "A" * 43 + "=",
           "PYTHONPATH": str(blocker)}  # fmt: skip
    done = _run([sys.executable, "-m", "writebehind.server", "--port", "0"], env=env)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "writebehind[encryption]" in (done.stdout + done.stderr)


def test_quiet_logs_at_most_one_line_a_request_and_a_clean_stop(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", delay_ms=0)
    try:
        started = server.output()
        alice = client(server, "alice")
        sid = alice.post("/api/sessions", json={}).json()["id"]
        alice.post(f"/api/sessions/{sid}/messages", json={"content": "hello"})
        requests = 2
        for _ in range(5):
            alice.get(f"/api/sessions/{sid}")
            alice.get("/api/sessions")
            requests += 2
        alice.get("/api/sessions/missing")
        requests += 1
    finally:
        out = server.stop(signal.SIGTERM)
    # Start: the banner only (where, which file, how to sign in), nothing of uvicorn's.
    assert "uvicorn" not in started.lower() and "INFO" not in started, started
    assert "writebehind chat on" in started
    during = out[len(started) :].splitlines()
    # the /healthz polls of the harness, and every request above, at most one line each
    assert len([line for line in during if line.strip()]) <= requests + 2, during
    assert not any('HTTP/1.1"' in line for line in during), during
    assert "store closed: flushed" in out


def test_ctrl_c_with_a_page_open_stops_clean(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", delay_ms=0)
    alice = client(server, "alice")
    sid = alice.post("/api/sessions", json={}).json()["id"]
    alice.post(f"/api/sessions/{sid}/messages", json={"content": "still here"})
    got: list[str] = []
    following = threading.Event()

    def follow() -> None:
        try:
            for e in sse(alice, sid):
                got.append(e["event"])
                following.set()
        except httpx.HTTPError as exc:
            got.append(f"broken: {exc!r}")
        got.append("ended")

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert following.wait(30)
    out = server.stop(signal.SIGINT)
    reader.join(30)
    assert server.proc.returncode == 0, out
    assert "store closed: flushed" in out
    assert not re.search(r"ERROR|Traceback|Exception", out), out
    assert got[-1] == "ended" and not any(g.startswith("broken") for g in got), got


def test_several_workers_on_sqlite_are_refused_before_serving(tmp_path: Path) -> None:
    port = free_port()
    done = _run(
        [sys.executable, "-m", "writebehind.server", "--port", str(port), "--workers", "2"],
        env=server_env(tmp_path / "chat.db"),
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0 and ONE_WORKER in out, out
    assert "writebehind chat on" not in out
    assert not (tmp_path / "chat.db").exists()  # refused before anything opened the store


def _refused_without_answering(argv: list[str], env: dict[str, str], port: int) -> str:
    """Run `argv` until it exits; meanwhile nothing on `port` may ever answer a request."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answered = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            answered.append(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code)
        except httpx.TransportError:
            time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    assert proc.returncode is not None and not answered, (answered, out)
    return out


def test_uvicorn_with_several_workers_on_sqlite_refuses_instead_of_serving_half(tmp_path: Path) -> None:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in UVICORN] + ["--workers", "2", "writebehind.server:app"]
    out = _refused_without_answering(argv, server_env(tmp_path / "chat.db"), port)
    assert ONE_WORKER in out, out


def test_a_second_server_on_the_same_sqlite_file_refuses(tmp_path: Path) -> None:
    first = Server(tmp_path / "chat.db")
    try:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in UVICORN] + ["writebehind.server:app"]
        out = _refused_without_answering(argv, server_env(tmp_path / "chat.db"), port)
        assert ONE_WORKER in out, out
        assert client(first).get("/healthz").status_code == 200  # the first one goes on
    finally:
        first.close()
