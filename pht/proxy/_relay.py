"""The GOST relay protocol (version 1): server handler and client connector.

Wire format (big-endian): request ``VER=1 CMD FEALEN(2) FEATURES``, response
``VER=1 STATUS FEALEN(2) FEATURES``; a feature is ``TYPE(1) LEN(2) DATA``.
GOST holds the server's OK response until the first bytes flow back, and its
client sends the request together with its first data; both orders are
supported here on both sides.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import overload

import anyio
import anyio.abc
import trio

from ._address import AddressError, decode_address, encode_address, format_hostport
from ._dial import (
    DEFAULT_DIAL_TIMEOUT,
    Auth,
    Dialer,
    DialFailed,
    DialFailure,
    DialingHandler,
    dial_upstream,
    tcp_dialer,
)
from ._errors import ProxyAuthError, ProxyConnectError, ProxyProtocolError
from ._serve import Connected, Reject, serve_handshake
from ._stream import AnyStream, HandshakeReader, Truncated, as_anyio, like

__all__ = ["RelayClientStream", "RelayHandler", "relay_connect"]

RELAY_VERSION = 0x01

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_ASSOCIATE = 0x03
CMD_MASK = 0x0F
FLAG_UDP = 0x80

FEATURE_USER_AUTH = 0x01
FEATURE_ADDRESS = 0x02
FEATURE_TUNNEL_ID = 0x03
FEATURE_NETWORK = 0x04

STATUS_OK = 0x00
STATUS_BAD_REQUEST = 0x01
STATUS_UNAUTHORIZED = 0x02
STATUS_FORBIDDEN = 0x03
STATUS_TIMEOUT = 0x04
STATUS_SERVICE_UNAVAILABLE = 0x05
STATUS_HOST_UNREACHABLE = 0x06
STATUS_NETWORK_UNREACHABLE = 0x07
STATUS_INTERNAL_SERVER_ERROR = 0x08

STATUS_MESSAGES = {
    STATUS_BAD_REQUEST: "bad request",
    STATUS_UNAUTHORIZED: "unauthorized",
    STATUS_FORBIDDEN: "forbidden",
    STATUS_TIMEOUT: "timeout",
    STATUS_SERVICE_UNAVAILABLE: "connection refused (service unavailable)",
    STATUS_HOST_UNREACHABLE: "host unreachable",
    STATUS_NETWORK_UNREACHABLE: "network unreachable",
    STATUS_INTERNAL_SERVER_ERROR: "internal server error",
}

_DIAL_STATUSES = {
    # The relay protocol has no "refused": no service on the port is what
    # "service unavailable" says (pht's relay client reads it back as refused).
    DialFailure.REFUSED: STATUS_SERVICE_UNAVAILABLE,
    DialFailure.NETWORK_UNREACHABLE: STATUS_NETWORK_UNREACHABLE,
    DialFailure.HOST_UNREACHABLE: STATUS_HOST_UNREACHABLE,
    DialFailure.TIMEOUT: STATUS_TIMEOUT,
    DialFailure.HOP: STATUS_HOST_UNREACHABLE,
    DialFailure.OTHER: STATUS_HOST_UNREACHABLE,
}


class RelayFormatError(ValueError):
    """Relay message bytes that do not parse."""


def encode_features(features: Iterable[tuple[int, bytes]]) -> bytes:
    """``TYPE(1) LEN(2) DATA`` for each ``(type, data)``."""
    out = bytearray()
    for feature_type, data in features:
        if len(data) > 0xFFFF:
            raise RelayFormatError("a relay feature holds at most 65535 bytes")
        out += bytes([feature_type]) + len(data).to_bytes(2, "big") + data
    return bytes(out)


def encode_message(code: int, features: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """A request (``code`` = CMD) or response (``code`` = STATUS)."""
    body = encode_features(features)
    if len(body) > 0xFFFF:
        raise RelayFormatError("relay features total at most 65535 bytes")
    return bytes([RELAY_VERSION, code]) + len(body).to_bytes(2, "big") + body


def parse_features(data: bytes) -> list[tuple[int, bytes]]:
    """Split a FEATURES block into ``(type, data)`` pairs."""
    features = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise RelayFormatError("truncated feature header")
        feature_type = data[offset]
        length = int.from_bytes(data[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + length > len(data):
            raise RelayFormatError(f"feature 0x{feature_type:02x} is truncated")
        features.append((feature_type, data[start : start + length]))
        offset = start + length
    return features


def user_auth_feature(auth: Auth) -> tuple[int, bytes]:
    """The user-auth feature: ``ULEN(1) USER PLEN(1) PASS``."""
    username, password = auth.username.encode(), auth.password.encode()
    if len(username) > 255 or len(password) > 255:
        raise RelayFormatError("relay username and password must be at most 255 bytes")
    data = bytes([len(username)]) + username + bytes([len(password)]) + password
    return FEATURE_USER_AUTH, data


def parse_user_auth_feature(data: bytes) -> tuple[bytes, bytes]:
    """``(username, password)`` from a user-auth feature."""
    if not data:
        raise RelayFormatError("empty user-auth feature")
    username_end = 1 + data[0]
    if len(data) < username_end + 1:
        raise RelayFormatError("truncated user-auth feature")
    password_end = username_end + 1 + data[username_end]
    if len(data) != password_end:
        raise RelayFormatError("bad user-auth feature length")
    return data[1:username_end], data[username_end + 1 : password_end]


def _response(status: int) -> bytes:
    return encode_message(status)


class RelayHandler(DialingHandler):
    """A GOST relay server for one stream (CONNECT only; no BIND, no UDP).

    With ``target`` it forwards every CONNECT there and ignores any address
    in the request (as GOST's relay handler with a forward target does);
    without it, the request must carry an address feature, else status 0x01.
    With ``auth`` the request must carry a matching user-auth feature, else
    status 0x02. Errors are answered at once. The OK response is held and
    sent in front of the first bytes flowing back (``lazy_reply=True``, as
    GOST), or sent right after the dial (``lazy_reply=False``), which an
    eager client that waits for the response before it sends needs.
    """

    def __init__(
        self,
        *,
        auth: Auth | None = None,
        target: tuple[str, int] | None = None,
        dial: Dialer = tcp_dialer,
        dial_timeout: float | None = DEFAULT_DIAL_TIMEOUT,
        lazy_reply: bool = True,
    ) -> None:
        super().__init__(auth=auth, dial=dial, dial_timeout=dial_timeout)
        self.target = target
        self.lazy_reply = lazy_reply

    async def __call__(self, stream: AnyStream) -> None:
        """Serve one GOST relay client on ``stream``: read its request, dial, relay, close."""
        await serve_handshake(self.log, "relay", stream, self._handshake)

    async def _handshake(self, stream: anyio.abc.ByteStream, peer: str) -> Connected:
        reader = HandshakeReader(stream)
        header = await reader.read_exactly(4)
        bad_request = _response(STATUS_BAD_REQUEST)
        version, command = header[0], header[1]
        if version != RELAY_VERSION:
            raise Reject(bad_request, f"bad relay version 0x{version:02x}")
        features_length = int.from_bytes(header[2:4], "big")
        try:
            features = parse_features(await reader.read_exactly(features_length))
        except RelayFormatError as exc:
            raise Reject(bad_request, str(exc)) from None
        credentials: tuple[bytes, bytes] | None = None
        address: tuple[str, int] | None = None
        try:
            for feature_type, data in features:
                if feature_type == FEATURE_USER_AUTH:
                    credentials = parse_user_auth_feature(data)
                elif feature_type == FEATURE_ADDRESS:
                    host, port, used = decode_address(data)
                    if used != len(data):
                        raise RelayFormatError("trailing bytes in the address feature")
                    address = (host, port)
        except (RelayFormatError, AddressError) as exc:
            raise Reject(bad_request, str(exc)) from None

        if self.auth is not None and not _credentials_ok(self.auth, credentials):
            who = (
                "user " + credentials[0].decode("utf-8", "backslashreplace")
                if credentials
                else "no credentials"
            )
            raise Reject(
                _response(STATUS_UNAUTHORIZED),
                f"wrong credentials ({who})",
                level=logging.WARNING,
            )
        if command & FLAG_UDP or command & CMD_MASK not in (0, CMD_CONNECT):
            raise Reject(bad_request, f"command 0x{command:02x} is not supported (only CONNECT)")
        if self.target is not None:
            host, port = self.target
        elif address is not None:
            host, port = address
        else:
            raise Reject(bad_request, "no address in the request and no forward target")

        target = format_hostport(host, port)
        try:
            upstream = await dial_upstream(self.dial, host, port, self.dial_timeout)
        except DialFailed as exc:
            raise Reject(
                _response(_DIAL_STATUSES[exc.failure]),
                exc.describe(target),
                level=logging.WARNING,
            ) from None
        client = reader.stream()
        ok = _response(STATUS_OK)
        if self.lazy_reply:
            return Connected(_HeldReplyStream(client, ok), upstream, target)
        try:
            await stream.send(ok)
        except BaseException:
            await anyio.aclose_forcefully(upstream)
            raise
        return Connected(client, upstream, target)


def _credentials_ok(auth: Auth, credentials: tuple[bytes, bytes] | None) -> bool:
    username, password = credentials if credentials is not None else (b"", b"")
    user_ok = hmac.compare_digest(username, auth.username.encode())
    pass_ok = hmac.compare_digest(password, auth.password.encode())
    return credentials is not None and user_ok & pass_ok


class _HeldReplyStream(anyio.abc.ByteStream):
    """Sends ``reply`` in front of the first data sent (the lazy OK response)."""

    def __init__(self, transport_stream: anyio.abc.ByteStream, reply: bytes) -> None:
        self.transport_stream = transport_stream
        self._reply = reply

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self.transport_stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        if self._reply:
            reply, self._reply = self._reply, b""
            item = reply + bytes(item)
        await self.transport_stream.send(item)

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


def _connect_request(host: str, port: int, auth: Auth | None) -> bytes:
    features = []
    if auth is not None:
        features.append(user_auth_feature(auth))
    features.append((FEATURE_ADDRESS, encode_address(host, port)))
    return encode_message(CMD_CONNECT, features)


async def _read_response(reader: HandshakeReader, target: str) -> None:
    """Read a relay response; raise the matching :class:`ProxyError` unless OK."""
    try:
        header = await reader.read_exactly(4)
        if header[0] != RELAY_VERSION:
            raise ProxyProtocolError(
                f"the relay server answered version 0x{header[0]:02x}; is it a GOST relay?"
            )
        await reader.read_exactly(int.from_bytes(header[2:4], "big"))
    except Truncated:
        raise ProxyProtocolError(
            f"the relay server closed the connection before answering the CONNECT to {target}"
        ) from None
    status = header[1]
    if status == STATUS_OK:
        return
    message = STATUS_MESSAGES.get(status, "unknown status")
    if status == STATUS_UNAUTHORIZED:
        raise ProxyAuthError(
            f"the relay server rejected the credentials (status 0x{status:02x})", code=status
        )
    raise ProxyConnectError(
        f"the relay server cannot connect to {target}: {message} (status 0x{status:02x})",
        code=status,
    )


@overload
async def relay_connect(
    stream: trio.abc.Stream, host: str, port: int, *, auth: Auth | None = ..., lazy: bool = ...
) -> trio.abc.Stream: ...
@overload
async def relay_connect(
    stream: anyio.abc.ByteStream,
    host: str,
    port: int,
    *,
    auth: Auth | None = ...,
    lazy: bool = ...,
) -> anyio.abc.ByteStream: ...
async def relay_connect(
    stream: AnyStream,
    host: str,
    port: int,
    *,
    auth: Auth | None = None,
    lazy: bool = True,
) -> AnyStream:
    """Ask the GOST relay server at the other end of ``stream`` for ``host:port``.

    With ``lazy=True`` (the default, as GOST's client) nothing is sent yet:
    the returned :class:`RelayClientStream` sends the request with the first
    write and checks the response in front of the first read, raising
    :class:`ProxyError` from there. This is the order that works with every
    relay server, including GOST's default one that holds its response until
    the target sends. With ``lazy=False`` the request goes out and the
    response is read before this returns; that needs a server that answers at
    once (GOST ``nodelay``, ``RelayHandler(lazy_reply=False)``) or a target
    that speaks first, else both sides wait for each other.

    Given a trio stream it returns a trio stream (wrapping the anyio one).
    """
    target = format_hostport(host, port)
    try:
        request = _connect_request(host, port, auth)
    except (AddressError, RelayFormatError) as exc:
        raise ProxyConnectError(f"cannot ask for {target}: {exc}") from None
    if lazy:
        return like(stream, RelayClientStream(stream, request, target))
    channel = as_anyio(stream)
    await channel.send(request)
    reader = HandshakeReader(channel)
    await _read_response(reader, target)
    return like(stream, reader.stream())


class RelayClientStream(anyio.abc.ByteStream):
    """A lazy relay client connection (what ``relay_connect(lazy=True)`` returns).

    The first :meth:`send` sends the CONNECT request together with its data;
    a :meth:`receive` before any send sends the request alone. The first
    :meth:`receive` reads the response first and raises
    :class:`ProxyAuthError` / :class:`ProxyConnectError` /
    :class:`ProxyProtocolError` if it is not OK (and again on every later
    receive).
    """

    def __init__(self, transport_stream: AnyStream, request: bytes, target: str) -> None:
        self.transport_stream = as_anyio(transport_stream)
        self._request: bytes | None = request
        self._target = target
        self._request_lock = anyio.Lock()
        self._reader: HandshakeReader | None = HandshakeReader(self.transport_stream)
        self._pending = b""
        self._failure: Exception | None = None
        self._sending = False
        self._receiving = False
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError

    async def _send_request(self, data: bytes = b"") -> bool:
        """Send the request (with ``data``) if it is still pending."""
        async with self._request_lock:
            if self._request is None:
                return False
            payload = self._request + bytes(data)
            self._request = None
            await self.transport_stream.send(payload)
            return True

    async def send(self, item: bytes) -> None:
        """Send ``item``; the first call carries the relay request with it (lazy connect)."""
        self._check_open()
        if self._sending:
            raise anyio.BusyResourceError("writing to")
        self._sending = True
        try:
            if not await self._send_request(item):
                await self.transport_stream.send(item)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close the stream to the relay (sending the request first if pending)."""
        self._check_open()
        await self._send_request()
        await self.transport_stream.send_eof()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Read the relay's reply once (raising its refusal), then the target's bytes."""
        self._check_open()
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise anyio.BusyResourceError("reading from")
        self._receiving = True
        try:
            if self._failure is not None:
                raise self._failure
            if self._reader is not None:
                if self._request is not None:
                    try:
                        await self._send_request()
                    except anyio.BrokenResourceError:
                        # The peer may still have sent an answer (or an EOF)
                        # before it went away: read that.
                        pass
                try:
                    await _read_response(self._reader, self._target)
                except (ProxyAuthError, ProxyConnectError, ProxyProtocolError) as exc:
                    self._failure = exc
                    raise
                self._pending = self._reader.take_buffered()
                self._reader = None
            if self._pending:
                chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
                return chunk
            return await self.transport_stream.receive(max_bytes)
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close the stream to the relay."""
        self._closed = True
        await self.transport_stream.aclose()
