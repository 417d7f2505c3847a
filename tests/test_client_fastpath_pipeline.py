"""Pipelined pushes: the sans-IO window and ``open_pht_stream(push_window=N)``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import pht

from .support import cut

TOKEN = "0jlvkbo4h2ijdbnmiu20"
ACK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def drain(channel: pht.ClientChannel) -> list[object]:
    result: list[object] = []
    while (event := channel.next_event()) is not pht.NEED_DATA:
        result.append(event)
    return result


# -- the sans-IO channel --------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=10),
    window=st.integers(1, 5),
    request_cuts=st.lists(st.integers(1, 900), min_size=1, max_size=5),
    answer_cuts=st.lists(st.integers(1, 90), min_size=1, max_size=5),
    unusual=st.sets(st.integers(0, 9), max_size=3),
)
def test_pipelined_pushes_through_the_server_core(
    writes: list[bytes],
    window: int,
    request_cuts: list[int],
    answer_cuts: list[int],
    unusual: set[int],
) -> None:
    """Up to ``window`` pushes in flight; the server core answers them in order."""
    client = pht.ClientChannel(pht.ClientConfig.build("h"), push_window=window)
    server = pht.ServerConnection()
    received: list[bytes] = []
    acknowledged = 0
    pending = list(enumerate(writes))
    while pending or client.pushes_in_flight:
        requests = b""
        while pending and client.pushes_in_flight < window:
            _, data = pending.pop(0)
            requests += b"".join(client.push(TOKEN, data))
            assert client.state is pht.ChannelState.PUSHING
        assert client.pushes_in_flight <= window
        if pending:
            with pytest.raises(pht.LocalProtocolError):
                client.push(TOKEN, b"over the window")
        answers = b""
        for piece in cut(requests, request_cuts):
            server.receive_data(piece)
            while isinstance(event := server.next_event(), pht.PushRequest):
                received.append(event.data)
                answer = server.send_push_ack()
                if (len(received) - 1) in unusual:  # an answer only h11 takes
                    assert answer.startswith(b"HTTP/1.1 200 ")
                    answer = answer.replace(
                        b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nA:\x01\r\n"
                    )
                answers += answer
        for piece in cut(answers, answer_cuts):
            client.receive_data(piece)
            events = drain(client)
            assert all(event == pht.PushAcknowledged() for event in events)
            acknowledged += len(events)
    assert received == writes
    assert acknowledged == len(writes)
    assert client.state is pht.ChannelState.IDLE


def test_rejection_in_a_pipeline_closes_the_channel() -> None:
    client = pht.ClientChannel(pht.ClientConfig.build("h"), push_window=3)
    for data in (b"a", b"b", b"c"):
        client.push(TOKEN, data)
    assert client.pushes_in_flight == 3
    client.receive_data(ACK + b"HTTP/1.1 410 Gone\r\nContent-Length: 0\r\n\r\n")
    assert drain(client) == [
        pht.PushAcknowledged(),
        pht.Rejected(kind=pht.RequestKind.PUSH, status_code=410, reason="Gone"),
    ]
    assert client.state is pht.ChannelState.CLOSED


def test_push_window_is_validated() -> None:
    with pytest.raises(ValueError, match="push_window"):
        pht.ClientChannel(pht.ClientConfig.build("h"), push_window=0)


# -- the trio adapter ------------------------------------------------------------


async def start_server(
    nursery: trio.Nursery, handler: Callable[[pht.PHTStream], Awaitable[object]]
) -> int:
    listeners = await nursery.start(
        lambda task_status: pht.serve_pht(handler, 0, host="127.0.0.1", task_status=task_status)
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize("window", [1, 2, 4, 8])
async def test_windowed_upload_arrives_intact_and_in_order(
    nursery: trio.Nursery, window: int
) -> None:
    writes = [os.urandom(size) for size in (1, 100, 70_000, 5, 300_000, 1, 65_536, 2_000_000, 3)]
    expected = b"".join(writes)
    done = trio.Event()
    got = bytearray()

    async def sink(stream: pht.PHTStream) -> None:
        while len(got) < len(expected):
            data = await stream.receive_some()
            if not data:
                break
            got.extend(data)
        done.set()

    port = await start_server(nursery, sink)
    stream = await pht.open_pht_stream(
        "127.0.0.1", port, authorize=False, push_window=window, max_push_size=64 * 1024
    )
    for data in writes:
        await stream.send_all(data)
    await stream.aclose()  # collects what is still unacknowledged
    with trio.fail_after(10):
        await done.wait()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()


class FakeServer:
    """A PHT server that answers pushes from a script: a status, or None (never)."""

    def __init__(self, answers: list[int | None]) -> None:
        self.answers = answers
        self.pushes: list[bytes] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except trio.BrokenResourceError:  # the client closes forcefully
            pass

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request) and event.method == b"GET":
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\n\r\n"
                )
                await trio.sleep_forever()
            if isinstance(event, h11.Data):
                self.pushes.append(event.data)
            if isinstance(event, h11.EndOfMessage):
                status = self.answers.pop(0) if self.answers else 200
                if status is None:
                    await trio.sleep_forever()
                await stream.send_all(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)
                conn.send(h11.Response(status_code=status, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()


async def open_fake(
    nursery: trio.Nursery, answers: list[int | None], close_timeout: float = 5.0
) -> tuple[FakeServer, pht.PHTStream]:
    server = FakeServer(answers)
    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream(
        "127.0.0.1", port, authorize=False, push_window=2, close_timeout=close_timeout
    )
    return server, stream


async def test_a_refused_push_surfaces_on_the_next_send_all(nursery: trio.Nursery) -> None:
    _, stream = await open_fake(nursery, [410])
    await stream.send_all(b"first")  # returns before its answer
    with pytest.raises(trio.BrokenResourceError, match=r"earlier push was refused.*410"):
        await stream.send_all(b"second")
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"third")
    await stream.aclose()


async def test_aclose_collects_a_refusal(nursery: trio.Nursery) -> None:
    server, stream = await open_fake(nursery, [200, 400])
    await stream.send_all(b"one")
    await stream.send_all(b"two")
    with pytest.raises(trio.BrokenResourceError, match=r"earlier push was refused.*400"):
        await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"three")
    assert server.pushes[:2] == [pht.encode_line(b"one"), pht.encode_line(b"two")]


async def test_aclose_waits_for_acknowledgements_up_to_close_timeout(
    nursery: trio.Nursery,
) -> None:
    server, stream = await open_fake(nursery, [200, 200], close_timeout=0.2)
    await stream.send_all(b"one")
    await stream.send_all(b"two")
    await stream.aclose()  # both answered: no error, and the close notification went out
    assert server.pushes == [pht.encode_line(b"one"), pht.encode_line(b"two")]
    _, silent = await open_fake(nursery, [None], close_timeout=0.2)
    await silent.send_all(b"never answered")
    with pytest.raises(trio.BrokenResourceError, match="timed out"):
        await silent.aclose()


async def test_window_one_keeps_stop_and_wait(nursery: trio.Nursery) -> None:
    server = FakeServer([410])
    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    with pytest.raises(trio.BrokenResourceError, match=r"^server answered 410"):
        await stream.send_all(b"refused at once")
    await stream.aclose()
