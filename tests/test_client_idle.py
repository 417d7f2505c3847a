"""Idle tunnels survive the end of their idle HTTP connections (issue 9, item 1).

A server (``keepalive_timeout``), a proxy (nginx: 75 s) or a NAT ends a
keep-alive connection that stays idle. The client must notice and send its
next request on a new connection, and must never replay a push that may have
reached the server.
"""

from __future__ import annotations

import base64
import functools
import socket
import ssl
import struct
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
import trio.testing

import pht
from pht import _client
from pht._client import DEFAULT_KEEPALIVE_EXPIRY

from .support import echo, receive_exactly, start_server
from .test_cli_run import PhtProcess


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- the sans-IO rule ----------------------------------------------------------------------

_ACK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def _channel(fast: bool) -> pht.ClientChannel:
    saved = _client._FAST_PATH
    _client._FAST_PATH = fast
    try:
        return pht.ClientChannel(pht.ClientConfig.build("example.com", keepalive_expiry=50.0))
    finally:
        _client._FAST_PATH = saved


def _after_one_push(fast: bool) -> pht.ClientChannel:
    channel = _channel(fast)
    channel.push("token", b"data")
    channel.receive_data(_ACK)
    assert isinstance(channel.next_event(), pht.PushAcknowledged)
    assert channel.state is pht.ChannelState.IDLE
    return channel


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
def test_a_quiet_young_connection_is_reused(fast: bool) -> None:
    channel = _after_one_push(fast)
    assert channel.reusable(49.9)
    assert channel.state is pht.ChannelState.IDLE
    channel.push("token", b"more")  # still allowed


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
@pytest.mark.parametrize(
    "seen", [b"", b"HTTP/1.1 408 Request Timeout\r\n\r\n"], ids=["EOF", "bytes"]
)
def test_anything_received_while_idle_ends_the_connection(fast: bool, seen: bytes) -> None:
    channel = _after_one_push(fast)
    channel.receive_data(seen)
    assert not channel.reusable(0.0)
    assert channel.state is pht.ChannelState.CLOSED
    with pytest.raises(pht.LocalProtocolError):
        channel.push("token", b"more")  # the request goes on a new connection


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
def test_an_old_connection_is_not_reused(fast: bool) -> None:
    channel = _after_one_push(fast)
    assert not channel.reusable(50.0)
    assert channel.state is pht.ChannelState.CLOSED


def test_a_busy_connection_is_not_reusable() -> None:
    channel = _channel(True)
    channel.push("token", b"data")
    assert not channel.reusable(0.0)
    assert channel.state is pht.ChannelState.PUSHING  # unchanged: its answer is due


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (b"", "the server closed the connection without answering the push"),
        (
            b"HTTP/1.1 2",
            "the server closed the connection in the middle of its answer to the push",
        ),
    ],
)
def test_a_close_before_the_answer_is_not_called_malformed(
    fast: bool, received: bytes, expected: str
) -> None:
    channel = _channel(fast)
    channel.push("token", b"data")
    if received:
        channel.receive_data(received)
    channel.receive_data(b"")
    with pytest.raises(pht.RemoteProtocolError, match=expected):
        channel.next_event()


# --- the library against its own server, idle past keepalive_timeout ---------------------


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
@pytest.mark.parametrize("push_window", [1, 3])
async def test_idle_past_server_keepalive_then_echo(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    authorize: bool,
    tls: bool,
    push_window: int,
) -> None:
    port = await start_server(nursery, keepalive_timeout=5.0, tls=tls)
    stream = await pht.open_pht_stream(
        "127.0.0.1",
        port,
        authorize=authorize,
        tls=_unverified() if tls else False,
        push_window=push_window,
    )
    for round_ in range(3):
        message = f"round {round_}".encode()
        with trio.fail_after(60):  # a push lost on a dead connection: no echo, ever
            await stream.send_all(message)
            assert await receive_exactly(stream, len(message)) == message
        await trio.sleep(30)  # six times the server's keep-alive
    big = bytes(range(256)) * 12_000  # several pushes, then idle again
    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.send_all, big)
            assert await receive_exactly(stream, len(big)) == big
    await trio.sleep(600)
    with trio.fail_after(60):
        await stream.send_all(b"ten minutes later")
        assert await receive_exactly(stream, 17) == b"ten minutes later"
    await stream.aclose()


async def test_idle_beyond_keepalive_expiry_uses_a_new_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A NAT that forgets an idle connection says nothing: the client must not wait on it."""
    backend = await start_server(nursery, keepalive_timeout=3600.0)
    forgotten = trio.Event()
    pipes: list[tuple[trio.SocketStream, trio.SocketStream]] = []

    async def nat(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", backend)
        pipes.append((client, server))
        was_forgotten = forgotten.is_set()

        async def copy(source: trio.SocketStream, target: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    if forgotten.is_set() and not was_forgotten and source is client:
                        return  # a forgotten mapping: dropped, no FIN, no RST
                    await target.send_all(data)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as inner:
            inner.start_soon(copy, client, server)
            inner.start_soon(copy, server, client)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, nat, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await stream.send_all(b"before")
    assert await receive_exactly(stream, 6) == b"before"
    connections = len(pipes)
    await trio.sleep(DEFAULT_KEEPALIVE_EXPIRY + 1)
    forgotten.set()  # the push connection is now a black hole
    with trio.fail_after(5):
        await stream.send_all(b"after")
        assert await receive_exactly(stream, 5) == b"after"
    assert len(pipes) == connections + 1  # one new push connection
    await stream.aclose()


# --- a scripted server that closes idle connections with FIN or RST ---------------------


class ScriptedServer:
    """A minimal PHT server: echoes pushes on the pull, closes idle connections.

    ``idle_close`` seconds after its last answer a connection is closed, with
    a FIN or (``reset=True``) an RST. With ``legacy_pull`` each pull response
    ends after one line, so the client re-polls. ``drop_push`` makes the
    server read a push and close without answering: the client cannot tell
    whether it was delivered. ``repoll_status`` answers the pulls after the
    first with that status; ``cut_pull_after`` closes a pull's connection
    that many seconds into its response.
    """

    def __init__(
        self,
        *,
        idle_close: float,
        reset: bool,
        legacy_pull: bool = False,
        drop_push: int = -1,
        repoll_status: int | None = None,
        cut_pull_after: float | None = None,
    ) -> None:
        self.idle_close = idle_close
        self.reset = reset
        self.legacy_pull = legacy_pull
        self.drop_push = drop_push
        self.repoll_status = repoll_status
        self.cut_pull_after = cut_pull_after
        self.pulls = 0
        self.pushed: list[bytes] = []
        self.connections = 0
        self._echo_in, self._echo_out = trio.open_memory_channel[bytes](100)

    async def _close(self, stream: trio.SocketStream) -> None:
        if self.reset:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(self.idle_close) as idle:
                    request, body = await self._read_request(stream, conn)
                if idle.cancelled_caught or request is None:
                    return  # idle for too long, or the client closed
                await self._answer(stream, conn, request, body)
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError, trio.ClosedResourceError):
            pass
        finally:
            await self._close(stream)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> tuple[h11.Request | None, bytes]:
        request = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            else:
                return None, b""

    async def _answer(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, body: bytes
    ) -> None:
        path = urlsplit(request.target.decode())
        if path.path == "/authorize":
            body = b"token=scripted-token"
            answer = h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))])
            await stream.send_all(conn.send(answer) + conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            return
        token = parse_qs(path.query)["token"][0]
        assert token
        if request.method == b"POST":
            if len(self.pushed) == self.drop_push:
                self.pushed.append(body)
                raise trio.ClosedResourceError  # read, then gone without an answer
            self.pushed.append(body)
            await self._echo_in.send(base64.b64decode(body))
            answer = h11.Response(status_code=200, headers=[("Content-Length", "0")])
            await stream.send_all(conn.send(answer) + (conn.send(h11.EndOfMessage()) or b""))
            return
        self.pulls += 1
        if self.pulls > 1 and self.repoll_status is not None:
            answer = h11.Response(
                status_code=self.repoll_status, headers=[("Content-Length", "0")]
            )
            await stream.send_all(conn.send(answer) + (conn.send(h11.EndOfMessage()) or b""))
            return
        head = h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
        await stream.send_all(conn.send(head) or b"")
        if self.cut_pull_after is not None:
            await trio.sleep(self.cut_pull_after)
            raise trio.ClosedResourceError  # the connection closes mid-response
        while True:
            with trio.move_on_after(5):
                data = await self._echo_out.receive()
                line = base64.b64encode(data) + b"\n"
                await stream.send_all(conn.send(h11.Data(data=line)) or b"")
                if self.legacy_pull:
                    break
                continue
            # A heartbeat; a legacy server then ends the response.
            await stream.send_all(conn.send(h11.Data(data=b"\n")) or b"")
            if self.legacy_pull:
                break
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _scripted(nursery: trio.Nursery, server: ScriptedServer) -> int:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _line(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\n"


@pytest.mark.parametrize("reset", [False, True], ids=["FIN", "RST"])
async def test_push_after_the_server_closed_the_idle_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, reset: bool
) -> None:
    server = ScriptedServer(idle_close=3.0, reset=reset)
    port = await _scripted(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await stream.send_all(b"one")
    assert await receive_exactly(stream, 3) == b"one"
    await trio.sleep(10)  # the push connection is closed meanwhile
    with trio.fail_after(60):
        await stream.send_all(b"two")
        assert await receive_exactly(stream, 3) == b"two"
    assert server.pushed == [_line(b"one"), _line(b"two")]  # each exactly once
    await stream.aclose()


@pytest.mark.parametrize("reset", [False, True], ids=["FIN", "RST"])
async def test_re_poll_after_the_server_closed_the_idle_pull_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, reset: bool
) -> None:
    """A legacy server ends each pull after one line; the ended pull's connection then idles."""
    server = ScriptedServer(idle_close=3.0, reset=reset, legacy_pull=True)
    port = await _scripted(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
    for round_ in range(3):
        message = f"round {round_}".encode()
        await stream.send_all(message)
        # The app reads late: the pull has ended and its connection was closed.
        await trio.sleep(10)
        with trio.fail_after(60):
            assert await receive_exactly(stream, len(message)) == message
    assert server.pushed == [_line(f"round {i}".encode()) for i in range(3)]
    await stream.aclose()


async def test_a_push_the_server_may_have_taken_is_not_replayed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = ScriptedServer(idle_close=3.0, reset=False, drop_push=1)
    port = await _scripted(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await stream.send_all(b"one")
    assert await receive_exactly(stream, 3) == b"one"
    with pytest.raises(trio.BrokenResourceError) as caught:
        await stream.send_all(b"two")
    message = str(caught.value)
    assert "closed the connection without answering the push" in message
    assert "malformed" not in message
    assert server.pushed == [_line(b"one"), _line(b"two")]  # sent once, never again
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"three")
    assert len(server.pushed) == 2
    await stream.aclose()


# --- the CLI client ------------------------------------------------------------------------


async def test_cli_tunnel_idle_past_the_server_keepalive(nursery: trio.Nursery) -> None:
    """``pht -L tcp://... -F forward+pht://...``: an idle local connection still echoes.

    The CLI runs in its own process, so this waits in real time (a keep-alive
    of 0.5 s, idled for 2 s).
    """
    port = await start_server(nursery, echo, keepalive_timeout=0.5)
    node = f"forward+pht://127.0.0.1:{port}"
    with PhtProcess("-L", "tcp://127.0.0.1:0/127.0.0.1:1", "-F", node) as client:
        local = await trio.to_thread.run_sync(client.port)
        connection = await trio.open_tcp_stream("127.0.0.1", local)
        with trio.fail_after(30):
            await connection.send_all(b"before idling")
            assert await receive_exactly(connection, 13) == b"before idling"
        await trio.sleep(2.0)
        with trio.fail_after(30):
            await connection.send_all(b"after idling")
            assert await receive_exactly(connection, 12) == b"after idling"
        await connection.aclose()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
@pytest.mark.parametrize("cut_at", [0, 3, 6, 10], ids=["between", "size", "data", "footer"])
def test_a_pull_cut_mid_response_is_closed_not_malformed(fast: bool, cut_at: int) -> None:
    channel = _channel(fast)
    channel.pull("token")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    channel.receive_data(head + b"5\r\nAA==\n\r\n")  # one full line, one chunk
    assert isinstance(channel.next_event(), pht.PullStarted)
    assert isinstance(channel.next_event(), pht.DataReceived)
    channel.receive_data(b"9\r\nQkJCQg==\n\r\n"[:cut_at])
    channel.receive_data(b"")

    def drain() -> None:
        for _ in range(10):  # bounded: the EOF must surface within a few events
            channel.next_event()

    with pytest.raises(pht.RemoteProtocolError) as caught:
        drain()
    message = str(caught.value)
    assert "the server closed the connection in the middle of its answer to the pull" in message
