"""Port forwarding and protocol sniffing: :class:`ForwardHandler`, :class:`AutoHandler`."""

from __future__ import annotations

import logging

import anyio
import anyio.abc

from ._address import format_hostport
from ._dial import DEFAULT_DIAL_TIMEOUT, Auth, Dialer, DialFailed, dial_upstream, tcp_dialer
from ._http import HTTPProxyHandler
from ._serve import Connected, Reject, serve_handshake
from ._socks import SOCKS4_VERSION, SOCKS5_VERSION, Socks4Handler, Socks5Handler
from ._stream import AnyStream, PrefixedStream, as_anyio, describe_peer, read_some

__all__ = ["AutoHandler", "ForwardHandler"]


class ForwardHandler:
    """Connects every stream to one fixed target and relays both ways.

    If the target cannot be reached, the stream is closed (there is no
    protocol to carry an error) and the failure is logged at INFO.
    """

    log: logging.Logger = logging.getLogger("pht.proxy")

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        dial: Dialer = tcp_dialer,
        dial_timeout: float | None = DEFAULT_DIAL_TIMEOUT,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.dial = dial
        self.dial_timeout = dial_timeout

    async def __call__(self, stream: AnyStream) -> None:
        """Relay ``stream`` to the fixed target until either side closes, then close both."""
        await serve_handshake(self.log, "forward", stream, self._handshake)

    async def _handshake(self, stream: anyio.abc.ByteStream, peer: str) -> Connected:
        target = format_hostport(self.target_host, self.target_port)
        try:
            upstream = await dial_upstream(
                self.dial, self.target_host, self.target_port, self.dial_timeout
            )
        except DialFailed as exc:
            raise Reject(b"", exc.describe(target), level=logging.WARNING) from None
        return Connected(stream, upstream, target)


class AutoHandler:
    """GOST's ``auto`` handler: picks the protocol from the first byte.

    ``0x05`` goes to :class:`Socks5Handler`, ``0x04`` to
    :class:`Socks4Handler`, anything else to :class:`HTTPProxyHandler`; all
    share ``auth``, ``dial`` and ``dial_timeout``. The peeked bytes are
    pushed back, so the chosen handler sees the whole stream.
    """

    log: logging.Logger = logging.getLogger("pht.proxy")

    def __init__(
        self,
        *,
        auth: Auth | None = None,
        dial: Dialer = tcp_dialer,
        dial_timeout: float | None = DEFAULT_DIAL_TIMEOUT,
    ) -> None:
        self.auth = auth
        self.socks5 = Socks5Handler(auth=auth, dial=dial, dial_timeout=dial_timeout)
        self.socks4 = Socks4Handler(auth=auth, dial=dial, dial_timeout=dial_timeout)
        self.http = HTTPProxyHandler(auth=auth, dial=dial, dial_timeout=dial_timeout)

    async def __call__(self, client: AnyStream) -> None:
        """Look at the first bytes of ``client`` and serve it as SOCKS5, SOCKS4 or HTTP."""
        stream = as_anyio(client)
        try:
            first = await read_some(stream)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self.log.debug(
                "auto %s: closed before the first byte: %s",
                describe_peer(stream),
                exc or type(exc).__name__,
            )
            await anyio.aclose_forcefully(stream)
            return
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        if not first:
            self.log.debug("auto %s: closed before the first byte", describe_peer(stream))
            await anyio.aclose_forcefully(stream)
            return
        wrapped = PrefixedStream(stream, first)
        if first[0] == SOCKS5_VERSION:
            await self.socks5(wrapped)
        elif first[0] == SOCKS4_VERSION:
            await self.socks4(wrapped)
        else:
            await self.http(wrapped)
