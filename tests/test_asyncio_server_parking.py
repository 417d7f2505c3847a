"""The asyncio server parks idle keep-alive connections: no task each, nothing lost.

A connection idle ``PARK_AFTER`` between requests stops being read by the
loop and loses its task; the server's hang-up set hands it back when it
turns readable. These tests run :func:`start_pht_server` on asyncio's loop
and on uvloop in a thread (:class:`~tests.test_asyncio_server.ServerThread`),
with blocking loopback sockets, and run the server's watchdog as if time had
passed instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Callable

import pytest

from pht._asyncio_server import _Connection

from .raw_http import TIMEOUT, RawPull
from .test_asyncio_server import ServerThread, loop_name, serve
from .test_asyncio_server_hangup import echo_handler, hold_then, on_server, read_to_end, task_count
from .test_hardening_support import push_request

__all__ = ["loop_name", "serve"]

TOKEN = "parking-test-token"


def expire(server: ServerThread, after: float) -> tuple[int, int]:
    """Run the watchdog as if ``after`` seconds had passed: (parked, open) connections."""

    async def run() -> tuple[int, int]:
        assert server.server is not None
        core = server.server._server
        core.watchdog.expire_due(core.loop.time() + after)
        await asyncio.sleep(0.05)  # the ended tasks' last steps
        return len(core.hang_ups._parked), len(core.connections)

    return on_server(server, run)


def line(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\n"


def answer(sock: socket.socket) -> bytes:
    """One answer without a body (a push's), read from ``sock``."""
    data = b""
    while not data.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, data
        data += chunk
    return data


@pytest.fixture
def tunnel(serve: Callable[..., ServerThread]) -> tuple[ServerThread, RawPull, socket.socket]:
    """An echo session: its pull, and a push connection that pushed once and now idles."""
    server = serve(echo_handler, shutdown_timeout=0.5)
    pull = RawPull(server.port, "/pull", TOKEN)
    push = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    push.sendall(push_request(TOKEN, line(b"first")))
    assert answer(push).startswith(b"HTTP/1.1 200 ")
    assert pull.read(5) == b"first"
    return server, pull, push


def test_a_parked_idle_connection_has_no_task_and_serves_its_next_requests(
    tunnel: tuple[ServerThread, RawPull, socket.socket],
) -> None:
    """Split across segments, or two at once: every byte goes on, in order."""
    server, pull, push = tunnel
    with pull, push:
        before = task_count(server)
        # Parked: the pull's connection (as it streams) and the idle push connection.
        assert expire(server, 3.0) == (2, 2)
        assert task_count(server) == before - 1
        request = push_request(TOKEN, line(b"second"))
        push.sendall(request[:10])  # unparked: a task again, which waits for the rest
        assert expire(server, 0.0) == (1, 2)
        push.sendall(request[10:])
        assert answer(push).startswith(b"HTTP/1.1 200 ")
        assert pull.read(6) == b"second"
        assert expire(server, 3.0) == (2, 2)  # idle again: parked again
        push.sendall(push_request(TOKEN, line(b"third")) + push_request(TOKEN, line(b"fourth")))
        assert answer(push).startswith(b"HTTP/1.1 200 ")
        assert answer(push).startswith(b"HTTP/1.1 200 ")
        assert pull.read(11) == b"thirdfourth"
        assert task_count(server) == before


def test_a_parked_idle_connection_is_closed_at_its_keepalive_deadline(
    tunnel: tuple[ServerThread, RawPull, socket.socket],
) -> None:
    server, pull, push = tunnel
    with pull, push:
        assert expire(server, 3.0) == (2, 2)
        assert expire(server, 121.0) == (1, 1)  # keepalive_timeout: 120 s
        assert read_to_end(push) == b""  # the server closed it
        # The session goes on: a new push connection reaches it.
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as again:
            again.sendall(push_request(TOKEN, line(b"later")))
            assert answer(again).startswith(b"HTTP/1.1 200 ")
        assert pull.read(5) == b"later"


def test_a_parked_idle_connection_whose_client_goes_is_forgotten(
    tunnel: tuple[ServerThread, RawPull, socket.socket],
) -> None:
    server, pull, push = tunnel
    with pull:
        assert expire(server, 3.0) == (2, 2)
        push.close()
        for _ in range(100):
            if expire(server, 0.0) == (1, 1):
                break
        assert expire(server, 0.0) == (1, 1)


def test_the_server_closes_parked_idle_connections_when_it_stops(
    tunnel: tuple[ServerThread, RawPull, socket.socket],
) -> None:
    server, pull, push = tunnel
    with pull, push:
        assert expire(server, 3.0) == (2, 2)
        server.stop()  # no task left behind (ServerThread checks)
        assert read_to_end(push) == b""


def test_connections_are_parked_at_once_after_their_session_ended(
    tunnel: tuple[ServerThread, RawPull, socket.socket],
) -> None:
    """The close notification's connection and the pull's: their clients are about to hang up.

    Parked without waiting ``PARK_AFTER``, so that thousands of sessions
    closed together do not wake thousands of tasks as their clients go.
    """
    server, pull, push = tunnel
    with pull, push:
        before = task_count(server)
        push.sendall(push_request(TOKEN, b""))  # the close notification
        assert answer(push).startswith(b"HTTP/1.1 200 ")
        assert pull.rest() == b""  # the pull's last chunk
        assert pull.ended
        # No watchdog run: both parked already, and neither has a task.
        assert expire(server, 0.0) == (2, 2)
        assert task_count(server) == before - 3  # the two connections' and the handler's
        # Parked, not closed: a request on it is answered.
        push.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer(push).startswith(b"HTTP/1.1 404 ")


def test_a_pipelining_client_takes_turns_with_other_connections(
    serve: Callable[..., ServerThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's pipelined requests get one answer per turn of the loop, not all in one step.

    500 requests arrive on one connection in the same poll as one request on
    another: the other's answer goes out before most of the 500 (it waited
    for all of them before; 64 flooding connections held other tunnels'
    echoes 0.6 s).
    """
    server = serve(echo_handler)
    nowhere = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as flood,
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as other,
    ):
        for sock in (flood, other):  # both connections served once: each has its task
            sock.sendall(nowhere)
            assert answer(sock).startswith(b"HTTP/1.1 404 ")
            assert sock.recv(65536)  # the 404's short body
        other_port = other.getsockname()[1]
        writers: list[int] = []  # the client port of each answer written, in order
        write = _Connection.write

        def recorded(self: _Connection, data: bytes | bytearray | memoryview) -> None:
            writers.append(self.transport.get_extra_info("peername")[1])
            write(self, data)

        monkeypatch.setattr(_Connection, "write", recorded)

        def both() -> None:
            flood.sendall(nowhere * 500)
            other.sendall(nowhere)

        hold_then(server, both)
        assert answer(other).startswith(b"HTTP/1.1 404 ")
        received = b""
        while received.count(b"HTTP/1.1 404 ") < 500:  # every one is answered, in order
            received += flood.recv(1 << 20)
    assert len(writers) == 501
    assert writers.index(other_port) < 10
