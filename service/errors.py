"""The error tree, and the one map from errors to HTTP statuses and websocket close codes.

    ChatError                  base; ``code`` is the machine-readable name clients see
    +-- NotAuthenticated       missing, malformed, expired or wrongly signed token
    |                          -> HTTP 401, websocket refused before accept (1008)
    +-- InvalidMessage         a message the rules refuse (empty, too long, bad id)
    |                          -> HTTP 422, websocket error frame (connection stays open)
    +-- Unavailable            nothing was stored: the database cannot be reached right now
    |   |                      -> HTTP 503, websocket error frame ``unavailable`` (no ack sent)
    |   +-- Overloaded         nothing was stored: the writer's queue is full (``retry_after``)
    |                          -> HTTP 503 with Retry-After, error frame ``overloaded``
    +-- OutcomeUnknown         the send may have been stored (the database stopped answering
                               after it was sent): retry with the same ``client_msg_id``
                               -> HTTP 503, websocket error frame ``outcome_unknown``

A send's ``Unavailable`` and ``OutcomeUnknown`` carry its ``client_msg_id`` (the server assigns
one when the client gave none), so the client can retry without storing the message twice.

Anything else is a bug: REST answers 500 without details, a websocket closes with 1011, and
the server log carries the traceback. No error path puts SQL, tracebacks or secrets on the wire.

Start-up failures are a tree of their own, mapped to the CLI's exit codes (docs/operations.md):
the CLI logs them as one line in the configured format and exits with ``exit_code``.

    StartupError               the service cannot serve                        -> exit 1
    +-- InvalidSettings        a setting is missing, malformed or unsafe       -> exit 2
    +-- DatabaseUnreachable    no connection (refused, timeout, bad password)  -> exit 3
    +-- SchemaMismatch         schema behind this release's head (migrate), or -> exit 4
                               migrated past what this release runs against
"""

from __future__ import annotations

WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013


class ChatError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotAuthenticated(ChatError):
    code = "not_authenticated"
    http_status = 401


class InvalidMessage(ChatError):
    http_status = 422

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class Unavailable(ChatError):
    code = "unavailable"
    http_status = 503

    def __init__(self, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(detail)
        self.client_msg_id = client_msg_id


class Overloaded(Unavailable):
    code = "overloaded"

    def __init__(self, retry_after: float) -> None:
        super().__init__("the service is storing as fast as it can; retry later")
        self.retry_after = retry_after


class OutcomeUnknown(ChatError):
    code = "outcome_unknown"
    http_status = 503

    def __init__(self, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(detail)
        self.client_msg_id = client_msg_id


EXIT_ERROR = 1
EXIT_INVALID_SETTINGS = 2
EXIT_DATABASE_UNREACHABLE = 3
EXIT_SCHEMA_MISMATCH = 4
EXIT_INTERRUPTED = 130


class StartupError(RuntimeError):
    """The service cannot serve: said once, clearly, at start-up rather than on each request."""

    exit_code = EXIT_ERROR


class InvalidSettings(StartupError):
    exit_code = EXIT_INVALID_SETTINGS


class DatabaseUnreachable(StartupError):
    exit_code = EXIT_DATABASE_UNREACHABLE


class SchemaMismatch(StartupError):
    exit_code = EXIT_SCHEMA_MISMATCH
