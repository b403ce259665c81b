"""The chat server on several workers over one PostgreSQL database, with no sticky routing.

Each worker is a server process of its own on its own port, so that a test can send every
request to a worker it picks at random (uvicorn's `--workers` shares one port and lets the
kernel pick; `test_uvicorn_workers_share_one_port` runs that too). What they share is the
database: each session has one owner at a time, others read it with every acknowledged write
in it and follow its replies live (DESIGN.md, "Several processes").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.pg import DSN, new_schema

from .server import Server, client, events
from .test_branch_api import Follower, shown_after

pytestmark = pytest.mark.timeout(240)

# Messages each of the 8 clients posts (half of them into a session all its user's clients share).
ROUNDS = 25
TEXTS = ["héllo 👋🏽", "你好 世界", "שלום עולם", "e\u0301 combining", "plain"]


async def _disk(schema: str) -> dict[str, list[tuple[int, str, str]]]:
    conn = await asyncpg.connect(DSN)
    try:
        rows = await conn.fetch(f"SELECT session_id, seq, role, content FROM {schema}.messages ORDER BY 1, 2")
    finally:
        await conn.close()
    disk: dict[str, list[tuple[int, str, str]]] = {}
    for row in rows:
        disk.setdefault(row["session_id"], []).append((row["seq"], row["role"], row["content"]))
    return disk


async def _drop(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def _reachable() -> None:
    try:
        asyncio.run(_drop("wb_test_probe"))
    except (OSError, asyncpg.PostgresError) as exc:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL at {DSN}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")


@contextlib.contextmanager
def _workers(tmp_path: Path, count: int, delay_ms: int) -> Iterator[tuple[list[Server], str]]:
    """`count` server processes on one PostgreSQL schema, each on its own port."""
    _reachable()
    schema = new_schema()
    env = {
        "CHAT_SESSION_DB_URL": DSN,
        "CHAT_SESSION_DB_SCHEMA": schema,
        "CHAT_SESSION_FLUSH_INTERVAL_MS": "200",
    }
    servers: list[Server] = []
    try:
        for i in range(count):
            servers.append(Server(tmp_path / f"unused{i}.db", delay_ms=delay_ms, extra_env=env))
        yield servers, schema
    finally:
        for server in servers:
            server.close()
        asyncio.run(_drop(schema))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[list[Server], str]]:
    with _workers(tmp_path, 4, delay_ms=5) as both:
        yield both


def _wait_replies(servers: list[Server], who: str, sids: list[str]) -> None:
    """Until every reply of these sessions is done (asked of any worker)."""
    deadline = time.monotonic() + 60
    for sid in sids:
        while True:
            with client(random.choice(servers), who) as c:
                body = c.get(f"/api/sessions/{sid}").json()
            if all(m["done"] for m in body["messages"]):
                break
            assert time.monotonic() < deadline, f"replies of {sid} never ended"
            time.sleep(0.05)


def test_random_routing_keeps_every_acknowledged_message_once_in_order(
    workers: tuple[list[Server], str],
) -> None:
    servers, schema = workers
    rng = random.Random(7)
    shared = {who: _create(rng.choice(servers), who) for who in ("alice", "bob")}
    sent: dict[str, list[str]] = {sid: [] for sid in shared.values()}
    own: dict[int, str] = {}
    lock = threading.Lock()

    def one_client(n: int) -> None:
        who = "alice" if n % 2 else "bob"
        local = random.Random(n)
        mine = _create(local.choice(servers), who)
        with lock:
            own[n] = mine
        for i in range(ROUNDS):
            sid = shared[who] if i % 2 else mine
            text = f"{local.choice(TEXTS)} #{n}.{i}"
            with client(local.choice(servers), who) as c:
                r = c.post(f"/api/sessions/{sid}/messages", json={"content": text}, timeout=60)
                assert r.status_code == 202, r.text
                with lock:
                    sent.setdefault(sid, []).append(text)
            # Read-your-writes on another worker, right after the 202.
            with client(local.choice(servers), who) as c:
                body = c.get(f"/api/sessions/{sid}", timeout=60).json()
                assert text in [m["content"] for m in body["messages"] if m["role"] == "user"]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one_client, range(8)))
    for who, sid in shared.items():
        _wait_replies(servers, who, [sid])
    for n in range(8):
        _wait_replies(servers, "alice" if n % 2 else "bob", [own[n]])
    for server in servers:
        server.close()

    disk = asyncio.run(_disk(schema))
    total = 0
    for sid, texts in sent.items():
        rows = disk[sid]
        assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1)), f"{sid}: gaps"
        users = [content for _, role, content in rows if role == "user"]
        assert sorted(users) == sorted(texts), f"{sid}: lost or doubled messages"
        assert len(set(users)) == len(users)
        # Every question is followed by its reply, whole.
        for (_, role, _), (_, next_role, reply) in itertools.pairwise(rows):
            if role == "user":
                assert next_role == "assistant" and reply.startswith("You said:")
        total += len(users)
    assert total == 8 * ROUNDS


def _create(server: Server, who: str) -> str:
    with client(server, who) as c:
        r = c.post("/api/sessions", json={})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _post(server: Server, who: str, sid: str, text: str) -> None:
    with client(server, who) as c:
        r = c.post(f"/api/sessions/{sid}/messages", json={"content": text}, timeout=60)
        assert r.status_code == 202, r.text


def test_a_stream_on_another_worker_follows_a_reply_and_resumes_on_a_third(
    workers: tuple[list[Server], str],
) -> None:
    servers, schema = workers
    a, b, c3, _ = servers
    sid = _create(a, "alice")
    _post(a, "alice", sid, "first 👋🏽 你好")  # produced on A, followed from B
    got: list[dict[str, object]] = []
    with client(b, "alice") as c:
        for event in events(c, sid):
            got.append(event)
            if event["seq"] == 2 and event["done"]:
                break
    reply = "".join(str(e["text"]) for e in got if e["seq"] == 2)
    assert reply.startswith("You said:") and "token40" in reply
    assert len([e for e in got if e["seq"] == 2]) > 3, "followed token by token, not in one piece"
    assert not any(e["rewound"] for e in got)

    # A second reply, produced wherever the POST lands; a client reads half of it on B,
    # then resumes on a third worker with its Last-Event-ID.
    _post(c3, "alice", sid, "second שלום")
    first_half: list[dict[str, object]] = []
    with client(b, "alice") as c:
        for event in events(c, sid, last_event_id="2:0d"):
            first_half.append(event)
            if event["seq"] == 4 and len(str(event["text"])) and len(first_half) >= 6:
                break
    last_id = str(first_half[-1]["event_id"])
    rest: list[dict[str, object]] = []
    with client(servers[3], "alice") as c:
        for event in events(c, sid, last_event_id=last_id):
            rest.append(event)
            if event["seq"] == 4 and event["done"]:
                break
    text4 = "".join(str(e["text"]) for e in first_half + rest if e["seq"] == 4)
    assert not any(e["rewound"] for e in rest)
    for server in servers:
        server.close()
    disk = asyncio.run(_disk(schema))[sid]
    assert [seq for seq, _, _ in disk] == [1, 2, 3, 4]
    assert disk[1][2] == reply
    assert disk[3][2] == text4, "no gap, no duplicate across the resume"


def test_a_killed_worker_s_sessions_are_served_by_the_others_within_two_seconds(
    workers: tuple[list[Server], str],
) -> None:
    servers, _ = workers
    a, b, *_ = servers
    cut = _create(a, "bob")
    _post(a, "bob", cut, "a reply that will be cut")
    seen: list[dict[str, object]] = []
    stop_at = threading.Event()

    def follow() -> None:
        with client(b, "bob") as c:
            for event in events(c, cut):
                seen.append(event)
                if event["seq"] == 2 and len(seen) >= 5:
                    stop_at.set()
                if event["seq"] == 2 and event["done"]:
                    return

    follower = threading.Thread(target=follow)
    follower.start()
    assert stop_at.wait(30)
    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    follower.join(30)
    assert not follower.is_alive(), "the stream on B never ended the cut reply"
    took = time.monotonic() - killed
    print(f"the cut reply ended on B {took:.2f} s after the SIGKILL")
    assert took < 2.0, f"served only after {took:.2f} s"
    last = seen[-1]
    assert last["done"] and last["interrupted"]
    # A new message goes through at once on another worker.
    _post(servers[2], "bob", cut, "again")
    _wait_replies(servers[1:], "bob", [cut])
    with client(servers[3], "bob") as c:
        messages = c.get(f"/api/sessions/{cut}").json()["messages"]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4]
    assert messages[1]["interrupted"] and messages[3]["done"] and not messages[3]["interrupted"]


def test_stop_sent_to_another_worker_stops_the_reply_where_it_is_written(tmp_path: Path) -> None:
    with _workers(tmp_path, 2, delay_ms=150) as (servers, schema):
        a, b = servers
        sid = _create(a, "alice")
        _post(a, "alice", sid, "a long answer, please")
        with client(b, "alice") as c:
            for event in events(c, sid):
                if event["seq"] == 2 and "token2" in str(event["text"]):
                    break
            r = c.post(f"/api/sessions/{sid}/stop")
            assert r.status_code == 200, r.text
            stopped = r.json()["stopped"]
            assert [m["seq"] for m in stopped] == [2]
            assert stopped[0]["done"] and stopped[0]["stopped"] and not stopped[0]["interrupted"]
            said = stopped[0]["content"]
            assert said.startswith("You said:") and "token40" not in said
            final = next(e for e in events(c, sid, last_event_id="2:0") if e["seq"] == 2 and e["done"])
            assert final["stopped"] and final["text"] == said
        for server in servers:
            server.close()
        disk = asyncio.run(_disk(schema))[sid]
        assert disk[1][2] == said


def test_the_path_stays_while_a_reply_is_written_on_another_worker(tmp_path: Path) -> None:
    """An edit, a regenerate and a switch sent to B while A writes a reply are refused (409)
    as they are on A; once B has stopped the reply, B regenerates it."""
    with _workers(tmp_path, 2, delay_ms=150) as (servers, _):
        a, b = servers
        sid = _create(a, "alice")
        _post(a, "alice", sid, "first 你好 👋🏽")
        _wait_replies(servers, "alice", [sid])
        _post(a, "alice", sid, "a long answer, please שלום")
        with client(b, "alice") as c:
            for event in events(c, sid, last_event_id="2:0"):
                if event["seq"] == 4 and "token2" in str(event["text"]):
                    break
            refused = {
                "edit": c.post(f"/api/sessions/{sid}/messages", json={"content": "é ✍️", "parent_seq": 2}),
                "regenerate": c.post(f"/api/sessions/{sid}/regenerate"),
                "switch": c.post(f"/api/sessions/{sid}/branch", json={"seq": 2}),
            }
            for name, r in refused.items():
                assert r.status_code == 409, (name, r.text)
                assert "being written" in r.json()["error"]["message"], (name, r.text)
            stopped = c.post(f"/api/sessions/{sid}/stop")
            assert [m["seq"] for m in stopped.json()["stopped"]] == [4], stopped.text
            again = c.post(f"/api/sessions/{sid}/regenerate")
            assert again.status_code == 202, again.text
            assert again.json()["alternatives"] == [4, 5]


def test_uvicorn_workers_share_one_port(tmp_path: Path) -> None:
    """`python -m writebehind.server --workers 4` on PostgreSQL starts, and a burst of
    requests spread by the kernel over the workers loses nothing."""
    _reachable()
    schema = new_schema()
    env = {"CHAT_SESSION_DB_URL": DSN, "CHAT_SESSION_DB_SCHEMA": schema}
    server = Server(
        tmp_path / "unused.db",
        delay_ms=1,
        extra_env=env,
        command=[sys.executable, "-m", "writebehind.server", "--port", "{port}", "--workers", "4"],
    )
    try:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": "Bearer tok-alice"}, timeout=60
        ) as c:
            sid = c.post("/api/sessions", json={}).json()["id"]
            for i in range(20):
                assert c.post(f"/api/sessions/{sid}/messages", json={"content": f"m{i}"}).status_code == 202
                body = c.get(f"/api/sessions/{sid}").json()
                assert f"m{i}" in [m["content"] for m in body["messages"]]
    finally:
        server.close()
    try:
        rows = asyncio.run(_disk(schema))[sid]
        assert [content for _, role, content in rows if role == "user"] == [f"m{i}" for i in range(20)]
    finally:
        asyncio.run(_drop(schema))


def test_a_branch_made_on_one_worker_reaches_a_stream_on_another(workers: tuple[list[Server], str]) -> None:
    """A regenerate and a switch sent to other workers reach a stream followed on B (a
    session another worker keeps, read through its live copy) as `branch` events and the
    new path; any worker then shows the same path and alternatives."""
    servers, _ = workers
    a, b, c3, d = servers
    sid = _create(a, "alice")
    _post(a, "alice", sid, "first 👋🏽 你好")
    _wait_replies(servers, "alice", [sid])
    live = Follower(client(b, "alice"), sid)
    live.wait_for(lambda got: len(got) == 2)
    with client(c3, "alice") as c:
        regenerated = c.post(f"/api/sessions/{sid}/regenerate")
        assert regenerated.status_code == 202, regenerated.text
        assert regenerated.json()["alternatives"] == [2, 3]
    got = live.wait_for(lambda got: any(e["data"].get("seq") == 3 and e["data"]["done"] for e in got[2:]))
    assert got[2]["event"] == "branch" and got[2]["data"] == {"after_seq": 1}
    first = got[0]["data"]["text"]
    assert shown_after(got) == {1: first, 3: got[1]["data"]["text"]}  # the echo says the same again
    with client(d, "alice") as c:
        back = c.post(f"/api/sessions/{sid}/branch", json={"seq": 2})
        assert back.status_code == 200, back.text
    got = live.wait_for(lambda got: len(got) > 2 and got[-1]["data"].get("seq") == 2)
    assert [e["event"] for e in got].count("branch") == 2
    assert shown_after(got) == {1: first, 2: got[1]["data"]["text"]}
    for server in servers:
        with client(server, "alice") as c:
            path = c.get(f"/api/sessions/{sid}").json()["messages"]
        assert [(m["seq"], m["alternatives"]) for m in path] == [(1, [1]), (2, [2, 3])]
