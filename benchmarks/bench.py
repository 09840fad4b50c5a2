"""Benchmarks of chat-service, each measured against a trivial server as the generator ceiling.

One command per scenario (docs/benchmarks.md explains every figure; ``--tiny``: any scenario
at a size that runs in seconds; ``--json PATH``: where the report goes):

    python -m benchmarks.bench fanout --rounds 5     R rooms x C connections over two servers,
        S senders at a paced total rate: loss, duplicates, order, deliveries/s, latency
    python -m benchmarks.bench saturate --rounds 3   the same, the rate ramped until p99 >
        --p99-limit or any loss, then bisected: the highest sustained rate
    python -m benchmarks.bench idle                  N idle connections to one server: RSS each
    python -m benchmarks.bench history               a room of N messages: connect with 50
        replayed, resume of 500, REST pages
    python -m benchmarks.bench rest                  POST /rooms/{room}/messages, K clients
    python -m benchmarks.bench roomlist              GET /rooms?mine=true of a user in 200
        rooms with exact unread counts, 1M messages in the database (chat-service only)
    python -m benchmarks.bench resume                resume after 1000 missed items of mixed
        kinds against 1000 missed messages (chat-service only)
    python -m benchmarks.bench presence              2000 users (one socket each) of one room
        over two servers arrive within 2 s, then all reconnect within 2 s (a deploy): presence
        frames per client, the servers' CPU (chat-service only)

fanout and saturate take ``--read-rate R`` (every connection sends ``read`` frames R times a
second), ``--reaction-rate N`` (N ``react`` frames a second from the senders) and
``--typing-users N`` (N users of each room send ``typing`` every 2-3 s) on top.
``--webhook-delay S``: every stored item also goes to a webhook receiver that answers after S s.

``--rounds N`` (fanout, saturate) measures the targets N times, alternating (trivial, chat,
trivial, chat...), and reports the median round: the box's state drifts within minutes, and
alternating keeps that drift out of the ratios.

The run starts what it needs (an embedded PostgreSQL in a temporary folder unless
``--database-url``, migrations, ``chat-service serve`` processes, ``benchmarks.trivial_server``),
talks to 127.0.0.1 only, bounds every wait, and stops everything at the end. Exit code: 0 done,
1 a correctness violation (loss, duplicate, disorder, failed connects, wrong replay), 2 the
harness failed or timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg

from benchmarks.bench_client import (
    HttpClient,
    Load,
    Peer,
    close_all,
    make_token,
    open_all,
    percentiles,
    perf,
)
from benchmarks.bench_infra import (
    CpuMeter,
    Harness,
    HarnessError,
    brute_force_read_state,
    cpu_seconds,
    machine,
    raise_nofile,
    roomlist_invariants,
    rss_kb,
    seed_history,
    seed_roomlist,
)
from service.chat.envelope import channel_for

SCENARIOS = ("fanout", "saturate", "idle", "history", "rest", "roomlist", "resume", "presence")
CHAT_ONLY = ("roomlist", "resume", "presence")
"""Scenarios the trivial server has nothing to compare with (no read state, no event kinds)."""
DEFAULTS: dict[str, dict[str, Any]] = {
    "fanout": {"rooms": 5, "connections": 20, "senders": 10, "rate": 200.0, "duration": 10.0,
               "warmup": 2.0, "drain": 5.0, "servers": 2, "concurrency": 10},
    "saturate": {"rooms": 5, "connections": 20, "senders": 10, "step_seconds": 5.0,
                 "rates": "200,400,800,1200,1600,2000", "rate_increment": 400.0,
                 "max_rate": 20000.0, "p99_limit": 250.0, "refine": 2, "warmup": 1.0,
                 "drain": 5.0, "servers": 2, "concurrency": 10},
    "idle": {"connections": 2000, "rooms": 100, "settle": 2.0, "servers": 1, "concurrency": 50},
    "history": {"messages": 1_000_000, "reps": 300, "servers": 1, "concurrency": 1},
    "rest": {"clients": 10, "rooms": 5, "duration": 10.0, "warmup": 1.0, "servers": 2,
             "concurrency": 1},
    "roomlist": {"messages": 1_000_000, "rooms": 200, "reps": 2000, "servers": 1,
                 "concurrency": 1},
    "resume": {"messages": 1000, "reps": 200, "servers": 1, "concurrency": 1},
    "presence": {"connections": 2000, "window": 2.0, "servers": 2, "concurrency": 100},
}  # fmt: skip
TINY: dict[str, dict[str, Any]] = {
    "fanout": {"rooms": 2, "connections": 5, "senders": 4, "rate": 50.0, "duration": 1.0,
               "warmup": 0.5, "drain": 5.0},
    "saturate": {"rooms": 2, "connections": 5, "senders": 4, "step_seconds": 1.0,
                 "rates": "100,200,400,800", "max_rate": 800.0, "refine": 1, "warmup": 0.5,
                 "drain": 3.0},
    "idle": {"connections": 50, "rooms": 5, "settle": 0.5},
    "history": {"messages": 5000, "reps": 10},
    "rest": {"clients": 4, "rooms": 2, "duration": 2.0, "warmup": 0.5},
    "roomlist": {"messages": 20_000, "rooms": 20, "reps": 20},
    "resume": {"messages": 100, "reps": 10},
    "presence": {"connections": 40, "window": 1.0, "presence_interval": 0.5,
                 "presence_grace": 2.0},
}  # fmt: skip
TARGETS = {
    "fanout_p99_ms": 5.0,
    "saturate_ratio": 0.8,
    "idle_rss_per_connection_kb": 25.0,
    "idle_connections": 10_000,
    "history_rest_p99_ms": 5.0,
    "history_connect_p99_ms": 50.0,
    "roomlist_p99_ms": 10.0,
}


@dataclass
class Target:
    """A system under test: ``chat`` (chat-service) or ``trivial`` (the ceiling)."""

    name: str
    ws: list[str]
    http: list[str]
    pids: list[int]


@dataclass
class Context:
    args: argparse.Namespace
    harness: Harness
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    targets: list[Target] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    round: int = 0
    """Rooms and users are new each round: a message id sent again would be a resend."""

    def token(self, user: str) -> str:
        return make_token(self.secret, user)

    def room(self, target: Target, what: str, index: int) -> str:
        return f"bench-{self.run}-{self.round}-{target.name}-{what}-{index}"

    async def open(self, peers: list[Peer]) -> tuple[list[float], Counter[str]]:
        """Connect ``--concurrency`` at a time, no history: connect-to-ready times, failures."""
        args = self.args
        return await open_all(peers, concurrency=args.concurrency, deflate=args.deflate, history=0)

    async def warm_up(self, target: Target, what: str, count: int) -> None:
        """Connections opened and closed first (database pool, code paths), so that the
        connect-to-ready times measured next are of the steady state."""
        warm = make_peers(self, target, f"{what}warm", 1, count)
        await self.open(warm)
        await close_all(warm)

    def meter(self, target: Target) -> CpuMeter:
        """Cores used by the generator (this process), the target's servers and PostgreSQL."""
        return CpuMeter(
            {
                "generator": list,
                "servers": lambda: target.pids,
                "postgres": self.harness.postgres_pids,
            }
        )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- setting up ---------------------------------------------------------------------------------


async def start_targets(ctx: Context) -> None:
    """The trivial server first: it is measured first in every round and warms the generator up."""
    args = ctx.args
    extra = {"CHAT_DB_POOL_SIZE": str(args.db_pool_size)} if args.db_pool_size else {}
    if args.presence_interval is not None:  # else the service's default (a server before
        extra["CHAT_PRESENCE_INTERVAL"] = str(args.presence_interval)  # issue 16 has none)
    if args.presence_grace is not None:
        extra["CHAT_PRESENCE_GRACE"] = str(args.presence_grace)
    if args.webhook_delay is not None and args.only != "trivial":
        # Every stored item goes to a receiver that takes this long to answer; a server before
        # webhooks (issue 17) ignores these settings: the same load either way.
        extra["CHAT_WEBHOOK_URL"] = await ctx.harness.start_webhook_sink(args.webhook_delay)
        extra["CHAT_WEBHOOK_SECRET"] = secrets.token_urlsafe(32)
    starting: dict[str, Awaitable[Any]] = {}
    if args.only != "chat":
        starting["trivial"] = ctx.harness.start_trivial(ctx.secret, uvloop=not args.no_uvloop)
    if args.only != "trivial":
        starting["chat"] = ctx.harness.start_chat_servers(
            args.servers, ctx.secret, log_level=args.log_level, extra_env=extra
        )
    started = await asyncio.gather(*starting.values())
    for name, servers in zip(starting, started, strict=True):
        servers = servers if isinstance(servers, list) else [servers]
        ctx.targets.append(
            Target(
                name, [s.ws for s in servers], [s.http for s in servers], [s.pid for s in servers]
            )
        )


def make_peers(ctx: Context, target: Target, what: str, rooms: int, per_room: int) -> list[Peer]:
    """Peer ``j`` of each room goes to server ``j % servers``: every room spans every server."""
    peers = []
    for k in range(rooms):
        room = ctx.room(target, what, k)
        for j in range(per_room):
            base = target.ws[j % len(target.ws)]
            user = f"b{ctx.run}-{ctx.round}-{what}-r{k}-c{j}"
            peers.append(Peer(room, k, base, ctx.token(user)))
    return peers


async def make_members(ctx: Context, target: Target, peers: list[Peer]) -> None:
    """Each room made with ``POST /rooms`` (public) by its first peer, with the others as
    members: only members have read cursors, so only then do ``read`` frames move cursors and
    send receipts (rooms of at most ``CHAT_RECEIPTS_MAX_MEMBERS`` members, 50)."""
    rooms: dict[str, list[Peer]] = {}
    for peer in peers:
        rooms.setdefault(peer.room, []).append(peer)
    for room, members in rooms.items():
        users = [user_of(ctx, p) for p in members]
        http = await HttpClient.open(
            target.http[0],
            {"authorization": f"Bearer {members[0].token}", "content-type": "application/json"},
        )
        try:
            body = {"name": room, "kind": "public", "members": users[1:101]}
            status, reply = await http.request("POST", "/rooms", json.dumps(body).encode())
            if status != 201:
                raise HarnessError(f"making {room}: {status} {reply[:200]!r}")
            for user in users[101:]:  # at most 100 members listed at creation
                path = f"/rooms/{room}/members/{user}"
                status, reply = await http.request("PUT", path, b'{"role":"member"}')
                if status != 201:
                    raise HarnessError(f"adding {user} to {room}: {status} {reply[:200]!r}")
        finally:
            http.close()


def user_of(ctx: Context, peer: Peer) -> str:
    import jwt  # noqa: PLC0415 - the peer's token names its user

    return str(jwt.decode(peer.token, ctx.secret, algorithms=["HS256"])["sub"])


def pick_senders(peers: list[Peer], rooms: int, per_room: int, count: int) -> list[Peer]:
    """Spread over rooms first, then over the connections (hence the servers) of each room."""
    count = max(1, min(count, rooms * per_room))
    return [peers[(s % rooms) * per_room + (s // rooms) % per_room] for s in range(count)]


def still_open(peers: list[Peer]) -> int:
    from websockets.protocol import State  # noqa: PLC0415

    return sum(1 for p in peers if p.ws is not None and p.ws.protocol.state is State.OPEN)


# -- fanout and saturate ------------------------------------------------------------------------


async def open_room_peers(ctx: Context, target: Target, what: str) -> tuple[list[Peer], dict]:
    args = ctx.args
    await ctx.warm_up(target, what, min(args.concurrency, 20))
    peers = make_peers(ctx, target, what, args.rooms, args.connections)
    if args.read_rate > 0 and target.name == "chat":
        await make_members(ctx, target, peers)
    times, failures = await ctx.open(peers)
    info = {
        "connections": len(peers),
        "connect_failures": dict(failures),
        "connect_ready_ms": percentiles(times),
    }
    if failures:
        ctx.violations.append(f"{target.name}: {sum(failures.values())} connects failed")
    return peers, info


async def fanout(ctx: Context, target: Target) -> dict[str, Any]:
    args = ctx.args
    peers, info = await open_room_peers(ctx, target, "fanout")
    try:
        senders = pick_senders(peers, args.rooms, args.connections, args.senders)
        load = make_load(args, peers)
        log(f"{target.name}: {len(peers)} connections ready; warm-up {args.warmup}s")
        await load.run_step(0, args.rate, args.warmup, senders, args.drain)
        profiler = None
        if args.profile and target.name == "chat":
            profiler = start_profiler(ctx, target.pids[0], args.duration)
        log(f"{target.name}: {args.rate:g} msg/s for {args.duration}s")
        result = await load.run_step(
            1, args.rate, args.duration, senders, args.drain, ctx.meter(target)
        )
        if profiler is not None:
            result["profile"] = await finish_profiler(ctx, profiler, args.duration)
        result.update(info)
        result["disconnected"] = len(peers) - still_open(peers)
        result["errors"] = dict(load.errors)
    finally:
        await close_all(peers)
    bad = {k: result[k] for k in ("lost", "duplicated", "out_of_order", "disconnected")}
    bad.update(stream_faults(result))
    if any(bad.values()) or result["acked"] != result["sent"]:
        ctx.violations.append(f"{target.name}: {bad}, acked {result['acked']}/{result['sent']}")
    return result


def make_load(args: argparse.Namespace, peers: list[Peer]) -> Load:
    return Load(
        peers,
        args.body_chars,
        read_rate=args.read_rate,
        reaction_rate=args.reaction_rate,
        typing_users=args.typing_users,
    )


def stream_faults(step: dict[str, Any]) -> dict[str, int]:
    """What breaks the stream besides lost messages: a gap in the seqs a connection received
    (an item of another kind missed), connections short of their room's last acked item,
    reaction items a connection did not get, reactions never answered."""
    faults = {"gaps": step["gaps"], "stream_behind": step["stream_behind"]}
    if "reaction_items_per_receiver" in step:
        faults["reaction_items_missing"] = step["reaction_items_per_receiver"]["missing"]
        faults["reactions_unanswered"] = step["reactions_unanswered"]
    return faults


def rate_steps(args: argparse.Namespace) -> list[float]:
    steps = [float(r) for r in str(args.rates).split(",") if r.strip()]
    steps = [r for r in steps if r <= args.max_rate]
    while steps and steps[-1] + args.rate_increment <= args.max_rate:
        steps.append(steps[-1] + args.rate_increment)
    return steps or [args.max_rate]


def refined_rate(sustained: float, failed: float) -> float | None:
    """The rate halfway between a sustained step and a failed one, on a 50 msg/s grid; None
    once they are adjacent on it (the ramp's resolution is then 50 msg/s)."""
    mid = round((sustained + failed) / 2 / 50) * 50
    return float(mid) if sustained < mid < failed else None


async def saturate(ctx: Context, target: Target) -> dict[str, Any]:
    """Ramp until a step fails, then bisect between the last sustained step and the failed one
    (``--refine`` times): the coarse ramp alone would quantize the result to its increment."""
    args = ctx.args
    peers, info = await open_room_peers(ctx, target, "saturate")
    steps: list[dict[str, Any]] = []
    sustained: dict[str, Any] | None = None
    stop_reason = "max rate reached"
    try:
        senders = pick_senders(peers, args.rooms, args.connections, args.senders)
        load = make_load(args, peers)
        rates = rate_steps(args)
        await load.run_step(0, rates[0], args.warmup, senders, args.drain)

        async def step_at(index: int, rate: float, refining: bool) -> list[str]:
            step = await load.run_step(
                index, rate, args.step_seconds, senders, args.drain, ctx.meter(target)
            )
            p99 = step["latency_ms"]["p99"]
            reasons = []
            if step["lost"] or step["acked"] != step["sent"]:
                reasons.append(f"lost {step['lost']}, acked {step['acked']}/{step['sent']}")
            faults = {k: v for k, v in stream_faults(step).items() if v}
            if faults:
                reasons.append(f"stream {faults}")
            if p99 is None or p99 > args.p99_limit:
                reasons.append(f"p99 {p99} ms > {args.p99_limit:g} ms")
            if step["send_rate"] < 0.9 * rate:
                reasons.append(f"the generator sent only {step['send_rate']:g}/s")
            step["sustained"] = not reasons
            step["refinement"] = refining
            steps.append(step)
            log(
                f"{target.name}: {rate:g} msg/s -> {step['deliveries_per_s']:g} deliveries/s, "
                f"p99 {p99} ms, lost {step['lost']}"
                + (" (refining)" if refining else "")
                + (f" [{'; '.join(reasons)}]" if reasons else "")
            )
            return reasons

        failed_rate: float | None = None
        for index, rate in enumerate(rates, 1):
            reasons = await step_at(index, rate, refining=False)
            if reasons:
                stop_reason = "; ".join(reasons)
                failed_rate = rate
                break
            sustained = steps[-1]
        for _ in range(args.refine if failed_rate is not None else 0):
            low = sustained["rate_target"] if sustained else 0.0
            rate = refined_rate(low, failed_rate)  # type: ignore[arg-type]
            if rate is None:
                break
            if await step_at(len(steps) + 1, rate, refining=True):
                failed_rate = rate
            else:
                sustained = steps[-1]
        errors = dict(load.errors)
    finally:
        await close_all(peers)
    return {
        **info,
        "sustained_rate": sustained["rate_target"] if sustained else 0.0,
        "sustained_deliveries_per_s": sustained["deliveries_per_s"] if sustained else 0.0,
        "sustained_p99_ms": sustained["latency_ms"]["p99"] if sustained else None,
        "sustained_cpu_cores": sustained["cpu_cores"] if sustained else None,
        "stop_reason": stop_reason,
        "lowest_failed_rate": failed_rate,
        "ceiling_found": stop_reason != "max rate reached",
        "errors": errors,
        "steps": steps,
    }


# -- profile ------------------------------------------------------------------------------------


def start_profiler(ctx: Context, pid: int, seconds: float) -> tuple[Any, Path]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(ctx.args.profile).resolve()
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    # Blocking sampling (py-spy pauses the process ~200 times a second): --nonblocking reads
    # torn stacks under this load and leaves most samples unattributed.
    argv += ["--format", "speedscope", "--output", str(out), "--rate", "200"]
    log(f"profiling pid {pid} with py-spy into {out}")
    return ctx.harness.spawn("py-spy", argv), out


async def finish_profiler(ctx: Context, profiler: tuple[Any, Path], seconds: float) -> dict:
    process, out = profiler
    deadline = time.monotonic() + seconds + 30
    while process.proc is not None and process.proc.poll() is None:
        if time.monotonic() > deadline:
            await process.stop()
            break
        await asyncio.sleep(0.1)
    if not out.exists():
        return {"error": f"py-spy wrote nothing; see {process.log_path}"}
    return summarize_speedscope(out)


def summarize_speedscope(path: Path, top: int = 20) -> dict[str, Any]:
    """Where the main thread's time goes: self and inclusive shares per function (all lines of
    a function together), self share per package; other threads listed with their seconds.

    py-spy cannot look into C: the self time of ``Runner.run`` (the bottom Python frame) is the
    event loop's own work (uvloop, asyncpg's protocol, syscalls). Threads parked on a lock
    (AnyIO's worker threads) may be counted as busy by py-spy: they are reported apart.
    """
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    profiles = doc["profiles"]

    def seconds(profile: dict[str, Any]) -> float:
        return float(sum(profile.get("weights") or [1] * len(profile["samples"])))

    main = next((p for p in profiles if "MainThread" in p.get("name", "")), None)
    main = main or max(profiles, key=seconds)
    keys = [_frame_key(frame) for frame in frames]
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    package: Counter[str] = Counter()
    root: set[str] = set()  # runpy, cli, uvicorn, Runner.run: shared by all, saying nothing
    total = 0.0
    for stack, weight in zip(main["samples"], main.get("weights") or [], strict=False):
        if not stack:
            continue
        total += weight
        leaf = keys[stack[-1]]
        self_time[leaf] += weight
        package[_package(frames[stack[-1]])] += weight
        for depth, key in enumerate(keys[i] for i in stack):
            if key.startswith("Runner.run"):
                root.update(keys[i] for i in stack[: depth + 1])
        for key in {keys[i] for i in stack}:
            inclusive[key] += weight

    def share(value: float) -> float:
        return round(100.0 * value / total, 1) if total else 0.0

    return {
        "file": str(path),
        "main_thread_seconds": round(total, 2),
        "other_threads_seconds": {
            p.get("name", "?"): round(seconds(p), 2) for p in profiles if p is not main
        },
        "self_pct": [[k, share(v)] for k, v in self_time.most_common(top)],
        "inclusive_pct": [
            [k, share(v)] for k, v in inclusive.most_common(top + len(root)) if k not in root
        ][:top],
        "package_self_pct": [[k, share(v)] for k, v in package.most_common()],
    }


def _frame_key(frame: dict[str, Any]) -> str:
    if frame["name"] == "Runner.run":
        return "Runner.run self: event loop C code (uvloop, asyncpg protocol, syscalls)"
    where = frame.get("file", "?")
    for marker in ("site-packages/", "/main/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{frame['name']} ({where})"


def _package(frame: dict[str, Any]) -> str:
    if frame["name"] == "Runner.run":
        return "event loop C code"
    where = frame.get("file", "?")
    if "site-packages/" in where:
        return where.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/service/" in where:
        return "service"
    return "stdlib" if "python3" in where else where


# -- idle ---------------------------------------------------------------------------------------


async def idle(ctx: Context, target: Target) -> dict[str, Any]:
    args = ctx.args
    pid = target.pids[0]
    one = Target(target.name, target.ws[:1], target.http[:1], target.pids[:1])
    await ctx.warm_up(one, "idle", min(20, args.connections))
    await asyncio.sleep(args.settle)
    before = rss_kb(pid)
    per_room = -(-args.connections // args.rooms)
    peers = make_peers(ctx, one, "idle", args.rooms, per_room)[: args.connections]
    log(f"{target.name}: opening {len(peers)} idle connections (RSS before {before} kB)")
    started = perf()
    try:
        times, failures = await ctx.open(peers)
        opened_in = perf() - started
        await asyncio.sleep(args.settle)
        after = rss_kb(pid)
        alive = still_open(peers)
    finally:
        await close_all(peers)
    await asyncio.sleep(args.settle)
    after_close = rss_kb(pid)
    if failures or alive != len(peers):
        ctx.violations.append(f"{target.name}: {dict(failures)} failed, {alive} still open")
    return {
        "connections": len(peers),
        "opened": len(times),
        "still_open": alive,
        "connect_failures": dict(failures),
        "open_seconds": round(opened_in, 2),
        "connect_ready_ms": percentiles(times),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "rss_after_close_kb": after_close,
        "rss_per_connection_kb": round((after - before) / max(len(times), 1), 2),
    }


# -- history ------------------------------------------------------------------------------------


async def history(ctx: Context, target: Target) -> dict[str, Any]:
    args = ctx.args
    n = args.messages
    room = ctx.room(target, "history", 0)
    if target.name == "chat":
        log(f"chat: inserting {n} messages")
        seeded_in = await seed_history(ctx.harness.dsn, room, n)
        log(f"chat: inserted and vacuumed in {seeded_in:.1f}s")
    else:
        seeder = await HttpClient.open(target.http[0])
        try:
            status, body = await seeder.request("POST", f"/_seed/{room}?n={n}")
        finally:
            seeder.close()
        if status != 200:
            raise HarnessError(f"seeding the trivial server: status {status}: {body[:200]!r}")
        seeded_in = 0.0
    token = ctx.token(f"b{ctx.run}-reader")
    base_ws, base_http = target.ws[0], target.http[0]
    middle = n // 2

    async def connect(**params: Any) -> tuple[float, Peer]:
        peer = Peer(room, 0, base_ws, token)
        try:
            took = await peer.open(deflate=args.deflate, **params)
        finally:
            await peer.close()
        return took, peer

    async def ws_history() -> float:
        took, peer = await connect(history=50)
        if peer.replayed != min(50, n) or peer.ready_frame.get("last_seq") != n:
            raise HarnessError(f"history=50 replayed {peer.replayed}: {peer.ready_frame}")
        return took

    async def ws_since() -> float:
        took, peer = await connect(since=max(0, n - 500), history=0)
        if peer.replayed != min(500, n) or not peer.ready_frame.get("recovered"):
            raise HarnessError(f"since replayed {peer.replayed}: {peer.ready_frame}")
        return took

    http = await HttpClient.open(base_http, {"authorization": f"Bearer {token}"})

    def page(first: int, **params: int) -> Callable[[], Awaitable[float]]:
        path = f"/rooms/{room}/messages?{urlencode({'limit': 50, **params})}"

        async def get() -> float:
            started = perf()
            status, body = await http.request("GET", path)
            took = perf() - started
            if status != 200:
                raise HarnessError(f"page {params}: status {status}: {body[:200]!r}")
            messages = json.loads(body)["messages"]
            if len(messages) != 50 or messages[0]["seq"] != first:
                seqs = [m["seq"] for m in messages[:1]]
                raise HarnessError(f"page {params}: {len(messages)} messages from {seqs}")
            return took

        return get

    kinds: dict[str, Callable[[], Awaitable[float]]] = {
        "ws_connect_history50": ws_history,
        "ws_resume_since500": ws_since,
        "rest_before_start": page(1, before=51),
        "rest_before_middle": page(middle - 50, before=middle),
        "rest_before_end": page(n - 49, before=n + 1),
        "rest_after_start": page(1, after=0),
        "rest_after_middle": page(middle + 1, after=middle),
        "rest_after_end": page(n - 49, after=n - 50),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for rep in range(args.reps + 2):  # two warm-up rounds; kinds interleaved
            for kind, measure in kinds.items():
                took = await measure()
                if rep >= 2:
                    times[kind].append(took)
        # CPU per page, robust where a p99 on a shared 2-core box is not: the same middle page
        # many times in a row, with nothing else running.
        cpu_pages = args.reps * 10
        middle_page = page(middle + 1, after=middle)
        meter = ctx.meter(target)
        meter.start()
        started = perf()
        for _ in range(cpu_pages):
            await middle_page()
        wall = perf() - started
        cores = meter.stop()
    except HarnessError as exc:
        ctx.violations.append(f"{target.name}: {exc}")
        raise
    finally:
        http.close()
    result: dict[str, Any] = {"messages": n, "seed_seconds": round(seeded_in, 2)}
    for kind, values in times.items():
        result[kind] = percentiles(values)
    result["rest_page_cpu_us"] = {
        group: round(used * wall / cpu_pages * 1e6) for group, used in cores.items()
    }
    rest_p99 = [result[k]["p99"] for k in kinds if k.startswith("rest_")]
    result["rest_worst_p99_ms"] = max(v for v in rest_p99 if v is not None)
    return result


# -- rest ---------------------------------------------------------------------------------------


async def rest(ctx: Context, target: Target) -> dict[str, Any]:
    args = ctx.args
    body = "x" * args.body_chars
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    phase = {"measure": False, "stop": False}

    async def worker(k: int) -> None:
        base = target.http[k % len(target.http)]
        headers = {
            "authorization": f"Bearer {ctx.token(f'b{ctx.run}-rest-{k}')}",
            "content-type": "application/json",
        }
        path = f"/rooms/{ctx.room(target, 'rest', k % args.rooms)}/messages"
        http: HttpClient | None = None
        count = 0
        try:
            while not phase["stop"]:
                count += 1
                content = f'{{"body":"{body}","client_msg_id":"{k}-{count}"}}'.encode()
                started = perf()
                try:
                    if http is None or http.closed:
                        http = await HttpClient.open(base, headers)
                    status = str((await http.request("POST", path, content))[0])
                except (OSError, TimeoutError) as exc:  # reconnects on the next round
                    status = type(exc).__name__
                if phase["measure"] and not phase["stop"]:
                    latencies.append(perf() - started)
                    statuses[status] += 1
        finally:
            if http is not None:
                http.close()

    tasks = [asyncio.create_task(worker(k)) for k in range(args.clients)]
    try:
        await asyncio.sleep(args.warmup)
        meter = ctx.meter(target)
        meter.start()
        phase["measure"] = True
        started = perf()
        await asyncio.sleep(args.duration)
        phase["stop"] = True
        window = perf() - started
        cpu = meter.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    finally:
        phase["stop"] = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ok = statuses.get("201", 0)
    errors = {k: v for k, v in statuses.items() if k != "201"}
    if errors:
        ctx.violations.append(f"{target.name}: failed posts {errors}")
    return {
        "clients": args.clients,
        "requests": sum(statuses.values()),
        "created": ok,
        "errors": errors,
        "requests_per_s": round(ok / window, 1),
        "latency_ms": percentiles(latencies),
        "cpu_cores": cpu,
    }


# -- roomlist -----------------------------------------------------------------------------------


async def roomlist(ctx: Context, target: Target) -> dict[str, Any]:
    """``GET /rooms?mine=true&limit=R`` of a user in R rooms, and ``GET /rooms/{room}`` of the
    room where they have the most unread, after seeding ``--messages`` items (``seed_roomlist``);
    every room's ``unread`` and ``mentions`` checked against a count of the messages
    themselves."""
    args = ctx.args
    user = f"rl{ctx.run}-me"
    prefix = f"rl{ctx.run}"
    dsn = ctx.harness.dsn
    log(f"chat: seeding {args.messages} items, {args.rooms} rooms of one user and as many others")
    plan = await seed_roomlist(
        dsn, user=user, prefix=prefix, rooms=args.rooms, messages=args.messages
    )
    log(f"chat: seeded in {plan['seconds']:.1f}s (inserts, mentions, members, vacuum, checkpoint)")
    result: dict[str, Any] = {
        "messages": plan["items"],
        "rooms": args.rooms,
        "other_rooms": plan["other_rooms"],
        "seed_seconds": round(plan["seconds"], 2),
    }
    if args.messages <= 200_000:  # a window over every item: seconds at 1M
        broken = await roomlist_invariants(dsn, prefix)
        result["invariants_checked"] = True
        if broken:
            ctx.violations.append(f"the seed breaks 0007's invariants: {broken}")
    expected = await brute_force_read_state(dsn, user, plan["rooms"])
    big = expected[plan["big_room"]]
    result["big_room"] = {"unread": big[1], "mentions": big[2], "last_read_seq": big[0]}
    result["unread_total"] = sum(v[1] for v in expected.values())
    result["mentions_total"] = sum(v[2] for v in expected.values())
    log(
        f"chat: {result['unread_total']} unread in {args.rooms} rooms "
        f"({big[1]} in {plan['big_room']}), {result['mentions_total']} mentions"
    )
    http = await HttpClient.open(target.http[0], {"authorization": f"Bearer {ctx.token(user)}"})
    mismatches: list[str] = []

    def check(room: dict[str, Any]) -> None:
        want = expected.get(room["name"])
        got = (room.get("last_read_seq"), room.get("unread"), room.get("mentions"))
        if want is None or got != want:
            mismatches.append(f"{room['name']}: (cursor, unread, mentions) {got}, counted {want}")

    async def room_list() -> float:
        started = perf()
        status, body = await http.request("GET", f"/rooms?mine=true&limit={args.rooms}")
        took = perf() - started
        if status != 200:
            raise HarnessError(f"GET /rooms?mine=true: status {status}: {body[:200]!r}")
        page = json.loads(body)
        if len(page["rooms"]) != args.rooms or page["next_after"] is not None:
            raise HarnessError(f"GET /rooms?mine=true: {len(page['rooms'])} rooms")
        if not mismatches:
            for room in page["rooms"]:
                check(room)
        return took

    async def one_room() -> float:
        started = perf()
        status, body = await http.request("GET", f"/rooms/{plan['big_room']}")
        took = perf() - started
        if status != 200:
            raise HarnessError(f"GET /rooms/{plan['big_room']}: status {status}: {body[:200]!r}")
        if not mismatches:
            check(json.loads(body))
        return took

    kinds = {"room_list": room_list, "big_room_get": one_room}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for measure in kinds.values():  # warm-up: the pool's connections, plans, caches
            for _ in range(min(20, args.reps)):
                await measure()
        for _ in range(args.reps):
            for kind, measure in kinds.items():
                times[kind].append(await measure())
        meter = ctx.meter(target)
        meter.start()
        started = perf()
        for _ in range(args.reps):
            await room_list()
        wall = perf() - started
        cores = meter.stop()
    except HarnessError as exc:
        ctx.violations.append(f"{target.name}: {exc}")
        raise
    finally:
        http.close()
    if mismatches:
        ctx.violations.append(
            f"{len(mismatches)} rooms with wrong read state, e.g. " + "; ".join(mismatches[:3])
        )
    result["read_state_mismatches"] = len(mismatches)
    for kind, values in times.items():
        result[kind] = percentiles(values)
    result["room_list_cpu_us"] = {
        group: round(used * wall / args.reps * 1e6) for group, used in cores.items()
    }
    return result


# -- resume -------------------------------------------------------------------------------------


async def resume(ctx: Context, target: Target) -> dict[str, Any]:
    """Resume (``?since=S`` until ``ready``) after N missed text messages (room A) and after
    N missed items of mixed kinds (room B: edits, deletes, reactions set and taken back,
    members joining and leaving), each room holding N texts before S; interleaved reps."""
    args = ctx.args
    n = args.messages
    texts, mixed = ctx.room(target, "resume", 0), ctx.room(target, "resume", 1)
    started = perf()
    log(f"chat: {2 * n} texts to {texts}, {n} texts and {n} mixed items to {mixed}")
    await post_texts(ctx, texts, 1, 2 * n)
    await post_texts(ctx, mixed, 1, n)
    kinds_posted = await post_mixed(ctx, target, mixed, n)
    seeded_in = perf() - started
    log(f"chat: posted in {seeded_in:.1f}s: {dict(kinds_posted)}")
    token = ctx.token(f"b{ctx.run}-resumer")

    def measure(room: str) -> Callable[[], Awaitable[tuple[float, int]]]:
        async def connect() -> tuple[float, int]:
            peer = Peer(room, 0, target.ws[0], token)
            try:
                took = await peer.open(deflate=args.deflate, since=n, history=0)
            finally:
                await peer.close()
            ready = peer.ready_frame
            if peer.replayed != n or not ready.get("recovered") or ready["last_seq"] != 2 * n:
                raise HarnessError(f"resume in {room}: {peer.replayed} replayed, {ready}")
            return took, peer.replayed_bytes

        return connect

    kinds = {"resume_texts": measure(texts), "resume_mixed": measure(mixed)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    replayed_bytes: dict[str, int] = {}
    try:
        for rep in range(args.reps + 2):  # two warm-up rounds; the rooms interleaved
            for kind, connect in kinds.items():
                took, replayed_bytes[kind] = await connect()
                if rep >= 2:
                    times[kind].append(took)
    except HarnessError as exc:
        ctx.violations.append(f"{target.name}: {exc}")
        raise
    result: dict[str, Any] = {
        "missed": n,
        "seed_seconds": round(seeded_in, 2),
        "mixed_kinds": dict(kinds_posted),
        "replayed_kb": {k: round(v / 1024, 1) for k, v in replayed_bytes.items()},
    }
    for kind, values in times.items():
        result[kind] = percentiles(values)
    result["mixed_over_texts"] = {
        q: round(result["resume_mixed"][q] / result["resume_texts"][q], 3)
        for q in ("p50", "p99")
        if result["resume_texts"][q]
    }
    return result


async def post_texts(ctx: Context, room: str, first: int, last: int) -> None:
    """Text messages ``first..last`` of the room by ``u0``..``u9`` (message k by ``u{k % 10}``)
    through ``chat_post_messages``, 100 a call, as the writer stores them."""
    conn = await asyncpg.connect(ctx.harness.dsn, timeout=10)
    try:
        for start in range(first, last + 1, 100):
            ks = range(start, min(start + 100, last + 1))
            await conn.execute(
                "SELECT * FROM chat_post_messages($1, $2, $3, $4, $5, $6, $7, false)",
                [room] * len(ks),
                [channel_for(room)] * len(ks),
                [f"u{k % 10}" for k in ks],
                [f"message {k} of {room}, with some text to make it a message" for k in ks],
                [f"t{k}" for k in ks],
                [None] * len(ks),
                [None] * len(ks),
            )
    finally:
        await conn.close()


async def post_mixed(ctx: Context, target: Target, room: str, n: int) -> Counter[str]:
    """``n`` items of mixed kinds over REST (the service's own paths), on the room's texts
    ``1..n`` (text k by ``u{k % 10}``): of every ten, three reactions set, two taken back,
    three edits, one delete and one member joining or leaving. Each must store exactly one
    item: the room then ends at ``2n``."""
    clients: dict[str, HttpClient] = {}

    async def call(user: str, method: str, path: str, body: Any = None) -> None:
        http = clients.get(user)
        if http is None:
            headers = {"authorization": f"Bearer {ctx.token(user)}"}
            headers["content-type"] = "application/json"
            http = clients[user] = await HttpClient.open(target.http[0], headers)
        content = b"" if body is None else json.dumps(body).encode()
        status, reply = await http.request(method, f"/rooms/{room}{path}", content)
        if status not in (200, 201, 204):
            raise HarnessError(f"{method} {path} as {user}: {status} {reply[:200]!r}")

    tenth = max(1, n // 10)
    deletable = list(range(n, n - tenth, -1))  # the newest texts: never edited nor reacted to
    editable = n - tenth
    reactions: list[tuple[str, int, str]] = []  # set and not yet taken back
    joined: list[str] = []
    emoji = ("%F0%9F%91%8D", "%E2%9D%A4%EF%B8%8F", "%F0%9F%8E%89", "%F0%9F%98%82")
    posted: Counter[str] = Counter()
    try:
        for e in range(n):
            slot = e % 10
            if slot in (0, 1, 5) or (slot in (2, 8) and not reactions):
                who, seq, what = f"r{e % 7}", 1 + (e * 7) % editable, emoji[e % 4]
                if (who, seq, what) in reactions:
                    what = emoji[(e + 1) % 4]
                    if (who, seq, what) in reactions:
                        who = f"r{e}"
                await call(who, "PUT", f"/messages/{seq}/reactions/{what}")
                reactions.append((who, seq, what))
                posted["reaction on"] += 1
            elif slot in (2, 8):
                who, seq, what = reactions.pop(0)
                await call(who, "DELETE", f"/messages/{seq}/reactions/{what}")
                posted["reaction off"] += 1
            elif slot in (3, 4, 9):
                seq = 1 + (e * 13) % editable
                body = {"body": f"edited {e}: message {seq}, now with @u{e % 10} in it"}
                await call(f"u{seq % 10}", "PATCH", f"/messages/{seq}", body)
                posted["edit"] += 1
            elif slot == 6 and deletable:
                seq = deletable.pop(0)
                await call(f"u{seq % 10}", "DELETE", f"/messages/{seq}")
                posted["delete"] += 1
            elif joined and e % 20 == 17:
                who = joined.pop()
                await call(who, "DELETE", f"/members/{who}")
                posted["member left"] += 1
            else:
                who = f"j{e}"
                await call(who, "PUT", f"/members/{who}", {"role": "member"})
                joined.append(who)
                posted["member joined"] += 1
    finally:
        for http in clients.values():
            http.close()
    return posted


# -- presence -----------------------------------------------------------------------------------

PRESENCE_INTERVAL = 1.0
PRESENCE_GRACE = 5.0
"""The service's ``CHAT_PRESENCE_INTERVAL`` and ``CHAT_PRESENCE_GRACE`` when not given."""
PRESENCE_SLACK = 1.5
"""Seconds a change may take to reach a socket besides the interval: the writer gathers
changes for 0.25 s (``presence.FLUSH_INTERVAL``), then a commit, a NOTIFY, the frame's send."""


async def presence(ctx: Context, target: Target) -> dict[str, Any]:
    """One room, ``--connections`` users with one socket each, alternately on each server.

    ``arrive``: every user connects for the first time, at a paced rate over ``--window``
    seconds: each arrival is a real change. ``quiet``: the CPU spent with every socket open and
    nothing happening (pings, presence heartbeats), a few seconds. ``reconnect`` (a
    deploy): each socket closes and its user connects again at once to the other server, the
    closes paced over ``--window``: no presence changes (the grace covers them), so no frame.
    Each phase is measured from its first connect until ``grace`` (reconnect) plus two
    intervals and ``PRESENCE_SLACK`` after the last ``ready``: every frame it causes, late
    departures included. Per phase: presence frames per user (both sockets of a reconnect),
    the shortest gap between two presence frames on one socket (the interval, unless frames
    queued while the socket connected or fell behind), and the CPU seconds the servers,
    PostgreSQL and the generator spent.
    """
    args = ctx.args
    interval = args.presence_interval or PRESENCE_INTERVAL
    grace = PRESENCE_GRACE if args.presence_grace is None else args.presence_grace
    n, servers = args.connections, len(target.ws)
    await ctx.warm_up(target, "presence", min(args.concurrency, 20))
    peers = make_peers(ctx, target, "presence", 1, n)
    moved = [Peer(p.room, 0, target.ws[(j + 1) % servers], p.token) for j, p in enumerate(peers)]
    tail = 2 * interval + PRESENCE_SLACK
    result: dict[str, Any] = {
        "sockets": n,
        "users": len({p.token for p in peers}),
        "servers": servers,
        "window_s": args.window,
        "interval_s": interval,
        "grace_s": grace,
    }
    try:
        log(f"{target.name}: {n} new users arrive within {args.window:g}s")
        result["arrive"] = await presence_phase(ctx, target, peers, [], tail, interval)
        log(f"{target.name}: quiet for {tail:g}s")
        meter, before = ctx.meter(target), server_cpu(target)
        heard = sum(p.presence_heard for p in peers)
        meter.start()
        await asyncio.sleep(tail)
        cores = meter.stop()
        result["quiet"] = {
            "measured_s": tail,
            "presence_frames": sum(p.presence_heard for p in peers) - heard,
            **cpu_figures(target, before, cores, tail),
        }
        for peer in peers:
            reset_presence(peer)
        log(f"{target.name}: {n} users reconnect to the other server within {args.window:g}s")
        result["reconnect"] = await presence_phase(
            ctx, target, moved, peers, grace + tail, interval
        )
        result["still_open"] = still_open(moved)
    finally:
        await close_all(peers)
        await close_all(moved)
    for phase in ("arrive", "reconnect"):
        got = result[phase]
        if got["connect_failures"]:
            ctx.violations.append(f"{phase}: connects failed {got['connect_failures']}")
        if got["error_frames"]:
            ctx.violations.append(f"{phase}: error frames {got['error_frames']}")
        bound, most = got["presence_frames_bound"], got["presence_frames_per_user"]["max"]
        if bound is not None and most > bound:
            ctx.violations.append(f"{phase}: a user got {most} presence frames (bound {bound})")
    if result["still_open"] != n:
        ctx.violations.append(f"{n - result['still_open']} sockets closed after the reconnect")
    return result


def reset_presence(peer: Peer) -> None:
    peer.presence_heard = peer.presence_bytes = 0
    peer.presence_last, peer.presence_min_gap = 0.0, math.inf


def server_cpu(target: Target) -> float:
    return sum(cpu_seconds(pid) for pid in target.pids)


def cpu_figures(
    target: Target, servers_before: float, cores: dict[str, float], seconds: float
) -> dict[str, Any]:
    """CPU seconds: the servers' exactly, the others from the meter's average cores."""
    return {
        "servers_cpu_s": round(server_cpu(target) - servers_before, 2),
        "postgres_cpu_s": round(cores["postgres"] * seconds, 2),
        "generator_cpu_s": round(cores["generator"] * seconds, 2),
        "others_cores": cores["others"],
    }


async def presence_phase(
    ctx: Context,
    target: Target,
    opening: list[Peer],
    closing: list[Peer],
    tail: float,
    interval: float,
) -> dict[str, Any]:
    """Socket ``k`` opens at ``k * window / n`` (after ``closing[k]`` closed, if any), open
    loop; then ``tail`` seconds for the frames that follow."""
    args = ctx.args
    n = len(opening)
    period = args.window / n
    times: list[float] = []
    failures: Counter[str] = Counter()
    meter, before = ctx.meter(target), server_cpu(target)
    meter.start()
    t0 = perf() + 0.01

    async def one(k: int) -> None:
        delay = t0 + k * period - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        if closing:
            await closing[k].close()
        peer = opening[k]
        try:
            times.append(await peer.open(deflate=args.deflate, history=0))
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failures[type(exc).__name__] += 1
            await peer.close()

    await asyncio.gather(*(one(k) for k in range(n)))
    storm = perf() - t0
    await asyncio.sleep(tail)
    seconds = perf() - t0
    cores = meter.stop()
    per_user = [
        opening[k].presence_heard + (closing[k].presence_heard if closing else 0) for k in range(n)
    ]
    sockets = [*opening, *closing]
    gaps = [p.presence_min_gap for p in sockets if p.presence_min_gap != math.inf]
    counts = [p.ready_frame["presence"]["count"] for p in opening if "presence" in p.ready_frame]
    errors: Counter[str] = Counter()
    for peer in sockets:
        errors.update(peer.errors_heard)
    return {
        "connects": len(times),
        "connect_failures": dict(failures),
        "window_target_s": args.window,
        "window_s": round(storm, 2),
        "measured_s": round(seconds, 2),
        "connect_ready_ms": percentiles(times),
        "presence_frames_per_user": {
            "p50": lower_median(per_user),
            "p99": sorted(per_user)[max(0, math.ceil(0.99 * n) - 1)],
            "max": max(per_user),
            "none": per_user.count(0),
        },
        # Arrivals: one frame at once, then at most one per interval while changes come (the
        # window, and up to an interval late): a bound by the interval, whatever the users.
        "presence_frames_bound": None if closing else 2 + math.ceil(storm / interval),
        "presence_frames": sum(per_user),
        "presence_kb": round(sum(p.presence_bytes for p in sockets) / 1024, 1),
        "presence_min_gap_ms": round(min(gaps) * 1000, 1) if gaps else None,
        "ready_count": {"min": min(counts), "max": max(counts)} if counts else None,
        "error_frames": dict(errors),
        **cpu_figures(target, before, cores, seconds),
    }


# -- reporting ----------------------------------------------------------------------------------


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def ratios(chat: dict[str, Any], trivial: dict[str, Any]) -> dict[str, float]:
    """chat-service / trivial for every numeric figure both have (latency ratio > 1: slower)."""
    c, t = flatten(chat), flatten(trivial)
    both = (k for k in c if _number(c[k]) and _number(t.get(k)) and t[k])
    return {k: round(c[k] / t[k], 3) for k in both}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


SHOWN = {
    "fanout": [
        "sent", "acked", "delivered", "lost", "duplicated", "out_of_order", "disconnected",
        "send_rate", "deliveries_per_s", "latency_ms.p50", "latency_ms.p90", "latency_ms.p99",
        "latency_ms.max", "ack_latency_ms.p50", "ack_latency_ms.p99", "send_lag_ms.p99",
        "connect_ready_ms.p50", "connect_ready_ms.p99", "cpu_cores.generator",
        "cpu_cores.servers", "cpu_cores.postgres", "cpu_cores.others",
    ],
    "saturate": ["sustained_rate", "sustained_deliveries_per_s", "sustained_p99_ms",
                 "sustained_cpu_cores.generator", "sustained_cpu_cores.servers",
                 "sustained_cpu_cores.postgres", "sustained_cpu_cores.others", "connections",
                 "connect_ready_ms.p50"],
    "idle": ["connections", "still_open", "open_seconds", "connect_ready_ms.p50",
             "connect_ready_ms.p99", "rss_before_kb", "rss_after_kb", "rss_after_close_kb",
             "rss_per_connection_kb"],
    "history": [f"{k}.{q}" for k in (
        "ws_connect_history50", "ws_resume_since500", "rest_before_start", "rest_before_middle",
        "rest_before_end", "rest_after_start", "rest_after_middle", "rest_after_end",
    ) for q in ("p50", "p99")] + ["rest_worst_p99_ms", "rest_page_cpu_us.servers",
                                  "rest_page_cpu_us.postgres", "rest_page_cpu_us.generator",
                                  "seed_seconds"],
    "rest": ["requests", "created", "requests_per_s", "latency_ms.p50", "latency_ms.p90",
             "latency_ms.p99", "latency_ms.max", "cpu_cores.generator", "cpu_cores.servers",
             "cpu_cores.postgres", "cpu_cores.others"],
    "roomlist": ["messages", "rooms", "other_rooms", "seed_seconds", "unread_total",
                 "mentions_total", "big_room.unread", "big_room.mentions",
                 "read_state_mismatches"] + [f"{k}.{q}" for k in ("room_list", "big_room_get")
                 for q in ("p50", "p90", "p99", "max")] + [
                 "room_list_cpu_us.servers", "room_list_cpu_us.postgres",
                 "room_list_cpu_us.generator"],
    "resume": ["missed", "seed_seconds", "replayed_kb.resume_texts", "replayed_kb.resume_mixed"]
              + [f"{k}.{q}" for k in ("resume_texts", "resume_mixed")
                 for q in ("p50", "p90", "p99", "max")]
              + ["mixed_over_texts.p50", "mixed_over_texts.p99"],
    "presence": ["sockets", "users", "servers", "interval_s", "grace_s"] + [
        f"{phase}.{k}" for phase in ("arrive", "reconnect") for k in (
            "window_target_s", "window_s", "measured_s", "connects", "connect_ready_ms.p50",
            "connect_ready_ms.p99", "presence_frames_per_user.p50",
            "presence_frames_per_user.max", "presence_frames_per_user.none",
            "presence_frames_bound", "presence_frames", "presence_kb", "presence_min_gap_ms",
            "ready_count.min", "ready_count.max", "servers_cpu_s", "postgres_cpu_s",
            "generator_cpu_s", "others_cores")
    ] + ["quiet.measured_s", "quiet.presence_frames", "quiet.servers_cpu_s",
         "quiet.postgres_cpu_s"],
}  # fmt: skip
STREAM_SHOWN = [
    "gaps", "stream_behind", "reads_sent", "read_frames_received", "receipts_received",
    "reactions_sent", "reaction_items", "reaction_noops", "reactions_unanswered",
    "reaction_items_per_receiver.min", "reaction_items_per_receiver.max",
    "reaction_items_per_receiver.missing", "typing_users", "typing_sent", "typing_rejected",
    "typing_frames_received",
]  # fmt: skip
"""fanout's rows for the stream checks and the reads and reactions (when there are some)."""
SHOWN["fanout"][7:7] = STREAM_SHOWN


def table(scenario: str, report: dict[str, Any]) -> str:
    chat = flatten(report.get("chat", {}))
    trivial = flatten(report.get("trivial", {}))
    ratio = report.get("ratio", {})
    rows = [("figure", "chat-service", "trivial", "ratio")]
    for key in SHOWN[scenario]:
        if key not in chat and key not in trivial:
            continue
        rows.append((key, fmt(chat.get(key)), fmt(trivial.get(key)), fmt(ratio.get(key))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    if report.get("rounds"):
        figure = ".".join(ROUND_FIGURE[scenario])
        lines.append(f"\nrounds ({figure}; the table shows the median round of each target):")
        ratios_ = report.get("round_ratios") or []
        for k, both in enumerate(report["rounds"]):
            cells = [f"{name} {fmt(round_figure(scenario, both[name]))}" for name in both]
            ratio = f", ratio {fmt(ratios_[k])}" if k < len(ratios_) else ""
            lines.append(f"  {k + 1}: " + ", ".join(cells) + ratio)
        if "median_round_ratio" in report:
            lines.append(f"  median of the round ratios: {fmt(report['median_round_ratio'])}")
    if scenario == "saturate":
        for name in ("trivial", "chat"):
            steps = report.get(name, {}).get("steps", [])
            if steps:
                lines.append(f"\n{name} steps (msg/s -> deliveries/s, p99 ms, lost):")
                lines += [
                    f"  {s['rate_target']:>7g} -> {s['deliveries_per_s']:>9g}/s  "
                    f"p99 {s['latency_ms']['p99']}  lost {s['lost']}"
                    + ("" if s["sustained"] else "  (not sustained)")
                    + ("  (refining)" if s.get("refinement") else "")
                    for s in steps
                ]
                lines.append(f"  stop: {report[name]['stop_reason']}")
    profile = report.get("chat", {}).get("profile")
    if profile and "self_pct" in profile:
        lines.append(
            f"\nprofile of one chat-service process, main thread "
            f"({profile['main_thread_seconds']} s sampled busy):"
        )
        lines += [f"  {pct:5.1f}% self       {name}" for name, pct in profile["self_pct"][:12]]
        lines += [f"  {pct:5.1f}% inclusive  {name}" for name, pct in profile["inclusive_pct"][:12]]
        lines += ["  by package (self): " + ", ".join(
            f"{name} {pct}%" for name, pct in profile["package_self_pct"][:8])]  # fmt: skip
    if report.get("targets"):
        lines.append("\ntargets:")
        for name, t in report["targets"].items():
            verdict = "met" if t["met"] else "NOT met"
            lines.append(f"  {name}: {t['value']} (target {t['target']}) {verdict}")
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def assess(scenario: str, report: dict[str, Any]) -> dict[str, Any]:
    chat = report.get("chat", {})
    out: dict[str, Any] = {}

    def check(name: str, value: Any, target: float, higher_is_better: bool = False) -> None:
        met = value is not None and (value >= target if higher_is_better else value <= target)
        out[name] = {"value": value, "target": target, "met": bool(met)}

    if scenario == "fanout":
        lossless = not any(r.get("chat", {}).get("lost") for r in report.get("rounds", [report]))
        check("latency p99 ms (zero loss)", chat.get("latency_ms", {}).get("p99")
              if lossless else None, TARGETS["fanout_p99_ms"])  # fmt: skip
    elif scenario == "saturate" and "ratio" in report:
        ratio = report.get("median_round_ratio", report["ratio"].get("sustained_rate", 0.0))
        check("sustained rate / trivial", ratio, TARGETS["saturate_ratio"],
              higher_is_better=True)  # fmt: skip
    elif scenario == "idle":
        check("RSS per connection kB", chat.get("rss_per_connection_kb"),
              TARGETS["idle_rss_per_connection_kb"])  # fmt: skip
        check("idle connections on one process", chat.get("still_open"),
              TARGETS["idle_connections"], higher_is_better=True)  # fmt: skip
    elif scenario == "roomlist":
        check("GET /rooms?mine=true p99 ms", chat.get("room_list", {}).get("p99"),
              TARGETS["roomlist_p99_ms"])  # fmt: skip
    elif scenario == "history":
        check("worst REST page p99 ms", chat.get("rest_worst_p99_ms"),
              TARGETS["history_rest_p99_ms"])  # fmt: skip
        check(
            "connect with 50 replayed p99 ms",
            chat.get("ws_connect_history50", {}).get("p99"),
            TARGETS["history_connect_p99_ms"],
        )
    return out


RUNNERS: dict[str, Callable[[Context, Target], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "saturate": saturate,
    "idle": idle,
    "history": history,
    "rest": rest,
    "roomlist": roomlist,
    "resume": resume,
    "presence": presence,
}


async def run_scenario(ctx: Context) -> dict[str, Any]:
    scenario = ctx.args.scenario
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    loop.add_signal_handler(signal.SIGTERM, main.cancel)
    report: dict[str, Any] = {}
    try:
        async with asyncio.timeout(ctx.args.timeout):
            log(f"starting the servers ({ctx.args.servers} chat-service process(es) + trivial)")
            await start_targets(ctx)
            rounds = ctx.args.rounds
            results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in ctx.targets}
            for ctx.round in range(rounds):
                for target in ctx.targets:  # the trivial server first: it warms the generator up
                    which = f" (round {ctx.round + 1} of {rounds})" if rounds > 1 else ""
                    log(f"{scenario} on {target.name}{which}")
                    results[target.name].append(await RUNNERS[scenario](ctx, target))
    finally:
        await ctx.harness.stop_all()
        loop.remove_signal_handler(signal.SIGTERM)
    for name, runs in results.items():
        report[name] = median_round(scenario, runs)
    if rounds > 1:
        report["rounds"] = [{name: got[k] for name, got in results.items()} for k in range(rounds)]
    return report


ROUND_FIGURE = {"fanout": ("latency_ms", "p99"), "saturate": ("sustained_rate",)}
"""What orders the rounds of a scenario: the median round is reported."""


def round_figure(scenario: str, result: dict[str, Any]) -> float:
    value: Any = result
    for key in ROUND_FIGURE.get(scenario, ()):
        value = value.get(key) if isinstance(value, dict) else None
    return float("inf") if value is None else float(value)


def lower_median(values: list[Any], key: Callable[[Any], Any] = lambda v: v) -> Any:
    """The median of an odd count, the lower of the two middle values of an even one."""
    return sorted(values, key=key)[(len(values) - 1) // 2]


def median_round(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median figure."""
    if len(runs) == 1:  # every scenario; only fanout and saturate have a figure to order by
        return runs[0]
    return lower_median(runs, key=lambda run: round_figure(scenario, run))


def round_ratios(scenario: str, rounds: list[dict[str, Any]]) -> list[float]:
    """chat-service / trivial of each round, both measured back to back."""
    out = []
    for both in rounds:
        if "chat" in both and "trivial" in both:
            trivial = round_figure(scenario, both["trivial"])
            if trivial not in (0.0, float("inf")):
                out.append(round(round_figure(scenario, both["chat"]) / trivial, 3))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults per scenario: " + json.dumps(DEFAULTS) + "\n--tiny: " + json.dumps(TINY),
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--tiny", action="store_true", help="a size that completes in seconds (CI)")
    p.add_argument("--json", metavar="PATH", help="write the report here ('-': stdout)")
    p.add_argument("--database-url", help="an existing (empty) database; default: embedded")
    p.add_argument("--servers", type=int, help="chat-service processes")
    p.add_argument("--rooms", type=int, help="roomlist: the user's rooms (as many others)")
    p.add_argument("--connections", type=int, help="per room (fanout, saturate) or total (idle)")
    p.add_argument("--senders", type=int)
    p.add_argument("--rate", type=float, help="fanout: messages/s in total")
    p.add_argument("--duration", type=float, help="seconds measured")
    p.add_argument("--warmup", type=float, help="seconds of unmeasured load first")
    p.add_argument("--drain", type=float, help="seconds to wait for late deliveries")
    p.add_argument("--rates", help="saturate: first steps, messages/s, comma-separated")
    p.add_argument("--rate-increment", type=float, help="saturate: step after the listed ones")
    p.add_argument("--max-rate", type=float, help="saturate: last step")
    p.add_argument("--step-seconds", type=float, help="saturate: length of a step")
    p.add_argument("--p99-limit", type=float, help="saturate: ms; a step above it fails")
    p.add_argument("--refine", type=int, help="saturate: bisections after the first failed step")
    p.add_argument("--settle", type=float, help="idle: seconds before reading RSS")
    p.add_argument(
        "--messages",
        type=int,
        help="history: messages in the room; roomlist: items in the database; resume: missed",
    )
    p.add_argument("--reps", type=int, help="history, roomlist, resume: measurements of each")
    p.add_argument("--clients", type=int, help="rest: concurrent HTTP clients")
    p.add_argument(
        "--read-rate",
        type=float,
        default=0.0,
        help="fanout, saturate: read frames per second per connection (0: none); the rooms are "
        "then made with every connection's user a member",
    )
    p.add_argument(
        "--reaction-rate",
        type=float,
        default=0.0,
        help="fanout, saturate: react frames per second in total, from the senders (0: none)",
    )
    p.add_argument(
        "--typing-users",
        type=int,
        default=0,
        help="fanout, saturate: users of each room (its first connections) sending a typing "
        "frame every 2-3 s, jittered (0: none)",
    )
    p.add_argument(
        "--webhook-delay",
        type=float,
        help="fanout, saturate: a webhook receiver (CHAT_WEBHOOK_URL) that answers each item "
        "after this many seconds",
    )
    p.add_argument("--window", type=float, help="presence: seconds the arrivals take")
    p.add_argument(
        "--presence-interval",
        type=float,
        help="CHAT_PRESENCE_INTERVAL for the servers (default: theirs, 1 s)",
    )
    p.add_argument(
        "--presence-grace", type=float, help="CHAT_PRESENCE_GRACE for the servers (default: 5 s)"
    )
    p.add_argument("--body-chars", type=int, default=100, help="message body length")
    p.add_argument("--concurrency", type=int, help="websocket handshakes at once")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    p.add_argument("--db-pool-size", type=int, help="CHAT_DB_POOL_SIZE for the servers")
    p.add_argument("--log-level", default="info", help="the servers' --log-level")
    p.add_argument("--profile", metavar="PATH", help="fanout: py-spy speedscope of server 0")
    p.add_argument("--only", choices=("chat", "trivial"), help="measure one target only")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio in the generator")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    p.add_argument("--timeout", type=float, help="seconds for the whole scenario")
    p.add_argument("--rounds", type=int, default=1, help="fanout, saturate: alternate N times")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    values = {**DEFAULTS[args.scenario], **(TINY[args.scenario] if args.tiny else {})}
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.timeout is None:
        args.timeout = (120.0 if args.tiny else 1800.0) * args.rounds
    if args.rounds < 1 or (args.rounds > 1 and args.scenario not in ROUND_FIGURE):
        raise SystemExit("--rounds: a positive count, and more than 1 for fanout or saturate only")
    if args.scenario in CHAT_ONLY:
        if args.only == "trivial":
            raise SystemExit(f"{args.scenario} measures chat-service only")
        args.only = "chat"
    extras = args.read_rate or args.reaction_rate or args.typing_users
    if (extras or args.webhook_delay is not None) and args.scenario not in ROUND_FIGURE:
        raise SystemExit(
            "--read-rate, --reaction-rate, --typing-users, --webhook-delay: fanout and saturate"
        )
    if args.webhook_delay is not None and not 0 <= args.webhook_delay <= 60:
        raise SystemExit("--webhook-delay: 0 to 60 seconds")
    if args.read_rate < 0 or args.reaction_rate < 0 or args.typing_users < 0:
        raise SystemExit("--read-rate, --reaction-rate and --typing-users: 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    rlimit = raise_nofile()  # before any child is spawned: they inherit it
    if args.scenario == "idle" and args.connections + 200 > rlimit["soft"]:
        log(f"warning: {args.connections} connections need more than RLIMIT_NOFILE {rlimit}")
    harness = Harness(database_url=args.database_url, keep_logs=args.keep_logs)
    ctx = Context(args, harness)
    report: dict[str, Any] = {
        "scenario": args.scenario,
        "command": " ".join(["python -m benchmarks.bench", *(argv or sys.argv[1:])]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "rlimit_nofile": rlimit,
        "params": {k: v for k, v in vars(args).items() if k != "database_url"},
        "database": "given" if args.database_url else "embedded (fsync on)",
    }
    code = 0
    if "process_round_trip_us" in report["machine"]:
        rtt = report["machine"]["process_round_trip_us"]
        log(f"this box: a process round trip takes p50 {rtt['p50']:.0f} / p99 {rtt['p99']:.0f} µs")
    try:
        log("starting the database" if not args.database_url else "migrating the database")
        harness.start_database()
        results = run_async(ctx, uvloop=not args.no_uvloop)
        report.update(results)
        if "chat" in results and "trivial" in results:
            report["ratio"] = ratios(results["chat"], results["trivial"])
            if "rounds" in results:
                report["round_ratios"] = round_ratios(args.scenario, results["rounds"])
                report["median_round_ratio"] = lower_median(report["round_ratios"])
        report["targets"] = assess(args.scenario, report)
        report["violations"] = ctx.violations
        code = 1 if ctx.violations else 0
    except (HarnessError, TimeoutError, asyncio.CancelledError, KeyboardInterrupt) as exc:
        harness.failed = True
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            report["error"] = "interrupted (SIGTERM or Ctrl-C)"
        elif isinstance(exc, TimeoutError):
            report["error"] = f"the scenario took longer than --timeout {args.timeout:g}s"
        else:
            report["error"] = f"{type(exc).__name__}: {exc}"
        report["violations"] = ctx.violations
        log(f"failed: {report['error']}")
        code = 2
    except Exception as exc:
        harness.failed = True
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        harness.close()
        write_json(args, report)
    if code != 2:
        print(table(args.scenario, report))
    if ctx.violations:
        log("violations: " + "; ".join(ctx.violations))
    return code


def run_async(ctx: Context, *, uvloop: bool) -> dict[str, Any]:
    if uvloop:
        with contextlib.suppress(ImportError):
            import uvloop as _uvloop  # noqa: PLC0415 - optional: faster generator

            return _uvloop.run(run_scenario(ctx))
    return asyncio.run(run_scenario(ctx))


def write_json(args: argparse.Namespace, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, default=str)
    if args.json == "-":
        print(text)
        return
    path = Path(args.json or Path(tempfile.gettempdir()) / f"chat-bench-{args.scenario}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    log(f"report written to {path}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
