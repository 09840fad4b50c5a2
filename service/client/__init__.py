"""A Python client for chat-service, and the protocol's reference implementation.

``ChatClient`` (``session.py``) resumes, resends, renews its token and reports resets, as
docs/protocol.md asks of every client; ``Connection`` (``connection.py``) is the raw socket it
is built on, for tests that need exact frames. It imports nothing from the server: it speaks
only the wire protocol, so it works against any deployment. docs/client.md is the user guide.
"""

from service.client.connection import Connection, room_url
from service.client.errors import (
    AuthError,
    ChatClientError,
    ConnectionLost,
    Forbidden,
    HTTPStatusError,
    ProtocolError,
    SendError,
    SendTimeout,
)
from service.client.events import (
    Ack,
    Delete,
    Disconnected,
    Edit,
    Event,
    Item,
    MemberChange,
    Presence,
    PresentUser,
    ReactionChange,
    Read,
    Ready,
    Receipt,
    ReplyTo,
    Reset,
    TextMessage,
    Typing,
    UnknownItem,
)
from service.client.rest import HistoryPage, RestClient
from service.client.session import ChatClient, Room

__all__ = [
    "Ack",
    "AuthError",
    "ChatClient",
    "ChatClientError",
    "Connection",
    "ConnectionLost",
    "Delete",
    "Disconnected",
    "Edit",
    "Event",
    "Forbidden",
    "HTTPStatusError",
    "HistoryPage",
    "Item",
    "MemberChange",
    "Presence",
    "PresentUser",
    "ProtocolError",
    "ReactionChange",
    "Read",
    "Ready",
    "Receipt",
    "ReplyTo",
    "Reset",
    "RestClient",
    "Room",
    "SendError",
    "SendTimeout",
    "TextMessage",
    "Typing",
    "UnknownItem",
    "room_url",
]
