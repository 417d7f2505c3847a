"""pht's own TLS stream (OpenSSL on the socket) against trio's stream contract."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

import pht
from pht._tls_stream import TLSSocketStream

CERT = pht.make_self_signed_certificate()


async def tls_pair() -> tuple[TLSSocketStream, TLSSocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = await listeners[0].accept()
    await listeners[0].aclose()
    client_context = ssl.create_default_context()
    CERT.configure_trust(client_context)
    assert isinstance(server_tcp, trio.SocketStream)
    server = TLSSocketStream.wrap(server_tcp, CERT.server_context(), server_side=True)
    client = TLSSocketStream.wrap(
        client_tcp, client_context, server_side=False, server_hostname="gost.run"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    return client, server


async def test_tls_socket_stream_follows_trio_stream_contract() -> None:
    await trio.testing.check_two_way_stream(tls_pair, None)


async def test_handshake_failure_is_broken_resource() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = await listeners[0].accept()
    assert isinstance(server_tcp, trio.SocketStream)
    server = TLSSocketStream.wrap(server_tcp, CERT.server_context(), server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_tcp.send_all, b"GET / HTTP/1.1\r\n\r\n")  # not TLS
        with pytest.raises(trio.BrokenResourceError, match="TLS handshake failed"):
            await server.do_handshake()
    await server.aclose()
    await client_tcp.aclose()
    await listeners[0].aclose()


async def test_a_second_reader_waits_for_the_first_without_polling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A send that must read while the receiver waits parks until the socket is readable.

    Under the autojumping clock a polling sleep would return at once; a parked
    task returns only once the data has come.
    """
    client, server = await tls_pair()
    assert client.receive_nowait() is None  # takes the session tickets: nothing readable now
    returned: list[str] = []

    async def wait(name: str) -> None:
        await client._wait_readable()
        returned.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "second")  # wait_readable is taken: this one parks
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1.0)
        assert returned == []
        await server.send_all(b"wake up")
    assert sorted(returned) == ["first", "second"]
    await client.aclose()
    await server.aclose()


async def test_a_cancelled_receive_loses_nothing() -> None:
    """trio's contract: a receive_some that is cancelled consumed no data."""
    client, server = await tls_pair()
    await server.send_all(b"kept")
    await trio.testing.wait_all_tasks_blocked()
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.receive_some()
    assert scope.cancelled_caught
    with trio.fail_after(5):
        assert await client.receive_some() == b"kept"
    await client.aclose()
    await server.aclose()
