"""The load generator: lean websocket peers and an open-loop, paced sender.

Lean means: a peer never calls ``recv()``. ``FastConnection`` hands each complete text frame
(bytes) to a callback straight from websockets' protocol parser, so no future, task switch or
queue is spent per frame. ``message`` frames are not JSON-decoded at all: the ``seq`` and the
``client_msg_id`` (the generator's message index) are sliced out of the bytes; every other
frame (``ready``, ``ack``, ``error``) is decoded. Every time is ``time.perf_counter()`` of this
one process, so a latency from a send to a delivery has no clock skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
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
        "ready_frame", "replayed", "last_seq", "seen",
    )  # fmt: skip

    def __init__(self, room: str, room_index: int, base: str, token: str) -> None:
        self.room, self.room_index, self.base, self.token = room, room_index, base, token
        self.ws: ClientConnection | None = None
        self.load: Load | None = None
        self.started = self.ready_at = 0.0
        self.ready: asyncio.Future[None] | None = None
        self.ready_frame: dict[str, Any] = {}
        self.replayed = 0
        self.last_seq = 0
        self.seen = bytearray()  # per message index of the load: times received

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
            j = data.find(b'"client_msg_id":', i) + 16
            cmid = data[j + 1 : data.index(b'"', j + 1)] if data[j : j + 1] == b'"' else None
            if self.load is not None and self.ready_at:
                self.load.on_message(self, seq, cmid)
            else:
                self.replayed += 1
                self.last_seq = seq
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
        elif kind == "error" and self.load is not None:
            self.load.errors[f"error_frame:{frame.get('code')}"] += 1

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
    """

    def __init__(self, peers: Sequence[Peer], body_chars: int) -> None:
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
            peer.last_seq = seq
        self.latency[step].append(now - self.send_t[i])
        self.last_delivery[step] = now
        self._settle_one()

    def on_ack(self, peer: Peer, frame: dict[str, Any]) -> None:
        now = perf()
        i = int(frame["client_msg_id"])
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
        sent_at_end = perf()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settled.wait(), drain)
        figures = self._figures(step, first, len(self.send_t), t0, sent_at_end, rate)
        if meter is not None:
            figures["cpu_cores"] = meter.stop()
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
