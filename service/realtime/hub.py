"""Per-process fan-out: one broadcaster subscription per room, shared by the local connections.

Guarantees, for each local connection of a room:

* ``join`` returns once the backend has taken the room's subscription. While its connection
  (LISTEN, or the Redis bus) is up, the process is then listening; while it is down, the backend
  only records the room, and once it is back it listens again and sends a resync marker (below).
  Either way nothing committed after ``join`` returns is lost to the connection: it reaches the
  outbox live or through the catch-up, and a snapshot read after ``join`` overlaps both (the
  connection drops the overlap by seq).
* Each message is made into one ``Live`` item, put in every outbox of the room, in the order
  the notifications arrive: with LISTEN/NOTIFY that is commit order, which is seq order; on the
  Redis bus it may not be, and the connection fills a hole from the database. A message too big
  for a NOTIFY payload is read from the database once per process.
* Every outbox is bounded. A connection that falls ``outbox_limit`` frames behind has its outbox
  ended (``SlowConsumer``) and is closed by its owner (1013); it never delays the room or the
  process. If the room's stream fails (a bug: the backends never fail a subscription), every
  outbox of the room ends with ``StreamLost`` and its owner closes with 1011; the next ``join``
  starts a fresh stream.
* After the backend's connection was lost and restored, every outbox gets ``Marker.RESYNC`` and
  its owner catches up from the database (``service.realtime.websocket``), as it does for a hole
  in the live stream. Catch-ups are shared (``RoomHub.catch_up``): the connections of a room
  that ask together get one read of the room's newest messages, bounded in count and bytes,
  each frame made once; a connection further behind than that read reaches is closed (1013)
  and resumes with ``since``, whose replay is bounded too. A reconnect therefore costs about
  one read per room, not one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg
from broadcaster import Broadcast

from service.chat.envelope import (
    PROCESS_SIGNAL,
    ROOM_CLOSED,
    SIGNAL_PREFIX,
    SharedFrame,
    channel_for,
    decode_notification,
    decode_signal,
    stored_frame,
)
from service.chat.history import read_range, read_tail
from service.errors import AccessRevoked, OutboxEnded, SlowConsumer, StreamLost, Unavailable
from service.realtime.backend import RESYNC

log = logging.getLogger(__name__)


MEMBER_KIND = '"kind":"member"'
"""In a frame only as a member item's header: inside a string every quote is escaped."""


class Live:
    """A message of the room's live stream, made once and put in every outbox of the room.

    ``frame`` is None when the process could not read a message too big to notify: the
    connection fills it in from the database, as it does for a hole in the stream."""

    __slots__ = ("frame", "seq")

    def __init__(self, seq: int, frame: SharedFrame | None) -> None:
        self.seq = seq
        self.frame = frame


class Marker(enum.Enum):
    """An outbox item that is an instruction to the writer rather than a frame."""

    RESYNC = enum.auto()
    """Catch up from the database: the stream may have a hole (the backend reconnected, or a
    publish to the room was lost on the Redis bus)."""
    FAILED = enum.auto()
    """Close with 1011: answering a frame failed, or writing at once did (a bug, logged)."""


DROPPABLE_BACKLOG = 8
"""Queued items past which a socket gets no more droppable frames (``Outbox.offer``)."""

OutboxItem = Live | str | SharedFrame | Marker
"""A live message (written in seq order, once); a frame sent as it is, in its place (``str``:
an ack, an error, a pong; ``SharedFrame``: a live message the socket could not take at once,
its seq already counted); or a ``Marker``."""


WriteNow = Callable[[deque[OutboxItem]], deque[OutboxItem] | None]
"""Writes what it can of the items at once, without awaiting; returns the rest (from the first
item that needs an await), or None."""


class Outbox:
    """A bounded queue of frames for one websocket; overflow ends it instead of blocking.

    Lean on purpose (one per connection, thousands idle): no Events, and a deque only while
    something is queued. The loop is looked up once, not per wait.

    While the owner's writer waits in ``take``, what is put is first offered to ``write_now``
    from one loop callback per burst, and the writer is woken only for what that leaves (a
    frame to read from the database, a socket that is not writable): most frames go out without
    a task switch each.
    """

    __slots__ = (
        "_flush_scheduled", "_items", "_limit", "_loop", "_waiter", "ended", "on_end", "user",
        "write_now",
    )  # fmt: skip

    def __init__(self, limit: int, user: str | None = None) -> None:
        self._limit = limit
        self.user = user
        """Whose socket it feeds: a ``member`` item removing that user ends it."""
        self._items: deque[OutboxItem] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self.ended: type[OutboxEnded] | None = None
        """Why the outbox ended (``end``); ``take`` raises it from then on."""
        self.on_end: Callable[[], object] | None = None
        """Called once, at the end: the owner stops its writer even while it is in a send."""
        self.write_now: WriteNow | None = None

    def put(self, item: OutboxItem) -> None:
        if self.ended is not None:
            return
        items = self._items
        if items is None:
            items = self._items = deque()
        if len(items) >= self._limit:
            self.end(SlowConsumer)
            return
        items.append(item)
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # the writer is busy: it takes the items when it is done
        if self.write_now is None:
            waiter.set_result(None)
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]  # set with the waiter

    def _flush(self) -> None:
        self._flush_scheduled = False
        waiter, items, write_now = self._waiter, self._items, self.write_now
        if waiter is None or waiter.done() or not items or write_now is None:
            return  # the writer was woken meanwhile (ended, cancelled): it sees the items
        self._items = None
        try:
            rest = write_now(items)
        except Exception:
            log.exception("writing frames at once failed")
            rest = deque([Marker.FAILED])  # what was written is unknown: close with 1011
        if rest:
            self._items = rest
            waiter.set_result(None)

    def offer(self, item: str) -> None:
        """``put`` a frame worth nothing late (typing), unless the socket is behind: more
        than ``DROPPABLE_BACKLOG`` items queued. A slow consumer loses these first."""
        items = self._items
        if items is None or len(items) < DROPPABLE_BACKLOG:
            self.put(item)

    def end(self, reason: type[OutboxEnded]) -> None:
        """Drop what is queued and take nothing more; the first reason is the one that counts."""
        if self.ended is not None:
            return
        self.ended = reason
        self._items = None
        self._wake()
        if self.on_end is not None:
            self.on_end()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> deque[OutboxItem]:
        """Everything queued (at least one item), oldest first; raises ``ended`` once ended."""
        while not self._items:
            if self.ended is not None:
                raise self.ended
            if self._loop is None:  # once: get_running_loop() costs a getpid() on 3.11
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, None
        return items


@dataclass(frozen=True, slots=True)
class CatchUp:
    """The newest messages of a room as one read found them: ``frames[i]`` is message
    ``first + i`` (contiguous), and the last one is ``last_seq``, the room's end at the read."""

    first: int
    last_seq: int
    frames: list[SharedFrame]


@dataclass(eq=False, slots=True)
class _SharedRead:
    """A catch-up read not yet started: connections that ask before it starts share it."""

    after: int
    result: asyncio.Future[CatchUp]


@dataclass(eq=False, slots=True)
class _RoomReads:
    """A room's catch-up reads: at most one running and one waiting to start after it."""

    task: asyncio.Task[None] | None = None
    waiting: _SharedRead | None = None


@dataclass(frozen=True, slots=True)
class CatchUpLimits:
    messages: int = 1000
    """Newest messages one shared read holds (``CHAT_CATCH_UP_LIMIT``)."""
    bytes: int = 8 * 1024 * 1024
    """Bytes of message JSON one shared read holds (``CHAT_CATCH_UP_MAX_BYTES``)."""


class RoomListener(Protocol):
    """Takes the signals meant for the processes (``?`` payloads: presence, typing) of the
    rooms this process hears, and learns when a room's stream may have lost some."""

    def on_signal(self, room: str, payload: str) -> None: ...

    def on_resync(self, room: str) -> None: ...


@dataclass(eq=False)
class _RoomStream:
    outboxes: set[Outbox] = field(default_factory=set)
    listening: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] = field(init=False)
    """Set as soon as the stream is made (the task needs the stream)."""


class RoomHub:
    def __init__(
        self,
        broadcast: Broadcast,
        pool: asyncpg.Pool,
        outbox_limit: int,
        on_forward: Callable[[float], None] = lambda _sent_at: None,
        catch_up_limits: CatchUpLimits | None = None,
        on_catch_up_read: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_forward = on_forward
        self._broadcast = broadcast
        self._pool = pool
        self._outbox_limit = outbox_limit
        self._streams: dict[str, _RoomStream] = {}
        self._catch_up_limits = catch_up_limits or CatchUpLimits()
        self._on_catch_up_read = on_catch_up_read
        self._reads: dict[str, _RoomReads] = {}
        self._listeners: dict[str, RoomListener] = {}

    async def follow(self, channel: str, on_event: Callable[[], None]) -> None:
        """Call ``on_event`` for every notification on ``channel``, a channel of no room (the
        webhook deliverers' wake-ups), and after a resync, when some may have been missed;
        until cancelled. It shares the bus's LISTEN connection: with LISTEN/NOTIFY, each
        listening connection costs the database a wake-up for every NOTIFY of every room."""
        async with self._broadcast.subscribe(channel) as subscriber:
            on_event()  # what came before the subscription
            while True:
                await subscriber.get()
                on_event()

    def listen(self, kind: str, listener: RoomListener) -> None:
        """Hand the signals that start with ``kind`` (``envelope.PRESENCE_SIGNAL``...) to
        ``listener``; every listener hears of a resync."""
        self._listeners[kind] = listener

    def deliver(
        self,
        room: str,
        frame: str,
        per_user: Mapping[str, str | None] | None = None,
        droppable: bool = False,
    ) -> None:
        """A frame to the room's local sockets; the sockets of a user ``per_user`` names get
        that frame instead (None: nothing). ``droppable``: not to a socket that is behind."""
        stream = self._streams.get(room)
        if stream is None:
            return
        for outbox in stream.outboxes:
            item: str | None = frame
            if per_user is not None and outbox.user in per_user:
                item = per_user[outbox.user]  # type: ignore[index]
            if item is None:
                continue
            if droppable:
                outbox.offer(item)
            else:
                outbox.put(item)

    @contextlib.asynccontextmanager
    async def join(self, room: str, user: str | None = None) -> AsyncIterator[Outbox]:
        """An outbox fed by the room's stream while the context is open (the guarantees are
        the module's); raises ``StreamLost`` when the stream failed before it was subscribed.
        It ends with ``AccessRevoked`` when the stream removes ``user`` from the room or
        closes the room."""
        outbox = Outbox(self._outbox_limit, user)
        stream = self._streams.get(room)
        if stream is None:
            stream = self._streams[room] = _RoomStream()
            stream.task = asyncio.create_task(self._pump(room, stream), name=f"room-{room}")
            stream.task.add_done_callback(_log_failure)
        stream.outboxes.add(outbox)
        try:
            try:
                await asyncio.shield(stream.listening)
            except Exception as exc:  # logged by the stream's task
                raise StreamLost("the room's live stream could not be joined") from exc
            yield outbox
        finally:
            stream.outboxes.discard(outbox)
            if not stream.outboxes and self._streams.get(room) is stream:
                del self._streams[room]
                stream.task.cancel()  # leaves the broadcaster channel

    async def close(self) -> None:
        tasks = [s.task for s in self._streams.values()]
        for reads in self._reads.values():  # a task cancelled before it began never sees it
            if reads.waiting is not None:
                _shut(reads.waiting)
            if reads.task is not None:
                tasks.append(reads.task)
        self._streams.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, room: str, stream: _RoomStream) -> None:
        try:
            async with self._broadcast.subscribe(channel_for(room)) as subscriber:
                stream.listening.set_result(None)
                while True:
                    event = await subscriber.get()
                    if event.message == RESYNC:
                        self._dispatch(stream, Marker.RESYNC)
                        for listener in self._listeners.values():
                            _safely(listener.on_resync, room)
                        continue
                    if event.message.startswith(PROCESS_SIGNAL):
                        handler = self._listeners.get(event.message[:2])
                        if handler is not None:
                            _safely(handler.on_signal, room, event.message)
                        continue
                    if event.message == ROOM_CLOSED:
                        self._revoke(stream, None)
                        continue
                    if event.message.startswith(SIGNAL_PREFIX):
                        self._signal(stream, event.message)
                        continue
                    seq, sent_at, frame = decode_notification(event.message)
                    if frame is None:
                        frame = await self._load(room, seq)
                    self._dispatch(stream, Live(seq, None if frame is None else SharedFrame(frame)))
                    if frame is not None and MEMBER_KIND in frame:
                        self._on_member(stream, frame)
                    self._on_forward(sent_at)
        except Exception as exc:
            # The stream is dead (our backends never fail a subscription: a bug, logged by
            # _log_failure): new joiners start a fresh one, current ones are closed.
            cancelled = stream.task.cancelling()  # the task running this
            if self._streams.get(room) is stream:
                del self._streams[room]
            if not stream.listening.done():
                stream.listening.set_exception(exc)
                stream.listening.exception()  # retrieved: joiners see it through shield()
            for outbox in list(stream.outboxes):
                outbox.end(StreamLost)
            if cancelled:  # its last joiner left while it subscribed: broadcaster's subscribe,
                raise asyncio.CancelledError from exc  # cancelled there, fails in its finally
            raise

    async def catch_up(self, room: str, *, after: int) -> CatchUp:
        """The room's newest messages, from one read shared by every connection of the room
        that asks before it starts; it holds every message after ``after`` unless there are
        more than the limits allow (then ``first > after + 1``: the caller is too far behind).

        A read serves only the requests made before it began, so its snapshot holds whatever
        any of them is missing (a resync marker or a gap seen before the request). The
        connections woken by one marker ask within the same loop iteration; the read starts
        in a later one, so they all share it. Raises ``Unavailable`` when the database is out.
        """
        reads = self._reads.get(room)
        if reads is None:
            reads = self._reads[room] = _RoomReads()
        read = reads.waiting
        if read is None:
            read = reads.waiting = _SharedRead(after, asyncio.get_running_loop().create_future())
            read.result.add_done_callback(_retrieve)
            if reads.task is None:
                reads.task = asyncio.create_task(
                    self._run_reads(room, reads), name=f"catch-up-{room}"
                )
        elif after < read.after:
            read.after = after
        return await asyncio.shield(read.result)  # a caller that leaves does not cancel it

    async def _run_reads(self, room: str, reads: _RoomReads) -> None:
        """Run the room's waiting read, and the one that waited meanwhile, until none waits."""
        try:
            while (read := reads.waiting) is not None:
                reads.waiting = None
                self._on_catch_up_read()
                try:
                    found = await read_tail(
                        pool=self._pool,
                        room=room,
                        after=read.after,
                        limit=self._catch_up_limits.messages,
                        max_bytes=self._catch_up_limits.bytes,
                    )
                    frames = [SharedFrame(stored_frame(m)) for m in found.messages]
                except asyncio.CancelledError:  # the hub is closing
                    _shut(read)
                    raise
                except Exception as exc:  # Unavailable, or a bug: each caller handles it
                    read.result.set_exception(exc)
                else:
                    read.result.set_result(CatchUp(found.first, found.last_seq, frames))
        finally:
            reads.task = None
            if reads.waiting is not None:  # cancelled (closing) with a read still waiting
                _shut(reads.waiting)
                reads.waiting = None
            if self._reads.get(room) is reads:
                del self._reads[room]

    @staticmethod
    def _on_member(stream: _RoomStream, frame: str) -> None:
        """A membership change: the sockets of a user who left or was removed end (4403).
        Every process hears it within a fan-out, so the user loses the room everywhere."""
        item = json.loads(frame)
        if item.get("kind") == "member" and item.get("action") in ("left", "removed"):
            RoomHub._revoke(stream, item.get("user"))

    @staticmethod
    def _revoke(stream: _RoomStream, user: str | None) -> None:
        """End the outboxes of ``user`` (None: every outbox of the room) with ``AccessRevoked``."""
        for outbox in list(stream.outboxes):
            if user is None or outbox.user == user:
                outbox.end(AccessRevoked)

    @staticmethod
    def _signal(stream: _RoomStream, payload: str) -> None:
        """A signal (``envelope.encode_signal``): its frame, as it is, to the sockets it is
        for (one user's, every user's but one's, everyone's)."""
        user, only, frame = decode_signal(payload)
        for outbox in stream.outboxes:
            if user is None or (outbox.user == user) is only:
                outbox.put(frame)

    @staticmethod
    def _dispatch(stream: _RoomStream, item: Live | Marker) -> None:
        for outbox in stream.outboxes:
            outbox.put(item)

    async def _load(self, room: str, seq: int) -> str | None:
        """Read one message that was too big to notify; None leaves it to each connection."""
        try:
            found = await read_range(pool=self._pool, room=room, after=seq - 1, until=seq)
        except Exception:
            log.warning("could not load message %s/%d; connections will catch up", room, seq)
            return None
        return stored_frame(found[0]) if found else None


def _safely(call: Callable[..., None], *args: str) -> None:
    """A listener's failure (a bug) is logged; it never ends the room's stream."""
    try:
        call(*args)
    except Exception:
        log.exception("a room listener failed")


def _shut(read: _SharedRead) -> None:
    if not read.result.done():
        read.result.set_exception(Unavailable("the service is shutting down"))


def _retrieve(future: asyncio.Future[CatchUp]) -> None:
    """A read's error reaches every caller still waiting; when none is, it is not an error."""
    if not future.cancelled():
        future.exception()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("room stream %s failed", task.get_name(), exc_info=task.exception())
