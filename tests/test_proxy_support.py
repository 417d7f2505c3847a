"""Helpers shared by the ``test_proxy_*`` modules, plus tests of the stream plumbing."""

from __future__ import annotations

import errno
import functools
import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest
import trio
import trio.testing

from pht.proxy import PrefixedStream, relay
from pht.proxy._dial import DialFailure, classify_dial_error
from pht.proxy._stream import (
    RELAY_BULK_SIZE,
    RELAY_CHUNK_SIZE,
    HandshakeReader,
    Truncated,
    as_trio,
)

from . import support

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


class FakeDialer:
    """A dialer that hands out one end of an in-memory stream pair per dial.

    The other ends ("targets") are kept in ``targets``, or served by ``serve``
    in ``nursery``; ``error`` makes every dial raise instead; ``hang`` makes
    it wait forever.
    """

    def __init__(
        self,
        error: BaseException | None = None,
        *,
        hang: bool = False,
        serve: Handler | None = None,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self.error = error
        self.hang = hang
        self.serve = serve
        self.nursery = nursery
        self.calls: list[tuple[str, int]] = []
        self.targets: list[trio.abc.Stream] = []
        self._dialed = trio.Event()

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.calls.append((host, port))
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error
        ours, theirs = trio.testing.memory_stream_pair()
        self.targets.append(theirs)
        self._dialed.set()
        if self.serve is not None and self.nursery is not None:
            self.nursery.start_soon(self.serve, theirs)
        return ours

    async def target(self, index: int = 0) -> trio.abc.Stream:
        """Wait for dial number ``index`` and return its target end."""
        while len(self.targets) <= index:
            await self._dialed.wait()
            self._dialed = trio.Event()
        return self.targets[index]


#: :func:`tests.support.receive_exactly` within a safety net against a hung
#: test (not a timing check); the proxy tests import it from here.
receive_exactly = functools.partial(support.receive_exactly, within=10.0)


async def receive_all(stream: trio.abc.Stream, limit: int = 1 << 20) -> bytes:
    """Read until EOF (at most ``limit`` bytes)."""
    data = bytearray()
    with trio.fail_after(10):
        while len(data) <= limit:
            chunk = await stream.receive_some()
            if not chunk:
                return bytes(data)
            data += chunk
    raise AssertionError("no EOF within the limit")


async def run_handler_on(handler: Handler, client_bytes: bytes) -> tuple[bytes, trio.abc.Stream]:
    """Feed ``client_bytes`` then EOF to ``handler``; return its whole answer.

    The handler must return (no exception may escape) and close its stream.
    """
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(client_bytes)
    await client.send_eof()
    with trio.fail_after(30):
        await handler(server)
        answer = await receive_all(client)
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")
    return answer, server


def refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


# ---------------------------------------------------------------------------
# Tests of the shared plumbing


async def test_prefixed_stream_returns_prefix_first() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"world")
    stream = PrefixedStream(right, b"hello ")
    assert await stream.receive(3) == b"hel"
    assert await stream.receive() == b"lo "
    assert await stream.receive() == b"world"
    await stream.send(b"back")
    assert await left.receive_some() == b"back"
    await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


async def test_prefixed_stream_follows_the_stream_contract() -> None:
    # (Through the trio view that connectors hand to trio callers.)
    async def maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        a, b = trio.testing.memory_stream_pair()
        return as_trio(PrefixedStream(a, b"")), as_trio(PrefixedStream(b, b""))

    await trio.testing.check_two_way_stream(maker, None)


async def test_handshake_reader_pushes_back_read_ahead() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"\x05\x01\x00payload")
    reader = HandshakeReader(right)
    assert await reader.read_exactly(3) == b"\x05\x01\x00"
    rest = reader.stream()
    assert await rest.receive() == b"payload"


async def test_handshake_reader_read_until_is_bounded() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"abc\x00" + b"x" * 20)
    reader = HandshakeReader(right)
    assert await reader.read_until(b"\x00", 10) == b"abc"
    assert await reader.read_until(b"\x00", 10) is None


async def test_handshake_reader_raises_truncated_at_eof() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"\x05")
    await left.send_eof()
    with pytest.raises(Truncated):
        await HandshakeReader(right).read_exactly(2)


async def test_relay_copies_both_ways_and_closes_both() -> None:
    a_outer, a_inner = trio.testing.memory_stream_pair()
    b_inner, b_outer = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result: list[tuple[int, int]] = []

        async def run() -> None:
            result.append(await relay(a_inner, b_inner))

        nursery.start_soon(run)
        await a_outer.send_all(b"x" * 100_000)
        assert await receive_exactly(b_outer, 100_000) == b"x" * 100_000
        await b_outer.send_all(b"reply")
        assert await receive_exactly(a_outer, 5) == b"reply"
        await a_outer.send_eof()
        # EOF on one side closes the other side too.
        assert await receive_all(b_outer) == b""
        assert await receive_all(a_outer) == b""
    assert result == [(100_000, 5)]


class _ReadSizes(trio.abc.Stream):
    """A stream that records the ``max_bytes`` of every read (for relay's read sizes)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sizes: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.sizes.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_relay_reads_big_while_busy_and_small_when_interactive() -> None:
    a_outer, a_inner = trio.testing.memory_stream_pair()
    b_inner, b_outer = trio.testing.memory_stream_pair()
    source = _ReadSizes(a_inner)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, source, b_inner)
        await a_outer.send_all(b"x" * (2 * RELAY_BULK_SIZE))
        await receive_exactly(b_outer, 2 * RELAY_BULK_SIZE)
        await a_outer.send_all(b"y")
        await receive_exactly(b_outer, 1)
        await a_outer.send_all(b"z")
        await receive_exactly(b_outer, 1)
        await a_outer.send_eof()
    # 64 KiB first; once a read fills that, 512 KiB until a short read.
    sizes = source.sizes
    assert sizes[0] == RELAY_CHUNK_SIZE
    assert sizes[1] == RELAY_BULK_SIZE
    assert sizes[-2:] == [RELAY_CHUNK_SIZE, RELAY_CHUNK_SIZE]  # after "y", after "z"


async def test_dial_errors_from_a_real_refused_connection_map_to_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nobody listens on ``port`` now; trio wraps the refusal in a group.
    with pytest.raises(OSError, match="all attempts") as info:
        await trio.open_tcp_stream("127.0.0.1", port)
    assert classify_dial_error(info.value) is DialFailure.REFUSED


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (OSError(errno.ENETUNREACH, "x"), DialFailure.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), DialFailure.HOST_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "x"), DialFailure.TIMEOUT),
        (socket.gaierror(socket.EAI_NONAME, "unknown"), DialFailure.HOST_UNREACHABLE),
        (OSError("no errno"), DialFailure.OTHER),
        (RuntimeError("odd dialer"), DialFailure.OTHER),
    ],
)
def test_classify_dial_error(error: BaseException, failure: DialFailure) -> None:
    assert classify_dial_error(error) is failure
