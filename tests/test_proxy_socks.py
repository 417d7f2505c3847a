"""SOCKS5 / SOCKS4 handlers and the SOCKS5 connector over in-memory streams."""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from pht.proxy import (
    Auth,
    ProxyAuthError,
    ProxyConnectError,
    ProxyError,
    ProxyProtocolError,
    Socks4Handler,
    Socks5Handler,
    socks5_connect,
)
from pht.proxy._address import (
    AddressError,
    UnsupportedAddressType,
    decode_address,
    encode_address,
    parse_hostport,
)
from tests.test_proxy_support import (
    FakeDialer,
    receive_all,
    receive_exactly,
    refused,
    run_handler_on,
)

GREETING = b"\x05\x01\x00"
CONNECT_IPV4 = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"  # 127.0.0.1:80
ZERO_REPLY_TAIL = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # RSV ATYP=1 0.0.0.0:0


def reply(code: int) -> bytes:
    return bytes([0x05, code]) + ZERO_REPLY_TAIL


# --- address codec ----------------------------------------------------------

hostnames = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){0,3}", fullmatch=True
)
ports = st.integers(min_value=0, max_value=65535)


@given(host=st.ip_addresses(), port=ports)
def test_ip_address_round_trip(
    host: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    encoded = encode_address(str(host), port)
    assert encoded[0] == (0x01 if host.version == 4 else 0x04)
    assert decode_address(encoded + b"trailing") == (str(host), port, len(encoded))


@given(host=hostnames, port=ports)
def test_domain_round_trip(host: str, port: int) -> None:
    encoded = encode_address(host, port)
    assert encoded[:2] == bytes([0x03, len(host)])
    assert decode_address(encoded) == (host, port, len(encoded))


@given(data=st.binary(max_size=40))
def test_decode_address_never_crashes(data: bytes) -> None:
    try:
        host, port, used = decode_address(data)
    except AddressError:
        return
    assert used <= len(data)
    assert 0 <= port <= 65535
    assert host


def test_encode_address_rejects_bad_input() -> None:
    with pytest.raises(AddressError):
        encode_address("a" * 256, 80)
    with pytest.raises(AddressError):
        encode_address("example.com", 70000)
    with pytest.raises(UnsupportedAddressType):
        decode_address(b"\x02abcdef")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:443", ("example.com", 443)),
        ("example.com", ("example.com", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::1]", ("::1", 80)),
        ("::1", ("::1", 80)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, 80) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:", "host:x", "host:99999", "[::1", "[::1]x"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(AddressError):
        parse_hostport(text, 80)


# --- SOCKS5 handler ---------------------------------------------------------


async def test_socks5_connect_relays_both_ways(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(Socks5Handler(dial=dialer), server)
    await client.send_all(GREETING)
    assert await receive_exactly(client, 2) == b"\x05\x00"
    await client.send_all(CONNECT_IPV4)
    assert await receive_exactly(client, 10) == reply(0x00)
    assert dialer.calls == [("127.0.0.1", 80)]
    target = await dialer.target()
    await client.send_all(b"ping")
    assert await receive_exactly(target, 4) == b"ping"
    await target.send_all(b"pong")
    assert await receive_exactly(client, 4) == b"pong"
    await client.aclose()
    assert await receive_all(target) == b""


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (b"\x04" + bytes(15) + b"\x01" + b"\x01\xbb", ("::1", 443)),
        (b"\x03\x0bexample.com\x00\x16", ("example.com", 22)),
    ],
)
async def test_socks5_ipv6_and_domain_with_pipelined_data(
    nursery: trio.Nursery, address: bytes, expected: tuple[str, int]
) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(Socks5Handler(dial=dialer), server)
    # Greeting, request and first data in one write: nothing may be lost.
    await client.send_all(GREETING + b"\x05\x01\x00" + address + b"early")
    assert await receive_exactly(client, 12) == b"\x05\x00" + reply(0x00)
    target = await dialer.target()
    assert await receive_exactly(target, 5) == b"early"
    assert dialer.calls == [expected]


async def test_socks5_username_password(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(Socks5Handler(auth=Auth("user", "pa:ss"), dial=dialer), server)
    await client.send_all(b"\x05\x02\x00\x02")
    assert await receive_exactly(client, 2) == b"\x05\x02"
    await client.send_all(b"\x01\x04user\x05pa:ss")
    assert await receive_exactly(client, 2) == b"\x01\x00"
    await client.send_all(CONNECT_IPV4)
    assert await receive_exactly(client, 10) == reply(0x00)


@pytest.mark.parametrize(
    ("client_bytes", "answer"),
    [
        # Wrong password: failure status, then close.
        (b"\x05\x01\x02\x01\x04user\x05wrong", b"\x05\x02\x01\x01"),
        # Wrong user.
        (b"\x05\x01\x02\x01\x05other\x05pa:ss", b"\x05\x02\x01\x01"),
        # Only "no auth" offered: no acceptable method.
        (GREETING, b"\x05\xff"),
        # Bad sub-negotiation version.
        (b"\x05\x01\x02\x05\x04user\x05pa:ss", b"\x05\x02\x01\x01"),
        # Truncated credentials.
        (b"\x05\x01\x02\x01\x04us", b"\x05\x02"),
    ],
)
async def test_socks5_bad_auth(client_bytes: bytes, answer: bytes) -> None:
    dialer = FakeDialer()
    got, _ = await run_handler_on(
        Socks5Handler(auth=Auth("user", "pa:ss"), dial=dialer), client_bytes
    )
    assert got == answer
    assert dialer.calls == []


@pytest.mark.parametrize(
    ("client_bytes", "answer"),
    [
        (b"\x04\x01\x00", b""),  # not SOCKS5: close without a reply
        (b"\x05", b""),  # truncated greeting
        (b"\x05\x02\x00", b""),  # truncated method list
        (b"\x05\x01\x80", b"\x05\xff"),  # no acceptable method
        (GREETING + b"\x05\x01\x00\x01\x7f\x00", b"\x05\x00"),  # truncated request
        (GREETING + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00" + reply(0x01)),
        (GREETING + b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50", b"\x05\x00" + reply(0x08)),
        (GREETING + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00" + reply(0x07)),
        (GREETING + b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00" + reply(0x07)),
        (GREETING + b"\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00" + reply(0x01)),  # empty name
        (GREETING + b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", b"\x05\x00" + reply(0x01)),
    ],
)
async def test_socks5_malformed_input_gets_exact_reply(client_bytes: bytes, answer: bytes) -> None:
    dialer = FakeDialer()
    got, _ = await run_handler_on(Socks5Handler(dial=dialer), client_bytes)
    assert got == answer
    assert dialer.calls == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (refused(), 0x05),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), 0x03),
        (OSError(errno.EHOSTUNREACH, "No route to host"), 0x04),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), 0x04),
        (OSError(errno.EACCES, "Permission denied"), 0x01),
    ],
)
async def test_socks5_dial_errors_map_to_reply_codes(error: OSError, code: int) -> None:
    got, _ = await run_handler_on(Socks5Handler(dial=FakeDialer(error)), GREETING + CONNECT_IPV4)
    assert got == b"\x05\x00" + reply(code)


async def test_socks5_dial_timeout_is_host_unreachable(autojump_clock: trio.abc.Clock) -> None:
    handler = Socks5Handler(dial=FakeDialer(hang=True), dial_timeout=10)
    got, _ = await run_handler_on(handler, GREETING + CONNECT_IPV4)
    assert got == b"\x05\x00" + reply(0x04)


@given(data=st.binary(max_size=64))
async def test_socks5_handler_never_raises_on_garbage(data: bytes) -> None:
    dialer = FakeDialer(refused())
    got, _ = await run_handler_on(Socks5Handler(dial=dialer), data)
    assert got == b"" or got.startswith(b"\x05")


# --- SOCKS4 / SOCKS4a handler -------------------------------------------------


async def test_socks4_connect(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(Socks4Handler(dial=dialer), server)
    await client.send_all(b"\x04\x01\x00\x50\x0a\x00\x00\x01me\x00hello")
    assert await receive_exactly(client, 8) == b"\x00\x5a" + bytes(6)
    assert dialer.calls == [("10.0.0.1", 80)]
    assert await receive_exactly(await dialer.target(), 5) == b"hello"


async def test_socks4a_domain(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(Socks4Handler(dial=dialer), server)
    await client.send_all(b"\x04\x01\x01\xbb\x00\x00\x00\x07\x00example.org\x00")
    assert await receive_exactly(client, 8) == b"\x00\x5a" + bytes(6)
    assert dialer.calls == [("example.org", 443)]


REJECTED4 = b"\x00\x5b" + bytes(6)


@pytest.mark.parametrize(
    ("client_bytes", "answer"),
    [
        (b"\x04\x01\x00\x50", b""),  # truncated
        (b"\x04\x02\x00\x50\x0a\x00\x00\x01\x00", REJECTED4),  # BIND
        (b"\x04\x01\x00\x50\x0a\x00\x00\x01" + b"u" * 300, REJECTED4),  # user id too long
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", REJECTED4),  # SOCKS4a, empty name
    ],
)
async def test_socks4_malformed(client_bytes: bytes, answer: bytes) -> None:
    got, _ = await run_handler_on(Socks4Handler(dial=FakeDialer()), client_bytes)
    assert got == answer


async def test_socks4_refused_and_auth() -> None:
    request = b"\x04\x01\x00\x50\x0a\x00\x00\x01me\x00"
    got, _ = await run_handler_on(Socks4Handler(dial=FakeDialer(refused())), request)
    assert got == REJECTED4
    # A password-protected server cannot accept SOCKS4, which has no password.
    got, _ = await run_handler_on(Socks4Handler(auth=Auth("me", "pw"), dial=FakeDialer()), request)
    assert got == REJECTED4


# --- SOCKS5 connector --------------------------------------------------------


async def serve_socks5(nursery: trio.Nursery, handler: Socks5Handler) -> trio.abc.Stream:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(handler, server)
    return client


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "example.com"])
async def test_socks5_connect_against_handler(nursery: trio.Nursery, host: str) -> None:
    dialer = FakeDialer()
    auth = Auth("u", "p")
    stream = await socks5_connect(
        await serve_socks5(nursery, Socks5Handler(auth=auth, dial=dialer)), host, 8080, auth=auth
    )
    assert dialer.calls == [(host, 8080)]
    target = await dialer.target()
    await stream.send_all(b"abc")
    assert await receive_exactly(target, 3) == b"abc"
    await target.send_all(b"xyz")
    assert await receive_exactly(stream, 3) == b"xyz"


async def test_socks5_connect_errors(nursery: trio.Nursery) -> None:
    auth = Auth("u", "p")
    with pytest.raises(ProxyAuthError, match="rejected the credentials"):
        await socks5_connect(
            await serve_socks5(nursery, Socks5Handler(auth=auth, dial=FakeDialer())),
            "example.com",
            80,
            auth=Auth("u", "wrong"),
        )
    with pytest.raises(ProxyAuthError, match="username and password") as auth_info:
        await socks5_connect(
            await serve_socks5(nursery, Socks5Handler(auth=auth, dial=FakeDialer())),
            "example.com",
            80,
        )
    assert auth_info.value.code == 0xFF
    with pytest.raises(ProxyConnectError, match="connection refused") as info:
        await socks5_connect(
            await serve_socks5(nursery, Socks5Handler(dial=FakeDialer(refused()))),
            "example.com",
            80,
        )
    assert info.value.code == 0x05


@pytest.mark.parametrize(
    "server_bytes",
    [b"", b"\x04\x00", b"\x05\x00\x05\x00", b"\x05\x00\x05\x00\x00\x09", b"\x05\x07"],
)
async def test_socks5_connect_protocol_errors(server_bytes: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(server_bytes)
    await server.send_eof()
    with pytest.raises(ProxyProtocolError):
        await socks5_connect(client, "example.com", 80)


def test_errors_are_pht_errors() -> None:
    from pht import PHTError

    assert issubclass(ProxyError, PHTError)
