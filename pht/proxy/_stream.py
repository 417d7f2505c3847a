"""Stream plumbing shared by the handlers and connectors."""

from __future__ import annotations

import logging
import socket

import trio

from ._dial import HopError
from ._errors import ProxyError

__all__ = [
    "RELAY_BULK_SIZE",
    "RELAY_CHUNK_SIZE",
    "HandshakeReader",
    "PrefixedStream",
    "Truncated",
    "describe_peer",
    "relay",
]

#: Size of each read in :func:`relay`.
RELAY_CHUNK_SIZE = 64 * 1024
#: What :func:`relay` reads at once while a direction is busy. Each read
#: becomes one push (or pull line batch), and every push costs a round trip, so
#: bulk transfers want big reads; but a read's buffer is allocated at its full
#: size, and above 128 KiB that costs an ``mmap`` (~25 µs here) even for one
#: byte, so interactive traffic keeps 64 KiB reads. 512 KiB of data is a push
#: body of ~700 KB, within nginx's default ``client_max_body_size`` (1 MiB).
RELAY_BULK_SIZE = 512 * 1024

_log = logging.getLogger("pht.proxy")


class PrefixedStream(trio.abc.Stream):
    """A stream whose first reads return ``prefix``, then the wrapped stream's data.

    Used to push back bytes read ahead during a handshake (a peeked first
    byte, data a client sent together with its request). Sending and closing
    go straight to the wrapped stream, available as ``transport_stream``.
    """

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes | bytearray) -> None:
        self.transport_stream = transport_stream
        self._prefix = memoryview(bytes(prefix))
        self._closed = False

    @property
    def remote_address(self) -> str:
        """The wrapped stream's peer, as :func:`describe_peer` tells it."""
        return describe_peer(self.transport_stream)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The held prefix first, then what the wrapped stream receives."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._prefix:
            if max_bytes is not None and max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk = bytes(self._prefix[:size])
            self._prefix = self._prefix[size:]
            return chunk
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send on the wrapped stream."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """Wait on the wrapped stream."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the wrapped stream and drop the prefix."""
        self._closed = True
        self._prefix = memoryview(b"")
        await self.transport_stream.aclose()


class Truncated(Exception):
    """The peer closed the stream before a handshake message was complete."""


class HandshakeReader:
    """Reads handshake messages of known length from a stream.

    It may read past the handshake (a client that sends its request and first
    data together); :meth:`stream` gives back a stream that returns those
    bytes first.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(RELAY_CHUNK_SIZE)
        if not data:
            raise Truncated("the peer closed the connection in the middle of the handshake")
        self._buffer += data

    async def read_exactly(self, size: int) -> bytes:
        """Return exactly ``size`` bytes; raise :class:`Truncated` at EOF."""
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_until(self, delimiter: bytes, limit: int) -> bytes | None:
        """Return the bytes before ``delimiter`` (which is consumed), or ``None``
        if it does not come within ``limit`` bytes."""
        while True:
            index = self._buffer.find(delimiter, 0, limit + len(delimiter))
            if index >= 0:
                data = bytes(self._buffer[:index])
                del self._buffer[: index + len(delimiter)]
                return data
            if len(self._buffer) >= limit + len(delimiter):
                return None
            await self._fill()

    def take_buffered(self) -> bytes:
        """Remove and return the bytes read past the handshake."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def stream(self) -> trio.abc.Stream:
        """The stream, with any bytes read past the handshake pushed back."""
        buffered = self.take_buffered()
        return PrefixedStream(self._stream, buffered) if buffered else self._stream


def describe_peer(stream: trio.abc.Stream) -> str:
    """A short ``host:port`` for a stream's peer, for log lines (``?`` if unknown)."""
    remote = getattr(stream, "remote_address", None)
    if isinstance(remote, str):
        return remote
    if isinstance(stream, trio.SocketStream):
        try:
            address = stream.socket.getpeername()
        except OSError:
            return "?"
        if stream.socket.family in (socket.AF_INET, socket.AF_INET6):
            host, port = address[0], address[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(address) or "?"
    inner = getattr(stream, "transport_stream", None)
    if isinstance(inner, trio.abc.Stream):
        return describe_peer(inner)
    return "?"


async def relay(a: trio.abc.Stream, b: trio.abc.Stream) -> tuple[int, int]:
    """Copy ``a`` to ``b`` and ``b`` to ``a`` until either side ends.

    Returns the byte counts ``(a -> b, b -> a)``. When one direction reaches
    EOF or breaks, both streams are closed (PHT streams have no half-close, so
    a half-open relay would only leak). Both streams are closed on return,
    also when cancelled.
    """
    counts = [0, 0]

    async def pump(
        source: trio.abc.Stream, sink: trio.abc.Stream, index: int, scope: trio.CancelScope
    ) -> None:
        try:
            size = RELAY_CHUNK_SIZE
            while True:
                data = await source.receive_some(size)
                if not data:
                    break
                # A read that filled a small buffer means more is waiting.
                size = RELAY_BULK_SIZE if len(data) >= RELAY_CHUNK_SIZE else RELAY_CHUNK_SIZE
                await sink.send_all(data)
                counts[index] += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _log.debug("relay direction ended: %s", exc or type(exc).__name__)
        except (ProxyError, HopError) as exc:
            # A lazy relay client stream finds the proxy's error status only
            # when it reads: that ends the relay like a broken stream, but
            # the tunnel failed: a WARNING.
            _log.warning("relay ended: %s", exc)
        finally:
            scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, a, b, 0, nursery.cancel_scope)
            nursery.start_soon(pump, b, a, 1, nursery.cancel_scope)
    finally:
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
    return counts[0], counts[1]
