"""Token expiry on a live websocket, against a real server: the socket is closed with 4401 at
its token's ``exp``, unless an ``auth`` frame with a fresh token of the same user moved the
deadline (``auth_ok``); refused renewals change nothing, and ``auth`` frames are rate-limited
before their token is checked.

Deadlines are whole seconds (``exp``) two to three seconds ahead: the tests wait them out,
since the timer is what is under test, and check the close against ``exp`` on both sides
(not before, not long after)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed

from tests.support import Client, make_token

EARLY = 0.05
"""How much earlier than ``exp`` a close may be seen: the server's timer and the test share
one clock, so only rounding."""
LATE = 1.5
"""How long after ``exp`` the close must have arrived, on a busy test machine."""


def deadline(ahead: int = 2) -> int:
    """An ``exp`` ``ahead`` to ``ahead + 1`` seconds from now (``exp`` is whole seconds)."""
    return math.ceil(time.time()) + ahead


async def close_of(client: Client, timeout: float = 10.0) -> tuple[float, int, str]:
    """Read until the server closes the socket: when (``time.time()``), the code and reason."""
    try:
        while True:
            await client.recv(timeout)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the connection dropped without a close frame"
        return time.time(), closed.rcvd.code, closed.rcvd.reason


def assert_closed_at_exp(seen: tuple[float, int, str], exp: float) -> None:
    at, code, reason = seen
    assert code == 4401, (code, reason)
    assert reason == "token expired; reconnect with a fresh token"
    assert exp - EARLY <= at <= exp + LATE, f"closed {at - exp:+.3f}s from exp"


async def auth(client: Client, token: str) -> dict[str, Any]:
    """Send an ``auth`` frame; its answer (``auth_ok`` or ``error``)."""
    await client.send_json({"type": "auth", "token": token})
    while True:
        frame = await client.recv()
        if frame["type"] in ("auth_ok", "error"):
            return frame


async def acked(client: Client, body: str) -> dict[str, Any]:
    await client.send(body, client_msg_id=f"m-{time.monotonic_ns()}")
    return await client.recv_type("ack")


def rs256_token(sub: str, exp: int) -> str:
    """Signed with an RSA key the server does not know (it has only the HS256 secret)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return jwt.encode({"sub": sub, "exp": exp}, pem, algorithm="RS256")


async def test_a_socket_is_closed_with_4401_at_its_tokens_exp(server, room):
    exp = deadline()
    client = await Client.connect(server, room, make_token("alice", exp=exp))
    assert (await acked(client, "before exp"))["seq"] >= 1
    assert_closed_at_exp(await close_of(client), exp)


async def test_a_renewal_moves_the_deadline_and_sends_keep_working(server, room):
    first = deadline()
    client = await Client.connect(server, room, make_token("alice", exp=first))
    second = first + 2
    assert await auth(client, make_token("alice", exp=second)) == {"type": "auth_ok", "exp": second}
    await asyncio.sleep(first + 0.3 - time.time())  # past the first exp: the timer under test
    ack = await acked(client, "after the first exp")
    assert ack["type"] == "ack"
    assert_closed_at_exp(await close_of(client), second)


async def test_refused_renewals_change_nothing(server, room):
    exp = deadline(3)
    client = await Client.connect(server, room, make_token("alice", exp=exp))
    refused = {
        "another user's": make_token("bob", exp=exp + 60),
        "garbage": "not-a-jwt",
        "long expired": make_token("alice", ttl=-3600),
        # Within the 30 s the codec allows for clock skew, but past its exp all the same.
        "just expired": make_token("alice", ttl=-5),
        "wrong signature": make_token("alice", exp=exp + 60, secret="another-secret-" + "x" * 40),
        "wrong key type": rs256_token("alice", exp + 60),
    }
    for why, token in refused.items():
        answer = await auth(client, token)
        assert answer["type"] == "error", (why, answer)
        assert answer["code"] == "auth_refused", (why, answer)
    assert (await auth(client, make_token("bob", exp=exp + 60)))["detail"] == (
        "the token is another user's"
    )
    await client.send_json({"type": "auth"})
    assert (await client.recv_type("error"))["code"] == "invalid_frame"
    await client.send_json({"type": "auth", "token": 42})
    assert (await client.recv_type("error"))["code"] == "invalid_frame"
    assert (await acked(client, "still open"))["type"] == "ack"
    assert_closed_at_exp(await close_of(client), exp)


async def test_a_token_inside_the_skew_leeway_is_closed_right_after_ready(server, room):
    """The handshake tolerates 30 s of clock skew on ``exp``; a live socket does not."""
    started = time.time()
    client = await Client.connect(server, room, make_token("alice", ttl=-5))
    at, code, _ = await close_of(client)
    assert code == 4401
    assert at - started < LATE


async def test_auth_frames_are_rate_limited_before_the_token_is_checked(spawn, database_url, room):
    server = spawn(database_url, CHAT_WS_AUTH_RATE="0.1")  # bursts of 3, then one per 10 s
    exp = deadline()
    client = await Client.connect(server, room, make_token("alice", exp=exp))
    for _ in range(3):
        assert (await auth(client, "not-a-jwt"))["code"] == "auth_refused"
    # A valid renewal over the limit is not even looked at: the socket keeps its deadline.
    limited = await auth(client, make_token("alice", exp=exp + 60))
    assert limited["code"] == "rate_limited", limited
    assert 5 < limited["retry_after"] <= 10
    assert_closed_at_exp(await close_of(client), exp)


@pytest.mark.parametrize("frames", [1, 40])
async def test_a_renewal_answers_in_order_behind_pipelined_sends(server, room, frames):
    """``auth_ok`` comes after the acks of the sends before it, as every answer does."""
    client = await Client.connect(server, room, make_token("alice", exp=deadline(60)))
    for i in range(frames):
        await client.send(f"m{i}", client_msg_id=f"order-{frames}-{i}")
    fresh = deadline(120)
    await client.send_json({"type": "auth", "token": make_token("alice", exp=fresh)})
    answers = []
    while len(answers) < frames + 1:
        frame = await client.recv()
        if frame["type"] != "message":
            answers.append(frame)
    assert [a["type"] for a in answers] == ["ack"] * frames + ["auth_ok"]
    assert answers[-1]["exp"] == fresh
    await client.close()
