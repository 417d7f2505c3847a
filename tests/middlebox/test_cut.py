"""A pull connection cut by the network in the middle of a transfer.

A small TCP relay of our own sits between client and server; killing its
connections is what a NAT box or a load balancer dropping state does. Both
ends must notice instead of hanging. The bounds are hang checks only.
"""

from __future__ import annotations

import functools
import socket
import struct

import pytest
import trio

import pht

from ..support import receive_exactly
from .tunnel_checks import HANG_BOUND, pattern

pytestmark = pytest.mark.middlebox


class Relay:
    """Accepts on a loopback port and relays each connection to ``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections: list[tuple[trio.SocketStream, trio.SocketStream, bytes]] = []
        self.pull_seen = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        first = await client.receive_some(65536)
        entry = (client, server, first)
        self.connections.append(entry)
        if first.startswith(b"GET /pull"):
            self.pull_seen.set()
        try:
            await server.send_all(first)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._copy, client, server)
                nursery.start_soon(self._copy, server, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    @staticmethod
    async def _copy(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def cut(self, *, pulls_only: bool, reset: bool) -> None:
        """Close both sides of the relayed connections: with ``reset``, abortively
        (RST, as a box that dropped its state answers), else with a FIN."""
        for client, server, first in self.connections:
            if pulls_only and not first.startswith(b"GET /pull"):
                continue
            for stream in (client, server):
                if reset:
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                await trio.aclose_forcefully(stream)


class Source:
    """A handler that streams data to the client until the session breaks."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended_with: str | None = None
        self.ended = trio.Event()

    async def __call__(self, stream: pht.PHTStream) -> None:
        chunk = pattern(64 * 1024)
        try:
            while True:
                await stream.send_all(chunk)
                self.sent += len(chunk)
        except trio.BrokenResourceError as exc:
            self.ended_with = f"BrokenResourceError: {exc}"
        finally:
            self.ended.set()


async def _setup(
    nursery: trio.Nursery, handler: Source, *, idle_timeout: float = 600.0
) -> tuple[Relay, pht.PHTStream]:
    serve = functools.partial(
        pht.serve_pht,
        handler,
        0,
        host="127.0.0.1",
        idle_timeout=idle_timeout,
        heartbeat_interval=min(10.0, idle_timeout / 2),
    )
    listeners = await nursery.start(serve)
    relay = Relay(listeners[0].socket.getsockname()[1])
    port = await nursery.start(relay.serve)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    # Be in the middle of a transfer: some data has arrived, more is on its way.
    received = 0
    with trio.fail_after(HANG_BOUND):
        while received < 2 * 1024 * 1024:
            data = await stream.receive_some()
            assert data
            received += len(data)
    return relay, stream


async def _read_until_the_end(stream: pht.PHTStream) -> None:
    """Read until EOF; a cut pull mid-transfer must raise instead (the data is incomplete)."""
    while await stream.receive_some():
        pass


CUT_STYLES = pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])


@CUT_STYLES
async def test_cut_pull_is_noticed_by_both_ends(nursery: trio.Nursery, reset: bool) -> None:
    """Only the pull connection is cut: the client's read fails, it closes the session
    over its push connection, and the server's handler sees the session end."""
    source = Source()
    relay, stream = await _setup(nursery, source)
    await relay.cut(pulls_only=True, reset=reset)
    with trio.fail_after(HANG_BOUND):
        with pytest.raises(trio.BrokenResourceError):
            await _read_until_the_end(stream)
        await stream.aclose()  # the close notification travels over the push connection
        await source.ended.wait()
    assert source.ended_with is not None
    assert "closed the session" in source.ended_with


@CUT_STYLES
async def test_whole_network_cut_ends_the_session_and_the_server_carries_on(
    nursery: trio.Nursery, reset: bool
) -> None:
    """Every connection is cut, so no close notification can arrive: the server
    notices the lost pull connection and ends the session (long before the
    default 600 s idle expiry), releasing the stuck handler; other tunnels work."""
    source = Source()
    relay, stream = await _setup(nursery, source)
    await relay.cut(pulls_only=False, reset=reset)
    with trio.fail_after(HANG_BOUND):
        with pytest.raises(trio.BrokenResourceError):
            await _read_until_the_end(stream)
        await source.ended.wait()
    assert source.ended_with is not None
    with trio.fail_after(HANG_BOUND):
        await stream.aclose()  # best effort: the server has forgotten the session
    # The server is still serving: a new tunnel straight to it gets the stream.
    fresh = await pht.open_pht_stream("127.0.0.1", relay.target, authorize=False)
    async with fresh:
        with trio.fail_after(HANG_BOUND):
            assert await receive_exactly(fresh, 100_000) == pattern(64 * 1024) + pattern(
                100_000 - 64 * 1024
            )
