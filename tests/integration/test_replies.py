"""Replies, black-box on real servers: a send with ``reply_to`` carries the replied message's
author and the start of its current text; an edit of that message rewrites the quote, its
delete erases it (from the database too); a reply to nothing, or to a deleted message, is
refused and stores nothing."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from tests.support import Client


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(server: Any, room: str, token: str, body: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{server.http}/rooms/{room}/messages", json={"body": body, **extra}, headers=_auth(token)
    )


def shown(server: Any, room: str, token: str, seq: int) -> dict[str, Any]:
    r = httpx.get(f"{server.http}/rooms/{room}/messages", headers=_auth(token))
    assert r.status_code == 200, r.text
    (message,) = [m for m in r.json()["messages"] if m["seq"] == seq]
    return message  # type: ignore[no-any-return]


async def answer(client: Client) -> dict[str, Any]:
    while True:
        frame = await client.recv()
        if frame["type"] in ("ack", "error"):
            return frame


async def test_a_reply_quotes_the_current_text(
    server, second_server, room, alice, bob, database_url
):
    long = "x" * 150
    target = post(server, room, alice, long).json()["seq"]
    async with (
        await Client.connect(second_server, room, bob) as replier,
        await Client.connect(server, room, alice) as watcher,
    ):
        await replier.send_json(
            {"type": "send", "body": "agreed", "reply_to": target, "client_msg_id": "r1"}
        )
        ack = await answer(replier)
        assert ack["type"] == "ack"
        live = await watcher.recv_type("message")
        assert live["reply_to"] == {
            "seq": target,
            "author": "alice",
            "quote": "x" * 100,
            "deleted": False,
        }
    reply = ack["seq"]
    assert shown(server, room, bob, reply)["reply_to"]["quote"] == "x" * 100

    r = httpx.patch(
        f"{server.http}/rooms/{room}/messages/{target}",
        json={"body": "edited text"},
        headers=_auth(alice),
    )
    assert r.status_code == 200
    assert shown(server, room, bob, reply)["reply_to"] == {
        "seq": target,
        "author": "alice",
        "quote": "edited text",
        "deleted": False,
    }
    async with await Client.connect(server, room, bob, since=reply - 1) as resumed:
        assert resumed.history[0]["reply_to"]["quote"] == "edited text"  # the current state

    assert (
        httpx.delete(
            f"{server.http}/rooms/{room}/messages/{target}", headers=_auth(alice)
        ).status_code
        == 200
    )
    assert shown(server, room, bob, reply)["reply_to"] == {
        "seq": target,
        "author": "alice",
        "quote": None,
        "deleted": True,
    }
    conn = await asyncpg.connect(database_url)
    try:
        for text in ("edited text", "x" * 100):
            found = await conn.fetchval(
                "SELECT count(*) FROM message WHERE body = $1 OR reply_quote = $1", text
            )
            assert found == 0, f"{text!r} is still stored"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("reply_to", "code"),
    [(999_999, "not_found"), (True, "invalid_frame"), (0, "invalid_frame"), ("1", "invalid_frame")],
)
async def test_a_reply_to_nothing_is_refused(server, room, alice, reply_to, code):
    post(server, room, alice, "there is one message")
    async with await Client.connect(server, room, alice) as client:
        await client.send_json(
            {"type": "send", "body": "re", "reply_to": reply_to, "client_msg_id": "q"}
        )
        refused = await answer(client)
        assert (refused["type"], refused["code"], refused.get("client_msg_id")) == (
            "error",
            code,
            "q",
        )
        last = client.ready["last_seq"]
    r = httpx.get(f"{server.http}/rooms/{room}/messages", headers=_auth(alice))
    assert r.json()["last_seq"] == last  # nothing stored


def test_rest_replies(server, room, alice, bob):
    target = post(server, room, alice, "question?").json()["seq"]
    made = post(server, room, bob, "answer", reply_to=target)
    assert made.status_code == 201
    assert made.json()["reply_to"]["quote"] == "question?"
    missing = post(server, room, bob, "answer", reply_to=target + 50)
    assert missing.status_code == 422 and "reply_to" in missing.text
    assert (
        httpx.delete(
            f"{server.http}/rooms/{room}/messages/{target}", headers=_auth(alice)
        ).status_code
        == 200
    )
    late = post(server, room, bob, "too late", reply_to=target)
    assert (late.status_code, late.json()["code"]) == (409, "already_deleted")
