"""Proxy handlers and connectors that run over anyio byte streams (trio or asyncio).

On trio they also take ``trio.abc.Stream`` objects, and a connector given one
returns one.

Handlers (server side) are objects with ``async def __call__(stream)``: they
run the whole exchange on a stream a client opened (a PHT stream, a TCP
stream...), dial the target, relay both ways and close everything. They never
raise for a client's mistakes: they answer the protocol's error reply.

Connectors (client side) run a handshake on an open stream to a proxy and
return a stream that reaches the target, or raise a :class:`ProxyError`.

Not imported by ``import pht``: use ``import pht.proxy``.
"""

from __future__ import annotations

from ._dial import DEFAULT_DIAL_TIMEOUT, Auth, Dialer, DialFailure, HopError, tcp_dialer
from ._errors import ProxyAuthError, ProxyConnectError, ProxyError, ProxyProtocolError
from ._forward import AutoHandler, ForwardHandler
from ._http import HTTPProxyHandler, http_connect
from ._relay import RelayClientStream, RelayHandler, relay_connect
from ._socks import Socks4Handler, Socks5Handler, socks5_connect
from ._stream import PrefixedStream, relay

__all__ = [
    "DEFAULT_DIAL_TIMEOUT",
    "Auth",
    "AutoHandler",
    "DialFailure",
    "Dialer",
    "ForwardHandler",
    "HTTPProxyHandler",
    "HopError",
    "PrefixedStream",
    "ProxyAuthError",
    "ProxyConnectError",
    "ProxyError",
    "ProxyProtocolError",
    "RelayClientStream",
    "RelayHandler",
    "Socks4Handler",
    "Socks5Handler",
    "http_connect",
    "relay",
    "relay_connect",
    "socks5_connect",
    "tcp_dialer",
]
