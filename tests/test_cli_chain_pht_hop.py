"""A PHT hop anywhere in a chain: its HTTP connections go through the hops before it.

The command-line tests run on every event loop (``cli_backend_all``): on trio
the PHT hop is ``open_pht_stream(open_transport=...)``, on asyncio and uvloop
``open_pht_connection(open_transport=...)``.
"""

from __future__ import annotations

import anyio.abc
import pytest
import trio

from pht.cli._chain import ChainDialer
from pht.cli._run import build_config

from .test_cli_e2e import assert_body, fetch_via, origin
from .test_cli_run import PhtProcess, cli_backend_all, free_port

__all__ = ["cli_backend_all", "origin"]  # the fixtures, imported for these tests

pytestmark = [pytest.mark.slow]


@pytest.mark.parametrize(
    ("first", "second"),
    [("socks5", "socks5+pht"), ("relay", "socks5+pht"), ("http", "socks5+phts")],
)
def test_pht_hop_after_another_hop(
    cli_backend_all: str, origin: int, first: str, second: str
) -> None:
    # -F socks5://A -F socks5+pht://B: every HTTP connection of the tunnel is a
    # SOCKS5 CONNECT through A to B (a relay CONNECT, an HTTP CONNECT for phts).
    with PhtProcess("-L", f"{first}://127.0.0.1:0", "-L", f"{second}://127.0.0.1:0") as server:
        hop, tunnel = server.port("service-0"), server.port("service-1")
        with PhtProcess(
            "-L",
            "127.0.0.1:0",
            "-F",
            f"{first}://127.0.0.1:{hop}",
            "-F",
            f"{second}://127.0.0.1:{tunnel}",
        ) as client:
            assert_body(fetch_via(client.port(), "socks5", origin), server, client)
        server.wait_for(rf"service-0: .* -> 127\.0\.0\.1:{tunnel} opened")
        server.wait_for(rf"service-1: .* -> 127\.0\.0\.1:{origin} opened")


def test_pht_hop_in_the_middle_of_a_chain(cli_backend_all: str, origin: int) -> None:
    # socks5 -> pht tunnel (through the socks5 hop) -> http proxy (through the tunnel).
    with PhtProcess(
        "-L",
        "socks5://127.0.0.1:0",
        "-L",
        "socks5+pht://127.0.0.1:0",
        "-L",
        "http://127.0.0.1:0",
    ) as server:
        socks, tunnel, http = (server.port(f"service-{index}") for index in range(3))
        with PhtProcess(
            "-L",
            "127.0.0.1:0",
            "-F",
            f"socks5://127.0.0.1:{socks}",
            "-F",
            f"socks5+pht://127.0.0.1:{tunnel}",
            "-F",
            f"http://127.0.0.1:{http}",
        ) as client:
            assert_body(fetch_via(client.port(), "http", origin), server, client)
        server.wait_for(rf"service-0: .* -> 127\.0\.0\.1:{tunnel} opened")
        server.wait_for(rf"service-1: .* -> 127\.0\.0\.1:{http} opened")
        server.wait_for(rf"service-2: .* -> 127\.0\.0\.1:{origin} opened")


def test_unreachable_hop_before_a_pht_hop_is_named(cli_backend_all: str, origin: int) -> None:
    dead = free_port()
    with (
        PhtProcess("-L", "socks5+pht://127.0.0.1:0") as server,
        PhtProcess(
            "-L",
            "http://127.0.0.1:0",
            "-F",
            f"socks5://127.0.0.1:{dead}",
            "-F",
            f"socks5+pht://127.0.0.1:{server.port()}",
        ) as client,
    ):
        result = fetch_via(client.port(), "http", origin)
        assert result.returncode != 0
        assert b"502" in result.stderr
        line = client.wait_for(r"WARNING .*")
        assert f"socks5+pht://127.0.0.1:{server.port()}" in line.group(0)
        assert f"hop-0 (socks5+tcp://127.0.0.1:{dead})" in line.group(0)
        assert "Connection refused" in line.group(0)


async def test_first_hop_nodes_are_used_in_turn() -> None:
    # Two nodes on the first hop: each new connection starts at the next one.
    listeners = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(2)]
    ports = [listener.socket.getsockname()[1] for listener in listeners]
    config = build_config([":0"], [f"forward://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"])
    dialer = ChainDialer(config.chains[0])
    dialled = []
    for _ in range(4):
        stream = await dialer("127.0.0.1", 1)
        assert isinstance(stream, anyio.abc.SocketStream)
        dialled.append(stream.extra(anyio.abc.SocketAttribute.remote_port))
        await stream.aclose()
    for listener in listeners:
        await listener.aclose()
    assert dialled == [ports[0], ports[1], ports[0], ports[1]]
