"""The trio server's heartbeats on idle pulls: on time, in line, and cheap (mock clock)."""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Callable

import h11
import pytest
import trio
import trio.testing

import pht

from .support import start_server

INTERVAL = 10.0
#: The heartbeat wheel files pulls in slots of an eighth of the interval.
LATEST = INTERVAL * 9 / 8


class TaskSteps(trio.abc.Instrument):
    """Counts the steps of tasks whose name ends with ``suffix``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


class RawPull:
    """A pull read with h11 off a plain socket, as GOST's client holds one idle."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.conn.send(h11.Request(method="GET", target="/pull", headers=[("Host", "x")]))

    @classmethod
    async def open(cls, port: int, token: str, tls: bool = False) -> RawPull:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if tls:  # the server's certificate is self-signed: not checked here
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, context, server_hostname="gost.run")
        await stream.send_all(f"GET /pull?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return cls(stream)

    async def next_data(self) -> bytes:
        """The next piece of the response body (a heartbeat is ``b"\\n"``)."""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                assert data, "the server closed the pull"
                self.conn.receive_data(bytes(data))
            elif isinstance(event, h11.Data):
                return bytes(event.data)
            else:
                assert isinstance(event, h11.Response), event
                assert event.status_code == 200

    async def lines(self) -> list[bytes]:
        """The next complete lines (a piece may hold several)."""
        piece = await self.next_data()
        while not piece.endswith(b"\n"):
            piece += await self.next_data()
        return piece.split(b"\n")[:-1]


async def test_idle_pulls_get_heartbeats_without_waking_their_tasks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The heartbeat task writes a parked pull's heartbeat itself: no step of the pull's task."""
    port = await start_server(nursery, heartbeat_interval=INTERVAL)
    pulls = [await RawPull.open(port, f"heartbeat-token-{index}") for index in range(4)]
    for pull in pulls:
        assert await pull.lines() == [b""]  # the first heartbeat: every task is settled now
    steps = TaskSteps("handle_connection")  # the task that runs a connection and its pull
    trio.lowlevel.add_instrument(steps)
    gaps: list[float] = []

    async def two_more(pull: RawPull) -> None:
        last = trio.current_time()
        for _ in range(2):
            assert await pull.lines() == [b""]
            gaps.append(trio.current_time() - last)
            last = trio.current_time()

    try:
        async with trio.open_nursery() as readers:
            for pull in pulls:
                readers.start_soon(two_more, pull)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.steps == 0
    assert len(gaps) == 8
    assert all(INTERVAL <= gap <= LATEST for gap in gaps), gaps
    for pull in pulls:
        await pull.stream.aclose()


async def test_a_pull_busy_writing_gets_its_heartbeat_after_the_write(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A heartbeat falls due while the handler's write waits on a client that does not read."""
    payload = os.urandom(4 * 1024 * 1024)
    sent = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        await stream.send_all(payload)
        sent.set()
        await stream.receive_some()

    port = await start_server(nursery, handler, heartbeat_interval=INTERVAL)
    pull = await RawPull.open(port, "busy-writer-token")
    await trio.sleep(3 * INTERVAL)  # not read meanwhile: the write waits, heartbeats fall due
    assert not sent.is_set()
    received = bytearray()
    while len(received) < len(payload):
        for line in await pull.lines():
            assert line, "a heartbeat inside the handler's bytes"
            received += base64.b64decode(line)
    assert received == payload
    done = trio.current_time()
    assert await pull.lines() == [b""]
    assert INTERVAL <= trio.current_time() - done <= LATEST
    await pull.stream.aclose()


async def test_a_pull_over_tls_gets_heartbeats_and_is_ended_when_its_client_goes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Over TLS the pull's own task writes its heartbeats and watches for the hang-up."""
    gone = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        while await stream.receive_some():
            pass
        gone.set()

    port = await start_server(nursery, handler, heartbeat_interval=INTERVAL, tls=True)
    pull = await RawPull.open(port, "tls-heartbeat-token", tls=True)
    start = trio.current_time()
    for beat in (1, 2):
        assert await pull.lines() == [b""]
        assert beat * INTERVAL <= trio.current_time() - start <= beat * LATEST
    left = trio.current_time()
    await trio.aclose_forcefully(pull.stream)
    await gone.wait()
    assert trio.current_time() - left < 1.0


@pytest.mark.parametrize("taken", [0, 2], ids=["send-buffer-full", "cut-short"])
async def test_a_heartbeat_the_socket_does_not_take_whole_is_finished_by_the_pull(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    taken: int,
) -> None:
    """The kernel takes none or part of a heartbeat: the pull task writes the rest, in order."""
    real_write: Callable[[int, bytes], int] = os.write
    heartbeat = b"1\r\n\n\r\n"  # a chunk of one newline
    cut: list[int] = []

    def write(fd: int, data: bytes) -> int:
        if data != heartbeat or cut:
            return real_write(fd, data)
        cut.append(fd)  # the first heartbeat only: as a full send buffer would answer
        if not taken:
            raise BlockingIOError
        return real_write(fd, data[:taken])

    monkeypatch.setattr(os, "write", write)
    port = await start_server(nursery, heartbeat_interval=INTERVAL)
    pull = await RawPull.open(port, "short-write-token")
    start = trio.current_time()
    for beat in (1, 2, 3):
        assert await pull.lines() == [b""]
        assert beat * INTERVAL <= trio.current_time() - start <= beat * LATEST
    assert len(cut) == 1
    await pull.stream.aclose()
