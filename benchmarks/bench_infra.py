"""What a benchmark or soak run starts besides its clients: PostgreSQL, servers, their cleanup;
and what it reads from /proc (CPU per process group, RSS, the machine).

Everything listens on 127.0.0.1. Every child process gets ``PR_SET_PDEATHSIG`` (SIGKILL) so
that nothing outlives the benchmark, even when the benchmark itself is killed; the embedded
PostgreSQL has its own equivalent (``service.db.embedded``). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.bench_client import percentiles
from service.config import to_asyncpg_dsn

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class HarnessError(RuntimeError):
    """The benchmark could not set itself up (not a finding about the service)."""


def _die_with_parent() -> None:
    """``preexec_fn``: the child is SIGKILLed when the benchmark dies, even by SIGKILL."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children spawned later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": int(soft), "hard": int(hard)}


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for pid {pid}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (PostgreSQL's backends are children of the postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


class CpuMeter:
    """Average cores used by groups of processes between ``start`` and ``stop``."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning the pids to count (read at start)
        self.pids: dict[str, list[int]] = {}
        self.before: dict[str, Any] = {}
        self.started = 0.0

    def _sample(self, name: str) -> Any:
        if name not in ("machine", "generator"):
            return {pid: cpu_seconds(pid) for pid in self.pids[name]}
        if name == "machine":
            with contextlib.suppress(OSError):
                ticks = [
                    int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
                ]
                return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # all but idle and iowait
            return 0.0
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        self.pids = {name: list(get()) for name, get in self.groups.items()}
        self.started = time.monotonic()
        self.before = {name: self._sample(name) for name in [*self.groups, "machine"]}

    def stop(self) -> dict[str, float]:
        """Cores per group, and ``others``: what the rest of the machine used meanwhile."""
        wall = max(time.monotonic() - self.started, 1e-9)
        used = {}
        for name, before in self.before.items():
            if isinstance(before, dict):
                # Per pid: a process that exited meanwhile is left out, one that started
                # meanwhile (a new database connection) counts from its start.
                self.pids[name] = sorted({*self.pids[name], *self.groups[name]()})
                after = self._sample(name)
                spent = sum(max(0.0, t - before.get(p, 0.0)) for p, t in after.items() if t > 0)
            else:
                spent = self._sample(name) - before
            used[name] = spent / wall
        machine = used.pop("machine")
        used["others"] = max(0.0, machine - sum(used.values()))
        return {name: round(value, 2) for name, value in used.items()}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["process_round_trip_us"] = process_round_trip()
    return info


_ECHO = (
    "import socket, sys\n"
    "s = socket.socket(fileno=int(sys.argv[1]))\n"
    "while d := s.recv(64): s.send(d)"
)


def process_round_trip(count: int = 2000) -> dict[str, float | None]:
    """A one-byte ping-pong with another process over a socketpair, pausing 1 ms every ten so
    the CPUs can go idle, as between messages: what one wake-up of another process costs on
    this box, and how long its tail is. A message to chat-service crosses several processes."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    times = []
    try:
        ours.settimeout(5)
        for i in range(count):
            started = time.perf_counter()
            ours.send(b"x")
            ours.recv(64)
            times.append(time.perf_counter() - started)
            if i % 10 == 9:
                time.sleep(0.001)
    finally:
        ours.close()
        child.wait(5)
    return percentiles(times, scale=1e6)


class Process:
    """A child process with a log file, a health check over HTTP and a bounded stop."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # the main thread forks: see PR_SET_PDEATHSIG
            )

    async def wait_http(self, url: str, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        raise HarnessError(f"{self.name} did not start (log {self.log_path}):\n{tail}")

    async def stop(self, sig: int = signal.SIGTERM, within: float = STOP_TIMEOUT) -> int | None:
        """Signal, wait up to ``within``, then SIGKILL. Returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        deadline = time.monotonic() + within
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                deadline = time.monotonic() + within
            await asyncio.sleep(0.02)
        return proc.returncode

    def kill_now(self) -> None:
        """Synchronous last resort (``finally``): nothing outlives the benchmark."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


class Server(Process):
    """``command --port P`` on a free loopback port (and ``--http-port Q`` on another with
    ``http_port``), started once its ``/healthz`` answers. A restart keeps the ports."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_path: Path, *,
        http_port: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(name, command, env, log_path)
        self.command = command
        self.port = free_port()
        self.http_port = free_port() if http_port else None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port or self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.argv = [*self.command, "--port", str(self.port)]
        if self.http_port:
            self.argv += ["--http-port", str(self.http_port)]
        self.spawn()
        await self.wait_http(f"{self.http}/healthz")


class Harness:
    """Owns the temporary folders, the database and every child process of one run."""

    def __init__(self, *, database_url: str | None, keep_logs: bool, name: str = "bench") -> None:
        self.given_url = database_url
        self.keep_logs = keep_logs
        self.name = name
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"chat-{name}-"))
        self.pg_dir: Path | None = None
        self.embedded: Any = None
        self.postmaster_pid: int | None = None
        self.database_url = ""
        self.processes: list[Process] = []
        self.failed = False

    # -- database (synchronous: before and after the event loop) --------------------------------

    def start_database(self) -> str:
        from service.db.migrate import upgrade  # noqa: PLC0415 - alembic is slow to import

        if self.given_url:
            self.database_url = self.given_url
        else:
            from service.db.embedded import EmbeddedPostgres  # noqa: PLC0415

            # Its own mkdtemp: as root PostgreSQL runs as an unprivileged user, who must reach it.
            self.pg_dir = Path(tempfile.mkdtemp(prefix=f"chat-{self.name}-pg-"))
            self.embedded = EmbeddedPostgres(self.pg_dir, database="chat")
            self.database_url = self.embedded.start(timeout=START_TIMEOUT * 2)
            # PostgreSQL's own record of its pid: no reliance on EmbeddedPostgres's internals.
            pidfile = self.embedded.pgdata / "postmaster.pid"
            self.postmaster_pid = int(pidfile.read_text().split("\n", 1)[0])
        upgrade(self.database_url)
        return self.database_url

    def postgres_pids(self) -> list[int]:
        """The embedded postmaster and its backends (none for a given database)."""
        pid = self.postmaster_pid
        if pid is None or not Path(f"/proc/{pid}").exists():
            return []
        return [pid, *children(pid)]

    @property
    def dsn(self) -> str:
        return to_asyncpg_dsn(self.database_url)

    def close(self) -> None:
        for process in self.processes:
            process.kill_now()
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                self.embedded.stop()
        if self.pg_dir is not None:
            shutil.rmtree(self.pg_dir, ignore_errors=True)
        if self.failed or self.keep_logs:
            print(f"server logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    # -- processes -----------------------------------------------------------------------------

    def server_env(self, secret: str, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        env.update(
            {
                "CHAT_DATABASE_URL": self.database_url,
                "CHAT_JWT_SECRET": secret,
                "CHAT_DEV_AUTH": "false",
                # A benchmark is a flood by design: lift the per-connection and per-user limits.
                "CHAT_SEND_RATE": "100000",
                "CHAT_USER_SEND_RATE": "100000",
                "CHAT_MAX_CONNECTIONS_PER_USER": "100000",
                "CHAT_OUTBOX_LIMIT": "100000",
                "CHAT_WS_CONNECT_RATE": "100000",
                "CHAT_WS_CONNECT_BURST": "100000",
                "CHAT_WS_REPLAY_BUDGET": str(2**40),
                "CHAT_WS_PING_RATE": "100000",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def start_chat_servers(
        self, count: int, secret: str, *, log_level: str, extra_env: dict[str, str]
    ) -> list[Server]:
        env = self.server_env(secret, extra_env)
        command = [sys.executable, "-m", "service", "--log-level", log_level, "serve"]
        servers = [
            Server(f"chat-{i}", command, env, self.log_path(f"chat-{i}")) for i in range(count)
        ]
        self.processes.extend(servers)
        await asyncio.gather(*(s.start() for s in servers))
        return servers

    async def start_webhook_sink(self, delay: float) -> str:
        """A receiver answering each webhook after ``delay`` s (``webhook_sink``): its URL."""
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.webhook_sink", "--delay", str(delay)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        sink = Process("webhook-sink", [*command, "--port", str(port)], env, self.log_path("sink"))
        self.processes.append(sink)
        sink.spawn()
        await sink.wait_http(f"http://127.0.0.1:{port}/")
        return f"http://127.0.0.1:{port}/hook"

    async def start_trivial(self, secret: str, *, uvloop: bool) -> Server:
        env = {**os.environ, "CHAT_JWT_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "benchmarks.trivial_server"]
        command += [] if uvloop else ["--no-uvloop"]
        server = Server("trivial", command, env, self.log_path("trivial"), http_port=True)
        self.processes.append(server)
        await server.start()
        return server

    def spawn(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, dict(os.environ), self.log_path(name))
        self.processes.append(process)
        process.spawn()
        return process

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.processes), return_exceptions=True)


async def _all_visible(conn: asyncpg.Connection, tables: tuple[str, ...]) -> None:
    """Log how much of each table VACUUM left all-visible: index-only scans read the heap for
    the rest (a live service's newest rows; on the embedded server the seeded mentions, for a
    reason not found yet), which the room list's figures depend on."""
    rows = await conn.fetch(
        "SELECT relname, relpages, relallvisible FROM pg_class WHERE relname = ANY($1)",
        list(tables),
    )
    for name, pages, visible in rows:
        print(f"[seed] {name}: {visible} of {pages} pages all-visible", file=sys.stderr)


FLUSH_THE_COMMIT = "SET LOCAL synchronous_commit = on"
"""The last statement of a seeding transaction (the rest runs with ``synchronous_commit =
off``): VACUUM cannot mark a page all-visible while the commit of its rows is not flushed
(it may not set their hint bits yet), so right after an asynchronous commit it leaves the
whole table not all-visible, and every index-only scan then reads the heap (the room list's
count of deleted texts did: 12 ms instead of 3 at 1M)."""


async def seed_history(dsn: str, room: str, count: int) -> float:
    """A room holding messages 1..count, inserted with one INSERT ... SELECT; returns seconds."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SET synchronous_commit = off")
        async with conn.transaction():
            room_id = await conn.fetchval(
                "INSERT INTO room (name, last_seq, text_count) VALUES ($1, $2, $2) RETURNING id",
                room,
                count,
            )
            await conn.execute(  # every item a text: text_no is the seq (migration 0007)
                "INSERT INTO message (room_id, seq, author, body, text_no) "
                "SELECT $1, g, 'u' || (g % 10), 'message body ' || g, g "
                "FROM generate_series(1, $2::bigint) AS g",
                room_id,
                count,
            )
            await conn.execute(FLUSH_THE_COMMIT)
        # So that autovacuum does not start in the middle of the measurements.
        await conn.execute("VACUUM (ANALYZE) message")
        await conn.execute("VACUUM (ANALYZE) room")
        # And so that the checkpoint (and the kernel's writeback) of the ~200 MB just written
        # does not either: the figures are of reads, not of the seeding's aftermath.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return time.perf_counter() - started


# -- the room list: a database of rooms with read state ---------------------------------------

ROOMLIST_NON_TEXT = (17, 71, 89)
"""Positions (seq % 100) of the items that are not text messages in a seeded room: a member
joining, the delete of the text 40 before, the edit of the text 30 before."""
_NON_TEXT_BEFORE = (
    "(3 * ({g} / 100) + ({g} % 100 >= 17)::int + ({g} % 100 >= 71)::int + ({g} % 100 >= 89)::int)"
)
"""How many of seqs 1..g are not text messages: a text's ``text_no`` is ``g`` minus this."""


def _author(g: str) -> str:
    """The author of the text at seq ``g``: the measured user now and then, before their
    cursor only (posting moves the author's cursor), else one of 50 authors who are not
    members (public rooms)."""
    return (
        f"CASE WHEN p.mine AND {g} <= p.cursor AND {g} % 13 = 0 THEN $1 ELSE 'a' || ({g} % 50) END"
    )


async def seed_roomlist(
    dsn: str, *, user: str, prefix: str, rooms: int, messages: int
) -> dict[str, Any]:
    """A database where ``user`` is a member of ``rooms`` rooms among as many others, holding
    ``messages`` items in all, with exact read state (migration 0007's invariants).

    One room of the user's holds 15% of the items with the user's cursor at a tenth of it
    (~130,000 unread at 1M); the user's cursors elsewhere go from nothing read to everything
    read. Every room has ten other members with cursors of their own. In every hundred seqs
    three items are not texts (a ``member`` item, a ``delete`` of the text 40 before, an
    ``edit`` of the text 30 before: the deleted texts have no body, the edited ones the new
    text); one text in 257 mentions the user, one in 41 another user. ``text_no``,
    ``room.text_count``, ``room.last_seq``, ``read_text_no`` and ``message_mention`` are
    written as ``chat_post_messages``, ``chat_post_event`` and ``chat_mark_read`` would have.
    Set-based: one INSERT ... SELECT generate_series per table. Returns the plan and seconds.
    """
    started = time.perf_counter()
    big = rooms // 2
    big_items = messages * 15 // 100
    mine_items = (messages - big_items) * 55 // 100
    other_items = messages - big_items - mine_items
    names, sizes, cursors, mine = [], [], [], []
    fractions = (0.0, 0.25, 0.5, 0.8, 0.95, 1.0, 1.0, 0.99)

    def spread(total: int, count: int) -> list[int]:
        weights = [1 + (i * 7919) % 13 for i in range(count)]
        out = [total * w // sum(weights) for w in weights]
        out[-1] += total - sum(out)
        return out

    mine_sizes = spread(mine_items, rooms - 1)
    for i in range(rooms):
        names.append(f"{prefix}-mine-{i:04d}")
        n = big_items if i == big else mine_sizes[i - (i > big)]
        sizes.append(n)
        cursors.append(n // 10 if i == big else int(n * fractions[i % len(fractions)]))
        mine.append(True)
    for i, n in enumerate(spread(other_items, rooms)):
        names.append(f"{prefix}-other-{i:04d}")
        sizes.append(n)
        cursors.append(0)
        mine.append(False)
    non_text = _NON_TEXT_BEFORE
    text_no = "g - " + non_text.format(g="g")
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET work_mem = '256MB'")
        async with conn.transaction():
            await conn.execute(
                """
                CREATE TEMP TABLE bench_plan ON COMMIT DROP AS
                SELECT r.name, r.n::bigint AS n, r.cursor::bigint AS cursor, r.mine, r.ord
                FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::boolean[])
                    WITH ORDINALITY AS r(name, n, cursor, mine, ord)
                """,
                names, sizes, cursors, mine,
            )  # fmt: skip
            await conn.execute(
                f"""
                INSERT INTO room (name, kind, last_seq, text_count)
                SELECT name, 'public', n, n - {non_text.format(g="n")} FROM bench_plan
                """  # noqa: S608 - constant text
            )
            await conn.execute("ALTER TABLE bench_plan ADD COLUMN room_id bigint")
            await conn.execute(
                "UPDATE bench_plan p SET room_id = r.id FROM room r WHERE r.name = p.name"
            )
            # Every item: its kind from its place in its hundred, a text's body (a mention, an
            # edit's text, or none once deleted), text_no by arithmetic (no window, no sort).
            await conn.execute(
                f"""
                INSERT INTO message (
                    room_id, seq, author, body, client_msg_id, kind, member_user,
                    member_action, member_role, target_seq, edited_at, deleted, text_no
                )
                SELECT p.room_id, g,
                    CASE g % 100
                        WHEN 17 THEN 'm' || ((p.ord * 10 + g / 100 % 10) % 1000)
                        WHEN 71 THEN {_author("(g - 40)")}
                        WHEN 89 THEN {_author("(g - 30)")}
                        ELSE {_author("g")}
                    END,
                    CASE
                        WHEN g % 100 = 89 THEN 'edited text of ' || (g - 30)
                        WHEN g % 100 IN (17, 71) THEN NULL
                        WHEN g % 100 = 31 AND g + 40 <= p.n THEN NULL
                        WHEN g % 100 = 59 AND g + 30 <= p.n THEN 'edited text of ' || g
                        WHEN g % 257 = 3 THEN 'hey @' || $1 || ', look at ' || g
                        WHEN g % 41 = 7 THEN 'ping @a' || (g % 50) || ' about ' || g
                        ELSE 'message body ' || g
                    END,
                    'seed-' || g,
                    CASE g % 100 WHEN 17 THEN 'member' WHEN 71 THEN 'delete'
                        WHEN 89 THEN 'edit' ELSE 'text' END,
                    CASE WHEN g % 100 = 17 THEN 'm' || ((p.ord * 10 + g / 100 % 10) % 1000) END,
                    CASE WHEN g % 100 = 17 THEN 'joined' END,
                    CASE WHEN g % 100 = 17 THEN 'member' END,
                    CASE g % 100 WHEN 71 THEN g - 40 WHEN 89 THEN g - 30 END,
                    CASE WHEN g % 100 = 59 AND g + 30 <= p.n THEN now() END,
                    g % 100 = 31 AND g + 40 <= p.n,
                    CASE WHEN g % 100 NOT IN {ROOMLIST_NON_TEXT} THEN {text_no} END
                FROM bench_plan p, generate_series(1::bigint, p.n) AS g
                """,  # noqa: S608 - constant text
                user,
            )
            await conn.execute(
                """
                INSERT INTO message_mention (room_id, user_id, seq)
                SELECT m.room_id, u, m.seq
                FROM bench_plan p
                JOIN message m ON m.room_id = p.room_id
                CROSS JOIN LATERAL chat_mentions(m.body) AS u
                WHERE m.kind = 'text' AND NOT m.deleted AND strpos(m.body, '@') > 0
                """
            )
            # The user's cursors, and ten other members of every room with theirs.
            await conn.execute(
                f"""
                INSERT INTO room_member (room_id, user_id, role, last_read_seq, read_text_no)
                SELECT p.room_id, $1, CASE WHEN p.ord % 10 = 1 THEN 'owner' ELSE 'member' END,
                    p.cursor, p.cursor - {non_text.format(g="p.cursor")}
                FROM bench_plan p WHERE p.mine
                UNION ALL
                SELECT p.room_id, 'm' || ((p.ord * 10 + k) % 1000), 'member', c.seq,
                    c.seq - {non_text.format(g="c.seq")}
                FROM bench_plan p, generate_series(0, 9) AS k,
                    LATERAL (SELECT p.n * ((p.ord + k) % 11) / 10 AS seq) AS c
                """,  # noqa: S608 - constant text
                user,
            )
            # The marks that let the room list skip a count (migration 0007).
            await conn.execute(
                """
                UPDATE room r SET last_deleted_seq = d.seq FROM (
                    SELECT m.room_id, max(m.seq) AS seq FROM message m
                    JOIN bench_plan p ON p.room_id = m.room_id
                    WHERE m.kind = 'text' AND m.deleted GROUP BY m.room_id
                ) d WHERE r.id = d.room_id
                """
            )
            await conn.execute(
                """
                UPDATE room_member rm SET last_mention_seq = x.seq FROM (
                    SELECT mm.room_id, mm.user_id, max(mm.seq) AS seq FROM message_mention mm
                    JOIN bench_plan p ON p.room_id = mm.room_id GROUP BY mm.room_id, mm.user_id
                ) x WHERE rm.room_id = x.room_id AND rm.user_id = x.user_id
                """
            )
            await conn.execute(FLUSH_THE_COMMIT)
        for table in ("message", "room", "room_member", "message_mention"):
            await conn.execute(f"VACUUM (ANALYZE) {table}")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
        await _all_visible(conn, ("message", "message_mention"))
    finally:
        await conn.close()
    return {
        "rooms": names[:rooms],
        "big_room": names[big],
        "items": sum(sizes),
        "other_rooms": len(names) - rooms,
        "seconds": time.perf_counter() - started,
    }


async def roomlist_invariants(dsn: str, prefix: str) -> list[str]:
    """What breaks migration 0007's invariants in the seeded rooms (a window over every item:
    seconds at 1M): ``text_no``, ``text_count``, ``last_seq``, ``read_text_no``, mentions,
    deleted texts."""
    like = prefix.replace("_", r"\_") + "-%"
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        checks = {
            "text_no is not 1.. among texts in seq order": """
                SELECT count(*) FROM (
                    SELECT m.text_no, row_number() OVER (PARTITION BY m.room_id ORDER BY m.seq) AS n
                    FROM message m JOIN room r ON r.id = m.room_id
                    WHERE r.name LIKE $1 AND m.kind = 'text'
                ) t WHERE t.text_no IS DISTINCT FROM t.n""",
            "text_no on an item that is not a text": """
                SELECT count(*) FROM message m JOIN room r ON r.id = m.room_id
                WHERE r.name LIKE $1 AND m.kind <> 'text' AND m.text_no IS NOT NULL""",
            "room.text_count or room.last_seq": """
                SELECT count(*) FROM room r
                LEFT JOIN LATERAL (
                    SELECT count(*) FILTER (WHERE kind = 'text') AS texts, max(seq) AS last
                    FROM message WHERE room_id = r.id
                ) s ON true
                WHERE r.name LIKE $1 AND (r.text_count <> s.texts OR r.last_seq <> s.last)""",
            "read_text_no": """
                SELECT count(*) FROM room_member rm JOIN room r ON r.id = rm.room_id
                WHERE r.name LIKE $1 AND rm.read_text_no <> COALESCE((
                    SELECT text_no FROM message
                    WHERE room_id = rm.room_id AND seq <= rm.last_read_seq AND text_no IS NOT NULL
                    ORDER BY seq DESC LIMIT 1), 0)""",
            "a member's own text after their cursor": """
                SELECT count(*) FROM room_member rm JOIN room r ON r.id = rm.room_id
                JOIN message m ON m.room_id = rm.room_id AND m.author = rm.user_id
                WHERE r.name LIKE $1 AND m.kind = 'text' AND m.seq > rm.last_read_seq""",
            "message_mention rows": """
                SELECT count(*) FROM (
                    (SELECT m.room_id, u, m.seq FROM message m JOIN room r ON r.id = m.room_id,
                        chat_mentions(m.body) AS u
                     WHERE r.name LIKE $1 AND m.kind = 'text' AND NOT m.deleted
                     EXCEPT ALL
                     SELECT mm.room_id, mm.user_id, mm.seq FROM message_mention mm
                     JOIN room r ON r.id = mm.room_id WHERE r.name LIKE $1)
                    UNION ALL
                    (SELECT mm.room_id, mm.user_id, mm.seq FROM message_mention mm
                     JOIN room r ON r.id = mm.room_id WHERE r.name LIKE $1
                     EXCEPT ALL
                     SELECT m.room_id, u, m.seq FROM message m JOIN room r ON r.id = m.room_id,
                        chat_mentions(m.body) AS u
                     WHERE r.name LIKE $1 AND m.kind = 'text' AND NOT m.deleted)
                ) d""",
            "room.last_deleted_seq or room_member.last_mention_seq": """
                SELECT count(*) FROM room_member rm JOIN room r ON r.id = rm.room_id
                WHERE r.name LIKE $1 AND (
                    r.last_deleted_seq <> COALESCE((SELECT max(seq) FROM message
                        WHERE room_id = r.id AND kind = 'text' AND deleted), 0)
                    OR rm.last_mention_seq <> COALESCE((SELECT max(seq) FROM message_mention
                        WHERE room_id = r.id AND user_id = rm.user_id), 0))""",
            "a deleted text with a body, or a delete without its target deleted": """
                SELECT count(*) FROM message m JOIN room r ON r.id = m.room_id
                WHERE r.name LIKE $1 AND (
                    m.kind = 'text' AND m.deleted AND m.body IS NOT NULL
                    OR m.kind = 'delete' AND NOT EXISTS (
                        SELECT 1 FROM message t WHERE t.room_id = m.room_id
                        AND t.seq = m.target_seq AND t.deleted))""",
        }
        broken = []
        for what, sql in checks.items():
            count = await conn.fetchval(sql, like)
            if count:
                broken.append(f"{what}: {count} rows")
        return broken
    finally:
        await conn.close()


async def brute_force_read_state(
    dsn: str, user: str, rooms: list[str]
) -> dict[str, tuple[int, int, int]]:
    """Per room of ``user``: ``(last_read_seq, unread, mentions)`` counted from the messages
    themselves: texts of others after the cursor that are not deleted, and those of them whose
    body mentions the user (``chat_mentions``, not ``message_mention``)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SET work_mem = '256MB'")
        rows = await conn.fetch(
            """
            SELECT r.name, rm.last_read_seq,
                count(m.seq) AS unread,
                count(m.seq) FILTER (
                    WHERE strpos(m.body, '@') > 0
                    AND $1 IN (SELECT chat_mentions(m.body))
                ) AS mentions
            FROM room r
            JOIN room_member rm ON rm.room_id = r.id AND rm.user_id = $1
            LEFT JOIN message m ON m.room_id = r.id AND m.seq > rm.last_read_seq
                AND m.kind = 'text' AND NOT m.deleted AND m.author <> $1
            WHERE r.name = ANY($2::text[])
            GROUP BY r.name, rm.last_read_seq
            """,
            user,
            rooms,
        )
    finally:
        await conn.close()
    return {row["name"]: (row["last_read_seq"], row["unread"], row["mentions"]) for row in rows}
