"""pht.asyncio.open_pht_connection against the trio server, over real loopback sockets.

The trio servers (``serve_pht``, and a scripted legacy GOST server) run in
one background thread under ``trio.run`` for the whole module: a thread
starts in milliseconds, shares the test's process (a server failure shows
in the test's output) and needs no port hand-over through files. The
asyncio side runs on a fresh loop per test, the default one and uvloop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import h11
import pytest
import trio

import pht
import pht.asyncio

from .asyncio_support import LOOPS, pipe, run
from .support import start_server

Runner = Callable[[Coroutine[Any, Any, None]], None]

BULK = 16 * 1024 * 1024
LEGACY_TOKEN = b"legacytoken000000000"


async def _echo_or_close(stream: pht.PHTStream) -> None:
    """Echo; ``!close`` makes the server end the session."""
    try:
        while data := await stream.receive_some():
            if data == b"!close":
                await stream.aclose()
                return
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _never_reads(stream: pht.PHTStream) -> None:
    await trio.sleep_forever()


async def _legacy_server(stream: trio.SocketStream, pushed: list[bytes], got: trio.Event) -> None:
    """Legacy GOST's pull: each poll ends; the first after a heartbeat, the
    second after a line (once a push came); later ones are refused (403:
    the session is gone)."""
    conn = h11.Connection(h11.SERVER)
    polls = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data:
                return
            conn.receive_data(data)
            continue
        if not isinstance(event, h11.Request):
            continue
        target, body = event.target, b""
        while not isinstance(part := conn.next_event(), h11.EndOfMessage):
            if part is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(part, h11.Data):
                body += part.data
        if target == b"/authorize":
            answer = b"token=" + LEGACY_TOKEN
            out = conn.send(
                h11.Response(status_code=200, headers=[("Content-Length", str(len(answer)))])
            ) + conn.send(h11.Data(data=answer))
        elif target.startswith(b"/pull"):
            polls += 1
            if polls == 2:
                await got.wait()
            if polls > 2:
                out = conn.send(h11.Response(status_code=403, headers=[("Content-Length", "0")]))
            else:
                out = conn.send(
                    h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
                )
                line = b"\n" if polls == 1 else pht.encode_line(b"after re-poll") + b"\n"
                out += conn.send(h11.Data(data=line))
        else:
            pushed.append(body)
            got.set()
            out = conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        conn.start_next_cycle()


class TrioServers:
    """The trio servers the tests talk to, in a thread of their own."""

    def __init__(self) -> None:
        self.certificate = pht.make_self_signed_certificate()
        self.ports: dict[str, int] = {}
        self.legacy_pushed: list[bytes] = []
        self.legacy_got = trio.Event()
        self.received: dict[str, bytes] = {}
        self._ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the trio servers did not start"

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self.ports["plain"] = await start_server(
                nursery, _echo_or_close, max_pending_per_address=None
            )
            self.ports["tls"] = await start_server(nursery, _echo_or_close, tls=self.certificate)
            self.ports["strict"] = await start_server(nursery, _echo_or_close, strict=True)
            self.ports["record"] = await start_server(nursery, self._record)
            self.ports["paths"] = await start_server(
                nursery,
                _echo_or_close,
                authorize_path="/a/auth",
                push_path="/a/in",
                pull_path="/a/out",
            )
            self.ports["slow"] = await start_server(nursery, _never_reads, push_timeout=0.2)
            listeners = await nursery.start(
                trio.serve_tcp,
                lambda s: _legacy_server(s, self.legacy_pushed, self.legacy_got),
                0,
            )
            self.ports["legacy"] = listeners[0].socket.getsockname()[1]
            self._ready.set()

    async def _record(self, stream: pht.PHTStream) -> None:
        """Keep what a tunnel brought; tell the test (thread-safe) once it ended."""
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
        self.received[stream.token] = bytes(data)
        self.ended(stream.token).set()

    def ended(self, token: str) -> threading.Event:
        with self._lock:
            return self._ended.setdefault(token, threading.Event())

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.certificate.configure_trust(context)
        return context

    def reset_legacy(self) -> None:
        """A new session on the legacy server: its second poll waits for a new push."""

        def reset() -> None:
            self.legacy_got = trio.Event()
            self.legacy_pushed.clear()

        trio.from_thread.run_sync(reset, trio_token=self._token)

    def stop(self) -> None:
        assert self._cancel is not None
        trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def servers() -> Iterator[TrioServers]:
    running = TrioServers()
    yield running
    running.stop()


@pytest.fixture(params=LOOPS)
def aio(request: pytest.FixtureRequest) -> Runner:
    name: str = request.param
    return lambda coro: run(name, coro)


def _connect_kwargs(servers: TrioServers, secure: bool) -> dict[str, Any]:
    if secure:
        return {"port": servers.ports["tls"], "ssl": servers.client_context()}
    return {"port": servers.ports["plain"]}


@pytest.mark.parametrize("secure", [False, True], ids=["pht", "phts"])
@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
def test_echo_small(aio: Runner, servers: TrioServers, secure: bool, authorize: bool) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", authorize=authorize, **_connect_kwargs(servers, secure)
        )
        assert isinstance(reader, asyncio.StreamReader)
        assert isinstance(writer, asyncio.StreamWriter)
        token = writer.get_extra_info("pht_token")
        assert isinstance(token, str)
        assert token
        assert writer.get_extra_info("peername")[0] == "127.0.0.1"
        assert (writer.get_extra_info("ssl_object") is not None) is secure
        writer.write(b"hello\n")
        await writer.drain()
        assert writer.transport.get_write_buffer_size() == 0  # drain waited for the ack
        assert await reader.readline() == b"hello\n"
        writer.write(b"x" * 10)
        await writer.drain()
        assert await reader.readexactly(10) == b"x" * 10
        writer.close()
        await writer.wait_closed()

    aio(main())


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["pht", "phts"])
@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
def test_16_mib_each_way(aio: Runner, servers: TrioServers, secure: bool, authorize: bool) -> None:
    payload = os.urandom(BULK)

    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1",
            authorize=authorize,
            max_push_size=256 * 1024,
            **_connect_kwargs(servers, secure),
        )

        async def upload() -> None:
            view = memoryview(payload)
            for start in range(0, BULK, 1024 * 1024):
                writer.write(view[start : start + 1024 * 1024])
                await writer.drain()

        sending = asyncio.ensure_future(upload())
        echoed = await reader.readexactly(BULK)
        await sending
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_fifty_tunnels_at_once(aio: Runner, servers: TrioServers) -> None:
    async def one(index: int) -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", servers.ports["plain"], authorize=index % 2 == 0
        )
        message = f"tunnel {index}\n".encode() * 50
        writer.write(message)
        await writer.drain()
        assert await reader.readexactly(len(message)) == message
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        await asyncio.gather(*(one(index) for index in range(50)))

    aio(main())


def test_legacy_server_repolls_then_ends(aio: Runner, servers: TrioServers) -> None:
    servers.reset_legacy()

    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", servers.ports["legacy"], authorize=True
        )
        assert writer.get_extra_info("pht_token") == LEGACY_TOKEN.decode()
        writer.write(b"up")  # the second poll is answered once this arrived
        await writer.drain()
        assert await reader.readexactly(13) == b"after re-poll"
        assert await reader.read() == b""  # a 403 to a re-poll: the legacy end of a session
        writer.close()
        await writer.wait_closed()

    aio(main())
    assert servers.legacy_pushed == [b"dXA=\n"]


def test_server_refusing_the_token_raises_with_the_status(
    aio: Runner, servers: TrioServers
) -> None:
    async def main() -> None:
        with pytest.raises(pht.TunnelError) as info:
            await pht.asyncio.open_pht_connection(
                "127.0.0.1", servers.ports["strict"], authorize=False
            )
        assert info.value.status == 403
        assert "token is unknown" in str(info.value)

    aio(main())


def test_unacknowledged_push_breaks_drain_with_410(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", servers.ports["slow"], authorize=False
        )
        writer.write(b"nobody reads this")
        with pytest.raises(pht.asyncio.TunnelResetError) as info:
            await writer.drain()
        assert info.value.status == 410
        assert isinstance(info.value, ConnectionResetError)
        with pytest.raises(pht.TunnelError):
            await reader.read()
        writer.close()
        with pytest.raises(pht.TunnelError):
            await writer.wait_closed()

    aio(main())


def test_server_closes_the_tunnel(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection("127.0.0.1", servers.ports["plain"])
        writer.write(b"!close")
        await writer.drain()
        assert await reader.read() == b""
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_client_close_is_seen_by_the_server(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        _reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", servers.ports["record"], authorize=False
        )
        token = writer.get_extra_info("pht_token")
        writer.write(b"last words")
        writer.close()  # what is queued still goes out, then the close notification
        await writer.wait_closed()
        assert writer.is_closing()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, servers.ended(token).wait, 30)
        assert servers.received[token] == b"last words"

    aio(main())


def test_connect_errors(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        with pytest.raises(pht.TunnelError, match=r"cannot connect to 127\.0\.0\.1:1"):
            await pht.asyncio.open_pht_connection("127.0.0.1", 1)
        with pytest.raises(pht.TunnelError, match="TLS handshake"):
            await pht.asyncio.open_pht_connection(  # the default context does not trust it
                "127.0.0.1", servers.ports["tls"], ssl=True, connect_timeout=10
            )
        with pytest.raises(pht.TunnelError, match="404"):
            await pht.asyncio.open_pht_connection(
                "127.0.0.1", servers.ports["plain"], pull_path="/elsewhere"
            )
        with pytest.raises(TypeError, match="ssl must be"):
            await pht.asyncio.open_pht_connection("127.0.0.1", 1, ssl="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="push_window"):
            await pht.asyncio.open_pht_connection("127.0.0.1", 1, push_window=0)

    aio(main())


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
def test_custom_paths_headers_and_window(
    aio: Runner, servers: TrioServers, authorize: bool
) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1",
            servers.ports["paths"],
            authorize=authorize,
            authorize_path="/a/auth",
            push_path="/a/in",
            pull_path="/a/out",
            headers={"X-Tunnel": "yes"},
            host_header="tunnel.example",
            push_window=3,
            max_push_size=1000,
        )
        # drain() may return with push_window - 1 pushes' worth unanswered.
        assert writer.transport.get_write_buffer_limits()[1] == 2000
        payload = bytes(range(256)) * 40
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(len(payload)) == payload
        writer.close()
        await writer.wait_closed()

    aio(main())


async def _one_pull_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stand-in server: accepts the pull, sends a line, then cuts the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET /pull"):
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(pht.encode_line(b"hi"))
            + pht.encode_line(b"hi")
            + b"\r\n"
        )
        await writer.drain()
    writer.transport.abort()


def test_a_cut_pull_is_an_error_not_an_eof(aio: Runner) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_one_pull_then_cut, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1", port, authorize=False
            )
            assert await reader.readexactly(2) == b"hi"
            with pytest.raises(pht.asyncio.TunnelResetError, match="pull from the PHT server"):
                await reader.read()
            writer.close()
            with pytest.raises(pht.asyncio.TunnelResetError):
                await writer.wait_closed()

    aio(main())


def test_cancelled_open_leaves_nothing_behind(aio: Runner) -> None:
    async def main() -> None:
        accepted = asyncio.Event()
        gone = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            await reader.read()  # until the client closes the connection
            gone.set()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            opening = asyncio.ensure_future(pht.asyncio.open_pht_connection("127.0.0.1", port))
            await accepted.wait()
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await gone.wait()  # the client closed its connection

    aio(main())


def test_cancelled_reads_and_drains_leave_the_tunnel_usable(
    aio: Runner, servers: TrioServers
) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection("127.0.0.1", servers.ports["plain"])
        reading = asyncio.ensure_future(reader.read(100))
        await asyncio.sleep(0)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        writer.write(b"one")
        draining = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0)
        draining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await draining
        writer.write(b"two")
        await writer.drain()
        assert await reader.readexactly(6) == b"onetwo"
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_abort_ends_everything_at_once(aio: Runner, servers: TrioServers) -> None:
    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection("127.0.0.1", servers.ports["plain"])
        writer.write(b"never mind")
        writer.transport.abort()
        await writer.wait_closed()
        assert writer.is_closing()
        assert await reader.read() == b""

    aio(main())


def test_through_a_forward_http_proxy(aio: Runner, servers: TrioServers) -> None:
    """Every request goes to the proxy, in absolute form, with the proxy's credentials."""

    async def main() -> None:
        target = servers.ports["plain"]
        heads: list[bytes] = []

        relays: list[asyncio.Task[object]] = []

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            relays.append(asyncio.current_task())  # type: ignore[arg-type]
            head = await reader.readuntil(b"\r\n\r\n")
            heads.append(head)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            up_writer.write(head)
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        proxy_port = proxy.sockets[0].getsockname()[1]
        async with proxy:
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1",
                target,
                authorize=False,
                proxy=f"http://me:secret@127.0.0.1:{proxy_port}",
            )
            writer.write(b"via the proxy")
            await writer.drain()
            assert await reader.readexactly(13) == b"via the proxy"
            writer.close()
            await writer.wait_closed()
            proxy.close()
            # Each relay ends once the client closed its connection and the server followed.
            await asyncio.wait([task for task in relays if task is not asyncio.current_task()])
        assert heads
        assert heads[0].startswith(f"GET http://127.0.0.1:{target}/pull?token=".encode())
        assert all(b"\r\nProxy-Authorization: Basic bWU6c2VjcmV0\r\n" in head for head in heads)

    aio(main())


def test_authorize_answer_that_closes_its_connection(aio: Runner) -> None:
    """A server may close the connection after the token: the pull goes on a new one."""

    async def main() -> None:
        connections: list[bytes] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the push connection: closed unused
                return
            connections.append(head.split(b" ", 2)[1])
            if head.startswith(b"GET /authorize"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoken=t1"
                )
            elif head.startswith(b"GET /pull"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naGk=\n\r\n"
                )
                await reader.read()  # until the client closes
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await pht.asyncio.open_pht_connection("127.0.0.1", port)
            assert writer.get_extra_info("pht_token") == "t1"
            assert await reader.readexactly(2) == b"hi"
            writer.transport.abort()
            await writer.wait_closed()
        assert connections[:2] == [b"/authorize", b"/pull?token=t1"]

    aio(main())


def test_a_refused_push_in_flight_wakes_a_waiting_read(aio: Runner, servers: TrioServers) -> None:
    """push_window=4: drain() returns before the 404; the read waiting for a reply gets it."""

    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1",
            servers.ports["paths"],
            authorize_path="/a/auth",
            push_path="/push",  # the server's is /a/in
            pull_path="/a/out",
            push_window=4,
        )
        waiting = asyncio.ensure_future(reader.read(100))
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()  # within the window: returns before the answer
        with pytest.raises(pht.asyncio.TunnelResetError, match="paths match") as caught:
            await asyncio.wait_for(waiting, 10)
        assert caught.value.status == 404
        writer.close()
        with pytest.raises(pht.asyncio.TunnelResetError):
            await writer.wait_closed()

    aio(main())
