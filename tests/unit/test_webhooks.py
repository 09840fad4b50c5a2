"""Webhook pieces that need no server: the signature (checked with the receiver's code from
docs/webhooks.md, not the service's), the backoff's bounds, URL checks and the settings that
are refused at start-up."""

from __future__ import annotations

import secrets

import pytest
from pydantic import ValidationError

from service.chat.webhooks import backoff, check_url, signature
from service.config import Settings
from tests.webhook_receiver import verify

SECRET = secrets.token_urlsafe(48)
DB = "postgresql://db/chat"
JWT = secrets.token_urlsafe(48)


def test_the_signature_verifies_with_the_documented_check_and_only_with_it():
    body = '{"type":"message","room":"r","seq":1,"body":"héllo"}'.encode()
    import time

    header = signature(SECRET.encode(), int(time.time()), body)
    assert header.startswith("t=") and ",v1=" in header
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")
    assert not verify(SECRET + "x", header, body)
    stale = signature(SECRET.encode(), int(time.time()) - 3600, body)
    assert not verify(SECRET, stale, body)  # an old capture is refused by the tolerance


def test_the_documented_snippet_verifies_a_signature():
    """docs/webhooks.md's Python snippet, run as a receiver would copy it."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "webhooks.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own doc
    import time

    body = b'{"type":"message","seq":7}'
    header = signature(SECRET.encode(), int(time.time()), body)
    check = namespace["verify_signature"]
    assert callable(check)
    assert check(SECRET, header, body) is True
    assert check(SECRET, header, body[:-1]) is False
    assert check(SECRET, "garbage", body) is False


@pytest.mark.parametrize("attempts", range(1, 40))
def test_backoff_doubles_with_jitter_and_is_capped(attempts):
    delay = backoff(attempts, base=1.0, cap=300.0)
    full = min(300.0, 2.0 ** (attempts - 1))
    assert full / 2 <= delay <= full


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.example.com/chat", True),
        ("http://127.0.0.1:8080/hook?token=abc", True),
        ("ftp://example.com/", False),
        ("https://", False),
        ("example.com/hook", False),
        ("https://example.com/a b", False),
        ("https://example.com:70000/", False),
        ("https://example.com/" + "x" * 2000, False),
        ("https://exa\u0000mple.com/", False),
    ],
)
def test_receiver_urls(url, ok):
    assert (check_url(url) is None) is ok


def test_a_url_needs_a_strong_secret(monkeypatch):
    for name in ("CHAT_WEBHOOK_URL", "CHAT_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="CHAT_WEBHOOK_SECRET"):
        Settings(database_url=DB, jwt_secret=JWT, webhook_url="https://h.example.com/x")
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        Settings(
            database_url=DB,
            jwt_secret=JWT,
            webhook_url="https://h.example.com/x",
            webhook_secret="short-secret",
        )
    with pytest.raises(ValidationError, match="CHAT_WEBHOOK_URL must be"):
        Settings(database_url=DB, jwt_secret=JWT, webhook_url="ftp://x", webhook_secret=SECRET)
    with pytest.raises(ValidationError, match="CHAT_WEBHOOK_BACKOFF_MAX"):
        Settings(
            database_url=DB,
            jwt_secret=JWT,
            webhook_secret=SECRET,
            webhook_backoff=10,
            webhook_backoff_max=5,
        )
    ok = Settings(
        database_url=DB,
        jwt_secret=JWT,
        webhook_url="https://h.example.com/x",
        webhook_secret=SECRET,
    )
    assert ok.webhooks_enabled
    unset = Settings(database_url=DB, jwt_secret=JWT, webhook_url="", webhook_secret="")
    assert unset.webhook_url is None and not unset.webhooks_enabled
