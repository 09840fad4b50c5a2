from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from pydantic import ValidationError

from service.auth import LEEWAY, VERIFIED_CACHE_SIZE, TokenCodec, extract_token
from service.config import Settings, weak_secret_problem
from service.errors import NotAuthenticated

ANY = "0.0.0.0"  # noqa: S104 - the address that is not loopback
SECRET = "kR3v9Qx7LmT2pW8zN4bY6cH1jF5gD0sA-uE_iO3rK7eV9wX2"


def test_database_url_without_jwt_settings_is_refused(monkeypatch):
    monkeypatch.delenv("CHAT_JWT_SECRET", raising=False)
    with pytest.raises(ValidationError, match="CHAT_JWT_SECRET"):
        Settings(database_url="postgresql://db/chat")


@pytest.mark.parametrize(
    "secret",
    [
        "changeme",
        "short",
        "s" * 32,  # long enough, one character
        "s" * 48,
        "ab" * 24,
        "0123456789abcdef" * 2,
        "abcdefghijklmnopqrstuvwxyz012345",
        "a" * 60 + "Zq9-xW3_rT7y",
        "change-me-to-48-random-url-safe-characters-xxxxxxxxxxxx",  # the old .env.example
        "please-CHANGE-ME-this-is-just-the-default-value-0123456789",
        "your-secret-key-goes-here-and-it-is-long-enough",
        "k3Jd8Qm2Lp5Zx7Vn-EXAMPLE-Rt4Wy6Ub9Hc1Gf0Se",
    ],
)
def test_weak_secrets_are_refused(secret):
    with pytest.raises(ValidationError, match="CHAT_JWT_SECRET is .*: it must be at least 32"):
        Settings(database_url="postgresql://db/chat", jwt_secret=secret)
    with pytest.raises(ValidationError, match="CHAT_JWT_SECRET"):  # embedded mode too
        Settings(jwt_secret=secret)


def test_generated_secrets_pass():
    import secrets as random

    for _ in range(2000):
        for secret in (random.token_urlsafe(32), random.token_hex(16), random.token_hex(32)):
            assert weak_secret_problem(secret) is None, secret


def test_nothing_env_example_ships_passes_for_a_secret():
    """Every value .env.example ships for a secret or password is refused (or empty, which
    docker compose refuses), so a copied example can never run."""
    example = Path(__file__).resolve().parents[2] / ".env.example"
    values = {}
    for line in example.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.startswith("#") and ("SECRET" in name or "PASSWORD" in name):
            values[name] = value
    assert {"CHAT_JWT_SECRET", "POSTGRES_PASSWORD"} <= set(values)
    for name, value in values.items():
        assert value == "" or weak_secret_problem(value), name
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(
            database_url="postgresql://chat:change-me-to-a-long-random-password@db/chat",
            jwt_secret=SECRET,
        )


def test_a_weak_metrics_token_is_refused():
    with pytest.raises(ValidationError, match="CHAT_METRICS_TOKEN"):
        Settings(database_url="postgresql://db/x", jwt_secret=SECRET, metrics_token="m" * 40)


def test_dev_auth_defaults_on_only_in_embedded_mode_on_loopback():
    assert Settings(database_url="postgresql://db/x", jwt_secret=SECRET).dev_auth_enabled is False
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert Settings(embedded=True, listen_host=host).dev_auth_enabled is True, host
    for host in (ANY, "::", "192.168.1.10", "example.com", "", None):
        assert Settings(embedded=True, listen_host=host).dev_auth_enabled is False, host
    assert Settings(embedded=True, listen_host="::1", dev_auth=False).dev_auth_enabled is False
    explicit = Settings(embedded=True, listen_host=ANY, dev_auth=True)
    assert explicit.dev_auth_enabled is True  # on purpose: the server then warns at start


def test_docs_are_public_on_loopback_or_when_asked():
    assert Settings(listen_host="127.0.0.1").docs_enabled is True
    assert Settings(listen_host=ANY).docs_enabled is False
    assert Settings(listen_host=ANY, public_docs=True).docs_enabled is True
    assert Settings(listen_host="127.0.0.1", public_docs=False).docs_enabled is False


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAT_DATABASE_URL", "postgresql://u@h:5432/d")
    monkeypatch.setenv("CHAT_JWT_SECRET", SECRET)
    monkeypatch.setenv("CHAT_HISTORY_LIMIT", "7")
    monkeypatch.setenv("CHAT_MAX_MESSAGE_CHARS", "100")
    settings = Settings()
    assert (settings.history_limit, settings.max_message_chars) == (7, 100)
    assert settings.sqlalchemy_url == "postgresql+asyncpg://u@h:5432/d"
    assert settings.listen_dsn == "postgresql://u@h:5432/d"
    assert settings.notify_in_transaction


def test_public_key_tokens_verify_and_refuse_hs256_confusion():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    codec = TokenCodec(Settings(database_url="postgresql://d/x", jwt_public_key=public))
    good = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, key, algorithm="ES256")
    assert codec.verify(good).user_id == "eve"
    assert not codec.can_issue
    with pytest.raises(NotAuthenticated):
        codec.verify(jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, SECRET))


def test_authorization_header_must_be_bearer():
    with pytest.raises(NotAuthenticated):
        extract_token(authorization="Basic abc", cookie=None, query=None)
    assert extract_token(authorization=None, cookie="c", query="q").origin == "cookie"
    assert extract_token(authorization=None, cookie=None, query="q").origin == "query"
    assert extract_token(authorization=None, cookie=None, query=None) is None


def test_name_claim_is_optional():
    codec = TokenCodec(Settings(database_url="postgresql://d/x", jwt_secret=SECRET))
    principal = codec.verify(codec.issue("zoe", ttl=60, name="Zoe Z"))
    assert (principal.user_id, principal.name) == ("zoe", "Zoe Z")


def test_the_principal_carries_the_tokens_exp_as_given():
    """What a websocket's deadline is set from (``service.realtime.websocket``)."""
    codec = TokenCodec(Settings(database_url="postgresql://d/x", jwt_secret=SECRET))
    exp = int(time.time()) + 60
    principal = codec.verify(jwt.encode({"sub": "ann", "exp": exp}, SECRET))
    assert principal.expires_at == exp
    assert isinstance(principal.expires_at, int)  # auth_ok echoes it: no ".0" added
    assert codec.verify(jwt.encode({"sub": "ann", "exp": exp + 0.5}, SECRET)).expires_at == (
        exp + 0.5
    )


def test_a_verified_token_is_remembered_until_it_expires():
    now = [time.time()]
    codec = TokenCodec(
        Settings(database_url="postgresql://d/x", jwt_secret=SECRET), clock=lambda: now[0]
    )
    token = codec.issue("ann", ttl=60)
    assert codec.verify(token).user_id == "ann"
    assert codec.verify(token).user_id == "ann"  # from the cache
    now[0] += 60 + LEEWAY - 1
    assert codec.verify(token).user_id == "ann"
    now[0] += 2
    with pytest.raises(NotAuthenticated, match="expired"):
        codec.verify(token)
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):  # a refusal is not remembered as a success
        with pytest.raises(NotAuthenticated, match="invalid"):
            codec.verify(forged)


def test_the_verified_token_cache_is_bounded():
    codec = TokenCodec(Settings(database_url="postgresql://d/x", jwt_secret=SECRET))
    tokens = [codec.issue(f"u{i}", ttl=60) for i in range(VERIFIED_CACHE_SIZE + 10)]
    assert [codec.verify(t).user_id for t in tokens] == [f"u{i}" for i in range(len(tokens))]
    assert len(codec._verified) == VERIFIED_CACHE_SIZE
    assert codec.verify(tokens[0]).user_id == "u0"  # evicted, verified again
