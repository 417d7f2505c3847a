"""Graceful shutdown of serve_pht: stop accepting, let sessions finish, cut the rest.

On trio's MockClock (pytest-trio's ``autojump_clock``): the grace period and
every wait pass in virtual time, as soon as nothing else can run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

import pht


async def test_graceful_shutdown(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    stop = trio.Event()
    reports: list[pht.ShutdownReport] = []
    handler_saw: dict[str, bytes | bytearray] = {}

    async def handler(stream: pht.PHTStream) -> None:
        first: bytes | bytearray = await stream.receive_some()
        if first == b"quick":
            await stream.send_all(b"done")
            await stream.aclose()
            return
        # A long-lived session: reads until the server cuts it (EOF).
        while data := await stream.receive_some():
            first += data
        handler_saw[stream.token] = first

    listeners = await nursery.start(
        lambda task_status: _serve(handler, stop, reports, task_status)
    )
    port = listeners[0].socket.getsockname()[1]
    quick = await pht.open_pht_stream("127.0.0.1", port)
    slow = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await slow.send_all(b"slow")
    stop.set()
    # Running sessions go on during the grace period...
    await quick.send_all(b"quick")
    assert await quick.receive_some() == b"done"
    # ...but nothing new is accepted: the listener is closed.
    with pytest.raises(pht.TunnelError, match="cannot connect"):
        await pht.open_pht_stream("127.0.0.1", port)
    with trio.fail_after(60):
        assert await slow.receive_some() == b""  # cut at the deadline: EOF
        while not reports:
            await trio.sleep(0.01)
    assert trio.current_time() >= 30.0  # not before the grace period ended
    (report,) = reports
    assert report.finished == 1
    assert len(report.cut) == 1
    assert slow.token.startswith(report.cut[0].rstrip("…"))
    assert handler_saw[slow.token] == b"slow"
    await quick.aclose()
    await slow.aclose()


async def _serve(
    handler: Callable[[pht.PHTStream], Awaitable[object]],
    stop: trio.Event,
    reports: list[pht.ShutdownReport],
    task_status: trio.TaskStatus[Any],
) -> None:
    report = await pht.serve_pht(
        handler,
        0,
        host="127.0.0.1",
        shutdown=stop,
        shutdown_timeout=30.0,
        task_status=task_status,
    )
    reports.append(report)


async def test_draining_server_refuses_new_sessions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    stop = trio.Event()
    reports: list[pht.ShutdownReport] = []
    hold = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        await hold.wait()

    listeners = await nursery.start(
        lambda task_status: _serve(handler, stop, reports, task_status)
    )
    port = listeners[0].socket.getsockname()[1]
    keeper = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    # A second connection opened before the shutdown, kept for a late request.
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    stop.set()
    await trio.testing.wait_all_tasks_blocked()  # the server has begun to drain
    await raw.send_all(b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await raw.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 503 ")
    await raw.send_all(b"GET /pull?token=brand-new-token-x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await raw.receive_some(4096)).startswith(b"HTTP/1.1 503 ")
    hold.set()
    with trio.fail_after(60):
        while not reports:
            await trio.sleep(0.01)
    assert reports[0].cut == ()
    await raw.aclose()
    await keeper.aclose()
