"""Exceptions raised by the proxy connectors (the dial side).

Handlers never raise for a client's mistakes: they answer the protocol's error
reply and close. Connectors raise a :class:`ProxyError` subclass whose message
says what went wrong and, where the protocol gives one, carries its code.
"""

from __future__ import annotations

from pht._errors import PHTError

__all__ = ["ProxyAuthError", "ProxyConnectError", "ProxyError", "ProxyProtocolError"]


class ProxyError(PHTError):
    """Base class of the errors raised while talking to a proxy.

    ``code`` is the protocol's own code when the proxy sent one: the SOCKS5
    ``REP`` byte, the SOCKS4 reply byte, the HTTP status, or the relay status.
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ProxyProtocolError(ProxyError):
    """The proxy answered something that does not follow the protocol, or
    closed the connection in the middle of the handshake."""


class ProxyAuthError(ProxyError):
    """The proxy wants credentials that were not given, or rejected them."""


class ProxyConnectError(ProxyError):
    """The proxy accepted the request but could not reach the target."""
