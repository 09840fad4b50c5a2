"""Soak test: websocket clients on two server processes, random faults, then an audit.

What it proves. ``--clients`` clients join ``--rooms`` rooms, spread over two
``python -m service serve`` processes that share one PostgreSQL. ``--senders`` of them send at a
paced total of ``--rate`` messages/s for ``--duration`` seconds, each message with a unique
``client_msg_id``, while one fault every ``--fault-interval`` seconds hits the service:

* ``kill``: SIGKILL a server, restart it on the same port about a second later;
* ``term``: SIGTERM a server (it closes its websockets with 1012), restart it;
* ``listen``: terminate the servers' LISTEN connections (``application_name = 'chat-listen'``):
  the service must reconnect and catch its clients up from the database;
* ``slow``: an extra client (not audited) stops reading for a few seconds; it may get 1013.

Each client is a ``service.client.ChatClient`` (the protocol's reference client, so the soak
tests it too): it reconnects with backoff (50 ms doubling to 1 s, jittered) to a random live
server with ``since=<last seq seen>`` and resends every unacknowledged message with its
original ``client_msg_id`` until it is acknowledged. What it heals underneath (a repeated seq
it drops, a gap it resumes over) is still counted against the server. After the run and a
drain (until every message is acknowledged and every client has caught up, at most
``--drain`` seconds) the audit checks:

* each client saw every seq of its room exactly once, in order, without gaps, from its first
  ``ready`` up to the room's final ``last_seq``, across all its reconnects; a resume answered
  with ``recovered: false`` (a "reset") is a violation unless more than 1000 were missed;
* every acknowledged message is in the database with the same seq, id, author and body, and
  every delivered message matches the database;
* the run drained: no valid send was refused for good, no message is left unacknowledged.

The exit code is 0 when nothing was violated, 1 otherwise (2: the harness itself failed).
Without ``--database-url`` an embedded PostgreSQL runs in a temporary folder. Other ``CHAT_*``
variables of the environment reach the servers (``CHAT_OUTBOX_LIMIT=32`` makes slow-consumer
closes common); when one sender's share of ``--rate`` is above the servers' default per
connection limit, ``CHAT_SEND_RATE`` is raised (flood control is not what is under test).
Server logs are kept, and their folder printed, when the run fails::

    python -m benchmarks.soak --ci --json soak.json
    python -m benchmarks.soak --clients 100 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from benchmarks.bench_client import close_ws, make_token, percentiles
from benchmarks.bench_infra import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Harness,
    HarnessError,
    Server,
    free_port,
)
from service.chat.history import MAX_RESUME_GAP
from service.client import (
    ChatClient,
    ChatClientError,
    Connection,
    Disconnected,
    Event,
    Item,
    Ready,
    Reset,
    Room,
    SendError,
    TextMessage,
    room_url,
)
from service.client.connection import close_code
from service.config import Settings, to_asyncpg_dsn

CI_SIZE = {
    "clients": 20,
    "rooms": 4,
    "senders": 6,
    "rate": 50.0,
    "duration": 20.0,
    "fault_interval": 4.0,
}
FAULT_KINDS = ("kill", "term", "listen", "slow")
COUNTED = (
    "sent send_frames resends acked delivered duplicates out_of_order gaps gap_seqs lost resets "
    "unjustified_resets reset_skipped db_missing db_seq_holes content_mismatch "
    "rejected_sends unacked_at_end unacked_committed"
).split()
VIOLATIONS = (
    "lost duplicates out_of_order gap_seqs unjustified_resets db_missing db_seq_holes "
    "content_mismatch rejected_sends wrong_room unexpected_frames client_errors "
    "never_ready drain_incomplete"
).split()
SHOWN_ENV = {"CHAT_SEND_RATE", "CHAT_USER_SEND_RATE", "CHAT_OUTBOX_LIMIT", "CHAT_HISTORY_LIMIT"}
OPEN_TIMEOUT = 5.0
IO_TIMEOUT = 5.0  # one write; a keepalive pong (pings every half of it)
DB_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0

Content = tuple[int, str, str, str | None]
"""What identifies a stored message: ``(id, author, body, client_msg_id)``."""


class Stats:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.send_errors: Counter[str] = Counter()
        self.reconnects: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.fault_log: list[dict[str, Any]] = []
        self.own_latency: list[float] = []
        self.ack_latency: list[float] = []
        self.samples: defaultdict[str, list[Any]] = defaultdict(list)

    def bad(self, kind: str, example: Any, n: int = 1) -> None:
        """Count a violation and keep a few examples of it."""
        self.counts[kind] += n
        if len(self.samples[kind]) < 10:
            self.samples[kind].append(example)


class Replica(Server):
    """One ``python -m service serve`` of the soak: ``up`` from a healthy start to a stop."""

    up = False

    async def start(self) -> None:
        for attempt in range(3):
            if attempt == 2:
                self.port = free_port()  # the old port may have been taken meanwhile
            with contextlib.suppress(HarnessError):
                await super().start()
                self.up = True
                return
            await self.stop(signal.SIGKILL)
        raise HarnessError(f"server {self.name} does not start; see {self.log_path}")

    async def stop(self, sig: int = signal.SIGTERM, within: float = STOP_TIMEOUT) -> int | None:
        self.up = False
        return await super().stop(sig, within)


@dataclass
class Pending:
    cmid: str
    body: str
    first_sent: float


class SoakClient:
    """One user in one room, for the whole run: a ``service.client.ChatClient``, which does the
    reconnecting, resuming and resending; this class only records what its caller sees."""

    def __init__(self, soak: Soak, index: int, room: str, sender: bool) -> None:
        self.soak, self.room, self.sender = soak, room, sender
        self.user = f"soak-{soak.run_id}-u{index}"
        self.token = soak.token(self.user)
        self.start_seq: int | None = None  # the first seq this client must see
        self.last_seq = 0
        self.seen: Counter[int] = Counter()
        self.skipped: list[tuple[int, int]] = []  # seq ranges a reset skipped
        self.outstanding: dict[str, Pending] = {}
        self.acked: dict[str, tuple[int, int, str]] = {}  # cmid -> (seq, id, body)
        self.sent_at: dict[str, float] = {}
        self.own_seen: set[str] = set()
        self.stopping = False
        self.count = 0
        self.joined = asyncio.Event()
        self.rooms: list[Room] = []  # every join's Room: their stats are the client's
        self.chat = ChatClient(
            self._url,
            token=self.token,
            open_timeout=OPEN_TIMEOUT,
            ping_interval=IO_TIMEOUT / 2,
            ping_timeout=IO_TIMEOUT,
            send_timeout=soak.args.duration + soak.args.drain + 60,
            backoff_min=BACKOFF_MIN,
            backoff_max=BACKOFF_MAX,
            give_up_after=None,
            compression=None,
            rng=random.Random(soak.rng.random()),
        )

    def _url(self) -> str | None:
        server = self.soak.pick_server()
        return server.http if server is not None else None

    @property
    def server(self) -> Replica | None:
        url = self.rooms[-1].connected_url if self.rooms else None
        return next((s for s in self.soak.servers if s.http == url), None)

    @property
    def ready(self) -> bool:
        return bool(self.rooms) and self.rooms[-1].connected

    async def run(self) -> None:
        stats, delay = self.soak.stats, BACKOFF_MIN
        while not self.stopping:  # the first join; the Room reconnects on its own after it
            try:
                room = await self.chat.join(self.room, timeout=OPEN_TIMEOUT * 2)
                break
            except ChatClientError as exc:
                stats.connect_failures[type(exc).__name__] += 1
            await asyncio.sleep(delay * self.soak.rng.uniform(0.5, 1.5))
            delay = min(delay * 2, BACKOFF_MAX)
        else:
            return
        self.rooms.append(room)
        self.joined.set()
        try:
            async for event in room:
                self._on_event(event)
        except ChatClientError as exc:  # a room ended for good: not expected in a soak
            if not self.stopping:
                self.soak.stats.bad("client_errors", {"user": self.user, "error": repr(exc)})

    async def stop(self) -> None:
        self.stopping = True
        await self.chat.close()

    async def generate(self, until: float) -> None:
        """New messages at this sender's share of ``--rate``, connected or not."""
        rng, loop = self.soak.rng, asyncio.get_running_loop()
        period = self.soak.args.senders / self.soak.args.rate
        due = loop.time() + rng.uniform(0, period)
        sends: list[asyncio.Task[None]] = []
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if loop.time() >= until:
                break
            self.count += 1
            cmid = f"{self.user}-m{self.count}"
            if rng.random() < self.soak.args.big_fraction:  # > 8000 bytes: NOTIFY by reference
                body = f"{cmid} " + "é" * (3990 - len(cmid))
            else:
                body = f"{cmid} " + "".join(rng.choices("abcdefgh ü€😀", k=rng.randint(5, 200)))
            self.outstanding[cmid] = Pending(cmid, body, loop.time())
            self.sent_at[cmid] = loop.time()
            self.soak.stats.counts["sent"] += 1
            sends.append(asyncio.create_task(self._send(cmid, body)))
            due += period * rng.uniform(0.5, 1.5)
        self.soak.send_tasks.extend(sends)

    async def _send(self, cmid: str, body: str) -> None:
        """One message until it is acked (the client resends it across drops) or refused."""
        stats, loop = self.soak.stats, asyncio.get_running_loop()
        if not self.joined.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.joined.wait(), START_TIMEOUT)
        if not self.rooms:
            return  # never joined: audited as never ready, the message as unacked
        try:
            stored = await self.rooms[-1].send(body, client_msg_id=cmid)
        except SendError as exc:
            del self.outstanding[cmid]
            stats.bad("rejected_sends", {"user": self.user, "cmid": cmid, "code": exc.code})
            return
        except ChatClientError:
            return  # stopped, or timed out: left outstanding for the audit
        pending = self.outstanding.pop(cmid)
        self.acked[cmid] = (stored.seq, stored.id, body)
        stats.counts["acked"] += 1
        stats.ack_latency.append(loop.time() - pending.first_sent)

    def _on_event(self, event: Event) -> None:
        stats = self.soak.stats
        if isinstance(event, TextMessage):
            self._on_message(event)
        elif isinstance(event, Item):  # no other kind is sent in a soak
            stats.bad("unexpected_frames", {"user": self.user, "frame": event.raw})
        elif isinstance(event, Ready):
            self._on_ready(event)
        elif isinstance(event, Reset):
            self._on_reset(event)
        elif isinstance(event, Disconnected):
            if not self.stopping:
                stats.reconnects[str(event.code)] += 1
        else:  # presence and typing: signals of others (issue 16), not items
            stats.counts[f"{type(event).__name__.lower()}_frames"] += 1

    def _on_ready(self, ready: Ready) -> None:
        if self.start_seq is None:
            self.start_seq, self.last_seq = ready.last_seq + 1, ready.last_seq
            self.soak.started += 1
            if self.soak.started == len(self.soak.clients):
                self.soak.all_started.set()

    def _on_reset(self, reset: Reset) -> None:
        stats = self.soak.stats
        stats.counts["resets"] += 1
        missed = reset.last_seq - self.last_seq
        if 0 <= missed <= MAX_RESUME_GAP:
            stats.bad("unjustified_resets", {"user": self.user, "since": self.last_seq})
        if missed > 0:
            self.skipped.append((self.last_seq + 1, reset.last_seq))
        self.last_seq = max(self.last_seq, reset.last_seq)

    def _on_message(self, msg: TextMessage) -> None:
        stats, seq = self.soak.stats, msg.seq
        if self.start_seq is None:
            stats.bad("unexpected_frames", {"user": self.user, "frame": msg.raw})
            return
        if msg.room != self.room:
            stats.bad("wrong_room", {"user": self.user, "room": self.room, "frame": msg.raw})
            return
        stats.counts["delivered"] += 1
        self.seen[seq] += 1
        where = {"user": self.user, "room": self.room, "seq": seq, "last_seq": self.last_seq}
        if self.seen[seq] > 1:
            stats.bad("duplicates", where)
        elif seq < self.last_seq:
            stats.bad("out_of_order", where)
        elif seq > self.last_seq + 1:
            stats.counts["gaps"] += 1
            stats.bad("gap_seqs", where, seq - self.last_seq - 1)
        self.last_seq = max(self.last_seq, seq)
        content = (msg.id, msg.author, msg.body, msg.client_msg_id)
        if self.soak.content[self.room].setdefault(seq, content) != content:
            stats.bad("content_mismatch", {**where, "frame": msg.raw})
        cmid = msg.client_msg_id
        if msg.author == self.user and cmid in self.sent_at and cmid not in self.own_seen:
            self.own_seen.add(cmid)
            stats.own_latency.append(asyncio.get_running_loop().time() - self.sent_at[cmid])

    def underneath(self) -> Counter[str]:
        """What the client saw and healed below its events, over every join."""
        total: Counter[str] = Counter()
        for room in self.rooms:
            total.update(room.stats)
        return total


class Soak:
    def __init__(self, args: argparse.Namespace, harness: Harness) -> None:
        database_url = harness.database_url
        self.args, self.dsn, self.log_dir = args, to_asyncpg_dsn(database_url), harness.log_dir
        self.rng = random.Random(args.seed)
        self.run_id = secrets.token_hex(3)
        self.secret = secrets.token_urlsafe(48)
        self.stats = Stats()
        self.rooms = [f"soak-{self.run_id}-r{i}" for i in range(args.rooms)]
        self.content: defaultdict[str, dict[int, Content]] = defaultdict(dict)
        self.started = 0
        self.slow_tasks: list[asyncio.Task[None]] = []
        self.send_tasks: list[asyncio.Task[None]] = []
        self.all_started = asyncio.Event()
        env: dict[str, str] = {}
        # The servers' flood control is not under test: open-loop senders above the per
        # connection limit would only build an endless backlog (CHAT_SEND_RATE wins if set).
        per_sender = args.rate / max(args.senders, 1)
        if per_sender > Settings.model_fields["send_rate"].default:
            env["CHAT_SEND_RATE"] = env["CHAT_USER_SEND_RATE"] = f"{per_sender * 2:g}"
        shown = {k: v for k, v in {**env, **os.environ}.items() if k.startswith("CHAT_")}
        self.env_note = " ".join(f"{k}={v}" for k, v in sorted(shown.items()) if k in SHOWN_ENV)
        env = {
            **env,
            **os.environ,
            "CHAT_DATABASE_URL": database_url,
            "CHAT_JWT_SECRET": self.secret,
            "CHAT_DEV_AUTH": "false",
            "PYTHONUNBUFFERED": "1",
        }
        command = [sys.executable, "-m", "service", "serve"]
        self.servers = [
            Replica(n, command, env, harness.log_path(f"server-{n}")) for n in ("a", "b")
        ]
        harness.processes.extend(self.servers)
        self.clients = [
            SoakClient(self, i, self.rooms[i % args.rooms], i < args.senders)
            for i in range(args.clients)
        ]

    def token(self, user: str) -> str:
        return make_token(self.secret, user, int(self.args.duration + self.args.drain) + 3600)

    def pick_server(self) -> Replica | None:
        live = [s for s in self.servers if s.up]
        return self.rng.choice(live) if live else None

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        args, loop = self.args, asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            await asyncio.gather(*(s.start() for s in self.servers))
            tasks = [asyncio.create_task(c.run()) for c in self.clients]
            with contextlib.suppress(TimeoutError):  # the latecomers are audited as never ready
                await asyncio.wait_for(self.all_started.wait(), START_TIMEOUT)
            self.t0 = loop.time()
            until = self.t0 + args.duration
            senders = [c for c in self.clients if c.sender]
            generators = [asyncio.create_task(c.generate(until)) for c in senders]
            faults = asyncio.create_task(self._faults(until))
            await asyncio.wait([faults], timeout=args.duration)
            if faults.done():
                faults.result()  # the harness failed (a server that cannot start again)
            await asyncio.gather(*generators)
            await asyncio.wait_for(faults, STOP_TIMEOUT + 3 * START_TIMEOUT)
            for server in self.servers:
                if not server.up:
                    await server.start()
            final, drained = await self._drain(loop.time() + args.drain)
            await asyncio.wait_for(asyncio.gather(*(c.stop() for c in self.clients)), 10)
            await asyncio.wait(tasks, timeout=10)
            report = await self._audit(final, drained)
            report["elapsed_s"] = round(loop.time() - self.t0, 1)
            return report
        finally:
            for task in tasks + self.send_tasks:
                task.cancel()
            await asyncio.gather(*tasks, *self.send_tasks, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in self.servers))

    async def _db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=DB_TIMEOUT)

    async def _last_seqs(self, conn: asyncpg.Connection) -> dict[str, int]:
        rows = await conn.fetch(
            "SELECT name, last_seq FROM room WHERE name = ANY($1::text[])",
            self.rooms,
            timeout=DB_TIMEOUT,
        )
        return {room: 0 for room in self.rooms} | {r["name"]: r["last_seq"] for r in rows}

    async def _drain(self, deadline: float) -> tuple[dict[str, int], bool]:
        """Wait until every send is acked and every client has its room's last seq."""
        loop = asyncio.get_running_loop()
        conn = await self._db()
        try:
            while True:
                final = await self._last_seqs(conn)
                unacked = sum(len(c.outstanding) for c in self.clients)
                behind = [c for c in self.clients if not c.ready or c.last_seq < final[c.room]]
                if (not unacked and not behind) or loop.time() > deadline:
                    return final, not unacked and not behind
                await asyncio.sleep(0.2)
        finally:
            await conn.close(timeout=DB_TIMEOUT)

    # -- faults --------------------------------------------------------------------------------

    async def _faults(self, until: float) -> None:
        """One fault every interval; each kind once in every shuffled round of the kinds."""
        loop, args, kinds = asyncio.get_running_loop(), self.args, []
        due = self.t0 + args.fault_interval / 2
        while args.faults and due < until:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not kinds:
                kinds = list(args.faults)
                self.rng.shuffle(kinds)
            kind, started = kinds.pop(), loop.time()
            detail = await getattr(self, f"_fault_{kind}")()
            self.stats.faults[kind] += 1
            self.stats.fault_log.append(
                {
                    "at_s": round(started - self.t0, 2),
                    "kind": kind,
                    "took_s": round(loop.time() - started, 2),
                    **detail,
                }
            )
            due = max(due + args.fault_interval, loop.time())
        await asyncio.gather(*self.slow_tasks)

    def _target(self) -> Replica:
        """A random live server, weighted by its clients: a fault should hit someone."""
        live = [s for s in self.servers if s.up] or self.servers
        weights = [1 + sum(c.server is s and c.ready for c in self.clients) for s in live]
        return self.rng.choices(live, weights)[0]

    async def _fault_kill(self) -> dict[str, Any]:
        server = self._target()
        await server.stop(signal.SIGKILL)
        await asyncio.sleep(1.0)
        await server.start()
        return {"server": server.name}

    async def _fault_term(self) -> dict[str, Any]:
        server, started = self._target(), time.monotonic()
        code = await server.stop(signal.SIGTERM)
        stopped = round(time.monotonic() - started, 2)
        await asyncio.sleep(0.2)
        await server.start()
        return {"server": server.name, "exit_code": code, "shutdown_s": stopped}

    async def _fault_listen(self) -> dict[str, Any]:
        conn = await self._db()
        try:
            listeners = (
                "FROM pg_stat_activity WHERE application_name = 'chat-listen' "
                "AND datname = current_database()"
            )
            rows = await conn.fetch(
                f"SELECT pid, pg_terminate_backend(pid) AS ok {listeners}",  # noqa: S608
                timeout=DB_TIMEOUT,
            )
            old = {r["pid"] for r in rows}
            started, restored = time.monotonic(), None
            while time.monotonic() - started < 10:  # how long until every server LISTENs again
                await asyncio.sleep(0.05)
                pids = await conn.fetch(f"SELECT pid {listeners}", timeout=DB_TIMEOUT)  # noqa: S608
                if len({r["pid"] for r in pids} - old) >= sum(s.up for s in self.servers):
                    restored = round(time.monotonic() - started, 2)
                    break
        finally:
            await conn.close(timeout=DB_TIMEOUT)
        return {"terminated": sum(1 for r in rows if r["ok"]), "relisten_s": restored}

    async def _fault_slow(self) -> dict[str, Any]:
        """Start a slow consumer; the next faults do not wait for it."""
        server, room = self._target(), self.rng.choice(self.rooms)
        self.slow_tasks.append(asyncio.create_task(self._slow_consumer(server, room)))
        return {"server": server.name, "room": room}

    async def _slow_consumer(self, server: Replica, room: str) -> None:
        """A client with a tiny receive buffer that joins with a full replay, then stops reading
        for ``--slow-seconds``; it is not audited, only its close code is counted."""
        token, loop = self.token(f"soak-{self.run_id}-slow"), asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        url = room_url(server.ws, room, token=token, since=0)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), 5)
            conn = await Connection.open(
                url, timeout=OPEN_TIMEOUT, sock=sock, compression=None, close_timeout=2
            )
            ws = conn.ws
        except (OSError, TimeoutError, InvalidHandshake):
            sock.close()
            self.stats.counts["slow_closed_unconnected"] += 1
            return
        ws.transport.pause_reading()
        await asyncio.sleep(self.args.slow_seconds)
        ws.transport.resume_reading()
        code, deadline = None, loop.time() + 1
        try:
            while loop.time() < deadline:  # what it was sent meanwhile, or its close
                await asyncio.wait_for(ws.recv(), max(0.001, deadline - loop.time()))
        except ConnectionClosed as exc:
            code = close_code(exc)[0]
        except TimeoutError:
            pass
        await close_ws(ws)
        self.stats.counts[f"slow_closed_{code or 'no'}"] += 1

    # -- the audit -----------------------------------------------------------------------------

    async def _audit(self, final: dict[str, int], drained: bool) -> dict[str, Any]:
        stats, counts = self.stats, self.stats.counts
        conn = await self._db()
        try:
            rows = await conn.fetch(
                "SELECT r.name AS room, m.seq, m.id, m.author, m.body, m.client_msg_id "
                "FROM message m JOIN room r ON r.id = m.room_id WHERE r.name = ANY($1::text[])",
                self.rooms,
                timeout=DB_TIMEOUT * 3,
            )
            db_last = await self._last_seqs(conn)
        finally:
            await conn.close(timeout=DB_TIMEOUT)
        db: defaultdict[str, dict[int, Content]] = defaultdict(dict)
        for r in rows:
            db[r["room"]][r["seq"]] = (r["id"], r["author"], r["body"], r["client_msg_id"])
        for room in self.rooms:
            holes = set(range(1, db_last[room] + 1)) ^ set(db[room])
            if holes:
                stats.bad("db_seq_holes", {"room": room, "seqs": sorted(holes)[:20]}, len(holes))
            for seq, content in self.content[room].items():
                if db[room].get(seq) != content:
                    stats.bad(
                        "content_mismatch", {"room": room, "seq": seq, "db": db[room].get(seq)}
                    )
        by_cmid = {(c[1], c[3]) for room in db.values() for c in room.values()}
        for c in self.clients:
            self._underneath(c)
            for cmid, (seq, mid, body) in c.acked.items():
                if db[c.room].get(seq) != (mid, c.user, body, cmid):
                    stats.bad("db_missing", {"room": c.room, "seq": seq, "id": mid, "cmid": cmid})
            counts["unacked_committed"] += sum((c.user, m) in by_cmid for m in c.outstanding)
            counts["unacked_at_end"] += len(c.outstanding)
            if c.start_seq is None:
                stats.bad("never_ready", {"user": c.user, "room": c.room})
                continue
            skipped = {s for lo, hi in c.skipped for s in range(lo, hi + 1)}
            counts["reset_skipped"] += len(skipped)
            missing = [
                s
                for s in range(c.start_seq, final[c.room] + 1)
                if not c.seen[s] and s not in skipped
            ]
            if missing:
                stats.bad(
                    "lost", {"user": c.user, "room": c.room, "seqs": missing[:20]}, len(missing)
                )
        if not drained:
            stats.bad("drain_incomplete", {"unacked": counts["unacked_at_end"]})
        return self._report(final, db_last)

    def _underneath(self, c: SoakClient) -> None:
        """What the client healed before its caller saw it is still the server's fault: a
        repeated seq (dropped by the client) is a duplicate, a gap (resumed over) a gap."""
        stats, under = self.stats, c.underneath()
        stats.counts["send_frames"] += under["send_frames"]
        stats.counts["resends"] += under["resends"]
        for key, n in under.items():
            kind, _, what = key.partition(":")
            if kind == "error":
                stats.send_errors[what] += n
            elif kind == "connect":
                stats.connect_failures[what] += n
        where = {"user": c.user, "room": c.room}
        if under["duplicates"]:
            stats.bad("duplicates", where, under["duplicates"])
        if under["gaps"]:
            stats.counts["gaps"] += under["gaps"]
            stats.bad("gap_seqs", where, under["gaps"])

    def _report(self, final: dict[str, int], db_last: dict[str, int]) -> dict[str, Any]:
        stats, counts, args = self.stats, self.stats.counts, self.args
        latency = (("own_message", stats.own_latency), ("ack", stats.ack_latency))
        return {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "ci")},
            "server_env": self.env_note,
            "clients": len(self.clients),
            "rooms": len(self.rooms),
            "senders": sum(c.sender for c in self.clients),
            **{k: counts[k] for k in COUNTED},
            "send_errors": dict(stats.send_errors),
            "reconnects": dict(stats.reconnects),
            "connect_failures": dict(stats.connect_failures),
            "faults": {kind: stats.faults[kind] for kind in args.faults},
            "slow_consumer_closes": {
                k.removeprefix("slow_closed_"): v for k, v in counts.items() if "slow_closed" in k
            },
            "latency_ms": {
                name: {"count": len(values)}
                | {q: v for q, v in percentiles(values).items() if q in ("p50", "p99", "max")}
                for name, values in latency
            },
            "room_last_seq": final,
            "room_last_seq_db": db_last,
            "fault_log": stats.fault_log,
            "violations": {k: counts[k] for k in VIOLATIONS if counts[k]},
            "samples": {k: v for k, v in stats.samples.items() if k in VIOLATIONS},
            "log_dir": str(self.log_dir),
        }


TABLE = [
    ("clients / rooms / senders", "{clients} / {rooms} / {senders}"),
    ("elapsed (s)", "{elapsed_s}"),
    ("sent (distinct)", "{sent}"),
    ("send frames / resends", "{send_frames} / {resends}"),
    ("acked", "{acked}"),
    ("send errors by code", "{send_errors}"),
    ("delivered", "{delivered}"),
    ("duplicates", "{duplicates}"),
    ("out of order", "{out_of_order}"),
    ("gaps (missing seqs)", "{gaps} ({gap_seqs})"),
    ("lost", "{lost}"),
    ("resets (unjustified)", "{resets} ({unjustified_resets})"),
    ("acked missing from db", "{db_missing}"),
    ("content mismatches", "{content_mismatch}"),
    ("unacked at end (committed)", "{unacked_at_end} ({unacked_committed})"),
    ("reconnects by close code", "{reconnects}"),
    ("connect failures", "{connect_failures}"),
    ("faults injected", "{faults}"),
    ("slow consumer closes", "{slow_consumer_closes}"),
    ("send->own message p50/p99 ms", "{own_message_p50} / {own_message_p99}"),
    ("send->ack p50/p99 ms", "{ack_p50} / {ack_p99}"),
    ("room last seqs", "{room_last_seq}"),
    ("VIOLATIONS", "{violations}"),
]


def print_table(report: dict[str, Any]) -> None:
    fields = {
        k: ", ".join(f"{a}={b}" for a, b in v.items()) or "-" if isinstance(v, dict) else v
        for k, v in report.items()
    }
    for name, values in report["latency_ms"].items():
        fields |= {f"{name}_{q}": v for q, v in values.items()}
    fields["violations"] = fields["violations"] if report["violations"] else "none"
    width = max(len(name) for name, _ in TABLE)
    print("-" * (width + 40))
    for name, template in TABLE:
        print(f"{name.ljust(width)}  {template.format_map(fields)}")
    print("-" * (width + 40))
    for kind, examples in report["samples"].items():
        print(f"{kind}: {json.dumps(examples[:3], ensure_ascii=False)[:600]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=CI_SIZE["clients"])
    p.add_argument("--rooms", type=int, default=CI_SIZE["rooms"])
    p.add_argument("--senders", type=int, default=CI_SIZE["senders"], help="clients that send")
    p.add_argument("--rate", type=float, default=CI_SIZE["rate"], help="messages/s, all senders")
    p.add_argument("--duration", type=float, default=CI_SIZE["duration"], help="seconds of traffic")
    p.add_argument("--fault-interval", type=float, default=CI_SIZE["fault_interval"])
    p.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma-separated; '' for none")
    p.add_argument("--slow-seconds", type=float, default=3.0, help="how long `slow` stops reading")
    p.add_argument("--big-fraction", type=float, default=0.02, help="share of >8000-byte messages")
    p.add_argument("--drain", type=float, default=15.0, help="seconds allowed for catching up")
    p.add_argument("--database-url", help="an empty or soak-only database (else: embedded)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--seed", type=int, help="seed the random choices (timing still varies)")
    p.add_argument("--keep-logs", action="store_true", help="keep server logs even on success")
    p.add_argument("--ci", action="store_true", help="CI size: the defaults (explicit flags win)")
    args = p.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    if unknown := set(args.faults) - set(FAULT_KINDS):
        p.error(f"unknown faults: {', '.join(sorted(unknown))}")
    if not (0 <= args.senders <= args.clients and args.rooms >= 1 and args.rate > 0):
        p.error("need 0 <= --senders <= --clients, --rooms >= 1 and --rate > 0")
    return args


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind through every finally (servers, PostgreSQL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    harness = Harness(database_url=args.database_url, keep_logs=args.keep_logs, name="soak")
    harness.failed = True  # until the audit finds nothing: the logs are kept
    try:
        harness.start_database()
        soak = Soak(args, harness)
        print(
            f"soak: {args.clients} clients, {args.rooms} rooms, {args.senders} senders, "
            f"{args.rate:g} msg/s for {args.duration:g}s, faults {','.join(args.faults) or '-'} "
            f"every {args.fault_interval:g}s; {soak.env_note or 'server defaults'}; "
            f"logs in {harness.log_dir}",
            flush=True,
        )
        report = asyncio.run(soak.run())
        harness.failed = bool(report["violations"])
    except (HarnessError, OSError, asyncpg.PostgresError) as exc:
        print(f"soak: harness failure: {exc!r}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        harness.close()
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if report["violations"]:
        print("soak: FAILED")
        return 1
    print("soak: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
