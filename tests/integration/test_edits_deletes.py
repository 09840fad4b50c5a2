"""Edits and deletes (issue 15), black-box against real servers, two replicas where it matters:
who may change a message and the error codes of the rest, validation, idempotent retries
(one ``client_msg_id`` namespace across kinds), erasure from the database, REST history's
current state, and a client that resumes with ``since`` rendering exactly what a client that
stayed connected renders."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.redis_support import RedisServer, redis_server_binary
from tests.support import Client, ServerProcess, make_token

SERVICE_ADMIN = make_token("ops", roles=["chat:admin"])


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(server: Any, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{server.http}{path}", headers=_auth(token), timeout=10, **kw)


def say(server: Any, token: str, room: str, body: str) -> dict[str, Any]:
    r = call(server, token, "POST", f"/rooms/{room}/messages", json={"body": body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def items(server: Any, token: str, room: str, *, every: bool = False) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"limit": 500}
    if every:
        params["events"] = "all"
    r = call(server, token, "GET", f"/rooms/{room}/messages", params=params)
    assert r.status_code == 200, r.text
    return r.json()["messages"]  # type: ignore[no-any-return]


def by_seq(found: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {item["seq"]: item for item in found}


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


async def answer(
    client: Client, frame: dict[str, Any], seen: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Send ``frame`` and read until its answer (``ack`` or ``error``); stream items that come
    before it go to ``seen``."""
    await client.send_json(frame)
    while True:
        got = await client.recv()
        if got["type"] in ("ack", "error"):
            return got
        if got["type"] == "message" and seen is not None:
            seen.append(got)


async def item_until(client: Client, seq: int, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Stream items into ``seen`` until the one with ``seq``, which is returned."""
    for item in seen:
        if item["seq"] == seq:
            return item
    while True:
        got = await client.recv()
        if got["type"] == "message":
            seen.append(got)
            if got["seq"] == seq:
                return got


def edit(target: int, body: str, cmid: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "edit", "target_seq": target, "body": body}
    if cmid is not None:
        frame["client_msg_id"] = cmid
    return frame


def delete(target: int, cmid: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "delete", "target_seq": target}
    if cmid is not None:
        frame["client_msg_id"] = cmid
    return frame


def private_room(server: Any, owner: str, *members: str) -> str:
    name = uid("r")
    r = call(
        server,
        owner,
        "POST",
        "/rooms",
        json={"name": name, "kind": "private", "members": list(members)},
    )
    assert r.status_code == 201, r.text
    return name


# 1. The author edits over the websocket


async def test_an_edit_reaches_every_socket_and_history_shows_the_current_state(
    server, second_server, room, alice, bob
):
    original = say(server, alice, room, "helo world")
    sockets = [
        await Client.connect(server, room, alice),
        await Client.connect(second_server, room, bob),
        await Client.connect(second_server, room, alice),
    ]
    try:
        early: list[dict[str, Any]] = []  # the item may come before the ack
        ack = await answer(sockets[0], edit(original["seq"], "hello world", "e-1"), early)
        assert ack["type"] == "ack", ack
        assert ack["client_msg_id"] == "e-1"
        assert ack["seq"] > original["seq"]
        received = [
            await item_until(c, ack["seq"], seen)
            for c, seen in zip(sockets, (early, [], []), strict=True)
        ]
        for item in received:
            assert item["type"] == "message"
            assert {k: item[k] for k in ("kind", "author", "target_seq", "body", "id")} == {
                "kind": "edit",
                "author": "alice",
                "target_seq": original["seq"],
                "body": "hello world",
                "id": ack["id"],
            }
            assert item["created_at"] == ack["created_at"]
            assert item["client_msg_id"] == "e-1"
        assert received[0] == received[1] == received[2]
    finally:
        for c in sockets:
            await c.close()

    for replica in (server, second_server):
        texts = by_seq(items(replica, bob, room))
        assert list(texts) == [original["seq"]]  # the edit item is not in default history
        text = texts[original["seq"]]
        assert text["kind"] == "text"
        assert text["body"] == "hello world"
        assert text["edited_at"] == ack["created_at"]
        assert text["deleted"] is False
        every = by_seq(items(replica, bob, room, every=True))
        assert set(every) == {original["seq"], ack["seq"]}
        assert every[original["seq"]] == {k: v for k, v in text.items() if k != "reactions"}
        assert every[ack["seq"]] == {k: v for k, v in received[0].items() if k != "type"}
        assert {k: every[ack["seq"]][k] for k in ("kind", "target_seq", "body", "created_at")} == {
            "kind": "edit",
            "target_seq": original["seq"],
            "body": "hello world",
            "created_at": ack["created_at"],
        }
    # An unedited message says so.
    plain = say(server, alice, room, "untouched")
    assert by_seq(items(server, alice, room))[plain["seq"]]["edited_at"] is None


async def test_rest_edit_and_delete_answer_with_their_items(server, second_server, room, alice):
    msg = say(server, alice, room, "first")
    async with await Client.connect(second_server, room, alice) as watcher:
        r = call(
            server,
            alice,
            "PATCH",
            f"/rooms/{room}/messages/{msg['seq']}",
            json={"body": "second", "client_msg_id": "p-1"},
        )
        assert r.status_code == 200, r.text
        edited = r.json()
        assert {k: edited[k] for k in ("kind", "target_seq", "body", "client_msg_id")} == {
            "kind": "edit",
            "target_seq": msg["seq"],
            "body": "second",
            "client_msg_id": "p-1",
        }
        live = await item_until(watcher, edited["seq"], [])
        assert {k: v for k, v in live.items() if k != "type"} == edited
        r = call(second_server, alice, "DELETE", f"/rooms/{room}/messages/{msg['seq']}")
        assert r.status_code == 200, r.text
        deleted = r.json()
        assert deleted["kind"] == "delete"
        assert deleted["target_seq"] == msg["seq"]
        assert deleted["seq"] == edited["seq"] + 1
        live = await item_until(watcher, deleted["seq"], [])
        assert {k: v for k, v in live.items() if k != "type"} == deleted


# 2. The wrong users


async def test_only_the_author_edits_and_who_may_delete(server, second_server):
    alice, bob, carol, dave = (uid(n) for n in ("alice", "bob", "carol", "dave"))
    tok = {u: make_token(u) for u in (alice, bob, carol, dave)}
    room = private_room(server, tok[alice], bob, carol, dave)
    r = call(server, tok[alice], "PUT", f"/rooms/{room}/members/{carol}", json={"role": "admin"})
    assert r.status_code in (200, 204), r.text
    bobs = [say(server, tok[bob], room, f"bob {i}") for i in range(4)]
    alices = say(server, tok[alice], room, "alice's")

    async with (
        await Client.connect(second_server, room, tok[dave]) as dave_ws,
        await Client.connect(server, room, tok[alice]) as alice_ws,
        await Client.connect(second_server, room, tok[carol]) as carol_ws,
        await Client.connect(server, room, SERVICE_ADMIN) as ops_ws,
    ):
        # Nobody but the author edits: not a member, not the owner, not an admin.
        for ws in (dave_ws, alice_ws, carol_ws, ops_ws):
            refused = await answer(ws, edit(bobs[0]["seq"], "mine now", "x-1"))
            assert refused["type"] == "error", refused
            assert refused["code"] == "forbidden"
            assert refused["client_msg_id"] == "x-1"
        for token in (tok[dave], tok[alice], tok[carol], SERVICE_ADMIN):
            r = call(
                second_server,
                token,
                "PATCH",
                f"/rooms/{room}/messages/{bobs[0]['seq']}",
                json={"body": "mine now"},
            )
            assert_error(r, 403, "forbidden")
        # A plain member deletes only their own.
        refused = await answer(dave_ws, delete(bobs[0]["seq"]))
        assert refused["code"] == "forbidden", refused
        r = call(server, tok[dave], "DELETE", f"/rooms/{room}/messages/{alices['seq']}")
        assert_error(r, 403, "forbidden")
        # The owner, an admin of the room, a service admin and the author may delete.
        for ws, target in ((alice_ws, bobs[0]), (carol_ws, bobs[1]), (ops_ws, bobs[2])):
            done = await answer(ws, delete(target["seq"]))
            assert done["type"] == "ack", done
        r = call(second_server, SERVICE_ADMIN, "DELETE", f"/rooms/{room}/messages/{bobs[3]['seq']}")
        assert r.status_code == 200, r.text
        r = call(server, tok[carol], "DELETE", f"/rooms/{room}/messages/{alices['seq']}")
        assert r.status_code == 200, r.text  # an admin: also the owner's message

        # A deleted message: no edit, no second delete.
        async with await Client.connect(server, room, tok[bob]) as bob_ws:
            gone = await answer(bob_ws, edit(bobs[0]["seq"], "again", "x-2"))
            assert (gone["type"], gone["code"], gone["client_msg_id"]) == (
                "error",
                "already_deleted",
                "x-2",
            )
            gone = await answer(bob_ws, delete(bobs[1]["seq"]))
            assert gone["code"] == "already_deleted"
            r = call(
                second_server,
                tok[bob],
                "PATCH",
                f"/rooms/{room}/messages/{bobs[0]['seq']}",
                json={"body": "again"},
            )
            assert_error(r, 409, "already_deleted")
            r = call(server, tok[bob], "DELETE", f"/rooms/{room}/messages/{bobs[2]['seq']}")
            assert_error(r, 409, "already_deleted")

            # No such message: a seq never used, a member item, an edit item, a delete item.
            every = items(server, tok[bob], room, every=True)
            member_seq = next(i["seq"] for i in every if i["kind"] == "member")
            delete_seq = next(i["seq"] for i in every if i["kind"] == "delete")
            last = max(i["seq"] for i in every)
            for target in (last + 1000, member_seq, delete_seq):
                for frame in (edit(target, "x"), delete(target)):
                    missing = await answer(bob_ws, frame)
                    assert missing["code"] == "not_found", (target, missing)
                r = call(
                    server,
                    tok[bob],
                    "PATCH",
                    f"/rooms/{room}/messages/{target}",
                    json={"body": "x"},
                )
                assert_error(r, 404, "not_found")
                r = call(second_server, tok[bob], "DELETE", f"/rooms/{room}/messages/{target}")
                assert_error(r, 404, "not_found")

    # Outsiders: REST says there is no such room; the websocket does not even open.
    eve = make_token(uid("eve"))
    fresh = say(server, tok[bob], room, "still here")
    for replica in (server, second_server):
        r = call(
            replica,
            eve,
            "PATCH",
            f"/rooms/{room}/messages/{fresh['seq']}",
            json={"body": "x"},
        )
        assert_error(r, 404, "not_found")
        r = call(replica, eve, "DELETE", f"/rooms/{room}/messages/{fresh['seq']}")
        assert_error(r, 404, "not_found")
        with pytest.raises(InvalidStatus) as refused:
            await Client.connect(replica, room, eve)
        assert refused.value.response.status_code == 403
    text = by_seq(items(server, tok[bob], room))[fresh["seq"]]
    assert (text["body"], text["edited_at"], text["deleted"]) == ("still here", None, False)


async def test_a_refused_id_is_evaluated_again(server, room, alice):
    msg = say(server, alice, room, "retry me")
    async with await Client.connect(server, room, alice) as ws:
        first = await answer(ws, edit(msg["seq"] + 100, "x", "r-1"))
        assert (first["code"], first["client_msg_id"]) == ("not_found", "r-1")
        second = await answer(ws, edit(msg["seq"], "fixed", "r-1"))
        assert second["type"] == "ack", second
    assert by_seq(items(server, alice, room))[msg["seq"]]["body"] == "fixed"


# 3. Validation


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "edit", "target_seq": 1, "body": ""}, "empty_body"),
        ({"type": "edit", "target_seq": 1, "body": "  \n "}, "empty_body"),
        ({"type": "edit", "target_seq": 1, "body": "x" * 4001}, "body_too_long"),
        ({"type": "edit", "target_seq": 1}, "invalid_frame"),
        ({"type": "edit", "target_seq": 1, "body": 7}, "invalid_frame"),
        ({"type": "edit", "target_seq": "1", "body": "x"}, "invalid_frame"),
        ({"type": "edit", "target_seq": 0, "body": "x"}, "invalid_frame"),
        ({"type": "edit", "target_seq": -3, "body": "x"}, "invalid_frame"),
        ({"type": "edit", "target_seq": True, "body": "x"}, "invalid_frame"),
        ({"type": "edit", "target_seq": 1.0, "body": "x"}, "invalid_frame"),
        ({"type": "edit", "body": "x"}, "invalid_frame"),
        ({"type": "edit", "target_seq": 2**63, "body": "x"}, "invalid_frame"),
        ({"type": "delete", "target_seq": 2**70}, "invalid_frame"),
        ({"type": "edit", "target_seq": 2**62, "body": "x"}, "not_found"),
        ({"type": "delete", "target_seq": 2**62}, "not_found"),
        ({"type": "delete"}, "invalid_frame"),
        ({"type": "delete", "target_seq": None}, "invalid_frame"),
        ({"type": "delete", "target_seq": 0}, "invalid_frame"),
        ({"type": "delete", "target_seq": False}, "invalid_frame"),
        ({"type": "delete", "target_seq": [1]}, "invalid_frame"),
    ],
)
async def test_invalid_change_frames_are_refused(server, room, alice, frame, code):
    msg = say(server, alice, room, "valid")
    assert msg["seq"] == 1
    async with await Client.connect(server, room, alice) as ws:
        refused = await answer(ws, {**frame, "client_msg_id": "v-1"})
        assert refused["type"] == "error", refused
        assert refused["code"] == code, refused
        assert refused["client_msg_id"] == "v-1"
        # Nothing was stored; the socket still works.
        ok = await answer(ws, edit(1, "still valid", "v-2"))
        assert ok["type"] == "ack" and ok["seq"] == 2, ok
    assert [i["seq"] for i in items(server, alice, room, every=True)] == [1, 2]


@pytest.mark.parametrize("cmid", [5, "", "x" * 129, ["a"]])
async def test_an_invalid_client_msg_id_is_refused_and_not_echoed(server, room, alice, cmid):
    say(server, alice, room, "valid")
    async with await Client.connect(server, room, alice) as ws:
        for frame in (edit(1, "x"), delete(1)):
            refused = await answer(ws, {**frame, "client_msg_id": cmid})
            assert refused["code"] == "invalid_client_msg_id", refused
            assert "client_msg_id" not in refused
    if isinstance(cmid, str):  # a query parameter is always one
        path = f"/rooms/{room}/messages/1"
        r = call(server, alice, "DELETE", path, params={"client_msg_id": cmid})
        assert r.status_code == 422, r.text
    r = call(
        server,
        alice,
        "PATCH",
        f"/rooms/{room}/messages/1",
        json={"body": "x", "client_msg_id": cmid},
    )
    assert r.status_code == 422, r.text
    assert [i["seq"] for i in items(server, alice, room, every=True)] == [1]


async def test_an_unknown_type_names_edit_and_delete(server, room, alice):
    async with await Client.connect(server, room, alice) as ws:
        refused = await answer(ws, {"type": "amend", "target_seq": 1, "body": "x"})
        assert refused["code"] == "unknown_type"
        assert "edit" in refused["detail"] and "delete" in refused["detail"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("1", {"body": ""}),
        ("1", {"body": "   "}),
        ("1", {"body": "x" * 4001}),
        ("1", {"body": 7}),
        ("1", {}),
        ("1", {"body": "x", "client_msg_id": ""}),
        ("0", {"body": "x"}),
        ("-1", {"body": "x"}),
        ("one", {"body": "x"}),
        ("1.5", {"body": "x"}),
        (str(2**63), {"body": "x"}),
    ],
)
def test_invalid_rest_edits_get_422(server, room, alice, path, body):
    say(server, alice, room, "valid")
    r = call(server, alice, "PATCH", f"/rooms/{room}/messages/{path}", json=body)
    assert r.status_code == 422, r.text
    assert [i["seq"] for i in items(server, alice, room, every=True)] == [1]


@pytest.mark.parametrize("path", ["0", "-1", "one", "true"])
def test_invalid_rest_deletes_get_422(server, room, alice, path):
    say(server, alice, room, "valid")
    r = call(server, alice, "DELETE", f"/rooms/{room}/messages/{path}")
    assert r.status_code == 422, r.text
    assert [i["seq"] for i in items(server, alice, room, every=True)] == [1]


# 4. Idempotency


async def test_repeated_changes_get_the_original_ack_and_store_nothing(
    server, second_server, room, alice
):
    a = say(server, alice, room, "one")
    b = say(server, alice, room, "two")
    async with await Client.connect(server, room, alice) as ws:
        first = await answer(ws, edit(a["seq"], "one!", "i-edit"))
        assert first["type"] == "ack"
        again = await answer(ws, edit(a["seq"], "one!", "i-edit"))
        assert again == first
        other_body = await answer(ws, edit(a["seq"], "something else", "i-edit"))
        assert other_body == first  # the id decides: the original, unchanged

        gone = await answer(ws, delete(b["seq"], "i-del"))
        assert gone["type"] == "ack"
        assert await answer(ws, delete(b["seq"], "i-del")) == gone  # not already_deleted

        # One namespace across kinds: an edit reusing a send's id gets the send's ack.
        sent = await answer(ws, {"type": "send", "body": "three", "client_msg_id": "i-x"})
        assert sent["type"] == "ack"
        assert await answer(ws, edit(sent["seq"], "three!", "i-x")) == sent
        assert await answer(ws, delete(sent["seq"], "i-x")) == sent
        # ... and a send reusing an edit's id gets the edit's ack.
        assert await answer(ws, {"type": "send", "body": "four", "client_msg_id": "i-edit"}) == (
            first
        )
    # A repeat on the other replica is one too.
    async with await Client.connect(second_server, room, alice) as ws:
        assert await answer(ws, edit(a["seq"], "one!", "i-edit")) == first

    every = items(second_server, alice, room, every=True)
    assert [(i["seq"], i["kind"]) for i in every] == [
        (a["seq"], "text"),
        (b["seq"], "text"),
        (first["seq"], "edit"),
        (gone["seq"], "delete"),
        (sent["seq"], "text"),
    ]
    state = by_seq(every)
    assert state[a["seq"]]["body"] == "one!"
    assert state[a["seq"]]["edited_at"] == first["created_at"]
    assert state[sent["seq"]]["body"] == "three"
    assert state[sent["seq"]]["edited_at"] is None


def test_rest_repeats_answer_the_original_item(server, second_server, room, alice):
    a = say(server, alice, room, "one")
    path = f"/rooms/{room}/messages/{a['seq']}"
    r = call(server, alice, "PATCH", path, json={"body": "one!", "client_msg_id": "h-1"})
    assert r.status_code == 200, r.text
    assert "Idempotent-Replayed" not in r.headers
    original = r.json()
    r = call(second_server, alice, "PATCH", path, json={"body": "other", "client_msg_id": "h-1"})
    assert r.status_code == 200, r.text
    assert r.headers["Idempotent-Replayed"] == "true"
    assert r.json() == original

    r = call(server, alice, "DELETE", path, params={"client_msg_id": "h-2"})
    assert r.status_code == 200, r.text
    deleted = r.json()
    r = call(second_server, alice, "DELETE", path, params={"client_msg_id": "h-2"})
    assert r.status_code == 200, r.text
    assert r.headers["Idempotent-Replayed"] == "true"
    assert r.json() == deleted

    # Across kinds: a PATCH reusing a message's id answers with that message.
    r = call(
        server, alice, "POST", f"/rooms/{room}/messages", json={"body": "b", "client_msg_id": "h-3"}
    )
    assert r.status_code == 201, r.text
    sent = r.json()
    r = call(
        server,
        alice,
        "PATCH",
        f"/rooms/{room}/messages/{sent['seq']}",
        json={"body": "b!", "client_msg_id": "h-3"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["Idempotent-Replayed"] == "true"
    assert r.json() == sent
    assert [i["seq"] for i in items(server, alice, room, every=True)] == [
        a["seq"],
        original["seq"],
        deleted["seq"],
        sent["seq"],
    ]
    # The repeated edit item, read back now that its target is deleted: its body is erased.
    assert by_seq(items(server, alice, room, every=True))[original["seq"]]["body"] is None


# 5. Erasure


async def test_a_delete_erases_the_text_and_every_edit_from_the_database(
    server, second_server, room, alice, bob, database_url
):
    marker = uuid.uuid4().hex
    texts = [f"secret {marker} v{i}" for i in range(4)]
    msg = say(server, alice, room, texts[0])
    keep = say(server, bob, room, f"kept {marker}")
    async with await Client.connect(second_server, room, alice) as ws:
        for text in texts[1:]:
            assert (await answer(ws, edit(msg["seq"], text)))["type"] == "ack"
    conn = await asyncpg.connect(database_url)
    try:
        before = [
            await conn.fetchval("SELECT count(*) FROM message WHERE body = $1", t) for t in texts
        ]
        assert before == [0, 1, 1, 2]  # the current text is on the message and its last edit
        r = call(server, alice, "DELETE", f"/rooms/{room}/messages/{msg['seq']}")
        assert r.status_code == 200, r.text
        for text in texts:
            assert await conn.fetchval("SELECT count(*) FROM message WHERE body = $1", text) == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM message WHERE strpos(body, $1) > 0", f"secret {marker}"
            )
            == 0
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM message WHERE body = $1", f"kept {marker}")
            == 1
        )
    finally:
        await conn.close()

    for replica in (server, second_server):
        texts_now = by_seq(items(replica, bob, room))
        assert texts_now[msg["seq"]]["deleted"] is True
        assert texts_now[msg["seq"]]["body"] is None
        assert texts_now[keep["seq"]]["body"] == f"kept {marker}"
        every = items(replica, bob, room, every=True)
        edits = [i for i in every if i["kind"] == "edit"]
        assert len(edits) == 3
        assert all(i["body"] is None for i in edits)
        assert marker not in httpx.get(
            f"{replica.http}/rooms/{room}/messages",
            params={"events": "all"},
            headers=_auth(bob),
        ).text.replace(f"kept {marker}", "")
    # A replay on connect and a resume show the tombstone, not the text.
    async with await Client.connect(server, room, bob, since=0) as resumed:
        assert marker not in str(resumed.history).replace(f"kept {marker}", "")
    async with await Client.connect(server, room, bob, history=10) as fresh:
        tomb = by_seq(fresh.history)[msg["seq"]]
        assert (tomb["deleted"], tomb["body"]) == (True, None)


# 6. A resume renders what a client that stayed connected renders


State = dict[int, tuple[str | None, str | None, bool]]


def render(stream: list[dict[str, Any]]) -> State:
    state: State = {}
    for item in stream:
        kind = item["kind"]
        if kind == "text":
            state[item["seq"]] = (item["body"], item["edited_at"], item["deleted"])
        elif kind == "edit":
            target = item["target_seq"]
            _, _, deleted = state[target]
            if not deleted:
                state[target] = (item["body"], item["created_at"], False)
        elif kind == "delete":
            target = item["target_seq"]
            _, edited_at, _ = state[target]
            state[target] = (None, edited_at, True)
    return state


async def test_a_resume_renders_the_same_state_as_staying_connected(
    server, second_server, room, alice, bob
):
    carol = make_token("carol")
    olds = [say(server, alice, room, f"old {i}") for i in range(6)]
    assert (
        call(
            server,
            alice,
            "PATCH",
            f"/rooms/{room}/messages/{olds[0]['seq']}",
            json={"body": "old 0 v2"},
        ).status_code
        == 200
    )
    stayed = await Client.connect(server, room, carol, since=0)
    a_stream: list[dict[str, Any]] = list(stayed.history)
    try:
        b_first = await Client.connect(second_server, room, bob, history=50)
        b_stream: list[dict[str, Any]] = list(b_first.history)
        seen: list[dict[str, Any]] = []
        more = await answer(
            b_first, {"type": "send", "body": "bob before", "client_msg_id": "b0"}, seen
        )
        await item_until(b_first, more["seq"], seen)
        b_stream.extend(seen)
        last_seen = b_stream[-1]["seq"]
        await b_first.close()

        async with (
            await Client.connect(server, room, alice) as a1,
            await Client.connect(second_server, room, alice) as a2,
            await Client.connect(second_server, room, bob) as b2,
        ):

            async def ok(ws: Client, frame: dict[str, Any]) -> dict[str, Any]:
                got = await answer(ws, frame)
                assert got["type"] == "ack", (frame, got)
                return got

            n1 = await ok(a1, {"type": "send", "body": "new 1"})
            n2 = await ok(b2, {"type": "send", "body": "new 2"})
            n3 = await ok(a2, {"type": "send", "body": "new 3"})
            await ok(a2, edit(olds[1]["seq"], "old 1 edited"))  # an old one
            await ok(a1, edit(n1["seq"], "new 1 edited"))  # a new one
            await ok(b2, edit(n2["seq"], "new 2 edited"))
            await ok(a1, delete(olds[2]["seq"]))  # an old one
            await ok(b2, delete(n2["seq"]))  # a new, edited one
            await ok(a2, edit(olds[3]["seq"], "old 3 edited"))  # an edit, then a delete
            await ok(a1, delete(olds[3]["seq"]))
            await ok(a2, edit(olds[0]["seq"], "old 0 v3"))  # edited before and during
            await ok(a1, edit(n3["seq"], "new 3 v2"))
            await ok(a2, edit(n3["seq"], "new 3 v3"))
            await ok(b2, delete(more["seq"]))  # bob's own last seen one
            refused = await answer(b2, edit(olds[4]["seq"], "not bob's"))
            assert refused["code"] == "forbidden"
            last = await ok(a1, {"type": "send", "body": "the end"})

        await item_until(stayed, last["seq"], a_stream)
        resumed = await Client.connect(server, room, bob, since=last_seen)
        await resumed.close()
    finally:
        await stayed.close()
    b_stream.extend(resumed.history)

    a_seqs = [i["seq"] for i in a_stream]
    assert a_seqs == sorted(a_seqs) and len(set(a_seqs)) == len(a_seqs)
    assert [i["seq"] for i in resumed.history] == list(range(last_seen + 1, last["seq"] + 1))
    live, after_resume = render(a_stream), render(b_stream)
    assert after_resume == live
    rest = {
        i["seq"]: (i["body"], i["edited_at"], i["deleted"])
        for replica in (server, second_server)
        for i in items(replica, bob, room)
    }
    assert rest == live
    # The mix did what it says.
    assert live[olds[0]["seq"]][0] == "old 0 v3"
    assert live[olds[1]["seq"]][0] == "old 1 edited"
    assert live[olds[2]["seq"]] == (None, None, True)
    assert live[olds[3]["seq"]][0] is None and live[olds[3]["seq"]][1] is not None
    assert live[olds[5]["seq"]] == ("old 5", None, False)
    assert live[n2["seq"]][0] is None and live[n2["seq"]][2] is True
    assert live[n3["seq"]][0] == "new 3 v3"
    assert live[more["seq"]][2] is True


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_resume_after_a_concurrent_random_mix_renders_as_live(
    server, second_server, room, seed
):
    """Several authors on both replicas change messages at once (some changes refused:
    already deleted, not theirs); the client that resumes still renders what the one that
    stayed renders, and what REST history says."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible mix
    users = ["ann", "ben", "cid"]
    tokens = {u: make_token(u) for u in users}
    sent = [say(server, tokens[users[i % 3]], room, f"seed {i}") for i in range(9)]
    authors = {m["seq"]: m["author"] for m in sent}
    stayed = await Client.connect(second_server, room, make_token("dan"), since=0)
    a_stream: list[dict[str, Any]] = list(stayed.history)
    sockets = {
        (u, i): await Client.connect((server, second_server)[i], room, tokens[u])
        for u in users
        for i in (0, 1)
    }
    b_first = await Client.connect(server, room, make_token("eve"), history=100)
    b_stream = list(b_first.history)
    await b_first.close()
    last_seen = b_stream[-1]["seq"]
    try:

        async def act(user: str, replica: int, steps: int) -> list[int]:
            ws, stored = sockets[(user, replica)], []
            for n in range(steps):
                roll = rng.random()
                own = [s for s, a in authors.items() if a == user]
                if roll < 0.3 or not own:
                    got = await answer(ws, {"type": "send", "body": f"{user} {seed} {n}"})
                    if got["type"] == "ack":
                        authors[got["seq"]] = user
                elif roll < 0.75:
                    got = await answer(ws, edit(rng.choice(own), f"{user} edit {n}"))
                else:
                    got = await answer(ws, delete(rng.choice(list(authors))))
                assert got["type"] == "ack" or got["code"] in ("already_deleted", "forbidden")
                if got["type"] == "ack":
                    stored.append(got["seq"])
            return stored

        done = await asyncio.gather(*(act(u, i, 12) for u, i in sockets))
        last = max(seq for seqs in done for seq in seqs)
        await item_until(stayed, last, a_stream)
        resumed = await Client.connect(second_server, room, make_token("eve"), since=last_seen)
        await resumed.close()
    finally:
        await stayed.close()
        for ws in sockets.values():
            await ws.close()
    b_stream.extend(resumed.history)
    assert [i["seq"] for i in resumed.history] == list(range(last_seen + 1, last + 1))
    live = render(a_stream)
    assert render(b_stream) == live
    rest = {
        i["seq"]: (i["body"], i["edited_at"], i["deleted"])
        for i in items(server, make_token("fay"), room)
    }
    assert rest == live
    kinds = {i["kind"] for i in a_stream}
    assert kinds == {"text", "edit", "delete"}


# 7. Ordering of answers


async def test_answers_come_in_the_order_of_the_frames(server, second_server, room, alice):
    target = say(server, alice, room, "to edit")
    async with await Client.connect(second_server, room, alice) as ws:
        for round_ in range(5):
            frames = [
                {"type": "send", "body": f"s{round_}a", "client_msg_id": f"o{round_}-1"},
                edit(target["seq"], f"edit {round_}", f"o{round_}-2"),
                {"type": "send", "body": f"s{round_}b", "client_msg_id": f"o{round_}-3"},
                delete(10_000, f"o{round_}-4"),
                {"type": "send", "body": f"s{round_}c", "client_msg_id": f"o{round_}-5"},
            ]
            for frame in frames:
                await ws.send_json(frame)
            answers = []
            while len(answers) < len(frames):
                got = await ws.recv()
                if got["type"] in ("ack", "error"):
                    answers.append(got)
            assert [a["client_msg_id"] for a in answers] == [f["client_msg_id"] for f in frames]
            assert [a["type"] for a in answers] == ["ack", "ack", "ack", "error", "ack"]
            assert answers[3]["code"] == "not_found"
            seqs = [a["seq"] for a in answers if a["type"] == "ack"]
            assert len(set(seqs)) == 4


async def test_pipelined_edits_take_effect_in_the_order_sent(server, second_server, room, alice):
    """A user who fixes a typo twice in a row sees the second fix, on every replica."""
    msg = say(server, alice, room, "v0")
    async with await Client.connect(server, room, alice) as ws:
        for i in range(1, 41):
            await ws.send_json(edit(msg["seq"], f"v{i}", f"p{i}"))
        await ws.send_json(delete(msg["seq"], "p-del"))
        answers = []
        while len(answers) < 41:
            got = await ws.recv()
            if got["type"] in ("ack", "error"):
                answers.append(got)
    assert [a["type"] for a in answers] == ["ack"] * 41
    assert [a["client_msg_id"] for a in answers] == [f"p{i}" for i in range(1, 41)] + ["p-del"]
    seqs = [a["seq"] for a in answers]
    assert seqs == sorted(seqs), seqs
    every = items(second_server, alice, room, every=True)
    assert [i["seq"] for i in every if i["kind"] != "text"] == seqs
    async with await Client.connect(second_server, room, alice) as ws:
        again = await answer(ws, edit(msg["seq"], "v41"))
        assert again["code"] == "already_deleted"


async def test_pipelined_edits_end_with_the_last_text(server, room, alice):
    msg = say(server, alice, room, "v0")
    async with await Client.connect(server, room, alice) as ws:
        for i in range(1, 41):
            await ws.send_json(edit(msg["seq"], f"v{i}"))
        acks = []
        while len(acks) < 40:
            got = await ws.recv()
            if got["type"] in ("ack", "error"):
                acks.append(got)
    assert [a["type"] for a in acks] == ["ack"] * 40
    state = by_seq(items(server, alice, room))[msg["seq"]]
    assert (state["body"], state["edited_at"]) == ("v40", acks[-1]["created_at"])


# Concurrency, authorship of items, a removed member


async def test_concurrent_edits_and_a_delete_on_two_replicas_never_edit_a_deleted_message(
    server, second_server
):
    alice, bob = uid("alice"), uid("bob")
    tok = {u: make_token(u) for u in (alice, bob)}
    room = private_room(server, tok[alice], bob)
    msg = say(server, tok[bob], room, "v0")
    path = f"/rooms/{room}/messages/{msg['seq']}"

    async def change(replica: Any, token: str, method: str, **kw: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=replica.http, headers=_auth(token)) as rest:
            return await rest.request(method, path, timeout=10, **kw)

    calls = [
        change((server, second_server)[i % 2], tok[bob], "PATCH", json={"body": f"v{i}"})
        for i in range(1, 21)
    ]
    calls.insert(10, change(second_server, tok[alice], "DELETE"))  # the owner
    answers = await asyncio.gather(*calls)
    deleted = answers.pop(10)
    assert deleted.status_code == 200, deleted.text
    assert {r.status_code for r in answers} <= {200, 409}
    stored = [r.json()["seq"] for r in answers if r.status_code == 200]
    assert all(seq < deleted.json()["seq"] for seq in stored)
    every = items(server, tok[bob], room, every=True)
    edits = [i for i in every if i["kind"] == "edit"]
    assert sorted(i["seq"] for i in edits) == sorted(stored)
    assert all(i["body"] is None and i["author"] == bob for i in edits)
    assert [(i["kind"], i["author"]) for i in every if i["kind"] == "delete"] == [("delete", alice)]
    text = by_seq(every)[msg["seq"]]
    assert (text["body"], text["deleted"]) == (None, True)


async def test_items_name_who_caused_them_and_a_replay_shows_the_current_state(
    server, second_server
):
    alice, bob = uid("alice"), uid("bob")
    tok = {u: make_token(u) for u in (alice, bob)}
    room = private_room(server, tok[alice], bob)
    kept = say(server, tok[bob], room, "typo")
    gone = say(server, tok[bob], room, "regret")
    async with await Client.connect(server, room, tok[bob]) as ws:
        edited = await answer(ws, edit(kept["seq"], "fixed"))
    async with await Client.connect(second_server, room, SERVICE_ADMIN) as ws:
        removed = await answer(ws, delete(gone["seq"]))
    every = by_seq(items(second_server, tok[alice], room, every=True))
    assert (every[edited["seq"]]["kind"], every[edited["seq"]]["author"]) == ("edit", bob)
    assert (every[removed["seq"]]["kind"], every[removed["seq"]]["author"]) == ("delete", "ops")
    for replica in (server, second_server):
        async with await Client.connect(replica, room, tok[alice], history=10) as ws:
            shown = by_seq(ws.history)
            assert set(shown) == {kept["seq"], gone["seq"]}  # text items only
            assert (shown[kept["seq"]]["body"], shown[kept["seq"]]["edited_at"]) == (
                "fixed",
                edited["created_at"],
            )
            assert (shown[gone["seq"]]["body"], shown[gone["seq"]]["deleted"]) == (None, True)


def test_a_removed_member_can_no_longer_change_their_messages(server, second_server):
    alice, bob = uid("alice"), uid("bob")
    tok = {u: make_token(u) for u in (alice, bob)}
    room = private_room(server, tok[alice], bob)
    msg = say(server, tok[bob], room, "mine")
    r = call(server, tok[alice], "DELETE", f"/rooms/{room}/members/{bob}")
    assert r.status_code == 204, r.text
    path = f"/rooms/{room}/messages/{msg['seq']}"
    assert_error(call(second_server, tok[bob], "PATCH", path, json={"body": "x"}), 404, "not_found")
    assert_error(call(second_server, tok[bob], "DELETE", path), 404, "not_found")
    # The owner still may delete it.
    assert call(server, tok[alice], "DELETE", path).status_code == 200


# 8. An edit as large as a message may be


async def test_an_edit_of_the_largest_size_reaches_the_other_replica(
    server, second_server, room, alice
):
    """A body of 4000 four-byte characters passes PostgreSQL's 8000-byte NOTIFY limit: the
    notification is a reference then, as for a send."""
    big = "\N{GRINNING FACE}" * 4000
    msg = say(server, alice, room, "small")
    async with (
        await Client.connect(server, room, alice) as author,
        await Client.connect(second_server, room, alice) as other,
    ):
        seen: list[dict[str, Any]] = []
        ack = await answer(author, edit(msg["seq"], big, "big-1"), seen)
        assert ack["type"] == "ack", ack
        for ws, got in ((author, seen), (other, [])):
            item = await item_until(ws, ack["seq"], got)
            assert (item["kind"], item["body"]) == ("edit", big)
        accents = "\N{LATIN SMALL LETTER E WITH ACUTE}" * 4000
        path = f"/rooms/{room}/messages/{msg['seq']}"
        r = call(second_server, alice, "PATCH", path, json={"body": accents})
        assert r.status_code == 200, r.text
        for ws, got in ((author, seen), (other, [])):
            item = await item_until(ws, r.json()["seq"], got)
            assert (item["kind"], item["body"]) == ("edit", accents)
    assert by_seq(items(server, alice, room))[msg["seq"]]["body"] == accents


@pytest.mark.skipif(redis_server_binary() is None, reason="no redis-server binary")
async def test_edits_and_deletes_travel_the_redis_bus(own_database, tmp_path):
    """With Redis as the bus the item is published after its commit, by the process that
    stored it, to the other process's sockets: small, larger than a NOTIFY and a delete."""
    redis = RedisServer(redis_server_binary(), tmp_path / "redis.log")  # type: ignore[arg-type]
    redis.start()
    env = {"CHAT_BROADCAST_URL": redis.url}
    room, alice = uid("r"), make_token("alice")
    try:
        with (
            ServerProcess(own_database, log_path=tmp_path / "a.log", env=env) as a,
            ServerProcess(own_database, log_path=tmp_path / "b.log", env=env) as b,
        ):
            msg = say(a, alice, room, "hello")
            big = "\N{GRINNING FACE}" * 4000
            async with (
                await Client.connect(a, room, alice) as author,
                await Client.connect(b, room, alice) as watcher,
            ):
                mine: list[dict[str, Any]] = []
                theirs: list[dict[str, Any]] = []
                small = await answer(author, edit(msg["seq"], "hello!"), mine)
                large = await answer(author, edit(msg["seq"], big), mine)
                gone = await answer(author, delete(msg["seq"]), mine)
                assert [x["type"] for x in (small, large, gone)] == ["ack"] * 3
                for ws, seen in ((author, mine), (watcher, theirs)):
                    await item_until(ws, gone["seq"], seen)
                    assert [(x["kind"], x["seq"]) for x in seen] == [
                        ("edit", small["seq"]),
                        ("edit", large["seq"]),
                        ("delete", gone["seq"]),
                    ]
                    assert seen[0]["body"] == "hello!"
                    # The large one may have been read from the database after the delete.
                    assert seen[1]["body"] in (big, None)
            tomb = by_seq(items(b, alice, room))[msg["seq"]]
            assert (tomb["body"], tomb["deleted"]) == (None, True)
    finally:
        redis.kill()


# A change whose connection drops after it was sent


async def test_an_edit_cut_off_after_it_was_sent_is_outcome_unknown_and_safe_to_resend(
    server, database_url, room, alice
):
    first = say(server, alice, room, "before")
    async with await Client.connect(server, room, alice) as client:
        locker = await asyncpg.connect(database_url)
        try:
            tx = locker.transaction()
            await tx.start()
            await locker.execute("SELECT 1 FROM room WHERE name = $1 FOR UPDATE", room)
            await client.send_json(edit(first["seq"], "after", "edit-1"))
            waiting = None
            for _ in range(400):  # the service's statement waits for the room's lock
                waiting = await locker.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%chat_post_event%'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            assert waiting, "the edit never reached the database"
            await locker.execute("SELECT pg_terminate_backend($1)", waiting)
            await tx.rollback()
        finally:
            await locker.close()
        got = await client.recv()
        assert got["type"] == "error" and got["code"] == "outcome_unknown", got
        assert got["client_msg_id"] == "edit-1"
        again = await answer(client, edit(first["seq"], "after", "edit-1"))
        assert again["type"] == "ack" and again["client_msg_id"] == "edit-1", again
    edits = [i for i in items(server, alice, room, every=True) if i["kind"] == "edit"]
    assert len(edits) == 1 and edits[0]["body"] == "after"
