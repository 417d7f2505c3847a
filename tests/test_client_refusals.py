"""A refused push of an earlier write is reported at once (issue 11).

With ``push_window > 1`` a write returns before its pushes are answered. A
refusal of one of them (a wrong ``push_path``, a ``410``) must reach the
application without waiting for another write: a receive that waits for the
server's reply is woken with it, and the next send or receive raises it.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import pht
from pht._client import ClientConfig
from pht._client_session import ClientOptions, ClientSession
from pht._events import PullStarted, PushAcknowledged, Rejected, RequestKind

from .support import receive_exactly, start_server
from .test_client_fastpath_pipeline import FakeServer


async def _mismatched(nursery: trio.Nursery, push_window: int) -> pht.PHTStream:
    """A tunnel whose pushes go to a path the server does not know (404)."""
    port = await start_server(nursery, push_path="/elsewhere")
    return await pht.open_pht_stream("127.0.0.1", port, authorize=False, push_window=push_window)


async def test_a_waiting_receive_is_woken_by_the_refusal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    stream = await _mismatched(nursery, push_window=4)
    woken: list[BaseException] = []

    async def wait_for_reply() -> None:
        try:
            await stream.receive_some()
        except trio.BrokenResourceError as exc:
            woken.append(exc)

    async with trio.open_nursery() as inner:
        inner.start_soon(wait_for_reply)
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")  # returns before the answer
        with trio.fail_after(1):  # virtual seconds: no other write comes
            while not woken:
                await trio.sleep(0.01)
    (error,) = woken
    assert isinstance(error, pht.TunnelError)
    assert error.status == 404
    assert "earlier push was refused" in str(error)
    assert "paths match" in str(error)
    with pytest.raises(trio.BrokenResourceError, match="paths match"):
        await stream.send_all(b"more")
    with pytest.raises(trio.BrokenResourceError, match="paths match"):
        await stream.receive_some()
    await stream.aclose()


async def test_the_next_receive_raises_the_refusal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """No receive was waiting: the next one reads the answer and raises it."""
    stream = await _mismatched(nursery, push_window=4)
    await stream.send_all(b"hello")
    with trio.fail_after(1), pytest.raises(trio.BrokenResourceError) as caught:
        await stream.receive_some()
    assert "paths match" in str(caught.value)
    assert isinstance(caught.value, pht.TunnelError)
    assert caught.value.status == 404
    await stream.aclose()


async def test_a_refusal_read_by_a_receive_breaks_the_next_send(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = FakeServer([200, 410])
    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, push_window=3)
    await stream.send_all(b"one")
    await stream.send_all(b"two")
    with trio.fail_after(1), pytest.raises(trio.BrokenResourceError, match="410"):
        await stream.receive_some()
    with pytest.raises(trio.BrokenResourceError, match=r"earlier push was refused.*410"):
        await stream.send_all(b"three")
    assert server.pushes == [pht.encode_line(b"one"), pht.encode_line(b"two")]
    await stream.aclose()


async def test_acknowledged_pushes_leave_the_receive_waiting_for_data(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The watch over the push answers changes nothing when they are acknowledged."""
    port = await start_server(nursery)  # echo
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, push_window=4)
    got = bytearray()

    async def read(size: int) -> None:
        got.extend(await receive_exactly(stream, size))

    async with trio.open_nursery() as inner:
        inner.start_soon(read, 3 * 1000)
        await trio.testing.wait_all_tasks_blocked()
        for piece in (b"a" * 1000, b"b" * 1000, b"c" * 1000):
            await stream.send_all(piece)
    assert bytes(got) == b"a" * 1000 + b"b" * 1000 + b"c" * 1000
    await stream.aclose()


async def test_stop_and_wait_reports_the_refusal_from_the_write(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    stream = await _mismatched(nursery, push_window=1)
    with pytest.raises(trio.BrokenResourceError, match=r"^server answered 404.*paths match"):
        await stream.send_all(b"hello")
    await stream.aclose()


# -- the sans-IO rule --------------------------------------------------------------


def _session(push_window: int) -> ClientSession:
    options = ClientOptions(
        config=ClientConfig.build("h", authorize=False), token="t", push_window=push_window
    )
    session = ClientSession(options)
    session.start()
    session.pull_event(PullStarted())
    return session


def test_receives_watch_answers_only_of_writes_that_returned_early() -> None:
    assert not _session(1).watch_answers(2)  # a write waits for its own answers
    windowed = _session(4)
    assert windowed.watch_answers(1)
    assert not windowed.watch_answers(0)


def test_only_an_earlier_writes_refusal_is_kept_for_the_receive() -> None:
    refusal = Rejected(kind=RequestKind.PUSH, status_code=404, reason="Not Found")
    session = _session(4)
    session.pushed(5)
    with pytest.raises(pht.TunnelError):  # refused during its own write
        session.push_answer(refusal, closed=True, still_in_flight=0)
    assert session.refused is None
    session = _session(4)
    session.pushed(5)
    session.pushed(5)
    session.write_returned(2)
    session.push_answer(PushAcknowledged(), closed=False, still_in_flight=1)
    with pytest.raises(pht.TunnelError) as caught:
        session.push_answer(refusal, closed=True, still_in_flight=0)
    assert session.refused is not None
    assert session.refused.status == 404
    assert str(session.refused) == str(caught.value)
    assert session.send_error is not None
