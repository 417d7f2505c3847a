"""The trio server noticing clients that hang up on their pulls, alone or thousands at once."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import h11
import pytest
import trio
import trio.testing

import pht
from pht._server_core import PARK_AFTER

from .support import start_server
from .test_trio_heartbeats import RawPull


class Turns(trio.abc.Instrument):
    """The task steps of each turn of trio's scheduler (between two looks for I/O)."""

    def __init__(self) -> None:
        self.steps = 0
        self.most = 0

    def after_io_wait(self, timeout: float) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.most = max(self.most, self.steps)


def all_tasks() -> Iterator[trio.lowlevel.Task]:
    """Every task of this run: the root and its descendants."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    todo = [root]
    while todo:
        task = todo.pop()
        yield task
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)


def connection_tasks() -> int:
    """The server's tasks that serve a connection."""
    names = ("handle_connection", "_run_connection")
    return sum(task.name.endswith(names) for task in all_tasks())


class Ends:
    """A handler that records the sessions whose client went away (EOF)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all = trio.Event()

    async def __call__(self, stream: pht.PHTStream) -> None:
        while await stream.receive_some():
            pass
        self.count += 1
        if self.count == self.expected:
            self.all.set()


@pytest.mark.skipif(not hasattr(socket, "SO_LINGER"), reason="needs SO_LINGER")
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_pull_whose_client_goes_away_ends_its_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """Found at once, without a write to fail: FIN or RST."""
    ends = Ends(1)
    port = await start_server(nursery, ends, heartbeat_interval=3600.0)
    pull = await RawPull.open(port, "going-away-token")
    await pull.next_data()  # the head is out: the pull is open
    start = trio.current_time()
    assert isinstance(pull.stream, trio.SocketStream)
    if how == "reset":
        pull.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await pull.stream.aclose()
    with trio.fail_after(60):
        await ends.all.wait()
    assert trio.current_time() - start < 1.0  # no heartbeat, no timeout needed


async def test_pulls_hanging_up_at_once_are_ended_a_few_per_scheduler_turn(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """100 clients gone in one instant: no turn of the scheduler runs all their ends."""
    count = 100
    ends = Ends(count)
    port = await start_server(nursery, ends, heartbeat_interval=3600.0)
    pulls = [await RawPull.open(port, f"hang-up-token-{index}") for index in range(count)]
    for pull in pulls:
        await pull.next_data()  # every pull is open
    turns = Turns()
    trio.lowlevel.add_instrument(turns)
    try:
        for pull in pulls:
            assert isinstance(pull.stream, trio.SocketStream)
            pull.stream.socket.close()  # no checkpoint: all gone before the server looks
        with trio.fail_after(60):
            await ends.all.wait()
    finally:
        trio.lowlevel.remove_instrument(turns)
    # A task per pull waiting for its socket would all run in one turn (100+);
    # four ends per turn make about 20 steps.
    assert turns.most <= count // 2, turns.most


async def test_a_request_sent_up_an_open_pull_is_answered_after_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A proxy pipelines the next poll before the bounded pull's end went out: kept, answered."""
    port = await start_server(nursery, heartbeat_interval=3600.0, pull_max_ms=500)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET /pull?token=pipelined-token HTTP/1.1\r\nHost: x\r\n\r\n"
    await stream.send_all(request)
    conn = h11.Connection(h11.CLIENT)

    def sent() -> None:  # h11 does not pipeline: tell it of each request once due
        conn.send(h11.Request(method="GET", target="/pull", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())

    sent()
    ends = 0
    sent_next = False
    while ends < 2:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            assert data, "the server closed the connection"
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
            if not sent_next:  # the first pull is open: the next one goes up at once
                await trio.sleep(0.1)
                await stream.send_all(request)
                sent_next = True
        elif isinstance(event, h11.EndOfMessage):
            ends += 1
            conn.start_next_cycle()
            sent()
    await stream.aclose()


@pytest.mark.parametrize("hang_up", [True, False], ids=["hang-up", "next-request"])
async def test_idle_connections_are_parked_and_wake_a_few_per_scheduler_turn(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, hang_up: bool
) -> None:
    """Keep-alive connections idle for PARK_AFTER: no task step each when their clients act.

    100 clients idle between requests, then all hang up in one instant, or
    all send their next request: the tasks wake a batch per turn, and every
    request is still answered.
    """
    count = 100
    port = await start_server(nursery, heartbeat_interval=3600.0)
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(count)]
    for stream in streams:
        await stream.send_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
    await trio.sleep(PARK_AFTER + 2)  # the watchdog parks them
    assert connection_tasks() == 0  # parked: held without a task
    turns = Turns()
    trio.lowlevel.add_instrument(turns)
    try:
        if hang_up:
            for stream in streams:
                assert isinstance(stream, trio.SocketStream)
                stream.socket.close()  # no checkpoint: all gone before the server looks
            await trio.sleep(1)
        else:
            request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            for stream in streams:
                assert isinstance(stream, trio.SocketStream)
                os.write(stream.socket.fileno(), request)  # no checkpoint either
            for stream in streams:
                with trio.fail_after(60):
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
    finally:
        trio.lowlevel.remove_instrument(turns)
        for stream in streams:
            await trio.aclose_forcefully(stream)
    # A task per connection waiting for its socket would all run in one turn.
    assert turns.most <= count // 2, turns.most
    # The server still answers (nothing was left stuck).
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 404 ")
