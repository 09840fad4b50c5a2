"""docs/protocol.md's error and close code tables against the tree in ``service.errors``, both
ways: a code the tree has and the docs lack fails, and so does one the docs have and the tree
lacks."""

from __future__ import annotations

import re
from pathlib import Path

from service import errors
from service.errors import ChatError, InvalidMessage, OutboxEnded

PROTOCOL = Path(__file__).parents[2] / "docs" / "protocol.md"


def tree() -> list[type[ChatError]]:
    """Every class of the tree that names its own code: all but the root, ``InvalidMessage``
    and ``OutboxEnded``, which group them."""
    found: list[type[ChatError]] = []
    pending: list[type[ChatError]] = [ChatError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not ChatError and "code" in vars(cls):
            found.append(cls)
    return found


def table(heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table after ``heading``, without its header."""
    lines = PROTOCOL.read_text().splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table under {heading!r}"
    return rows[2:]  # the header and the |---| line


def codes(rows: list[list[str]]) -> dict[str, list[str]]:
    """The rows by the code in their first cell, where it is one (``code``)."""
    by_code: dict[str, list[str]] = {}
    for row in rows:
        match = re.fullmatch(r"`([a-z_]+)`", row[0])
        if match:
            assert match[1] not in by_code, f"{match[1]} documented twice"
            by_code[match[1]] = row
    return by_code


def test_the_tree_is_loaded_and_every_code_is_unique():
    classes = tree()
    names = [cls.code for cls in classes]
    assert len(names) == len(set(names))
    # Everything errors.py defines as a ChatError is reached from the root: nothing is left out.
    defined = {
        obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, ChatError)
    }
    assert defined - {ChatError, InvalidMessage, OutboxEnded} == set(classes)


def test_websocket_error_frame_codes_match_the_docs():
    documented = set(codes(table("### Error codes (the connection stays open)")))
    assert documented == {cls.code for cls in tree() if cls.frame}


def test_close_codes_match_the_docs():
    documented = {int(row[0]) for row in table("## Close codes") if re.fullmatch(r"\d{4}", row[0])}
    assert documented == {cls.close_code for cls in tree() if cls.close_code is not None}


def test_http_codes_and_statuses_match_the_docs():
    """Validation codes are answered in FastAPI's own 422 shape (the code as ``type``), so the
    HTTP table names the others; the websocket table holds those."""
    documented = {
        code: int(row[1]) for code, row in codes(table("### Error codes over HTTP")).items()
    }
    expected = {
        cls.code: cls.http_status
        for cls in tree()
        if cls.http_status is not None and not issubclass(cls, InvalidMessage)
    }
    assert documented == expected


def test_http_answers_carry_what_the_client_needs_to_retry():
    """What the REST handler and the websocket's 429 send: the wait, rounded up to whole
    seconds, where the tree has one; the id to resend with; the auth scheme on a 401."""
    assert errors.RateLimited(2.5).headers() == {"Retry-After": "3"}
    assert errors.Overloaded(0.2).headers() == {"Retry-After": "1"}
    assert errors.TooManyConnections("too many").headers() == {"Retry-After": "5"}
    assert errors.Unavailable("down").headers() == {}
    assert errors.NotAuthenticated("no").headers() == {"WWW-Authenticate": "Bearer"}
    assert errors.OutcomeUnknown("maybe", "~Qm3c0Zr8xT1a.17").body() == {
        "detail": "maybe",
        "code": "outcome_unknown",
        "client_msg_id": "~Qm3c0Zr8xT1a.17",
    }
    assert errors.BodyTooLarge(10).body() == {
        "detail": "request body larger than 10 bytes",
        "code": "too_large",
    }
