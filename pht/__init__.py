"""pht: GOST-compatible Plain HTTP Tunnel (PHT) for Python.

A sans-IO core (:class:`ClientChannel`, :class:`ServerConnection`,
:class:`SessionRegistry`) that speaks PHT as both generations of GOST do,
and trio adapters on top of it: :func:`open_pht_stream` opens a tunnel as a
:class:`trio.abc.Stream`, :func:`serve_pht` serves tunnels like
:func:`trio.serve_tcp`.
"""

from __future__ import annotations

from ._client import ClientChannel, ClientConfig
from ._codec import BASE64_BACKEND, LineBuffer, decode_line, encode_line
from ._common import Paths
from ._errors import LocalProtocolError, PHTError, RemoteProtocolError, TunnelError
from ._events import (
    NEED_DATA,
    Authorized,
    AuthorizeRequest,
    BadRequest,
    ChannelState,
    ClientEvent,
    CloseRequest,
    DataReceived,
    Heartbeat,
    NeedData,
    PullEnded,
    PullRequest,
    PullStarted,
    PushAcknowledged,
    PushRequest,
    Rejected,
    RequestKind,
    ServerConnectionState,
    ServerEvent,
)
from ._server import (
    LookupResult,
    ServerConnection,
    SessionRecord,
    SessionRegistry,
    SessionState,
)
from ._tls import SelfSignedCertificate, make_self_signed_certificate
from ._token import TokenSource, new_token
from ._trio_client import open_pht_stream
from ._trio_common import PHTStream
from ._trio_server import serve_pht

__version__ = "0.1.0.dev0"

__all__ = [
    "BASE64_BACKEND",
    "NEED_DATA",
    "AuthorizeRequest",
    "Authorized",
    "BadRequest",
    "ChannelState",
    "ClientChannel",
    "ClientConfig",
    "ClientEvent",
    "CloseRequest",
    "DataReceived",
    "Heartbeat",
    "LineBuffer",
    "LocalProtocolError",
    "LookupResult",
    "NeedData",
    "PHTError",
    "PHTStream",
    "Paths",
    "PullEnded",
    "PullRequest",
    "PullStarted",
    "PushAcknowledged",
    "PushRequest",
    "Rejected",
    "RemoteProtocolError",
    "RequestKind",
    "SelfSignedCertificate",
    "ServerConnection",
    "ServerConnectionState",
    "ServerEvent",
    "SessionRecord",
    "SessionRegistry",
    "SessionState",
    "TokenSource",
    "TunnelError",
    "__version__",
    "decode_line",
    "encode_line",
    "make_self_signed_certificate",
    "new_token",
    "open_pht_stream",
    "serve_pht",
]
