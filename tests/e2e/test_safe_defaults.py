"""Safe to expose (issue 11): what a service listening off loopback hands out to strangers, and
how it refuses to start. Every test runs the real ``chat-service`` CLI, as an operator would."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.support import JWT_SECRET, ServerProcess, database_url_for, free_port, make_token

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "service"]
ANY = "0.0.0.0"  # noqa: S104 - what the image's command listens on
METRICS_TOKEN = "mT7qZ2vK9xR4pL8wN3bJ6cY1hF5gD0sAuE-iO_rK7e"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class OpenServer(ServerProcess):
    """``chat-service serve --host 0.0.0.0``, like the image's command, with only the
    environment given (no dev auth unless asked for)."""

    def __init__(self, log_path: Path, env: dict[str, str], timeout: float = 30.0) -> None:
        super().__init__("", log_path=log_path)
        self.env = env
        self.timeout = timeout

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--host", ANY, "--port", "0"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not self._wait_ready(max(timeout, self.timeout), offset):
            self.stop()
            raise RuntimeError(self.log_path.read_text()[-3000:])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chat-safe-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _closed_to_strangers(base: str) -> None:
    """What a service off loopback must not hand out without being asked to."""
    assert httpx.post(f"{base}/auth/dev-token", json={"user": "anyone"}).status_code == 404
    for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
        assert httpx.get(f"{base}{path}").status_code == 404, path
    assert httpx.get(f"{base}/rooms").status_code == 401
    assert httpx.get(f"{base}/healthz").status_code == 200


@pytest.mark.slow
def test_the_image_command_hands_out_no_dev_tokens(data_dir: Path, tmp_path: Path) -> None:
    # The Dockerfile's CMD with no database configured: embedded mode, on 0.0.0.0.
    with OpenServer(tmp_path / "image.log", _env(CHAT_DATA_DIR=str(data_dir)), 90) as server:
        _closed_to_strangers(server.http)
        ready = httpx.get(f"{server.http}/readyz")
        assert ready.json() == {"status": "ready", "checks": {"database": "ok", "listen": "ok"}}
        # the operator mints tokens with the service's own secret, read from its data dir
        minted = subprocess.run(
            [*CLI, "token", "ops"],
            env=_env(CHAT_DATA_DIR=str(data_dir)),
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
        ).stdout.strip()
        r = httpx.get(f"{server.http}/rooms", headers={"Authorization": f"Bearer {minted}"})
        assert r.status_code == 200
    assert "anyone" not in (tmp_path / "image.log").read_text().lower()


def _lock_out(server_url: str, database_url: str, *, allow: bool) -> None:
    """Refuse (or allow again) every connection to the test's database, dropping live ones."""
    name = urlsplit(database_url).path.lstrip("/")

    async def run() -> None:
        admin = await asyncpg.connect(database_url_for(server_url, "postgres"))
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                    name,
                )
        finally:
            await admin.close()

    asyncio.run(run())


@pytest.mark.slow
def test_two_replicas_refuse_dev_tokens_and_readyz_names_no_address(
    own_database: str, pg_server_url: str, tmp_path: Path
) -> None:
    env = _env(CHAT_DATABASE_URL=own_database, CHAT_JWT_SECRET=JWT_SECRET)
    with (
        OpenServer(tmp_path / "app1.log", env) as app1,
        OpenServer(tmp_path / "app2.log", env) as app2,
    ):
        for replica in (app1, app2):
            _closed_to_strangers(replica.http)
            assert httpx.get(f"{replica.http}/readyz").status_code == 200
        _lock_out(pg_server_url, own_database, allow=False)
        try:
            for replica in (app1, app2):
                r = httpx.get(f"{replica.http}/readyz", timeout=10)
                assert r.status_code == 503
                assert r.json()["status"] == "not ready"
                assert r.json()["checks"]["database"] == "failing"
                url = urlsplit(own_database)
                secrets_of_the_setup = [
                    url.hostname,
                    str(url.port),
                    url.username,
                    url.path.lstrip("/"),
                    "asyncpg",
                    "postgresql",
                    "connection",
                ]
                for leak in secrets_of_the_setup:
                    assert leak and leak not in r.text, leak
        finally:
            _lock_out(pg_server_url, own_database, allow=True)
    for name in ("app1.log", "app2.log"):  # the details went to the log instead
        log = (tmp_path / name).read_text()
        assert "not ready: database check fails" in log
        assert urlsplit(own_database).path.lstrip("/") in log
        assert "anyone" not in log.lower()


def test_asked_for_off_loopback_dev_auth_warns_and_metrics_need_their_token(
    database_url: str, tmp_path: Path
) -> None:
    env = _env(
        CHAT_DATABASE_URL=database_url,
        CHAT_JWT_SECRET=JWT_SECRET,
        CHAT_DEV_AUTH="true",
        CHAT_PUBLIC_DOCS="true",
        CHAT_METRICS_TOKEN=METRICS_TOKEN,
    )
    with OpenServer(tmp_path / "open.log", env) as server:
        assert httpx.post(f"{server.http}/auth/dev-token", json={"user": "a"}).status_code == 200
        assert httpx.get(f"{server.http}/docs").status_code == 200
        assert "/rooms" in httpx.get(f"{server.http}/openapi.json").json()["paths"]
        metrics = f"{server.http}/metrics"
        assert httpx.get(metrics).status_code == 401
        for wrong in ("Bearer nope", f"Basic {METRICS_TOKEN}", f"Bearer {METRICS_TOKEN}x"):
            assert httpx.get(metrics, headers={"Authorization": wrong}).status_code == 401
        user_token = make_token("alice")  # a user's token is not the metrics token
        assert (
            httpx.get(metrics, headers={"Authorization": f"Bearer {user_token}"}).status_code == 401
        )
        scraped = httpx.get(metrics, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200 and "chat_connections" in scraped.text
    warnings = [
        json.loads(line)
        for line in (tmp_path / "open.log").read_text().splitlines()
        if "ANYONE" in line
    ]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert "sign in as ANYONE" in warnings[0]["msg"] and ANY in warnings[0]["msg"]


# -- start-up failures: one line, in the configured format, and a documented exit code ---------


def _serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "serve", "--port", str(free_port()), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _one_json_line(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    entry = json.loads(lines[0])
    assert entry["level"] == "error" and "exc" not in entry
    return entry  # type: ignore[no-any-return]


def test_an_unreachable_database_is_one_line_and_exit_3() -> None:
    url = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/nothing"
    result = _serve(_env(CHAT_DATABASE_URL=url, CHAT_JWT_SECRET=JWT_SECRET))
    assert result.returncode == 3
    assert "cannot reach the database" in str(_one_json_line(result)["msg"])
    assert "hunter2" not in result.stderr


def test_a_schema_behind_head_is_one_line_and_exit_4(fresh_database) -> None:  # type: ignore[no-untyped-def]
    result = _serve(_env(CHAT_DATABASE_URL=fresh_database(), CHAT_JWT_SECRET=JWT_SECRET))
    assert result.returncode == 4
    assert "run `chat-service migrate`" in str(_one_json_line(result)["msg"])


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("CHAT_HISTORY_LIMIT", "100000", "less than or equal to 500"),
        ("CHAT_JWT_SECRET", "s" * 40, "CHAT_JWT_SECRET is too predictable"),
        (
            "CHAT_JWT_SECRET",
            "change-me-to-48-random-url-safe-characters-xxxxxxxxxxxx",
            "well-known",
        ),
        ("CHAT_WEBHOOK_URL", "https://hooks.example.com/chat", "needs CHAT_WEBHOOK_SECRET"),
        ("CHAT_WEBHOOK_SECRET", "w" * 40, "CHAT_WEBHOOK_SECRET is too predictable"),
    ],
)
def test_an_invalid_setting_is_one_line_and_exit_2(setting: str, value: str, says: str) -> None:
    env = _env(CHAT_DATABASE_URL="postgresql://u:p@127.0.0.1:1/x", CHAT_JWT_SECRET=JWT_SECRET)
    result = _serve({**env, setting: value})
    assert result.returncode == 2
    assert says in str(_one_json_line(result)["msg"])
    assert value not in result.stderr or setting != "CHAT_JWT_SECRET"  # a secret is not echoed


def test_start_up_failures_are_plain_text_with_dev_and_in_embedded_mode(data_dir: Path) -> None:
    url = f"postgresql://u:p@127.0.0.1:{free_port()}/x"
    result = _serve(_env(CHAT_DATABASE_URL=url, CHAT_JWT_SECRET=JWT_SECRET), "--dev")
    assert result.returncode == 3
    assert re.fullmatch(
        r"\S+ \S+ ERROR chat-service \[-\]: cannot reach the database .*\n", result.stderr
    ), result.stderr
    embedded = _serve(_env(CHAT_DATA_DIR=str(data_dir), CHAT_HISTORY_LIMIT="-1"))
    assert embedded.returncode == 2
    assert re.fullmatch(
        r"\S+ \S+ ERROR chat-service \[-\]: invalid settings: .*\n", embedded.stderr
    ), embedded.stderr


def test_the_example_env_file_cannot_run() -> None:
    """``cp .env.example .env`` then starting the service: refused, whatever the example holds
    (compose refuses the empty values itself; see test_topology)."""
    values = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    env = _env(
        CHAT_DATABASE_URL=f"postgresql://chat:{values['POSTGRES_PASSWORD']}@127.0.0.1:1/chat",
        CHAT_JWT_SECRET=values["CHAT_JWT_SECRET"],
    )
    result = _serve(env)
    assert result.returncode == 2, result.stderr
    assert "CHAT_JWT_SECRET" in str(_one_json_line(result)["msg"])


def test_token_never_creates_a_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "token", "alice"], env=_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert str(tmp_path / ".chat-data" / "jwt-secret") in result.stderr
    assert "CHAT_JWT_SECRET" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created
    assert len(result.stderr.splitlines()) == 1


def test_the_readme_says_which_routes_need_a_token(server: ServerProcess) -> None:
    """The README's REST table has a "token" column; check every row against a live server."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(
        r"^\| `((?:GET|POST) [^`]+)`(?:, `((?:GET|POST) [^`]+)`)? \| (\w+) \|", readme, re.MULTILINE
    )
    assert len(rows) >= 6, rows
    checked = 0
    for first, second, needs in rows:
        for route in filter(None, (first, second)):
            method, path = route.split(" ", 1)
            path = path.split("?")[0].replace("{room}", "lobby")
            r = httpx.request(method, f"{server.http}{path}", json={"body": "x", "user": "u"})
            if needs == "yes":
                assert r.status_code == 401, route
            else:
                assert needs == "no", route
                assert r.status_code != 401, route
            checked += 1
    assert checked >= 8


@pytest.mark.slow
def test_worker_processes_know_the_listen_address(database_url: str, tmp_path: Path) -> None:
    """``--workers 2`` builds the app in worker processes from the environment: the listen
    address must reach them, or they would fall back to the closed defaults (or worse)."""
    env = _env(CHAT_DATABASE_URL=database_url, CHAT_JWT_SECRET=JWT_SECRET)
    port = free_port()
    log = (tmp_path / "workers.log").open("wb")
    proc = subprocess.Popen(
        [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "workers.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "workers.log").read_text()
            time.sleep(0.1)
        for _ in range(6):  # whichever worker answers
            assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200
            assert httpx.get(f"{base}/openapi.json", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
