"""Every kind of bad token is refused before the websocket is accepted, and with 401 on REST."""

from __future__ import annotations

import base64
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import JWT_SECRET, Client, make_token


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _alg_none_token(sub: str) -> str:
    header = _b64({"alg": "none", "typ": "JWT"})
    payload = _b64({"sub": sub, "exp": int(time.time()) + 3600})
    return f"{header}.{payload}."


def _rs256_token(sub: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, pem, algorithm="RS256")


BAD_TOKENS = {
    "malformed": lambda: "not-a-jwt",
    "garbage_segments": lambda: "a.b.c",
    "expired": lambda: make_token("alice", ttl=-3600),
    "wrong_signature": lambda: make_token("alice", secret="another-secret-" + "x" * 40),
    "alg_none": lambda: _alg_none_token("alice"),
    "other_algorithm": lambda: _rs256_token("alice"),
    "missing_exp": lambda: jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256"),
    "missing_sub": lambda: jwt.encode(
        {"exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256"
    ),
    "numeric_sub": lambda: jwt.encode(
        {"sub": 42, "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256"
    ),
    "huge": lambda: make_token("alice", pad="x" * 4500),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_websocket_refuses_bad_token_before_accept(server, room, kind):
    token = BAD_TOKENS[kind]()
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server, room, token)
    assert refused.value.response.status_code == 403


async def test_websocket_refuses_missing_token(server, room):
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(server, room, None)
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_rest_refuses_bad_token_with_401(server, room, kind):
    token = BAD_TOKENS[kind]()
    r = httpx.get(f"{server.http}/rooms", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert token not in r.text


def test_rest_refuses_missing_and_non_bearer(server, alice):
    assert httpx.get(f"{server.http}/rooms").status_code == 401
    r = httpx.get(f"{server.http}/rooms", headers={"Authorization": f"Basic {alice}"})
    assert r.status_code == 401


async def test_token_from_header_cookie_and_query(server, room, alice):
    headers = {"Authorization": f"Bearer {alice}"}
    async with connect(f"{server.ws}/ws/rooms/{room}", additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
    cookie = {"Cookie": f"session={alice}"}
    async with connect(f"{server.ws}/ws/rooms/{room}", additional_headers=cookie) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
    async with await Client.connect(server, room, alice) as client:
        assert client.ready["type"] == "ready"
    assert httpx.get(f"{server.http}/rooms", cookies={"session": alice}).status_code == 200
    assert httpx.get(f"{server.http}/rooms", params={"token": alice}).status_code == 200


async def test_author_is_the_token_subject_not_the_client_claim(server, room, alice):
    async with await Client.connect(server, room, alice) as client:
        await client.send_json({"type": "send", "body": "hello", "author": "mallory"})
        message = await client.recv_type("message")
        assert message["author"] == "alice"
    r = httpx.post(
        f"{server.http}/rooms/{room}/messages",
        json={"body": "via rest", "author": "mallory"},
        headers={"Authorization": f"Bearer {alice}"},
    )
    assert r.status_code == 201
    assert r.json()["author"] == "alice"


def test_dev_token_works_and_validates_user(server, room):
    r = httpx.post(f"{server.http}/auth/dev-token", json={"user": "carol"})
    assert r.status_code == 200
    token = r.json()["token"]
    r = httpx.get(f"{server.http}/rooms", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    bad = httpx.post(f"{server.http}/auth/dev-token", json={"user": "no spaces allowed"})
    assert bad.status_code == 422


def test_dev_token_is_off_unless_enabled(database_url, tmp_path):
    from tests.support import ServerProcess

    with ServerProcess(
        database_url, log_path=tmp_path / "s.log", env={"CHAT_DEV_AUTH": "false"}
    ) as proc:
        r = httpx.post(f"{proc.http}/auth/dev-token", json={"user": "carol"})
        assert r.status_code == 404


async def test_tokens_in_query_strings_are_redacted_from_the_logs(server, room, alice):
    async with await Client.connect(server, room, alice):
        pass
    httpx.get(f"{server.http}/rooms", params={"token": alice})
    log = server.log_path.read_text()
    assert alice not in log
    assert "token=[redacted]" in log
