"""ForwardHandler, AutoHandler, and connector -> handler over real loopback TCP."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import anyio.abc
import pytest
import trio
import trio.testing

from pht.proxy import (
    Auth,
    AutoHandler,
    ForwardHandler,
    HTTPProxyHandler,
    RelayHandler,
    Socks5Handler,
    http_connect,
    relay_connect,
    socks5_connect,
)
from tests.test_proxy_support import (
    FakeDialer,
    Handler,
    receive_all,
    receive_exactly,
    refused,
    run_handler_on,
)

# --- ForwardHandler --------------------------------------------------------------


async def test_forward_relays_to_the_fixed_target(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pht.proxy")
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def run() -> None:
        await ForwardHandler("db.internal", 5432, dial=dialer)(server)
        done.set()

    nursery.start_soon(run)
    await client.send_all(b"startup")
    target = await dialer.target()
    assert await receive_exactly(target, 7) == b"startup"
    await target.send_all(b"ready!")
    assert await receive_exactly(client, 6) == b"ready!"
    await client.aclose()
    assert await receive_all(target) == b""
    await done.wait()
    assert dialer.calls == [("db.internal", 5432)]
    assert "forward ? -> db.internal:5432 closed: 7 B up, 6 B down" in caplog.text


async def test_forward_closes_when_the_target_is_unreachable() -> None:
    answer, _ = await run_handler_on(ForwardHandler("::1", 1, dial=FakeDialer(refused())), b"x")
    assert answer == b""


# --- AutoHandler -------------------------------------------------------------------


async def test_auto_dispatches_on_the_first_byte(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    auto = AutoHandler(dial=dialer)
    for greeting, reply in [
        (b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"\x05\x00\x05\x00"),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5a"),
        (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 "),
    ]:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(auto, server)
        # One byte at a time: the handler must cope with a short first read.
        for index in range(len(greeting)):
            await client.send_all(greeting[index : index + 1])
        assert await receive_exactly(client, len(reply)) == reply
    assert dialer.calls == [("127.0.0.1", 80)] * 3


async def test_auto_shares_auth() -> None:
    auto = AutoHandler(auth=Auth("u", "p"), dial=FakeDialer())
    answer, _ = await run_handler_on(auto, b"\x05\x01\x00")
    assert answer == b"\x05\xff"
    answer, _ = await run_handler_on(auto, b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 407 ")


async def test_auto_closes_an_empty_stream() -> None:
    answer, _ = await run_handler_on(AutoHandler(dial=FakeDialer()), b"")
    assert answer == b""


# --- real loopback -------------------------------------------------------------------

# SOCKS5 greeting (no auth) and CONNECT to 127.0.0.1, port to be appended.
SOCKS5_TO_LOCALHOST = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01"


async def echo(stream: trio.abc.Stream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _echo_through(stream: trio.abc.Stream) -> None:
    payload = os.urandom(300_000)

    async def sender() -> None:
        for offset in range(0, len(payload), 65_000):
            await stream.send_all(payload[offset : offset + 65_000])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        assert await receive_exactly(stream, len(payload)) == payload
    await stream.aclose()


@pytest.mark.parametrize(
    ("handler_factory", "connector"),
    [
        (lambda auth: Socks5Handler(auth=auth), partial(socks5_connect)),
        (lambda auth: AutoHandler(auth=auth), partial(socks5_connect)),
        (lambda auth: HTTPProxyHandler(auth=auth), partial(http_connect)),
        (lambda auth: AutoHandler(auth=auth), partial(http_connect)),
        (lambda auth: RelayHandler(auth=auth), partial(relay_connect)),
        (
            lambda auth: RelayHandler(auth=auth, lazy_reply=False),
            partial(relay_connect, lazy=False),
        ),
    ],
    ids=["socks5", "auto-socks5", "http", "auto-http", "relay-lazy", "relay-eager"],
)
async def test_connector_to_handler_over_loopback(
    nursery: trio.Nursery,
    handler_factory: Callable[[Auth], Handler],
    connector: Callable[..., Awaitable[trio.abc.Stream]],
) -> None:
    auth = Auth("alice", "s3cret")
    echo_port = await serve(nursery, echo)
    proxy_port = await serve(nursery, handler_factory(auth))
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    stream = await connector(tcp, "127.0.0.1", echo_port, auth=auth)
    await _echo_through(stream)


async def test_forward_over_loopback(nursery: trio.Nursery) -> None:
    echo_port = await serve(nursery, echo)
    proxy_port = await serve(nursery, ForwardHandler("127.0.0.1", echo_port))
    await _echo_through(await trio.open_tcp_stream("127.0.0.1", proxy_port))


async def test_socks5_reports_the_real_bound_address(nursery: trio.Nursery) -> None:
    echo_port = await serve(nursery, echo)
    proxy_port = await serve(nursery, Socks5Handler())
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    await tcp.send_all(
        b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
    )
    answer = await receive_exactly(tcp, 12)
    assert answer[:8] == b"\x05\x00\x05\x00\x00\x01\x7f\x00"
    assert answer[8:10] == b"\x00\x01"  # 127.0.0.1
    assert int.from_bytes(answer[10:12], "big") not in (0, echo_port)
    await tcp.aclose()


async def test_socks5_refused_over_loopback(nursery: trio.Nursery) -> None:
    # A real refused connection (trio's grouped error) maps to reply 0x05.
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy_port = await serve(nursery, Socks5Handler())
    tcp = await trio.open_tcp_stream("127.0.0.1", proxy_port)
    await tcp.send_all(
        b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + closed_port.to_bytes(2, "big")
    )
    assert await receive_all(tcp) == b"\x05\x00\x05\x05\x00\x01" + bytes(6)


# --- the same handlers and connectors on every anyio backend ----------------------------

_LOOPS = [
    ("trio", {}),
    ("asyncio", {"use_uvloop": False}),
    *([("asyncio", {"use_uvloop": True})] if importlib.util.find_spec("uvloop") else []),
]


@pytest.mark.parametrize(
    ("backend", "options"), _LOOPS, ids=[f"{b}-uvloop" if o else b for b, o in _LOOPS]
)
@pytest.mark.parametrize(
    ("handler", "connect"),
    [
        (Socks5Handler(auth=Auth("u", "p")), partial(socks5_connect, auth=Auth("u", "p"))),
        (HTTPProxyHandler(), http_connect),
        (RelayHandler(), relay_connect),
    ],
    ids=["socks5", "http", "relay"],
)
def test_handlers_and_connectors_on_anyio_streams(
    backend: str,
    options: dict[str, bool],
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    connect: Any,
) -> None:
    """Real TCP on each event loop: anyio streams in, anyio streams out."""
    payload = os.urandom(300_000)

    async def echo(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.send(await stream.receive())

    async def main() -> None:
        async with anyio.create_task_group() as group:
            target = await anyio.create_tcp_listener(local_host="127.0.0.1")
            proxy = await anyio.create_tcp_listener(local_host="127.0.0.1")
            group.start_soon(target.serve, echo)
            group.start_soon(proxy.serve, handler)
            target_port = target.extra(anyio.abc.SocketAttribute.local_port)
            tcp = await anyio.connect_tcp(
                "127.0.0.1", proxy.extra(anyio.abc.SocketAttribute.local_port)
            )
            with anyio.fail_after(30):
                stream = await connect(tcp, "127.0.0.1", target_port)
                assert isinstance(stream, anyio.abc.ByteStream)
                await stream.send(payload)
                received = bytearray()
                while len(received) < len(payload):
                    received += await stream.receive()
                assert received == payload
                await stream.aclose()
            group.cancel_scope.cancel()

    anyio.run(main, backend=backend, backend_options=options)
