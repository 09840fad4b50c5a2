"""``ChatClient`` and ``Room``: the protocol's hard parts, done once, from the client's side.

What a caller of ``Room`` can rely on (docs/client.md says it for users):

* **Every stream item once, in seq order, across drops.** The room remembers the last seq it
  handed out; each reconnect asks for ``since`` = that seq, and an item at or below it (a
  replica's replay overlapping what was seen) is dropped, not repeated. A gap (which the server
  promises never to leave) makes the room reconnect and resume rather than skip.
* **Sends are never lost and never doubled.** Every send carries a client-made
  ``client_msg_id`` and stays pending until its ``ack``; after a drop each pending send is sent
  again with the same id on the next connection (the server answers a repeat with the original
  ack). ``rate_limited``, ``overloaded``, ``unavailable`` and ``outcome_unknown`` are waited out
  and resent, never raised.
* **The token outlives the socket.** With a ``token_provider``, a fresh token is fetched at 80%
  of the current one's life (at least a minute ahead when it lives long enough) and presented
  with an ``auth`` frame on every open socket; reconnects use the newest one; a 4401 gets a
  fresh token and a resume.
* **A resume the server cannot serve is said out loud**: ``recovered: false`` becomes a
  ``Reset`` event before the items that follow it.
* **Some closes are final**: 4403 (no access to the room) raises ``Forbidden``; 1007 and 1009
  (the client is at fault) ``ProtocolError``. Every other drop, 1011, 1012, 1013, a dead
  path noticed by keepalive pings, is reconnected with exponential backoff and jitter, to the
  next base URL when several are given, until ``give_up_after`` seconds without a connection.
* **Every wait has a deadline**: connecting (``open_timeout``), each frame of a replay, each
  frame written, keepalive pongs (``ping_timeout``), each send (``send_timeout``), each token
  fetch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from service.client.connection import NO_CLOSE, Connection, close_code, http_base, room_url
from service.client.errors import (
    AuthError,
    ChatClientError,
    ConnectionLost,
    Forbidden,
    HTTPStatusError,
    ProtocolError,
    SendError,
    SendTimeout,
)
from service.client.events import (
    Ack,
    Answer,
    AuthOk,
    Disconnected,
    Error,
    Event,
    Item,
    Presence,
    Read,
    Ready,
    Receipt,
    ReplyTo,
    Reset,
    TextMessage,
    Typing,
    parse,
)
from service.client.rest import RestClient, new_client_msg_id

TokenProvider = Callable[[], Awaitable[str]]
"""Returns a fresh token for the same user (from your identity provider, a refresh token...)."""
UrlSource = str | Sequence[str] | Callable[[], str | None]

RETRY_CODES = frozenset({"rate_limited", "overloaded", "unavailable", "outcome_unknown"})
FINAL_CLOSES = {1007: "a frame the server could not decode", 1009: "a frame over the size limit"}
MAX_IN_FLIGHT = 64
"""Sends written but not answered, per connection: past the server's 64 it stops reading."""


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, *unverified*: only to know ``sub`` and when ``exp`` comes (the
    server verifies); {} for anything that is not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def refresh_lead(life: float) -> float:
    """How long before ``exp`` to renew: a fifth of the life left, and at least a minute when
    the token lives two or more (the demo page's rule, docs/protocol.md)."""
    lead = life * 0.2
    return max(lead, 60.0) if life >= 120 else lead


class _Resync(Exception):
    """A gap in the stream: drop this connection and resume from the last seq seen."""


@dataclass
class _Pending:
    frame: dict[str, Any]
    future: asyncio.Future[Ack]
    sent_gen: int | None = None  # the connection it was last written on; None: to (re)send
    not_before: float = 0.0
    backoff: float = 0.2


class ChatClient:
    """A user's connection to chat-service: REST in ``rest``, websockets per joined ``Room``.

    ``url`` is one base URL (``http(s)://host:port``; ``ws(s)`` is derived), a list of them
    (replicas tried in turn after a failure), or a callable that names the one to use now.
    """

    def __init__(
        self,
        url: UrlSource,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        open_timeout: float = 10.0,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        send_timeout: float = 60.0,
        rest_timeout: float = 10.0,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        give_up_after: float | None = 300.0,
        max_events: int = 10_000,
        compression: Literal["deflate"] | None = "deflate",
        rng: random.Random | None = None,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("give a token, a token_provider or both")
        if isinstance(url, str):
            self._urls: Sequence[str] | None = [url]
            self._pick: Callable[[], str | None] | None = None
        elif callable(url):
            self._urls, self._pick = None, url
        else:
            self._urls, self._pick = list(url), None
            if not self._urls:
                raise ValueError("no URL")
        self._url_index = 0
        self.token_provider = token_provider
        self.open_timeout, self.send_timeout = open_timeout, send_timeout
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.give_up_after, self.max_events = give_up_after, max_events
        self.compression = compression
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._token: str | None = None
        self._refresh_at: float | None = None  # wall clock
        if token is not None:
            self._set_token(token)
        self._token_lock = asyncio.Lock()
        self._rooms: set[Room] = set()
        self.rest = RestClient(
            self._first_url(),
            token=self._rest_token,
            renew=self._rest_renew if token_provider else None,
            timeout=rest_timeout,
        )

    async def __aenter__(self) -> ChatClient:
        if self._token is None:
            try:
                await self.token()
            except BaseException:
                await self.rest.aclose()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every room (pending sends fail) and the REST client."""
        await asyncio.gather(*(room.close() for room in list(self._rooms)))
        await self.rest.aclose()

    @property
    def user(self) -> str | None:
        """The token's ``sub``: the author of everything this client sends."""
        sub = token_claims(self._token or "").get("sub")
        return sub if isinstance(sub, str) else None

    async def join(
        self,
        room: str,
        *,
        since: int | None = None,
        history: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Room:
        """Open ``room`` and wait for its first ``ready`` (``timeout``: ``open_timeout`` x 3).

        ``history`` latest text messages come first (default none); ``since`` resumes after
        a seq a previous session saw. Raises what makes the room unusable (``Forbidden``,
        ``AuthError``, ``HTTPStatusError`` for a refused handshake), or ``ConnectionLost``."""
        joined = Room(self, room, since=since, history=history)
        self._rooms.add(joined)
        try:
            await joined._start(self.open_timeout * 3 if timeout is None else timeout)
        except BaseException:
            await joined.close()
            raise
        return joined

    # -- URLs --------------------------------------------------------------------------------

    def _first_url(self) -> str:
        if self._urls is not None:
            return self._urls[0]
        return "http://unknown.invalid"  # REST needs a base: a picker's first answer replaces it

    def _url(self) -> str | None:
        if self._pick is not None:
            return self._pick()
        assert self._urls is not None  # noqa: S101 - one of the two is set
        return self._urls[self._url_index % len(self._urls)]

    def _next_url(self) -> None:
        """After a failure: try the next replica."""
        self._url_index += 1

    # -- tokens ------------------------------------------------------------------------------

    def _set_token(self, token: str) -> None:
        self._token = token
        exp = token_claims(token).get("exp")
        if isinstance(exp, int | float):
            now = time.time()
            life = max(exp - now, 0.0)
            self._refresh_at = now + life - refresh_lead(life)
        else:
            self._refresh_at = None

    def refresh_due(self) -> float | None:
        """When (wall clock) the current token should be renewed; None: never (no provider or
        no ``exp``)."""
        return self._refresh_at if self.token_provider is not None else None

    async def token(self) -> str:
        """The current token; fetched first when there is none or its renewal is due."""
        due = self.refresh_due()
        if self._token is None or (due is not None and time.time() >= due):
            return await self.fresh_token(self._token)
        return self._token

    async def fresh_token(self, stale: str | None) -> str:
        """A token newer than ``stale``: the provider is asked once however many rooms ask at
        the same moment."""
        async with self._token_lock:
            if self._token is not None and self._token != stale:
                return self._token
            if self.token_provider is None:
                raise AuthError("the token expired and there is no token_provider")
            token = await asyncio.wait_for(self.token_provider(), self.open_timeout)
            self._set_token(token)
            return token

    async def _rest_token(self) -> str | None:
        return await self.token()

    async def _rest_renew(self) -> str | None:
        return await self.fresh_token(self._token)


class Room:
    """One room on a ``ChatClient``: iterate it for ``Event``s, call it to send.

    ``async for event in room`` yields stream items (``TextMessage``, ``Edit``, ``Delete``,
    ``ReactionChange``, ``MemberChange``, ``UnknownItem``), signals, and ``Ready`` /
    ``Reset`` / ``Disconnected``; it raises what ended the room for good.

    Events wait in a queue of ``max_events``. The socket is always read, so acks keep coming
    to a caller that only sends; past the limit, items are left to the server (the room stops
    taking them, and once the caller has read half the queue it resumes from the last one it
    queued) and signals are dropped: memory stays bounded and nothing is lost.
    """

    def __init__(self, client: ChatClient, name: str, *, since: int | None, history: int) -> None:
        self.client, self.name, self.history = client, name, history
        self.last_seq: int | None = since
        """The last seq handed to the caller: where a reconnect resumes."""
        self.stats: Counter[str] = Counter()
        """What happened underneath: ``resends``, ``send_frames``, ``duplicates`` and ``gaps``
        dropped or healed, ``error:<code>``, ``close:<code>``, ``connect:<failure>``."""
        self.connected_url: str | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()  # bounded by _accept
        self._overflow = False  # items are being left to a resume: the caller is behind
        self._pending: dict[str, _Pending] = {}
        self._auth_waiters: deque[asyncio.Future[AuthOk | Error]] = deque()
        self._conn: Connection | None = None
        self._gen = 0
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        self._paused_until = 0.0
        self._failure: BaseException | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    # -- the caller's side -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and past its ``ready``."""
        return self._ready.is_set()

    @property
    def pending(self) -> list[str]:
        """The ``client_msg_id`` of every send not yet acknowledged."""
        return list(self._pending)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        event = await self._events.get()
        if self._overflow and self._events.qsize() <= self.client.max_events // 2:
            self._overflow = False
            self._resume_now()
        if event is None:
            self._events.put_nowait(None)  # the end, for the next reader too
            if self._failure is not None:
                raise self._failure
            raise StopAsyncIteration
        return event

    async def next_event(self, timeout: float) -> Event:  # noqa: ASYNC109
        """The next event within ``timeout`` seconds (``TimeoutError`` otherwise)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def send(
        self,
        body: str,
        *,
        reply_to: int | None = None,
        client_msg_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> TextMessage:
        """Send a text message; returns it as stored, once acknowledged (as the ack describes
        it: ``reply_to`` has the seq only). ``SendError`` if refused, ``SendTimeout`` after
        ``timeout`` (``send_timeout``) without an answer: resend with its id."""
        cmid = client_msg_id or new_client_msg_id()
        frame: dict[str, Any] = {"type": "send", "body": body, "client_msg_id": cmid}
        if reply_to is not None:
            frame["reply_to"] = reply_to
        ack = await self._submit(cmid, frame, timeout)
        raw = {**frame, "type": "message", "room": self.name, "kind": "text"}
        raw |= {"author": self.client.user, "seq": ack.seq, "id": ack.id}
        return TextMessage(
            self.name,
            ack.seq,
            ack.id,
            ack.created_at,
            "text",
            self.client.user or "",
            raw,
            body=body,
            client_msg_id=cmid,
            reply_to=ReplyTo(reply_to) if reply_to is not None else None,
        )

    async def edit(self, target_seq: int, body: str, *, client_msg_id: str | None = None) -> Ack:
        """Replace the text of your message ``target_seq``; the ack names the ``edit`` item."""
        frame = {"type": "edit", "target_seq": target_seq, "body": body}
        return await self._submit_event(frame, client_msg_id)

    async def delete(self, target_seq: int, *, client_msg_id: str | None = None) -> Ack:
        frame = {"type": "delete", "target_seq": target_seq}
        return await self._submit_event(frame, client_msg_id)

    async def react(
        self, target_seq: int, emoji: str, *, on: bool = True, client_msg_id: str | None = None
    ) -> Ack:
        """Set (``on``) or take back your reaction ``emoji``; idempotent."""
        frame = {"type": "react", "target_seq": target_seq, "emoji": emoji, "on": on}
        return await self._submit_event(frame, client_msg_id)

    async def read(self, seq: int) -> None:
        """Move your read cursor to ``seq``: on the socket when it is up, else over REST, so
        the move is not lost to a reconnect."""
        if seq < 1:
            raise ValueError("a read cursor is a positive seq")
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await conn.send({"type": "read", "seq": seq}, self.client.ping_timeout)
                return
        await self.client.rest.mark_read(self.name, seq)

    async def typing(self) -> None:
        """Say the user is typing (a signal: dropped while disconnected; send every 2-3 s)."""
        conn = self._conn
        if conn is not None and self.connected:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                await conn.send({"type": "typing"}, self.client.ping_timeout)

    async def wait_connected(self, timeout: float) -> None:  # noqa: ASYNC109
        """Until a connection is up (``TimeoutError`` after ``timeout``)."""
        self._raise_if_done()
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def close(self) -> None:
        """Close the socket and stop; pending sends fail with ``ChatClientError``."""
        if self._closed:
            return
        self._closed = True
        self.client._rooms.discard(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._finish(None)

    async def __aenter__(self) -> Room:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sends -------------------------------------------------------------------------------

    async def _submit_event(self, frame: dict[str, Any], client_msg_id: str | None) -> Ack:
        cmid = client_msg_id or new_client_msg_id()
        return await self._submit(cmid, {**frame, "client_msg_id": cmid}, None)

    def _raise_if_done(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise ChatClientError(f"room {self.name!r} is closed")

    async def _submit(
        self,
        cmid: str,
        frame: dict[str, Any],
        timeout: float | None,  # noqa: ASYNC109
    ) -> Ack:
        self._raise_if_done()
        pending = self._pending.get(cmid)
        if pending is None:
            future = asyncio.get_running_loop().create_future()
            pending = self._pending[cmid] = _Pending(frame, future)
            self._wakeup.set()
        try:
            return await asyncio.wait_for(
                asyncio.shield(pending.future), timeout or self.client.send_timeout
            )
        except TimeoutError:
            if self._pending.get(cmid) is pending:
                del self._pending[cmid]
            raise SendTimeout(cmid) from None

    async def _sender(self, conn: Connection, gen: int) -> None:
        """Write what this connection has not written: new sends, resends, retries due."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wakeup.clear()
                wait: float | None = None
                in_flight = sum(p.sent_gen == gen for p in self._pending.values())
                for cmid, p in list(self._pending.items()):
                    if p.sent_gen == gen or self._pending.get(cmid) is not p:
                        continue
                    hold = max(p.not_before, self._paused_until) - loop.time()
                    if hold > 0:
                        wait = hold if wait is None else min(wait, hold)
                        continue
                    if in_flight >= MAX_IN_FLIGHT:
                        break  # an answer wakes this up
                    if p.sent_gen is not None:
                        self.stats["resends"] += 1
                    p.sent_gen = gen
                    in_flight += 1
                    self.stats["send_frames"] += 1
                    await conn.send(p.frame, self.client.ping_timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
        except (ConnectionClosed, TimeoutError, OSError):
            conn.abort()  # the reader sees it and reconnects

    def _on_ack(self, ack: Ack) -> None:
        pending = self._pending.pop(ack.client_msg_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(ack)
        self._wakeup.set()

    def _on_error(self, error: Error) -> None:
        self.stats[f"error:{error.code}"] += 1
        pending = self._pending.get(error.client_msg_id or "")
        if pending is None:
            if self._auth_waiters and error.client_msg_id is None:
                waiter = self._auth_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(error)
            return
        now = asyncio.get_running_loop().time()
        if error.code in RETRY_CODES:
            pending.sent_gen = None
            if error.code == "rate_limited":  # hold every send, or a backlog retries in a storm
                self._paused_until = max(self._paused_until, now + (error.retry_after or 0.1))
            elif error.code == "overloaded":
                pending.not_before = now + (error.retry_after or pending.backoff)
            else:
                pending.not_before = now + pending.backoff * self.client.rng.uniform(0.5, 1.5)
                pending.backoff = min(pending.backoff * 2, 5.0)
        else:
            del self._pending[error.client_msg_id or ""]
            if not pending.future.done():
                pending.future.set_exception(
                    SendError(error.code, error.detail, error.client_msg_id)
                )
        self._wakeup.set()

    # -- tokens ------------------------------------------------------------------------------

    async def _refresher(self, conn: Connection) -> None:
        """Renew the socket's token before ``exp``, with the provider's newest token."""
        client, gap = self.client, 0.0
        while True:
            due = client.refresh_due()
            if due is None:
                return
            await asyncio.sleep(max(due - time.time(), gap))
            gap = 1.0  # a provider whose tokens are due at once is not asked in a loop
            try:
                token = await client.token()
                answer = await self._authenticate(conn, token)
            except (ConnectionClosed, OSError):
                return  # the reader sees the close
            except Exception:  # noqa: BLE001 - the provider failed or auth_ok is late
                self.stats["token_provider_failures"] += 1  # (at exp: 4401 and a reconnect)
                await asyncio.sleep(client.backoff_max)
                continue
            if isinstance(answer, Error):
                # rate_limited: wait it out; auth_refused: the provider's token is bad, ask
                # again shortly (a 4401 at exp reconnects with whatever comes next).
                await asyncio.sleep(answer.retry_after or client.backoff_max)
                if answer.code == "auth_refused":
                    with contextlib.suppress(Exception):  # counted as above, at the next try
                        await client.fresh_token(token)

    async def _authenticate(self, conn: Connection, token: str) -> AuthOk | Error:
        waiter: asyncio.Future[AuthOk | Error] = asyncio.get_running_loop().create_future()
        self._auth_waiters.append(waiter)
        await conn.send({"type": "auth", "token": token}, self.client.ping_timeout)
        return await asyncio.wait_for(waiter, self.client.ping_timeout * 2)

    # -- the connection loop -----------------------------------------------------------------

    async def _start(self, timeout: float) -> None:  # noqa: ASYNC109
        self._task = asyncio.create_task(self._run(), name=f"chat-room-{self.name}")
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait(
                {ready, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        self._raise_if_done()
        if not self._ready.is_set():
            raise ConnectionLost(f"room {self.name!r}: no connection within {timeout}s")

    async def _emit(self, event: Event) -> None:
        """Queue an event for the caller; never waits, so the socket is always read (the
        queue's bound is kept by ``_accept`` and ``_dispatch``)."""
        self._events.put_nowait(event)

    def _resume_now(self) -> None:
        """The caller caught up after an overflow: drop the connection and resume at once
        from the last item queued, which brings what was left to the server."""
        conn = self._conn
        if conn is not None:
            self._resyncing = True
            conn.abort()

    def _finish(self, failure: BaseException | None) -> None:
        """End the room: the iterator stops (or raises ``failure``), pending sends fail."""
        if failure is not None and self._failure is None:
            self._failure = failure
        self._ready.clear()
        error = self._failure or ChatClientError(f"room {self.name!r} is closed")
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
                pending.future.exception()  # retrieved: a send nobody awaits is no warning
        self._pending.clear()
        self._events.put_nowait(None)

    async def _run(self) -> None:
        client, loop = self.client, asyncio.get_running_loop()
        delay, offline_since = client.backoff_min, loop.time()
        try:
            while True:
                code, reason, reached = await self._attempt()
                self.stats[f"close:{code}"] += 1
                if code == 4403:
                    raise Forbidden(403, "forbidden", reason or "no access to the room")
                if code in FINAL_CLOSES:
                    raise ProtocolError(f"closed with {code}: {FINAL_CLOSES[code]}")
                if code == 4401:
                    await self._renew_token()
                if reached:
                    delay, offline_since = client.backoff_min, loop.time()
                if code == 0:  # a gap healed by resuming: at once
                    continue
                if code not in (1000, 4401):  # 1012 too: that replica is going away
                    client._next_url()
                if (
                    client.give_up_after is not None
                    and loop.time() - offline_since > client.give_up_after
                ):
                    raise ConnectionLost(
                        f"room {self.name!r}: no connection for {client.give_up_after}s"
                    )
                wait = delay * client.rng.uniform(0.5, 1.5)
                if isinstance(self._retry_after, float):
                    wait, self._retry_after = max(wait, self._retry_after), None
                if reached:
                    await self._emit(Disconnected(self.name, code, reason, round(wait, 3)))
                await asyncio.sleep(wait)
                delay = min(delay * 2, client.backoff_max)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - it ends the room; the caller gets it
            self._finish(exc)

    async def _renew_token(self) -> None:
        """After a 4401: a fresh token (``AuthError`` without a provider); a provider that
        fails is asked again at the next attempt, within ``give_up_after``."""
        try:
            await self.client.fresh_token(self.client._token)
        except AuthError:
            raise
        except Exception:  # noqa: BLE001 - the identity provider's trouble, not the room's
            self.stats["token_provider_failures"] += 1

    _retry_after: float | None = None
    _resyncing = False
    _token_retried = False  # a refused handshake got its one fresh token
    _left_items = False  # this connection left items to the server (an overflow)

    async def _attempt(self) -> tuple[int, str, bool]:
        """Connect once and serve the connection until it ends: (close code, reason, whether
        it got as far as ``ready``). Code 0: left on purpose to heal a gap."""
        client = self.client
        url = client._url()
        if url is None:
            self.stats["connect:no_url"] += 1
            return NO_CLOSE, "no server to connect to", False
        try:
            token = await client.token()
        except AuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - the provider's trouble: retried with backoff
            self.stats["token_provider_failures"] += 1
            return NO_CLOSE, f"token provider failed: {exc!r}", False
        params: dict[str, Any] = {"history": self.history}
        if self.last_seq is not None:
            params["since"] = self.last_seq
        try:
            conn = await Connection.open(
                room_url(url, self.name, **params),
                token=token,
                timeout=client.open_timeout,
                compression=client.compression,
                ping_interval=client.ping_interval,
                ping_timeout=client.ping_timeout,
                close_timeout=client.ping_timeout,
            )
        except InvalidStatus as exc:
            return self._refused(exc)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self.stats[f"connect:{type(exc).__name__}"] += 1
            return NO_CLOSE, repr(exc), False
        if self.client._pick is not None or len(self.client._urls or ()) > 1:
            self.client.rest.http.base_url = http_base(url)  # REST follows the live replica
        self.connected_url = url
        try:
            return await self._serve(conn)
        finally:
            self.connected_url = None
            self._ready.clear()
            self._conn = None
            for waiter in self._auth_waiters:
                waiter.cancel()
            self._auth_waiters.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), client.ping_timeout)
            conn.abort()

    def _refused(self, exc: InvalidStatus) -> tuple[int, str, bool]:
        """A handshake answered with a status: 429 and 5xx are waited out, 401 gets a fresh
        token, the rest (403 forbidden, a bad room name) end the room."""
        response = exc.response
        status = response.status_code
        try:
            body = json.loads(response.body or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        code = body.get("code")
        self.stats[f"connect:http_{status}"] += 1
        if status == 429 or status >= 500:
            retry = response.headers.get("Retry-After")
            with contextlib.suppress(TypeError, ValueError):
                self._retry_after = float(retry)  # type: ignore[arg-type]
            return NO_CLOSE, f"handshake refused with {status}", False
        if code == "forbidden":
            raise Forbidden(status, "forbidden", body.get("detail"))
        # A bare 403 is a bad token, room name or parameter: a fresh token is worth one try.
        if status in (401, 403) and self.client.token_provider and not self._token_retried:
            self._token_retried = True
            return 4401, "token refused at the handshake", False
        detail = body.get("detail") or "handshake refused: a bad token, room name or parameter"
        raise HTTPStatusError(status, code or f"http_{status}", detail)

    async def _serve(self, conn: Connection) -> tuple[int, str, bool]:
        client = self.client
        self._gen += 1
        gen, reached = self._gen, False
        self._left_items = False
        tasks: list[asyncio.Task[None]] = []
        try:
            replay: list[Item] = []
            while True:  # the replay, then ready: each frame within open_timeout
                event = parse(await conn.recv(client.open_timeout))
                if isinstance(event, Ready):
                    break
                if isinstance(event, Item):
                    replay.append(event)
            await self._on_ready(event, replay)
            self._conn, reached, self._token_retried = conn, True, False
            self._ready.set()
            tasks = [
                asyncio.create_task(self._sender(conn, gen)),
                asyncio.create_task(self._refresher(conn)),
            ]
            while True:  # keepalive pings bound this wait: a silent path ends it
                await self._dispatch(parse(await conn.recv(None)))
        except ConnectionClosed as exc:
            if self._resyncing:
                self._resyncing = False
                return 0, "resuming after an overflow", reached
            return (*close_code(exc), reached)
        except TimeoutError:
            self.stats["timeouts"] += 1
            return NO_CLOSE, "timed out", reached
        except _Resync:
            return 0, "resuming after a gap", reached
        except (ValueError, ProtocolError) as exc:
            self.stats["bad_frames"] += 1
            return NO_CLOSE, f"unreadable frame: {exc}", reached
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pending in self._pending.values():
                if pending.sent_gen == gen:
                    pending.sent_gen = None  # unanswered on this connection: resend on the next

    async def _on_ready(self, ready: Ready, replay: list[Item]) -> None:
        if self.last_seq is None:  # a first join: the history replay, then live from last_seq
            for item in replay:
                await self._emit(item)
        elif ready.recovered:
            for item in replay:
                await self._accept(item)
            if self.last_seq < ready.last_seq and not self._overflow:
                if not self._left_items:  # the replay stopped short of its snapshot
                    self.stats["gaps"] += 1
                raise _Resync
        else:
            self.stats["resets"] += 1
            await self._emit(Reset(self.name, ready.last_seq, self.last_seq + 1))
            for item in replay:
                await self._emit(item)
        if self.last_seq is None or not ready.recovered:
            self.last_seq = ready.last_seq
        await self._emit(ready)

    async def _accept(self, item: Item) -> None:
        """A stream item: handed on once, in order; a gap ends the connection to resume."""
        assert self.last_seq is not None  # noqa: S101 - set by the first ready
        if item.seq <= self.last_seq:
            self.stats["duplicates"] += 1
            return
        if self._overflow or self._events.qsize() >= self.client.max_events:
            self._overflow = self._left_items = True  # not taken: a resume brings it again
            self.stats["overflow"] += 1
            return
        if item.seq > self.last_seq + 1:
            if not self._left_items:  # not one this room left to the server: its fault
                self.stats["gaps"] += 1
            raise _Resync
        self.last_seq = item.seq
        await self._emit(item)

    async def _dispatch(self, event: Event | Answer | None) -> None:
        if isinstance(event, Item):
            await self._accept(event)
        elif isinstance(event, Ack):
            self._on_ack(event)
        elif isinstance(event, Error):
            self._on_error(event)
        elif isinstance(event, AuthOk):
            if self._auth_waiters:
                waiter = self._auth_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(event)
        elif isinstance(event, Presence | Typing | Read | Receipt):
            if self._events.qsize() < self.client.max_events:
                await self._emit(event)
            else:
                self.stats["signals_dropped"] += 1  # worthless late
