"""The load generator: lean websocket peers and an open-loop, paced sender.

Lean means: a peer never calls ``recv()``. ``FastConnection`` hands each complete text frame
(bytes) to a callback straight from websockets' protocol parser, so no future, task switch or
queue is spent per frame. ``message`` frames are not JSON-decoded at all: the ``seq``, the
``kind`` and the ``client_msg_id`` (the generator's message index) are sliced out of the bytes;
``presence`` and ``typing`` frames (issue 16) are counted, not decoded (a presence frame of
a crowded room lists a thousand users); every other frame (``ready``, ``ack``, ``error``,
``read``, ``receipt``) is decoded, and unknown types are ignored.

Besides its paced ``send`` frames a load may send ``read`` frames (every connection, with the
highest seq it has received), ``react`` frames (the senders, on a recent message of their
room, alternately setting and taking back their reaction) and ``typing`` frames (some users
of each room, every 2-3 s, as a client does while its user types). Reactions are items of the
room's stream with seqs of their own: every connection must receive every item, texts and
others, in seq order and without a gap; latencies are of text messages only.

Every time is ``time.perf_counter()`` of this one process, so a latency from a send to a
delivery has no clock skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode

perf = time.perf_counter
OPEN_TIMEOUT = 30.0
CLOSE_TIMEOUT = 2.0
HTTP_TIMEOUT = 10.0
MESSAGE_PREFIX = b'{"type":"message"'
PRESENCE_PREFIX = b'{"type":"presence"'
TYPING_PREFIX = b'{"type":"typing"'
KIND_KEY = b'"kind":"'
REACTION_EMOJI = "\N{THUMBS UP SIGN}"
REACTION_PREFIX = "r"
"""``client_msg_id`` of the load's reactions: ``r1``, ``r2``... (its messages': ``0``, ``1``...)."""


def make_token(secret: str, user: str, ttl: int = 7200) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


def percentiles(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/max of ``values`` (seconds), in milliseconds."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:  # nearest rank: the smallest value with q of them at or below
        return round(ordered[max(0, math.ceil(q * n) - 1)] * scale, 3)

    return {"n": n, "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0)}


class FastConnection(ClientConnection):
    """A client connection that passes each complete text frame to ``on_text`` directly."""

    def __init__(self, *args: Any, on_text: Callable[[bytes], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_text = on_text

    def process_event(self, event: Any) -> None:
        if (
            self.response is not None
            and type(event) is Frame
            and event.opcode is Opcode.TEXT
            and event.fin
        ):
            self.on_text(event.data)
            return
        super().process_event(event)  # the handshake, control frames, fragments


async def open_ws(url: str, on_text: Callable[[bytes], None], *, deflate: bool) -> ClientConnection:
    return await connect(
        url,
        create_connection=functools.partial(FastConnection, on_text=on_text),  # type: ignore[arg-type]
        compression="deflate" if deflate else None,
        proxy=None,  # loopback only, whatever the environment says
        open_timeout=OPEN_TIMEOUT,
        close_timeout=CLOSE_TIMEOUT,
        ping_interval=None,  # the server pings; answering is automatic
        max_size=4 * 1024 * 1024,
        user_agent_header=None,
    )


async def close_ws(ws: ClientConnection | None) -> None:
    if ws is None:
        return
    try:
        await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
    except Exception:  # noqa: BLE001 - a broken connection may fail to close in many ways
        ws.transport.abort()


class Peer:
    """One websocket client in one room. ``load`` (if any) hears about its live frames."""

    __slots__ = (
        "room", "room_index", "base", "token", "ws", "load", "started", "ready_at", "ready",
        "ready_frame", "replayed", "replayed_bytes", "last_seq", "seen", "last_text_seq",
        "reactions_seen", "reacted_on", "read_sent", "reads_heard", "receipts_heard",
        "typing_heard", "presence_heard", "presence_bytes", "presence_last", "presence_min_gap",
        "errors_heard",
    )  # fmt: skip

    def __init__(self, room: str, room_index: int, base: str, token: str) -> None:
        self.room, self.room_index, self.base, self.token = room, room_index, base, token
        self.ws: ClientConnection | None = None
        self.load: Load | None = None
        self.started = self.ready_at = 0.0
        self.ready: asyncio.Future[None] | None = None
        self.ready_frame: dict[str, Any] = {}
        self.replayed = 0
        self.replayed_bytes = 0
        self.last_seq = 0  # of the stream (every kind): seq order and gaps are checked on it
        self.seen = bytearray()  # per message index of the load: times received
        self.last_text_seq = 0  # what a reaction of this peer goes on
        self.reactions_seen = 0  # live reaction items received
        self.reacted_on = 0  # the seq this peer's reaction is on (0: none)
        self.read_sent = 0  # the seq of the last read frame sent
        self.reads_heard = 0  # read frames (the same user's cursor moved elsewhere)
        self.receipts_heard = 0  # receipt frames (another member's cursor moved)
        self.typing_heard = 0  # typing frames
        self.presence_heard = 0  # presence frames (after ready)
        self.presence_bytes = 0
        self.presence_last = 0.0  # when the last presence frame came
        self.presence_min_gap = math.inf  # the shortest time between two presence frames
        self.errors_heard: Counter[str] = Counter()  # error frames, by code, without a load

    def url(self, **params: Any) -> str:
        query = {"token": self.token, **{k: v for k, v in params.items() if v is not None}}
        return f"{self.base}/ws/rooms/{self.room}?{urlencode(query)}"

    async def open(self, *, deflate: bool, **params: Any) -> float:
        """Connect and wait for ``ready``; returns connect-to-ready seconds."""
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.started = perf()
        self.ws = await open_ws(self.url(**params), self.on_text, deflate=deflate)
        await asyncio.wait_for(asyncio.shield(self.ready), OPEN_TIMEOUT)
        return self.ready_at - self.started

    def on_text(self, data: bytes) -> None:
        try:
            self._on_text(data)
        except Exception as exc:  # noqa: BLE001 - never break the protocol's data_received
            if self.load is not None:
                self.load.errors[f"bad_frame:{type(exc).__name__}"] += 1

    def _on_text(self, data: bytes) -> None:
        if data.startswith(MESSAGE_PREFIX):
            i = data.find(b'"seq":') + 6
            seq = int(data[i : data.index(b",", i)])
            live = self.load if self.ready_at else None
            k = data.find(KIND_KEY, i, i + 100)  # the trivial server's texts have no kind
            if k >= 0 and data[k + 8 : k + 12] != b"text":
                if live is not None:
                    live.on_item(self, seq, data[k + 8 : k + 16] == b"reaction")
                else:
                    self.replayed += 1
                    self.replayed_bytes += len(data)
                    self.last_seq = seq
                return
            j = data.find(b'"client_msg_id":', i) + 16
            cmid = data[j + 1 : data.index(b'"', j + 1)] if data[j : j + 1] == b'"' else None
            if live is not None:
                live.on_message(self, seq, cmid)
            else:
                self.replayed += 1
                self.replayed_bytes += len(data)
                self.last_seq = seq
            return
        if data.startswith(PRESENCE_PREFIX):
            now = perf()
            if self.presence_last:
                self.presence_min_gap = min(self.presence_min_gap, now - self.presence_last)
            self.presence_last = now
            self.presence_heard += 1
            self.presence_bytes += len(data)
            return
        if data.startswith(TYPING_PREFIX):
            self.typing_heard += 1
            return
        frame = json.loads(data)
        kind = frame.get("type")
        if kind == "ready":
            self.ready_at = perf()
            self.ready_frame = frame
            self.last_seq = frame["last_seq"]
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "ack":
            if self.load is not None:
                self.load.on_ack(self, frame)
        elif kind == "error":
            if self.load is not None:
                self.load.on_error(frame)
            else:
                self.errors_heard[str(frame.get("code"))] += 1
        elif kind == "receipt":
            self.receipts_heard += 1
        elif kind == "read":
            self.reads_heard += 1

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        await close_ws(ws)


async def open_all(
    peers: Sequence[Peer], *, concurrency: int, deflate: bool, **params: Any
) -> tuple[list[float], Counter[str]]:
    """Open every peer, ``concurrency`` handshakes at a time; connect-to-ready times, failures."""
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []
    failures: Counter[str] = Counter()

    async def one(peer: Peer) -> None:
        async with gate:
            try:
                times.append(await peer.open(deflate=deflate, **params))
            except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                failures[type(exc).__name__] += 1
                await peer.close()

    await asyncio.gather(*(one(p) for p in peers))
    return times, failures


async def close_all(peers: Sequence[Peer], concurrency: int = 200) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(peer: Peer) -> None:
        async with gate:
            await peer.close()

    await asyncio.gather(*(one(p) for p in peers), return_exceptions=True)


class Load:
    """Messages sent by a paced open-loop schedule, and everything heard about them.

    Message ``i`` carries ``client_msg_id = str(i)``; every peer of its room must receive it
    exactly once. ``step`` groups messages (0 = warm-up, not reported) so a ramp can be judged
    step by step although deliveries of one step may arrive during the next.

    ``read_rate``: every peer sends a ``read`` frame with the highest seq it has received about
    that many times a second (jittered), when it has received more since its last one.
    ``reaction_rate``: ``react`` frames per second in total, round robin over the senders; a
    sender takes back the reaction it set last before it sets a new one on the newest text it
    has received, so every reaction stores an item (none is an idempotent no-op). Their acks
    and errors are counted apart from the messages'. ``typing_users``: that many users of each
    room (its first connections) send a ``typing`` frame every 2-3 s (jittered), never answered
    by chat-service (an ``unknown_type`` error from a server without typing is counted as
    ``typing_rejected``, not as an error). Items other than the load's messages are
    counted in the step being sent when they arrive (each step waits for its reactions' answers
    and items before the next starts).
    """

    def __init__(
        self,
        peers: Sequence[Peer],
        body_chars: int,
        *,
        read_rate: float = 0.0,
        reaction_rate: float = 0.0,
        typing_users: int = 0,
    ) -> None:
        self.rooms: dict[int, list[Peer]] = {}
        for peer in peers:
            self.rooms.setdefault(peer.room_index, []).append(peer)
            peer.load = self
        self.body = "x" * body_chars
        self.send_t = array("d")  # per message: perf() just before the send
        self.room_of = array("i")
        self.step_of = array("i")
        self.acked = bytearray()
        self.latency: dict[int, list[float]] = {}  # step -> send-to-delivery seconds
        self.ack_latency: dict[int, list[float]] = {}
        self.lag: dict[int, list[float]] = {}  # step -> how late each send was on its schedule
        self.duplicated = Counter[int]()
        self.out_of_order = Counter[int]()
        self.last_delivery: dict[int, float] = {}
        self.errors: Counter[str] = Counter()
        self.remaining = 0  # deliveries and acks still expected
        self.settled = asyncio.Event()
        self.read_rate = read_rate
        self.reaction_rate = reaction_rate
        self.random = random.Random(15)  # noqa: S311 - jitter, not secrets
        self.step = 0  # the step being sent: where items other than the messages are counted
        self.gaps = Counter[int]()  # a peer received seq n + k (k > 1) right after seq n
        self.room_last: dict[int, int] = {}  # per room: the highest seq acked
        self.reaction_seqs: dict[int, set[int]] = {}  # per room: the items reactions stored
        self.reaction_items: dict[int, Counter[int]] = {}  # step -> room -> items stored
        self.reactions_sent = Counter[int]()
        self.reaction_noops = Counter[int]()  # acked with the seq of an item stored before
        self.reaction_errors: dict[int, Counter[str]] = {}  # step -> error code -> count
        self.reactions_unanswered = 0
        self.reaction_count = 0
        self.reads_sent = Counter[int]()
        self.typers = [p for room in self.rooms.values() for p in room[:typing_users]]
        self.typing_sent = Counter[int]()
        self.typing_rejected = Counter[int]()  # unknown_type errors: a server without typing

    # -- receiving ---------------------------------------------------------------------------

    def on_message(self, peer: Peer, seq: int, cmid: bytes | None) -> None:
        now = perf()
        if cmid is None:
            self.errors["message_without_client_msg_id"] += 1
            return
        i = int(cmid)
        step = self.step_of[i]
        seen = peer.seen
        if i >= len(seen):
            seen.extend(bytes(i - len(seen) + 4096))
        if seen[i]:
            self.duplicated[step] += 1
            seen[i] += 1 if seen[i] < 255 else 0
            return
        seen[i] = 1
        if seq <= peer.last_seq:
            self.out_of_order[step] += 1
        else:
            if seq != peer.last_seq + 1:
                self.gaps[step] += 1
            peer.last_seq = seq
        if seq > peer.last_text_seq:
            peer.last_text_seq = seq
        self.latency[step].append(now - self.send_t[i])
        self.last_delivery[step] = now
        self._settle_one()

    def on_item(self, peer: Peer, seq: int, reaction: bool) -> None:
        """A live item that is not a text message (a reaction, or another kind)."""
        if seq <= peer.last_seq:
            self.out_of_order[self.step] += 1
            return
        if seq != peer.last_seq + 1:
            self.gaps[self.step] += 1
        peer.last_seq = seq
        if reaction:
            peer.reactions_seen += 1

    def on_error(self, frame: dict[str, Any]) -> None:
        cmid = frame.get("client_msg_id")
        if cmid is None and self.typers and frame.get("code") == "unknown_type":
            self.typing_rejected[self.step] += 1
            return
        if isinstance(cmid, str) and cmid.startswith(REACTION_PREFIX):
            self.reaction_errors.setdefault(self.step, Counter())[str(frame.get("code"))] += 1
            self.reactions_unanswered -= 1
            return
        self.errors[f"error_frame:{frame.get('code')}"] += 1

    def on_ack(self, peer: Peer, frame: dict[str, Any]) -> None:
        now = perf()
        seq = frame.get("seq")
        room = peer.room_index
        if isinstance(seq, int) and seq > self.room_last.get(room, 0):
            self.room_last[room] = seq
        cmid = str(frame["client_msg_id"])
        if cmid.startswith(REACTION_PREFIX):
            self.reactions_unanswered -= 1
            stored = self.reaction_seqs.setdefault(room, set())
            if seq in stored:
                self.reaction_noops[self.step] += 1
            else:
                stored.add(seq)  # type: ignore[arg-type]
                self.reaction_items.setdefault(self.step, Counter())[room] += 1
            return
        i = int(cmid)
        if self.acked[i]:
            self.errors["duplicate_ack"] += 1
            return
        self.acked[i] = 1
        self.ack_latency[self.step_of[i]].append(now - self.send_t[i])
        self._settle_one()

    def _settle_one(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.settled.set()

    # -- sending -----------------------------------------------------------------------------

    async def run_step(
        self,
        step: int,
        rate: float,
        seconds: float,
        senders: Sequence[Peer],
        drain: float,
        meter: Any = None,
    ) -> dict[str, Any]:
        """Send ``rate`` messages/s for ``seconds`` (round robin over ``senders``), then wait up
        to ``drain`` seconds for every delivery and ack. Returns the step's figures; with a
        ``CpuMeter``, the cores each process group used meanwhile."""
        if meter is not None:
            meter.start()
        for table in (self.latency, self.ack_latency, self.lag):
            table[step] = []
        self.step = step
        peers = [peer for room in self.rooms.values() for peer in room]
        heard_before = [
            (p.reactions_seen, p.reads_heard, p.receipts_heard, p.typing_heard) for p in peers
        ]
        extra = []
        if self.read_rate > 0:
            extra += [asyncio.create_task(self._reads(peer)) for peer in peers]
        if self.reaction_rate > 0:
            extra.append(asyncio.create_task(self._reactions(senders)))
        extra += [asyncio.create_task(self._typing(peer)) for peer in self.typers]
        lag = self.lag[step]
        count = max(1, round(rate * seconds))
        period = 1.0 / rate
        first = len(self.send_t)
        body = self.body
        sleep = asyncio.sleep
        t0 = perf() + 0.01
        for k in range(count):
            due = t0 + k * period
            delay = due - perf()
            if delay > 0.0005:
                await sleep(delay)
            elif k % 32 == 0:
                await sleep(0)  # behind schedule: still let the receivers run
            sender = senders[k % len(senders)]
            ws = sender.ws
            if ws is None:
                self.errors["sender_gone"] += 1
                continue
            i = len(self.send_t)
            self.room_of.append(sender.room_index)
            self.step_of.append(step)
            self.acked.append(0)
            self.remaining += len(self.rooms[sender.room_index]) + 1
            self.settled.clear()
            now = perf()
            lag.append(now - due)
            self.send_t.append(now)
            try:
                await ws.send(f'{{"type":"send","body":"{body}","client_msg_id":"{i}"}}')
            except Exception as exc:  # noqa: BLE001 - counted: a send that failed is lost
                self.errors[f"send_failed:{type(exc).__name__}"] += 1
        for task in extra:
            task.cancel()
        await asyncio.gather(*extra, return_exceptions=True)
        sent_at_end = perf()
        deadline = sent_at_end + drain
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), drain)
        # Reactions: answered, and every peer has every item up to its room's last acked seq.
        # Polled (bounded by the drain): an event would cost a check on every frame received.
        while (self.reactions_unanswered > 0 or self._behind(peers)) and perf() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        figures = self._figures(step, first, len(self.send_t), t0, sent_at_end, rate)
        figures.update(self._stream_figures(step, peers, heard_before))
        if meter is not None:
            figures["cpu_cores"] = meter.stop()
        return figures

    def _behind(self, peers: Sequence[Peer]) -> int:
        """Peers that have not received their room's newest acked item."""
        last = self.room_last
        return sum(1 for p in peers if p.last_seq < last.get(p.room_index, 0))

    async def _reads(self, peer: Peer) -> None:
        """``read`` frames with the highest seq received, ``read_rate`` a second, jittered."""
        period = 1.0 / self.read_rate
        uniform = self.random.uniform
        await asyncio.sleep(uniform(0, period))
        while True:
            seq, ws = peer.last_seq, peer.ws
            if ws is not None and seq > peer.read_sent:
                peer.read_sent = seq
                self.reads_sent[self.step] += 1
                try:
                    await ws.send(f'{{"type":"read","seq":{seq}}}')
                except Exception as exc:  # noqa: BLE001 - counted; the peer's loss shows too
                    self.errors[f"read_failed:{type(exc).__name__}"] += 1
                    return
            await asyncio.sleep(period * uniform(0.5, 1.5))

    async def _typing(self, peer: Peer) -> None:
        """A ``typing`` frame every 2-3 s (uniform), the first within 2.5 s of the start."""
        uniform = self.random.uniform
        await asyncio.sleep(uniform(0, 2.5))
        while True:
            ws = peer.ws
            if ws is not None:
                self.typing_sent[self.step] += 1
                try:
                    await ws.send('{"type":"typing"}')
                except Exception as exc:  # noqa: BLE001 - counted; the peer's loss shows too
                    self.errors[f"typing_failed:{type(exc).__name__}"] += 1
                    return
            await asyncio.sleep(uniform(2.0, 3.0))

    async def _reactions(self, senders: Sequence[Peer]) -> None:
        """``reaction_rate`` react frames a second in total (open loop), round robin."""
        period = 1.0 / self.reaction_rate
        t0 = perf()
        k = 0
        while True:
            delay = t0 + k * period - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            sender = senders[k % len(senders)]
            k += 1
            ws = sender.ws
            if ws is None:
                continue
            if sender.reacted_on:
                target, on = sender.reacted_on, "false"
                sender.reacted_on = 0
            elif sender.last_text_seq:
                target, on = sender.last_text_seq, "true"
                sender.reacted_on = target
            else:
                continue  # nothing received yet to react to
            self.reaction_count += 1
            self.reactions_sent[self.step] += 1
            self.reactions_unanswered += 1
            frame = (
                f'{{"type":"react","target_seq":{target},"emoji":"{REACTION_EMOJI}",'
                f'"on":{on},"client_msg_id":"{REACTION_PREFIX}{self.reaction_count}"}}'
            )
            try:
                await ws.send(frame)
            except Exception as exc:  # noqa: BLE001 - counted: never answered
                self.reactions_unanswered -= 1
                self.errors[f"react_failed:{type(exc).__name__}"] += 1

    def _stream_figures(
        self, step: int, peers: Sequence[Peer], heard_before: list[tuple[int, int, int, int]]
    ) -> dict[str, Any]:
        """Stream order over every kind of item, and what reads and reactions did."""
        stored = self.reaction_items.get(step, Counter())
        got = [p.reactions_seen - before[0] for p, before in zip(peers, heard_before, strict=True)]
        missing = sum(max(0, stored[p.room_index] - n) for p, n in zip(peers, got, strict=True))
        figures: dict[str, Any] = {
            "gaps": self.gaps[step],
            "stream_behind": self._behind(peers),
        }
        if self.typers:
            figures.update(
                {
                    "typing_users": len(self.typers),
                    "typing_sent": self.typing_sent[step],
                    "typing_rejected": self.typing_rejected[step],
                    "typing_frames_received": sum(
                        p.typing_heard - b[3] for p, b in zip(peers, heard_before, strict=True)
                    ),
                }
            )
        if self.read_rate > 0 or self.reaction_rate > 0:
            figures.update(
                {
                    "reads_sent": self.reads_sent[step],
                    "read_frames_received": sum(
                        p.reads_heard - b[1] for p, b in zip(peers, heard_before, strict=True)
                    ),
                    "receipts_received": sum(
                        p.receipts_heard - b[2] for p, b in zip(peers, heard_before, strict=True)
                    ),
                    "reactions_sent": self.reactions_sent[step],
                    "reaction_items": sum(stored.values()),
                    "reaction_noops": self.reaction_noops[step],
                    "reaction_errors": dict(self.reaction_errors.get(step, {})),
                    "reactions_unanswered": self.reactions_unanswered,
                    "reaction_items_per_receiver": {
                        "min": min(got, default=0),
                        "max": max(got, default=0),
                        "missing": missing,
                    },
                }
            )
        return figures

    def _figures(
        self, step: int, first: int, end: int, t0: float, sent_at_end: float, rate: float
    ) -> dict[str, Any]:
        sent = end - first
        expected = 0
        received = 0
        for i in range(first, end):
            peers = self.rooms[self.room_of[i]]
            expected += len(peers)
            for peer in peers:
                seen = peer.seen
                if i < len(seen) and seen[i]:
                    received += 1
        acked = sum(self.acked[first:end])
        window = max(self.last_delivery.get(step, sent_at_end), sent_at_end) - t0
        return {
            "rate_target": rate,
            "sent": sent,
            "send_rate": round(sent / max(sent_at_end - t0, 1e-9), 1),
            "acked": acked,
            "expected_deliveries": expected,
            "delivered": received,
            "lost": expected - received,
            "duplicated": self.duplicated[step],
            "out_of_order": self.out_of_order[step],
            "deliveries_per_s": round(received / max(window, 1e-9), 1),
            "latency_ms": percentiles(self.latency[step]),
            "ack_latency_ms": percentiles(self.ack_latency[step]),
            "send_lag_ms": percentiles(self.lag[step]),
        }


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, ``Content-Length`` bodies only.

    httpx spends more of the generator's CPU on a request than a small page costs the server
    (its p50 against the trivial server was ~2.7 ms here), so it hid the server being measured.
    """

    def __init__(self, host: str, headers: dict[str, str]) -> None:
        self.head = "".join(f"\r\n{k}: {v}" for k, v in {"host": host, **headers}.items())
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    @classmethod
    async def open(cls, url: str, headers: dict[str, str] | None = None) -> HttpClient:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, not {url!r}")
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(
            lambda: cls(parts.netloc, headers or {}), parts.hostname, parts.port
        )
        return client

    @property
    def closed(self) -> bool:
        return self.transport is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        if b"transfer-encoding:" in head:
            self._fail(ValueError("chunked responses are not supported"))
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), body))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        """``(status, body)``. A timeout or a broken connection closes the connection."""
        if self.transport is None:
            raise ConnectionResetError("the connection is closed")
        if self.waiter is not None:
            raise RuntimeError("one request at a time")
        self.waiter = asyncio.get_running_loop().create_future()
        length = f"\r\ncontent-length: {len(body)}" if body or method != "GET" else ""
        request = f"{method} {target} HTTP/1.1{self.head}{length}\r\n\r\n"
        self.transport.write(request.encode() + body)
        try:
            async with asyncio.timeout(HTTP_TIMEOUT):
                return await self.waiter
        except TimeoutError:
            self._fail(TimeoutError())
            raise

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
