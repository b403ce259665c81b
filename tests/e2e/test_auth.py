"""Who signs in, against real uvicorn processes: JWT bearer tokens (HS256 with a secret,
RS256 with a key pair generated here), every token they must refuse (a 401 that says
`invalid_token`, never a 500, never the token echoed or logged), an app's own auth
dependency given to `create_app(auth=...)`, the anonymous cookie's Secure and SameSite
settings, and settings that stop the server at start naming the variable."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from writebehind.server import ServerSettings, create_app

from .server import Server, client, server_env

ISSUER, AUDIENCE = "https://auth.example.test/", "writebehind-chat"
SECRET = secrets.token_urlsafe(48)
REFUSED = 'Bearer error="invalid_token"'
UVICORN_FACTORY = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--factory"]


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "alice@example.test", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256(**overrides: Any) -> str:
    return jwt.encode(_claims(**overrides), SECRET, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hmac_signed(key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token signed with `key`, made by hand: PyJWT refuses to use a PEM public
    key as an HMAC secret, which is exactly the forgery an RS256 server must refuse."""
    head = _b64(orjson.dumps({"alg": "HS256", "typ": "JWT"})) + "." + _b64(orjson.dumps(claims))
    return head + "." + _b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _as(server: Server, token: str) -> httpx.Client:
    # As bytes: a header with non-ASCII in it goes out as UTF-8, as a hostile client sends it.
    header = f"Bearer {token}".encode()
    return httpx.Client(base_url=server.url, headers={"Authorization": header}, timeout=10)


@pytest.fixture(scope="module")
def hs256(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"CHAT_AUTH_JWT_SECRET": SECRET, "CHAT_AUTH_JWT_ISSUER": ISSUER, "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE}
    server = Server(tmp_path_factory.mktemp("hs256") / "chat.db", extra_env=env)
    yield server
    server.close()


RSA_KEY = _rsa()


@pytest.fixture(scope="module")
def rs256(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("rs256")
    (folder / "public.pem").write_text(_public_pem(RSA_KEY))
    env = {
        "CHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(folder / "public.pem"),
        "CHAT_AUTH_JWT_ISSUER": ISSUER,
        "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
    }
    server = Server(folder / "chat.db", extra_env=env)
    yield server
    server.close()


def test_hs256_tokens_sign_users_in_as_their_sub_and_demo_tokens_are_off(hs256: Server) -> None:
    alice, bob = _as(hs256, _hs256()), _as(hs256, _hs256(sub="用户-بوب-1"))
    sid = alice.post("/api/sessions", json={"title": "mine"}).json()["id"]
    assert alice.get(f"/api/sessions/{sid}").status_code == 200
    assert bob.get(f"/api/sessions/{sid}").status_code == 404  # another user's: as if missing
    bobs = bob.post("/api/sessions", json={"title": "bob's"}).json()["id"]
    assert [s["id"] for s in bob.get("/api/sessions").json()["sessions"]] == [bobs]
    # A fresh token for the same `sub` is the same user.
    assert _as(hs256, _hs256(iat=int(time.time()) - 5)).get(f"/api/sessions/{sid}").status_code == 200
    # The demo tokens are off when JWT is on, whatever CHAT_DEMO_TOKENS says.
    demo = client(hs256, "alice").get("/api/sessions")
    assert demo.status_code == 401 and demo.headers["www-authenticate"] == REFUSED
    # No token at all: anonymous, as always.
    assert client(hs256).get("/api/sessions").json()["sessions"] == []


def _refused_tokens() -> dict[str, str]:
    now = int(time.time())
    other_secret = secrets.token_urlsafe(48)
    valid = _hs256()
    head, payload, signature = valid.split(".")
    return {
        "expired": _hs256(iat=now - 7200, exp=now - 3600),  # past the 30 s leeway
        "bad-signature": jwt.encode(_claims(), other_secret, algorithm="HS256"),
        "tampered-payload": head + "." + _b64(orjson.dumps(_claims(sub="mallory"))) + "." + signature,
        "wrong-issuer": _hs256(iss="https://evil.example.test/"),
        "wrong-audience": _hs256(aud="another-app"),
        "alg-none": jwt.encode(_claims(), None, algorithm="none"),
        "alg-none-with-signature": _b64(b'{"alg":"none","typ":"JWT"}') + "." + payload + "." + signature,
        "rs256-to-an-hs256-server": jwt.encode(_claims(), RSA_KEY, algorithm="RS256"),
        "no-exp": _hs256(exp=None),
        "no-sub": _hs256(sub=None),
        "no-iss": _hs256(iss=None),
        "no-aud": _hs256(aud=None),
        "sub-not-a-string": jwt.encode(_claims(sub=42), SECRET, algorithm="HS256"),
        "sub-not-printable": _hs256(sub="alice\nadmin"),
        "sub-too-long": _hs256(sub="x" * 5000),
        "not-yet-valid": _hs256(nbf=now + 3600),
        "one-part": "abc",
        "three-empty-parts": "..",
        "bad-base64": "a.b.c",
        "not-json": _b64(b"not json") + "." + _b64(b"{}") + "." + _b64(b"sig"),
        "header-not-an-object": _b64(b"[1]") + "." + payload + "." + signature,
        "non-ascii": "ü.ü.ü",
        "huge": "A" * 3000 + "." + "B" * 3000 + "." + "C" * 1000,
    }


REFUSED_TOKENS = _refused_tokens()


def test_every_refused_token_is_a_401_saying_invalid_token_never_echoed_nor_logged(
    tmp_path: Path,
) -> None:
    env = {"CHAT_AUTH_JWT_SECRET": SECRET, "CHAT_AUTH_JWT_ISSUER": ISSUER, "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE}
    server = Server(tmp_path / "chat.db", extra_env=env)
    try:
        answers = {}
        for name, token in REFUSED_TOKENS.items():
            answer = _as(server, token).get("/api/sessions")
            assert answer.status_code == 401, (name, answer.text)
            assert answer.headers["www-authenticate"] == REFUSED, name
            body = answer.json()["error"]
            assert body["type"] == "unauthorized" and body["message"].startswith("invalid bearer token: "), (
                name
            )
            assert token not in answer.text, name
            answers[name] = body["message"].removeprefix("invalid bearer token: ")
        # The reason is said, in words that quote nothing of the token.
        assert answers["expired"] == "expired"
        assert answers["bad-signature"] == answers["tampered-payload"] == "bad signature"
        assert answers["wrong-issuer"] == "wrong issuer" and answers["wrong-audience"] == "wrong audience"
        assert answers["alg-none"] == answers["rs256-to-an-hs256-server"] == "not signed with HS256"
        assert answers["no-exp"] == "no 'exp' claim" and answers["no-sub"] == "no 'sub' claim"
        assert answers["sub-not-a-string"] == "its 'sub' is not a string"
        assert answers["sub-too-long"] == answers["sub-not-printable"] == "its 'sub' is not a usable user id"
        assert answers["not-yet-valid"] == "not valid yet"
        # Not a bearer token at all: asked for one, without an error code (RFC 6750 §3.1).
        for header in ("Basic YWxpY2U6cHc=", "Bearer", "Token abc"):
            answer = httpx.get(server.url + "/api/sessions", headers={"Authorization": header})
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", header
        # Refused before anything else is looked at: a body the route would refuse too.
        post = _as(server, REFUSED_TOKENS["expired"]).post("/api/sessions", json={"title": 7})
        assert post.status_code == 401
        assert client(server).get("/healthz").json()["status"] == "ok"  # still up
    finally:
        log = server.close()
    for name, token in REFUSED_TOKENS.items():
        assert token not in log, name
    assert SECRET not in log


def test_rs256_tokens_from_a_key_pair_made_here(rs256: Server) -> None:
    token = jwt.encode(_claims(sub="rsa-user"), RSA_KEY, algorithm="RS256")
    me = _as(rs256, token)
    sid = me.post("/api/sessions", json={}).json()["id"]
    assert me.get(f"/api/sessions/{sid}").status_code == 200
    forged = {
        "another-key": jwt.encode(_claims(sub="rsa-user"), _rsa(), algorithm="RS256"),
        # The public key used as an HMAC secret: the classic algorithm confusion.
        "public-key-as-hmac-secret": _hmac_signed(_public_pem(RSA_KEY).encode(), _claims(sub="rsa-user")),
        "hs256-with-the-servers-pem": _hmac_signed(_public_pem(RSA_KEY).encode().strip(), _claims()),
        "alg-none": jwt.encode(_claims(sub="rsa-user"), None, algorithm="none"),
        "expired": jwt.encode(
            _claims(sub="rsa-user", exp=int(time.time()) - 3600), RSA_KEY, algorithm="RS256"
        ),
        "wrong-audience": jwt.encode(_claims(sub="rsa-user", aud="x"), RSA_KEY, algorithm="RS256"),
    }
    for name, bad in forged.items():
        answer = _as(rs256, bad).get(f"/api/sessions/{sid}")
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == REFUSED, name
    assert (
        _as(rs256, forged["another-key"])
        .get("/api/sessions")
        .json()["error"]["message"]
        .endswith("bad signature")
    )
    assert (
        _as(rs256, forged["public-key-as-hmac-secret"])
        .get("/api/sessions")
        .json()["error"]["message"]
        .endswith("not signed with RS256")
    )


def test_an_apps_own_auth_dependency_through_create_app(tmp_path: Path) -> None:
    server = Server(tmp_path / "chat.db", command=[*UVICORN_FACTORY, "tests.e2e.apps:header_auth_app"])
    try:
        carol = httpx.Client(base_url=server.url, headers={"X-Test-User": "carol"}, timeout=10)
        dave = httpx.Client(base_url=server.url, headers={"X-Test-User": "dave"}, timeout=10)
        sid = carol.post("/api/sessions", json={"title": "carol's"}).json()["id"]
        assert carol.post(f"/api/sessions/{sid}/messages", json={"content": "hi"}).status_code == 202
        assert [s["id"] for s in carol.get("/api/sessions").json()["sessions"]] == [sid]
        assert dave.get(f"/api/sessions/{sid}").status_code == 404
        assert carol.get("/api/me/export").status_code == 200  # a signed-in user, for every route
        # Its refusal, with its own header, in the server's one error shape.
        nobody = httpx.get(server.url + "/api/sessions", headers={"X-Test-User": "nobody"})
        assert nobody.status_code == 401 and nobody.headers["www-authenticate"] == 'Bearer realm="test"'
        assert nobody.json() == {"error": {"type": "http", "message": "no such user here"}}
        # The demo tokens are not this app's: a bearer token means nothing to it.
        assert client(server, "alice").get(f"/api/sessions/{sid}").status_code == 404
        # No user: anonymous, bound to the cookie; the app's session is not theirs.
        anon = client(server)
        created = anon.post("/api/sessions", json={})
        assert created.status_code == 201 and "wb_anon" in created.cookies
        assert anon.get(f"/api/sessions/{sid}").status_code == 404
        # Signing in claims the anonymous chat, as with the built-in auth.
        carol.cookies.set("wb_anon", created.cookies["wb_anon"])
        assert carol.post(f"/api/sessions/{created.json()['id']}/claim").status_code == 200
    finally:
        server.close()


def test_the_anonymous_cookie_is_httponly_and_secure_and_samesite_as_set(tmp_path: Path) -> None:
    plain = Server(tmp_path / "a.db")
    try:
        cookie = client(plain).post("/api/sessions", json={}).headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "secure" not in cookie
    finally:
        plain.close()
    secure = Server(tmp_path / "b.db", extra_env={"CHAT_COOKIE_SECURE": "1", "CHAT_COOKIE_SAMESITE": "Lax"})
    try:
        cookie = client(secure).post("/api/sessions", json={}).headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "; secure" in cookie
    finally:
        secure.close()


BAD_SETTINGS = [
    (
        {
            "CHAT_AUTH_JWT_SECRET": "too-short",
            "CHAT_AUTH_JWT_ISSUER": ISSUER,
            "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
        },
        "CHAT_AUTH_JWT_SECRET",
    ),
    ({"CHAT_AUTH_JWT_SECRET": SECRET, "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE}, "CHAT_AUTH_JWT_ISSUER"),
    ({"CHAT_AUTH_JWT_SECRET": SECRET, "CHAT_AUTH_JWT_ISSUER": ISSUER}, "CHAT_AUTH_JWT_AUDIENCE"),
    ({"CHAT_AUTH_JWT_ISSUER": ISSUER, "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE}, "CHAT_AUTH_JWT_ISSUER"),
    (
        {"CHAT_AUTH_JWT_SECRET": SECRET, "CHAT_AUTH_JWT_PUBLIC_KEY": _public_pem(RSA_KEY)},
        "CHAT_AUTH_JWT_SECRET and CHAT_AUTH_JWT_PUBLIC_KEY",
    ),
    (
        {
            "CHAT_AUTH_JWT_PUBLIC_KEY": "not a key",
            "CHAT_AUTH_JWT_ISSUER": ISSUER,
            "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
        },
        "CHAT_AUTH_JWT_PUBLIC_KEY",
    ),
    (
        {
            "CHAT_AUTH_JWT_PUBLIC_KEY_FILE": "/no/such/key.pem",
            "CHAT_AUTH_JWT_ISSUER": ISSUER,
            "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
        },
        "CHAT_AUTH_JWT_PUBLIC_KEY_FILE",
    ),
    (
        {
            "CHAT_AUTH_JWT_SECRET": SECRET,
            "CHAT_AUTH_JWT_ISSUER": ISSUER,
            "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
            "CHAT_AUTH_JWT_LEEWAY_SECONDS": "-1",
        },
        "CHAT_AUTH_JWT_LEEWAY_SECONDS",
    ),
    ({"CHAT_COOKIE_SECURE": "maybe"}, "CHAT_COOKIE_SECURE"),
    ({"CHAT_SERVER_SECURE_COOKIES": "ture"}, "CHAT_SERVER_SECURE_COOKIES"),
    ({"CHAT_COOKIE_SAMESITE": "sometimes"}, "CHAT_COOKIE_SAMESITE"),
    ({"CHAT_COOKIE_SAMESITE": "none"}, "CHAT_COOKIE_SAMESITE"),
    ({"CHAT_SERVER_PERSIST": "yes please"}, "CHAT_SERVER_PERSIST"),
    ({"CHAT_SERVER_PING_SECONDS": "nan"}, "CHAT_SERVER_PING_SECONDS"),
    ({"CHAT_MODEL_NAME": "llama3"}, "CHAT_MODEL_BASE_URL"),
    ({"CHAT_MODEL_BASE_URL": "ftp://models.example.test/v1", "CHAT_MODEL_NAME": "m"}, "CHAT_MODEL_BASE_URL"),
    ({"CHAT_MODEL_BASE_URL": "http://127.0.0.1:11434/v1"}, "CHAT_MODEL_NAME"),
    (
        {"CHAT_MODEL_BASE_URL": "http://h/v1", "CHAT_MODEL_NAME": "m", "CHAT_MODEL_TIMEOUT_SECONDS": "0"},
        "CHAT_MODEL_TIMEOUT_SECONDS",
    ),
    (
        {"CHAT_MODEL_BASE_URL": "http://h/v1", "CHAT_MODEL_NAME": "m", "CHAT_MODEL_MAX_HISTORY": "lots"},
        "CHAT_MODEL_MAX_HISTORY",
    ),
]


@pytest.mark.parametrize(("env", "named"), BAD_SETTINGS)
def test_a_bad_setting_fails_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ServerSettings.from_env(env)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (_public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "1024 bits"),
        (_public_pem(ec.generate_private_key(ec.SECP256R1())), "RSA public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
    ],
    ids=["rsa-1024", "ec-key", "garbage-pem"],
)
def test_a_public_key_rs256_cannot_use_stops_the_app_at_creation(key: str, why: str) -> None:
    settings = ServerSettings.from_env(
        {"CHAT_AUTH_JWT_PUBLIC_KEY": key, "CHAT_AUTH_JWT_ISSUER": ISSUER, "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE}
    )
    with pytest.raises(ValueError, match=f"CHAT_AUTH_JWT_PUBLIC_KEY: .*{why}"):
        create_app(settings=settings)


def test_the_server_refuses_to_start_with_a_short_secret_and_does_not_print_it(tmp_path: Path) -> None:
    short = "s3cr3t-but-short"
    jwt_env = {
        "CHAT_AUTH_JWT_SECRET": short,
        "CHAT_AUTH_JWT_ISSUER": ISSUER,
        "CHAT_AUTH_JWT_AUDIENCE": AUDIENCE,
    }
    env = server_env(tmp_path / "chat.db", extra_env=jwt_env)
    run = subprocess.run(
        [sys.executable, "-m", "writebehind.server", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0
    assert "CHAT_AUTH_JWT_SECRET: must be at least 32 bytes" in run.stderr
    assert short not in run.stdout + run.stderr
