"""The parts of the websocket path that can be checked without a socket: the route's
dependencies (the connection outlives them under DETACH), the outbox, and the lean protocol's
stand-ins for uvicorn's queue and event."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from types import SimpleNamespace

import pytest
from fastapi.routing import APIWebSocketRoute
from starlette.websockets import WebSocket

from service.auth import Principal
from service.chat.envelope import SharedFrame
from service.errors import (
    RateLimited,
    SlowConsumer,
    StreamLost,
    TokenExpired,
    TooManyConnections,
)
from service.metrics import Metrics
from service.realtime import websocket
from service.realtime.hub import DROPPABLE_BACKLOG, Live, Marker, Outbox, OutboxItem
from service.realtime.uvicorn_ws import _Gate, _Inbox


def _calls(dependant):  # type: ignore[no-untyped-def]
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def test_the_websocket_route_has_no_yield_dependencies():
    """Under DETACH the route returns right after accept: a ``yield`` dependency (a database
    session, say) would be closed while the connection still runs."""
    routes = [r for r in websocket.router.routes if isinstance(r, APIWebSocketRoute)]
    assert [r.path for r in routes] == ["/ws/rooms/{room}"]
    calls = list(_calls(routes[0].dependant))
    assert calls, "the route has its dependencies"
    for call in calls:
        assert not inspect.isasyncgenfunction(call) and not inspect.isgeneratorfunction(call), call


async def test_outbox_hands_out_everything_queued_in_order():
    outbox = Outbox(limit=10)
    taker = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    assert not taker.done()
    a, b, c = (Live(seq, SharedFrame(text)) for seq, text in enumerate("abc", 1))
    outbox.put(a)
    outbox.put("ack")
    outbox.put(b)
    assert list(await taker) == [a, "ack", b]
    outbox.put(c)
    assert list(await outbox.take()) == [c]


async def test_a_socket_that_is_behind_loses_typing_frames_first():
    """Droppable frames (typing) are offered: taken while the socket keeps up, dropped once
    it is behind, and never what ends the outbox; messages still are queued up to the limit."""
    outbox = Outbox(limit=20)
    outbox.offer("typing-1")
    for seq in range(1, DROPPABLE_BACKLOG + 1):
        outbox.put(Live(seq, SharedFrame(f"m{seq}")))
    outbox.offer("typing-2")  # behind: dropped
    outbox.put("ack")
    items = list(await outbox.take())
    assert items[0] == "typing-1" and items[-1] == "ack" and "typing-2" not in items
    assert outbox.ended is None
    outbox.offer("typing-3")  # caught up: taken again
    assert list(await outbox.take()) == ["typing-3"]


async def test_a_waiting_writer_is_not_woken_for_what_write_now_takes_in_one_go():
    outbox = Outbox(limit=10)
    calls: list[list[OutboxItem]] = []

    def write_now(items: deque[OutboxItem]) -> deque[OutboxItem] | None:
        calls.append(list(items))
        while items and items[0] != "stop":
            items.popleft()
        return items or None

    outbox.write_now = write_now
    taker = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    outbox.put("a")
    outbox.put("ack")  # the same burst: one call for both
    await asyncio.sleep(0)
    assert calls == [["a", "ack"]] and not taker.done()
    outbox.put("b")
    outbox.put("stop")
    outbox.put("c")
    assert list(await asyncio.wait_for(taker, 1)) == ["stop", "c"]  # the rest, in order
    assert calls[1] == ["b", "stop", "c"]
    outbox.put("d")  # nobody waits: nothing is written behind the writer's back
    await asyncio.sleep(0)
    assert len(calls) == 2 and list(await outbox.take()) == ["d"]


async def test_a_failing_write_now_closes_the_connection_instead_of_losing_frames():
    outbox = Outbox(limit=10)

    def write_now(_items: deque[OutboxItem]) -> deque[OutboxItem] | None:
        raise RuntimeError("boom")

    outbox.write_now = write_now
    taker = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    outbox.put("a")
    assert list(await asyncio.wait_for(taker, 1)) == [Marker.FAILED]


async def test_outbox_overflow_drops_everything_and_tells_its_owner_once():
    outbox = Outbox(limit=2)
    told: list[bool] = []
    outbox.on_end = lambda: told.append(True)
    outbox.put("a")
    outbox.put("b")
    outbox.put("c")  # one too many
    outbox.put("d")
    outbox.end(StreamLost)  # the first reason counts
    assert outbox.ended is SlowConsumer and told == [True]
    with pytest.raises(SlowConsumer):
        await outbox.take()


async def test_an_ended_outbox_wakes_its_waiting_writer_with_the_reason():
    outbox = Outbox(limit=2)
    taker = asyncio.ensure_future(outbox.take())
    await asyncio.sleep(0)
    outbox.end(StreamLost)
    outbox.put("a")  # too late: dropped
    with pytest.raises(StreamLost):
        await asyncio.wait_for(taker, 1)


async def test_inbox_is_a_queue_for_one_consumer():
    inbox = _Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    getter = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("connect")
    inbox.put_nowait("receive")
    assert await getter == "connect"
    assert inbox.qsize() == 1 and not inbox.empty()
    assert await inbox.get() == "receive"
    assert inbox.empty()


async def test_gate_is_an_event():
    gate = _Gate()
    assert gate.is_set()
    await asyncio.wait_for(gate.wait(), 1)  # open: no wait
    gate.clear()
    waiters = [asyncio.ensure_future(gate.wait()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    gate.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    gate.clear()
    cancelled = asyncio.ensure_future(gate.wait())
    survivor = asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)
    assert gate._waiters is not None and len(gate._waiters) == 2
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert cancelled.cancelled()
    assert len(gate._waiters) == 1  # a cancelled waiter is dropped, not kept until set()
    gate.set()
    await asyncio.wait_for(survivor, 1)  # the waiter left is still woken
    assert gate.is_set() and gate._waiters is None


def _handshake(extensions: dict[str, object]) -> tuple[object, list[dict[str, object]]]:
    """A websocket that has not been accepted yet, and the ASGI messages the app sends."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws/rooms/lobby",
        "headers": [],
        "query_string": b"",
        "extensions": extensions,
        "state": {"services": SimpleNamespace(metrics=Metrics())},
    }
    return WebSocket(scope, receive, send), sent  # type: ignore[arg-type]


async def test_a_refused_handshake_is_an_http_429_with_retry_after():
    ws, sent = _handshake({"websocket.http.response": {}})
    await websocket._refuse(ws, RateLimited(2.5, "too many connects; retry later"))  # type: ignore[arg-type]
    start = sent[0]
    assert start["type"] == "websocket.http.response.start" and start["status"] == 429
    assert (b"retry-after", b"3") in start["headers"]  # type: ignore[operator]
    assert b"too many connects" in sent[1]["body"]  # type: ignore[operator]


async def test_without_the_denial_extension_a_refused_handshake_is_closed_with_1013():
    ws, sent = _handshake({})
    await websocket._refuse(ws, TooManyConnections("at most 2 connections"))  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1013 and sent[1]["reason"] == "at most 2 connections"


class _Socket:
    """The two calls ``RoomConnection._serve`` makes on its websocket: frames the test feeds
    are received; a send waits until the test lets it through (a peer that does not read)."""

    def __init__(self) -> None:
        self.scope: dict[str, object] = {"extensions": {}}  # no SEND_NOWAIT: every send awaits
        self.state = SimpleNamespace(hub=None)  # the hub is not used by ``_serve``
        self.incoming: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self.receiving = asyncio.Event()
        self.sending = asyncio.Event()
        self.sent: list[str] = []
        self.unblock = asyncio.Event()
        self.receive_cancelled = False

    async def receive(self) -> dict[str, object]:
        self.receiving.set()
        try:
            return await self.incoming.get()
        except asyncio.CancelledError:
            self.receive_cancelled = True
            raise

    async def send_text(self, text: str) -> None:
        self.sending.set()
        await self.unblock.wait()
        self.sent.append(text)


def _connection(
    expires_at: float | None = None,
) -> tuple[websocket.RoomConnection, _Socket, Outbox]:
    socket = _Socket()
    services = SimpleNamespace(settings=SimpleNamespace(send_rate=10.0), metrics=Metrics())
    principal = Principal(user_id="alice", expires_at=expires_at)
    connection = websocket.RoomConnection(socket, services, principal, "lobby")  # type: ignore[arg-type]
    return connection, socket, Outbox(limit=4)


async def test_a_failing_writer_cancels_the_receiver_and_its_error_comes_out_unwrapped():
    connection, socket, outbox = _connection()
    serving = asyncio.ensure_future(connection._serve(outbox))
    await asyncio.wait_for(socket.receiving.wait(), 1)
    outbox.put(Marker.FAILED)
    with pytest.raises(RuntimeError, match="a send failed"):  # not an ExceptionGroup
        await asyncio.wait_for(serving, 1)
    assert socket.receive_cancelled
    assert outbox.on_end is None and outbox.write_now is None


async def test_an_ended_outbox_stops_a_writer_stuck_in_a_send_with_its_reason():
    for reason in (SlowConsumer, StreamLost):
        connection, socket, outbox = _connection()
        serving = asyncio.ensure_future(connection._serve(outbox))
        outbox.put("ack")
        await asyncio.wait_for(socket.sending.wait(), 1)  # the peer does not read
        outbox.end(reason)
        with pytest.raises(reason):
            await asyncio.wait_for(serving, 1)
        assert socket.receive_cancelled and socket.sent == []


async def test_the_tokens_exp_ends_the_connection_even_in_a_send_and_only_then():
    """One timer per connection: at ``exp`` the outbox ends with ``TokenExpired`` (4401), the
    writer stuck in a send included; a connection that ends first leaves no timer behind."""
    exp = time.time() + 0.2
    connection, socket, outbox = _connection(expires_at=exp)
    serving = asyncio.ensure_future(connection._serve(outbox))
    outbox.put("ack")
    await asyncio.wait_for(socket.sending.wait(), 1)  # the peer does not read
    with pytest.raises(TokenExpired):
        await asyncio.wait_for(serving, 2)
    assert time.time() >= exp - 0.01
    assert outbox.ended is TokenExpired and socket.receive_cancelled
    assert connection._expiry is None

    connection, socket, outbox = _connection(expires_at=time.time() + 0.2)
    serving = asyncio.ensure_future(connection._serve(outbox))
    await asyncio.wait_for(socket.receiving.wait(), 1)
    socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(serving, 1)
    assert connection._expiry is None
    await asyncio.sleep(0.3)  # past the exp: the cancelled timer did not end the outbox
    assert outbox.ended is None


async def test_when_the_peer_leaves_the_writer_is_cancelled_and_its_end_does_not_count():
    connection, socket, outbox = _connection()
    serving = asyncio.ensure_future(connection._serve(outbox))
    outbox.put("ack")
    await asyncio.wait_for(socket.sending.wait(), 1)
    outbox.end(SlowConsumer)  # the writer ends with this first...
    socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1012})  # ...then this
    await asyncio.wait_for(serving, 1)  # returns: no SlowConsumer


async def test_a_cancellation_from_outside_wins_over_the_writer_failing_at_the_same_time():
    connection, socket, outbox = _connection()
    serving = asyncio.ensure_future(connection._serve(outbox))
    await asyncio.wait_for(socket.receiving.wait(), 1)
    (writer,) = (t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_write")  # type: ignore[union-attr]
    writer.add_done_callback(lambda _: serving.cancel())  # before the task sees the error
    outbox.put(Marker.FAILED)
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert serving.cancelled() and isinstance(writer.exception(), RuntimeError)


@pytest.mark.parametrize("writable", [True, False])
async def test_write_now_sends_frames_and_the_next_messages_and_stops_at_what_needs_an_await(
    writable: bool,
):
    connection, socket, _ = _connection()
    written: list[list[str | SharedFrame]] = []

    def send_nowait(frames: list[str | SharedFrame]) -> bool:
        written.append(list(frames))
        return writable

    connection._send_nowait = send_nowait
    connection.last_seq = 2
    f3, f4, f6 = SharedFrame("3"), SharedFrame("4"), SharedFrame("6")
    gap, unloaded = Live(6, f6), Live(5, None)
    items: deque[OutboxItem] = deque([Live(1, SharedFrame("1")), "ack", Live(3, f3)])
    items.extend([Live(4, f4), gap, "error"])
    rest = connection._write_now(items)
    assert written == [["ack", f3, f4]]  # the covered one dropped, the gap not crossed
    assert connection.last_seq == 4 and connection.services.metrics.counts.delivered == 2
    if writable:
        assert list(rest or ()) == [gap, "error"]
    else:  # the socket refused them: back in front, to be sent as they are, seq counted
        assert list(rest or ()) == ["ack", f3, f4, gap, "error"]
        return
    for stop in (unloaded, Marker.RESYNC, Marker.FAILED):
        rest = connection._write_now(deque(["pong", stop, "ack"]))
        assert list(rest or ()) == [stop, "ack"] and written[-1] == ["pong"]
    assert connection._write_now(deque([Live(5, SharedFrame("5")), gap])) is None
    assert connection.last_seq == 6
