"""open_pht_connection(open_transport=...): every HTTP connection through the caller's pair.

Over real loopback sockets: the pairs come from a small asyncio TCP relay in
front of the trio servers of ``test_asyncio_client`` (plain and TLS).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import pht
import pht.asyncio

from .asyncio_support import LOOPS, pipe, run
from .test_asyncio_client import TrioServers, _connect_kwargs, servers

__all__ = ["servers"]  # the fixture, imported for these tests

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=LOOPS)
def aio(request: pytest.FixtureRequest) -> Runner:
    name: str = request.param
    return lambda coro: run(name, coro)


class Relay:
    """A TCP relay to ``target`` on loopback; counts its connections and their ends."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.opened = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        """Wait until every relayed connection ended (the client closed all of them)."""
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("secure", [False, True], ids=["pht", "phts"])
def test_every_connection_goes_through_open_transport(
    aio: Runner, servers: TrioServers, secure: bool
) -> None:
    async def main() -> None:
        kwargs = _connect_kwargs(servers, secure)
        relay = Relay(kwargs["port"])
        relay_port = await relay.start()
        asked: list[tuple[str, int]] = []

        async def opener(
            host: str, port: int
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            asked.append((host, port))
            return await asyncio.open_connection("127.0.0.1", relay_port)

        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", open_transport=opener, push_window=4, **kwargs
        )
        assert (writer.get_extra_info("ssl_object") is not None) is secure
        data = os.urandom(1024 * 1024)
        writer.write(data)
        echoed = await reader.readexactly(len(data))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        writer.close()
        await writer.wait_closed()
        await relay.stop()
        # authorize (and pull), push: each one of the opener's, none of the client's own.
        assert len(asked) >= 2
        assert set(asked) == {("127.0.0.1", kwargs["port"])}
        assert relay.opened == len(asked)

    aio(main())


def test_open_transport_failures_are_named(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        async def refused(host: str, port: int) -> tuple[Any, Any]:
            raise ConnectionRefusedError(111, "the hop before refused")

        with pytest.raises(pht.TunnelError, match=r"cannot connect.*the hop before refused"):
            await pht.asyncio.open_pht_connection(
                "127.0.0.1", servers.ports["plain"], open_transport=refused
            )

        async def hangs(host: str, port: int) -> tuple[Any, Any]:
            await asyncio.Event().wait()
            raise AssertionError("not reached")

        with pytest.raises(pht.TunnelError, match="timed out connecting"):
            await pht.asyncio.open_pht_connection(
                "127.0.0.1", servers.ports["plain"], open_transport=hangs, connect_timeout=0.05
            )

        async def plain(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", servers.ports["plain"])

        # TLS over a pair that reaches a plain-HTTP server: the handshake fails, named.
        with pytest.raises(pht.TunnelError, match="TLS handshake"):
            await pht.asyncio.open_pht_connection(
                "127.0.0.1",
                servers.ports["plain"],
                ssl=servers.client_context(),
                open_transport=plain,
                connect_timeout=5,
            )

    aio(main())


def test_a_tunnel_through_another_tunnel(aio: Runner, servers: TrioServers) -> None:
    # open_transport may return any reader/writer pair: here a PHT tunnel's own.
    # The outer tunnel is the "record" server's, so the inner one's first request
    # (its authorize) arrives there as the outer tunnel's bytes.
    async def main() -> None:
        outer: list[asyncio.StreamWriter] = []

        async def through_a_tunnel(
            host: str, port: int
        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1", servers.ports["record"]
            )
            outer.append(writer)
            return reader, writer

        opening = asyncio.ensure_future(
            pht.asyncio.open_pht_connection(
                "inner.example", 80, open_transport=through_a_tunnel, connect_timeout=0.5
            )
        )
        with pytest.raises(pht.TunnelError):  # the record server never answers
            await opening
        assert outer
        token = outer[0].get_extra_info("pht_token")
        assert await asyncio.to_thread(servers.ended(token).wait, 10)
        assert servers.received[token].startswith(b"GET /authorize")
        assert b"\r\nHost: inner.example\r\n" in servers.received[token]

    aio(main())
