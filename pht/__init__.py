"""pht: GOST-compatible Plain HTTP Tunnel (PHT) for Python.

A sans-IO core (:class:`ClientChannel`, :class:`ServerConnection`,
:class:`SessionRegistry`) that speaks PHT as both generations of GOST do,
and trio adapters on top of it: :func:`open_pht_stream` opens a tunnel as a
:class:`trio.abc.Stream`, :func:`serve_pht` serves tunnels like
:func:`trio.serve_tcp`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._client import ClientChannel, ClientConfig
from ._client_session import ClientOptions, ClientSession, ClientSessionState, ClientSettings
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
    PushData,
    PushRequest,
    Rejected,
    RequestKind,
    ServerConnectionState,
    ServerEvent,
)
from ._resume import GoneReason, SessionGone
from ._server import (
    LookupResult,
    ServerConnection,
    SessionRecord,
    SessionRegistry,
    SessionState,
)
from ._server_session import AppSettings, ServerOptions, ServerSettings
from ._token import TokenSource, new_token

if TYPE_CHECKING:
    from ._tls import SelfSignedCertificate, make_self_signed_certificate
    from ._trio_client import open_pht_stream
    from ._trio_common import BrokenTunnelError, BusyTunnelError, ClosedTunnelError, PHTStream
    from ._trio_server import ShutdownReport, serve_pht

# The trio adapters (and cryptography) load on first use, so that the
# sans-IO core can be imported, and used, without trio.
_LAZY = {
    "SelfSignedCertificate": "._tls",
    "make_self_signed_certificate": "._tls",
    "open_pht_stream": "._trio_client",
    "PHTStream": "._trio_common",
    "BrokenTunnelError": "._trio_common",
    "BusyTunnelError": "._trio_common",
    "ClosedTunnelError": "._trio_common",
    "serve_pht": "._trio_server",
    "ShutdownReport": "._trio_server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pht' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0.dev0"
"""The version of this release of ``pht`` (distribution ``pht-tunnel``)."""

__all__ = [
    "BASE64_BACKEND",
    "NEED_DATA",
    "AppSettings",
    "AuthorizeRequest",
    "Authorized",
    "BadRequest",
    "BrokenTunnelError",
    "BusyTunnelError",
    "ChannelState",
    "ClientChannel",
    "ClientConfig",
    "ClientEvent",
    "ClientOptions",
    "ClientSession",
    "ClientSessionState",
    "ClientSettings",
    "CloseRequest",
    "ClosedTunnelError",
    "DataReceived",
    "GoneReason",
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
    "PushData",
    "PushRequest",
    "Rejected",
    "RemoteProtocolError",
    "RequestKind",
    "SelfSignedCertificate",
    "ServerConnection",
    "ServerConnectionState",
    "ServerEvent",
    "ServerOptions",
    "ServerSettings",
    "SessionGone",
    "SessionRecord",
    "SessionRegistry",
    "SessionState",
    "ShutdownReport",
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
