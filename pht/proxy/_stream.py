"""Stream plumbing shared by the handlers and connectors.

The handlers run on anyio byte streams, so the same code serves trio and
asyncio (uvloop). trio streams are still accepted wherever a stream is
taken: :func:`as_anyio` wraps them, and a connector given a trio stream hands
a trio stream back (:func:`as_trio`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, Union, overload

import anyio
import anyio.abc
import anyio.lowlevel
import trio
from anyio.abc import SocketAttribute

from ._dial import HopError
from ._errors import ProxyError

__all__ = [
    "RELAY_BULK_SIZE",
    "RELAY_CHUNK_SIZE",
    "AnyStream",
    "HandshakeReader",
    "PrefixedStream",
    "Truncated",
    "as_anyio",
    "as_trio",
    "describe_peer",
    "read_some",
    "relay",
]

#: A byte stream the proxy code takes: anyio's, or (on the trio backend) trio's.
AnyStream = Union[anyio.abc.ByteStream, trio.abc.Stream]  # noqa: UP007 - a runtime alias
_S = TypeVar("_S", anyio.abc.ByteStream, trio.abc.Stream)

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


class TrioByteStream(anyio.abc.ByteStream):
    """A ``trio.abc.Stream`` as an anyio byte stream (trio's exceptions become anyio's).

    The wrapped stream is ``transport_stream``; a PHT stream's
    ``remote_address`` and a socket's addresses stay visible.
    """

    def __init__(self, transport_stream: trio.abc.Stream) -> None:
        self.transport_stream = transport_stream

    @property
    def remote_address(self) -> str:
        """The wrapped stream's peer, as :func:`describe_peer` tells it."""
        return describe_peer(self.transport_stream)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """What the trio stream receives; :class:`anyio.EndOfStream` at its EOF."""
        try:
            data = await self.transport_stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            raise anyio.BrokenResourceError(*exc.args) from exc
        except trio.ClosedResourceError as exc:
            raise anyio.ClosedResourceError(*exc.args) from exc
        except trio.BusyResourceError as exc:
            raise anyio.BusyResourceError("receiving from") from exc
        if not data:
            raise anyio.EndOfStream
        return data if isinstance(data, bytes) else bytes(data)

    async def send(self, item: bytes) -> None:
        """``send_all`` on the trio stream."""
        try:
            await self.transport_stream.send_all(item)
        except trio.BrokenResourceError as exc:
            raise anyio.BrokenResourceError(*exc.args) from exc
        except trio.ClosedResourceError as exc:
            raise anyio.ClosedResourceError(*exc.args) from exc
        except trio.BusyResourceError as exc:
            raise anyio.BusyResourceError("writing to") from exc

    async def send_eof(self) -> None:
        """Half-close, if the trio stream can (PHT streams cannot)."""
        if not isinstance(self.transport_stream, trio.abc.HalfCloseableStream):
            raise NotImplementedError(
                f"{type(self.transport_stream).__name__} has no half-close (send_eof)"
            )
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        """Close the trio stream."""
        await self.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """A trio socket stream's socket attributes, as anyio's socket streams have them."""
        inner: trio.abc.Stream = self.transport_stream
        while not isinstance(inner, trio.SocketStream):
            nested = getattr(inner, "transport_stream", None)
            if not isinstance(nested, trio.abc.Stream):
                return {}
            inner = nested
        sock = inner.socket
        return {
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.remote_address: sock.getpeername,
        }


class TrioStreamView(trio.abc.Stream):
    """An anyio byte stream as a ``trio.abc.Stream`` (for trio callers of the connectors)."""

    def __init__(self, transport_stream: anyio.abc.ByteStream) -> None:
        self.transport_stream = transport_stream
        self._sending = False
        self._receiving = False
        self._closed = False

    @property
    def remote_address(self) -> str:
        """The wrapped stream's peer, as :func:`describe_peer` tells it."""
        return describe_peer(self.transport_stream)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """What the anyio stream receives; ``b""`` at its EOF."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            return await self.transport_stream.receive(
                RELAY_CHUNK_SIZE if max_bytes is None else max_bytes
            )
        except anyio.EndOfStream:
            return b""
        except anyio.BrokenResourceError as exc:
            raise trio.BrokenResourceError(*exc.args) from exc
        except anyio.ClosedResourceError as exc:
            raise trio.ClosedResourceError(*exc.args) from exc
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """``send`` on the anyio stream."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await self.transport_stream.send(bytes(data))
        except anyio.BrokenResourceError as exc:
            raise trio.BrokenResourceError(*exc.args) from exc
        except anyio.ClosedResourceError as exc:
            raise trio.ClosedResourceError(*exc.args) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """anyio streams have no such wait: a checkpoint."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Close the anyio stream."""
        self._closed = True
        await self.transport_stream.aclose()


def as_anyio(stream: AnyStream) -> anyio.abc.ByteStream:
    """``stream`` as an anyio byte stream: itself, or a trio stream wrapped."""
    if isinstance(stream, anyio.abc.ByteStream):
        return stream
    if isinstance(stream, TrioStreamView):
        return stream.transport_stream
    if isinstance(stream, trio.abc.Stream):
        return TrioByteStream(stream)
    raise TypeError(
        f"expected an anyio.abc.ByteStream or a trio.abc.Stream, not {type(stream).__name__}"
    )


def as_trio(stream: anyio.abc.ByteStream) -> trio.abc.Stream:
    """``stream`` as a ``trio.abc.Stream`` (unwrapping a :class:`TrioByteStream`)."""
    if isinstance(stream, TrioByteStream):
        return stream.transport_stream
    return TrioStreamView(stream)


@overload
def like(original: trio.abc.Stream, result: anyio.abc.ByteStream) -> trio.abc.Stream: ...
@overload
def like(original: anyio.abc.ByteStream, result: anyio.abc.ByteStream) -> anyio.abc.ByteStream: ...
def like(original: AnyStream, result: anyio.abc.ByteStream) -> AnyStream:
    """``result`` in the kind of ``original``: a connector given a trio stream returns one."""
    if isinstance(original, trio.abc.Stream):
        return as_trio(result)
    return result


async def read_some(
    stream: anyio.abc.ByteReceiveStream, max_bytes: int = RELAY_CHUNK_SIZE
) -> bytes:
    """Up to ``max_bytes`` from ``stream``, ``b""`` at its end (h11's way of saying EOF)."""
    try:
        return await stream.receive(max_bytes)
    except anyio.EndOfStream:
        return b""


class PrefixedStream(anyio.abc.ByteStream):
    """A stream whose first reads return ``prefix``, then the wrapped stream's data.

    Used to push back bytes read ahead during a handshake (a peeked first
    byte, data a client sent together with its request). Sending and closing
    go straight to the wrapped stream, available as ``transport_stream``
    (a trio stream is wrapped with :func:`as_anyio` first).
    """

    def __init__(self, transport_stream: AnyStream, prefix: bytes | bytearray) -> None:
        self.transport_stream = as_anyio(transport_stream)
        self._prefix = memoryview(bytes(prefix))
        self._closed = False

    @property
    def remote_address(self) -> str:
        """The wrapped stream's peer, as :func:`describe_peer` tells it."""
        return describe_peer(self.transport_stream)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The held prefix first, then what the wrapped stream receives."""
        if self._closed:
            raise anyio.ClosedResourceError
        if self._prefix:
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
            await anyio.lowlevel.checkpoint()
            chunk = bytes(self._prefix[:max_bytes])
            self._prefix = self._prefix[max_bytes:]
            return chunk
        return await self.transport_stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        """Send on the wrapped stream."""
        if self._closed:
            raise anyio.ClosedResourceError
        await self.transport_stream.send(item)

    async def send_eof(self) -> None:
        """Half-close the wrapped stream."""
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        """Close the wrapped stream and drop the prefix."""
        self._closed = True
        self._prefix = memoryview(b"")
        await self.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """The wrapped stream's (its socket addresses)."""
        return self.transport_stream.extra_attributes


class Truncated(Exception):
    """The peer closed the stream before a handshake message was complete."""


class HandshakeReader:
    """Reads handshake messages of known length from a stream.

    It may read past the handshake (a client that sends its request and first
    data together); :meth:`stream` gives back a stream that returns those
    bytes first.
    """

    def __init__(self, stream: AnyStream) -> None:
        self._stream = as_anyio(stream)
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await read_some(self._stream)
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

    def stream(self) -> anyio.abc.ByteStream:
        """The stream, with any bytes read past the handshake pushed back."""
        buffered = self.take_buffered()
        return PrefixedStream(self._stream, buffered) if buffered else self._stream


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "?"


def describe_peer(stream: AnyStream) -> str:
    """A short ``host:port`` for a stream's peer, for log lines (``?`` if unknown)."""
    remote = getattr(stream, "remote_address", None)
    if isinstance(remote, str):
        return remote
    if isinstance(stream, anyio.abc.ByteStream):
        try:
            address = stream.extra(SocketAttribute.remote_address, None)
        except OSError:
            return "?"
        if address is not None:
            return _format_address(address)
    elif isinstance(stream, trio.SocketStream):
        try:
            return _format_address(stream.socket.getpeername())
        except OSError:
            return "?"
    inner = getattr(stream, "transport_stream", None)
    if isinstance(inner, (anyio.abc.ByteStream, trio.abc.Stream)):
        return describe_peer(inner)
    return "?"


async def relay(a: AnyStream, b: AnyStream) -> tuple[int, int]:
    """Copy ``a`` to ``b`` and ``b`` to ``a`` until either side ends.

    Returns the byte counts ``(a -> b, b -> a)``. When one direction reaches
    EOF or breaks, both streams are closed (PHT streams have no half-close, so
    a half-open relay would only leak). Both streams are closed on return,
    also when cancelled. Takes anyio byte streams, or trio streams on trio.
    """
    first, second = as_anyio(a), as_anyio(b)
    counts = [0, 0]

    async def pump(
        source: anyio.abc.ByteStream,
        sink: anyio.abc.ByteStream,
        index: int,
        scope: anyio.CancelScope,
    ) -> None:
        try:
            size = RELAY_CHUNK_SIZE
            while True:
                data = await source.receive(size)
                # A read that filled a small buffer means more is waiting.
                size = RELAY_BULK_SIZE if len(data) >= RELAY_CHUNK_SIZE else RELAY_CHUNK_SIZE
                await sink.send(data)
                counts[index] += len(data)
        except anyio.EndOfStream:
            pass
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            _log.debug("relay direction ended: %s", exc or type(exc).__name__)
        except (ProxyError, HopError) as exc:
            # A lazy relay client stream finds the proxy's error status only
            # when it reads: that ends the relay like a broken stream, but
            # the tunnel failed: a WARNING.
            _log.warning("relay ended: %s", exc)
        finally:
            scope.cancel()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(pump, first, second, 0, group.cancel_scope)
            group.start_soon(pump, second, first, 1, group.cancel_scope)
    finally:
        await anyio.aclose_forcefully(first)
        await anyio.aclose_forcefully(second)
    return counts[0], counts[1]
