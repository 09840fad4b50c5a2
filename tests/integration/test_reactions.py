"""Reactions, black-box on real servers: ``react`` frames and the REST routes store
``reaction`` items that fan out; setting one twice (or taking back one twice) stores nothing
and answers with the item that made it so; history shows the counts with ``me``; a resume
that applies the items ends with the counts history shows; emoji are validated and capped."""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support import Client, make_token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def post(server: Any, room: str, token: str, body: str) -> int:
    r = httpx.post(
        f"{server.http}/rooms/{room}/messages", json={"body": body}, headers=_auth(token)
    )
    assert r.status_code == 201, r.text
    return int(r.json()["seq"])


def history(server: Any, room: str, token: str, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{server.http}/rooms/{room}/messages",
        params={"limit": 500, **params},
        headers=_auth(token),
    )
    assert r.status_code == 200, r.text
    return r.json()["messages"]  # type: ignore[no-any-return]


def reactions_of(server: Any, room: str, token: str, seq: int) -> list[dict[str, Any]]:
    (message,) = [m for m in history(server, room, token) if m["seq"] == seq]
    return message["reactions"]  # type: ignore[no-any-return]


async def answer(client: Client) -> dict[str, Any]:
    while True:
        frame = await client.recv()
        if frame["type"] in ("ack", "error"):
            return frame


async def test_a_reaction_fans_out_and_history_counts_it(server, second_server, room, alice, bob):
    seq = post(server, room, alice, "react to me")
    async with (
        await Client.connect(server, room, bob) as reacting,
        await Client.connect(second_server, room, alice) as watching,
    ):
        await reacting.send_json({"type": "react", "target_seq": seq, "emoji": "👍"})
        ack = await answer(reacting)
        assert ack["type"] == "ack" and ack["seq"] == seq + 1
        item = await watching.recv_type("message")
        assert {k: item[k] for k in ("seq", "kind", "author", "target_seq", "emoji", "on")} == {
            "seq": seq + 1,
            "kind": "reaction",
            "author": "bob",
            "target_seq": seq,
            "emoji": "👍",
            "on": True,
        }
        # Set again: nothing stored, the same answer.
        await reacting.send_json({"type": "react", "target_seq": seq, "emoji": "👍", "on": True})
        assert await answer(reacting) == ack
        await watching.assert_silent(0.3)
    assert reactions_of(server, room, bob, seq) == [{"emoji": "👍", "count": 1, "me": True}]
    assert reactions_of(server, room, alice, seq) == [{"emoji": "👍", "count": 1, "me": False}]
    items = history(server, room, alice, events="all", after=0)
    assert [i["kind"] for i in items] == ["text", "reaction"]
    assert "reactions" not in items[0]  # the stream's shape: the client applies the items


async def test_taking_a_reaction_back(server, room, alice, bob):
    seq = post(server, room, alice, "hi")
    async with await Client.connect(server, room, bob) as client:
        await client.send_json({"type": "react", "target_seq": seq, "emoji": "🎉"})
        assert (await answer(client))["type"] == "ack"
        await client.send_json({"type": "react", "target_seq": seq, "emoji": "🎉", "on": False})
        off = await answer(client)
        assert off["type"] == "ack"
        await client.send_json({"type": "react", "target_seq": seq, "emoji": "🎉", "on": False})
        assert await answer(client) == off  # already off: the item that took it back
        await client.send_json({"type": "react", "target_seq": seq, "emoji": "🙂", "on": False})
        never = await answer(client)
        assert (never["type"], never["code"]) == ("error", "not_found")
    assert reactions_of(server, room, bob, seq) == []


@pytest.mark.parametrize(
    "emoji",
    [
        "👍",
        "👍🏽",
        "❤️",
        "🇫🇷",
        "1️⃣",
        "#⃣",
        "👨‍👩‍👧",
        "🏳️‍🌈",
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
    ],
)
def test_emoji_sequences_are_accepted(server, room, alice, emoji):
    seq = post(server, room, alice, "emoji")
    r = httpx.put(
        f"{server.http}/rooms/{room}/messages/{seq}/reactions/{quote(emoji)}",
        headers=_auth(alice),
    )
    assert r.status_code == 200, r.text
    assert r.json()["emoji"] == emoji
    assert reactions_of(server, room, alice, seq) == [{"emoji": emoji, "count": 1, "me": True}]


@pytest.mark.parametrize(
    "emoji", ["a", ":+1:", "👍👍", "👍 ", "\u200d", "🇫", "x👍", "👍" + "\ufe0f" * 40]
)
async def test_text_is_not_an_emoji(server, room, alice, emoji):
    seq = post(server, room, alice, "no text reactions")
    async with await Client.connect(server, room, alice) as client:
        await client.send_json({"type": "react", "target_seq": seq, "emoji": emoji})
        refused = await answer(client)
        assert (refused["type"], refused["code"]) == ("error", "invalid_emoji")
    r = httpx.put(
        f"{server.http}/rooms/{room}/messages/{seq}/reactions/{quote(emoji)}",
        headers=_auth(alice),
    )
    assert r.status_code == 422, r.text


def test_rest_reactions_are_idempotent_and_capped(server, room, alice, bob):
    seq = post(server, room, alice, "popular")
    url = f"{server.http}/rooms/{room}/messages/{seq}/reactions"
    first = httpx.put(f"{url}/{quote('👍')}", headers=_auth(bob))
    again = httpx.put(f"{url}/{quote('👍')}", headers=_auth(bob))
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    faces = [chr(0x1F600 + i) for i in range(19)]  # 19 more: 20 different in all
    for face in faces:
        assert httpx.put(f"{url}/{quote(face)}", headers=_auth(alice)).status_code == 200
    over = httpx.put(f"{url}/{quote('🚀')}", headers=_auth(alice))
    assert (over.status_code, over.json()["code"]) == (409, "too_many_reactions")
    # One of the twenty again, by someone else: still fine.
    assert httpx.put(f"{url}/{quote(faces[0])}", headers=_auth(bob)).status_code == 200
    counts = {r["emoji"]: r["count"] for r in reactions_of(server, room, alice, seq)}
    assert len(counts) == 20 and counts["👍"] == 1 and counts[faces[0]] == 2
    assert list(counts)[0] == "👍"  # in the order they were first given
    gone = httpx.delete(f"{url}/{quote('👍')}", headers=_auth(bob))
    assert gone.status_code == 200 and gone.json()["on"] is False
    never = httpx.delete(f"{url}/{quote('🚀')}", headers=_auth(bob))
    assert never.status_code == 404


def test_deleted_messages_take_no_reactions_and_lose_theirs(server, room, alice, bob):
    seq = post(server, room, alice, "soon gone")
    url = f"{server.http}/rooms/{room}/messages/{seq}"
    assert httpx.put(f"{url}/reactions/{quote('👀')}", headers=_auth(bob)).status_code == 200
    assert httpx.delete(url, headers=_auth(alice)).status_code == 200
    late = httpx.put(f"{url}/reactions/{quote('👍')}", headers=_auth(bob))
    assert (late.status_code, late.json()["code"]) == (409, "already_deleted")
    (tombstone,) = [m for m in history(server, room, alice) if m["seq"] == seq]
    assert (tombstone["deleted"], tombstone["body"], tombstone["reactions"]) == (True, None, [])


def test_outsiders_cannot_react_in_private_rooms(server, room, alice, bob):
    made = httpx.post(
        f"{server.http}/rooms", json={"name": room, "kind": "private"}, headers=_auth(alice)
    )
    assert made.status_code == 201
    seq = post(server, room, alice, "members only")
    r = httpx.put(
        f"{server.http}/rooms/{room}/messages/{seq}/reactions/{quote('👍')}", headers=_auth(bob)
    )
    assert r.status_code == 404


async def test_a_resume_applying_reaction_items_counts_what_history_counts(
    server, second_server, room, alice, bob
):
    seq = post(server, room, alice, "counted")
    async with await Client.connect(second_server, room, alice) as first:
        since = first.ready["last_seq"]
    carol = make_token("carol")
    url = f"{server.http}/rooms/{room}/messages/{seq}/reactions"
    for token, emoji, on in [
        (bob, "👍", True),
        (carol, "👍", True),
        (alice, "🎉", True),
        (bob, "👍", False),
        (bob, "🎉", True),
        (carol, "👍", True),  # already set: nothing stored
    ]:
        method = httpx.put if on else httpx.delete
        assert method(f"{url}/{quote(emoji)}", headers=_auth(token)).status_code == 200
    async with await Client.connect(server, room, alice, since=since) as resumed:
        counts: Counter[str] = Counter()
        for item in resumed.history:
            if item["kind"] == "reaction" and item["target_seq"] == seq:
                counts[item["emoji"]] += 1 if item["on"] else -1
    shown = {r["emoji"]: r["count"] for r in reactions_of(server, room, alice, seq)}
    assert dict(+counts) == shown == {"👍": 1, "🎉": 2}
