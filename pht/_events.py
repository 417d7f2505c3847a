"""Events and states of the sans-IO state machines.

Events are frozen, keyword-only dataclasses; states are Enums. Everything a
user of the core sees is defined here and re-exported by :mod:`pht`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "NEED_DATA",
    "AuthorizeRequest",
    "Authorized",
    "BadRequest",
    "ChannelState",
    "ClientEvent",
    "CloseRequest",
    "DataReceived",
    "Heartbeat",
    "NeedData",
    "PullEnded",
    "PullRequest",
    "PullStarted",
    "PushAcknowledged",
    "PushData",
    "PushRequest",
    "Rejected",
    "RequestKind",
    "ServerConnectionState",
    "ServerEvent",
]


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`: feed more bytes with ``receive_data``."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event()`` when no event can be produced yet.
NEED_DATA = NeedData.NEED_DATA
"""Returned by ``next_event()`` when no complete event is buffered yet: call
``receive_data`` with more bytes from the network, then ask again."""


class RequestKind(enum.Enum):
    """The three kinds of PHT request."""

    AUTHORIZE = "authorize"
    PUSH = "push"
    PULL = "pull"


class ChannelState(enum.Enum):
    """State of a :class:`~pht.ClientChannel` (one client HTTP connection)."""

    IDLE = "IDLE"  #: ready for a request
    AUTHORIZING = "AUTHORIZING"  #: waiting for the token
    PUSHING = "PUSHING"  #: waiting for a push acknowledgement
    PULLING = "PULLING"  #: a pull response is being received
    CLOSED = "CLOSED"  #: the connection must not be used again
    ERROR = "ERROR"  #: a protocol error happened; the connection is unusable


class ServerConnectionState(enum.Enum):
    """State of a :class:`~pht.ServerConnection` (one accepted HTTP connection)."""

    IDLE = "IDLE"  #: waiting for (the rest of) a request
    RESPONDING = "RESPONDING"  #: a request event was emitted; answer it
    PULLING = "PULLING"  #: a pull response is open; send data, heartbeats, the end
    CLOSED = "CLOSED"  #: the connection must be closed
    ERROR = "ERROR"  #: a protocol error happened; the connection is unusable


# --- events a client channel produces -----------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Authorized:
    """The server issued ``token`` for a new session."""

    token: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PushAcknowledged:
    """The server took the pushed bytes (GOST answers once they are consumed)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PullStarted:
    """The server accepted the pull; data lines follow."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataReceived:
    """Tunnel bytes from the server (one or more pull lines, decoded)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    """An empty pull line: the server is alive and has nothing to send."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PullEnded:
    """The pull response ended.

    ``session_over`` tells whether that means the end of the session (EOF)
    or only of this long poll (then send a new pull on the same channel).
    """

    session_over: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Rejected:
    """The server answered ``status_code`` instead of 200 to a request.

    The channel is ``CLOSED`` afterwards.
    """

    kind: RequestKind
    status_code: int
    reason: str


ClientEvent = (
    Authorized | PushAcknowledged | PullStarted | DataReceived | Heartbeat | PullEnded | Rejected
)
"""Any event :meth:`ClientChannel.next_event` returns (besides :data:`NEED_DATA`)."""


# --- events a server connection produces --------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthorizeRequest:
    """A client asks for a session token: answer with ``send_token``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PushRequest:
    """Tunnel bytes from the client for session ``token``.

    Answer with ``send_push_ack`` once the bytes were consumed (or with
    ``send_status``). ``data`` may be empty: GOST's legacy server ignores a
    body that is only ``"\\n"``, and so does ``pht``.
    """

    token: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class PushData:
    """The first part of a long push line's data for session ``token``.

    A push line longer than a piece (64 KiB of base64) is decoded as it
    arrives, so that the server never holds the whole line: deliver
    ``data`` (waiting until it is consumed is the back-pressure) and do not
    answer. The request goes on: more ``PushData``, then the
    :class:`PushRequest` with the rest (answer that one), or a
    :class:`BadRequest` / :class:`CloseRequest` if the line turns out
    broken (the data delivered so far stays delivered; the session ends).
    """

    token: str
    data: bytes = field(repr=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseRequest:
    """The client closed session ``token``; answer with ``send_push_ack``.

    ``reason`` says which form of close it was: an empty body (the modern
    client's close notification), a body without newline, or a form body.
    """

    token: str
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class PullRequest:
    """A client wants session ``token``'s data: ``start_pull`` or ``send_status``."""

    token: str


@dataclass(frozen=True, kw_only=True, slots=True)
class BadRequest:
    """A request the server must refuse with ``status_code`` (``send_status``).

    ``token`` is set when the request named a session that the error should
    close (invalid base64, an oversized push), as GOST closes it.
    """

    status_code: int
    reason: str
    token: str | None = None


ServerEvent = AuthorizeRequest | PushRequest | PushData | CloseRequest | PullRequest | BadRequest
"""Any event :meth:`ServerConnection.next_event` returns (besides :data:`NEED_DATA`)."""
