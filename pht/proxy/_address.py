"""Pure helpers for the address formats the proxy protocols share.

SOCKS5 and the GOST relay protocol write a destination the same way:
``ATYP(1)`` (``0x01`` IPv4, ``0x03`` domain, ``0x04`` IPv6), the address
(4 bytes, ``LEN(1) NAME`` or 16 bytes), then ``PORT(2)`` big-endian.
"""

from __future__ import annotations

import ipaddress

__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "AddressError",
    "UnsupportedAddressType",
    "address_length",
    "decode_address",
    "encode_address",
    "format_hostport",
    "parse_hostport",
]

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class AddressError(ValueError):
    """An address cannot be encoded, or the bytes are not a valid address."""


class UnsupportedAddressType(AddressError):
    """The ``ATYP`` byte names no address type we know."""

    def __init__(self, atyp: int) -> None:
        super().__init__(f"unknown address type 0x{atyp:02x}")
        self.atyp = atyp


def _strip_brackets(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def encode_address(host: str, port: int) -> bytes:
    """Encode ``host:port`` as ``ATYP | ADDR | PORT``.

    IP literals (IPv6 with or without brackets) use the binary forms; anything
    else is sent as a domain name, which must be 1 to 255 bytes.
    """
    if not 0 <= port <= 0xFFFF:
        raise AddressError(f"port {port} is outside 0..65535")
    host = _strip_brackets(host)
    port_bytes = port.to_bytes(2, "big")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.version == 4:
            return bytes([ATYP_IPV4]) + ip.packed + port_bytes
        return bytes([ATYP_IPV6]) + ip.packed + port_bytes
    try:
        name = host.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = host.encode("idna")
        except UnicodeError as exc:
            raise AddressError(f"cannot encode host name {host!r}: {exc}") from None
    if not 1 <= len(name) <= 255:
        raise AddressError(f"host name must be 1 to 255 bytes long, not {len(name)}")
    return bytes([ATYP_DOMAIN, len(name)]) + name + port_bytes


def address_length(data: bytes) -> int | None:
    """How many bytes the address starting ``data`` takes, or ``None`` if
    ``data`` is too short to tell (a domain's length byte is missing)."""
    if not data:
        return None
    atyp = data[0]
    if atyp == ATYP_IPV4:
        return 1 + 4 + 2
    if atyp == ATYP_IPV6:
        return 1 + 16 + 2
    if atyp == ATYP_DOMAIN:
        if len(data) < 2:
            return None
        return 2 + data[1] + 2
    raise UnsupportedAddressType(atyp)


def decode_address(data: bytes) -> tuple[str, int, int]:
    """Decode an address at the start of ``data``.

    Returns ``(host, port, consumed)``. Raises :class:`AddressError` when
    ``data`` is too short or malformed, :class:`UnsupportedAddressType` for an
    unknown ``ATYP``.
    """
    length = address_length(data)
    if length is None or len(data) < length:
        raise AddressError("address is truncated")
    atyp = data[0]
    port = int.from_bytes(data[length - 2 : length], "big")
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(data[1:5]))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(data[1:17]))
    else:
        raw = data[2 : length - 2]
        if not raw:
            raise AddressError("empty host name")
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise AddressError(f"host name {raw!r} is not ASCII") from None
    return host, port, length


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or a bare host (then ``default_port``).

    Raises :class:`AddressError` for an empty host, a missing or bad port.
    """
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise AddressError(f"{text!r} has no closing bracket")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise AddressError(f"unexpected {rest!r} after the address in {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        # No colon, or a bare IPv6 literal: no port given.
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise AddressError(f"{text!r} has no port")
        port = default_port
    else:
        if not (port_text.isascii() and port_text.isdigit()):
            raise AddressError(f"bad port in {text!r}")
        port = int(port_text)
        if port > 0xFFFF:
            raise AddressError(f"port {port} is outside 0..65535")
    if not host:
        raise AddressError(f"{text!r} has no host")
    return host, port
