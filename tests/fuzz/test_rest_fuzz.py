"""Fuzzing the REST API against a real server: Schemathesis from the live OpenAPI document, and
Hypothesis on the history query parameters and on raw request bodies."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Err
from schemathesis.generation.modes import GenerationMode

from tests.fuzz.rules import (
    ASSIGNED_ID,
    MAX_SEQ,
    NOT_JSON,
    ROOM_NAME,
    message_problems,
    nesting,
    parse,
    valid_room,
)
from tests.fuzz.strategies import (
    encoded,
    json_values,
    message_dicts,
    text_frames,
    weighted,
)
from tests.support import ServerProcess, make_token

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {make_token('fuzzer', ttl=24 * 3600)}"}
SEEDED = 25  # messages in the room whose history is read
DEEP = 200  # nesting from which valid JSON may be refused as unreadable (400)
FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written to the work tree; a failure prints a reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- Schemathesis: every operation of the live OpenAPI document -------------------------------


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "headers": AUTH,
            "checks": {
                # Positive data is data the schema allows, but the OpenAPI document cannot express
                # every rule the API enforces (a non-blank body without NUL, before > after):
                # such requests rightly get 422. Every other check runs, among them
                # not_a_server_error, status_code_conformance, content_type_conformance,
                # response_headers_conformance, response_schema_conformance and
                # negative_data_rejection.
                "positive_data_acceptance": {"enabled": False},
            },
        }
    )
    return schemathesis.openapi.from_url(f"{server.http}/openapi.json", config=config, timeout=10)


def has_inputs(operation: Any) -> bool:
    return any(True for _ in operation.iter_parameters()) or bool(operation.body)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_every_operation_answers_within_its_documented_contract(api_schema, mode, subtests):
    """Every operation of the live document, each reported on its own (as a subtest)."""
    results = list(api_schema.get_all_operations())
    assert len(results) >= 5
    for result in results:
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        with subtests.test(msg=operation.label):
            if mode is GenerationMode.NEGATIVE and not has_inputs(operation):
                continue  # nothing there to get wrong

            @settings(max_examples=30, deadline=None, database=None, print_blob=True)
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                case.call_and_validate(timeout=10)

            call()


# --- Hypothesis: the query parameters of GET /rooms/{room}/messages ---------------------------


def path_segment(room: str) -> str:
    segment = quote(room, safe="")
    # "." and ".." would be resolved away as dot segments: send them escaped.
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


UNKNOWN: Any = object()
"""A parameter the service may or may not read as an integer (``1.0``, ``1_0``...)."""


def as_int(value: int | str | None) -> int | None | Any:
    """What the service must read a query parameter as: None when absent, an int for plain
    decimal digits, UNKNOWN for anything else (the test then only asks for 200 or 422)."""
    if value is None or isinstance(value, int):
        return value
    if re.fullmatch(r"\s*[+-]?[0-9]+\s*", value, re.ASCII):
        try:
            return int(value)
        except ValueError:  # more digits than Python converts: refusing them is right too
            return UNKNOWN
    return UNKNOWN


SQLISH = [
    "1 OR 1=1",
    "1; DROP TABLE message; --",
    "' OR ''='",
    "1' --",
    "1)--",
    "0x10",
    "1e3",
    "1.0",
    "1.5",
    " 1 ",
    "+1",
    "-0",
    "007",
    "1_0",
    "\u0661\u0662",  # Arabic-Indic digits
    "NaN",
    "inf",
    "null",
    "true",
    "",
    "[1]",
    "%00",
    "\x00",
    "1\x00",
    "$1",
    "${jndi:ldap://x}",
    "../../etc/passwd",
    "9" * 30,
    "9" * 5000,
]
edge_ints = st.sampled_from(
    [-1, 0, 1, 499, 500, 501, 1000, MAX_SEQ - 1, MAX_SEQ, MAX_SEQ + 1, 2**63 - 1, 2**63, 2**64]
    + [-(2**31), -(2**63), -(2**63) - 1]
)
query_strings = st.one_of(
    st.sampled_from(SQLISH),
    st.text(max_size=30),
    st.from_regex(r"[-+ ]?[0-9_]{1,25}(\.[0-9]*)?", fullmatch=True),
)
limits = weighted(
    (3, st.none()),
    (4, st.integers(1, SEEDED + 3)),
    (1, edge_ints),
    (1, st.integers() | st.integers(-(2**100), 2**100)),
    (1, query_strings),
)
cursors = weighted(
    (3, st.none()),
    (4, st.integers(0, SEEDED + 3)),
    (1, edge_ints),
    (1, st.integers() | st.integers(-(2**100), 2**100)),
    (1, query_strings),
)
SEEDED_ROOM = "<the seeded room>"
rooms = weighted(
    (4, st.just(SEEDED_ROOM)),
    (1, st.from_regex(ROOM_NAME, fullmatch=True)),
    (1, st.text(min_size=1, max_size=70)),
    (
        1,
        st.sampled_from(
            [
                "'; DROP TABLE room; --",
                "lobby' OR '1'='1",
                "robert'); DROP TABLE message;--",
                "a b",
                ".",
                "..",
                "...",
                "a/b",
                "%",
                "%2F",
                "a\nb",
                "x\n",
                "\x00",
                "\U0001f642",
                "a" * 64,
                "a" * 65,
                "r\u00e9sum\u00e9",
            ]
        ),
    ),
)


@pytest.fixture(scope="module")
def seeded_room(server: ServerProcess) -> str:
    """A room with messages 1..SEEDED that nobody else writes to."""
    room = f"fuzz-history-{uuid.uuid4().hex[:12]}"
    token = make_token(f"seeder-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=server.http, headers={"Authorization": f"Bearer {token}"}) as client:
        for n in range(1, SEEDED + 1):
            r = client.post(f"/rooms/{room}/messages", json={"body": f"message {n}"}, timeout=10)
            assert r.status_code == 201 and r.json()["seq"] == n, r.text
    return room


@dataclass(frozen=True)
class PageQuery:
    room: str
    limit: int | None | Any
    before: int | None | Any
    after: int | None | Any

    def expected_statuses(self, seeded: bool) -> set[int]:
        """``seeded``: the room holds messages; another name is 404 unless something (another
        example, another test) has used it."""
        found = {200} if seeded else {200, 404}
        if "/" in self.room:
            return {404}  # a slash, even escaped, splits the path: no such route
        if not valid_room(self.room):
            return {422}
        if UNKNOWN in (self.limit, self.before, self.after):
            return {*found, 422}
        if self.limit is not None and not 1 <= self.limit <= 500:
            return {422}
        for cursor in (self.before, self.after):
            if cursor is not None and not 0 <= cursor <= MAX_SEQ:
                return {422}
        if self.before is not None and self.after is not None and self.before <= self.after:
            return {422}
        return found


def check_page(query: PageQuery, page: dict[str, Any], seeded: bool) -> None:
    assert page["room"] == query.room
    seqs = [m["seq"] for m in page["messages"]]
    assert seqs == sorted(set(seqs)), "not ascending by seq"
    assert all(m["room"] == query.room for m in page["messages"])
    assert all(seq <= page["last_seq"] for seq in seqs)
    limit = 50 if query.limit is None else query.limit
    if limit is not UNKNOWN:
        assert len(seqs) <= limit
    assert len(seqs) <= 500
    if isinstance(query.after, int):
        assert all(seq > query.after for seq in seqs), "a message at or before 'after'"
    if isinstance(query.before, int):
        assert all(seq < query.before for seq in seqs), "a message at or after 'before'"
    if seqs:
        assert page["next_before"] in (None, seqs[0])
        assert page["next_after"] in (None, seqs[-1])
    else:
        assert page["next_before"] is None and page["next_after"] is None
    if not seeded or UNKNOWN in (query.limit, query.before, query.after):
        return
    # The seeded room holds exactly 1..SEEDED: the page is known.
    assert page["last_seq"] == SEEDED
    upper = SEEDED if query.before is None else min(SEEDED, query.before - 1)
    if query.after is not None:
        want = list(range(query.after + 1, min(upper, query.after + limit) + 1))
    else:
        want = list(range(max(1, upper - limit + 1), upper + 1))
    assert seqs == want
    assert [m["body"] for m in page["messages"]] == [f"message {seq}" for seq in want]
    lower = query.after or 0  # the older end of the window asked for
    assert page["next_before"] == (want[0] if want and want[0] > lower + 1 else None)
    assert page["next_after"] == (want[-1] if want and want[-1] < upper else None)


def test_history_query_parameters_get_a_page_or_422_never_a_server_error(server, seeded_room):
    with httpx.Client(base_url=server.http, headers=AUTH, timeout=10) as client:

        @FUZZ_SETTINGS
        @given(room=rooms, limit=limits, before=cursors, after=cursors)
        @example(room=SEEDED_ROOM, limit=None, before=None, after=None)
        @example(room=SEEDED_ROOM, limit=1, before=MAX_SEQ, after=MAX_SEQ - 1)
        @example(room="x\n", limit=None, before=None, after=None)
        def read(room: str, limit: Any, before: Any, after: Any) -> None:
            seeded = room == SEEDED_ROOM
            room = seeded_room if seeded else room
            params = {"limit": limit, "before": before, "after": after}
            sent = {name: str(value) for name, value in params.items() if value is not None}
            query = PageQuery(room, *(as_int(value) for value in params.values()))
            r = client.get(f"/rooms/{path_segment(room)}/messages", params=sent)
            allowed = query.expected_statuses(seeded)
            assert r.status_code in allowed, (
                f"GET {r.request.url} answered {r.status_code} {r.text[:500]}; "
                f"expected {sorted(allowed)}"
            )
            if r.status_code == 200:
                try:
                    check_page(query, r.json(), seeded)
                except AssertionError as exc:
                    raise AssertionError(f"GET {r.request.url}: {exc}\n{r.text[:1000]}") from None
            else:
                assert r.json()["detail"]

        read()


# --- Hypothesis: raw request bodies ------------------------------------------------------------


dev_token_dicts = st.fixed_dictionaries(
    {},
    optional={
        "user": st.one_of(
            st.from_regex(ROOM_NAME, fullmatch=True),
            st.text(max_size=70),
            st.sampled_from(["\ud800", "a\udfff", "x\n", "a" * 65, "' OR 1=1 --"]),
            json_values,
        )
    },
)
request_bodies = st.one_of(
    encoded(message_dicts),
    encoded(dev_token_dicts),
    encoded(json_values),
    text_frames,
)


def expected_post_statuses(text: str, accepts: Any) -> set[int]:
    """Statuses allowed for a JSON request body: ``accepts(value)`` says if the parsed body is
    valid. Unreadable bodies get 400 or 422; NaN and Infinity (not JSON, but Python's json reads
    them) may be refused as unreadable too."""
    strict = parse(text)
    value = strict if strict is not NOT_JSON else parse(text, strict=False)
    statuses = set()
    if strict is NOT_JSON or nesting(text) >= DEEP:
        statuses |= {400, 422}
    if value is not NOT_JSON:
        statuses.add(201 if accepts(value) else 422)
    return statuses


def valid_message(value: Any) -> bool:
    return isinstance(value, dict) and not message_problems(
        value.get("body"), value.get("client_msg_id")
    )


def valid_dev_login(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("user"), str) and valid_room(value["user"])
    )


# Inputs that once broke the service, tried on every run before the random ones.
MESSAGE_BODY_EXAMPLES = [
    '{"body": ["\\ud800"]}',
    '{"body": "ok", "client_msg_id": ["\\ud800"]}',
    '{"body": 1e400}',
    "NaN",
]
DEV_TOKEN_EXAMPLES = ['{"user": "\\ud800"}', '{"name": "\\ud800"}', '{"user": -Infinity}', "NaN"]


def test_any_message_body_is_stored_or_refused_never_a_server_error(server):
    room = f"fuzz-bodies-{uuid.uuid4().hex[:12]}"
    user = f"fuzz-{uuid.uuid4().hex[:12]}"
    stored: dict[str, dict[str, Any]] = {}  # by client_msg_id
    # No keep-alive: a connection the server drops after one answer cannot fail the next.
    with httpx.Client(
        base_url=server.http,
        headers={"Authorization": f"Bearer {make_token(user)}"},
        limits=httpx.Limits(max_keepalive_connections=0),
        timeout=10,
    ) as client:

        @FUZZ_SETTINGS
        @given(text=request_bodies)
        def post(text: str) -> None:
            r = client.post(
                f"/rooms/{room}/messages",
                content=text.encode(),
                headers={"Content-Type": "application/json"},
            )
            allowed = expected_post_statuses(text, valid_message)
            if 201 in allowed:
                allowed.add(429)  # flood control
            assert r.status_code in allowed, (
                f"POST {text[:300]!r} answered {r.status_code} {r.text[:300]}; "
                f"expected {sorted(allowed)}"
            )
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
            if r.status_code != 201:
                assert r.json()["detail"]
                return
            sent, message = parse(text, strict=False), r.json()
            assert (message["room"], message["author"]) == (room, user)
            client_msg_id = sent.get("client_msg_id")
            if client_msg_id in stored:  # a resend: the original comes back
                assert message == stored[client_msg_id]
                assert r.headers["Idempotent-Replayed"] == "true"
                return
            if client_msg_id is None:  # the server gave it one
                assert ASSIGNED_ID.fullmatch(message["client_msg_id"]), message
                client_msg_id = message["client_msg_id"]
            assert (message["body"], message["client_msg_id"]) == (sent["body"], client_msg_id)
            stored[client_msg_id] = message

        for text in MESSAGE_BODY_EXAMPLES:
            post = example(text=text)(post)
        post()


def test_any_dev_login_body_gets_a_token_or_refused_never_a_server_error(server):
    with httpx.Client(
        base_url=server.http, limits=httpx.Limits(max_keepalive_connections=0), timeout=10
    ) as client:

        @FUZZ_SETTINGS
        @given(text=request_bodies)
        def login(text: str) -> None:
            r = client.post(
                "/auth/dev-token",
                content=text.encode(),
                headers={"Content-Type": "application/json"},
            )
            allowed = {
                200 if s == 201 else s for s in expected_post_statuses(text, valid_dev_login)
            }
            assert r.status_code in allowed, (
                f"POST {text[:300]!r} answered {r.status_code} {r.text[:300]}; "
                f"expected {sorted(allowed)}"
            )
            if r.status_code == 200:
                assert r.json()["user"] == parse(text, strict=False)["user"]
                assert r.json()["token"]
            else:
                assert r.json()["detail"]

        for text in DEV_TOKEN_EXAMPLES:
            login = example(text=text)(login)
        login()


@pytest.mark.parametrize("path", ["/rooms/fuzz-deep/messages", "/auth/dev-token"])
def test_json_nested_about_as_deep_as_python_reads_is_refused_not_a_server_error(server, path):
    """Fuzzing found a window of depths (just under the recursion limit) that is read, then
    breaks the 422 answer; every depth around the limit is tried here, not only by chance."""
    shapes = {
        "array": lambda n: "[" * n + "]" * n,
        "in a field": lambda n: '{"body": ' + "[" * n + "]" * n + ', "user": {}}',
    }
    answers: dict[tuple[str, int], list[int]] = {}
    with httpx.Client(
        base_url=server.http,
        headers={**AUTH, "Content-Type": "application/json"},
        limits=httpx.Limits(max_keepalive_connections=0),
        timeout=10,
    ) as client:
        for depth in range(850, 1051):
            for name, shape in shapes.items():
                r = client.post(path, content=shape(depth))
                if r.status_code not in (400, 422):
                    answers.setdefault((name, r.status_code), []).append(depth)
    assert not answers, {
        f"{name}: {status}": f"depths {min(depths)}..{max(depths)}"
        for (name, status), depths in answers.items()
    }
