"""The trio server's parked keep-alive connections: no task until their next request.

A connection idle :data:`PARK_AFTER` between requests is held by the
server's hang-up watcher alone (socket, HTTP state, timer): 10,000 idle
tunnels keep 10,000 push connections, and a task each (with its frames and
cancel scopes) would cost several KiB apiece. These check that a parked
connection has no task, still answers whatever it is sent next, in order,
and is closed at its keep-alive deadline and at shutdown without leaking
its descriptor or its count against its address.
"""

from __future__ import annotations

import gc
import os
import select
import ssl
from typing import Any

import pytest
import trio
import trio.testing

import pht
import pht._trio_server
from pht._server_core import PARK_AFTER
from pht._server_session import ServerOptions, ServerSessions
from pht._token import new_token
from pht._trio_server import _Deadline, _Server

from .support import echo, start_server
from .test_trio_hang_ups import all_tasks, connection_tasks

pytestmark = pytest.mark.skipif(not hasattr(select, "epoll"), reason="parks on Linux (epoll)")

NOWHERE = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
AUTHORIZE = b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"


def task_count() -> int:
    """Every task of this run (the root's descendants, the root included)."""
    return sum(1 for _ in all_tasks())


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def start_idle_server(nursery: trio.Nursery, **kwargs: Any) -> int:
    """:func:`start_server`, once its tasks (the accept loop's too) are all waiting."""
    port = await start_server(nursery, **kwargs)
    await trio.testing.wait_all_tasks_blocked()
    return port


async def receive_answers(stream: trio.abc.Stream, count: int) -> bytes:
    """Read until ``count`` answers (each ending in its body, as the server sends them) arrived."""
    data = b""
    with trio.fail_after(60):
        while data.count(b"HTTP/1.1 ") < count or not _bodies_complete(data):
            chunk = await stream.receive_some(65536)
            assert chunk, f"the server closed the connection after {data!r}"
            data += chunk
    return data


async def receive_eof(stream: trio.abc.Stream) -> None:
    """The server closed the connection (and sent nothing more)."""
    with trio.fail_after(60):
        assert await stream.receive_some(65536) == b""


def _bodies_complete(data: bytes) -> bool:
    """Whether every answer in ``data`` is complete (its Content-Length bytes arrived)."""
    rest = data
    while rest:
        head, found, rest = rest.partition(b"\r\n\r\n")
        if not found:
            return False
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) < length:
            return False
        rest = rest[length:]
    return True


async def idle_connections(port: int, count: int) -> list[trio.SocketStream]:
    """``count`` connections that each had one request answered, now idle."""
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(NOWHERE)
        assert (await receive_answers(stream, 1)).startswith(b"HTTP/1.1 404 ")
        streams.append(stream)
    return streams


async def test_a_parked_connection_has_no_task(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_idle_server(nursery, heartbeat_interval=3600.0)
    before = task_count()
    streams = await idle_connections(port, 10)
    assert task_count() == before + 10  # served: a task each
    await trio.sleep(PARK_AFTER + 2)
    assert task_count() == before  # parked: none
    for stream in streams:
        await stream.send_all(NOWHERE)
        assert (await receive_answers(stream, 1)).startswith(b"HTTP/1.1 404 ")
    assert task_count() == before + 10  # served again: a task each
    await trio.sleep(PARK_AFTER + 2)
    assert task_count() == before  # parked again
    for stream in streams:
        await stream.aclose()


async def test_a_connection_is_parked_at_once_after_its_session_ended(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A close notification's connection, and the session's pull's: no task, no PARK_AFTER wait.

    Thousands of sessions closed together would otherwise wake thousands of
    tasks together as their clients hang up.
    """
    port = await start_idle_server(nursery, heartbeat_interval=3600.0)  # echo handler
    before = task_count()
    token = new_token()
    pull = await trio.open_tcp_stream("127.0.0.1", port)
    await pull.send_all(b"GET /pull?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % token.encode())
    push = await trio.open_tcp_stream("127.0.0.1", port)
    close = b"POST /push?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    await push.send_all(close % token.encode())
    assert (await receive_answers(push, 1)).startswith(b"HTTP/1.1 200 ")
    with trio.fail_after(1):  # the pull's last chunk
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            got += await pull.receive_some(65536)
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() < PARK_AFTER
    assert task_count() == before  # both parked
    # Parked, not closed: the next request is answered.
    await push.send_all(NOWHERE)
    assert (await receive_answers(push, 1)).startswith(b"HTTP/1.1 404 ")
    for stream in (push, pull):
        await stream.aclose()


async def test_a_parked_connection_answers_a_request_split_across_segments(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The first segment wakes it; the rest is read by its new task: nothing lost."""
    port = await start_idle_server(nursery, heartbeat_interval=3600.0)
    (stream,) = await idle_connections(port, 1)
    await trio.sleep(PARK_AFTER + 2)
    request = b"GET /authorize HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 3000 + b"\r\n\r\n"
    for start in range(0, len(request), 700):
        await stream.send_all(request[start : start + 700])
        await trio.sleep(0.1)  # each segment arrives alone
    assert (await receive_answers(stream, 1)).startswith(b"HTTP/1.1 200 ")
    await stream.aclose()


async def test_a_parked_connection_answers_a_pipelined_pair_in_order(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_idle_server(nursery, heartbeat_interval=3600.0)
    (stream,) = await idle_connections(port, 1)
    await trio.sleep(PARK_AFTER + 2)
    await stream.send_all(NOWHERE + AUTHORIZE)
    answers = await receive_answers(stream, 2)
    assert answers.startswith(b"HTTP/1.1 404 ")
    assert answers.index(b"HTTP/1.1 200 ") > 0
    await stream.aclose()


async def test_a_tunnel_idle_past_the_park_delay_carries_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """pht's own client: its push connection is parked while the tunnel idles, then pushes."""
    port = await start_server(nursery, echo, heartbeat_interval=3600.0)
    stream = await pht.open_pht_stream("127.0.0.1", port)
    for round_trip in range(3):
        payload = b"round trip %d" % round_trip
        await stream.send_all(payload)
        got = b""
        with trio.fail_after(60):
            while len(got) < len(payload):
                got += await stream.receive_some()
        assert got == payload
        await trio.sleep(PARK_AFTER + 2)
    await stream.aclose()


async def test_a_parked_connection_is_closed_at_its_keepalive_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Closed without a task, and its count against its address is given back."""
    port = await start_idle_server(
        nursery, heartbeat_interval=3600.0, keepalive_timeout=10.0, max_connections_per_address=1
    )
    before = task_count()
    (stream,) = await idle_connections(port, 1)
    await trio.sleep(PARK_AFTER + 2)
    assert task_count() == before
    async with await trio.open_tcp_stream("127.0.0.1", port) as refused:
        await receive_eof(refused)  # the parked one still counts
    start = trio.current_time()
    await receive_eof(stream)
    assert 10.0 - PARK_AFTER - 2 <= trio.current_time() - start <= 10.0
    await stream.aclose()
    assert task_count() == before
    (again,) = await idle_connections(port, 1)  # the address may connect again
    await again.aclose()


async def test_parked_connections_are_closed_at_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """serve_pht returns, and neither a task nor a descriptor of a parked connection is left."""
    gc.collect()  # sockets other tests left to the collector
    descriptors = open_descriptors()
    before = task_count()
    shutdown = trio.Event()
    streams: list[trio.SocketStream] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await start_idle_server(nursery, heartbeat_interval=3600.0, shutdown=shutdown)
            streams = await idle_connections(port, 3)
            await trio.sleep(PARK_AFTER + 2)
            shutdown.set()
    for stream in streams:
        await receive_eof(stream)  # closed by the server
        await stream.aclose()
    assert task_count() == before
    assert open_descriptors() <= descriptors


class _ParkedAsTheRequestArrives(trio.abc.Stream):
    """A connection whose request arrives in the very turn the watchdog parks it.

    The read returns the bytes (no checkpoint after the wait, as a socket's
    read) while the connection's scope was just cancelled to park it: the
    request must still be answered.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.sent = b""
        self.watch: _Deadline | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        request, self.request = self.request, b""
        if request and self.watch is not None:
            self.watch.expire()  # idle PARK_AFTER: parked
            assert self.watch.parked
        return request

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_request_arriving_as_its_connection_is_parked_is_answered(
    nursery: trio.Nursery,
) -> None:
    options = ServerOptions()
    server = _Server(echo, nursery, options, ServerSessions(options, new_token), ssl_context=None)
    transport = _ParkedAsTheRequestArrives(NOWHERE)
    watch = _Deadline(
        options,
        trio.current_time(),
        transport,
        server.new_connection(),
        "127.0.0.1:1",
        "127.0.0.1",
        server.hang_ups,
    )
    transport.watch = watch
    server.watchdog.add(watch)
    with trio.fail_after(60):
        await server._run_connection(watch)
    assert transport.sent.startswith(b"HTTP/1.1 404 ")
    assert watch not in server.watchdog.watched  # served, then closed at the client's end


async def test_a_connection_to_park_as_the_server_stops_is_closed(
    nursery: trio.Nursery,
) -> None:
    """Its answer ended a session after the hang-up watcher stopped: closed, not parked."""
    options = ServerOptions()
    server = _Server(echo, nursery, options, ServerSessions(options, new_token), ssl_context=None)
    async with trio.open_nursery() as watcher:
        watcher.start_soon(server.hang_ups.run)
        await trio.testing.wait_all_tasks_blocked()
        watcher.cancel_scope.cancel()  # the server stops
    ours, theirs = trio.socket.socketpair()
    client = trio.SocketStream(theirs)
    close = b"POST /push?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    await client.send_all(close % new_token().encode())
    watch = _Deadline(
        options,
        trio.current_time(),
        trio.SocketStream(ours),
        server.new_connection(),
        "127.0.0.1:1",
        "127.0.0.1",
        server.hang_ups,
    )
    server.watchdog.add(watch)
    with trio.fail_after(60):
        await server._run_connection(watch)
        assert (await receive_answers(client, 1)).startswith(b"HTTP/1.1 200 ")
        await receive_eof(client)  # closed
    assert watch not in server.watchdog.watched
    await client.aclose()


async def test_a_tls_connection_keeps_its_task_while_idle(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """TLS state lives in its task's stream: it is not parked, and answers on."""
    port = await start_idle_server(nursery, tls=True, heartbeat_interval=3600.0)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(
        await trio.open_tcp_stream("127.0.0.1", port), context, server_hostname="gost.run"
    )
    for _ in range(2):
        await stream.send_all(NOWHERE)
        assert (await receive_answers(stream, 1)).startswith(b"HTTP/1.1 404 ")
        await trio.sleep(PARK_AFTER + 2)
        assert connection_tasks() == 1
    await trio.aclose_forcefully(stream)


async def test_without_epoll_an_idle_connection_keeps_its_task(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the hang-up watcher cannot run (no epoll), idle connections are served as before."""
    monkeypatch.setattr(pht._trio_server, "_EPOLL", False)
    port = await start_idle_server(nursery, heartbeat_interval=3600.0)
    (stream,) = await idle_connections(port, 1)
    await trio.sleep(PARK_AFTER + 2)
    assert connection_tasks() == 1
    await stream.send_all(NOWHERE)
    assert (await receive_answers(stream, 1)).startswith(b"HTTP/1.1 404 ")
    await stream.aclose()
