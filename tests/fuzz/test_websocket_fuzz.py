"""Fuzzing the websocket protocol (docs/protocol.md) against a real server, with Hypothesis.

The property, for every frame a client can send: the server answers with exactly one frame
(``ack``, ``pong`` or an ``error`` whose code the protocol lists and whose rule the frame
breaks), the ``message`` fan-out follows every new ack, and the connection stays usable (a valid
send right after it is acked). The expected answer is worked out from the protocol's rules
(tests/fuzz/rules.py), not from the service's code.

Hypothesis runs synchronously; each example drives the ``asyncio.Runner`` the test owns, so one
connection serves many examples. Each connection gets a fresh user and room, and is replaced
before it could reach the send rate limit (flood control is not what is fuzzed here). After a
failed example the connection is replaced too, so Hypothesis shrinks to an input that fails on
its own.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.fuzz.rules import (
    ASSIGNED_ID,
    NOT_JSON,
    message_problems,
    nesting,
    parse,
    valid_client_msg_id,
)
from tests.fuzz.strategies import encoded, frame_dicts, json_values, text_frames
from tests.support import ServerProcess, make_token

pytestmark = [
    pytest.mark.slow,
    # Room for Hypothesis to shrink a failure that costs a reply timeout per attempt.
    pytest.mark.timeout(420),
]

DEEP = 200  # nesting from which valid JSON may be refused as "absurdly deep" (invalid_json)
REPLY_TIMEOUT = 5.0
SENDS_PER_CONNECTION = 16  # under the per-connection burst of the send rate limit
PING = '{"type":"ping"}'
ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_frame",
        "unknown_type",
        "empty_body",
        "body_too_long",
        "invalid_body",
        "invalid_client_msg_id",
        "binary_not_supported",
        "auth_refused",
    }
)
"""What a frame can earn (``unavailable``, ``outcome_unknown`` and ``overloaded`` need a
database in trouble, which the fuzz tests do not arrange)."""

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written to the work tree; a failure prints a reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Inputs that once broke the service, tried on every run before the random ones.
LONE_SURROGATE_IDS = [
    '{"type":"send","client_msg_id":"\\ud800"}',
    '{"type":"send","body":"hi","client_msg_id":"x\\udfff"}',
    '{"type":"send","body":"","client_msg_id":"\\udc00\\ud800"}',
]


# --- What the protocol says the answer to a frame is -------------------------------------------


def frame_outcomes(frame: Any) -> set[str]:
    """The answers allowed to a frame that parsed as ``frame``: "ack", "pong" or error codes."""
    if not isinstance(frame, dict):
        return {"invalid_frame"}
    kind = frame.get("type")
    if kind == "ping":
        return {"pong"}
    if kind == "auth":  # only a real token of the same user renews; none is generated
        token = frame.get("token")
        return {"auth_refused"} if isinstance(token, str) and token else {"invalid_frame"}
    if kind in ("edit", "delete", "react"):
        # Generated frames carry no target_seq (only a random extra key could name one): a
        # validation error, or the refusal of a seq that is no message of the fuzzer's.
        return {
            "invalid_client_msg_id", "invalid_frame", "empty_body", "body_too_long",
            "invalid_body", "not_found", "forbidden", "already_deleted", "invalid_emoji",
        }  # fmt: skip
    if kind != "send":
        return {"unknown_type"}
    return message_problems(frame.get("body"), frame.get("client_msg_id")) or {"ack"}


@dataclass(frozen=True)
class Expected:
    outcomes: frozenset[str]
    frame: Any  # the parsed frame; NOT_JSON if the text is not even Python's JSON dialect

    @property
    def is_send(self) -> bool:
        return isinstance(self.frame, dict) and self.frame.get("type") == "send"


def expected(data: str | bytes) -> Expected:
    if isinstance(data, bytes):
        return Expected(frozenset({"binary_not_supported"}), NOT_JSON)
    strict = parse(data)
    frame = strict if strict is not NOT_JSON else parse(data, strict=False)
    outcomes: set[str] = set()
    if strict is NOT_JSON or nesting(data) >= DEEP:
        outcomes.add("invalid_json")
    if frame is not NOT_JSON:
        # NaN and Infinity are not JSON, but Python's json reads them: either answer will do.
        outcomes |= frame_outcomes(frame)
    return Expected(frozenset(outcomes), frame)


def short(data: str | bytes, limit: int = 300) -> str:
    shown = repr(data)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(data)} long)"


# --- A client that checks every answer ---------------------------------------------------------


@dataclass
class Connection:
    ws: ClientConnection
    user: str
    room: str
    sends: int = 0
    last_seq: int = 0
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # by client_msg_id
    pending: list[dict[str, Any]] = field(default_factory=list)  # message frames not yet matched
    broken: bool = False


class Fuzzer:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.examples = 0
        self.outcomes: Counter[str] = Counter()

    async def example(self, data: str | bytes) -> str:
        """One Hypothesis example: the fuzzed frame, then a valid send on the same connection."""
        if self.conn is None or self.conn.broken or self.conn.sends + 2 > SENDS_PER_CONNECTION:
            await self.reconnect()
        conn = self.conn
        assert conn is not None
        self.examples += 1
        try:
            outcome = await self.check(conn, data)
            canary = {
                "type": "send",
                "body": f"still here after example {self.examples}",
                "client_msg_id": f"canary-{uuid.uuid4().hex}",
            }
            after = await self.check(conn, json.dumps(canary))
            assert after == "ack", f"a valid send after {short(data)} got {after!r}"
        except BaseException:
            conn.broken = True
            raise
        self.outcomes[outcome] += 1
        return outcome

    async def check(self, conn: Connection, data: str | bytes) -> str:
        """Send ``data``, check the one reply (and the fan-out of an ack); returns the outcome."""
        want = expected(data)
        for _attempt in range(5):
            reply = await self.exchange(conn, data)
            if want.is_send:
                conn.sends += 1
            if not (want.is_send and reply.get("code") == "rate_limited"):
                break
            # Flood control answers before the frame is looked at: wait, then try again.
            assert reply["retry_after"] > 0, reply
            await asyncio.sleep(reply["retry_after"])
        if reply.get("type") == "error":
            outcome = reply.get("code")
        elif reply.get("type") in ("ack", "pong"):
            outcome = reply["type"]
        else:
            raise AssertionError(f"{short(data)} got a {reply.get('type')!r} frame: {reply}")
        assert outcome in want.outcomes, (
            f"{short(data)} got {reply}, expected one of {sorted(want.outcomes)}"
        )
        if outcome == "ack":
            await self.check_ack(conn, want.frame, reply)
        elif outcome == "pong":
            assert reply == {"type": "pong"}, reply
        else:
            check_error(want, reply)
        return str(outcome)

    async def exchange(self, conn: Connection, data: str | bytes) -> dict[str, Any]:
        """Send ``data`` then a ping: the frames before the pong are the replies to ``data``.

        The server handles a connection's frames one at a time and queues its replies in order,
        so exactly one reply must come before the pong (``message`` frames may come anywhere)."""
        assert not conn.pending, f"unexpected message frames: {conn.pending}"
        replies: list[dict[str, Any]] = []
        try:
            await conn.ws.send(data)
            await conn.ws.send(PING)
            while len(replies) < 2:
                frame = json.loads(await asyncio.wait_for(conn.ws.recv(), REPLY_TIMEOUT))
                if frame.get("type") == "message":
                    conn.pending.append(frame)
                else:
                    replies.append(frame)
        except TimeoutError:
            raise AssertionError(
                f"no reply to {short(data)} within {REPLY_TIMEOUT}s (replies so far: {replies})"
            ) from None
        except ConnectionClosed as exc:
            raise AssertionError(
                f"the server closed the connection after {short(data)}: {exc}"
            ) from None
        reply, pong = replies
        assert pong == {"type": "pong"}, f"more than one reply to {short(data)}: {replies}"
        return reply

    async def check_ack(self, conn: Connection, frame: dict[str, Any], ack: dict[str, Any]) -> None:
        client_msg_id = frame.get("client_msg_id")
        assert set(ack) == {"type", "client_msg_id", "seq", "id", "created_at"}, ack
        if client_msg_id is None:  # the server gave it one
            assert ASSIGNED_ID.fullmatch(ack["client_msg_id"]), ack
            assert ack["client_msg_id"] not in conn.acks, ack
            client_msg_id = ack["client_msg_id"]
        assert ack["client_msg_id"] == client_msg_id, ack
        if client_msg_id is not None and client_msg_id in conn.acks:
            # A resend: the original ack, nothing stored, nothing fanned out.
            assert ack == conn.acks[client_msg_id], (frame, ack)
            return
        assert ack["seq"] == conn.last_seq + 1, (frame, ack)
        conn.last_seq = ack["seq"]
        if client_msg_id is not None:
            conn.acks[client_msg_id] = ack
        if not conn.pending:
            try:
                conn.pending.append(
                    json.loads(await asyncio.wait_for(conn.ws.recv(), REPLY_TIMEOUT))
                )
            except TimeoutError:
                raise AssertionError(f"{frame!r} was acked but not fanned out") from None
        assert conn.pending.pop(0) == {
            "type": "message",
            "room": conn.room,
            "seq": ack["seq"],
            "id": ack["id"],
            "created_at": ack["created_at"],
            "kind": "text",
            "author": conn.user,
            "body": frame["body"],
            "client_msg_id": client_msg_id,
            "edited_at": None,
            "deleted": False,
            "reply_to": None,
        }, (frame, ack)

    async def reconnect(self) -> None:
        await self.close()
        user = f"fuzz-{uuid.uuid4().hex[:12]}"
        room = f"fuzz-{uuid.uuid4().hex[:16]}"
        url = f"{self.server.ws}/ws/rooms/{room}?history=0&token={make_token(user)}"
        ws = await asyncio.wait_for(connect(url, open_timeout=REPLY_TIMEOUT), REPLY_TIMEOUT)
        ready = json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))
        assert ready == {
            "type": "ready",
            "room": room,
            "last_seq": 0,
            "recovered": False,
            "presence": {"count": 1, "users": [{"user": user, "name": None}]},
        }
        self.conn = Connection(ws, user, room)

    async def finish(self) -> None:
        """Nothing more may arrive once every frame was answered."""
        conn = self.conn
        if conn is None or conn.broken:
            return
        assert not conn.pending, f"unexpected message frames: {conn.pending}"
        try:
            frame = await asyncio.wait_for(conn.ws.recv(), 0.3)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame!r}")

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.ws.close()
            self.conn = None


ANSWERED_TYPES = ("send", "edit", "delete", "react")
"""Frames whose answer names their ``client_msg_id`` (docs/protocol.md)."""


def check_error(want: Expected, reply: dict[str, Any]) -> None:
    assert reply["code"] in ERROR_CODES, reply
    assert isinstance(reply.get("detail"), str) and reply["detail"], reply
    answered = isinstance(want.frame, dict) and want.frame.get("type") in ANSWERED_TYPES
    sent = want.frame.get("client_msg_id") if answered else None
    if "client_msg_id" in reply:
        assert answered and reply["client_msg_id"] == sent, reply
    if reply["code"] != "invalid_json" and valid_client_msg_id(sent):
        assert reply.get("client_msg_id") == sent, f"the error does not name {sent!r}: {reply}"


def fuzz(
    server: ServerProcess, frames: st.SearchStrategy[Any], examples: Sequence[Any] = ()
) -> Fuzzer:
    """Run the property over ``frames`` (and the explicit ``examples`` first)."""
    with asyncio.Runner() as runner:
        fuzzer = Fuzzer(server)

        @FUZZ_SETTINGS
        @given(data=frames)
        def one_frame(data: str | bytes) -> None:
            event(runner.run(fuzzer.example(data)))  # see --hypothesis-show-statistics

        for data in examples:
            one_frame = example(data=data)(one_frame)
        try:
            one_frame()
            runner.run(fuzzer.finish())
        finally:
            runner.run(fuzzer.close())
    return fuzzer


# --- The tests ---------------------------------------------------------------------------------


def test_any_text_frame_gets_one_reply_and_leaves_the_connection_open(server):
    fuzzer = fuzz(server, text_frames)
    assert {"invalid_json", "invalid_frame"} <= set(fuzzer.outcomes), fuzzer.outcomes


def test_any_json_value_gets_one_reply_and_leaves_the_connection_open(server):
    fuzzer = fuzz(server, encoded(json_values | frame_dicts) | st.binary(max_size=100))
    assert {"invalid_frame", "unknown_type"} <= set(fuzzer.outcomes), fuzzer.outcomes


def test_frames_of_every_shape_get_the_reply_the_protocol_calls_for(server):
    fuzzer = fuzz(server, encoded(frame_dicts), examples=LONE_SURROGATE_IDS)
    # The fuzzed sends get stored too, not only refused.
    assert fuzzer.outcomes["ack"] >= 5, fuzzer.outcomes
    assert len(set(fuzzer.outcomes) & ERROR_CODES) >= 4, fuzzer.outcomes
