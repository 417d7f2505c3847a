"""Which event loop the command line runs on, and PHT tunnels as anyio byte streams on it.

The handlers and the chain run on anyio, so the same code runs on trio and on
asyncio (with uvloop when installed). Only the PHT tunnels differ: on trio
they are :func:`pht.open_pht_stream` / :func:`pht.serve_pht`, on asyncio
:func:`pht.asyncio.open_pht_connection` / :func:`pht.asyncio.start_pht_server`.
This module wraps both as anyio byte streams, so nothing else needs to know.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import trio

import pht
import pht.asyncio
from pht._stats import PHTStatsSink
from pht.proxy._stream import TrioByteStream, as_trio

from ._spec import ConfigError

__all__ = [
    "BACKEND_CHOICES",
    "AsyncioPHTStream",
    "Backend",
    "choose_backend",
    "open_pht",
    "serve_pht",
]

#: What ``--backend`` takes. ``auto`` is the fastest available (see docs/cli.md).
BACKEND_CHOICES = ("auto", "trio", "asyncio", "uvloop")

#: What ``auto`` runs on: the first available, fastest first as measured
#: end to end (``benchmarks/e2e.py --loops all``; docs/performance.md):
#: uvloop moves about twice trio's MB/s for half its CPU per GiB and has the
#: shortest round trip; asyncio's default loop still beats trio on MB/s.
AUTO_PREFERENCE = ("uvloop", "asyncio", "trio")

#: ``open_pht``'s ``open_transport``: a stream to ``(host, port)``.
Opener = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]
Handler = Callable[[anyio.abc.ByteStream], Coroutine[Any, Any, None]]


def uvloop_available() -> bool:
    """Whether uvloop can be imported here (it is not made for Windows)."""
    return importlib.util.find_spec("uvloop") is not None


@dataclass(frozen=True)
class Backend:
    """An event loop to run on: ``trio``, ``asyncio`` (the default loop) or ``uvloop``."""

    name: str
    #: Why it was chosen, for the start log line when ``auto`` picked it.
    reason: str = field(default="", compare=False)

    @property
    def is_trio(self) -> bool:
        return self.name == "trio"

    def run(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``anyio.run`` on this event loop."""
        if self.is_trio:
            return anyio.run(function, *args, backend="trio")
        options = {"use_uvloop": self.name == "uvloop"}
        return anyio.run(function, *args, backend="asyncio", backend_options=options)

    def describe(self) -> str:
        """``trio 0.27.0``, ``asyncio``, ``uvloop 0.21.0``: for ``--version`` and the log."""
        if self.is_trio:
            return f"trio {trio.__version__}"
        if self.name == "uvloop":
            from importlib.metadata import version

            return f"asyncio+uvloop {version('uvloop')}"
        return "asyncio"


def choose_backend(requested: str) -> Backend:
    """The :class:`Backend` for ``--backend requested``, or :class:`ConfigError`.

    Every configuration runs on every loop (a PHT hop behind other hops
    included: both clients take ``open_transport``).
    """
    if requested not in BACKEND_CHOICES:
        raise ConfigError(
            f"unknown --backend {requested!r}: choose one of {', '.join(BACKEND_CHOICES)}"
        )
    if requested == "uvloop" and not uvloop_available():
        raise ConfigError(
            "--backend uvloop: uvloop is not installed (pip install 'pht-tunnel[uvloop]'), "
            "or choose --backend asyncio or trio"
        )
    if requested == "auto":
        for name in AUTO_PREFERENCE:
            if name != "uvloop" or uvloop_available():
                return Backend(name, reason="the fastest available (see docs/cli.md)")
        return Backend("trio", reason="nothing faster is available")
    return Backend(requested)


# --- the PHT client ----------------------------------------------------------------------


class AsyncioPHTStream(anyio.abc.ByteStream):
    """A :mod:`pht.asyncio` tunnel (reader and writer) as an anyio byte stream.

    ``send`` returns once the server acknowledged the bytes (``drain()``);
    the tunnel's reset (:class:`pht.asyncio.TunnelResetError`) and other
    connection errors become :class:`anyio.BrokenResourceError`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._closed = False
        peer = writer.get_extra_info("peername")
        if isinstance(peer, str):
            self.remote_address = peer

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` from the tunnel; :class:`anyio.EndOfStream` once it ended."""
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            data = await self._reader.read(max_bytes)
        except (ConnectionError, pht.TunnelError) as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        if not data:
            if self._closed:
                raise anyio.ClosedResourceError
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        """Write ``item`` and wait until the server has it."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._writer.is_closing():
            raise anyio.BrokenResourceError("the tunnel is closed")
        try:
            self._writer.write(item)
            await self._writer.drain()
        except (ConnectionError, pht.TunnelError) as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def send_eof(self) -> None:
        """PHT has no half-close."""
        raise NotImplementedError("a PHT tunnel has no half-close (send_eof)")

    async def aclose(self) -> None:
        """Close the tunnel (its queued bytes go first) and wait until it is over."""
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError, pht.TunnelError):
            await self._writer.wait_closed()


async def open_pht(
    backend: Backend,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    open_transport: Opener | None = None,
    **options: Any,
) -> anyio.abc.ByteStream:
    """A PHT tunnel to ``host:port`` on ``backend``'s client, as an anyio byte stream.

    ``options`` are the keywords both clients share (paths, ``headers``,
    ``host_header``, ``proxy``, ``server_hostname``, ``push_window``).
    ``open_transport`` opens its HTTP connections (through other hops).
    """
    if backend.is_trio:
        trio_opener = None
        if open_transport is not None:
            opener = open_transport

            async def trio_opener(transport_host: str, transport_port: int) -> trio.abc.Stream:
                return as_trio(await opener(transport_host, transport_port))

        stream = await pht.open_pht_stream(
            host,
            port,
            tls=tls if tls is not None else False,
            open_transport=trio_opener,
            **options,
        )
        return TrioByteStream(stream)
    asyncio_opener = None
    if open_transport is not None:
        anyio_opener = open_transport

        async def asyncio_opener(
            transport_host: str, transport_port: int
        ) -> tuple[pht.asyncio.TransportReader, pht.asyncio.TransportWriter]:
            pair = _AnyioPair(await anyio_opener(transport_host, transport_port))
            return pair, pair

    reader, writer = await pht.asyncio.open_pht_connection(
        host, port, ssl=tls, open_transport=asyncio_opener, **options
    )
    return AsyncioPHTStream(reader, writer)


#: The closes :class:`_AnyioPair` started, kept until done (asyncio holds tasks weakly).
_closing: set[asyncio.Task[None]] = set()


class _AnyioPair:
    """An anyio byte stream as the ``(reader, writer)`` pair of pht.asyncio's ``open_transport``.

    ``write`` queues, ``drain`` sends what is queued (its caller drains one
    at a time); ``close`` closes the stream in a task of its own, as
    asyncio's ``close()`` does not wait either.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._queued: list[bytes] = []
        self._closed = False

    async def read(self, n: int = -1, /) -> bytes:
        try:
            return await self._stream.receive(n if n > 0 else 65536)
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return b""
        except anyio.BrokenResourceError as exc:
            raise ConnectionResetError(str(exc) or "the hop's stream broke") from exc

    def write(self, data: bytes, /) -> None:
        self._queued.append(data)

    async def drain(self) -> None:
        while self._queued:
            data = b"".join(self._queued)
            self._queued.clear()
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                raise ConnectionResetError(str(exc) or "the hop's stream broke") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task = asyncio.get_running_loop().create_task(self._aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _aclose(self) -> None:
        await anyio.aclose_forcefully(self._stream)

    def get_extra_info(self, name: str, default: Any = None, /) -> Any:
        return default


# --- the PHT server ----------------------------------------------------------------------


async def serve_pht(
    backend: Backend,
    handler: Handler,
    port: int,
    *,
    host: str | None,
    tls: bool | ssl.SSLContext,
    backlog: int,
    trusted_proxies: Iterable[str],
    stats: PHTStatsSink | None,
    task_status: anyio.abc.TaskStatus[Sequence[object]] = anyio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve PHT tunnels on ``backend``'s server; ``handler`` gets each as an anyio stream.

    ``task_status.started()`` reports the listening sockets (or listeners).
    ``options`` are the keywords both servers share (the paths).
    """
    if backend.is_trio:

        async def trio_handler(stream: trio.abc.Stream) -> None:
            await handler(TrioByteStream(stream))

        trio_status: Any = task_status
        await pht.serve_pht(
            trio_handler,
            port,
            host=host,
            tls=tls,
            backlog=backlog,
            trusted_proxies=trusted_proxies,
            stats=stats,
            task_status=trio_status,
            **options,
        )
        return
    async with anyio.create_task_group() as group:

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            group.start_soon(handler, AsyncioPHTStream(reader, writer))

        server = await pht.asyncio.start_pht_server(
            connected,
            host,
            port,
            ssl=tls or None,
            backlog=backlog,
            trusted_proxies=trusted_proxies,
            stats=stats,
            **options,
        )
        try:
            task_status.started(list(server.sockets))
            await anyio.sleep_forever()
        finally:
            server.close()
            # The handlers are being cancelled with this task: their sessions
            # end at once, so the graceful shutdown is short; bounded anyway.
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await server.wait_closed()
