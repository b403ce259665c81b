"""The OpenAPI document is what the server does: its error shape, its status codes, the
event stream's media type, the bearer scheme, the Last-Event-ID header and the limits;
then schemathesis, against a real uvicorn, finds nothing it says and the server does not
do (a fixed number of examples each run, each run bounded)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .server import Server, client

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # The default body limit (64 KiB): the test servers' 4 KiB is below what a valid body
    # can be (a 500-character title, each character escaped as a surrogate pair), and a
    # valid request refused with 413 is one schemathesis rightly reports.
    s = Server(tmp_path / "chat.db", delay_ms=0, extra_env={"CHAT_SERVER_MAX_BODY_BYTES": str(64 * 1024)})
    yield s
    s.close()


def test_the_openapi_document_says_what_the_server_does(server: Server) -> None:
    doc: dict[str, Any] = httpx.get(server.url + "/api/openapi.json").json()
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert "HTTPValidationError" not in str(doc)  # FastAPI's {"detail"} shape is never answered
    paths = doc["paths"]
    for path, operations in paths.items():
        for method, op in operations.items():
            if not path.startswith("/api/"):
                continue
            assert "401" in op["responses"], (method, path)
            assert {"bearer": []} in op["security"], (method, path)
            for status, answer in op["responses"].items():
                if status.startswith("4"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
    body_routes = [
        paths["/api/sessions"]["post"], paths["/api/sessions/{session_id}"]["patch"],
        paths["/api/sessions/{session_id}/messages"]["post"],
        paths["/api/sessions/{session_id}/branch"]["post"],
    ]  # fmt: skip
    for op in body_routes:
        assert {"400", "413", "415", "422"} <= set(op["responses"])
    events = paths["/api/sessions/{session_id}/events"]["get"]
    assert set(events["responses"]["200"]["content"]) == {"text/event-stream"}
    assert {"400", "404"} <= set(events["responses"])
    header = next(p for p in events["parameters"] if p["in"] == "header")
    assert header["name"] == "Last-Event-ID" and header["schema"]["pattern"]
    listing = {p["name"]: p["schema"] for p in paths["/api/sessions"]["get"]["parameters"]}
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 200)
    page = {p["name"]: p["schema"] for p in paths["/api/sessions/{session_id}/messages"]["get"]["parameters"]}
    assert (page["limit"]["minimum"], page["limit"]["maximum"], page["after_seq"]["minimum"]) == (1, 200, 0)
    assert "200" in paths["/api/sessions/{session_id}/stop"]["post"]["responses"]
    assert {"202", "409"} <= set(paths["/api/sessions/{session_id}/regenerate"]["post"]["responses"])
    for route in ("messages", "branch"):  # the path changes only between replies
        assert "409" in paths[f"/api/sessions/{{session_id}}/{route}"]["post"]["responses"]
    message = doc["components"]["schemas"]["MessageOut"]["properties"]
    assert {"done", "interrupted", "stopped", "parent_seq", "alternatives"} <= set(message)
    patch = doc["components"]["schemas"]["SessionPatch"]["properties"]
    assert patch["status"]["pattern"] and patch["title"]["anyOf"][0]["maxLength"] == 500

    alice = client(server, "alice")
    wrong_method = alice.put("/api/sessions/some-id", json={})
    assert wrong_method.status_code == 405
    assert set(wrong_method.headers["allow"].split(", ")) >= {"GET", "PATCH", "DELETE"}
    assert wrong_method.json()["error"]["type"] == "method_not_allowed"
    nobody = client(server).get("/api/sessions", headers={"Authorization": "Bearer nope"})
    assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None,
    reason="schemathesis is not installed (the test extra has it)",
)
@pytest.mark.parametrize(
    "who",
    [
        ["-H", "Authorization: Bearer tok-alice"],
        # An anonymous visitor keeps one cookie, as a browser does.
        ["-H", "Cookie: wb_anon=schemathesis-anonymous-visitor-0001"],
    ],
    ids=["signed-in", "anonymous"],
)
def test_schemathesis_finds_nothing_the_document_does_not_say(server: Server, who: list[str]) -> None:
    # The event stream stays open by design: the stream tests cover it.
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/api/openapi.json",
         "--checks", "all", "--max-examples", "20", "--generation-deterministic", "--workers", "1",
         "--request-timeout", "10", "--exclude-path-regex", "events$", "--no-color", *who],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
