"""``service.client`` against real replicas and real faults: what a user of ``ChatClient``
would notice (the events it yields, the rows stored), never a mock of the server.

Each fault test gives the client short keepalive and backoff settings so a dead path is
noticed in about a second; everything else is the client's default behaviour.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import TypeVar

import asyncpg
import pytest

from service.client import (
    AuthError,
    ChatClient,
    Delete,
    Disconnected,
    Edit,
    Event,
    Forbidden,
    HTTPStatusError,
    Item,
    MemberChange,
    Presence,
    ReactionChange,
    Read,
    Ready,
    Receipt,
    Reset,
    Room,
    SendError,
    TextMessage,
    Typing,
    UnknownItem,
)
from tests.proxy import SilentProxy
from tests.support import make_token

TIMEOUT = 20.0
E = TypeVar("E")
FAST = {"ping_interval": 0.5, "ping_timeout": 1.0, "backoff_min": 0.05, "backoff_max": 0.5}
"""A dead path noticed within about 1.5 s, a reconnect within half a second."""


def new_room() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


async def items_until(room: Room, last_seq: int, seen: list[Event] | None = None) -> list[Item]:
    """The stream items ``room`` yields until one has ``last_seq``; every event in ``seen``."""
    items: list[Item] = []
    while not items or items[-1].seq < last_seq:
        event = await room.next_event(TIMEOUT)
        if seen is not None:
            seen.append(event)
        if isinstance(event, Item):
            items.append(event)
    return items


async def next_of(room: Room, kind: type[E]) -> E:
    """The next event of ``kind`` (the others are dropped)."""
    while True:
        event = await room.next_event(TIMEOUT)
        if isinstance(event, kind):
            return event


async def stored(database_url: str, room: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT m.seq, m.kind, m.author, m.body, m.client_msg_id FROM message m "
            "JOIN room r ON r.id = m.room_id WHERE r.name = $1 ORDER BY m.seq",
            room,
        )
    finally:
        await conn.close()


async def test_every_kind_arrives_typed_in_order_and_sends_return_what_was_stored(
    server, database_url
):
    room = new_room()
    async with (
        ChatClient(server.http, token=make_token("alice")) as alice,
        ChatClient(server.http, token=make_token("bob")) as bob,
    ):
        mine = await alice.join(room)
        theirs = await bob.join(room)
        first = await mine.send("hello", client_msg_id="hello-1")
        assert (first.seq, first.author, first.body, first.client_msg_id) == (
            1,
            "alice",
            "hello",
            "hello-1",
        )
        reply = await theirs.send("hi alice", reply_to=first.seq)
        edit = await mine.edit(first.seq, "hello!")
        react = await theirs.react(first.seq, "\N{THUMBS UP SIGN}")
        with pytest.raises(SendError) as refused:  # not hers to delete: nothing stored
            await mine.delete(reply.seq)
        assert refused.value.code == "forbidden"
        delete = await theirs.delete(reply.seq)
        joined = await alice.rest.set_member(room, "alice")
        seen = await items_until(theirs, delete.seq + 1)

        assert [type(item) for item in seen] == [
            TextMessage,
            TextMessage,
            Edit,
            ReactionChange,
            Delete,
            MemberChange,
        ]
        assert [item.seq for item in seen] == [1, 2, 3, 4, 5, 6]
        text, answer, edited, reaction, deleted, member = seen
        assert isinstance(text, TextMessage) and text.body == "hello" and text.author == "alice"
        assert isinstance(answer, TextMessage) and answer.reply_to is not None
        assert (answer.reply_to.seq, answer.reply_to.quote) == (1, "hello")
        assert isinstance(edited, Edit) and (edited.target_seq, edited.body) == (1, "hello!")
        assert edit.seq == edited.seq and react.seq == reaction.seq
        assert isinstance(reaction, ReactionChange) and reaction.on and reaction.author == "bob"
        assert isinstance(deleted, Delete) and deleted.target_seq == reply.seq
        assert isinstance(member, MemberChange)
        assert (member.user, member.action, member.role) == ("alice", "joined", "member")
        assert joined["role"] == "member"

        page = await bob.rest.history(room)
        assert [(m.seq, getattr(m, "body", None)) for m in page.items] == [(1, "hello!"), (2, None)]
        everything = await bob.rest.history(room, every_kind=True)
        assert [m.seq for m in everything.items] == [1, 2, 3, 4, 5, 6]
        rooms = await alice.rest.rooms(mine=True)  # other tests' rooms of alice may be there
        assert [r["role"] for r in rooms["rooms"] if r["name"] == room] == ["member"]
        posted = await alice.rest.post_message(room, "over REST")
        assert posted.seq == 7 and posted.author == "alice"
        with pytest.raises(HTTPStatusError) as missing:
            await alice.rest.history("never-used-" + room)
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        with pytest.raises(HTTPStatusError) as taken:
            await bob.rest.create_room(room)
        assert (taken.value.status, taken.value.code) == (409, "room_exists")
        with pytest.raises(HTTPStatusError) as reserved:
            await bob.rest.create_room("dm.mine")
        assert (reserved.value.status, reserved.value.code) == (422, "validation")
        direct = await alice.rest.direct("bob")
        assert direct["name"] == "dm.alice.bob" and direct["kind"] == "direct"
        assert [m["user"] for m in (await bob.rest.members(direct["name"]))["members"]] == [
            "alice",
            "bob",
        ]
    rows = await stored(database_url, room)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, 1006), (signal.SIGTERM, 1012)])
async def test_replica_stopped_mid_send_every_acked_message_arrives_once_in_order(
    own_database, spawn, sig, code
):
    """The writer and the reader are on replica A when it is killed (no close frame) or stopped
    (1012) in the middle of a run of sends: both resume on B; every send is acked once, stored
    once, received once, in order."""
    doomed, survivor = spawn(own_database), spawn(own_database)
    room, urls, count = new_room(), [doomed.http, survivor.http], 40
    async with (
        ChatClient(urls, token=make_token("writer"), **FAST) as writer,
        ChatClient(urls, token=make_token("reader"), **FAST) as reader,
    ):
        outbox = await writer.join(room)
        inbox = await reader.join(room)
        assert outbox.connected_url == inbox.connected_url == doomed.http

        async def send(i: int) -> TextMessage:
            await asyncio.sleep(i * 0.02)
            return await outbox.send(f"m{i}", timeout=TIMEOUT)

        sends = [asyncio.create_task(send(i)) for i in range(count)]
        await asyncio.sleep(count * 0.02 / 2)
        await asyncio.to_thread(doomed.stop, sig)
        acked = await asyncio.gather(*sends)
        assert outbox.connected_url == survivor.http

        events: list[Event] = []
        received = await items_until(inbox, count, events)
        page = await writer.rest.history(room, limit=100)  # REST follows to the survivor too
        assert [m.seq for m in page.items] == list(range(1, count + 1))
    assert sorted(m.seq for m in acked) == list(range(1, count + 1))
    assert [m.seq for m in received] == list(range(1, count + 1))  # once each, in order
    by_seq = {m.seq: m.body for m in acked}
    assert all(isinstance(m, TextMessage) and m.body == by_seq[m.seq] for m in received)
    assert [e.code for e in events if isinstance(e, Disconnected)] == [code]
    rows = await stored(own_database, room)
    assert sorted(r["body"] for r in rows) == sorted(f"m{i}" for i in range(count))


async def test_silent_network_cut_is_noticed_by_the_ping_deadline_and_resumed(server):
    """The path to the server black-holes (no RST): keepalive pings go unanswered, the client
    drops the connection, reconnects through the proxy and resumes with what it missed."""
    room = new_room()
    with SilentProxy("127.0.0.1", server.port) as proxy:
        async with (
            ChatClient(f"http://127.0.0.1:{proxy.port}", token=make_token("r"), **FAST) as r,
            ChatClient(server.http, token=make_token("w")) as w,
        ):
            inbox, outbox = await r.join(room), await w.join(room)
            for i in range(3):
                await outbox.send(f"before {i}")
            assert [m.seq for m in await items_until(inbox, 3)] == [1, 2, 3]
            assert proxy.freeze() == 1
            for i in range(3):
                await outbox.send(f"during {i}")
            events: list[Event] = []
            items = await items_until(inbox, 6, events)
            assert [m.seq for m in items] == [4, 5, 6]
            assert isinstance(events[0], Disconnected) and events[0].code == 1006
            while not isinstance(events[-1], Ready):  # it follows the replay it announces
                events.append(await inbox.next_event(TIMEOUT))
            assert events[-1].recovered and events[-1].last_seq == 6
            assert proxy.connections == 2


async def test_token_renewed_before_exp_keeps_the_connection(server):
    """Tokens that live 4 s: the provider is asked for a new one at 80% of each one's life and
    the socket renews with an ``auth`` frame, so it outlives several tokens without a drop."""
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        return make_token("renewer", ttl=4)

    room = new_room()
    async with ChatClient(server.http, token_provider=provider, **FAST) as chat:
        joined = await chat.join(room)
        loop = asyncio.get_running_loop()
        end, sent = loop.time() + 9, []
        while loop.time() < end:
            sent.append(await joined.send(f"at {len(sent)}"))
            await asyncio.sleep(0.5)
        events: list[Event] = []
        await items_until(joined, sent[-1].seq, events)
        assert not [e for e in events if isinstance(e, Disconnected)]
        assert calls >= 3  # the first token, then one renewal per 3.2 s
        assert joined.stats["close:4401"] == 0


async def test_expired_token_without_a_provider_ends_the_room_with_auth_error(server):
    async with ChatClient(server.http, token=make_token("short", ttl=2), **FAST) as chat:
        joined = await chat.join(new_room())
        with pytest.raises(AuthError):
            async for _event in joined:
                pass
        assert joined.stats["close:4401"] == 1


async def test_more_missed_than_a_resume_replays_yields_a_reset(own_database, spawn):
    """Cut off while 1100 items are stored: the resume answers ``recovered: false`` and the
    client says so with a ``Reset`` before the items that follow."""
    server = spawn(own_database)
    room = new_room()
    with SilentProxy("127.0.0.1", server.port) as proxy:
        async with (
            ChatClient(f"http://127.0.0.1:{proxy.port}", token=make_token("r"), **FAST) as r,
            ChatClient(server.http, token=make_token("w")) as w,
        ):
            inbox, outbox = await r.join(room), await w.join(room)
            await outbox.send("seen")
            await items_until(inbox, 1)
            proxy.freeze()
            conn = await asyncpg.connect(own_database)
            try:
                await conn.execute(
                    "INSERT INTO message (room_id, seq, author, body, kind, text_no) "
                    "SELECT r.id, r.last_seq + g, 'bulk', 'bulk ' || g, 'text', r.text_count + g "
                    "FROM room r, generate_series(1, 1100) g WHERE r.name = $1",
                    room,
                )
                await conn.execute(
                    "UPDATE room SET last_seq = last_seq + 1100, text_count = text_count + 1100 "
                    "WHERE name = $1",
                    room,
                )
            finally:
                await conn.close()
            events: list[Event] = []
            while not any(isinstance(e, Ready) for e in events):
                events.append(await inbox.next_event(TIMEOUT))
            resets = [e for e in events if isinstance(e, Reset)]
            assert len(resets) == 1 and (resets[0].missed_from, resets[0].last_seq) == (2, 1101)
            after = await outbox.send("after the reset")
            assert [m.seq for m in await items_until(inbox, after.seq)] == [1102]


async def test_rate_limited_sends_are_resent_after_retry_after(database_url, spawn):
    server = spawn(database_url, CHAT_SEND_RATE="2")  # bursts of 4, then 2 a second
    room = new_room()
    async with ChatClient(server.http, token=make_token("eager")) as chat:
        joined = await chat.join(room)
        sent = await asyncio.gather(*(joined.send(f"n{i}", timeout=TIMEOUT) for i in range(10)))
        assert joined.stats["error:rate_limited"] > 0
    assert sorted(m.seq for m in sent) == list(range(1, 11))
    rows = await stored(database_url, room)
    assert sorted(r["body"] for r in rows) == sorted(f"n{i}" for i in range(10))


async def test_unknown_kind_is_passed_on_and_its_seq_still_counts(own_database, spawn):
    """A kind newer than the client (``poll``, stored as a newer server would): it arrives as an
    ``UnknownItem``, and the items after it follow without a gap or a repeat."""
    server = spawn(own_database)
    room = new_room()
    async with ChatClient(server.http, token=make_token("u"), **FAST) as chat:
        joined = await chat.join(room)
        first = await joined.send("before")
        conn = await asyncpg.connect(own_database)
        try:
            await conn.execute("ALTER TABLE message DROP CONSTRAINT ck_message_kind_known")
            await conn.execute(
                "INSERT INTO message (room_id, seq, author, kind, target_seq, client_msg_id) "
                "SELECT id, last_seq + 1, 'future', 'poll', 1, 'p-1' FROM room WHERE name = $1",
                room,
            )
            await conn.execute("UPDATE room SET last_seq = last_seq + 1 WHERE name = $1", room)
        finally:
            await conn.close()
        after = await chat.rest.post_message(room, "after")
        items = await items_until(joined, after.seq)
        assert [(type(m), m.seq) for m in items] == [
            (TextMessage, first.seq),
            (UnknownItem, first.seq + 1),
            (TextMessage, first.seq + 2),
        ]
        assert items[1].kind == "poll" and items[1].raw["target_seq"] == 1
        assert joined.last_seq == after.seq


async def test_removed_member_gets_forbidden_not_endless_reconnects(server):
    room = new_room()
    async with (
        ChatClient(server.http, token=make_token("owner")) as owner,
        ChatClient(server.http, token=make_token("guest")) as guest,
    ):
        await owner.rest.create_room(room, kind="private", members=["guest"])
        joined = await guest.join(room)
        await owner.rest.remove_member(room, "guest")
        with pytest.raises(Forbidden):
            async for _event in joined:
                pass
        with pytest.raises(Forbidden):
            await guest.join(room)


async def test_a_caller_that_only_sends_keeps_getting_acks_and_later_reads_everything(server):
    """Nobody iterates the room while it sends: the queue's bound is reached, acks still come,
    and the items it left to the server arrive once the caller reads, in order, once each."""
    async with ChatClient(server.http, token=make_token("busy"), max_events=5) as chat:
        joined = await chat.join(new_room())
        sent = [await joined.send(f"s{i}", timeout=TIMEOUT) for i in range(20)]
        assert [m.seq for m in sent] == list(range(1, 21))
        assert joined.stats["overflow"] > 0
        assert [m.seq for m in await items_until(joined, 20)] == list(range(1, 21))
        assert joined.stats["gaps"] == joined.stats["duplicates"] == 0


async def test_a_refused_handshake_raises_instead_of_retrying_forever(server):
    async with ChatClient(server.http, token=make_token("typo")) as chat:
        with pytest.raises(HTTPStatusError) as refused:
            await chat.join("no spaces allowed")
        assert refused.value.status == 403


async def test_a_connect_refused_with_429_is_retried_after_retry_after(database_url, spawn):
    """One socket per user on this server: the second waits out the 429 and gets in once the
    first is gone, instead of failing or hammering the server."""
    server = spawn(database_url, CHAT_MAX_CONNECTIONS_PER_USER="1")
    room = new_room()
    async with (
        ChatClient(server.http, token=make_token("one")) as first,
        ChatClient(server.http, token=make_token("one"), **FAST) as second,
    ):
        held = await first.join(room)
        joining = asyncio.create_task(second.join(room, timeout=TIMEOUT))
        done, _ = await asyncio.wait({joining}, timeout=1.5)
        assert not done  # held back while the first socket lives
        await held.close()
        joined = await joining
        assert joined.connected and joined.stats["connect:http_429"] >= 1


async def test_signals_arrive_typed(server):
    room = new_room()
    async with (
        ChatClient(server.http, token=make_token("alice")) as alice,
        ChatClient(server.http, token=make_token("bob")) as bob,
    ):
        await alice.rest.create_room(room, kind="private", members=["bob"])
        mine = await alice.join(room)
        theirs = await bob.join(room)
        assert "bob" in (await next_of(mine, Presence)).online  # alice may be in it too
        await mine.typing()
        assert (await next_of(theirs, Typing)).users == ("alice",)
        said = await mine.send("hi")
        await theirs.read(said.seq)
        assert (await next_of(theirs, Read)).seq == said.seq  # bob's own devices
        receipt = await next_of(mine, Receipt)  # the others in the room
        assert (receipt.user, receipt.seq) == ("bob", said.seq)
