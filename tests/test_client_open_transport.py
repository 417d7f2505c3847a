"""open_pht_stream(open_transport=...): every HTTP connection of the tunnel goes through it."""

from __future__ import annotations

import os
import ssl

import pytest
import trio

import pht
from pht._client import DEFAULT_KEEPALIVE_EXPIRY

from .support import receive_exactly, start_server


class Wrapped(trio.abc.Stream):
    """A byte stream that is not a socket stream (as one from a proxy hop is)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Opener:
    """Counts its calls; reaches the address with a real TCP connection, wrapped."""

    def __init__(self) -> None:
        self.open_tcp_stream = trio.open_tcp_stream
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.calls.append((host, port))
        return Wrapped(await self.open_tcp_stream(host, port))


@pytest.fixture
def opener(monkeypatch: pytest.MonkeyPatch) -> Opener:
    """An opener; any connection the client made by itself would fail."""
    opener = Opener()

    async def forbidden(host: str, port: int) -> trio.SocketStream:
        raise AssertionError("the client opened a TCP connection by itself")

    monkeypatch.setattr(trio, "open_tcp_stream", forbidden)
    return opener


@pytest.mark.parametrize("authorize", [True, False])
async def test_every_connection_uses_open_transport(
    nursery: trio.Nursery, opener: Opener, authorize: bool
) -> None:
    port = await start_server(nursery)
    stream = await pht.open_pht_stream(
        "127.0.0.1", port, authorize=authorize, max_push_size=1000, open_transport=opener
    )
    assert len(opener.calls) == 2  # the pull's connection, the push's
    payload = os.urandom(50_000)
    await stream.send_all(payload)
    assert await receive_exactly(stream, len(payload)) == payload
    await stream.aclose()
    assert set(opener.calls) == {("127.0.0.1", port)}


async def test_phts_over_a_non_socket_transport(nursery: trio.Nursery, opener: Opener) -> None:
    port = await start_server(nursery, tls=True)
    pem = await trio.to_thread.run_sync(ssl.get_server_certificate, ("127.0.0.1", port))
    context = ssl.create_default_context(cadata=pem)
    stream = await pht.open_pht_stream(
        "127.0.0.1", port, tls=context, server_hostname="gost.run", open_transport=opener
    )
    payload = os.urandom(200_000)
    await stream.send_all(payload)
    assert await receive_exactly(stream, len(payload)) == payload
    await stream.aclose()
    assert len(opener.calls) >= 2


async def test_untrusted_phts_over_a_non_socket_transport(
    nursery: trio.Nursery, opener: Opener
) -> None:
    port = await start_server(nursery, tls=True)
    with pytest.raises(pht.TunnelError, match=r"TLS handshake .* failed"):
        await pht.open_pht_stream("127.0.0.1", port, tls=True, open_transport=opener)


async def test_open_transport_failure_is_the_cause(nursery: trio.Nursery) -> None:
    port = await start_server(nursery)
    failure = ConnectionError("hop-0 (socks5://127.0.0.1:1): the proxy refused")

    async def refuse(host: str, port: int) -> trio.abc.Stream:
        raise failure

    with pytest.raises(pht.TunnelError, match=r"cannot connect to 127\.0\.0\.1:\d+: ") as info:
        await pht.open_pht_stream("127.0.0.1", port, open_transport=refuse)
    assert info.value.__cause__ is failure

    class HopDown(Exception):
        pass

    async def hop_down(host: str, port: int) -> trio.abc.Stream:
        raise HopDown("hop-0 (socks5://127.0.0.1:1): Connection refused")

    with pytest.raises(pht.TunnelError, match=r"hop-0 \(socks5://127\.0\.0\.1:1\): Connection"):
        await pht.open_pht_stream("127.0.0.1", port, open_transport=hop_down)


async def test_open_transport_is_bounded_by_connect_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def hang(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with pytest.raises(pht.TunnelError, match=r"timed out connecting to 127\.0\.0\.1:1$"):
        await pht.open_pht_stream("127.0.0.1", 1, connect_timeout=5, open_transport=hang)


async def test_idle_non_socket_connections_retire_by_keepalive_expiry(
    nursery: trio.Nursery, opener: Opener, autojump_clock: trio.abc.Clock
) -> None:
    # The client cannot peek at a stream that is not a socket: the idle limit
    # alone sends the next requests on new connections (through the opener).
    port = await start_server(nursery, keepalive_timeout=3600.0)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, open_transport=opener)
    await stream.send_all(b"before")
    assert await receive_exactly(stream, 6) == b"before"
    opened = len(opener.calls)
    await trio.sleep(DEFAULT_KEEPALIVE_EXPIRY + 1)
    with trio.fail_after(5):
        await stream.send_all(b"after")
        assert await receive_exactly(stream, 5) == b"after"
    assert len(opener.calls) == opened + 1  # a new push connection
    await stream.aclose()
