"""The asyncio server (``start_pht_server``) against pht's trio client, over real loopback sockets.

The server runs on its own event loop (asyncio's default loop or uvloop) in a
thread; the tests run the trio client (:func:`pht.open_pht_stream`) and the
trio suite's raw-HTTP helpers in the main thread, as pytest-trio runs every
test here. So the client is the very one the trio suite trusts, and GOST's
captured exchanges replay unchanged (``test_replay_*`` below are the trio
server's replay tests, run against this server).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

import pht
from pht._asyncio_server import PHTServer, start_pht_server
from pht._server_core import ShutdownReport
from pht._stats import ServiceStats

from .asyncio_support import LOOPS, loop_factory
from .test_conformance_server import (  # run here against the asyncio server
    test_replay_legacy_capture_statuses,
    test_replay_modern_capture,
)
from .test_hardening_support import GUARD, echo_round_trip, exchange, push_request

__all__ = ["test_replay_legacy_capture_statuses", "test_replay_modern_capture"]

Callback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
MIB = 1024 * 1024


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close (like GOST's echo target); 'farclose' sessions say bye."""
    if writer.get_extra_info("pht_token").startswith("farclose"):
        writer.write(b"bye #1\n")
        writer.close()
        await writer.wait_closed()
        return
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


class ServerThread:
    """A :func:`start_pht_server` running on a loop of its own, in a thread."""

    def __init__(self, loop_name: str, callback: Callback, **options: Any) -> None:
        self.loop = loop_factory(loop_name)()
        self._callback = callback
        self._options = options
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self.server: PHTServer | None = None
        self.report: ShutdownReport | None = None
        self.leftovers: list[asyncio.Task[Any]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(GUARD) or self.server is None:
            raise RuntimeError(f"the server did not start: {self.error!r}")
        self.port: int = self.server.sockets[0].getsockname()[1]

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = self.loop.create_future()
        self.server = await start_pht_server(self._callback, "127.0.0.1", 0, **self._options)
        self._ready.set()
        await self._stop
        self.server.close()
        await self.server.wait_closed()
        self.report = self.server.shutdown_report
        await asyncio.sleep(0)  # the handlers' own last steps
        current = asyncio.current_task()
        self.leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in self.leftovers:
            task.cancel()

    def stop(self) -> ShutdownReport:
        """Close the server gracefully, wait for the thread; no task may be left."""
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(GUARD + 10)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error
        assert not self.leftovers, f"tasks left running: {self.leftovers}"
        assert self.report is not None
        return self.report


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "uvloop":
        pytest.importorskip("uvloop")
    return name


@pytest.fixture
def serve(loop_name: str) -> Iterator[Callable[..., ServerThread]]:
    """Start servers on the test's loop kind; each is stopped (and checked) at the end."""
    started: list[ServerThread] = []

    def start(callback: Callback = echo, **options: Any) -> ServerThread:
        server = ServerThread(loop_name, callback, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.report is None and server.error is None:
            server.stop()


@pytest.fixture
def server_port(serve: Callable[..., ServerThread]) -> int:
    """The conformance replay's server: echo, 'farclose' says bye, heartbeats every 0.2 s."""
    return serve(heartbeat_interval=0.2, shutdown_timeout=0.5).port


def client_context() -> ssl.SSLContext:
    """A client that accepts GOST's self-signed certificate (as GOST's own client does)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def sha_echo(stream: pht.PHTStream, size: int) -> None:
    """Send ``size`` random bytes while reading the echo; compare sha256 both ways."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    got = 0

    async def send() -> None:
        left = size
        while left:
            chunk = os.urandom(min(left, 256 * 1024))
            sent.update(chunk)
            await stream.send_all(chunk)
            left -= len(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while got < size:
            data = await stream.receive_some()
            assert data, "EOF before the whole echo came back"
            received.update(data)
            got += len(data)
    assert got == size
    assert received.hexdigest() == sent.hexdigest()


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-authorize", "modern-own-token"])
@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
async def test_both_generations_plain_and_tls(
    serve: Callable[..., ServerThread], authorize: bool, tls: bool
) -> None:
    server = serve(ssl=tls or None)
    context = client_context() if tls else False
    with trio.fail_after(GUARD):
        stream = await pht.open_pht_stream(
            "127.0.0.1", server.port, authorize=authorize, tls=context
        )
        await echo_round_trip(stream)
        await stream.aclose()
    report = await trio.to_thread.run_sync(server.stop)
    assert report.cut == ()


@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
async def test_16_mib_each_way(serve: Callable[..., ServerThread], tls: bool) -> None:
    server = serve(ssl=tls or None)
    context = client_context() if tls else False
    with trio.fail_after(120):
        stream = await pht.open_pht_stream("127.0.0.1", server.port, tls=context)
        await sha_echo(stream, 16 * MIB)
        await stream.aclose()


async def test_50_tunnels_at_once(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_pending_per_address=None)  # 25 authorize at once from one address
    done = []

    async def tunnel(number: int) -> None:
        stream = await pht.open_pht_stream("127.0.0.1", server.port, authorize=number % 2 == 0)
        await sha_echo(stream, 64 * 1024)
        await stream.aclose()
        done.append(number)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for number in range(50):
                nursery.start_soon(tunnel, number)
    assert sorted(done) == list(range(50))


async def test_an_idle_session_runs_no_pump_task(serve: Callable[..., ServerThread]) -> None:
    """Between writes a session costs no pump task (thousands of idle tunnels on one server)."""
    server = serve()

    async def session_tasks() -> list[str]:
        async def names() -> list[str]:
            return [task.get_name() for task in asyncio.all_tasks()]

        future = asyncio.run_coroutine_threadsafe(names(), server.loop)
        return await trio.to_thread.run_sync(future.result, GUARD)

    with trio.fail_after(GUARD):
        streams = [await pht.open_pht_stream("127.0.0.1", server.port) for _ in range(3)]
        for stream in streams:
            await sha_echo(stream, 4096)
        names = await session_tasks()
        assert not [name for name in names if name.startswith("pht ")], names
        for stream in streams:  # woken again by the next bytes
            await sha_echo(stream, 300 * 1024)
            await stream.aclose()


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_session_ends_take_turns(loop_kind: str) -> None:
    """A mass close ends at most TEARDOWN_PER_TURN sessions per turn of the loop, in order."""
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")
    from pht._asyncio_server import TEARDOWN_PER_TURN as BATCH
    from pht._asyncio_server import _Turns

    async def main() -> list[tuple[int, int]]:
        turns = _Turns(asyncio.get_running_loop())
        tick = 0
        passed: list[tuple[int, int]] = []

        async def ticker() -> None:
            nonlocal tick
            while True:
                tick += 1
                await asyncio.sleep(0)

        async def end(number: int) -> None:
            await turns.turn()
            passed.append((tick, number))

        counting = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ends = [asyncio.ensure_future(end(number)) for number in range(5 * BATCH)]
        ends[3].cancel()  # a cancelled waiter gives its turn to the next one
        await asyncio.wait(ends)
        counting.cancel()
        return passed

    loop = loop_factory(loop_kind)()
    try:
        passed = loop.run_until_complete(main())
    finally:
        loop.close()
    assert [number for _, number in passed] == [n for n in range(5 * BATCH) if n != 3]
    per_turn = Counter(tick for tick, _ in passed)
    assert max(per_turn.values()) <= BATCH
    assert len(per_turn) >= 5


async def test_oversized_push_is_413(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_push_line=4096)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", server.port, authorize=False)
        victim = "victim-session-token-0001"
        answer, _ = await exchange(server.port, push_request(victim, b"aGk=\n"))
        assert answer.status == 200
        line = base64.b64encode(b"x" * 8192) + b"\n"
        answer, closed = await exchange(server.port, push_request(victim, line))
        assert (answer.status, closed) == (413, True)
        answer, _ = await exchange(server.port, push_request(victim, b"aGk=\n"))
        assert answer.status == 403  # the session is over and stays over
        await echo_round_trip(good)  # the other tunnel carried on
        await good.aclose()


async def test_oversized_header_is_431(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_header_size=2048)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", server.port)
        request = b"GET /authorize HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
        answer, closed = await exchange(server.port, request)
        assert (answer.status, closed) == (431, True)
        await echo_round_trip(good)
        await good.aclose()


async def test_full_table_is_429_for_both_generations(serve: Callable[..., ServerThread]) -> None:
    server = serve(max_sessions=2)
    with trio.fail_after(GUARD):
        first = await pht.open_pht_stream("127.0.0.1", server.port, authorize=False)
        second = await pht.open_pht_stream("127.0.0.1", server.port)
        with pytest.raises(pht.TunnelError) as info:
            await pht.open_pht_stream("127.0.0.1", server.port, authorize=False)
        assert info.value.status == 429
        with pytest.raises(pht.TunnelError) as info:
            await pht.open_pht_stream("127.0.0.1", server.port)
        assert info.value.status == 429
        await echo_round_trip(second)
        await first.aclose()
        third = await pht.open_pht_stream("127.0.0.1", server.port, authorize=False)
        await echo_round_trip(third)
        await third.aclose()
        await second.aclose()


async def test_push_not_consumed_in_time_is_410_and_ends_the_session(
    serve: Callable[..., ServerThread],
) -> None:
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await writer.wait_closed()  # holds the writer (dropping it would close it)

    # The reader takes 2 * limit bytes, then pauses: later pushes are not consumed.
    server = serve(never_reads, limit=16, push_timeout=0.5)
    token = "unread-session-token-0001"
    with trio.fail_after(GUARD):
        answer, _ = await exchange(
            server.port, push_request(token, base64.b64encode(b"x" * 64) + b"\n")
        )
        assert answer.status == 200
        answer, _ = await exchange(server.port, push_request(token, b"aGk=\n"))
        assert answer.status == 410
        answer, _ = await exchange(server.port, push_request(token, b"aGk=\n"))
        assert answer.status == 403


async def test_close_is_graceful_then_cuts_what_is_left(
    serve: Callable[..., ServerThread],
) -> None:
    async def holds(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()  # after EOF: the cut session's handler ends on its own

    server = serve(holds, shutdown_timeout=0.5)
    with trio.fail_after(GUARD):
        # A modern client: a legacy one would poll again after the pull's end.
        held = await pht.open_pht_stream("127.0.0.1", server.port, authorize=False)
        await echo_round_trip(held)
        closing = await pht.open_pht_stream("127.0.0.1", server.port)
        await echo_round_trip(closing)
        await closing.aclose()
        report = await trio.to_thread.run_sync(server.stop)
        assert report.cut == (held.token[:8] + "…",)
        # The closed session may still be ending when close() begins: then
        # it is one that finished within the grace period.
        assert report.finished in (0, 1)
        assert await held.receive_some() == b""  # the cut session's client sees EOF
        with pytest.raises(pht.TunnelError, match="cannot connect"):
            await pht.open_pht_stream("127.0.0.1", server.port)  # nobody listens
        await held.aclose()


async def test_a_handler_that_raises_ends_only_its_session(
    serve: Callable[..., ServerThread],
) -> None:
    async def broken_or_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if writer.get_extra_info("pht_token").startswith("broken"):
            raise RuntimeError("handler bug")
        await echo(reader, writer)

    server = serve(broken_or_echo)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", server.port)
        broken = await pht.open_pht_stream(
            "127.0.0.1", server.port, token="broken-0001", authorize=False
        )
        # Its byte got 410 (the handler was gone) or was taken: either way, the end.
        assert await send_then_receive(broken) == b""
        await echo_round_trip(good)
        await good.aclose()
        await broken.aclose()


async def send_then_receive(stream: pht.PHTStream) -> bytes:
    """Send a byte and read the answer; a tunnel error counts as the end (``b""``)."""
    try:
        await stream.send_all(b"x")
        return bytes(await stream.receive_some())
    except pht.TunnelError:
        return b""


async def test_stats_count_sessions_pushes_pulls_and_refusals(
    serve: Callable[..., ServerThread],
) -> None:
    stats = ServiceStats("pht-asyncio")
    server = serve(stats=stats)
    assert stats.pht_enabled  # counters exist, at zero, once it listens
    with trio.fail_after(GUARD):
        stream = await pht.open_pht_stream("127.0.0.1", server.port)
        await echo_round_trip(stream)
        await stream.aclose()
        answer, _ = await exchange(server.port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 404
    report = await trio.to_thread.run_sync(server.stop)  # the session ended first
    assert report == ShutdownReport(finished=0, cut=())
    assert (stats.sessions_total, stats.sessions_open, stats.pulls_total) == (1, 0, 1)
    assert stats.pushes_total >= 1
    assert stats.refusals[404] == 1


def test_pht_asyncio_exports_the_server() -> None:
    import pht.asyncio

    assert pht.asyncio.start_pht_server is start_pht_server


def test_bad_arguments_are_refused_before_listening() -> None:
    async def main() -> None:
        with pytest.raises(TypeError, match="ssl"):
            await start_pht_server(echo, "127.0.0.1", 0, ssl="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="heartbeat_interval"):
            await start_pht_server(echo, "127.0.0.1", 0, heartbeat_interval=0)

    asyncio.run(main())
