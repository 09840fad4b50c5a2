"""Presence: who has a socket open to a room, on any replica (docs/protocol.md, "Presence").

A signal, never a stream item (../shared/DESIGN.md): nothing is replayed, and a process's
users go with it. The shared state is two UNLOGGED tables (migration 0008, SQL in
``service.db.presence``): a row per user present in a room, listing the replicas that hold a
socket of theirs, and a row per replica with the time its presence expires.

* **Local first.** Each process counts its own sockets per (room, user) and writes only the
  changes of that count from none to some and back, gathered every ``FLUSH_INTERVAL`` into one
  transaction. Whether a user appeared or left is decided there, under the row's lock, so
  exactly one replica reports each change, as a ``?p`` signal on the room's channel (NOTIFYed
  in the same transaction with LISTEN/NOTIFY, in commit order; published after it on Redis).
* **No flicker.** A user whose last socket here closed stays for ``grace`` seconds: a
  reconnect within it, here or on another replica, changes no row's existence, so nobody is
  told. A replica that shuts down (1012) keeps its rows for ``grace`` seconds too.
* **Crashes.** Each process moves its expiry forward every ``timeout / 6`` seconds; every
  process deletes the replicas that expired (one of them wins each row) and reports their
  users offline unless another replica has them: within ``timeout`` of a kill -9. A process
  that finds itself reaped (it was cut off that long) registers again and writes its users
  again. Heartbeats through a table rather than over the bus: the state must be readable by a
  replica that just started (for ``ready`` and REST), and a table with expiry gives that and
  crash detection with one mechanism, on either bus (docs/protocol.md says more).
* **Views and frames.** A process with sockets in a room keeps the room's present users in
  memory (one read when its first socket joins, then the ``?p`` signals), so ``ready`` costs
  no query; it sends its sockets at most one ``presence`` frame per room per ``interval``,
  with the changes since the last one (the first change after a quiet spell goes at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from service.chat import rooms
from service.chat.envelope import channel_for, encode_presence, presence_frame
from service.chat.messages import Publish
from service.db import presence as db
from service.db import rooms as rooms_db
from service.db.engine import reading
from service.errors import Unavailable

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.25
"""Seconds a process gathers arrivals and departures before it writes them in one go."""
LOAD_TIMEOUT = 5.0
"""Seconds ``ready`` waits for a room's view; past it, it lists this process's users only."""

Key = tuple[str, str]
"""(room, user)."""
Deliver = Callable[[str, str, Mapping[str, str | None] | None, bool], None]
"""``deliver(room, frame, per_user, droppable)``: a frame to this process's sockets of the room
(``per_user``: another frame, or None for nothing, for the sockets of the users it names;
``droppable``: not to a socket that is behind)."""


@dataclass(eq=False, slots=True)
class _Room:
    """A room this process has sockets in."""

    sockets: dict[str, int] = field(default_factory=dict)
    """User -> open sockets here."""
    names: dict[str, str | None] = field(default_factory=dict)
    view: dict[str, str | None] | None = None
    """Everyone present (user -> name); None until read."""
    loading: asyncio.Task[None] | None = None
    buffered: list[str] = field(default_factory=list)
    """Signals that came while the view was read, applied after it."""
    unseen: set[str] = field(default_factory=set)
    """Local users the view does not have yet (their arrival is not written or not heard)."""
    first: list[str] | None = None
    """The view's first ``ready_limit`` users by id (cached until the view changes)."""
    came: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    next_frame: float = 0.0
    timer: asyncio.TimerHandle | None = None


class Presence:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publish: Publish | None,
        *,
        interval: float,
        grace: float,
        timeout: float,
        ready_limit: int,
    ) -> None:
        self._pool = pool
        self._publish = publish
        """None: NOTIFY in the transaction (the database is the bus)."""
        self._interval = interval
        self._grace = grace
        self._heartbeat = timeout / 6
        self._ttl = timeout - 2 * self._heartbeat
        """A heartbeat's expiry: reaped by another within a heartbeat of it, and the frame
        within ``interval``: inside ``timeout`` of a crash."""
        self._ready_limit = ready_limit
        self.replica = uuid.uuid4().hex
        self._deliver: Deliver | None = None
        self._rooms: dict[str, _Room] = {}
        self._recorded: set[Key] = set()
        """What this replica has written as present."""
        self._dirty: set[Key] = set()
        self._linger: dict[Key, float] = {}
        """Users with no socket here any more, present until the deadline (monotonic)."""
        self._names: dict[Key, str | None] = {}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, deliver: Deliver) -> None:
        """Where frames go: the fan-out (made after this, which it feeds)."""
        self._deliver = deliver

    async def start(self) -> None:
        """Register this replica and reap the ones that expired (a single replica's previous
        process among them), then run the writer and the heartbeat."""
        async with reading(self._pool) as conn:
            await db.register(conn, replica=self.replica, ttl=self._ttl)
        await self._reap()
        self._tasks = [
            asyncio.create_task(self._flush_forever(), name="presence-flush"),
            asyncio.create_task(self._beat_forever(), name="presence-heartbeat"),
        ]

    async def close(self) -> None:
        """Stop; this replica's users stay present for ``grace`` (they may be reconnecting to
        another replica), then the others reap it."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for room in self._rooms.values():
            if room.timer is not None:
                room.timer.cancel()
            if room.loading is not None:
                room.loading.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2), reading(self._pool) as conn:
                await db.register(conn, replica=self.replica, ttl=self._grace)

    # -- this process's sockets --------------------------------------------------------------

    def arrive(self, room: str, user: str, name: str | None) -> None:
        """A socket of ``user`` is open to ``room`` here (``leave`` when it closes)."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        count = state.sockets.get(user, 0)
        state.sockets[user] = count + 1
        state.names[user] = name
        if state.view is None or user not in state.view:
            state.unseen.add(user)
        if count:
            return
        key = (room, user)
        self._names[key] = name
        if self._linger.pop(key, None) is None:
            self._dirty.add(key)
            self._wakeup.set()

    def leave(self, room: str, user: str) -> bool:
        """A socket of ``user`` closed: True when it was their last one of the room here."""
        state = self._rooms.get(room)
        if state is None or user not in state.sockets:
            return False
        count = state.sockets[user] - 1
        if count:
            state.sockets[user] = count
            return False
        del state.sockets[user]
        state.names.pop(user, None)
        state.unseen.discard(user)
        self._linger[(room, user)] = time.monotonic() + self._grace
        self._wakeup.set()
        if not state.sockets:  # nobody here reads the room's presence any more
            del self._rooms[room]
            if state.timer is not None:
                state.timer.cancel()
            if state.loading is not None:
                state.loading.cancel()
        return True

    async def ready(self, room: str) -> dict[str, Any]:
        """``ready``'s ``presence``: everyone present (this process's sockets included),
        the first ``ready_limit`` by id. Reads the room's view once per process; while the
        database is out, only this process's users."""
        state = self._rooms[room]  # ``arrive`` came first
        if state.view is None:
            if state.loading is None:
                state.loading = self._start_load(room, state)
            await asyncio.wait([state.loading], timeout=LOAD_TIMEOUT)
        view = state.view or {}
        if state.first is None and state.view is not None:
            state.first = heapq.nsmallest(self._ready_limit, view)
        extra = [u for u in state.unseen if u not in view]
        listed = heapq.nsmallest(self._ready_limit, [*(state.first or ()), *extra])
        names = state.names
        users = [{"user": u, "name": view[u] if u in view else names.get(u)} for u in listed]
        return {"count": len(view) + len(extra), "users": users}

    # -- signals from the room's channel ----------------------------------------------------

    def on_signal(self, room: str, payload: str) -> None:
        """A ``?p`` signal heard on the room's channel."""
        state = self._rooms.get(room)
        if state is None:
            return
        if state.loading is not None:
            state.buffered.append(payload)  # applied on top of what the read finds
        elif state.view is not None:
            self._apply(room, state, payload)
        # else the view is read when it is needed, with this change in it

    def on_resync(self, room: str) -> None:
        """The bus reconnected: signals may have been lost. Read the view again; what changed
        goes out as a frame."""
        state = self._rooms.get(room)
        if state is not None and state.view is not None and state.loading is None:
            state.loading = self._start_load(room, state)

    def _apply(self, room: str, state: _Room, payload: str) -> None:
        try:
            change = json.loads(payload[2:])
            online, offline = change["on"], change["off"]
        except (ValueError, KeyError, TypeError):
            log.error("undecodable presence signal in %s: %.200r", room, payload)
            return
        view = state.view
        if view is None:
            return
        for user, name in online:
            if user not in view:
                self._note(state, user, online=True)
            view[user] = name
            state.unseen.discard(user)
        for user in offline:
            if view.pop(user, ...) is not ...:
                self._note(state, user, online=False)
        self._schedule(room, state)

    def _start_load(self, room: str, state: _Room) -> asyncio.Task[None]:
        task = asyncio.create_task(self._load(room, state), name=f"presence-{room}")
        task.add_done_callback(_log_failure)
        return task

    async def _load(self, room: str, state: _Room) -> None:
        try:
            async with reading(self._pool) as conn:
                found = await db.room(conn, room=room)
        except BaseException:
            state.buffered.clear()
            raise
        finally:
            state.loading = None
        old, state.view, state.first = state.view, found, None
        if old is not None:  # a reload: what changed meanwhile
            for user in found.keys() - old.keys():
                self._note(state, user, online=True)
            for user in old.keys() - found.keys():
                self._note(state, user, online=False)
        state.unseen -= found.keys()
        buffered, state.buffered = state.buffered, []
        for payload in buffered:
            self._apply(room, state, payload)
        self._schedule(room, state)

    @staticmethod
    def _note(state: _Room, user: str, *, online: bool) -> None:
        """A change of the view since the last frame; one that undoes an earlier one in the
        same frame cancels it (the sockets never saw the first)."""
        state.first = None
        came, gone = (state.came, state.gone) if online else (state.gone, state.came)
        if user in gone:
            gone.discard(user)
        else:
            came.add(user)

    def _schedule(self, room: str, state: _Room) -> None:
        if state.timer is not None or not (state.came or state.gone):
            return
        delay = max(0.0, state.next_frame - time.monotonic())
        state.timer = asyncio.get_running_loop().call_later(delay, self._frame, room, state)

    def _frame(self, room: str, state: _Room) -> None:
        state.timer = None
        if self._rooms.get(room) is not state or not (state.came or state.gone):
            return
        frame = presence_frame(room, sorted(state.came), sorted(state.gone))
        # A user's own sockets are not told that the user alone arrived: their ``ready``
        # said so (in a frame of several, they may read their own id: it changes nothing).
        per_user: dict[str, str | None] | None = None
        if len(state.came) == 1 and not state.gone:
            (user,) = state.came
            if user in state.sockets:
                per_user = {user: None}
        state.came, state.gone = set(), set()
        state.next_frame = time.monotonic() + self._interval
        if self._deliver is not None:
            self._deliver(room, frame, per_user, False)

    # -- writing ----------------------------------------------------------------------------

    def _wanted(self, key: Key) -> bool:
        state = self._rooms.get(key[0])
        return key in self._linger or (state is not None and key[1] in state.sockets)

    async def _flush_forever(self) -> None:
        while True:
            if not self._dirty and not self._linger:
                await self._wakeup.wait()
            await asyncio.sleep(FLUSH_INTERVAL)  # what comes meanwhile goes in the same write
            self._wakeup.clear()
            now = time.monotonic()
            for key, deadline in list(self._linger.items()):
                if deadline <= now:
                    del self._linger[key]
                    self._dirty.add(key)
            if not self._dirty:
                continue
            try:
                await self._flush()
            except Exception:  # the database is out (or a deadlock): kept, tried again
                log.warning("writing presence failed; retrying", exc_info=True)
                await asyncio.sleep(FLUSH_INTERVAL * 4)

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        add: list[tuple[str, str, str | None]] = []
        added: list[Key] = []  # the keys themselves: ``_recorded`` shares them, one per user
        drop: list[Key] = []
        for key in dirty:
            wanted = self._wanted(key)
            if wanted and key not in self._recorded:
                add.append((key[0], key[1], self._names.get(key)))
                added.append(key)
            elif not wanted and key in self._recorded:
                drop.append(key)
            elif not wanted:
                self._names.pop(key, None)
        if not add and not drop:
            return
        signals: list[tuple[str, str]] = []
        try:
            async with reading(self._pool) as conn, conn.transaction():
                changes = await db.write(conn, replica=self.replica, add=add, drop=drop)
                if changes is None:
                    await db.register(conn, replica=self.replica, ttl=self._ttl)
                else:
                    signals = await self._notify(conn, changes)
        except BaseException:
            self._dirty |= dirty
            raise
        if changes is None:
            self._rewrite()
            return
        self._recorded.update(added)
        for key in drop:
            self._recorded.discard(key)
            self._names.pop(key, None)
        await self._publish_all(signals)

    def _rewrite(self) -> None:
        """Another replica reaped this one (its heartbeats did not reach the database): it
        registered again, and writes every user it has again."""
        log.warning("presence: this replica was reaped as dead; writing its users again")
        self._dirty |= self._recorded | set(self._linger)
        self._dirty |= {(room, user) for room, s in self._rooms.items() for user in s.sockets}
        self._recorded = set()
        self._wakeup.set()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat)
            try:
                async with reading(self._pool) as conn:
                    fresh = await db.register(conn, replica=self.replica, ttl=self._ttl)
                if fresh:
                    self._rewrite()
                await self._reap()
            except Exception:
                log.warning("presence heartbeat failed", exc_info=True)

    async def _reap(self) -> None:
        async with reading(self._pool) as conn, conn.transaction():
            changes = await db.reap(conn)
            signals = await self._notify(conn, changes)
        await self._publish_all(signals)

    async def _notify(self, conn: Any, changes: list[db.Change]) -> list[tuple[str, str]]:
        """The changes' signals, by room; NOTIFYed in ``conn``'s transaction when the database
        is the bus, else returned to publish after the commit."""
        by_room: dict[str, tuple[list[tuple[str, str | None]], list[str]]] = {}
        for change in changes:
            online, offline = by_room.setdefault(change.room, ([], []))
            if change.online:
                online.append((change.user, change.name))
            else:
                offline.append(change.user)
        signals = [
            (channel_for(room), payload)
            for room, (online, offline) in by_room.items()
            for payload in encode_presence(online, offline)
        ]
        if self._publish is None:
            await rooms_db.notify_all(conn, signals)
            return []
        return signals

    async def _publish_all(self, signals: list[tuple[str, str]]) -> None:
        if self._publish is not None:
            for channel, payload in signals:
                await self._publish(channel, payload)


async def page(
    pool: asyncpg.Pool, *, caller: rooms.Caller, room: str, after: str | None, limit: int
) -> list[tuple[str, str | None]]:
    """``(user, name)`` of the room's present users after ``after``, by user id; ``NotFound``
    for a room the caller cannot see (a private room's presence is its members')."""
    await rooms.check_present(pool, room=room, caller=caller)
    async with reading(pool) as conn:
        return await db.page(conn, room=room, after=after or "", limit=limit)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        if isinstance(exc, Unavailable):
            log.warning("presence: reading a room's users failed: %s", exc)
        else:
            log.error("presence: reading a room's users failed", exc_info=exc)
