"""The error tree: every error a client can see, each with its code, HTTP status and websocket
close code in one place. The REST exception handlers and the websocket endpoint answer through
these attributes only; docs/protocol.md's tables are checked against them
(tests/unit/test_error_tree.py).

    ChatError                      ``code`` (what clients see), ``http_status``, ``close_code``
    |                              (None: never closes a websocket), ``frame`` (an ``error`` frame
    |                              on an open websocket, which stays open)
    +-- NotAuthenticated           not_authenticated: missing, malformed, expired or wrongly
    |                              signed token -> HTTP 401, websocket refused before accept (1008)
    +-- AuthRefused                auth_refused: an ``auth`` frame's token is invalid, expired or
    |                              another user's -> error frame; the socket keeps its deadline
    +-- InvalidMessage             a frame or message the rules refuse -> HTTP 422 (FastAPI's
    |   |                          validation shape, the code as ``type``), error frame
    |   +-- InvalidJson            invalid_json: the frame is not JSON
    |   +-- InvalidFrame           invalid_frame: not an object, or ``body`` (``auth``: ``token``)
    |   |                          not a string
    |   +-- UnknownType            unknown_type: ``type`` is not ``send``, ``ping`` or ``auth``
    |   +-- BinaryNotSupported     binary_not_supported: a binary frame
    |   +-- EmptyBody              empty_body
    |   +-- BodyTooLong            body_too_long
    |   +-- InvalidBody            invalid_body: NUL, or not valid Unicode
    |   +-- InvalidEmoji           invalid_emoji: not one emoji (sequence), or too long
    |   +-- InvalidClientMsgId     invalid_client_msg_id
    +-- RateLimited                rate_limited: over a send, connect, replay or ``auth`` budget
    |                              -> HTTP 429 with Retry-After, error frame (``retry_after``);
    |                              a refused connect the server cannot answer 429 closes 1013
    +-- TooManyConnections         too_many_connections: over the user's open websockets
    |                              -> HTTP 429 with Retry-After, or 1013 as above
    +-- Unavailable                unavailable: nothing was stored, the database cannot be
    |   |                          reached -> HTTP 503, error frame; 1013 when it ends a socket
    |   +-- Overloaded             overloaded: nothing was stored, the writer's queue is full
    |                              -> HTTP 503 with Retry-After, error frame (``retry_after``)
    +-- OutcomeUnknown             outcome_unknown: the send may have been stored (the database
    |                              stopped answering after it was sent): retry with the same
    |                              ``client_msg_id`` -> HTTP 503, error frame
    +-- OutboxEnded                the server stopped feeding a socket its room (resume with
    |   |                          ``since``)
    |   +-- SlowConsumer           slow_consumer: the connection fell too far behind -> 1013
    |   +-- StreamLost             stream_lost: the room's live stream in this process failed
    |   |                          (a bug, logged) -> 1011
    |   +-- TokenExpired           token_expired: the socket's token reached its ``exp`` and no
    |   |                          ``auth`` frame renewed it -> 4401
    |   +-- AccessRevoked          access_revoked: the user lost the room (removed, left, room
    |                              deleted) -> 4403
    +-- NotFound                   not_found: no such room, or a room the caller may not see;
    |                              no such message to edit or delete -> HTTP 404, error frame
    +-- Forbidden                  forbidden: visible, but not allowed -> HTTP 403, error frame
    |                              (a send after removal); a refused handshake (403, or 4403)
    +-- AlreadyDeleted             already_deleted: an edit or delete of a deleted message
    |                              -> HTTP 409, error frame
    +-- TooManyReactions           too_many_reactions: a new emoji on a message that has the
    |                              most allowed -> HTTP 409, error frame
    +-- RoomExists                 room_exists: the name is taken -> HTTP 409
    +-- OwnerMustHandOver          owner_must_hand_over: the owner leaves after handing over
    |                              -> HTTP 409
    +-- BodyTooLarge               too_large: a request body over ``CHAT_MAX_BODY_BYTES`` -> 413
    +-- InternalError              internal: a bug -> HTTP 500 without details, 1011; the
    |                              server log carries the traceback
    +-- InvalidUtf8                invalid_utf8: a text frame that is not UTF-8 -> 1007
    +-- MessageTooBig              message_too_big: a frame over the size limit -> 1009 (uvicorn)
    +-- ServiceRestart             service_restart: the process is stopping -> 1012 (uvicorn)

The last three are closes of the websocket protocol itself (uvicorn's, and for 1007 the fast
path's in ``service.realtime.uvicorn_ws``): nothing raises them; they are here so the tree names
every close a client can see.

A send's ``Unavailable`` and ``OutcomeUnknown`` carry its ``client_msg_id`` (the server assigns
one when the client gave none), so the client can retry without storing the message twice.
Anything not in the tree is a bug, answered as ``InternalError``. No error path puts SQL,
tracebacks or secrets on the wire.

Start-up failures are a tree of their own, mapped to the CLI's exit codes (docs/operations.md):
the CLI logs them as one line in the configured format and exits with ``exit_code``.

    StartupError               the service cannot serve                        -> exit 1
    +-- InvalidSettings        a setting is missing, malformed or unsafe       -> exit 2
    +-- DatabaseUnreachable    no connection (refused, timeout, bad password)  -> exit 3
    +-- SchemaMismatch         schema behind this release's head (migrate), or -> exit 4
                               migrated past what this release runs against
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

WS_INVALID_DATA = 1007
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_INTERNAL_ERROR = 1011
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013
WS_TOKEN_EXPIRED = 4401
"""In the application range (4000-4999): 401 as in HTTP, so a client tells it from 1008."""
WS_FORBIDDEN = 4403
"""403 as in HTTP: the user may no longer read the room (removed, left, the room deleted)."""


class ChatError(Exception):
    code: ClassVar[str] = "error"
    http_status: ClassVar[int | None] = 400
    """How REST (and a refused websocket handshake) answers it; None: websocket only."""
    close_code: ClassVar[int | None] = None
    """The close code when it ends or refuses a websocket; None: it never does."""
    frame: ClassVar[bool] = False
    """True when an open websocket answers it with an ``error`` frame and stays open."""
    retry_after: float | None = None
    """Seconds after which a retry may succeed: ``Retry-After`` and the frame's field."""
    client_msg_id: str | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def body(self) -> dict[str, Any]:
        """The JSON body of an HTTP answer."""
        content: dict[str, Any] = {"detail": self.detail, "code": self.code}
        if self.client_msg_id is not None:
            content["client_msg_id"] = self.client_msg_id
        return content

    def headers(self) -> dict[str, str]:
        """The headers of an HTTP answer."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class NotAuthenticated(ChatError):
    code = "not_authenticated"
    http_status = 401
    close_code: ClassVar[int] = WS_POLICY_VIOLATION

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class AuthRefused(ChatError):
    """An ``auth`` frame's token did not renew the socket: nothing changed, the socket still
    closes at its current token's ``exp``. The detail says why (``NotAuthenticated``'s, or
    that the token is another user's)."""

    code = "auth_refused"
    http_status = None
    frame = True


class InvalidMessage(ChatError):
    """The frame-level and message-level refusals; each subclass is one ``code``."""

    http_status = 422
    frame = True


class InvalidJson(InvalidMessage):
    code = "invalid_json"


class InvalidFrame(InvalidMessage):
    code = "invalid_frame"


class UnknownType(InvalidMessage):
    code = "unknown_type"


class BinaryNotSupported(InvalidMessage):
    code = "binary_not_supported"


class EmptyBody(InvalidMessage):
    code = "empty_body"


class BodyTooLong(InvalidMessage):
    code = "body_too_long"


class InvalidBody(InvalidMessage):
    code = "invalid_body"


class InvalidEmoji(InvalidMessage):
    code = "invalid_emoji"


class InvalidClientMsgId(InvalidMessage):
    code = "invalid_client_msg_id"


class RateLimited(ChatError):
    code = "rate_limited"
    http_status: ClassVar[int] = 429
    close_code: ClassVar[int] = WS_TRY_AGAIN_LATER
    frame = True
    retry_after: float

    def __init__(self, retry_after: float, detail: str | None = None) -> None:
        super().__init__(detail or f"too many messages; retry in {retry_after:.2f}s")
        self.retry_after = retry_after


class TooManyConnections(ChatError):
    code = "too_many_connections"
    http_status: ClassVar[int] = 429
    close_code: ClassVar[int] = WS_TRY_AGAIN_LATER
    retry_after = 5.0
    """A guess: nothing says when one of the user's connections will end."""


class Unavailable(ChatError):
    code = "unavailable"
    http_status = 503
    close_code: ClassVar[int | None] = WS_TRY_AGAIN_LATER  # None for Overloaded: only answered
    frame = True

    def __init__(self, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(detail)
        self.client_msg_id = client_msg_id


class Overloaded(Unavailable):
    code = "overloaded"
    close_code = None
    retry_after: float

    def __init__(self, retry_after: float) -> None:
        super().__init__("the service is storing as fast as it can; retry later")
        self.retry_after = retry_after


class OutcomeUnknown(ChatError):
    code = "outcome_unknown"
    http_status = 503
    frame = True

    def __init__(self, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(detail)
        self.client_msg_id = client_msg_id


class OutboxEnded(ChatError):
    """The server stopped feeding a socket its room (the subclass says why): the connection
    closes and the client resumes with ``since``. Raised by the writer of the socket's outbox."""

    http_status = None


class SlowConsumer(OutboxEnded):
    code = "slow_consumer"
    close_code: ClassVar[int] = WS_TRY_AGAIN_LATER

    def __init__(self, detail: str = "too far behind; reconnect with since") -> None:
        super().__init__(detail)


class StreamLost(OutboxEnded):
    """The room's live stream in this process failed (a bug, logged with the stream's error)."""

    code = "stream_lost"
    close_code: ClassVar[int] = WS_INTERNAL_ERROR

    def __init__(self, detail: str = "room stream lost; reconnect with since") -> None:
        super().__init__(detail)


class TokenExpired(OutboxEnded):
    """The token the socket runs on passed its ``exp``: the socket's timer ends its outbox."""

    code = "token_expired"
    close_code: ClassVar[int] = WS_TOKEN_EXPIRED

    def __init__(self, detail: str = "token expired; reconnect with a fresh token") -> None:
        super().__init__(detail)


class AccessRevoked(OutboxEnded):
    """The user lost the room while the socket was open: removed, left, the room deleted, or
    the never-used name it was open on made a private room. Reconnecting is refused."""

    code = "access_revoked"
    close_code: ClassVar[int] = WS_FORBIDDEN

    def __init__(self, detail: str = "you no longer have access to this room") -> None:
        super().__init__(detail)


class NotFound(ChatError):
    """No such room, or one the caller may not see (a private room they are not a member of:
    the same answer, so REST does not tell the two apart); no such member; no such message to
    edit or delete (an ``error`` frame on the websocket)."""

    code = "not_found"
    http_status = 404
    frame = True


class AlreadyDeleted(ChatError):
    """An edit or a delete of a message that is deleted."""

    code = "already_deleted"
    http_status = 409
    frame = True


class Forbidden(ChatError):
    """The caller sees the room but may not do this (a member managing members, a send after
    being removed); a websocket handshake to a room the user may not read is refused with it
    (HTTP 403, or 4403 right after accept where the server has no denial responses)."""

    code = "forbidden"
    http_status = 403
    close_code: ClassVar[int] = WS_FORBIDDEN
    frame = True


class TooManyReactions(ChatError):
    """A new emoji on a message that has ``MAX_DISTINCT_REACTIONS`` different ones."""

    code = "too_many_reactions"
    http_status = 409
    frame = True


class RoomExists(ChatError):
    code = "room_exists"
    http_status = 409


class OwnerMustHandOver(ChatError):
    """The owner leaves (or is made less) only after handing ownership over."""

    code = "owner_must_hand_over"
    http_status = 409


class BodyTooLarge(ChatError):
    """Raised from ``receive`` when a streamed body passes the cap (``service.http_guard``)."""

    code = "too_large"
    http_status: ClassVar[int] = 413

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")


class InternalError(ChatError):
    code = "internal"
    http_status: ClassVar[int] = 500
    close_code: ClassVar[int] = WS_INTERNAL_ERROR


class InvalidUtf8(ChatError):
    code = "invalid_utf8"
    http_status = None
    close_code: ClassVar[int] = WS_INVALID_DATA


class MessageTooBig(ChatError):
    code = "message_too_big"
    http_status = None
    close_code = WS_MESSAGE_TOO_BIG


class ServiceRestart(ChatError):
    code = "service_restart"
    http_status = None
    close_code = WS_SERVICE_RESTART


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
