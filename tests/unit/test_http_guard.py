"""Token redaction in log lines, and the HTTP guard's settings."""

from __future__ import annotations

import logging

import pytest

from service.cli import RedactTokens
from service.config import Settings
from tests.support import JWT_SECRET

SECRET = JWT_SECRET


def redacted(message: str, *args: object) -> str:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, message, args, None)
    RedactTokens().filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    "query",
    [
        "token=eyJ.secret.sig",
        "%74oken=eyJ.secret.sig",
        "%74%6F%6B%65%6E=eyJ.secret.sig",
        "TOKEN%3Deyj.secret.sig",
        "history=5&%74oken=eyJ.secret.sig&since=3",
    ],
)
def test_tokens_are_redacted_however_the_key_is_encoded(query):
    line = redacted('%s - "GET /ws/rooms/a?%s HTTP/1.1" 101', "127.0.0.1:5000", query)
    assert "secret" not in line
    assert "[redacted]" in line


def test_lines_without_a_token_are_left_alone():
    assert redacted("GET /rooms?limit=%d&after=%s", 5, "x") == "GET /rooms?limit=5&after=x"


def test_the_body_cap_defaults_to_room_for_the_longest_message():
    base = {"database_url": "postgresql://db/x", "jwt_secret": SECRET}
    assert Settings(**base).body_limit == 64 * 1024
    assert Settings(**base, max_message_chars=100_000).body_limit == 100_000 * 12 + 4096
    assert Settings(**base, max_body_bytes=2048).body_limit == 2048
