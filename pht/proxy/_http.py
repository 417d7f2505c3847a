"""HTTP proxy: the handler (CONNECT and absolute-form requests) and the CONNECT connector.

Both sides are parsed and written by h11; h11's types never leave this module.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import overload

import anyio
import anyio.abc
import h11
import trio

from pht._errors import PHTError

from ._address import AddressError, format_hostport, parse_hostport
from ._dial import (
    Auth,
    DialFailed,
    DialFailure,
    DialingHandler,
    HopError,
    dial_upstream,
)
from ._errors import ProxyAuthError, ProxyConnectError, ProxyProtocolError
from ._serve import send_quietly
from ._stream import (
    AnyStream,
    PrefixedStream,
    as_anyio,
    describe_peer,
    like,
    read_some,
    relay,
)

__all__ = ["HTTPProxyHandler", "http_connect"]

#: Largest request or response head accepted, in bytes.
MAX_HEADER_SIZE = 64 * 1024

REALM = "pht"

# Hop-by-hop headers (RFC 9110 section 7.6.1) and their old proxy cousins.
# Content-Length and Transfer-Encoding stay: h11 reframes the body with them.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"upgrade",
    }
)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})

Header = tuple[bytes, bytes]


def _strip_hop_by_hop(headers: Iterable[Header], also: Iterable[bytes] = ()) -> list[Header]:
    """Drop hop-by-hop headers, those the Connection header lists, and ``also``."""
    items = list(headers)
    dropped = set(_HOP_BY_HOP) | set(also)
    for name, value in items:
        if name.lower() == b"connection":
            listed = {token.strip().lower() for token in value.split(b",")}
            dropped |= listed - _FRAMING
    return [(name, value) for name, value in items if name.lower() not in dropped]


def _basic_credentials(auth: Auth) -> bytes:
    token = base64.b64encode(f"{auth.username}:{auth.password}".encode())
    return b"Basic " + token


def _check_basic(auth: Auth, headers: Iterable[Header]) -> bool:
    for name, value in headers:
        if name.lower() != b"proxy-authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            continue
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        username, sep, password = decoded.partition(b":")
        user_ok = hmac.compare_digest(username, auth.username.encode())
        pass_ok = hmac.compare_digest(password, auth.password.encode())
        return bool(sep) and user_ok & pass_ok
    return False


def _split_absolute_url(target: bytes) -> tuple[str, int, bytes, bytes]:
    """``http://host[:port]/path?q`` -> ``(host, port, authority, origin-form)``."""
    if target[:7].lower() != b"http://":
        raise AddressError("only absolute http:// URLs (or CONNECT) can be proxied")
    rest = target[7:].split(b"#", 1)[0]
    end = len(rest)
    for delimiter in (b"/", b"?"):
        index = rest.find(delimiter)
        if index != -1:
            end = min(end, index)
    authority, path = rest[:end], rest[end:]
    authority = authority.rpartition(b"@")[2]  # drop any user info
    if not path.startswith(b"/"):
        path = b"/" + path
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise AddressError("the URL's host is not ASCII") from None
    host, port = parse_hostport(text, 80)
    return host, port, authority, path


class _UpstreamFailed(Exception):
    """The upstream connection broke, closed, or sent malformed HTTP."""


# A chained proxy (a lazy relay hop) reports its refusal on the first read.
_UPSTREAM_ERRORS = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    h11.ProtocolError,
    PHTError,
    HopError,
)


def _reason(what: str, exc: BaseException) -> str:
    """``what`` and the cause in words (a proxy's refusal speaks for itself)."""
    if isinstance(exc, (PHTError, HopError)):
        return str(exc)
    return f"{what}: {exc or type(exc).__name__}"


@dataclass
class _Upstream:
    """One keep-alive connection to an origin server."""

    host: str
    port: int
    stream: anyio.abc.ByteStream
    connection: h11.Connection = field(
        default_factory=lambda: h11.Connection(
            h11.CLIENT, max_incomplete_event_size=MAX_HEADER_SIZE
        )
    )
    sent: int = 0

    def reusable_for(self, host: str, port: int) -> bool:
        return (
            (self.host, self.port) == (host, port)
            and self.connection.our_state is h11.IDLE
            and self.connection.their_state is h11.IDLE
        )

    async def send(self, event: h11.Event) -> None:
        try:
            data = self.connection.send(event)
            if data:
                await self.stream.send(data)
                self.sent += len(data)
        except _UPSTREAM_ERRORS as exc:
            raise _UpstreamFailed(_reason("sending failed", exc)) from exc

    async def next_event(self) -> h11.Event:
        try:
            while True:
                event = self.connection.next_event()
                if event is h11.NEED_DATA:
                    self.connection.receive_data(await read_some(self.stream))
                    continue
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise _UpstreamFailed("the server closed the connection")
                assert isinstance(event, h11.Event)
                return event
        except _UPSTREAM_ERRORS as exc:
            raise _UpstreamFailed(_reason("receiving failed", exc)) from exc


class HTTPProxyHandler(DialingHandler):
    """An HTTP proxy for one client connection.

    ``CONNECT host:port`` opens a tunnel (``200 Connection established``).
    Absolute-form requests (``GET http://host/path``) are forwarded in origin
    form without hop-by-hop headers; the client connection is kept alive
    across requests, and the upstream connection too while the host stays the
    same. With ``auth``, every request needs ``Proxy-Authorization: Basic``,
    else ``407``. Unreachable upstream: ``502``; dial timeout: ``504``;
    malformed request: ``400``. Error responses close the connection.
    """

    async def __call__(self, stream: AnyStream) -> None:
        """Serve one HTTP proxy client (CONNECT or plain requests) on ``stream``, then close it."""
        session = _Session(self, as_anyio(stream))
        try:
            await session.run()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.ProtocolError) as exc:
            self.log.debug(
                "http %s: connection ended: %s", session.peer, exc or type(exc).__name__
            )
        finally:
            await session.close()


class _Session:
    """The state of one client connection to :class:`HTTPProxyHandler`."""

    def __init__(self, handler: HTTPProxyHandler, stream: anyio.abc.ByteStream) -> None:
        self.handler = handler
        self.log = handler.log
        self.stream = stream
        self.peer = describe_peer(stream)
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_SIZE)
        self.upstream: _Upstream | None = None
        self.sent_to_client = 0

    async def close(self) -> None:
        await self._drop_upstream()
        await anyio.aclose_forcefully(self.stream)

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            upstream, self.upstream = self.upstream, None
            await anyio.aclose_forcefully(upstream.stream)

    async def _client_event(self) -> h11.Event:
        while True:
            event = self.client.next_event()
            if event is h11.NEED_DATA:
                self.client.receive_data(await read_some(self.stream))
                continue
            assert isinstance(event, h11.Event), event
            return event

    async def _send_client(self, event: h11.Event) -> None:
        data = self.client.send(event)
        if data:
            await self.stream.send(data)
            self.sent_to_client += len(data)

    async def _error(
        self,
        status: int,
        reason: str,
        why: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        level: int = logging.DEBUG,
    ) -> None:
        """Answer ``status`` with an empty body and ``Connection: close``."""
        self.log.log(level, "http %s: %d %s: %s", self.peer, status, reason, why)
        response = h11.Response(
            status_code=status,
            reason=reason,
            headers=[("Content-Length", "0"), ("Connection", "close"), *headers],
        )
        try:
            data = self.client.send(response)
            data = (data or b"") + (self.client.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            return  # a response was already under way: just close
        await send_quietly(self.stream, data)

    async def run(self) -> None:
        while True:
            try:
                event = await self._client_event()
            except h11.RemoteProtocolError as exc:
                await self._error(400, "Bad Request", f"malformed request: {exc}")
                return
            if not isinstance(event, h11.Request):
                return  # the client closed between requests
            if self.handler.auth is not None and not _check_basic(
                self.handler.auth, event.headers.raw_items()
            ):
                await self._error(
                    407,
                    "Proxy Authentication Required",
                    "missing or wrong Proxy-Authorization",
                    headers=[("Proxy-Authenticate", f'Basic realm="{REALM}"')],
                    level=logging.WARNING,
                )
                return
            if event.method == b"CONNECT":
                await self._tunnel(event)
                return
            if not await self._forward(event):
                return
            if self.client.our_state is h11.DONE and self.client.their_state is h11.DONE:
                self.client.start_next_cycle()
            else:
                return

    async def _dial(self, host: str, port: int) -> anyio.abc.ByteStream | None:
        """Open an upstream connection, or answer 502 / 504 and return ``None``."""
        try:
            return await dial_upstream(self.handler.dial, host, port, self.handler.dial_timeout)
        except DialFailed as exc:
            why = exc.describe(format_hostport(host, port))
            if exc.failure is DialFailure.TIMEOUT:
                await self._error(504, "Gateway Timeout", why, level=logging.WARNING)
            else:
                await self._error(502, "Bad Gateway", why, level=logging.WARNING)
            return None

    async def _tunnel(self, request: h11.Request) -> None:
        try:
            host, port = parse_hostport(request.target.decode("ascii"))
        except (UnicodeDecodeError, AddressError) as exc:
            await self._error(400, "Bad Request", f"bad CONNECT target: {exc}")
            return
        try:
            end = await self._client_event()
        except h11.RemoteProtocolError as exc:
            await self._error(400, "Bad Request", f"malformed request: {exc}")
            return
        if not isinstance(end, h11.EndOfMessage):
            await self._error(400, "Bad Request", "a CONNECT request must not have a body")
            return
        await self._drop_upstream()
        started = anyio.current_time()
        upstream = await self._dial(host, port)
        if upstream is None:
            return
        try:
            await self._send_client(
                h11.Response(status_code=200, reason=b"Connection established", headers=[])
            )
        except BaseException:
            await anyio.aclose_forcefully(upstream)
            raise
        trailing, _ = self.client.trailing_data
        client = PrefixedStream(self.stream, trailing) if trailing else self.stream
        target = format_hostport(host, port)
        self.log.debug("http %s -> %s connected", self.peer, target)
        up, down = await relay(client, upstream)
        self.log.info(
            "http %s -> %s closed: %d B up, %d B down, %.2f s",
            self.peer,
            target,
            up,
            down,
            anyio.current_time() - started,
        )

    async def _upstream_for(self, host: str, port: int) -> tuple[_Upstream, bool] | None:
        """A connection to ``host:port`` and whether it is a reused one."""
        if self.upstream is not None and self.upstream.reusable_for(host, port):
            return self.upstream, True
        await self._drop_upstream()
        stream = await self._dial(host, port)
        if stream is None:
            return None
        self.upstream = _Upstream(host, port, stream)
        return self.upstream, False

    async def _forward(self, request: h11.Request) -> bool:
        """Forward one absolute-form request; ``True`` if the client may go on."""
        started = anyio.current_time()
        try:
            host, port, authority, path = _split_absolute_url(request.target)
            headers = [
                (b"Host", authority),
                *_strip_hop_by_hop(request.headers.raw_items(), also=(b"host", b"expect")),
            ]
            outgoing = h11.Request(method=request.method, target=path, headers=headers)
        except (AddressError, h11.LocalProtocolError) as exc:
            await self._error(400, "Bad Request", f"cannot forward {request.target!r}: {exc}")
            return False
        target = format_hostport(host, port)
        has_body = any(
            name in _FRAMING and value.strip() != b"0" for name, value in request.headers
        )
        if not has_body and not await self._pump_request_body(None):
            return False  # consumes the (empty) body's EndOfMessage
        if has_body and self.client.they_are_waiting_for_100_continue:
            # Expect is not forwarded: answer it here so the body comes now.
            await self._send_client(h11.InformationalResponse(status_code=100, headers=[]))

        for attempt in (1, 2):
            found = await self._upstream_for(host, port)
            if found is None:
                return False
            upstream, reused = found
            try:
                await upstream.send(outgoing)
                if has_body:
                    if not await self._pump_request_body(upstream):
                        return False
                else:
                    await upstream.send(h11.EndOfMessage())
                response = await self._response_head(upstream)
            except _UpstreamFailed as exc:
                await self._drop_upstream()
                if reused and not has_body and attempt == 1:
                    # The server closed the idle keep-alive connection: retry once.
                    self.log.debug("http %s: retrying on a new connection: %s", self.peer, exc)
                    continue
                await self._error(502, "Bad Gateway", f"{target}: {exc}", level=logging.WARNING)
                return False
            break
        else:  # pragma: no cover - the loop always breaks or returns
            return False

        sent_before = self.sent_to_client
        await self._send_client(
            h11.Response(
                status_code=response.status_code,
                reason=response.reason,
                headers=_strip_hop_by_hop(response.headers.raw_items()),
            )
        )
        try:
            while True:
                event = await upstream.next_event()
                if isinstance(event, h11.Data):
                    await self._send_client(h11.Data(data=event.data))
                elif isinstance(event, h11.EndOfMessage):
                    await self._send_client(h11.EndOfMessage())
                    break
        except _UpstreamFailed as exc:
            self.log.warning(
                "http %s: %s broke in the middle of a response: %s", self.peer, target, exc
            )
            return False
        self.log.info(
            "http %s -> %s %s %s %d: %d B up, %d B down, %.2f s",
            self.peer,
            target,
            request.method.decode("ascii", "replace"),
            path.decode("ascii", "replace"),
            response.status_code,
            upstream.sent,
            self.sent_to_client - sent_before,
            anyio.current_time() - started,
        )
        connection = upstream.connection
        if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
            connection.start_next_cycle()
        else:
            await self._drop_upstream()
        return True

    async def _pump_request_body(self, upstream: _Upstream | None) -> bool:
        """Copy the request body upstream (or discard it if ``upstream`` is
        ``None``); ``False`` after a 400 to the client."""
        while True:
            try:
                event = await self._client_event()
            except h11.RemoteProtocolError as exc:
                await self._error(400, "Bad Request", f"malformed request body: {exc}")
                return False
            if isinstance(event, h11.Data) and upstream is not None:
                await upstream.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                if upstream is not None:
                    await upstream.send(h11.EndOfMessage())
                return True

    async def _response_head(self, upstream: _Upstream) -> h11.Response:
        while True:
            event = await upstream.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 100:  # 100 was answered here already
                    await self._send_client(
                        h11.InformationalResponse(
                            status_code=event.status_code,
                            reason=event.reason,
                            headers=_strip_hop_by_hop(event.headers.raw_items()),
                        )
                    )
                continue
            raise _UpstreamFailed(f"unexpected {type(event).__name__} before the response")


@overload
async def http_connect(
    stream: trio.abc.Stream, host: str, port: int, *, auth: Auth | None = ...
) -> trio.abc.Stream: ...
@overload
async def http_connect(
    stream: anyio.abc.ByteStream, host: str, port: int, *, auth: Auth | None = ...
) -> anyio.abc.ByteStream: ...
async def http_connect(
    stream: AnyStream, host: str, port: int, *, auth: Auth | None = None
) -> AnyStream:
    """Send ``CONNECT host:port`` to the HTTP proxy at the other end of ``stream``.

    With ``auth``, sends ``Proxy-Authorization: Basic``. Returns a stream that
    reaches the target on a 2xx answer. Raises :class:`ProxyAuthError` on 407,
    :class:`ProxyConnectError` (``code`` = the HTTP status) on other answers,
    :class:`ProxyProtocolError` if the proxy does not answer HTTP; ``stream``
    is left open then. Given a trio stream it returns a trio stream.
    """
    channel = as_anyio(stream)
    target = format_hostport(host, port)
    try:
        authority = target.encode("ascii")
    except UnicodeEncodeError:
        authority = format_hostport(host.encode("idna").decode("ascii"), port).encode("ascii")
    headers = [(b"Host", authority)]
    if auth is not None:
        headers.append((b"Proxy-Authorization", _basic_credentials(auth)))
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_SIZE)
    request = connection.send(h11.Request(method=b"CONNECT", target=authority, headers=headers))
    await channel.send((request or b"") + (connection.send(h11.EndOfMessage()) or b""))
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await read_some(channel))
            elif isinstance(event, h11.Response):
                break
            elif not isinstance(event, h11.InformationalResponse):
                raise ProxyProtocolError(
                    f"the HTTP proxy closed the connection before answering CONNECT {target}"
                )
    except h11.RemoteProtocolError as exc:
        raise ProxyProtocolError(
            f"the HTTP proxy's answer to CONNECT {target} is not valid HTTP: {exc}"
        ) from None
    status = event.status_code
    reason = event.reason.decode("ascii", "replace")
    if 200 <= status < 300:
        trailing, _ = connection.trailing_data
        return like(stream, PrefixedStream(channel, trailing) if trailing else channel)
    if status == 407:
        if auth is None:
            raise ProxyAuthError(
                "the HTTP proxy requires authentication (407); give a username and password",
                code=status,
            )
        raise ProxyAuthError(
            f"the HTTP proxy rejected the credentials of user {auth.username!r} (407)",
            code=status,
        )
    raise ProxyConnectError(
        f"the HTTP proxy answered {status} {reason} to CONNECT {target}", code=status
    )
