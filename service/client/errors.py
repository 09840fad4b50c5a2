"""What the client raises, in one tree (as httpx's and websockets' exception modules do).

::

    ChatClientError                  anything this package raises on purpose
    ├── HTTPStatusError              a REST answer or a websocket handshake refused with a status
    │   └── Forbidden                403 ``forbidden`` at the handshake, or a socket closed with
    │                                4403: the user may not use the room (do not reconnect)
    ├── SendError                    an ``error`` frame that settles a send for good (a
    │                                validation code, ``not_found``, ``already_deleted``...):
    │                                nothing was stored
    ├── AuthError                    no token to connect with: the token expired (4401, or a
    │                                handshake refused as unauthenticated) and no
    │                                ``token_provider`` gave a fresh one
    ├── ConnectionLost               no connection could be made or kept for ``give_up_after``
    │                                seconds; unacked sends stay unknown: resend them with
    │                                their ``client_msg_id``
    ├── SendTimeout                  a send got no answer within its deadline: it may still be
    │                                stored, so resend it with the ``client_msg_id`` it names
    └── ProtocolError                the server sent something this client cannot read, or
                                     closed with a code that says the client is at fault (1007,
                                     1009)

Retryable answers (``rate_limited``, ``overloaded``, ``unavailable``, ``outcome_unknown``, a
dropped connection, 1011/1012/1013, 429 at the handshake) are never raised: the client waits and
retries them itself, which is its reason to exist.
"""

from __future__ import annotations


class ChatClientError(Exception):
    """The root of what ``service.client`` raises on purpose."""


class HTTPStatusError(ChatClientError):
    """A REST call or a websocket handshake answered with an error status.

    ``code`` is the body's machine-readable ``code`` (``not_found``, ``room_exists``...;
    ``validation`` for FastAPI's 422 shape, ``http_<status>`` when the body had none)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: object = None,
        *,
        retry_after: float | None = None,
        client_msg_id: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        self.client_msg_id = client_msg_id


class Forbidden(HTTPStatusError):
    """The user may not use the room (any more): reconnecting would only be refused again."""


class SendError(ChatClientError):
    """A send (or edit, delete, react) refused for good; nothing of it was stored."""

    def __init__(self, code: str, detail: str, client_msg_id: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.client_msg_id = client_msg_id


class AuthError(ChatClientError):
    """The token ran out and nothing can renew it."""


class ConnectionLost(ChatClientError):
    """Gave up reconnecting after ``give_up_after`` seconds without a usable connection."""


class SendTimeout(ChatClientError, TimeoutError):
    """No answer within the send's deadline: the outcome is unknown, resend with the same id."""

    def __init__(self, client_msg_id: str) -> None:
        super().__init__(f"no answer to send {client_msg_id!r}; resend it with that id")
        self.client_msg_id = client_msg_id


class ProtocolError(ChatClientError):
    """A frame or close this client cannot make sense of: a bug on one side, not a fault."""
