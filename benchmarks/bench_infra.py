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


async def seed_history(dsn: str, room: str, count: int) -> float:
    """A room holding messages 1..count, inserted with one INSERT ... SELECT; returns seconds."""
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SET synchronous_commit = off")
        async with conn.transaction():
            room_id = await conn.fetchval(
                "INSERT INTO room (name, last_seq) VALUES ($1, $2) RETURNING id", room, count
            )
            await conn.execute(
                "INSERT INTO message (room_id, seq, author, body) "
                "SELECT $1, g, 'u' || (g % 10), 'message body ' || g "
                "FROM generate_series(1, $2::bigint) AS g",
                room_id,
                count,
            )
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
