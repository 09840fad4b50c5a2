"""What operators rely on: health and readiness, metrics, and a start-up that fails fast."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.support import Client, free_port, make_token


def test_healthz_and_readyz(server):
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.http}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "listen": "ok"}}


async def test_metrics_count_what_happens(server, room):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.http}/metrics").text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = scrape()
    async with await Client.connect(server, room, make_token("metered")) as client:
        await client.send("counted", "c-1")
        await client.collect("ack", "message")
        await client.send("")
        await client.recv_type("error")
        during = scrape()
    assert during["chat_connections"] >= 1
    assert during["chat_acks_total"] == before.get("chat_acks_total", 0) + 1
    assert during['chat_messages_stored_total{via="websocket"}'] >= 1
    for counter in ("chat_messages_received_total", "chat_messages_delivered_total"):
        assert during[counter] >= before.get(counter, 0) + 1
    posted = httpx.post(
        f"{server.http}/rooms/{room}/messages",
        json={"body": "over rest"},
        headers={"authorization": f"Bearer {make_token('metered')}"},
    )
    assert posted.status_code == 201
    after = scrape()
    assert after['chat_messages_stored_total{via="rest"}'] == (
        during.get('chat_messages_stored_total{via="rest"}', 0) + 1
    )
    assert during['chat_errors_total{code="empty_body"}'] >= 1
    assert during["chat_fanout_latency_seconds_count"] > before.get(
        "chat_fanout_latency_seconds_count", 0
    )
    assert during["chat_listen_up"] == 1
    assert "chat_db_pool_checked_out" in during


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_start_up_fails_fast_when_the_schema_is_behind(fresh_database):
    import os

    from tests.support import JWT_SECRET

    env = {**os.environ, "CHAT_DATABASE_URL": fresh_database(), "CHAT_JWT_SECRET": JWT_SECRET}
    result = _serve(env)
    assert result.returncode != 0
    assert "run `chat-service migrate`" in result.stderr


def test_start_up_fails_fast_when_the_database_is_unreachable():
    import os

    from tests.support import JWT_SECRET

    url = f"postgresql://postgres:x@127.0.0.1:{free_port()}/nothing"
    env = {**os.environ, "CHAT_DATABASE_URL": url, "CHAT_JWT_SECRET": JWT_SECRET}
    result = _serve(env)
    assert result.returncode != 0
    assert "cannot reach the database" in result.stderr
    assert ":x@" not in result.stderr  # the password is not printed
