"""SOCKS5 (RFC 1928, RFC 1929 auth) and SOCKS4/4a: handlers and the SOCKS5 connector."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from typing import overload

import anyio
import anyio.abc
import trio
from anyio.abc import SocketAttribute

from ._address import (
    AddressError,
    UnsupportedAddressType,
    address_length,
    decode_address,
    encode_address,
    format_hostport,
)
from ._dial import (
    Auth,
    DialFailed,
    DialFailure,
    DialingHandler,
    dial_upstream,
)
from ._errors import ProxyAuthError, ProxyConnectError, ProxyProtocolError
from ._serve import Connected, Reject, serve_handshake
from ._stream import AnyStream, HandshakeReader, Truncated, as_anyio, like

__all__ = ["Socks4Handler", "Socks5Handler", "socks5_connect"]

SOCKS5_VERSION = 0x05
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
USERPASS_VERSION = 0x01
CMD_CONNECT = 0x01

#: SOCKS5 reply codes (RFC 1928 section 6).
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLY_MESSAGES = {
    REP_GENERAL_FAILURE: "general SOCKS server failure",
    REP_NOT_ALLOWED: "connection not allowed by ruleset",
    REP_NETWORK_UNREACHABLE: "network unreachable",
    REP_HOST_UNREACHABLE: "host unreachable",
    REP_CONNECTION_REFUSED: "connection refused",
    REP_TTL_EXPIRED: "TTL expired",
    REP_COMMAND_NOT_SUPPORTED: "command not supported",
    REP_ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_DIAL_REPLIES = {
    DialFailure.REFUSED: REP_CONNECTION_REFUSED,
    DialFailure.NETWORK_UNREACHABLE: REP_NETWORK_UNREACHABLE,
    DialFailure.HOST_UNREACHABLE: REP_HOST_UNREACHABLE,
    DialFailure.TIMEOUT: REP_HOST_UNREACHABLE,
    DialFailure.HOP: REP_GENERAL_FAILURE,
    DialFailure.OTHER: REP_GENERAL_FAILURE,
}

SOCKS4_VERSION = 0x04
SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B
_SOCKS4_MAX_FIELD = 255


def socks5_reply(code: int, bound: tuple[str, int] | None = None) -> bytes:
    """``VER REP RSV ATYP BND.ADDR BND.PORT``; ``bound`` defaults to 0.0.0.0:0."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    return bytes([SOCKS5_VERSION, code, 0x00]) + encode_address(host, port)


def local_address(stream: anyio.abc.ByteStream) -> tuple[str, int] | None:
    """The local IP address and port of a TCP stream, else ``None``."""
    try:
        family = stream.extra(SocketAttribute.family, None)
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        address = stream.extra(SocketAttribute.local_address)
        ipaddress.ip_address(address[0])
    except (OSError, ValueError, TypeError, IndexError):
        return None
    return str(address[0]), int(address[1])


def _printable(name: bytes) -> str:
    """A user name for a log line: text, control characters escaped, no quotes or b''."""
    return name.decode("utf-8", "backslashreplace").encode("unicode_escape").decode("ascii")


def _credentials_match(auth: Auth, username: bytes, password: bytes) -> bool:
    # Compare both fields (no short-circuit) in constant time.
    user_ok = hmac.compare_digest(username, auth.username.encode())
    pass_ok = hmac.compare_digest(password, auth.password.encode())
    return user_ok & pass_ok


class Socks5Handler(DialingHandler):
    """A SOCKS5 server for one stream: CONNECT only (no BIND, no UDP ASSOCIATE).

    Without ``auth`` it offers "no authentication"; with ``auth`` it offers
    only username/password (RFC 1929). Dial failures are answered with the
    matching reply code; the success reply carries the upstream socket's
    local address when there is one.
    """

    async def __call__(self, stream: AnyStream) -> None:
        """Serve one SOCKS5 client on ``stream``: negotiate, dial, relay, close."""
        await serve_handshake(self.log, "socks5", stream, self._handshake)

    async def _handshake(self, stream: anyio.abc.ByteStream, peer: str) -> Connected:
        reader = HandshakeReader(stream)
        version, method_count = await reader.read_exactly(2)
        if version != SOCKS5_VERSION:
            raise Reject(b"", f"not SOCKS5 (version byte 0x{version:02x})")
        methods = await reader.read_exactly(method_count)
        wanted = METHOD_USERNAME_PASSWORD if self.auth is not None else METHOD_NO_AUTH
        if wanted not in methods:
            raise Reject(
                bytes([SOCKS5_VERSION, METHOD_NONE_ACCEPTABLE]),
                f"no acceptable method among {methods.hex(' ') or 'none'}",
            )
        await stream.send(bytes([SOCKS5_VERSION, wanted]))
        if self.auth is not None:
            await self._authenticate(reader, stream, self.auth)

        version, command, _reserved, atyp = await reader.read_exactly(4)
        if version != SOCKS5_VERSION:
            raise Reject(
                socks5_reply(REP_GENERAL_FAILURE), f"bad version 0x{version:02x} in request"
            )
        try:
            host, port = await _read_address(reader, atyp)
        except UnsupportedAddressType as exc:
            raise Reject(socks5_reply(REP_ADDRESS_TYPE_NOT_SUPPORTED), str(exc)) from None
        except AddressError as exc:
            raise Reject(socks5_reply(REP_GENERAL_FAILURE), str(exc)) from None
        target = format_hostport(host, port)
        if command != CMD_CONNECT:
            raise Reject(
                socks5_reply(REP_COMMAND_NOT_SUPPORTED),
                f"command 0x{command:02x} to {target} is not supported (only CONNECT)",
            )
        try:
            upstream = await dial_upstream(self.dial, host, port, self.dial_timeout)
        except DialFailed as exc:
            raise Reject(
                socks5_reply(_DIAL_REPLIES[exc.failure]),
                exc.describe(target),
                level=logging.WARNING,
            ) from None
        try:
            await stream.send(socks5_reply(REP_SUCCEEDED, local_address(upstream)))
        except BaseException:
            await anyio.aclose_forcefully(upstream)
            raise
        return Connected(reader.stream(), upstream, target)

    async def _authenticate(
        self, reader: HandshakeReader, stream: anyio.abc.ByteStream, auth: Auth
    ) -> None:
        version, username_length = await reader.read_exactly(2)
        failure = bytes([USERPASS_VERSION, 0x01])
        if version != USERPASS_VERSION:
            raise Reject(failure, f"bad username/password version 0x{version:02x}")
        username = await reader.read_exactly(username_length)
        (password_length,) = await reader.read_exactly(1)
        password = await reader.read_exactly(password_length)
        if not _credentials_match(auth, username, password):
            raise Reject(
                failure,
                f"wrong credentials for user {_printable(username)}",
                level=logging.WARNING,
            )
        await stream.send(bytes([USERPASS_VERSION, 0x00]))


async def _read_address(reader: HandshakeReader, atyp: int) -> tuple[str, int]:
    """Read ``ADDR PORT`` after an ``ATYP`` byte already read."""
    head = bytes([atyp])
    if atyp == 0x03:
        head += await reader.read_exactly(1)
    length = address_length(head)  # raises UnsupportedAddressType
    assert length is not None
    host, port, _ = decode_address(head + await reader.read_exactly(length - len(head)))
    return host, port


class Socks4Handler(DialingHandler):
    """A SOCKS4 / SOCKS4a server for one stream: CONNECT only.

    SOCKS4 carries a user id but no password: with ``auth`` set, a request is
    accepted only if its user id is ``auth.username`` and ``auth.password`` is
    empty (as GOST does), so a password-protected server rejects SOCKS4.
    """

    async def __call__(self, stream: AnyStream) -> None:
        """Serve one SOCKS4/4a client on ``stream``: read its request, dial, relay, close."""
        await serve_handshake(self.log, "socks4", stream, self._handshake)

    async def _handshake(self, stream: anyio.abc.ByteStream, peer: str) -> Connected:
        reader = HandshakeReader(stream)
        header = await reader.read_exactly(8)
        rejected = bytes([0x00, SOCKS4_REJECTED]) + bytes(6)
        version, command = header[0], header[1]
        if version != SOCKS4_VERSION:
            raise Reject(b"", f"not SOCKS4 (version byte 0x{version:02x})")
        port = int.from_bytes(header[2:4], "big")
        user_id = await reader.read_until(b"\x00", _SOCKS4_MAX_FIELD)
        if user_id is None:
            raise Reject(rejected, "user id too long")
        ip = header[4:8]
        if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:
            # SOCKS4a: the host name follows the user id.
            name = await reader.read_until(b"\x00", _SOCKS4_MAX_FIELD)
            if not name:
                raise Reject(rejected, "SOCKS4a host name missing or too long")
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError:
                raise Reject(rejected, f"host name {name!r} is not ASCII") from None
        else:
            host = str(ipaddress.IPv4Address(ip))
        target = format_hostport(host, port)
        if command != CMD_CONNECT:
            raise Reject(rejected, f"command 0x{command:02x} to {target} is not supported")
        if self.auth is not None and not _credentials_match(self.auth, user_id, b""):
            raise Reject(rejected, f"user id {user_id!r} not allowed")
        try:
            upstream = await dial_upstream(self.dial, host, port, self.dial_timeout)
        except DialFailed as exc:
            raise Reject(
                rejected,
                exc.describe(target),
                level=logging.WARNING,
            ) from None
        try:
            await stream.send(bytes([0x00, SOCKS4_GRANTED]) + bytes(6))
        except BaseException:
            await anyio.aclose_forcefully(upstream)
            raise
        return Connected(reader.stream(), upstream, target)


@overload
async def socks5_connect(
    stream: trio.abc.Stream, host: str, port: int, *, auth: Auth | None = ...
) -> trio.abc.Stream: ...
@overload
async def socks5_connect(
    stream: anyio.abc.ByteStream, host: str, port: int, *, auth: Auth | None = ...
) -> anyio.abc.ByteStream: ...
async def socks5_connect(
    stream: AnyStream, host: str, port: int, *, auth: Auth | None = None
) -> AnyStream:
    """Ask the SOCKS5 proxy at the other end of ``stream`` to connect to ``host:port``.

    Offers "no authentication", plus username/password when ``auth`` is
    given. Returns a stream that reaches the target (``stream`` itself, or a
    wrapper if the proxy sent target data right after its reply). Raises
    :class:`ProxyAuthError`, :class:`ProxyConnectError` (``code`` = the REP
    byte) or :class:`ProxyProtocolError`; ``stream`` is left open then.
    Given a trio stream it returns a trio stream.
    """
    original, stream = stream, as_anyio(stream)
    target = format_hostport(host, port)
    try:
        request = bytes([SOCKS5_VERSION, CMD_CONNECT, 0x00]) + encode_address(host, port)
    except AddressError as exc:
        raise ProxyConnectError(f"cannot ask for {target}: {exc}") from None
    methods = bytes([METHOD_NO_AUTH])
    if auth is not None:
        methods += bytes([METHOD_USERNAME_PASSWORD])
    reader = HandshakeReader(stream)
    try:
        await stream.send(bytes([SOCKS5_VERSION, len(methods)]) + methods)
        version, method = await reader.read_exactly(2)
        if version != SOCKS5_VERSION:
            raise ProxyProtocolError(
                f"the proxy does not speak SOCKS5 (it answered version 0x{version:02x})"
            )
        if method == METHOD_USERNAME_PASSWORD and auth is not None:
            username, password = auth.username.encode(), auth.password.encode()
            if len(username) > 255 or len(password) > 255:
                raise ProxyAuthError("SOCKS5 username and password must be at most 255 bytes")
            await stream.send(
                bytes([USERPASS_VERSION, len(username)])
                + username
                + bytes([len(password)])
                + password
            )
            _, status = await reader.read_exactly(2)
            if status != 0x00:
                raise ProxyAuthError(
                    f"the SOCKS5 proxy rejected the credentials of user {auth.username!r}",
                    code=status,
                )
        elif method == METHOD_NONE_ACCEPTABLE:
            hint = "" if auth is not None else "; does it need a username and password?"
            raise ProxyAuthError(
                f"the SOCKS5 proxy accepts none of the offered methods{hint}",
                code=method,
            )
        elif method != METHOD_NO_AUTH:
            raise ProxyProtocolError(
                f"the SOCKS5 proxy chose method 0x{method:02x}, which was not offered"
            )
        await stream.send(request)
        version, code, _reserved, atyp = await reader.read_exactly(4)
        if version != SOCKS5_VERSION:
            raise ProxyProtocolError(f"bad version 0x{version:02x} in the SOCKS5 proxy's reply")
        try:
            await _read_address(reader, atyp)
        except AddressError as exc:
            raise ProxyProtocolError(f"bad bound address in the SOCKS5 reply: {exc}") from None
    except Truncated:
        raise ProxyProtocolError(
            "the SOCKS5 proxy closed the connection in the middle of the handshake"
        ) from None
    if code != REP_SUCCEEDED:
        message = REPLY_MESSAGES.get(code, "unknown error")
        raise ProxyConnectError(
            f"the SOCKS5 proxy cannot connect to {target}: {message} (reply 0x{code:02x})",
            code=code,
        )
    return like(original, reader.stream())
