"""Small helpers shared by the sans-IO test modules."""

from __future__ import annotations

import contextlib
import logging
import math
import socketserver
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

import pht

Handler = Callable[[pht.PHTStream], Awaitable[object]]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split ``data`` into pieces of the given sizes, cycling through them.

    This is how the tests model TCP segmentation and HTTP chunking.
    """
    pieces, offset, i = [], 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        pieces.append(data[offset : offset + size])
        offset += size
        i += 1
    return pieces


async def echo(stream: pht.PHTStream) -> None:
    """A handler that echoes until EOF (or until the client vanishes)."""
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def start_server(nursery: trio.Nursery, handler: Handler = echo, **kwargs: Any) -> int:
    """Start ``serve_pht`` on 127.0.0.1, port 0, and return the bound port."""
    listeners = await nursery.start(
        lambda task_status: pht.serve_pht(
            handler, 0, host="127.0.0.1", task_status=task_status, **kwargs
        )
    )
    listener = getattr(listeners[0], "transport_listener", listeners[0])  # TLS or plain
    port: int = listener.socket.getsockname()[1]
    return port


async def receive_exactly(
    stream: trio.abc.ReceiveStream, size: int, *, within: float = math.inf
) -> bytes:
    """Read exactly ``size`` bytes; fail on an early EOF, or after ``within`` seconds."""
    data = bytearray()
    with trio.fail_after(within):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


async def echo_through(stream: trio.abc.Stream, payload: bytes, piece: int = 256 * 1024) -> bytes:
    """Send ``payload`` in ``piece``-sized writes while reading back as many bytes."""
    got = bytearray()

    async def read() -> None:
        while len(got) < len(payload):
            data = await stream.receive_some()
            assert data, f"EOF after {len(got)} of {len(payload)} bytes"
            got.extend(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for start in range(0, len(payload), piece):
            await stream.send_all(payload[start : start + piece])
    return bytes(got)


class _TCPEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(256 * 1024):
            self.request.sendall(data)


@contextlib.contextmanager
def tcp_echo_server() -> Iterator[int]:
    """A plain TCP echo server on 127.0.0.1 in a thread; yields its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TCPEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


T = TypeVar("T")


class TrioThread:
    """A trio loop in a thread of its own, with a nursery to start things in.

    For servers and relays that tests on an asyncio loop (or in plain
    threads) talk to: :meth:`run` calls ``function(nursery)`` in the trio
    thread and returns its result; :meth:`stop` cancels everything.
    """

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, function: Callable[[trio.Nursery], Awaitable[T]]) -> T:
        """``await function(nursery)`` in the trio thread; its result."""

        async def call() -> T:
            assert self._nursery is not None
            return await function(self._nursery)

        return trio.from_thread.run(call, trio_token=self._token)

    def run_sync(self, function: Callable[[], object]) -> None:
        """Call ``function()`` in the trio thread."""
        trio.from_thread.run_sync(function, trio_token=self._token)

    def stop(self) -> None:
        """Cancel what runs in the thread and wait for it to end."""
        assert self._nursery is not None
        self.run_sync(self._nursery.cancel_scope.cancel)
        self._thread.join(30)


class LogLine(logging.Handler):
    """Sets :attr:`seen` once a ``pht`` record holds ``text`` (logged on trio's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()
