"""Typing indicators (docs/protocol.md, "Typing"): a signal, never stored, worth nothing late.

A socket's ``typing`` frame (clients send one every 2-3 s while the user types; more than one
a second per user and room is dropped here, silently) becomes a ``?t`` signal on the room's
channel, so every replica hears it; the user's next message, or the close of their last socket
of the room on that process, becomes ``?s``. Each process keeps
who is typing in the rooms it hears, each entry expiring ``ttl`` seconds after the user's last
``typing``, and tells its sockets of the room who is typing now, in at most one frame per room
per ``FRAME_INTERVAL`` however many type. A user's own sockets never hear of the user's own
typing (their frame leaves them out, and they get none when only that changed), and a socket
that is behind gets none (``droppable``: the next frame says the whole state anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field

from service.chat.envelope import (
    TYPING_SIGNAL,
    TYPING_STOP,
    channel_for,
    encode_typing,
    typing_frame,
)
from service.chat.presence import Deliver

log = logging.getLogger(__name__)

FRAME_INTERVAL = 0.5
"""Seconds between two ``typing`` frames of a room on a socket."""
BATCH_INTERVAL = 0.25
"""Seconds a process gathers ``typing`` signals before it publishes them, merged per room and
all in one go (``publish_many``: with LISTEN/NOTIFY one transaction, and NOTIFYing commits take
turns with the messages'). Half the frame interval: a frame is late by this much at most."""
MIN_GAP = 1.0
"""A user's ``typing`` frames in a room closer together than this are dropped."""

Signal = Callable[[list[tuple[str, str]]], Awaitable[None]]
"""``signal([(channel, payload), ...])``: published on the bus at once, all together
(``publish_many`` of the bus's backend)."""


@dataclass(eq=False, slots=True)
class _Room:
    typers: dict[str, float] = field(default_factory=dict)
    """User -> when their typing expires (monotonic)."""
    shown: tuple[str, ...] = ()
    """The users the last frame named."""
    next_frame: float = 0.0
    timer: asyncio.TimerHandle | None = None
    expiry: asyncio.TimerHandle | None = None


class Typing:
    def __init__(self, signal: Signal, *, ttl: float) -> None:
        self._signal = signal
        self._ttl = ttl
        self._deliver: Deliver | None = None
        self._rooms: dict[str, _Room] = {}
        self._accepted: dict[tuple[str, str], float] = {}
        """When this process last let a ``typing`` of (room, user) through."""
        self._outgoing: list[tuple[str, str]] = []
        self._sending: asyncio.Task[None] | None = None

    def attach(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
        for state in self._rooms.values():
            for handle in (state.timer, state.expiry):
                if handle is not None:
                    handle.cancel()

    def typing(self, room: str, user: str) -> None:
        """A socket's ``typing`` frame: published unless the user sent one less than
        ``MIN_GAP`` ago (this process's count)."""
        now = time.monotonic()
        key = (room, user)
        if now - self._accepted.get(key, -MIN_GAP) < MIN_GAP:
            return
        if len(self._accepted) > 10_000:  # forget what no longer throttles anything
            self._accepted = {k: t for k, t in self._accepted.items() if now - t < MIN_GAP}
        self._accepted[key] = now
        self._send(channel_for(room), TYPING_SIGNAL + user)

    def stop(self, room: str, user: str) -> None:
        """The user sent a message, or their last socket of the room here closed: their
        typing ends now, if they were typing."""
        state = self._rooms.get(room)
        typed = self._accepted.pop((room, user), None)  # here, maybe not heard back yet
        if typed is not None or (state is not None and user in state.typers):
            self._send(channel_for(room), TYPING_STOP + user)

    def _send(self, channel: str, payload: str) -> None:
        """Publish from one task, every ``BATCH_INTERVAL``."""
        self._outgoing.append((channel, payload))
        if self._sending is None:
            self._sending = asyncio.create_task(self._send_all(), name="typing-signals")

    async def _send_all(self) -> None:
        try:
            await asyncio.sleep(BATCH_INTERVAL)  # what comes meanwhile goes in the same NOTIFY
            while self._outgoing:
                outgoing, self._outgoing = self._outgoing, []
                try:
                    await self._signal(_merged(outgoing))
                except Exception:  # the bus is out: typing is worth nothing late
                    log.info("typing signals not published", exc_info=True)
        finally:
            self._sending = None

    def on_signal(self, room: str, payload: str) -> None:
        """A ``?t`` / ``?s`` signal heard on the room's channel: users, one per line."""
        users = payload[2:].split("\n")
        state = self._rooms.get(room)
        if payload.startswith(TYPING_SIGNAL):
            if state is None:
                state = self._rooms[room] = _Room()
            until = time.monotonic() + self._ttl
            for user in users:
                state.typers[user] = until
            self._expire_later(room, state)
        elif state is None or not [u for u in users if state.typers.pop(u, None) is not None]:
            return
        self._schedule(room, state)

    def on_resync(self, room: str) -> None:
        """Nothing to catch up: a lost ``typing`` comes again within seconds, and entries
        expire by themselves."""

    def _expire_later(self, room: str, state: _Room) -> None:
        if state.expiry is not None:
            state.expiry.cancel()
            state.expiry = None
        if state.typers:
            at = min(state.typers.values())
            delay = max(0.0, at - time.monotonic())
            state.expiry = asyncio.get_running_loop().call_later(delay, self._expire, room, state)

    def _expire(self, room: str, state: _Room) -> None:
        state.expiry = None
        now = time.monotonic()
        for user, at in list(state.typers.items()):
            if at <= now:
                del state.typers[user]
        self._expire_later(room, state)
        self._schedule(room, state)

    def _schedule(self, room: str, state: _Room) -> None:
        if state.timer is not None:
            return
        delay = max(0.0, state.next_frame - time.monotonic())
        state.timer = asyncio.get_running_loop().call_later(delay, self._frame, room, state)

    def _frame(self, room: str, state: _Room) -> None:
        state.timer = None
        typers = tuple(sorted(state.typers))
        shown, state.shown = state.shown, typers
        if not typers and state.expiry is None and self._rooms.get(room) is state:
            del self._rooms[room]  # nothing left to tell or to expire
        if typers == shown:
            return
        state.next_frame = time.monotonic() + FRAME_INTERVAL
        if self._deliver is None:
            return
        self._deliver(room, typing_frame(room, list(typers)), _Personal(room, typers, shown), True)


class _Personal(Mapping[str, str | None]):
    """The frame of each user named before or now: the others typing, or None when only that
    user changed. Made only for the users the fan-out asks for (a socket here), once each:
    a room where a thousand type costs the frames of its local typers, not a thousand."""

    def __init__(self, room: str, typers: tuple[str, ...], shown: tuple[str, ...]) -> None:
        self._room = room
        self._typers = typers
        self._shown = shown
        self._named = set(typers) | set(shown)
        self._made: dict[str, str | None] = {}

    def __contains__(self, user: object) -> bool:
        return user in self._named

    def __getitem__(self, user: str) -> str | None:
        if user not in self._named:
            raise KeyError(user)
        if user not in self._made:
            mine = [u for u in self._typers if u != user]
            changed = mine != [u for u in self._shown if u != user]
            self._made[user] = typing_frame(self._room, mine) if changed else None
        return self._made[user]

    def __iter__(self) -> Iterator[str]:
        return iter(self._named)

    def __len__(self) -> int:
        return len(self._named)


def _merged(outgoing: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One payload per channel and kind for what queued up while a publish was in flight,
    channels in the order each first came, each user once, with the last word: a user who
    typed, sent (a stop) and typed again within the batch is typing (a sender's every message
    asks to stop their typing until the stop is heard back, so the same stop comes many
    times)."""
    last: dict[str, dict[str, str]] = {}  # channel -> user -> kind, in the order they came
    for channel, payload in outgoing:
        users = last.setdefault(channel, {})
        user = payload[2:]
        users.pop(user, None)  # to the end: the order of the last words
        users[user] = payload[:2]
    payloads = []
    for channel, users in last.items():
        for kind in (TYPING_SIGNAL, TYPING_STOP):
            named = [user for user, said in users.items() if said == kind]
            payloads += [(channel, payload) for payload in encode_typing(kind, named)]
    return payloads
