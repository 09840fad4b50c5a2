"""REST: rooms with members (issue 14), black-box: creating rooms, who sees a private room,
direct rooms, roles, service admins, membership items in the history, paging."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tests.support import make_token

ADMIN_TOKEN = make_token("svc", roles=["chat:admin"])


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Api:
    """One user's REST calls to one server."""

    def __init__(self, server: Any, user: str, token: str | None = None) -> None:
        self.base = server.http
        self.user = user
        self.token = token or make_token(user)

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, f"{self.base}{path}", headers=headers, timeout=10, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.call("GET", path, **kw)

    def post(self, path: str, json: Any) -> httpx.Response:
        return self.call("POST", path, json=json)

    def put(self, path: str, json: Any) -> httpx.Response:
        return self.call("PUT", path, json=json)

    def patch(self, path: str, json: Any) -> httpx.Response:
        return self.call("PATCH", path, json=json)

    def delete(self, path: str) -> httpx.Response:
        return self.call("DELETE", path)

    # Shortcuts that assert success.
    def create(self, name: str, kind: str = "private", **extra: Any) -> dict[str, Any]:
        r = self.post("/rooms", {"name": name, "kind": kind, **extra})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def say(self, room: str, body: str) -> dict[str, Any]:
        r = self.post(f"/rooms/{room}/messages", {"body": body})
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def members(self, room: str) -> dict[str, str]:
        r = self.get(f"/rooms/{room}/members")
        assert r.status_code == 200, r.text
        return {m["user"]: m["role"] for m in r.json()["members"]}

    def listed(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every room GET /rooms lists (all pages), by name, from ``prefix`` on."""
        found: dict[str, dict[str, Any]] = {}
        after = prefix or None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after:
                params["after"] = after
            r = self.get("/rooms", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            found.update({room["name"]: room for room in body["rooms"]})
            after = body["next_after"]
            if after is None or (prefix and not after.startswith(prefix)):
                return {k: v for k, v in found.items() if k.startswith(prefix)}


def admin_api(server: Any) -> Api:
    return Api(server, "svc", ADMIN_TOKEN)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


def _without(obj: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


# 1. POST /rooms


def test_create_room_answers_the_room_object(server):
    alice = Api(server, uid("alice"))
    name = uid("r")
    before = datetime.now().astimezone()
    r = alice.post("/rooms", {"name": name, "kind": "private", "title": "Plans"})
    assert r.status_code == 201, r.text
    room = r.json()
    assert set(room) == {
        "name", "kind", "title", "role", "last_seq", "created_at", "last_read_seq", "unread",
        "mentions",
    }  # fmt: skip
    assert (room["unread"], room["mentions"]) == (0, 0)
    assert (room["name"], room["kind"], room["title"], room["role"]) == (
        name,
        "private",
        "Plans",
        "owner",
    )
    assert room["last_seq"] == 1  # the owner's "joined" item
    created = datetime.fromisoformat(room["created_at"].replace("Z", "+00:00"))
    assert abs((created - before).total_seconds()) < 60
    assert alice.get(f"/rooms/{name}").json() == room
    page = alice.get(f"/rooms/{name}/messages")  # a room without text yet: an empty page
    assert (page.status_code, page.json()["messages"], page.json()["last_seq"]) == (200, [], 1)

    public = alice.create(uid("r"), "public", members=[uid("m"), uid("m")])
    assert (public["kind"], public["title"], public["role"], public["last_seq"]) == (
        "public",
        None,
        "owner",
        3,
    )


def test_create_room_refuses_a_taken_name(server):
    alice, bob = Api(server, uid("alice")), Api(server, uid("bob"))
    name = uid("r")
    alice.create(name, "public")
    assert_error(bob.post("/rooms", {"name": name, "kind": "private"}), 409, "room_exists")
    assert_error(alice.post("/rooms", {"name": name, "kind": "public"}), 409, "room_exists")

    implicit = uid("r")
    bob.say(implicit, "first")  # a public room made by its first message
    assert_error(alice.post("/rooms", {"name": implicit, "kind": "private"}), 409, "room_exists")
    # Still the public room it was, with its message.
    assert alice.get(f"/rooms/{implicit}").json()["kind"] == "public"
    assert [m["body"] for m in alice.get(f"/rooms/{implicit}/messages").json()["messages"]] == [
        "first"
    ]


@pytest.mark.parametrize(
    "payload",
    [
        {"kind": "direct"},
        {"kind": "secret"},
        {"name": "dm.alice.bob"},
        {"name": "dm.whatever"},
        {"name": "bad name!"},
        {"name": "."},
        {"name": "x" * 65},
        {"name": ""},
        {"members": [f"m{i}" for i in range(101)]},
        {"members": [""]},
        {"members": ["a\nb"]},
        {"owner": "someone"},
        {"title": "x" * 201},
    ],
)
def test_create_room_refuses_invalid_bodies_with_422(server, payload):
    alice = Api(server, uid("alice"))
    body = {"name": uid("r"), "kind": "private", **payload}
    r = alice.post("/rooms", body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]
    if body["name"].startswith(("dm.", "t-", "u-", "r-")):  # a name a GET can ask for
        assert alice.get(f"/rooms/{body['name']}").status_code == 404


def test_create_room_lists_each_member_once(server):
    alice = Api(server, uid("alice"))
    bob, carol = uid("bob"), uid("carol")
    name = alice.create(uid("r"), "private", members=[bob, carol, bob, alice.user])["name"]
    assert alice.members(name) == {alice.user: "owner", bob: "member", carol: "member"}
    assert alice.get(f"/rooms/{name}").json()["last_seq"] == 3


def test_create_room_takes_up_to_100_members(server):
    alice = Api(server, uid("alice"))
    name = uid("r")
    members = [uid("m") for _ in range(100)]
    room = alice.create(name, "private", members=members)
    assert room["last_seq"] == 101  # the owner's and 100 members' "joined" items
    everyone = {}
    after = None
    while True:
        r = alice.get(f"/rooms/{name}/members", params={"after": after} if after else {})
        everyone.update({m["user"]: m["role"] for m in r.json()["members"]})
        after = r.json()["next_after"]
        if after is None:
            break
    assert everyone == {alice.user: "owner", **dict.fromkeys(members, "member")}


# 2. Private rooms are invisible to outsiders


def _outsider_answers(api: Api, room: str, other: str) -> list[tuple[str, int, Any]]:
    calls = [
        ("GET room", api.get(f"/rooms/{room}")),
        ("GET messages", api.get(f"/rooms/{room}/messages")),
        ("GET messages all", api.get(f"/rooms/{room}/messages", params={"events": "all"})),
        ("GET members", api.get(f"/rooms/{room}/members")),
        ("PATCH", api.patch(f"/rooms/{room}", {"title": "mine"})),
        ("DELETE", api.delete(f"/rooms/{room}")),
        ("PUT self", api.put(f"/rooms/{room}/members/{api.user}", {"role": "member"})),
        ("PUT self owner", api.put(f"/rooms/{room}/members/{api.user}", {"role": "owner"})),
        ("PUT other", api.put(f"/rooms/{room}/members/{other}", {"role": "member"})),
        ("DELETE self", api.delete(f"/rooms/{room}/members/{api.user}")),
        ("DELETE other", api.delete(f"/rooms/{room}/members/{other}")),
    ]
    return [(what, r.status_code, r.json()) for what, r in calls]


@pytest.mark.parametrize("kind", ["private", "direct"])
def test_rooms_are_invisible_to_outsiders_on_every_path(server, kind):
    alice, bob, eve = Api(server, uid("alice")), Api(server, uid("bob")), Api(server, uid("eve"))
    if kind == "private":
        name = alice.create(uid("r"), "private", members=[bob.user])["name"]
    else:
        r = alice.post("/rooms/direct", {"user": bob.user})
        assert r.status_code == 201, r.text
        name = r.json()["name"]
    alice.say(name, "secret")

    seen = _outsider_answers(eve, name, bob.user)
    never_used = _outsider_answers(eve, uid("never"), bob.user)
    for (what, status, body), (_, status_never, body_never) in zip(seen, never_used, strict=True):
        assert status == 404, (what, body)
        assert body == {"detail": "no such room", "code": "not_found"}, what
        assert (status, body) == (status_never, body_never), what

    # Posting: the same answer as for a never-used direct name (other names would be made).
    r = eve.post(f"/rooms/{name}/messages", {"body": "let me in"})
    never = eve.post(f"/rooms/dm.{uid('nobody')}/messages", {"body": "hello?"})
    assert r.status_code == never.status_code == 404
    assert r.json() == never.json()

    assert name not in eve.listed()
    # Nothing changed for the members.
    assert alice.members(name) == (
        {alice.user: "owner", bob.user: "member"}
        if kind == "private"
        else {alice.user: "member", bob.user: "member"}
    )
    assert [m["body"] for m in bob.get(f"/rooms/{name}/messages").json()["messages"]] == ["secret"]


def test_members_see_private_rooms_with_their_role(server):
    alice, bob = Api(server, uid("alice")), Api(server, uid("bob"))
    prefix = uid("vis")
    private = alice.create(f"{prefix}-a", "private", members=[bob.user])
    public = alice.create(f"{prefix}-b", "public")
    other = Api(server, uid("carol")).create(f"{prefix}-c", "private")

    assert {k: v["role"] for k, v in alice.listed(prefix).items()} == {
        private["name"]: "owner",
        public["name"]: "owner",
    }
    assert {k: v["role"] for k, v in bob.listed(prefix).items()} == {
        private["name"]: "member",
        public["name"]: None,
    }
    assert alice.listed(prefix)[private["name"]] == private
    assert bob.get(f"/rooms/{private['name']}").json()["role"] == "member"
    assert other["name"] not in bob.listed(prefix)
    assert bob.get(f"/rooms/{public['name']}").json()["role"] is None
    # A public non-member sees the room but not its member list.
    assert_error(bob.get(f"/rooms/{public['name']}/members"), 403, "forbidden")


# 3. Direct rooms


def test_direct_rooms_one_per_pair(server, second_server):
    alice, bob = Api(server, uid("alice")), Api(second_server, uid("bob"))
    r = alice.post("/rooms/direct", {"user": bob.user})
    assert r.status_code == 201, r.text
    room = r.json()
    first, second = sorted((alice.user, bob.user))
    assert room["name"] == f"dm.{first}.{second}"
    assert (room["kind"], room["role"], room["title"], room["last_seq"]) == (
        "direct",
        "member",
        None,
        2,
    )
    again = bob.post("/rooms/direct", {"user": alice.user})
    assert again.status_code == 200, again.text
    mine = {"last_read_seq"}  # each member's own
    assert _without(again.json(), mine) == _without({**room, "role": "member"}, mine)
    assert alice.post("/rooms/direct", {"user": bob.user}).status_code == 200
    assert alice.members(room["name"]) == {alice.user: "member", bob.user: "member"}
    assert bob.listed()[room["name"]]["role"] == "member"

    r = alice.post("/rooms/direct", {"user": alice.user})
    assert r.status_code == 422, r.text
    assert alice.get(f"/rooms/dm.{alice.user}.{alice.user}").status_code == 404
    # The prefix is reserved for the server's names.
    assert alice.post(f"/rooms/dm.{uid('x')}.{uid('y')}/messages", {"body": "x"}).status_code == 404


def test_direct_rooms_with_unusual_user_ids_get_a_hashed_name(server):
    alice = Api(server, uid("alice"))
    other = f"Bob Smith {uuid.uuid4().hex[:6]}"
    r = alice.post("/rooms/direct", {"user": other})
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    assert name.startswith("dm.") and len(name) == 3 + 56
    back = Api(server, other).post("/rooms/direct", {"user": alice.user})
    assert (back.status_code, back.json()["name"]) == (200, name)


def test_direct_room_members_do_not_change(server):
    alice, bob, carol = Api(server, uid("alice")), Api(server, uid("bob")), uid("carol")
    admin = admin_api(server)
    name = alice.post("/rooms/direct", {"user": bob.user}).json()["name"]
    for api in (alice, bob, admin):
        for who in (carol, alice.user, bob.user):
            for role in ("member", "admin", "owner"):
                r = api.put(f"/rooms/{name}/members/{who}", {"role": role})
                assert_error(r, 403, "forbidden")
            assert_error(api.delete(f"/rooms/{name}/members/{who}"), 403, "forbidden")
    assert_error(alice.patch(f"/rooms/{name}", {"title": "us"}), 403, "forbidden")
    assert_error(alice.delete(f"/rooms/{name}"), 403, "forbidden")
    assert_error(bob.delete(f"/rooms/{name}"), 403, "forbidden")
    assert alice.members(name) == {alice.user: "member", bob.user: "member"}

    r = admin.patch(f"/rooms/{name}", {"title": "moderated"})
    assert (r.status_code, r.json()["title"]) == (200, "moderated")
    assert admin.delete(f"/rooms/{name}").status_code == 204
    assert_error(alice.get(f"/rooms/{name}"), 404, "not_found")
    assert name not in bob.listed()
    # Opening it again makes a new room.
    assert bob.post("/rooms/direct", {"user": alice.user}).status_code == 201


async def test_concurrent_direct_opens_make_one_room(server, second_server):
    a, b = uid("alice"), uid("bob")
    tokens = {a: make_token(a), b: make_token(b)}

    async def open_one(i: int) -> httpx.Response:
        base = (server, second_server)[i % 2].http
        me, other = (a, b) if i % 3 else (b, a)
        async with httpx.AsyncClient(timeout=15) as client:
            return await client.post(
                f"{base}/rooms/direct",
                json={"user": other},
                headers={"Authorization": f"Bearer {tokens[me]}"},
            )

    answers = await asyncio.gather(*(open_one(i) for i in range(10)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 9 + [201], [r.text for r in answers]
    assert len({r.json()["name"] for r in answers}) == 1
    name = answers[0].json()["name"]
    api = Api(server, a)
    assert api.members(name) == {a: "member", b: "member"}
    items = api.get(f"/rooms/{name}/messages", params={"events": "all"}).json()["messages"]
    assert [(m["action"], m["user"]) for m in items] == [("joined", a), ("joined", b)]


# 4. Roles


def _room_with_roles(server: Any) -> tuple[str, Api, Api, Api]:
    """A private room: owner, admin, member."""
    owner, admin, member = Api(server, uid("own")), Api(server, uid("adm")), Api(server, uid("mem"))
    name = owner.create(uid("r"), "private", members=[admin.user, member.user])["name"]
    r = owner.put(f"/rooms/{name}/members/{admin.user}", {"role": "admin"})
    assert (r.status_code, r.json()["role"]) == (200, "admin")
    return name, owner, admin, member


def test_a_member_may_only_leave(server):
    name, owner, admin, member = _room_with_roles(server)
    stranger = uid("x")
    for who, role in [
        (stranger, "member"),
        (stranger, "admin"),
        (member.user, "admin"),
        (member.user, "owner"),
        (admin.user, "member"),
        (owner.user, "member"),
    ]:
        r = member.put(f"/rooms/{name}/members/{who}", {"role": role})
        assert_error(r, 403, "forbidden")
    for who in (admin.user, owner.user):
        assert_error(member.delete(f"/rooms/{name}/members/{who}"), 403, "forbidden")
    assert_error(member.patch(f"/rooms/{name}", {"title": "t"}), 403, "forbidden")
    assert_error(member.delete(f"/rooms/{name}"), 403, "forbidden")
    # An unchanged role on yourself is no change: 200.
    r = member.put(f"/rooms/{name}/members/{member.user}", {"role": "member"})
    assert (r.status_code, r.json()["role"]) == (200, "member")
    assert owner.members(name) == {owner.user: "owner", admin.user: "admin", member.user: "member"}

    assert member.delete(f"/rooms/{name}/members/{member.user}").status_code == 204
    assert_error(member.get(f"/rooms/{name}"), 404, "not_found")
    assert_error(member.get(f"/rooms/{name}/messages"), 404, "not_found")
    assert owner.members(name) == {owner.user: "owner", admin.user: "admin"}


def test_an_admin_manages_members_and_admins_but_not_the_owner(server):
    name, owner, admin, member = _room_with_roles(server)
    carol, dave = uid("carol"), uid("dave")

    r = admin.put(f"/rooms/{name}/members/{carol}", {"role": "member"})
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"user", "role", "joined_at", "last_read_seq"}
    assert (r.json()["user"], r.json()["role"]) == (carol, "member")
    r = admin.put(f"/rooms/{name}/members/{dave}", {"role": "admin"})
    assert (r.status_code, r.json()["role"]) == (201, "admin")
    r = admin.put(f"/rooms/{name}/members/{carol}", {"role": "admin"})
    assert (r.status_code, r.json()["role"]) == (200, "admin")
    r = admin.put(f"/rooms/{name}/members/{dave}", {"role": "member"})
    assert (r.status_code, r.json()["role"]) == (200, "member")
    r = admin.patch(f"/rooms/{name}", {"title": "by the admin"})
    assert (r.status_code, r.json()["title"], r.json()["role"]) == (200, "by the admin", "admin")

    for who, role in [(member.user, "owner"), (admin.user, "owner"), (carol, "owner")]:
        assert_error(admin.put(f"/rooms/{name}/members/{who}", {"role": role}), 403, "forbidden")
    for role in ("member", "admin", "owner"):
        r = admin.put(f"/rooms/{name}/members/{owner.user}", {"role": role})
        assert_error(r, 403, "forbidden")
    assert_error(admin.delete(f"/rooms/{name}/members/{owner.user}"), 403, "forbidden")
    assert_error(admin.delete(f"/rooms/{name}"), 403, "forbidden")

    assert admin.delete(f"/rooms/{name}/members/{dave}").status_code == 204  # a member
    assert admin.delete(f"/rooms/{name}/members/{carol}").status_code == 204  # an admin
    assert_error(admin.delete(f"/rooms/{name}/members/{carol}"), 404, "not_found")
    assert_error(admin.delete(f"/rooms/{name}/members/{uid('never')}"), 404, "not_found")
    assert owner.members(name) == {owner.user: "owner", admin.user: "admin", member.user: "member"}
    assert owner.get(f"/rooms/{name}").json()["title"] == "by the admin"

    # An admin may step down; then they are a member and manage nothing.
    r = admin.put(f"/rooms/{name}/members/{admin.user}", {"role": "member"})
    assert (r.status_code, r.json()["role"]) == (200, "member")
    assert_error(admin.put(f"/rooms/{name}/members/{carol}", {"role": "member"}), 403, "forbidden")


def test_the_owner_hands_over_before_leaving(server):
    name, owner, admin, member = _room_with_roles(server)
    assert_error(owner.delete(f"/rooms/{name}/members/{owner.user}"), 409, "owner_must_hand_over")
    r = owner.put(f"/rooms/{name}/members/{owner.user}", {"role": "admin"})
    assert_error(r, 409, "owner_must_hand_over")
    assert owner.members(name)[owner.user] == "owner"

    # The owner removes admins and members, and changes any role.
    carol = uid("carol")
    assert owner.put(f"/rooms/{name}/members/{carol}", {"role": "admin"}).status_code == 201
    assert owner.delete(f"/rooms/{name}/members/{carol}").status_code == 204
    assert_error(owner.delete(f"/rooms/{name}/members/{carol}"), 404, "not_found")

    r = owner.put(f"/rooms/{name}/members/{member.user}", {"role": "owner"})
    assert (r.status_code, r.json()["role"]) == (200, "owner")
    assert owner.members(name) == {owner.user: "admin", admin.user: "admin", member.user: "owner"}
    assert owner.get(f"/rooms/{name}").json()["role"] == "admin"
    assert member.get(f"/rooms/{name}").json()["role"] == "owner"
    assert_error(owner.delete(f"/rooms/{name}"), 403, "forbidden")
    assert owner.delete(f"/rooms/{name}/members/{owner.user}").status_code == 204
    assert_error(owner.get(f"/rooms/{name}"), 404, "not_found")

    # Handing over to someone not yet in the room adds them as the owner.
    newcomer = Api(server, uid("new"))
    r = member.put(f"/rooms/{name}/members/{newcomer.user}", {"role": "owner"})
    assert (r.status_code, r.json()["role"]) == (201, "owner")
    assert member.members(name) == {
        admin.user: "admin",
        member.user: "admin",
        newcomer.user: "owner",
    }
    assert newcomer.delete(f"/rooms/{name}").status_code == 204
    assert_error(member.get(f"/rooms/{name}"), 404, "not_found")
    assert_error(newcomer.get(f"/rooms/{name}"), 404, "not_found")


def test_joining_a_public_room(server):
    owner, bob = Api(server, uid("own")), Api(server, uid("bob"))
    name = owner.create(uid("r"), "public")["name"]
    assert bob.get(f"/rooms/{name}").json()["role"] is None
    r = bob.put(f"/rooms/{name}/members/{bob.user}", {"role": "member"})
    assert (r.status_code, r.json()["user"], r.json()["role"]) == (201, bob.user, "member")
    r = bob.put(f"/rooms/{name}/members/{bob.user}", {"role": "member"})
    assert (r.status_code, r.json()["role"]) == (200, "member")
    assert bob.listed()[name]["role"] == "member"
    assert bob.get(f"/rooms/{name}").json()["role"] == "member"
    # Joining does not make you an admin, nor add anyone else.
    assert_error(bob.put(f"/rooms/{name}/members/{bob.user}", {"role": "admin"}), 403, "forbidden")
    assert_error(bob.put(f"/rooms/{name}/members/{uid('x')}", {"role": "member"}), 403, "forbidden")
    carol = Api(server, uid("carol"))
    assert_error(
        carol.put(f"/rooms/{name}/members/{carol.user}", {"role": "admin"}), 403, "forbidden"
    )
    assert_error(
        carol.put(f"/rooms/{name}/members/{bob.user}", {"role": "member"}), 403, "forbidden"
    )
    assert_error(carol.delete(f"/rooms/{name}/members/{bob.user}"), 403, "forbidden")
    assert_error(carol.patch(f"/rooms/{name}", {"title": "t"}), 403, "forbidden")
    assert_error(carol.delete(f"/rooms/{name}"), 403, "forbidden")
    assert_error(carol.delete(f"/rooms/{name}/members/{carol.user}"), 404, "not_found")
    # A public room made by a message has no owner; anyone joins it.
    implicit = uid("r")
    carol.say(implicit, "hi")
    assert carol.put(f"/rooms/{implicit}/members/{bob.user}", {"role": "member"}).status_code == 403
    assert bob.put(f"/rooms/{implicit}/members/{bob.user}", {"role": "member"}).status_code == 201
    # Leaving a public room: still visible, no role.
    assert bob.delete(f"/rooms/{name}/members/{bob.user}").status_code == 204
    assert bob.get(f"/rooms/{name}").json()["role"] is None
    assert owner.members(name) == {owner.user: "owner"}


# 5. Service admins


@pytest.mark.parametrize(
    "claims",
    [{"roles": ["chat:admin"]}, {"roles": "chat:admin other"}, {"roles": ["x", "chat:admin"]}],
)
def test_a_service_admin_sees_and_manages_every_room(server, claims):
    owner, bob = Api(server, uid("own")), Api(server, uid("bob"))
    admin = Api(server, uid("svc"), make_token(uid("svc"), **claims))
    prefix = uid("adm")
    name = owner.create(f"{prefix}-p", "private", members=[bob.user], title="t")["name"]
    owner.say(name, "hidden")
    other = bob.create(f"{prefix}-q", "private")["name"]

    listed = admin.listed(prefix)
    assert set(listed) == {name, other}
    assert listed[name]["role"] is None
    room = admin.get(f"/rooms/{name}")
    assert (room.status_code, room.json()["role"]) == (200, None)
    msgs = admin.get(f"/rooms/{name}/messages").json()["messages"]
    assert [m["body"] for m in msgs] == ["hidden"]
    assert admin.members(name) == {owner.user: "owner", bob.user: "member"}
    # Posting stays the members' (the spec's table: "else members"), also for a service admin.
    assert_error(admin.post(f"/rooms/{name}/messages", {"body": "x"}), 404, "not_found")

    carol = uid("carol")
    assert admin.put(f"/rooms/{name}/members/{carol}", {"role": "admin"}).status_code == 201
    assert admin.put(f"/rooms/{name}/members/{owner.user}", {"role": "member"}).status_code == 200
    r = admin.put(f"/rooms/{name}/members/{bob.user}", {"role": "owner"})
    assert (r.status_code, r.json()["role"]) == (200, "owner")
    assert admin.members(name) == {owner.user: "member", bob.user: "owner", carol: "admin"}
    assert admin.delete(f"/rooms/{name}/members/{bob.user}").status_code == 204  # the owner
    assert admin.patch(f"/rooms/{name}", {"title": "renamed"}).json()["title"] == "renamed"
    assert admin.delete(f"/rooms/{other}").status_code == 204
    assert admin.delete(f"/rooms/{name}").status_code == 204
    assert_error(owner.get(f"/rooms/{name}"), 404, "not_found")
    assert admin.listed(prefix) == {}


@pytest.mark.parametrize(
    "claims",
    [{"roles": ["chat:user"]}, {"roles": "chat:user chat:administrator"}, {"role": "chat:admin"}],
)
def test_other_roles_are_not_service_admins(server, claims):
    owner = Api(server, uid("own"))
    user = Api(server, uid("usr"), make_token(uid("usr"), **claims))
    prefix = uid("na")
    name = owner.create(f"{prefix}-p", "private")["name"]
    assert user.listed(prefix) == {}
    assert_error(user.get(f"/rooms/{name}"), 404, "not_found")
    assert_error(user.delete(f"/rooms/{name}"), 404, "not_found")
    assert_error(
        user.put(f"/rooms/{name}/members/{user.user}", {"role": "owner"}), 404, "not_found"
    )


# 6. Membership items in the history


def test_membership_items_are_in_the_stream_in_order(server):
    owner, bob = Api(server, uid("own")), Api(server, uid("bob"))
    carol = uid("carol")
    name = owner.create(uid("r"), "private", members=[bob.user])["name"]
    owner.say(name, "one")
    assert owner.put(f"/rooms/{name}/members/{carol}", {"role": "member"}).status_code == 201
    bob.say(name, "two")
    assert owner.put(f"/rooms/{name}/members/{carol}", {"role": "admin"}).status_code == 200
    assert owner.delete(f"/rooms/{name}/members/{carol}").status_code == 204
    owner.say(name, "three")
    assert bob.delete(f"/rooms/{name}/members/{bob.user}").status_code == 204
    assert owner.put(f"/rooms/{name}/members/{carol}", {"role": "owner"}).status_code == 201

    page = owner.get(f"/rooms/{name}/messages", params={"events": "all"}).json()
    items = page["messages"]
    assert [m["seq"] for m in items] == list(range(1, 12))
    assert page["last_seq"] == 11
    assert all(m["room"] == name for m in items)

    def view(m: dict[str, Any]) -> tuple[Any, ...]:
        if m["kind"] == "text":
            return ("text", m["author"], m["body"])
        return ("member", m["author"], m["user"], m["action"], m["role"])

    o, b = owner.user, bob.user
    assert [view(m) for m in items] == [
        ("member", o, o, "joined", "owner"),
        ("member", o, b, "joined", "member"),
        ("text", o, "one"),
        ("member", o, carol, "joined", "member"),
        ("text", b, "two"),
        ("member", o, carol, "role", "admin"),
        ("member", o, carol, "removed", None),
        ("text", o, "three"),
        ("member", b, b, "left", None),
        ("member", o, carol, "joined", "owner"),  # added again, as the owner
        ("member", o, o, "role", "admin"),
    ]
    member_item = items[3]
    # As REST gives messages: the websocket frame without its "type".
    assert set(member_item) == {
        "room",
        "seq",
        "id",
        "created_at",
        "kind",
        "author",
        "user",
        "action",
        "role",
    }

    default = owner.get(f"/rooms/{name}/messages").json()
    assert [(m["kind"], m["body"]) for m in default["messages"]] == [
        ("text", "one"),
        ("text", "two"),
        ("text", "three"),
    ]
    assert default["last_seq"] == 11
    assert default["next_before"] is None
    # The page ends before the stream does (member items follow): a forward cursor may be
    # given, and following it finds no text.
    if default["next_after"] is not None:
        more = owner.get(f"/rooms/{name}/messages", params={"after": default["next_after"]})
        assert (more.json()["messages"], more.json()["next_after"]) == ([], None)


def _page_through(api: Api, room: str, params: dict[str, Any], direction: str) -> list[int]:
    """Every seq met paging with ``limit=2`` from the newest page back (``before``) or from the
    start forward (``after``)."""
    seqs: list[int] = []
    cursor: dict[str, Any] = {} if direction == "before" else {"after": 0}
    for _ in range(50):
        r = api.get(f"/rooms/{room}/messages", params={**params, "limit": 2, **cursor})
        assert r.status_code == 200, r.text
        page = r.json()
        got = [m["seq"] for m in page["messages"]]
        assert len(got) <= 2
        assert got == sorted(got)
        if direction == "before":
            seqs = got + seqs
            if page["next_before"] is None:
                return seqs
            cursor = {"before": page["next_before"]}
        else:
            seqs += got
            if page["next_after"] is None:
                return seqs
            cursor = {"after": page["next_after"]}
    raise AssertionError("paging did not end")


@pytest.mark.parametrize("direction", ["before", "after"])
@pytest.mark.parametrize("events", [None, "all"])
def test_cursors_page_through_interleaved_items(server, direction, events):
    owner = Api(server, uid("own"))
    name = owner.create(uid("r"), "private", members=[uid("m")])["name"]  # seqs 1, 2
    texts: list[int] = []
    for i in range(7):
        texts.append(owner.say(name, f"t{i}")["seq"])
        for _ in range(i % 3):
            user = uid("m")
            assert owner.put(f"/rooms/{name}/members/{user}", {"role": "member"}).status_code == 201
    for _ in range(3):  # member items last: the newest text page is not the end of the stream
        assert owner.put(f"/rooms/{name}/members/{uid('m')}", {"role": "member"}).status_code == 201
    last = owner.get(f"/rooms/{name}").json()["last_seq"]

    params = {"events": events} if events else {}
    seqs = _page_through(owner, name, params, direction)
    assert seqs == (list(range(1, last + 1)) if events else texts)


# 7. Paging the room list and the member list


def test_room_list_pages(server):
    alice = Api(server, uid("alice"))
    prefix = uid("pg")
    names = [alice.create(f"{prefix}-{i}", ("private", "public")[i % 2])["name"] for i in range(5)]
    Api(server, uid("other")).create(f"{prefix}-2x", "private")  # not alice's: never listed
    seen: list[str] = []
    after: str | None = prefix
    pages = 0
    while after is not None:
        r = alice.get("/rooms", params={"limit": 2, "after": after})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["rooms"]) <= 2
        seen += [room["name"] for room in body["rooms"] if room["name"].startswith(prefix)]
        after = body["next_after"]
        if after is not None:
            assert after == body["rooms"][-1]["name"]
        pages += 1
        if after is not None and not after.startswith(prefix):
            break
    assert seen == names
    assert pages >= 3


def test_member_list_pages(server):
    owner = Api(server, uid("own"))
    members = sorted(f"m{i}-{uuid.uuid4().hex[:4]}" for i in range(6))
    name = owner.create(uid("r"), "private", members=members)["name"]
    seen: list[tuple[str, str]] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if after is not None:
            params["after"] = after
        r = owner.get(f"/rooms/{name}/members", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["members"]) <= 3
        fields = {"user", "role", "joined_at", "last_read_seq"}
        assert all(set(m) == fields for m in body["members"])
        seen += [(m["user"], m["role"]) for m in body["members"]]
        pages += 1
        after = body["next_after"]
        if after is None:
            break
        assert after == body["members"][-1]["user"]
    assert pages == 3
    assert seen == sorted([(owner.user, "owner"), *((m, "member") for m in members)])
    for params in ({"limit": 0}, {"limit": 1001}, {"after": ""}):
        assert owner.get(f"/rooms/{name}/members", params=params).status_code == 422


# Odds and ends a user would notice


@pytest.mark.parametrize(
    ("path_user", "body"),
    [
        ("x" * 129, {"role": "member"}),
        ("ok", {"role": "superuser"}),
        ("ok", {"role": "member", "extra": 1}),
        ("ok", {}),
        ("ok", {"role": None}),
    ],
)
def test_put_member_refuses_invalid_requests(server, path_user, body):
    owner = Api(server, uid("own"))
    name = owner.create(uid("r"), "private")["name"]
    r = owner.put(f"/rooms/{name}/members/{path_user}", body)
    assert r.status_code == 422, r.text
    assert owner.members(name) == {owner.user: "owner"}


@pytest.mark.parametrize("body", [{"user": ""}, {"user": "x" * 129}, {}, {"user": "b", "x": 1}])
def test_open_direct_refuses_invalid_bodies(server, body):
    assert Api(server, uid("alice")).post("/rooms/direct", body).status_code == 422


def test_patch_room_title(server):
    owner = Api(server, uid("own"))
    name = owner.create(uid("r"), "public", title="old")["name"]
    r = owner.patch(f"/rooms/{name}", {"title": "new"})
    assert (r.status_code, r.json()["title"], r.json()["role"]) == (200, "new", "owner")
    r = owner.patch(f"/rooms/{name}", {"title": None})
    assert (r.status_code, r.json()["title"]) == (200, None)
    assert owner.patch(f"/rooms/{name}", {"title": "x" * 201}).status_code == 422
    assert owner.patch(f"/rooms/{name}", {"name": "other"}).status_code == 422
    assert owner.get(f"/rooms/{name}").json()["title"] is None
    assert_error(owner.patch(f"/rooms/{uid('never')}", {"title": "t"}), 404, "not_found")


def test_a_deleted_room_is_gone_and_its_name_free(server):
    owner, bob = Api(server, uid("own")), Api(server, uid("bob"))
    name = owner.create(uid("r"), "private", members=[bob.user])["name"]
    owner.say(name, "old secret")
    assert owner.delete(f"/rooms/{name}").status_code == 204
    for api in (owner, bob):
        assert_error(api.get(f"/rooms/{name}"), 404, "not_found")
        assert_error(api.get(f"/rooms/{name}/messages"), 404, "not_found")
        assert_error(api.get(f"/rooms/{name}/members"), 404, "not_found")
        assert name not in api.listed()
    assert_error(owner.delete(f"/rooms/{name}"), 404, "not_found")
    # The name is free again, with nothing of the old room.
    again = bob.create(name, "public")
    assert (again["role"], again["last_seq"]) == ("owner", 1)
    assert owner.get(f"/rooms/{name}/messages").json()["messages"] == []
    assert bob.members(name) == {bob.user: "owner"}


def test_a_service_admin_hands_ownership_over(server):
    owner, bob = Api(server, uid("own")), uid("bob")
    admin = admin_api(server)
    name = owner.create(uid("r"), "private")["name"]
    r = admin.put(f"/rooms/{name}/members/{bob}", {"role": "owner"})
    assert (r.status_code, r.json()["role"]) == (201, "owner")
    assert owner.members(name) == {owner.user: "admin", bob: "owner"}
    items = owner.get(f"/rooms/{name}/messages", params={"events": "all"}).json()["messages"]
    assert [(m["author"], m["user"], m["action"], m["role"]) for m in items[1:]] == [
        ("svc", bob, "joined", "owner"),
        ("svc", owner.user, "role", "admin"),
    ]


async def test_concurrent_creates_of_one_name_make_one_room(server, second_server):
    name = uid("r")

    async def create(i: int) -> httpx.Response:
        base = (server, second_server)[i % 2].http
        async with httpx.AsyncClient(timeout=15) as client:
            return await client.post(
                f"{base}/rooms",
                json={"name": name, "kind": "private"},
                headers={"Authorization": f"Bearer {make_token(f'user{i}')}"},
            )

    answers = await asyncio.gather(*(create(i) for i in range(6)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [409] * 5, [r.text for r in answers]
    winner = next(i for i, r in enumerate(answers) if r.status_code == 201)
    assert Api(server, f"user{winner}").members(name) == {f"user{winner}": "owner"}


@pytest.fixture
def icu_database(pg_server_url):  # type: ignore[no-untyped-def]
    """A migrated database whose default collation is ICU English (as many installations'
    en_US are), not the byte order of the test server's: mixed case sorts "a" < "B"."""
    import asyncpg

    from service.db.migrate import upgrade
    from tests.support import database_url_for

    name = f"chat_test_icu_{uuid.uuid4().hex[:8]}"

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_server_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(
            run(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
                "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        )
    except asyncpg.PostgresError as exc:
        pytest.skip(f"no ICU database on this server: {exc}")
    url = database_url_for(pg_server_url, name)
    upgrade(url)
    yield url
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_member_list_pages_whatever_the_database_collation(spawn, icu_database):
    server = spawn(icu_database)
    owner = Api(server, "Owner")
    members = ["alice", "Bob", "carol", "Dave", "_eve", "Frank-1", "frank-2"]
    name = owner.create(uid("r"), "private", members=members)["name"]
    seen: list[str] = []
    after: str | None = None
    while True:
        r = owner.get(
            f"/rooms/{name}/members", params={"limit": 2, **({"after": after} if after else {})}
        )
        assert r.status_code == 200, r.text
        seen += [m["user"] for m in r.json()["members"]]
        after = r.json()["next_after"]
        if after is None:
            break
    assert sorted(seen) == sorted(["Owner", *members])  # none lost, none twice
    assert seen == sorted(seen)  # by user id, as the bytes compare
    # The room list too: every room once, on a database of its own (only these rooms).
    names = {owner.create(n, "public")["name"] for n in ["a-1", "B.2", "c_3", "D-4", "e5", "_f"]}
    names.add(name)
    listed: list[str] = []
    after = None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        body = owner.get("/rooms", params=params).json()
        listed += [room["name"] for room in body["rooms"]]
        after = body["next_after"]
        if after is None:
            break
    assert sorted(listed) == sorted(names)


def test_members_with_unusual_ids_are_managed_by_their_escaped_id(server):
    owner = Api(server, uid("own"))
    odd = f"Bob Smith+{uuid.uuid4().hex[:4]}@example.com"
    escaped = quote(odd, safe="")
    name = owner.create(uid("r"), "private")["name"]
    r = owner.put(f"/rooms/{name}/members/{escaped}", {"role": "admin"})
    assert (r.status_code, r.json()["user"]) == (201, odd)
    assert Api(server, odd).get(f"/rooms/{name}").json()["role"] == "admin"
    assert owner.delete(f"/rooms/{name}/members/{escaped}").status_code == 204
    assert owner.members(name) == {owner.user: "owner"}


def test_room_and_member_changes_are_rate_limited_per_user(spawn, own_database):
    """Changes come out of the user's send budget: a script churning rooms gets 429s with
    Retry-After, and nothing of what it was refused is stored."""
    slow = spawn(own_database, CHAT_USER_SEND_RATE="1")
    headers = {"Authorization": f"Bearer {make_token('churner')}"}
    answers = [
        httpx.post(
            f"{slow.http}/rooms",
            json={"name": f"churn-{i}-{uuid.uuid4().hex[:8]}", "kind": "private"},
            headers=headers,
        )
        for i in range(6)
    ]
    statuses = [r.status_code for r in answers]
    assert statuses[0] == 201 and 429 in statuses, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
    listed = httpx.get(f"{slow.http}/rooms", headers=headers).json()["rooms"]
    assert len(listed) == statuses.count(201)
