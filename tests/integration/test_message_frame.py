"""One definition of the ``message`` frame (``chat_message_json``, migration 0004): every path
that carries a stored message writes the same bytes for it, and those bytes are exactly the
fields docs/protocol.md documents.

The paths: the NOTIFY payload, ``chat_post_messages``'s frame with ``p_notify`` false (another
bus publishes it), ``room_window`` and ``messages_between`` (replay, catch-up, references too
big to NOTIFY), REST history pages, the 201 body of a REST post, and the frames a websocket
receives, replayed and live. Each row is compared with every path that carries it.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect

from service.chat.envelope import channel_for, decode_notification, dumps_with_items
from service.db import queries
from service.db.queries import messages_between, room_window
from tests.support import make_token

TIMEOUT = 10.0
PROTOCOL = Path(__file__).parents[2] / "docs" / "protocol.md"
_POST = (
    "SELECT o_seq, o_duplicate, o_frame FROM chat_post_messages("
    "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7)"
)

BODIES = [
    'quotes " and \\ backslash \\" \\\\',
    "tab\tnewline\nreturn\rformfeed\x0cbackspace\x08",
    "controls \x01\x1f\x7f \x80\x9f",
    "unicode é ß 中文 \U0001f600 \U0001f3f3\ufe0f\u200d\U0001f308 \u2028 \u2029 \ufeff",
    "</script><script>alert(1)</script> & <!-- -->",
    " leading and trailing spaces ",
    "é" * 4000,  # 8000 bytes of UTF-8: the NOTIFY carries a reference, not the frame
]
AUTHOR = 'ann "the \\ one" ✓'


def cases(tag: str) -> list[tuple[str, str | None]]:
    """Every body, without a ``client_msg_id`` and with an awkward one of its own."""
    return [
        (body, cmid)
        for i, body in enumerate(BODIES)
        for cmid in (None, f'id "{tag}{i}" \\ é \U0001f600')
    ]


def documented_fields() -> list[str]:
    """The keys of the ``message`` frame in docs/protocol.md's "Server → client" example."""
    text = PROTOCOL.read_text()
    start = text.index('{"type": "message"')
    end = text.index("}", start) + 1
    return list(json.loads(text[start:end]))


def as_frame(item: str) -> str:
    """A history item as the websocket frame of the same row (``"type"`` first)."""
    return '{"type":"message",' + item[1:]


async def post_directly(
    conn: asyncpg.Connection, room: str, body: str, cmid: str | None, *, notify: bool
) -> tuple[int, str | None]:
    """One message through ``chat_post_messages`` itself: its seq, and its frame when the
    function returns it (``notify`` false) instead of NOTIFYing it."""
    rows = await conn.fetch(
        _POST, [room], [channel_for(room)], [AUTHOR], [body], [cmid], [None], notify
    )
    ((seq, duplicate, frame),) = rows
    assert not duplicate
    return seq, frame


async def open_socket(server: Any, room: str, compression: str | None) -> ClientConnection:
    query = urlencode({"token": make_token("watcher"), "since": 0, "history": 500})
    return await asyncio.wait_for(
        connect(f"{server.ws}/ws/rooms/{room}?{query}", compression=compression), TIMEOUT
    )


async def frames_until(ws: ClientConnection, last_seq: int) -> dict[int, str]:
    """The ``message`` frames ``ws`` receives, as text, by seq, until it has ``last_seq``."""
    found: dict[int, str] = {}
    while last_seq not in found:
        text = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(text, str)
        frame = json.loads(text)
        if frame["type"] == "message":
            found[frame["seq"]] = text
    return found


async def replayed(ws: ClientConnection) -> tuple[dict[int, str], int]:
    """The replay of a fresh connection, as text by seq, and the ``ready``'s ``last_seq``."""
    found: dict[int, str] = {}
    while True:
        text = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(text, str)
        frame = json.loads(text)
        if frame["type"] == "ready":
            return found, frame["last_seq"]
        assert frame["type"] == "message", frame
        found[frame["seq"]] = text


async def test_every_path_writes_the_same_bytes_for_a_message(server, database_url):
    room = f"frame-{uuid.uuid4().hex[:12]}.x_y"
    poster = f"poster-{uuid.uuid4().hex[:8]}"  # its own send rate, whatever else runs
    conn = await asyncpg.connect(database_url)
    heard: asyncio.Queue[str] = asyncio.Queue()

    def hear(*args: Any) -> None:
        if args[3][0].isdigit():  # a stream item's (signals, such as presence, start otherwise)
            heard.put_nowait(args[3])

    await conn.add_listener(channel_for(room), hear)
    expected: dict[int, dict[str, Any]] = {}  # seq -> the fields stored
    returned: dict[int, str] = {}  # seq -> o_frame (p_notify false)
    returned_too: dict[int, str] = {}  # seq -> o_frame (p_notify true: NOTIFYed and returned)
    notified: dict[int, str | None] = {}  # seq -> the NOTIFY's frame (None: a reference)
    created: dict[int, str] = {}  # seq -> the 201 body of a REST post
    try:
        # Stored before anyone listens, frames returned: they reach sockets by replay.
        for body, cmid in cases("returned"):
            seq, frame = await post_directly(conn, room, body, cmid, notify=False)
            assert frame is not None
            returned[seq] = frame
            expected[seq] = {"author": AUTHOR, "body": body, "client_msg_id": cmid}
        assert heard.empty()

        live = await open_socket(server, room, compression=None)  # the shared-bytes path
        try:
            replay_at_join, last_seq = await replayed(live)
            assert sorted(replay_at_join) == sorted(expected) and last_seq == max(expected)

            for body, cmid in cases("notified"):
                seq, frame = await post_directly(conn, room, body, cmid, notify=True)
                assert frame is not None  # on its way in the NOTIFY, and returned for REST
                returned_too[seq] = frame
                expected[seq] = {"author": AUTHOR, "body": body, "client_msg_id": cmid}
            async with httpx.AsyncClient(base_url=server.http, timeout=TIMEOUT) as http:
                for body, cmid in cases("posted"):
                    sent: dict[str, Any] = {"body": body}
                    if cmid is not None:
                        sent["client_msg_id"] = cmid
                    answer = await http.post(
                        f"/rooms/{room}/messages",
                        json=sent,
                        headers={"Authorization": f"Bearer {make_token(poster)}"},
                    )
                    assert answer.status_code == 201, answer.text
                    seq = answer.json()["seq"]
                    created[seq] = answer.text
                    # the server assigns an id to a send without one
                    given = answer.json()["client_msg_id"] if cmid is None else cmid
                    expected[seq] = {"author": poster, "body": body, "client_msg_id": given}
                    if cmid is not None:  # a resend answers with the original, as stored
                        again = await http.post(
                            f"/rooms/{room}/messages",
                            json=sent,
                            headers={"Authorization": f"Bearer {make_token(poster)}"},
                        )
                        assert again.status_code == 201, again.text
                        assert again.headers["idempotent-replayed"] == "true"
                        assert again.text == answer.text
                last = max(expected)
                page = await http.get(
                    f"/rooms/{room}/messages",
                    params={"after": 0, "limit": 500},
                    headers={"Authorization": f"Bearer {make_token(poster)}"},
                )
                assert page.status_code == 200
            live_frames = await frames_until(live, last)
        finally:
            await live.close()

        while len(notified) < len(expected) - len(returned):
            seq, _sent_at, frame = decode_notification(await asyncio.wait_for(heard.get(), 5))
            notified[seq] = frame

        # The reference: what history reads, straight from the database.
        items = {
            m.seq: m.json
            for m in await messages_between(conn, room=room, after=0, until=None, limit=1000)
        }
        assert sorted(items) == list(range(1, last + 1)) == sorted(expected)
        newest = await room_window(conn, room=room, after=0, before=None, limit=1000, newest=True)
        oldest = await room_window(conn, room=room, after=0, before=None, limit=1000, newest=False)
        for window in (newest, oldest):
            assert window.last_seq == last
            assert window.messages == [(seq, items[seq]) for seq in sorted(items)]

        replay_socket = await open_socket(server, room, compression="deflate")
        try:
            replay, _ = await replayed(replay_socket)
        finally:
            await replay_socket.close()

        # History pages (and ``?history=N``) show a text message's current state: the item,
        # and the reactions it has now (none here); a resume (``since``) the items as they are.
        state = {seq: item[:-1] + ',"reactions":[]}' for seq, item in items.items()}
        head = {"room": room, "last_seq": last, "next_before": None, "next_after": None}
        assert page.text == dumps_with_items(head, "messages", [state[s] for s in sorted(items)])
        assert replay == {seq: as_frame(item) for seq, item in items.items()}  # a resume
        assert replay_at_join == {seq: replay[seq] for seq in returned}
        assert returned == {seq: as_frame(items[seq]) for seq in returned}
        assert returned_too == {seq: as_frame(items[seq]) for seq in returned_too}
        assert created == {seq: items[seq] for seq in created}
        big = {seq for seq in notified if len(expected[seq]["body"].encode()) > 7000}
        assert big and all(notified[seq] is None for seq in big)
        assert {seq: f for seq, f in notified.items() if seq not in big} == {
            seq: as_frame(items[seq]) for seq in notified if seq not in big
        }
        assert {seq: live_frames[seq] for seq in notified} == {
            seq: as_frame(items[seq]) for seq in notified
        }

        fields = documented_fields()
        assert fields[0] == "type"
        for seq, item in items.items():
            frame = json.loads(as_frame(item))
            assert list(frame) == fields  # the documented keys, in their order, no more
            assert frame["type"] == "message" and frame["room"] == room and frame["seq"] == seq
            assert isinstance(frame["id"], int)
            assert {k: frame[k] for k in ("author", "body", "client_msg_id")} == expected[seq]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", frame["created_at"])
    finally:
        await conn.close()


async def test_history_reads_inline_the_definition(database_url):
    """``chat_message_json`` stays as cheap as the expression written out: the planner inlines
    it into every history read (it would not if it were made IMMUTABLE, STRICT or plpgsql)."""
    conn = await asyncpg.connect(database_url)
    try:
        windows = ("r", 0, 9, 5, "u", False, False)
        for query, args in (
            (queries._NEWEST, windows),
            (queries._OLDEST, windows),
            (queries._BETWEEN, ("r", 0, 9, 5)),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN VERBOSE {query}", *args))
            assert "chat_message_json" not in plan, plan
            assert "to_json(" in plan and "to_char(" in plan, plan
    finally:
        await conn.close()
