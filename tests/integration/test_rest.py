"""REST: posting (shared with the websocket), room listing, validation and the OpenAPI docs."""

from __future__ import annotations

import httpx
import pytest

from tests.support import Client, make_token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_post_stores_fans_out_and_is_idempotent(server, second_server, room, alice, bob):
    async with await Client.connect(second_server, room, bob) as listener:
        r = httpx.post(
            f"{server.http}/rooms/{room}/messages",
            json={"body": "from rest", "client_msg_id": "r-1"},
            headers=_auth(alice),
        )
        assert r.status_code == 201
        created = r.json()
        assert (created["seq"], created["author"], created["body"]) == (1, "alice", "from rest")
        assert "idempotent-replayed" not in r.headers
        message = await listener.recv_type("message")
        assert message == {"type": "message", **created}

        again = httpx.post(
            f"{server.http}/rooms/{room}/messages",
            json={"body": "from rest", "client_msg_id": "r-1"},
            headers=_auth(alice),
        )
        assert again.status_code == 201
        assert again.json() == created
        assert again.headers["idempotent-replayed"] == "true"
        await listener.assert_silent(0.3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"body": ""}, "empty_body"),
        ({"body": "x" * 4001}, "body_too_long"),
        ({"body": "a\u0000b"}, "invalid_body"),
        ({"body": "ok", "client_msg_id": "x" * 129}, "invalid_client_msg_id"),
        ({"body": 12}, "body"),
        ({}, "body"),
    ],
)
def test_post_refuses_bad_messages_with_422(server, room, alice, payload, reason):
    r = httpx.post(f"{server.http}/rooms/{room}/messages", json=payload, headers=_auth(alice))
    assert r.status_code == 422
    assert reason in r.text


def test_post_refuses_non_json(server, room, alice):
    r = httpx.post(
        f"{server.http}/rooms/{room}/messages",
        content=b"\xff\xfe not json",
        headers={**_auth(alice), "Content-Type": "application/json"},
    )
    assert r.status_code in (400, 422)
    assert r.json()["detail"]


def test_rooms_are_listed_with_their_last_seq_and_paginated(server, alice):
    prefix = f"list-{make_token('x')[-8:].replace('-', '_').replace('.', '_')}"
    names = [f"{prefix}-{i}" for i in range(3)]
    for i, name in enumerate(names):
        for n in range(i + 1):
            r = httpx.post(
                f"{server.http}/rooms/{name}/messages", json={"body": f"{n}"}, headers=_auth(alice)
            )
            assert r.status_code == 201
    listed: dict[str, int] = {}
    after = f"{prefix}-"
    while after is not None:
        r = httpx.get(
            f"{server.http}/rooms", params={"limit": 2, "after": after}, headers=_auth(alice)
        )
        assert r.status_code == 200
        body = r.json()
        assert len(body["rooms"]) <= 2
        listed.update({room["name"]: room["last_seq"] for room in body["rooms"]})
        after = body["next_after"]
    assert {k: v for k, v in listed.items() if k.startswith(prefix)} == {
        names[0]: 1,
        names[1]: 2,
        names[2]: 3,
    }


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"after": "bad name!"}])
def test_rooms_listing_refuses_bad_parameters(server, alice, params):
    r = httpx.get(f"{server.http}/rooms", params=params, headers=_auth(alice))
    assert r.status_code == 422


def test_openapi_documents_the_rest_api(server):
    spec = httpx.get(f"{server.http}/openapi.json").json()
    assert {"/rooms", "/rooms/{room}/messages", "/auth/dev-token"} <= set(spec["paths"])
    assert httpx.get(f"{server.http}/docs").status_code == 200


def test_demo_page_is_served(server):
    r = httpx.get(f"{server.http}/")
    assert r.status_code == 200
    assert "<html" in r.text.lower()
