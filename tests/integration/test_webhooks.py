"""Outgoing webhooks against a real receiver (``tests.webhook_receiver``) and real
``chat-service`` processes: every kind of item, signed, in order per room, through receiver
downtime, a killed replica and two replicas at once; dead letters; delete redaction; the admin
routes."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.db.embedded import EmbeddedPostgres
from service.db.migrate import downgrade, upgrade
from tests.support import Client, ServerProcess, make_token
from tests.webhook_receiver import Receiver, verify

SECRET = secrets.token_urlsafe(48)
ADMIN = make_token("svc", roles=["chat:admin"])
FAST = {
    "CHAT_WEBHOOK_SECRET": SECRET,
    "CHAT_WEBHOOK_BACKOFF": "0.05",
    "CHAT_WEBHOOK_BACKOFF_MAX": "0.2",
    "CHAT_WEBHOOK_POLL_INTERVAL": "0.5",
    "CHAT_WEBHOOK_TIMEOUT": "2",
}


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def start(spawn: Any, database: str, **env: str) -> ServerProcess:
    """A replica, started off the event loop: the receiver runs on it meanwhile."""
    server: ServerProcess = await asyncio.to_thread(spawn, database, **{**FAST, **env})
    return server


async def post(server: ServerProcess, room: str, body: str, user: str = "alice") -> int:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{server.http}/rooms/{room}/messages",
            json={"body": body},
            headers=auth(make_token(user)),
        )
    assert r.status_code == 201, r.text
    seq: int = r.json()["seq"]
    return seq


async def metric_reaches(server: ServerProcess, name: str, value: float) -> None:
    """Until the metric is ``value`` (gauges are refreshed every second or so)."""
    for _ in range(100):
        if await asyncio.to_thread(server.metric, name) == value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} is {server.metric(name)}, not {value}")


def room_name() -> str:
    return f"w-{uuid.uuid4().hex[:10]}"


def seqs(items: list[dict[str, Any]]) -> list[int]:
    return [i["seq"] for i in items]


async def test_every_kind_is_posted_signed_as_the_websocket_frame_in_order(
    own_database, spawn, receiver
):
    server = await start(spawn, own_database, CHAT_WEBHOOK_URL=receiver.url)
    room = room_name()
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.post(
            "/rooms",
            json={"name": room, "kind": "private", "members": ["alice", "bob"]},
            headers=auth(ADMIN),
        )
        assert r.status_code == 201, r.text
        watcher = await Client.connect(server, room, make_token("alice"))
        one = await post(server, room, "one")
        two = await post(server, room, "two", user="bob")
        r = await http.patch(
            f"/rooms/{room}/messages/{one}",
            json={"body": "one!"},
            headers=auth(make_token("alice")),
        )
        assert r.status_code == 200, r.text
        r = await http.put(
            f"/rooms/{room}/messages/{two}/reactions/👍", headers=auth(make_token("alice"))
        )
        assert r.status_code in (200, 201), r.text
        r = await http.delete(f"/rooms/{room}/messages/{one}", headers=auth(make_token("alice")))
        assert r.status_code == 200, r.text
    live = {}  # what the socket got live: items 4 to 8
    while len(live) < 5:
        frame = await watcher.recv()
        if frame["type"] == "message":
            live[frame["seq"]] = frame
    await watcher.close()
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 8)
    items = receiver.delivered_items(room)
    assert seqs(items) == list(range(1, 9))  # the owner (the admin), two members, ...
    assert [i["kind"] for i in items] == [
        "member", "member", "member", "text", "text", "edit", "reaction", "delete"
    ]  # fmt: skip
    for request in receiver.delivered():
        assert request.headers["content-type"] == "application/json"
        assert verify(SECRET, request.headers["x-chat-signature"], request.body)
        assert not verify("another" + SECRET, request.headers["x-chat-signature"], request.body)
    # The frame itself; items that nothing changed since are byte for byte what the socket got
    # (the first text and its edit are sent as they are now if they were still queued).
    for item in items[3:]:
        if item["seq"] not in (one, one + 2):
            assert item == live[item["seq"]]
    assert server.metric("chat_webhooks_delivered_total") == 8


async def test_delete_redacts_the_queued_copies_of_the_text_and_its_edits(
    own_database, spawn, receiver
):
    down = asyncio.Event()
    down.set()

    async def answer(_request):  # type: ignore[no-untyped-def]
        return 503 if down.is_set() else 200

    receiver.answer = answer
    server = await start(spawn, own_database, CHAT_WEBHOOK_URL=receiver.url)
    room = room_name()
    secret_seq = await post(server, room, "my password is hunter2")
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        token = auth(make_token("alice"))
        r = await http.patch(
            f"/rooms/{room}/messages/{secret_seq}", json={"body": "oops hunter3"}, headers=token
        )
        assert r.status_code == 200
        r = await http.delete(f"/rooms/{room}/messages/{secret_seq}", headers=token)
        assert r.status_code == 200
    await receiver.wait_for(lambda: len(receiver.requests) >= 2)  # failing meanwhile
    await metric_reaches(server, "chat_webhook_backlog", 3)
    assert await asyncio.to_thread(server.metric, "chat_webhook_oldest_age_seconds") > 0
    down.clear()
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 3)
    text, edit, delete = receiver.delivered_items(room)
    assert (text["kind"], text["body"], text["deleted"]) == ("text", None, True)
    assert (edit["kind"], edit["body"]) == ("edit", None)
    assert (delete["kind"], delete["target_seq"]) == ("delete", secret_seq)
    assert all(b"hunter" not in r.body for r in receiver.delivered())


async def test_retries_through_receiver_downtime_lose_nothing_and_keep_order(
    own_database, spawn, receiver
):
    server = await start(
        spawn, own_database, CHAT_WEBHOOK_URL=receiver.url, CHAT_WEBHOOK_MAX_ATTEMPTS="1000"
    )
    rooms = [room_name() for _ in range(3)]
    await receiver.stop()  # refused
    for i in range(10):
        for room in rooms:
            await post(server, room, f"m{i}")
    await asyncio.sleep(0.5)  # waiting out retries against a refused port, by design
    failing = True

    def answer(_request):  # type: ignore[no-untyped-def]
        return 503 if failing else 200

    receiver.answer = answer
    await receiver.start()  # same port: 503s for a while
    await receiver.wait_for(lambda: len(receiver.requests) >= 3)
    failing = False
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 30)
    for room in rooms:
        assert seqs(receiver.delivered_items(room)) == list(range(1, 11))
    assert len(receiver.delivered()) == 30
    assert server.metric("chat_webhooks_retried_total") >= 3
    assert server.metric("chat_webhooks_dead_lettered_total") == 0


@pytest.mark.slow
async def test_a_killed_replica_delivers_its_backlog_after_restart(own_database, spawn, receiver):
    receiver.answer = lambda _r: 503
    server = await start(spawn, own_database, CHAT_WEBHOOK_URL=receiver.url)
    room = room_name()
    for i in range(10):
        await post(server, room, f"m{i}")
    await receiver.wait_for(lambda: len(receiver.requests) >= 2)
    server.stop(signal.SIGKILL)
    receiver.answer = lambda _r: 200
    again = await start(spawn, own_database, CHAT_WEBHOOK_URL=receiver.url)
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 10)
    await post(again, room, "after")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 11)
    assert seqs(receiver.delivered_items(room)) == list(range(1, 12))


@pytest.mark.slow
async def test_a_postgresql_crash_mid_delivery_repeats_items_never_skips_one(spawn, receiver):
    """PostgreSQL killed while items are being delivered and stored (an immediate shutdown:
    no checkpoint, crash recovery at the next start). Every stored item still reaches the
    receiver, first seen in seq order; one whose settle the crash cut off is sent again."""

    async def answer(_request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.02)  # deliveries in flight at the crash
        return 200

    receiver.answer = answer
    data_dir = Path(tempfile.mkdtemp(prefix="chat-webhook-crash-"))
    pg = EmbeddedPostgres(data_dir)
    try:
        url = await asyncio.to_thread(pg.start)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        await asyncio.to_thread(upgrade, url)
        server = await start(spawn, url, CHAT_WEBHOOK_URL=receiver.url)
        rooms = [room_name() for _ in range(2)]
        last_seq = dict.fromkeys(rooms, 0)

        async def store(http: httpx.AsyncClient, room: str, body: str) -> None:
            """POST until stored, through the outage (a 503 may still have stored it: the
            room's seqs tell what was)."""
            for _ in range(300):
                try:
                    r = await http.post(
                        f"{server.http}/rooms/{room}/messages",
                        json={"body": body},
                        headers=auth(make_token("alice")),
                    )
                except httpx.TransportError:
                    r = None
                if r is not None and r.status_code == 201:
                    last_seq[room] = max(last_seq[room], r.json()["seq"])
                    return
                assert r is None or r.status_code == 503, r.text
                await asyncio.sleep(0.1)
            raise AssertionError(f"{room}: not stored within 30 s")

        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(30):
                for room in rooms:
                    await store(http, room, f"before {i}")
            await receiver.wait_for(lambda: len(receiver.delivered()) >= 5)
            postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown: no checkpoint, no flush
            for _ in range(100):
                if not (pg.pgdata / "postmaster.pid").exists():
                    break
                await asyncio.sleep(0.1)
            pg.stop()
            await asyncio.to_thread(pg.start, port=port)
            for i in range(10):
                for room in rooms:
                    await store(http, room, f"after {i}")

        def all_sent() -> bool:
            return all(
                set(seqs(receiver.delivered_items(room))) >= set(range(1, last_seq[room] + 1))
                for room in rooms
            )

        await receiver.wait_for(all_sent, timeout=60)
        assert "automatic recovery in progress" in pg.log_path.read_text(errors="replace")
        for room in rooms:
            assert last_seq[room] >= 40
            got = seqs(receiver.delivered_items(room))
            assert list(dict.fromkeys(got)) == list(range(1, last_seq[room] + 1))
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_items_go_out_at_once_without_the_poll_idle_busy_and_across_replicas(
    own_database, spawn, receiver
):
    """The poll is a minute here: every item must be sent on a wake-up. An idle room's first
    item wakes the deliverers (the trigger's NOTIFY, heard on the bus's LISTEN connection);
    items stored while the room's head is in flight go out right after it (its sender claims
    the next), whichever replica stored them."""

    async def answer(_request):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)  # long enough for items to queue up behind the one in flight
        return 200

    receiver.answer = answer
    env = {"CHAT_WEBHOOK_URL": receiver.url, "CHAT_WEBHOOK_POLL_INTERVAL": "60"}
    replicas = [await start(spawn, own_database, **env) for _ in range(2)]
    await asyncio.sleep(1)  # past the wake-up each deliverer gives itself as it subscribes
    loop = asyncio.get_running_loop()
    room = room_name()

    started = loop.time()
    await post(replicas[0], room, "first")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 1, timeout=5)
    for i in range(6):  # while each is in flight, more queue behind it, from both replicas
        await post(replicas[i % 2], room, f"busy {i}")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 7, timeout=10)
    await asyncio.sleep(1)  # the room's queue is idle again
    await post(replicas[1], room, "idle again")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 8, timeout=5)
    assert loop.time() - started < 20  # far from the minute's poll
    assert seqs(receiver.delivered_items(room)) == list(range(1, 9))
    assert receiver.max_in_flight_per_room == 1


@pytest.mark.slow
async def test_two_replicas_never_send_an_item_twice_at_once_nor_skip_one(
    own_database, spawn, receiver
):
    calls = 0

    async def answer(_request):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # a POST takes time: overlaps would show
        return 503 if calls % 7 == 0 else 200

    receiver.answer = answer
    env = {"CHAT_WEBHOOK_URL": receiver.url, "CHAT_WEBHOOK_CONCURRENCY": "4"}
    replicas = [await start(spawn, own_database, **env) for _ in range(2)]
    rooms = [room_name() for _ in range(4)]

    async def write(room: str) -> None:
        for i in range(15):
            await post(replicas[i % 2], room, f"m{i}")

    await asyncio.gather(*(write(room) for room in rooms))
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 60, timeout=60)
    for room in rooms:
        assert seqs(receiver.delivered_items(room)) == list(range(1, 16))
    assert receiver.max_in_flight_per_room == 1
    assert len(receiver.delivered()) == 60
    delivered = sum(s.metric("chat_webhooks_delivered_total") for s in replicas)
    assert delivered == 60
    assert all(s.metric("chat_webhooks_delivered_total") > 0 for s in replicas)


async def test_dead_letter_after_max_attempts_then_the_room_goes_on_and_retry_sends_it(
    own_database, spawn, receiver
):
    def answer(request):  # type: ignore[no-untyped-def]
        return 500 if b"poison" in request.body else 200

    receiver.answer = answer
    server = await start(
        spawn, own_database, CHAT_WEBHOOK_URL=receiver.url, CHAT_WEBHOOK_MAX_ATTEMPTS="3"
    )
    room = room_name()
    await post(server, room, "poison")
    await post(server, room, "fine")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 1)
    attempts = [r.item["seq"] for r in receiver.requests]
    assert attempts == [1, 1, 1, 2]  # the next item waits for the dead letter
    assert server.metric("chat_webhooks_dead_lettered_total") == 1
    assert server.metric("chat_webhooks_retried_total") == 2
    await metric_reaches(server, "chat_webhook_dead_letters", 1)
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.get("/admin/webhooks/dead-letters", headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        (dead,) = [d for d in r.json()["dead_letters"] if d["room"] == room]
        assert (dead["seq"], dead["attempts"], dead["hook"]) == (1, 3, "global")
        assert dead["last_error"] == "HTTP 500"
        receiver.answer = lambda _r: 200
        r = await http.post(
            "/admin/webhooks/dead-letters/retry", json={"room": room}, headers=auth(ADMIN)
        )
        assert r.json() == {"retried": 1}
        await receiver.wait_for(lambda: len(receiver.delivered()) >= 2)
        assert seqs(receiver.delivered_items(room)) == [2, 1]
        r = await http.get(f"/admin/webhooks/dead-letters?room={room}", headers=auth(ADMIN))
        assert r.json() == {"dead_letters": [], "more": False}
    await metric_reaches(server, "chat_webhook_dead_letters", 0)
    await metric_reaches(server, "chat_webhook_backlog", 0)


async def test_a_room_registration_gets_its_rooms_items_and_admin_input_is_checked(
    own_database, spawn, receiver
):
    server = await start(spawn, own_database)  # no global URL: room registrations only
    room, other = room_name(), room_name()
    await post(server, room, "before any registration")
    await post(server, other, "never registered")
    user = auth(make_token("alice"))
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        path = f"/rooms/{room}/webhook"
        assert (await http.put(path, json={"url": receiver.url})).status_code == 401
        r = await http.put(path, json={"url": receiver.url}, headers=user)
        assert r.status_code == 403, r.text
        assert (await http.get(path, headers=user)).status_code == 403
        assert (await http.delete(path, headers=user)).status_code == 403
        r = await http.get("/admin/webhooks/dead-letters", headers=user)
        assert r.status_code == 403
        r = await http.post("/admin/webhooks/dead-letters/retry", json={}, headers=user)
        assert r.status_code == 403
        for bad, reason in [
            ({"url": "ftp://example.com/x"}, "https://"),
            ({"url": "not a url"}, "spaces"),
            ({"url": "no-scheme.example.com/x"}, "https://"),
            ({"url": "http://"}, "https://"),
            ({"url": "https://example.com/" + "x" * 2000}, "2000"),
            ({"url": "https://example.com:99999/"}, "port"),
            ({"url": 5}, "string"),
            ({"uri": receiver.url}, "url"),
            ({"url": receiver.url, "extra": 1}, "extra"),
        ]:
            r = await http.put(path, json=bad, headers=auth(ADMIN))
            assert r.status_code == 422, (bad, r.text)
            assert reason in r.text, (bad, r.text)
        r = await http.put(
            path, content=b"{", headers={**auth(ADMIN), "content-type": "application/json"}
        )
        assert r.status_code == 422
        r = await http.put(
            "/rooms/no-such-room/webhook", json={"url": receiver.url}, headers=auth(ADMIN)
        )
        assert r.status_code == 404
        r = await http.get(path, headers=auth(ADMIN))
        assert r.status_code == 404
        r = await http.get("/admin/webhooks/dead-letters?limit=0", headers=auth(ADMIN))
        assert r.status_code == 422
        r = await http.post(
            "/admin/webhooks/dead-letters/retry", json={"room": "../x"}, headers=auth(ADMIN)
        )
        assert r.status_code == 422

        r = await http.put(path, json={"url": receiver.url}, headers=auth(ADMIN))
        assert r.status_code == 200, r.text
        assert r.json()["url"] == receiver.url and r.json()["room"] == room
        assert (await http.get(path, headers=auth(ADMIN))).json()["url"] == receiver.url
        await post(server, room, "after")
        await post(server, other, "not for this receiver")
        await receiver.wait_for(lambda: len(receiver.delivered()) >= 1)
        (item,) = receiver.delivered_items()
        assert (item["room"], item["seq"], item["body"]) == (room, 2, "after")
        assert verify(
            SECRET,
            receiver.delivered()[0].headers["x-chat-signature"],
            receiver.delivered()[0].body,
        )

        assert (await http.delete(path, headers=auth(ADMIN))).status_code == 204
        assert (await http.get(path, headers=auth(ADMIN))).status_code == 404
        assert (await http.delete(path, headers=auth(ADMIN))).status_code == 404
    await post(server, room, "after removal")
    await asyncio.sleep(0.3)  # proving that nothing more arrives
    assert len(receiver.requests) == 1


async def test_registration_is_refused_without_a_secret(own_database, spawn, receiver):
    server = await asyncio.to_thread(spawn, own_database)
    room = room_name()
    await post(server, room, "x")
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.put(
            f"/rooms/{room}/webhook", json={"url": receiver.url}, headers=auth(ADMIN)
        )
    assert r.status_code == 422
    assert "CHAT_WEBHOOK_SECRET" in r.text


async def test_a_receiver_that_never_answers_does_not_slow_sends(own_database, spawn, receiver):
    hang = asyncio.Event()

    async def answer(_request):  # type: ignore[no-untyped-def]
        await hang.wait()
        return 200

    receiver.answer = answer
    server = await start(
        spawn, own_database, CHAT_WEBHOOK_URL=receiver.url, CHAT_WEBHOOK_TIMEOUT="30"
    )
    room = room_name()
    await post(server, room, "first")  # its POST hangs from now on
    client = await Client.connect(server, room, make_token("bob"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(20):  # a burst: group commit stores it in a few multi-row batches
        await client.send(f"m{i}", f"c{i}")
    acks = [(await client.recv_type("ack"))["seq"] for _ in range(20)]
    assert acks == list(range(2, 22))
    assert loop.time() - started < 5
    assert receiver.requests == []  # still hanging on the first
    await client.close()
    hang.set()
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 21)
    assert seqs(receiver.delivered_items(room)) == list(range(1, 22))


@pytest.mark.slow
async def test_an_item_leased_by_a_killed_replica_is_taken_over_once_its_lease_runs_out(
    own_database, spawn, receiver
):
    """The lease: while the first replica's POST hangs, the second sends neither that item nor
    the room's next; killed, the first leaves the item to the second once its lease (the POST's
    deadline plus a margin) has run out, never before."""
    hang = asyncio.Event()
    first = True

    async def answer(_request):  # type: ignore[no-untyped-def]
        nonlocal first
        if first:
            first = False
            await hang.wait()
        return 200

    receiver.answer = answer
    timeout = 15  # the lease must outlast the second replica's start on a busy box
    env = {"CHAT_WEBHOOK_URL": receiver.url, "CHAT_WEBHOOK_TIMEOUT": str(timeout)}
    holder = await start(spawn, own_database, **env)
    room = room_name()
    for i in range(3):
        await post(holder, room, f"m{i}")
    await receiver.wait_for(lambda: receiver.in_flight.get(room) == 1)
    loop = asyncio.get_running_loop()
    claimed_at = loop.time()
    other = await start(spawn, own_database, **env)
    await asyncio.sleep(1)  # two of its polls: proving that it sends nothing meanwhile
    assert loop.time() - claimed_at < timeout, "the second replica started too slowly to tell"
    assert receiver.requests == [] and receiver.in_flight[room] == 1
    holder.stop(signal.SIGKILL)
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 3, timeout=30)
    assert loop.time() - claimed_at >= timeout  # not before the killed replica's lease ran out
    assert seqs(receiver.delivered_items(room)) == [1, 2, 3]
    # (The dead replica's request is still open on the receiver's side: a receiver can see an
    # item again while the first copy's sender is gone, hence deduplication by (room, seq).)
    assert other.metric("chat_webhooks_delivered_total") == 3
    hang.set()


@pytest.mark.slow
async def test_a_replica_stopped_mid_post_hands_its_lease_over_at_once(
    own_database, spawn, receiver
):
    """SIGTERM (a rolling deploy): the cut-off POST's lease is released, so another replica
    sends the item without waiting for the lease (here 32 s) to run out."""
    hang = asyncio.Event()
    first = True

    async def answer(_request):  # type: ignore[no-untyped-def]
        nonlocal first
        if first:
            first = False
            await hang.wait()
        return 200

    receiver.answer = answer
    env = {
        "CHAT_WEBHOOK_URL": receiver.url,
        "CHAT_WEBHOOK_TIMEOUT": "30",
        "CHAT_DRAIN_SECONDS": "1",
    }
    leaving = await start(spawn, own_database, **env)
    room = room_name()
    await post(leaving, room, "one")
    await post(leaving, room, "two")
    await receiver.wait_for(lambda: receiver.in_flight.get(room) == 1)
    staying = await start(spawn, own_database, **env)
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    await asyncio.to_thread(leaving.stop)
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 2, timeout=20)
    assert loop.time() - stopped_at < 15
    assert seqs(receiver.delivered_items(room)) == [1, 2]
    assert staying.metric("chat_webhooks_delivered_total") == 2
    hang.set()


async def test_queued_items_of_a_deleted_room_are_dropped(own_database, spawn, receiver):
    down = True

    def answer(_request):  # type: ignore[no-untyped-def]
        return 503 if down else 200

    receiver.answer = answer
    server = await start(spawn, own_database, CHAT_WEBHOOK_URL=receiver.url)
    gone, kept = room_name(), room_name()
    await post(server, gone, "a")
    await post(server, gone, "b")
    await receiver.wait_for(lambda: len(receiver.requests) >= 1)
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.delete(f"/rooms/{gone}", headers=auth(ADMIN))
        assert r.status_code == 204, r.text
    down = False
    await post(server, kept, "c")
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 1)
    assert [(i["room"], i["seq"]) for i in receiver.delivered_items()] == [(kept, 1)]
    await asyncio.sleep(0.3)  # proving that nothing of the deleted room follows
    assert len(receiver.delivered()) == 1


@pytest.mark.slow
async def test_rooms_going_idle_and_busy_under_two_replicas_never_stall_a_cursor(
    own_database, spawn, receiver
):
    """A receiver that answers at once catches up after nearly every item: each room's cursor
    goes idle and pending again over and over, while both replicas store more. An item stored
    as a deliverer marks the cursor idle must be seen by one or the other (the share lock on
    the room row): with the poll at a minute, a cursor left idle behind its room would stall
    the test."""
    env = {"CHAT_WEBHOOK_URL": receiver.url, "CHAT_WEBHOOK_POLL_INTERVAL": "60"}
    replicas = [await start(spawn, own_database, **env) for _ in range(2)]
    await asyncio.sleep(1)  # past the wake-up each deliverer gives itself as it subscribes
    rooms = [room_name() for _ in range(3)]

    async def write(n: int, room: str) -> None:
        for i in range(40):
            await post(replicas[(n + i) % 2], room, f"m{i}")
            if i % 5 == n:
                await asyncio.sleep(0.02)  # long enough for the cursor to catch up and idle

    await asyncio.gather(*(write(n, room) for n, room in enumerate(rooms)))
    await receiver.wait_for(lambda: len(receiver.delivered()) >= 120, timeout=20)
    for room in rooms:
        assert seqs(receiver.delivered_items(room)) == list(range(1, 41))
    assert receiver.max_in_flight_per_room == 1


async def _store(conn: asyncpg.Connection, room: str, body: str) -> None:
    """An item stored as the release of migration 0010 stores it (its functions are the same)."""
    await conn.execute(
        "SELECT * FROM chat_post_messages(ARRAY[$1], ARRAY[$1], ARRAY['alice'], ARRAY[$2],"
        " ARRAY[NULL::text], ARRAY[NULL::bigint], ARRAY[NULL::bigint], false)",
        room,
        body,
    )


async def _register(conn: asyncpg.Connection, room: str, url: str) -> None:
    """A registration as the release of migration 0010 makes it (no cursor)."""
    await conn.execute(
        "INSERT INTO webhook (room_id, url) SELECT id, $2 FROM room WHERE name = $1", room, url
    )


async def test_upgrading_from_the_outbox_sends_what_it_held_first_and_loses_nothing(
    fresh_database, spawn, receiver
):
    """Migration 0011 moves delivery from an outbox row per item to a cursor per room: what
    0010 had queued goes out first, in order, then the room's later items; a room registered
    by 0010's code afterwards gets its cursor; a downgrade puts what the cursors still had to
    send back into the outbox, and upgrading again sends it once."""
    own = Receiver()
    await own.start()
    url = await asyncio.to_thread(fresh_database)
    await asyncio.to_thread(upgrade, url, "0010")
    conn = await asyncpg.connect(url, server_settings={"chat.webhook": "on"})
    try:
        a, b, c = room_name(), room_name(), room_name()
        for i in range(3):
            await _store(conn, a, f"a{i}")
        await _store(conn, b, "b0")
        await _register(conn, b, own.url)
        await _store(conn, b, "b1")
        # a1-a3 and b1-b2 for the global receiver, b2 for the room's own
        assert await conn.fetchval("SELECT count(*) FROM webhook_outbox") == 6

        await asyncio.to_thread(upgrade, url)
        await _store(conn, c, "c0")
        await _register(conn, c, own.url)  # by a replica still on 0010's code
        server = await start(spawn, url, CHAT_WEBHOOK_URL=receiver.url)
        for _ in range(100):  # the deliverer gives it a cursor from the next item on
            if await conn.fetchval(
                "SELECT count(*) FROM webhook_cursor w JOIN room r ON r.id = w.room_id"
                " WHERE w.hook = 'room' AND r.name = $1",
                c,
            ):
                break
            await asyncio.sleep(0.1)
        for room in (a, b, c):
            await post(server, room, "after")
        await receiver.wait_for(lambda: len(receiver.delivered()) >= 4 + 3 + 2)
        await own.wait_for(lambda: len(own.delivered()) >= 2 + 1)
        assert seqs(receiver.delivered_items(a)) == [1, 2, 3, 4]
        assert seqs(receiver.delivered_items(b)) == [1, 2, 3]
        assert seqs(receiver.delivered_items(c)) == [1, 2]
        assert seqs(own.delivered_items(b)) == [2, 3]
        assert seqs(own.delivered_items(c)) == [2]
        assert await conn.fetchval("SELECT count(*) FROM webhook_outbox") == 0

        receiver.answer = lambda _r: 503
        for i in range(3):
            await post(server, a, f"while down {i}")
        await receiver.wait_for(lambda: len(receiver.requests) >= 4 + 3 + 2 + 1)
        server.stop()
        await asyncio.to_thread(downgrade, url, "0010")
        queued = await conn.fetch(
            "SELECT o.hook, o.seq FROM webhook_outbox o JOIN room r ON r.id = o.room_id"
            " WHERE r.name = $1 ORDER BY o.seq",
            a,
        )
        assert [tuple(q) for q in queued] == [("global", 5), ("global", 6), ("global", 7)]
        await asyncio.to_thread(upgrade, url)
        receiver.answer = lambda _r: 200
        again = await start(spawn, url, CHAT_WEBHOOK_URL=receiver.url)
        await post(again, a, "back")
        await receiver.wait_for(lambda: len(receiver.delivered()) >= 4 + 3 + 2 + 4)
        await asyncio.sleep(0.3)  # proving that nothing is sent twice
        assert seqs(receiver.delivered_items(a)) == list(range(1, 9))
    finally:
        await conn.close()
        await own.stop()
