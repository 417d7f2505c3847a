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

from .asyncio_support import LOOPS, run
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
