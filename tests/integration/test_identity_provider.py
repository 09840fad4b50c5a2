"""Tokens from an identity provider, black-box: two ``chat-service serve`` replicas verify
tokens against a JWKS served by a local HTTP server whose keys rotate during the tests, with
``aud``/``iss`` and custom user/name claims, alongside the service's own HS256 tokens."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.idp_tokens import b64 as b64url
from tests.idp_tokens import generate_keys, hostile_tokens, jwk, pem, published
from tests.support import JWT_SECRET, Client, ServerProcess, make_token

AUDIENCE = "chat-service"
ISSUER = "http://idp.test/realms/chat"
REFETCH_SECONDS = 2.0
FETCH_TIMEOUT = 1.0
HTTP_TIMEOUT = 10.0


class JwksServer:
    """A JWKS endpoint on a loopback port: ``/a/...`` and ``/b/...`` serve the same keys and are
    counted apart, one path per replica. ``delay`` holds every answer that long."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests: dict[str, list[float]] = {}
        self.delay = 0.0
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None

    def url(self, replica: str) -> str:
        return f"http://127.0.0.1:{self.port}/{replica}/jwks.json"

    def fetches(self, replica: str) -> int:
        return len(self.requests.get(f"/{replica}/jwks.json", []))

    def last_fetch(self, replica: str) -> float:
        return self.requests.get(f"/{replica}/jwks.json", [0.0])[-1]

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.setdefault(self.path, []).append(time.monotonic())
                if outer.delay:
                    time.sleep(outer.delay)
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the replica gave up waiting (its deadline): what the test wants

            def log_message(self, *_args: object) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    found = generate_keys()
    found["next"] = generate_keys()["p256"]  # the key the provider rotates to
    return found


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Any]) -> Iterator[JwksServer]:
    server = JwksServer()
    server.keys = published(keys)
    server.start()
    yield server
    server.stop()


def _env(jwks: JwksServer, replica: str) -> dict[str, str]:
    return {
        "CHAT_JWKS_URL": jwks.url(replica),
        "CHAT_JWT_AUDIENCE": AUDIENCE,
        "CHAT_JWT_ISSUER": ISSUER,
        "CHAT_JWT_USER_CLAIM": "preferred_username",
        "CHAT_JWT_NAME_CLAIM": "given_name",
        "CHAT_JWKS_MIN_REFETCH_SECONDS": str(REFETCH_SECONDS),
        "CHAT_JWKS_TIMEOUT": str(FETCH_TIMEOUT),
        "CHAT_DEV_AUTH": "false",
    }


@pytest.fixture(scope="module")
def replicas(
    database_url: str, server_log_dir: Path, jwks: JwksServer
) -> Iterator[dict[str, ServerProcess]]:
    procs = {
        name: ServerProcess(
            database_url, log_path=server_log_dir / f"idp-{name}.log", env=_env(jwks, name)
        )
        for name in ("a", "b")
    }
    try:
        for proc in procs.values():
            proc.start()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def idp_token(key: Any, kid: str | None, alg: str, **overrides: Any) -> str:
    """A fresh token (its own ``jti``: never answered from a verified-token cache)."""
    now = int(time.time())
    claims = {
        "preferred_username": "alice.idp",
        "given_name": "Alice Example",
        "sub": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
        "aud": [AUDIENCE, "account"],
        "iss": ISSUER,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        **overrides,
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None)


def me(server: ServerProcess, token: str) -> httpx.Response:
    return httpx.get(
        f"{server.http}/auth/me",
        headers={"Authorization": f"Bearer {token}"},
        timeout=HTTP_TIMEOUT,
    )


async def ws_status(server: ServerProcess, room: str, token: str) -> int:
    """101 if the websocket was accepted, else the handshake's HTTP status."""
    try:
        client = await Client.connect(server, room, token)
    except InvalidStatus as refused:
        return refused.response.status_code
    await client.close()
    return 101


def assert_clean_log(server: ServerProcess) -> None:
    """No ERROR line and no traceback: a bad token is the client's problem, not the server's."""
    for line in server.log_path.read_text().splitlines():
        assert "Traceback" not in line, line
        if line.startswith("{"):
            assert json.loads(line)["level"] not in ("error", "critical"), line


def wait_until_accepted(server: ServerProcess, make: Any, deadline: float = 10.0) -> None:
    """Retry a fresh token until it is accepted: a rotation shows up within one refetch
    interval (an unknown kid within the interval is refused, by design)."""
    end = time.monotonic() + deadline
    while True:
        status = me(server, make()).status_code
        if status == 200:
            return
        assert status == 401, status
        assert time.monotonic() < end, "the rotated key was never fetched"
        time.sleep(0.2)


async def test_provider_tokens_of_every_key_type_work_on_both_replicas(replicas, keys, room):
    for name, alg in (("rsa", "RS256"), ("rsa", "PS256"), ("p256", "ES256"), ("ed", "EdDSA")):
        for server in replicas.values():
            answer = me(server, idp_token(keys[name], name, alg))
            assert answer.status_code == 200, (name, alg, answer.text)
            assert answer.json() == {"user": "alice.idp", "name": "Alice Example"}
            assert await ws_status(server, room, idp_token(keys[name], name, alg)) == 101
    # The user claim is the author of what the user posts.
    posted = httpx.post(
        f"{replicas['a'].http}/rooms/{room}/messages",
        json={"body": "hello from the identity provider"},
        headers={"Authorization": f"Bearer {idp_token(keys['ed'], 'ed', 'EdDSA')}"},
        timeout=HTTP_TIMEOUT,
    )
    assert posted.status_code == 201, posted.text
    assert posted.json()["author"] == "alice.idp"


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "someone-else"},
        {"aud": None},
        {"iss": "http://evil.test/realms/chat"},
        {"iss": None},
        {"preferred_username": None},
        {"exp": int(time.time()) - 3600},
    ],
    ids=["wrong_aud", "no_aud", "wrong_iss", "no_iss", "no_user_claim", "expired"],
)
async def test_wrong_audience_issuer_or_claims_are_refused(replicas, keys, room, overrides):
    for server in replicas.values():
        answer = me(server, idp_token(keys["p256"], "p256", "ES256", **overrides))
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        token = idp_token(keys["p256"], "p256", "ES256", **overrides)
        assert await ws_status(server, room, token) == 403


async def test_the_backends_own_tokens_still_work(replicas, room, database_url):
    """HS256 with CHAT_JWT_SECRET, from ``chat-service token``: sub/name, no aud or iss."""
    env = {**os.environ, "CHAT_DATABASE_URL": database_url, "CHAT_JWT_SECRET": JWT_SECRET}
    env.update(_env(JwksServer(), "a"))  # the same settings as the replicas
    env["CHAT_JWKS_URL"] = "http://127.0.0.1:9/jwks.json"  # never fetched by `token`
    issued = subprocess.run(
        [sys.executable, "-m", "service", "token", "backend-bot", "--name", "Bot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    for server in replicas.values():
        for token in (issued, make_token("backend-bot", name="Bot")):
            assert me(server, token).json() == {"user": "backend-bot", "name": "Bot"}
            assert await ws_status(server, room, token) == 101
        # The secret verifies HS256 only: an HS256 token under another secret is refused.
        assert me(server, make_token("x", secret="another-secret-" + "y" * 40)).status_code == 401


async def test_hostile_tokens_get_401_and_no_error_in_the_log(replicas, keys, room):
    tokens = hostile_tokens(keys)
    for server in replicas.values():
        for name, token in tokens.items():
            if not token:
                continue  # "Bearer " alone: httpx will not send it (test_auth covers no token)
            answer = httpx.get(
                f"{server.http}/rooms",
                headers={"Authorization": f"Bearer {token}"},
                timeout=HTTP_TIMEOUT,
            )
            assert answer.status_code == 401, (name, answer.status_code, answer.text)
            assert token not in answer.text, name
        # A query string this long is refused before the app: test_auth covers it.
        handshakes = {n: t for n, t in tokens.items() if 0 < len(t) < 4000}
        statuses = await asyncio.gather(*(ws_status(server, room, t) for t in handshakes.values()))
        assert dict(zip(handshakes, statuses, strict=True)) == dict.fromkeys(handshakes, 403)
        assert_clean_log(server)


async def test_provider_tokens_renew_a_live_socket_through_the_same_checks(replicas, keys, room):
    """``auth`` frames go through the codec's async path like a handshake: a provider token of
    the same user renews the socket; another key type, another user or the wrong audience
    does not, and the socket still closes with 4401 at its first token's ``exp``."""
    hostile = hostile_tokens(keys)
    first = int(time.time()) + 3
    server = replicas["a"]
    short_lived = idp_token(keys["p256"], "p256", "ES256", exp=first)
    renewed = await Client.connect(server, room, short_lived)
    kept = await Client.connect(server, room, idp_token(keys["rsa"], "rsa", "RS256", exp=first))

    async def answer(client: Client, token: str) -> dict[str, Any]:
        await client.send_json({"type": "auth", "token": token})
        return await client.recv_type("auth_ok" if client is renewed else "error")

    refused = {
        "wrong key type": hostile["wrong_key_type"],
        "rsa token, ec kid": hostile["rsa_token_ec_kid"],
        "alg none": hostile["alg_none"],
        "another user": idp_token(keys["ed"], "ed", "EdDSA", preferred_username="bob.idp"),
        "wrong audience": idp_token(keys["ed"], "ed", "EdDSA", aud="someone-else"),
    }
    for why, token in refused.items():
        frame = await answer(kept, token)
        assert frame["code"] == "auth_refused", (why, frame)
    later = first + 60
    ok = await answer(renewed, idp_token(keys["ed"], "ed", "EdDSA", exp=later))
    assert ok == {"type": "auth_ok", "exp": later}
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await kept.recv(10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    assert time.time() >= first - 0.05
    await renewed.send("still here", client_msg_id=f"idp-renewed-{uuid.uuid4().hex}")
    assert (await renewed.recv_type("ack"))["type"] == "ack"
    await renewed.close()
    assert_clean_log(server)


def _random_token(rng: random.Random, keys: dict[str, Any]) -> tuple[str, bool]:
    """A token with a header an attacker chose: any alg, any kid, extra members; signed with
    a real key, or garbage. True if it is signed with the very key its kid names."""
    values: list[Any] = [None, 0, -1, 1.5, True, [], {}, "", "x" * 300, "\u0000", ["RS256"]]
    header: dict[str, Any] = {
        "alg": rng.choice([*jwt.algorithms.get_default_algorithms(), "none", "NONE", *values]),
        "kid": rng.choice(["rsa", "rsa-rs256", "p256", "ed", "next", "nope", *values]),
    }
    for extra in ("jku", "x5u", "jwk", "crit", "b64", "typ", "cty", "x5c"):
        if rng.random() < 0.15:
            header[extra] = rng.choice(["https://evil.test/jwks", *values])
    header = {k: v for k, v in header.items() if v is not None or rng.random() < 0.5}
    payload = b64url(
        json.dumps(
            {"preferred_username": "mallory", "exp": 2**31, "aud": AUDIENCE, "iss": ISSUER}
        ).encode()
    )
    head = b64url(json.dumps(header).encode())
    signing_input = f"{head}.{payload}".encode()
    name = rng.choice(["rsa", "p256", "p384", "ed", None])
    if name is None or not isinstance(header.get("alg"), str):
        signature = rng.randbytes(rng.choice([0, 1, 64, 96, 256]))
    else:
        key = keys[name]
        try:
            alg = jwt.algorithms.get_default_algorithms()[header["alg"]]
            signature = alg.sign(signing_input, alg.prepare_key(key))
        except Exception:  # alg and key do not fit: garbage then
            signature = rng.randbytes(64)
    legit = name is not None and str(header.get("kid")).startswith(name)
    return f"{head}.{payload}.{b64url(signature)}", legit


@pytest.mark.slow
async def test_random_hostile_headers_never_get_a_500(replicas, keys):
    rng = random.Random(11)  # noqa: S311 - reproducible, not secret
    tokens = [_random_token(rng, keys) for _ in range(300)]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        for server in replicas.values():

            async def status(token: str, url: str = f"{server.http}/auth/me") -> int:
                r = await http.get(url, headers={"Authorization": f"Bearer {token}"})
                return r.status_code

            statuses: list[int] = []
            for start in range(0, len(tokens), 25):
                batch = tokens[start : start + 25]
                statuses += await asyncio.gather(*(status(t) for t, _ in batch))
            assert set(statuses) <= {200, 401}, sorted(set(statuses))
            accepted = [
                legit for (_, legit), code in zip(tokens, statuses, strict=True) if code == 200
            ]
            assert all(accepted), "a token was accepted without the key its kid names"
            assert statuses.count(401) > 250
            assert_clean_log(server)


async def test_a_public_key_refuses_other_key_types_with_401(database_url, server_log_dir, room):
    """CHAT_JWT_PUBLIC_KEY (RSA) beside the secret: a token of another key type was a 500."""
    keys = generate_keys()
    env = {"CHAT_JWT_PUBLIC_KEY": pem(keys["rsa"]), "CHAT_JWT_AUDIENCE": AUDIENCE}
    with ServerProcess(database_url, log_path=server_log_dir / "idp-pem.log", env=env) as server:
        assert me(server, idp_token(keys["rsa"], None, "RS256")).status_code == 200
        assert me(server, make_token("own")).json() == {"user": "own", "name": None}
        refused = {
            "es256": idp_token(keys["p256"], None, "ES256"),
            "eddsa": idp_token(keys["ed"], None, "EdDSA"),
            "es256_with_kid": idp_token(keys["p256"], "rsa", "ES256"),
            "hs256_with_pem": hostile_tokens(keys)["hs256_with_public_pem"],
            "wrong_aud": idp_token(keys["rsa"], None, "RS256", aud="other"),
        }
        for name, token in refused.items():
            assert me(server, token).status_code == 401, name
            assert await ws_status(server, room, token) == 403, name
        assert_clean_log(server)


def test_keys_rotate_and_a_removed_key_stops_working(replicas, keys, jwks):
    def new() -> str:
        return idp_token(keys["next"], "next", "ES256")

    jwks.keys = [*published(keys), jwk(keys["next"], "next")]
    for server in replicas.values():
        wait_until_accepted(server, new)
    # The provider retires the old keys: once refetched (here: on the next unknown kid after
    # the interval), tokens signed with them are refused.
    jwks.keys = [jwk(keys["next"], "next")]
    for name, server in replicas.items():
        before = jwks.fetches(name)
        time.sleep(max(0.0, jwks.last_fetch(name) + REFETCH_SECONDS + 0.1 - time.monotonic()))
        assert me(server, idp_token(keys["p256"], "unknown-kid", "ES256")).status_code == 401
        assert jwks.fetches(name) == before + 1
        assert me(server, idp_token(keys["p256"], "p256", "ES256")).status_code == 401
        assert me(server, new()).status_code == 200
    jwks.keys = [*published(keys), jwk(keys["next"], "next")]


async def test_a_burst_of_unknown_kids_costs_one_fetch_per_interval(replicas, keys, jwks):
    jwks.delay = 0.3  # the fetch is still in flight when the burst arrives
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
            for name, server in replicas.items():
                await asyncio.sleep(
                    max(0.0, jwks.last_fetch(name) + REFETCH_SECONDS + 0.1 - time.monotonic())
                )
                before = jwks.fetches(name)

                async def probe(i: int, url: str = f"{server.http}/auth/me") -> int:
                    token = idp_token(keys["p256"], f"made-up-{i}", "ES256")
                    r = await http.get(url, headers={"Authorization": f"Bearer {token}"})
                    return r.status_code

                started = time.monotonic()
                first = await asyncio.gather(*(probe(i) for i in range(30)))
                second = await asyncio.gather(*(probe(i) for i in range(30, 60)))
                elapsed = time.monotonic() - started
                assert set(first) == set(second) == {401}
                # One shared fetch; a second only if the bursts outlasted the interval.
                fetched = jwks.fetches(name) - before
                assert 1 <= fetched <= 1 + int(elapsed // REFETCH_SECONDS), (fetched, elapsed)
                # A cached key was never held up by the unknown ones.
                assert me(server, idp_token(keys["ed"], "ed", "EdDSA")).status_code == 200
    finally:
        jwks.delay = 0.0
    for server in replicas.values():
        assert_clean_log(server)


def test_cached_keys_keep_working_while_the_jwks_endpoint_is_down(replicas, keys, jwks):
    jwks.stop()
    try:
        for server in replicas.values():
            assert me(server, idp_token(keys["rsa"], "rsa", "RS256")).status_code == 200
            # An unknown kid now costs a failed fetch (refused connection): still a plain 401.
            time.sleep(REFETCH_SECONDS + 0.1)
            assert me(server, idp_token(keys["p256"], "new-kid", "ES256")).status_code == 401
            assert me(server, idp_token(keys["p256"], "p256", "ES256")).status_code == 200
    finally:
        jwks.start()  # same port
    for server in replicas.values():
        log = server.log_path.read_text()
        assert "JWKS fetch from" in log and "failed, keeping the" in log
        assert_clean_log(server)
    # Back up with a rotated key: picked up at the next refetch.
    jwks.keys = [*published(keys), jwk(keys["next"], "next2")]
    for server in replicas.values():
        wait_until_accepted(server, lambda: idp_token(keys["next"], "next2", "ES256"))


def test_a_hanging_jwks_endpoint_costs_at_most_its_deadline(replicas, keys, jwks):
    jwks.delay = 5.0
    try:
        server = replicas["a"]
        time.sleep(max(0.0, jwks.last_fetch("a") + REFETCH_SECONDS + 0.1 - time.monotonic()))
        started = time.monotonic()
        result: dict[str, int] = {}
        waiting = threading.Thread(
            target=lambda: result.update(
                status=me(server, idp_token(keys["p256"], "slow-kid", "ES256")).status_code
            )
        )
        before = jwks.fetches("a")
        waiting.start()
        end = time.monotonic() + 5
        while jwks.fetches("a") == before:  # not a pause: until the slow fetch is in flight
            assert time.monotonic() < end, "the unknown kid was never fetched"
            time.sleep(0.02)
        # Meanwhile the event loop is free: a token with a cached key is answered.
        assert me(server, idp_token(keys["ed"], "ed", "EdDSA")).status_code == 200
        waiting.join(HTTP_TIMEOUT)
        assert result == {"status": 401}
        assert time.monotonic() - started < FETCH_TIMEOUT + 3  # generous: the deadline held
    finally:
        jwks.delay = 0.0
    assert "JWKS fetch from" in replicas["a"].log_path.read_text()
    assert_clean_log(replicas["a"])
