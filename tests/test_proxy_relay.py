"""GOST relay server and client, both orders, over in-memory streams."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from pht.proxy import (
    Auth,
    ProxyAuthError,
    ProxyConnectError,
    ProxyProtocolError,
    RelayHandler,
    relay,
    relay_connect,
)
from tests.test_proxy_support import (
    FakeDialer,
    receive_all,
    receive_exactly,
    refused,
    run_handler_on,
)

OK = b"\x01\x00\x00\x00"
# CONNECT with an address feature for 127.0.0.1:80.
ADDRESS_FEATURE = b"\x02\x00\x07\x01\x7f\x00\x00\x01\x00\x50"
CONNECT = b"\x01\x01\x00\x0a" + ADDRESS_FEATURE
USER_FEATURE = b"\x01\x00\x08\x02me\x04pass"  # user "me", password "pass"


def status(code: int) -> bytes:
    return bytes([0x01, code, 0x00, 0x00])


def test_connect_request_golden_bytes() -> None:
    from pht.proxy._relay import _connect_request

    assert _connect_request("127.0.0.1", 80, None) == CONNECT
    assert _connect_request("127.0.0.1", 80, Auth("me", "pass")) == (
        b"\x01\x01\x00\x15" + USER_FEATURE + ADDRESS_FEATURE
    )
    assert _connect_request("example.com", 443, None) == (
        b"\x01\x01\x00\x12\x02\x00\x0f\x03\x0bexample.com\x01\xbb"
    )


async def test_lazy_server_sends_ok_in_front_of_first_data(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=dialer), server)
    # Request and data together, as GOST's client sends them.
    await client.send_all(CONNECT + b"GET / HTTP/1.0\r\n\r\n")
    target = await dialer.target()
    assert await receive_exactly(target, 18) == b"GET / HTTP/1.0\r\n\r\n"
    await target.send_all(b"HTTP/1.0 200 OK\r\n\r\n")
    assert await receive_exactly(client, 4 + 19) == OK + b"HTTP/1.0 200 OK\r\n\r\n"
    assert dialer.calls == [("127.0.0.1", 80)]


async def test_eager_server_answers_at_once(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=dialer, lazy_reply=False), server)
    await client.send_all(CONNECT)
    assert await receive_exactly(client, 4) == OK


# An eager client with a lazy server only works when the target speaks first:
# see test_eager_client_with_lazy_server_when_target_speaks_first.
@pytest.mark.parametrize(
    ("lazy_reply", "lazy_client"),
    [(True, True), (False, True), (False, False)],
    ids=["lazy-lazy", "eager-server-lazy-client", "eager-eager"],
)
async def test_client_and_server_orders(
    nursery: trio.Nursery, lazy_reply: bool, lazy_client: bool
) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    auth = Auth("me", "pass")
    nursery.start_soon(RelayHandler(auth=auth, dial=dialer, lazy_reply=lazy_reply), server)
    stream = await relay_connect(client, "example.com", 443, auth=auth, lazy=lazy_client)
    # The client speaks first.
    await stream.send_all(b"hello")
    target = await dialer.target()
    assert await receive_exactly(target, 5) == b"hello"
    await target.send_all(b"world")
    assert await receive_exactly(stream, 5) == b"world"
    assert dialer.calls == [("example.com", 443)]


async def test_eager_client_with_lazy_server_when_target_speaks_first(
    nursery: trio.Nursery,
) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=dialer), server)
    async with trio.open_nursery() as inner:
        inner.start_soon(lambda: _send_banner(dialer))
        stream = await relay_connect(client, "127.0.0.1", 22, lazy=False)
    assert await receive_exactly(stream, 8) == b"SSH-2.0-"


async def _send_banner(dialer: FakeDialer) -> None:
    target = await dialer.target()
    await target.send_all(b"SSH-2.0-")


async def test_lazy_client_reading_first_sends_the_request(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=dialer), server)
    stream = await relay_connect(client, "127.0.0.1", 22)
    nursery.start_soon(_send_banner, dialer)
    assert await receive_exactly(stream, 8) == b"SSH-2.0-"


async def test_forward_target_wins_over_the_address(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    handler = RelayHandler(target=("10.1.2.3", 2222), dial=dialer, lazy_reply=False)
    answer, _ = await run_handler_on(handler, b"\x01\x01\x00\x00")  # no address feature
    assert answer == OK
    answer, _ = await run_handler_on(handler, CONNECT)
    assert answer == OK
    assert dialer.calls == [("10.1.2.3", 2222), ("10.1.2.3", 2222)]


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (b"\x02\x01\x00\x00", status(0x01)),  # bad version
        (b"\x01\x01\x00\x00", status(0x01)),  # no address, no target
        (b"\x01\x01\x00\x05\x02\x00\x09\x01\x7f", status(0x01)),  # truncated feature
        (b"\x01\x01\x00\x05\x02\x00\x02\x09\x00", status(0x01)),  # unknown ATYP
        (b"\x01\x02\x00\x0a" + ADDRESS_FEATURE, status(0x01)),  # BIND
        (b"\x01\x81\x00\x0a" + ADDRESS_FEATURE, status(0x01)),  # UDP
        (b"\x01\x01\x00", b""),  # truncated header: just closed
        (b"\x01\x01\x00\x0a\x02\x00", b""),  # truncated features
    ],
    ids=["version", "no-address", "feature", "atyp", "bind", "udp", "header", "features"],
)
async def test_malformed_requests(request_bytes: bytes, answer: bytes) -> None:
    dialer = FakeDialer()
    got, _ = await run_handler_on(RelayHandler(dial=dialer), request_bytes)
    assert got == answer
    assert dialer.calls == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        CONNECT,
        b"\x01\x01\x00\x15\x01\x00\x08\x02me\x04PASS" + ADDRESS_FEATURE,
        b"\x01\x01\x00\x15\x01\x00\x08\x02mE\x04pass" + ADDRESS_FEATURE,
    ],
    ids=["missing", "password", "user"],
)
async def test_unauthorized(request_bytes: bytes) -> None:
    dialer = FakeDialer()
    got, _ = await run_handler_on(
        RelayHandler(auth=Auth("me", "pass"), dial=dialer), request_bytes
    )
    assert got == status(0x02)
    assert dialer.calls == []


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (refused(), 0x05),  # "service unavailable": the relay protocol has no "refused"
        (OSError(errno.EHOSTUNREACH, "No route to host"), 0x06),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), 0x07),
    ],
)
async def test_dial_errors_are_answered_at_once(error: OSError, code: int) -> None:
    got, _ = await run_handler_on(RelayHandler(dial=FakeDialer(error)), CONNECT)
    assert got == status(code)


async def test_dial_timeout(autojump_clock: trio.abc.Clock) -> None:
    handler = RelayHandler(dial=FakeDialer(hang=True), dial_timeout=10)
    got, _ = await run_handler_on(handler, CONNECT)
    assert got == status(0x04)


async def test_eager_client_errors(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=FakeDialer(refused())), server)
    with pytest.raises(ProxyConnectError, match="connection refused") as info:
        await relay_connect(client, "127.0.0.1", 80, lazy=False)
    assert info.value.code == 0x05

    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(auth=Auth("a", "b"), dial=FakeDialer()), server)
    with pytest.raises(ProxyAuthError, match="rejected the credentials"):
        await relay_connect(client, "127.0.0.1", 80, auth=Auth("a", "x"), lazy=False)


async def test_lazy_client_reports_errors_on_every_read(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=FakeDialer(refused())), server)
    stream = await relay_connect(client, "127.0.0.1", 80)
    await stream.send_all(b"data")
    for _ in range(2):
        with pytest.raises(ProxyConnectError) as info:
            await stream.receive_some()
        assert info.value.code == 0x05


async def test_lazy_client_error_ends_a_relay_quietly(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(RelayHandler(dial=FakeDialer(refused())), server)
    stream = await relay_connect(client, "127.0.0.1", 80)
    local_outer, local_inner = trio.testing.memory_stream_pair()
    await local_outer.send_all(b"request")
    up, down = await relay(local_inner, stream)
    assert (up, down) == (7, 0)
    assert await receive_all(local_outer) == b""


@pytest.mark.parametrize("answer", [b"", b"\x05\x00", b"\x01\x00\x00\x05\x00"])
async def test_client_protocol_errors(answer: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(answer)
    await server.send_eof()
    with pytest.raises(ProxyProtocolError):
        await relay_connect(client, "127.0.0.1", 80, lazy=False)


async def test_lazy_client_stream_contract() -> None:
    """trio's generic stream checks, with the relay handshake in the way."""

    class Server(trio.abc.Stream):
        # The far end: drops the request once, answers OK at once.
        def __init__(self, inner: trio.abc.Stream) -> None:
            self.inner = inner
            self.skip = len(CONNECT)

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            while self.skip:
                chunk = await self.inner.receive_some(self.skip)
                if not chunk:
                    return b""
                self.skip -= len(chunk)
            return await self.inner.receive_some(max_bytes)

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        await b.send_all(OK)
        return await relay_connect(a, "127.0.0.1", 80), Server(b)

    await trio.testing.check_two_way_stream(maker, None)
