"""Identity-provider tokens: keys fix their algorithms, claims are checked, the JWKS cache
refetches only when it should, and no token whatsoever escapes as anything but NotAuthenticated."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from pydantic import ValidationError

from service.auth import TokenCodec, UnknownKey
from service.config import Settings
from service.errors import NotAuthenticated
from service.idp import JwksCache, key_from_jwk, load_public_key, parse_jwks
from tests.idp_tokens import b64, claims, generate_keys, hostile_tokens, jwk, pem, published
from tests.support import JWT_SECRET

SECRET = JWT_SECRET
DB = "postgresql://d/x"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return generate_keys()


def test_each_key_type_fixes_its_algorithms(keys):
    assert key_from_jwk(jwk(keys["rsa"], "r")).algorithms[0] == "RS256"
    assert key_from_jwk(jwk(keys["rsa"], "r", alg="PS256")).algorithms == ("PS256",)
    assert key_from_jwk(jwk(keys["p256"], "e")).algorithms == ("ES256",)
    assert key_from_jwk(jwk(keys["p384"], "e")).algorithms == ("ES384",)
    assert key_from_jwk(jwk(keys["ed"], "o")).algorithms == ("EdDSA",)
    assert load_public_key(pem(keys["p256"])).algorithms == ("ES256",)
    assert load_public_key(pem(keys["ed"])).algorithms == ("EdDSA",)
    # Keycloak shows the bare base64 key; environment files squeeze PEMs into one line.
    bare = "".join(pem(keys["rsa"]).splitlines()[1:-1])
    assert "RS256" in load_public_key(bare).algorithms
    assert load_public_key(pem(keys["p256"]).replace("\n", "\\n")).algorithms == ("ES256",)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda k: {"kty": "oct", "k": b64(b"k" * 32), "kid": "s"}, "kty"),
        (lambda k: jwk(k["rsa"], "x", use="enc"), "use"),
        (lambda k: jwk(k["p256"], "x", alg="ES384"), "does not fit"),
        (lambda k: jwk(k["rsa"], "x", alg="HS256"), "does not fit"),
        (lambda k: jwk(k["ed"], "x", alg="ES256"), "does not fit"),
        (lambda k: {**jwk(k["p256"], "x"), "crv": "P-384"}, "invalid"),
        (
            lambda k: jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "x"),  # noqa: S505
            "1024 bits",
        ),
        (lambda k: {"kty": "RSA", "n": "!!", "e": "AQAB"}, "invalid"),
        (lambda k: ["not", "a", "key"], "not an object"),
        (lambda k: jwk(k["rsa"], "k" * 300), "kid"),
    ],
)
def test_unusable_jwks_entries_are_skipped_with_a_reason(keys, make, reason):
    with pytest.raises(ValueError, match=reason):
        key_from_jwk(make(keys))


def test_a_jwks_keeps_its_usable_keys_and_refuses_garbage(keys):
    body = json.dumps(
        {
            "keys": [
                jwk(keys["p256"], "good"),
                {"kty": "oct", "k": "AAAA", "kid": "sym"},
                jwk(keys["rsa"], "for-encryption", use="enc"),  # Keycloak publishes one
            ]
        }
    )
    usable, skipped = parse_jwks(body.encode())
    assert [k.kid for k in usable] == ["good"]
    assert len(skipped) == 1 and "sym" in skipped[0]
    for garbage in (b"nope", b"[]", b'{"keys": 3}', b'{"keys": []}', b"[" * 100_000):
        with pytest.raises(ValueError):
            parse_jwks(garbage)


def test_private_members_of_a_jwk_are_ignored(keys):
    private = RSAAlgorithm.to_jwk(keys["rsa"], as_dict=True)
    key = key_from_jwk({**private, "kid": "leaky"})
    assert isinstance(key.key, rsa.RSAPublicKey)


def _codec(**settings: Any) -> TokenCodec:
    return TokenCodec(Settings(database_url=DB, **settings))


def _with_jwks(codec: TokenCodec, *jwks: dict[str, Any]) -> TokenCodec:
    """Load keys as a fetch would, without a network (the integration tests have one)."""
    assert codec.jwks is not None
    codec.jwks._keys = {k.kid: k for k in (key_from_jwk(j) for j in jwks)}
    return codec


def test_identity_provider_claims_are_checked_and_own_tokens_still_work(keys):
    codec = _with_jwks(
        _codec(
            jwks_url="https://idp.example/jwks",
            jwt_secret=SECRET,
            jwt_audience="chat, other",
            jwt_issuer="https://idp.example/",
            jwt_user_claim="preferred_username",
            jwt_name_claim="given_name",
        ),
        jwk(keys["rsa"], "r1"),
    )

    def idp(**extra: Any) -> str:
        payload = {
            "preferred_username": "alice",
            "given_name": "Alice",
            "aud": ["account", "chat"],
            "iss": "https://idp.example/",
            **claims(),
            **extra,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, keys["rsa"], algorithm="RS256", headers={"kid": "r1"})

    assert codec.verify(idp()) == codec.verify(idp(aud="other"))
    principal = codec.verify(idp())
    assert (principal.user_id, principal.name) == ("alice", "Alice")
    for bad in (
        idp(aud="someone-else"),
        idp(aud=None),
        idp(iss="https://evil.example/"),
        idp(iss=None),
        idp(preferred_username=None),
        idp(preferred_username=42),
        idp(exp=int(time.time()) - 3600),
    ):
        with pytest.raises(NotAuthenticated):
            codec.verify(bad)
    # The backend's own tokens (chat-service token): sub and name, no aud or iss.
    own = codec.verify(codec.issue("backend-user", ttl=60, name="B"))
    assert (own.user_id, own.name) == ("backend-user", "B")


def test_tokens_with_aud_work_when_no_audience_is_configured(keys):
    codec = _codec(jwt_public_key=pem(keys["p256"]))
    token = jwt.encode(claims(aud="anything", iss="x"), keys["p256"], algorithm="ES256")
    assert codec.verify(token).user_id == "u-1"


def test_hostile_tokens_are_refused_as_not_authenticated(keys, caplog):
    codec = _with_jwks(
        _codec(jwks_url="https://idp.example/jwks", jwt_secret=SECRET), *published(keys)
    )
    good = jwt.encode(claims(), keys["p256"], "ES256", headers={"kid": "p256"})
    assert codec.verify(good).user_id == "u-1"
    for name, token in hostile_tokens(keys).items():
        with pytest.raises(NotAuthenticated):
            codec.verify(token)
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], name
    # HS256 with a public-key PEM as secret, against a codec with no shared secret at all.
    pem_only = _codec(jwt_public_key=pem(keys["rsa"]))
    with pytest.raises(NotAuthenticated, match="HS256"):
        pem_only.verify(hostile_tokens(keys)["hs256_with_public_pem"])


def test_an_unknown_kid_is_told_apart_for_a_refetch(keys):
    codec = _with_jwks(_codec(jwks_url="https://idp.example/jwks"), jwk(keys["ed"], "a"))
    with pytest.raises(UnknownKey):
        codec.verify(jwt.encode(claims(), keys["ed"], "EdDSA", headers={"kid": "b"}))
    # Without a kid, a JWKS of one key is that key.
    assert codec.verify(jwt.encode(claims(), keys["ed"], "EdDSA")).user_id == "u-1"


class FakeProvider:
    """A fetch function that counts its calls; ``gate`` holds a fetch in flight."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.calls = 0
        self.down = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, url: str, timeout: float) -> Any:
        self.calls += 1
        assert self.gate.wait(5), "the test never released the fetch"  # in a thread
        if self.down:
            raise ConnectionRefusedError("connection refused")
        return parse_jwks(json.dumps({"keys": self.jwks}).encode())


async def test_jwks_cache_refetches_once_per_interval_and_survives_a_dead_endpoint(keys, caplog):
    provider = FakeProvider()
    provider.jwks = [jwk(keys["ed"], "k1")]
    now = [1000.0]
    cache = JwksCache(
        "https://idp.example/jwks",
        min_interval=30,
        max_age=600,
        timeout=2,
        fetch=provider,
        clock=lambda: now[0],
    )
    cache.start()
    await cache.refresh()  # joins the start-up fetch
    assert provider.calls == 1 and cache.get("k1") is not None

    # Rotation: a new kid is fetched once, for any number of concurrent requests.
    provider.jwks = [jwk(keys["ed"], "k1"), jwk(keys["p256"], "k2")]
    now[0] += 30
    provider.gate.clear()  # the fetch stays in flight until every caller has come
    callers = [asyncio.ensure_future(cache.refresh()) for _ in range(20)]
    for _ in range(500):
        if provider.calls == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)  # every caller has taken its first step: joined, or fetched again
    assert not any(c.done() for c in callers)
    provider.gate.set()
    await asyncio.wait_for(asyncio.gather(*callers), 5)
    assert provider.calls == 2 and cache.get("k2") is not None
    # Within the interval, unknown kids cost nothing.
    await asyncio.gather(*(cache.refresh() for _ in range(20)))
    assert provider.calls == 2

    # The endpoint goes down: the cached keys stay, one WARNING, no traceback.
    provider.down = True
    now[0] += 31
    await cache.refresh()
    assert provider.calls == 3 and cache.get("k2") is not None
    warnings = [r for r in caplog.records if r.name == "service.idp"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "connection refused" in warnings[0].getMessage() and warnings[0].exc_info is None

    # Keys older than max_age are refreshed in the background; a removed key stops.
    provider.down = False
    provider.jwks = [jwk(keys["p256"], "k2")]
    now[0] += 600
    cache.refresh_if_stale()
    await cache.refresh()  # joins it
    assert provider.calls == 4 and cache.get("k1") is None and cache.get("k2") is not None
    await cache.close()


async def test_authenticate_refetches_for_an_unknown_kid(keys):
    codec = _codec(jwks_url="https://idp.example/jwks", jwks_min_refetch_seconds=0.1)
    provider = FakeProvider()
    assert codec.jwks is not None
    codec.jwks._fetch = provider
    provider.jwks = [jwk(keys["ed"], "new")]
    token = jwt.encode(claims(), keys["ed"], "EdDSA", headers={"kid": "new"})
    assert (await codec.authenticate(token)).user_id == "u-1"
    assert provider.calls == 1
    with pytest.raises(UnknownKey):  # rate limited: no second fetch right away
        await codec.authenticate(jwt.encode(claims(), keys["ed"], "EdDSA", headers={"kid": "x"}))
    assert provider.calls == 1
    await codec.close()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"jwt_secret": SECRET, "jwt_audience": "chat"}, "CHAT_JWT_AUDIENCE"),
        ({"jwt_secret": SECRET, "jwt_user_claim": "email"}, "CHAT_JWT_USER_CLAIM"),
        ({"jwks_url": "file:///etc/passwd"}, "https://"),
        ({"jwks_url": "ftp://idp/jwks"}, "https://"),
        ({"jwt_public_key": "not a key"}, "PEM"),
    ],
)
def test_bad_identity_provider_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        Settings(database_url=DB, **settings)


def test_a_jwks_url_alone_is_enough(monkeypatch):
    monkeypatch.delenv("CHAT_JWT_SECRET", raising=False)
    settings = Settings(database_url=DB, jwks_url="https://idp.example/jwks")
    assert not TokenCodec(settings).can_issue


def test_an_unforeseen_error_while_verifying_is_a_401_and_one_warning(keys, monkeypatch, caplog):
    """Whatever a library raises on some token, the caller gets 401, the log no traceback."""
    codec = _codec(jwt_public_key=pem(keys["p256"]))

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RecursionError("somewhere deep in a library")

    monkeypatch.setattr(jwt, "decode", broken)
    token = jwt.encode(claims(), keys["p256"], "ES256")
    for _ in range(3):
        with pytest.raises(NotAuthenticated):
            codec.verify(token)
    warnings = [r for r in caplog.records if r.name == "service.auth"]
    assert [(r.levelname, r.exc_info) for r in warnings] == [("WARNING", None)]  # rate limited
