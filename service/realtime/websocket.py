"""The websocket endpoint ``/ws/rooms/{room}`` (protocol: docs/protocol.md).

A connection's life: refused before accept when the token or a parameter is bad, or with HTTP
429 when the user is over a limit (``UserLimits.admit``: connects per second, replayed bytes,
open connections); then, still before accept, join the room's live stream and read the replay
from one snapshot, within ``ws_connect_timeout`` (else 1013: the database is out). That read
also says whether the user may read the room (a private or direct room's member): if not, the
handshake is refused with HTTP 403, with no round trip of its own, and no removal committed
between that read and the join can be missed (it reaches the outbox, which ends with
``AccessRevoked``: 4403). Then accept, send the replay and ``ready``; then the
receiver runs in the connection's own task and the writer in a second one, together in one
``asyncio.TaskGroup``, until either ends, or until the token's ``exp``: one timer per
connection (``loop.call_at``, nothing per frame) ends the outbox with ``TokenExpired`` (4401)
unless an ``auth`` frame with a fresh token of the same user has moved it.
The writer keeps ``last_seq`` (the last message the client got) and forwards live messages in
seq order: it drops what the replay already covered and fills any hole from the database, so
the client sees every message exactly once.

On the fast path (``service.fastpath``) the endpoint hands the connection's life to the server
once it has accepted (``service.realtime.extensions.DETACH``), so the routing and middleware
frames are not kept for hours per idle connection. The route therefore must not have
``yield`` dependencies: they would be closed at that point (``tests/unit/test_websocket_route.py``
holds it to that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketState
from websockets.exceptions import ConnectionClosed

from service.auth import MAX_TOKEN_BYTES, CurrentUser, Principal, RoomName
from service.chat.envelope import (
    SharedFrame,
    ack_frame,
    auth_ok_frame,
    dumps,
    error_frame,
    ready_frame,
    stored_frame,
)
from service.chat.events import check_emoji, check_target, post_event
from service.chat.history import MAX_SEQ, Reader, Replay, read_replay
from service.chat.limits import TokenBucket
from service.chat.messages import check_body, check_client_msg_id, check_seq, submit_message
from service.chat.rooms import DIRECT_PREFIX
from service.db.writer import Stored
from service.errors import (
    WS_TRY_AGAIN_LATER,
    AccessRevoked,
    AuthRefused,
    BinaryNotSupported,
    ChatError,
    Forbidden,
    InternalError,
    InvalidFrame,
    InvalidJson,
    InvalidMessage,
    NotAuthenticated,
    OutcomeUnknown,
    Overloaded,
    RateLimited,
    SlowConsumer,
    StreamLost,
    TokenExpired,
    TooManyConnections,
    Unavailable,
    UnknownType,
)
from service.observability import request_id, request_id_headers
from service.realtime.extensions import DETACH, SEND_NOWAIT
from service.realtime.hub import Live, Marker, Outbox, OutboxItem, RoomHub
from service.services import Services

log = logging.getLogger(__name__)

router = APIRouter()

MAX_PIPELINED = 64
"""Sends of one connection awaiting their commit before it stops reading more frames."""
FASTAPI_SCOPE_STACKS = (
    "fastapi_middleware_astack",
    "fastapi_inner_astack",
    "fastapi_function_astack",
)
"""The exit stacks FastAPI leaves in a websocket's scope: done with once the endpoint returns
(a dependency's cleanup is held by the stack itself), and ~700 bytes each to a detached socket
that keeps its scope (docs/benchmarks.md, idle)."""
AUTH_BURST = 3
"""``auth`` frames one connection may send at once; then ``ws_auth_rate`` a second."""

Pending = tuple[asyncio.Future[Stored], str | None]
"""A queued send: its commit, and the client_msg_id its answer echoes."""
Reply = str | Pending
"""An answer frame made at once (an error, a pong), or a queued send."""


@router.websocket("/ws/rooms/{room}")
async def room_socket(
    websocket: WebSocket,
    room: RoomName,
    principal: CurrentUser,
    history: Annotated[int | None, Query(ge=0, le=500)] = None,
    since: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> None:
    services: Services = websocket.state.services
    try:
        services.limits.admit(principal.user_id)
    except (RateLimited, TooManyConnections) as exc:
        await _refuse(websocket, exc)
        return
    services.metrics.connections.inc()
    stack = contextlib.AsyncExitStack()
    try:
        connection = RoomConnection(websocket, services, principal, room)
        limit = services.settings.history_limit if history is None else history
        joined = await connection.open(stack, history=limit, since=since)
        detach = websocket.scope.get("extensions", {}).get(DETACH)
    except BaseException:
        await stack.aclose()
        _disconnected(services, principal)
        raise
    if joined is None:  # refused, or closed: the client was told
        await stack.aclose()
        _disconnected(services, principal)
        return
    outbox = joined

    async def serve() -> None:
        try:
            await connection.run(stack, outbox)
        finally:
            _disconnected(services, principal)

    if detach is None:
        await serve()
    else:
        for key in FASTAPI_SCOPE_STACKS:
            websocket.scope.pop(key, None)
        detach(serve)  # the server runs it after this returns, without the routing frames


def _disconnected(services: Services, principal: Principal) -> None:
    services.metrics.connections.dec()
    services.limits.disconnect(principal.user_id)


async def _refuse(websocket: WebSocket, exc: RateLimited | TooManyConnections | Forbidden) -> None:
    """Before accept: HTTP 429 with ``Retry-After`` (403 for a room the user may not read)
    where the server can send a denial response (the ASGI ``websocket.http.response``
    extension), else accept and close with 1013 (4403)."""
    services: Services = websocket.state.services
    services.metrics.errors.labels(exc.code).inc()
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):
        await websocket.accept(headers=request_id_headers())
        await websocket.close(exc.close_code, exc.detail)
        return
    headers = {**exc.headers(), "X-Request-ID": request_id.get()}
    response = JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)
    await websocket.send_denial_response(response)


class RoomConnection:
    __slots__ = (
        "websocket",
        "services",
        "hub",
        "principal",
        "room",
        "last_seq",
        "_log_context",
        "send_bucket",
        "_pings",
        "_auths",
        "_expiry",
        "_send_nowait",
        "_replies",
        "room_id",
        "_greeting",
    )
    """Slots: one per open socket, thousands per process (docs/benchmarks.md, idle)."""

    def __init__(
        self, websocket: WebSocket, services: Services, principal: Principal, room: str
    ) -> None:
        self.websocket = websocket
        self.services = services
        self.hub: RoomHub = websocket.state.hub
        self.principal = principal
        self.room = room
        self.last_seq = 0
        self._log_context = {"user": principal.user_id, "room": room}
        rate = services.settings.send_rate
        self.send_bucket = TokenBucket(rate, rate * 2)
        self._pings: TokenBucket | None = None
        """Made at the first ``ping``: most connections never send one."""
        self._auths: TokenBucket | None = None
        """Made at the first ``auth``, like ``_pings``."""
        self._expiry: asyncio.TimerHandle | None = None
        """Ends the outbox with ``TokenExpired`` at the token's ``exp``; moved by ``auth``."""
        self._send_nowait = websocket.scope.get("extensions", {}).get(SEND_NOWAIT, _never)
        self._replies: list[Reply] = []
        """Answers not yet in the outbox, oldest first: frames are answered in order. At most
        ``MAX_PIPELINED`` sends and their answers: a list, smaller than a deque when empty."""
        self.room_id: int | None = None
        """The room the socket was let into (None: no room had the name yet). Sends go to it
        only: once it is deleted they are refused, even if a new room takes the name."""
        self._greeting: tuple[Replay, dict[str, Any]] | None = None
        """The replay and the presence ``ready`` sends, from ``open`` to ``run``: dropped once
        sent, so an idle socket holds neither (a room's history, its list of who is here)."""

    async def open(
        self, stack: contextlib.AsyncExitStack, *, history: int, since: int | None
    ) -> Outbox | None:
        """Join the room and read the replay, then accept; or refuse a user who may not read
        the room (HTTP 403 before accept), or close (1013, 1011) when that failed: None."""
        try:
            outbox = await self._join(stack, history=history, since=since)
        except Forbidden as exc:
            await _refuse(self.websocket, exc)
            return None
        except StreamLost as ended:
            self.services.metrics.streams_lost.inc()
            await self._close(ended.close_code, str(ended))
            return None
        except Unavailable:
            await self._close(WS_TRY_AGAIN_LATER, "database unavailable; reconnect with since")
            return None
        await self.websocket.accept(headers=request_id_headers())
        return outbox

    async def run(self, stack: contextlib.AsyncExitStack, outbox: Outbox) -> None:
        """Send the replay and serve the socket until it ends; leave the room (``stack``)."""
        try:
            async with stack:
                await self._replay()
                await self._serve(outbox)
        except (WebSocketDisconnect, ConnectionClosed):
            # ConnectionClosed: uvicorn's legacy websockets protocol (the lowest uvicorn this
            # runs on) lets websockets' own exception out of a send on a connection that is
            # gone (its peer left, or the protocol failed it: 1007 for invalid UTF-8).
            return
        except SlowConsumer as ended:
            self.services.metrics.slow_consumers.inc()
            log.info("closing slow consumer", extra=self._log_context)
            await self._close(ended.close_code, str(ended))
            return
        except StreamLost as ended:
            self.services.metrics.streams_lost.inc()
            log.warning("closing: the room's live stream was lost", extra=self._log_context)
            await self._close(ended.close_code, str(ended))
            return
        except (TokenExpired, AccessRevoked) as ended:
            self.services.metrics.errors.labels(ended.code).inc()
            log.info("closing: %s", ended.code, extra=self._log_context)
            await self._close(ended.close_code, str(ended))
            return
        except Unavailable:
            await self._close(WS_TRY_AGAIN_LATER, "database unavailable; reconnect with since")
            return
        except Exception:
            log.exception("websocket failed", extra=self._log_context)
            await self._close(InternalError.close_code, "internal error")
            return
        await self._close(1000, "")

    async def _close(self, code: int, reason: str) -> None:
        """Close with ``code``, accepting first if need be: a close before accept is an HTTP
        403, and these codes tell the client what to do."""
        with contextlib.suppress(Exception):
            if self.websocket.application_state is WebSocketState.CONNECTING:
                await self.websocket.accept(headers=request_id_headers())
            await self.websocket.close(code, reason)

    async def _join(
        self, stack: contextlib.AsyncExitStack, *, history: int, since: int | None
    ) -> Outbox:
        """Join the room's live stream (left when ``stack`` closes) and read the replay, within
        ``ws_connect_timeout``; ``Forbidden`` when the user may not read the room (the read
        says so: no round trip of its own, and nothing it missed between a check and the
        join), or the name is a direct room's that was never made. While the database is
        out either can wait far longer (the
        LISTEN connection reconnecting, a pool checkout), and the client is owed a 1013."""
        try:
            async with asyncio.timeout(self.services.settings.ws_connect_timeout):
                outbox = await stack.enter_async_context(
                    self.hub.join(self.room, user=self.principal.user_id)
                )
                replay = await read_replay(
                    pool=self.services.pool,
                    room=self.room,
                    history=history,
                    since=since,
                    reader=Reader(self.principal.user_id, self.principal.admin),
                )
        except TimeoutError:
            raise Unavailable("the database did not answer in time") from None
        if not replay.readable:
            raise Forbidden("you are not a member of this room")
        if replay.room_id is None and self.room.startswith(DIRECT_PREFIX):
            raise Forbidden("no such direct room")
        self.room_id = replay.room_id
        # Present from here until the socket closes (``stack``); ``ready`` says who else is.
        presence = self.services.presence
        presence.arrive(self.room, self.principal.user_id, self.principal.name)
        stack.push(self._leave)  # an exit callback: no wrapper kept per socket, as callback() has
        self._greeting = replay, await presence.ready(self.room)
        return outbox

    def _leave(self, *exc_info: object) -> None:
        """The socket closed: one fewer here; the user's typing ends with their last one."""
        user = self.principal.user_id
        if self.services.presence.leave(self.room, user):
            self.services.typing.stop(self.room, user)

    async def _replay(self) -> None:
        if self._greeting is None:
            raise RuntimeError("run before a successful open")
        (replay, presence), self._greeting = self._greeting, None
        frames = [stored_frame(m) for m in replay.messages]
        self._charge(frames)
        frames.append(ready_frame(self.room, replay.last_seq, replay.recovered, presence))
        await self._send_all(frames)
        self.services.metrics.replay_size.observe(len(replay.messages))
        self.services.metrics.counts.delivered += len(replay.messages)
        self.last_seq = replay.last_seq

    async def _serve(self, outbox: Outbox) -> None:
        """Receive in this (the server's) task and write in a task of its own, both in one
        ``TaskGroup``: when the writer fails, the receiver is cancelled and the writer's error
        is raised; when the receiver ends (the peer left), the writer is cancelled and its end
        does not count. An ended outbox stops the writer at once, even while it is in a send;
        that is also how the token's expiry ends the connection (``_expire_at``)."""
        outbox.write_now = self._write_now
        left = False
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                writer = group.create_task(self._write(outbox))
                outbox.on_end = writer.cancel
                self._expire_at(outbox, self.principal.expires_at)
                await self._receive(outbox)
                left = True
                writer.cancel()
        except BaseExceptionGroup as errors:
            failure = errors.exceptions[0]  # raised below, outside this handler: no chained group
        finally:
            outbox.on_end = outbox.write_now = None
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
        if failure is None or left:
            return
        if cast(asyncio.Task[None], asyncio.current_task()).cancelling():
            raise asyncio.CancelledError  # cancelled from outside too: that wins, as without errors
        raise failure

    def _expire_at(self, outbox: Outbox, exp: float | None) -> None:
        """End the outbox with ``TokenExpired`` at ``exp`` (Unix seconds; None: never),
        replacing the deadline set before. One already past ends it on the loop's next turn."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if exp is None:
            return
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_at(loop.time() + (exp - time.time()), outbox.end, TokenExpired)

    async def _write(self, outbox: Outbox) -> None:
        """Everything that needs no await goes through ``_write_now``, here as from the
        outbox's callback; this task does the rest: fill a gap or resync from the database,
        wait for a socket that refused frames, close on a failed send. Raises the outbox's end
        (``OutboxEnded``) when that is what stopped it."""
        try:
            while True:
                items = await outbox.take()
                while (rest := self._write_now(items)) is not None:
                    items = rest
                    match items.popleft():
                        case Marker.FAILED:
                            raise RuntimeError("a send failed")  # logged where it failed
                        case Marker.RESYNC:
                            await self._catch_up(until=None)
                            items = self._without_resync(items)
                        case Live(seq=seq):  # a gap, or a message too big that nobody loaded
                            await self._catch_up(until=seq)
                            items = self._without_resync(items)
                        case frame:  # the socket refused it just now: wait until it takes it
                            await self._send_all([frame])
        except asyncio.CancelledError:
            ended = outbox.ended
            writer = cast(asyncio.Task[None], asyncio.current_task())
            if ended is not None and writer.uncancel() == 0:
                raise ended from None  # only the outbox's end (on_end) cancelled it
            raise

    @staticmethod
    def _without_resync(items: deque[OutboxItem]) -> deque[OutboxItem]:
        """A catch-up just read the room's end: the resync markers queued meanwhile are covered."""
        if Marker.RESYNC in items:
            return deque(item for item in items if item is not Marker.RESYNC)
        return items

    def _write_now(self, items: deque[OutboxItem]) -> deque[OutboxItem] | None:
        """The items that need no await, written in one go: frames sent as they are and the
        next live messages in seq order (called from the outbox's callback while ``_write``
        waits, and by ``_write``). From the first other item (a marker, a gap, a message to
        read) the rest is returned. Frames the socket cannot take now (backpressure, closing)
        go back too, in front, to be sent as they are, still in order."""
        ready: list[str | SharedFrame] = []
        last_seq = self.last_seq
        count = 0
        while items:
            item = items.popleft()
            if isinstance(item, Live):
                seq = item.seq
                if seq == last_seq + 1 and (frame := item.frame) is not None:
                    ready.append(frame)  # the next message
                    count += 1
                    last_seq = seq
                    continue
                if seq <= last_seq:
                    continue  # the replay or a catch-up already covered it
            elif not isinstance(item, Marker):
                ready.append(item)  # a frame sent as it is
                continue
            items.appendleft(item)  # a marker, a gap, a message to read: ``_write`` does it
            break
        self.last_seq = last_seq
        self.services.metrics.counts.delivered += count
        if ready and not self._send_nowait(ready):
            items.extendleft(reversed(ready))
        return items or None

    async def _send_all(
        self, frames: list[str] | list[SharedFrame] | list[str | SharedFrame]
    ) -> None:
        """Write the frames in one go when nothing is in the way, else one ASGI send each."""
        if frames and not self._send_nowait(frames):
            for frame in frames:
                await self.websocket.send_text(frame if isinstance(frame, str) else frame.text)
        frames.clear()

    async def _catch_up(self, *, until: int | None) -> None:
        """Send what the live stream missed, from the room's shared read
        (``RoomHub.catch_up``); past what that read holds the connection is too far behind
        (``SlowConsumer``: 1013, and its resume with ``since`` has a bounded replay)."""
        window = await self.hub.catch_up(self.room, after=self.last_seq)
        start = self.last_seq + 1 - window.first
        if start < 0:
            raise SlowConsumer
        missed = window.frames[start:]
        if missed:
            count = len(missed)
            await self._send_all(missed)  # empties the list: a copy, not the shared one
            self.last_seq = window.last_seq
            self.services.metrics.counts.delivered += count
        if until is not None and self.last_seq < until:
            log.error("room %s: message %d not found while catching up", self.room, until)

    def _charge(self, frames: list[str]) -> None:
        """Count replayed bytes against the user's budget (``UserLimits.admit`` checks it)."""
        size = sum(len(f) if f.isascii() else len(f.encode()) for f in frames)
        self.services.limits.charge_replay(self.principal.user_id, size)

    async def _receive(self, outbox: Outbox) -> None:
        """Read frames without waiting for their commits (sends are pipelined up to
        ``MAX_PIPELINED``); answers still go out in the order the frames came. An ``auth``
        frame's token check is awaited here (at most a JWKS fetch): the next frame waits."""
        while True:
            if len(self._replies) >= MAX_PIPELINED:
                # The oldest reply is a pending send: answered ones in front are flushed.
                await asyncio.wait([cast(Pending, self._replies[0])[0]])
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._answer(outbox, self._error(BinaryNotSupported.code, "send JSON text frames"))
                continue
            try:
                reply = self._handle(text)
            except _Renew as renew:  # raised, not returned: a send pays nothing for ``auth``
                reply = await self._renew(outbox, renew.token)
            if reply is not None:
                self._answer(outbox, reply)

    def _answer(self, outbox: Outbox, reply: Reply) -> None:
        if isinstance(reply, str) and not self._replies:
            outbox.put(reply)
            return
        self._replies.append(reply)
        if not isinstance(reply, str):
            reply[0].add_done_callback(lambda _: self._flush_replies(outbox))

    def _flush_replies(self, outbox: Outbox) -> None:
        replies = self._replies
        while replies:
            reply = replies[0]
            if isinstance(reply, str):
                outbox.put(reply)
            elif reply[0].done():
                outbox.put(self._settle(*reply))
            else:
                return
            del replies[0]

    def _settle(self, stored: asyncio.Future[Stored], echo: str | None) -> str | Marker:
        """The answer to a committed (or failed) send: ``unavailable`` only when nothing was
        stored, ``outcome_unknown`` when it may have been; both name the send's id (the one
        the server assigned when the client gave none)."""
        if stored.cancelled():  # it may have been committed meanwhile
            return self._error(OutcomeUnknown.code, "the service is shutting down", echo)
        exc = stored.exception()
        if isinstance(exc, Unavailable | OutcomeUnknown):
            return self._error(exc.code, exc.detail, exc.client_msg_id or echo)
        if isinstance(exc, ChatError) and exc.frame:
            # Refused where it was stored: not allowed (a send after removal: the stream closes
            # the socket next), no such message, already deleted, invalid.
            return self._error(exc.code, exc.detail, echo)
        if exc is not None:
            log.error("send failed", exc_info=exc, extra=self._log_context)
            return Marker.FAILED
        posted = stored.result()
        counts = self.services.metrics.counts
        if not posted.duplicate:
            counts.stored_websocket += 1
        counts.acks += 1
        return ack_frame(posted.message)

    def _error(self, code: str, detail: str, client_msg_id: str | None = None, **extra: Any) -> str:
        self.services.metrics.errors.labels(code).inc()
        return error_frame(code, detail, client_msg_id, **extra)

    def _handle(self, text: str) -> Reply | None:
        try:
            frame: Any = _JSON.decode(text)
        except (ValueError, RecursionError):
            return self._error(InvalidJson.code, "the frame is not valid JSON")
        if not isinstance(frame, dict):
            return self._error(InvalidFrame.code, "a frame must be a JSON object")
        kind = frame.get("type")
        if kind == "send":
            self.services.metrics.counts.received += 1
            return self._send(frame)
        if kind == "ping":
            return self._pong()
        if kind == "auth":
            return self._auth(frame)
        if kind in ("edit", "delete"):
            return self._change(frame, kind)
        if kind == "react":
            return self._change(frame, "reaction")
        if kind == "read":
            return self._read(frame)
        if kind == "typing":  # never answered; excess dropped (``service.chat.typing``)
            self.services.typing.typing(self.room, self.principal.user_id)
            return None
        return self._error(
            UnknownType.code,
            "'type' must be 'send', 'edit', 'delete', 'react', 'read', 'typing', 'ping' or 'auth'",
        )

    def _read(self, frame: dict[str, Any]) -> str | None:
        """Not answered (unless invalid): the cursor moves with the process's next flush
        (``service.chat.reads``), and the user's other sockets get a ``read`` frame."""
        try:
            seq = check_seq(frame.get("seq"), "seq")
        except InvalidMessage as exc:
            return self._error(exc.code, exc.detail)
        self.services.reads.mark(self.room, self.principal.user_id, seq)
        return None

    def _auth(self, frame: dict[str, Any]) -> str:
        """Refuse an ``auth`` frame that is malformed or over ``ws_auth_rate``; raise ``_Renew``
        for the rest, which ``_receive`` awaits (a provider's token may need a JWKS fetch)."""
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            return self._error(InvalidFrame.code, "'token' must be a non-empty string")
        auths = self._auths
        if auths is None:
            rate = self.services.settings.ws_auth_rate
            auths = self._auths = TokenBucket(rate, AUTH_BURST)
        try:
            auths.take()
        except RateLimited as exc:
            detail = f"too many auth frames; retry in {exc.retry_after:.2f}s"
            return self._error(exc.code, detail, retry_after=round(exc.retry_after, 3))
        if len(token) > MAX_TOKEN_BYTES:  # refused as the codec would, without decoding it
            return self._error(AuthRefused.code, "token too large")
        raise _Renew(token)

    async def _renew(self, outbox: Outbox, token: str) -> str:
        """Move the socket's deadline to the token's ``exp`` if it is valid, the same user's
        and not expired: ``auth_ok``; else ``auth_refused`` and nothing changes."""
        try:
            principal = await self.services.tokens.authenticate(token)
        except NotAuthenticated as exc:
            return self._error(AuthRefused.code, exc.detail)
        if principal.user_id != self.principal.user_id:
            return self._error(AuthRefused.code, "the token is another user's")
        exp = principal.expires_at
        if exp is not None and exp <= time.time():  # accepted within the codec's leeway
            return self._error(AuthRefused.code, "token expired")
        self.principal = principal
        self._expire_at(outbox, exp)
        return auth_ok_frame(exp)

    def _pong(self) -> str | None:
        """A ``pong``, or nothing for pings over ``ws_ping_rate``: a ping flood costs its
        sender, not the room's other connections."""
        pings = self._pings
        if pings is None:
            rate = self.services.settings.ws_ping_rate
            pings = self._pings = TokenBucket(rate, max(1.0, rate * 5))
        return _PONG if pings.try_take() else None

    def _send(self, frame: dict[str, Any]) -> Reply:
        """Queue the message for the next commit. Once queued it is committed (and fanned
        out) even if the socket goes away meanwhile; the client learns of it by resending."""
        try:  # only a valid id is echoed: an arbitrary string may not even encode
            echo = check_client_msg_id(frame.get("client_msg_id"))
        except InvalidMessage:
            echo = None
        try:
            self.send_bucket.take()
            self.services.limits.take_send(self.principal.user_id)
            stored = submit_message(
                writer=self.services.writer,
                room=self.room,
                author=self.principal.user_id,
                body=frame.get("body"),
                client_msg_id=frame.get("client_msg_id"),
                max_chars=self.services.settings.max_message_chars,
                publish=self.services.publish,
                room_id=self.room_id,
                reply_to=frame.get("reply_to"),
            )
        except (RateLimited, Overloaded) as exc:
            return self._error(exc.code, exc.detail, echo, retry_after=round(exc.retry_after, 3))
        except InvalidMessage as exc:
            return self._error(exc.code, exc.detail, echo)
        self.services.typing.stop(self.room, self.principal.user_id)  # a message ends typing
        return stored, echo

    def _change(self, frame: dict[str, Any], kind: str) -> Reply:
        """An ``edit``, ``delete`` or ``react`` (``on`` defaults to true) on a message,
        answered like a send (``ack`` with the item's seq, or an ``error`` frame) in its place
        among the answers, and out of the same rate limits. Stored on a pooled connection (they
        are rare next to sends: no group commit) and checked where it is stored
        (``service.chat.events``)."""
        try:
            echo = check_client_msg_id(frame.get("client_msg_id"))
            check_target(frame.get("target_seq"))
            if kind == "edit":
                check_body(frame.get("body"), max_chars=self.services.settings.max_message_chars)
            elif kind == "reaction":
                check_emoji(frame.get("emoji"))
                if not isinstance(frame.get("on", True), bool):
                    raise InvalidFrame("'on' must be true or false")
        except InvalidMessage as exc:
            return self._error(exc.code, exc.detail, _valid_id(frame))
        try:
            self.send_bucket.take()
            self.services.limits.take_send(self.principal.user_id)
        except RateLimited as exc:
            return self._error(exc.code, exc.detail, echo, retry_after=round(exc.retry_after, 3))
        # After every earlier send and change of this socket is settled: an edit pipelined
        # right behind the send of its message finds it, and two edits end with the second.
        earlier = [reply[0] for reply in self._replies if not isinstance(reply, str)]
        stored = asyncio.ensure_future(
            _after(
                earlier,
                self.services.pool,
                self.services.publish,
                room=self.room,
                room_id=self.room_id,
                author=self.principal.user_id,
                admin=self.principal.admin,
                kind=kind,
                target_seq=frame.get("target_seq"),
                body=frame.get("body"),
                emoji=frame.get("emoji"),
                on=frame.get("on", True),
                client_msg_id=echo,
                max_chars=self.services.settings.max_message_chars,
            )
        )
        return stored, echo


async def _after(earlier: list[asyncio.Future[Stored]], *args: Any, **kwargs: Any) -> Stored:
    """``post_event(*args, **kwargs)`` once ``earlier`` are done (whatever their outcome)."""
    if earlier:
        await asyncio.wait(earlier)
    return await post_event(*args, **kwargs)


def _valid_id(frame: dict[str, Any]) -> str | None:
    """The frame's ``client_msg_id`` when it is one to echo (an arbitrary value may not even
    encode)."""
    try:
        return check_client_msg_id(frame.get("client_msg_id"))
    except InvalidMessage:
        return None


_PONG = dumps({"type": "pong"})


class _Renew(Exception):
    """An ``auth`` frame let through to the token check, which may await (``_renew``)."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token


def _never(_frames: object) -> bool:
    """``SEND_NOWAIT`` where the server does not offer it: always the ASGI send."""
    return False


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are Python's JSON, not JSON."""
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_refuse_constant)
"""Configuration only: ``json.loads`` with an argument builds a decoder (and its scanner) per
frame."""
