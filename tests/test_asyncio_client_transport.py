"""pht._asyncio_common: a PHT session as an asyncio transport under asyncio's own streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pht._asyncio_common import PHTTransport, TunnelResetError, open_streams
from pht._errors import PHTError, TunnelError

from .asyncio_support import LOOPS, run

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=LOOPS)
def aio(request: pytest.FixtureRequest) -> Runner:
    name: str = request.param
    return lambda coro: run(name, coro)


def _transport(**kwargs: Any) -> PHTTransport:
    return PHTTransport(asyncio.get_running_loop(), extra={"pht_token": "tok"}, **kwargs)


def test_reader_gets_delivered_bytes_and_eof(aio: Runner) -> None:
    async def main() -> None:
        transport = _transport()
        reader, writer = open_streams(transport)
        assert writer.get_extra_info("pht_token") == "tok"
        assert writer.get_extra_info("peername", "none") == "none"
        assert writer.transport is transport
        transport.deliver(b"hello\nwor")
        transport.deliver(b"ld")
        assert await reader.readline() == b"hello\n"
        transport.deliver_eof()
        assert await reader.read() == b"world"
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_drain_waits_for_acknowledgement(aio: Runner) -> None:
    async def main() -> None:
        transport = _transport(high_water=0)
        _, writer = open_streams(transport)
        writer.write(b"abc")
        writer.write(bytearray(b"def"))
        assert transport.get_write_buffer_size() == 6
        drain = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        await transport.wait_outbound()
        assert bytes(transport.take_outbound(100)) == b"abcdef"
        assert transport.queued == 0
        assert transport.get_write_buffer_size() == 6  # taken, not yet acknowledged
        transport.acknowledge(6)
        await drain
        assert transport.get_write_buffer_size() == 0
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_take_outbound_splits_large_and_joins_small_writes() -> None:
    async def main() -> None:
        transport = _transport()
        transport.write(b"a" * 10)
        transport.write(b"bb")
        transport.write(b"cc")
        assert bytes(transport.take_outbound(4)) == b"aaaa"
        assert bytes(transport.take_outbound(100)) == b"aaaaaabbcc"
        assert transport.take_outbound(100) == b""
        big = b"x" * 8
        transport.write(big)
        assert transport.take_outbound(8) is big  # no copy when it fits
        with pytest.raises(ValueError, match="at least 1"):
            transport.take_outbound(0)
        transport.abort()
        await asyncio.sleep(0)

    run("asyncio", main())


def test_lose_with_error_reaches_reader_and_drain_and_stops_tasks(aio: Runner) -> None:
    async def main() -> None:
        transport = _transport(high_water=0)
        reader, writer = open_streams(transport)
        stopped = asyncio.Event()

        async def pump() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()

        transport.start_task(pump())
        writer.write(b"x")
        drain = asyncio.ensure_future(writer.drain())
        read = asyncio.ensure_future(reader.read(10))
        await asyncio.sleep(0)
        transport.lose(TunnelResetError("refused", status=410))
        wait_closed = asyncio.ensure_future(writer.wait_closed())
        for waiting in (wait_closed, drain, read):
            with pytest.raises(TunnelResetError) as info:
                await waiting
            assert info.value.status == 410
            assert isinstance(info.value, ConnectionResetError)
            assert isinstance(info.value, PHTError)
        assert stopped.is_set()
        assert transport.is_closing()

    aio(main())


def test_a_failing_task_ends_the_session_with_its_error(aio: Runner) -> None:
    async def main() -> None:
        transport = _transport()
        reader, writer = open_streams(transport)

        async def pump() -> None:
            await asyncio.sleep(0)
            raise TunnelError("server answered 403", status=403)

        transport.start_task(pump())
        with pytest.raises(TunnelError, match="403"):
            await reader.read()
        with pytest.raises(TunnelError, match="403"):
            await writer.wait_closed()

    aio(main())


def test_close_lets_the_adapter_flush_then_lose(aio: Runner) -> None:
    async def main() -> None:
        flushed: list[bytes] = []

        class Flushing(PHTTransport):
            def _close_requested(self) -> None:
                self.start_task(self._flush())

            async def _flush(self) -> None:
                flushed.append(bytes(self.take_outbound(100)))
                self.lose(None)

        transport = Flushing(asyncio.get_running_loop())
        _, writer = open_streams(transport)
        writer.write(b"last words")
        writer.close()
        writer.write(b"dropped")  # after close, as asyncio's transports: dropped
        await writer.wait_closed()
        assert flushed == [b"last words"]

    aio(main())


def test_reading_back_pressure(aio: Runner) -> None:
    async def main() -> None:
        transport = _transport()
        reader, writer = open_streams(transport, limit=4)
        transport.deliver(b"123456789")  # over twice the limit: the reader pauses us
        assert not transport.is_reading()
        waiting = asyncio.ensure_future(transport.wait_reading())
        await asyncio.sleep(0)
        assert not waiting.done()
        assert await reader.read(100) == b"123456789"
        await waiting
        assert transport.is_reading()
        writer.close()
        await writer.wait_closed()

    aio(main())


def test_misuse_raises_named_errors() -> None:
    async def main() -> None:
        transport = _transport()
        _, writer = open_streams(transport)
        with pytest.raises(TypeError, match="bytes-like"):
            writer.write("text")  # type: ignore[arg-type]
        assert not writer.can_write_eof()
        with pytest.raises(NotImplementedError, match="half-close"):
            writer.write_eof()
        with pytest.raises(ValueError, match="must be >="):
            transport.set_write_buffer_limits(high=1, low=2)
        transport.set_write_buffer_limits(high=8)
        assert transport.get_write_buffer_limits() == (2, 8)
        writer.close()
        await writer.wait_closed()

    run("asyncio", main())
