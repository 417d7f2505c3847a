"""Every failure of a client PHTStream is both trio's and pht's."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

import pht
from pht._trio_common import ConflictDetector

from .support import echo, receive_exactly, start_server


async def test_refused_push_carries_its_status(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, echo, max_push_line=64)
    stream = await pht.open_pht_stream("127.0.0.1", port)
    with pytest.raises(pht.TunnelError) as caught:
        await stream.send_all(b"x" * 1000)
    assert isinstance(caught.value, trio.BrokenResourceError)
    assert caught.value.status == 413
    # Sending stays broken, and says why, the same way.
    with pytest.raises(pht.BrokenTunnelError) as again:
        await stream.send_all(b"more")
    assert again.value.status == 413
    await stream.aclose()


async def test_use_after_close_is_a_pht_misuse_and_trios_closed() -> None:
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery)
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        await stream.send_all(b"hi")
        assert await receive_exactly(stream, 2) == b"hi"
        await stream.aclose()
        await stream.aclose()  # idempotent
        for call in (stream.send_all(b"x"), stream.receive_some()):
            with pytest.raises(pht.LocalProtocolError) as caught:
                await call
            assert isinstance(caught.value, trio.ClosedResourceError)
        nursery.cancel_scope.cancel()


def test_conflict_detector_is_busy_only_inside() -> None:
    detector = ConflictDetector("another task is already sending on this stream")
    assert not detector.busy
    with detector:
        assert detector.busy
        with pytest.raises(pht.BusyTunnelError, match="already sending") as caught, detector:
            pass  # pragma: no cover - refused on entry
        assert isinstance(caught.value, trio.BusyResourceError)
        assert isinstance(caught.value, pht.LocalProtocolError)
        assert detector.busy  # the refused entry does not release the holder
    assert not detector.busy


async def test_two_senders_at_once_are_refused(nursery: trio.Nursery) -> None:
    hold = trio.Event()

    async def slow_reader(stream: pht.PHTStream) -> None:
        await hold.wait()  # the push is not consumed: its acknowledgement waits
        await echo(stream)

    port = await start_server(nursery, slow_reader)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    async with trio.open_nursery() as senders:
        senders.start_soon(stream.send_all, b"first")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(pht.BusyTunnelError):
            await stream.send_all(b"second")
        hold.set()
    assert await receive_exactly(stream, 5) == b"first"
    await stream.aclose()


@pytest.mark.parametrize("argument", [{"port": 0}, {"max_push_size": 0}, {"push_window": 0}])
async def test_bad_arguments_are_value_errors(argument: dict[str, int]) -> None:
    kwargs: dict[str, object] = {"port": 8080, **argument}
    with pytest.raises(ValueError, match="must be"):
        await pht.open_pht_stream("127.0.0.1", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", [{"port": "80"}, {"tls": "yes"}, {"connect_timeout": "5"}])
async def test_arguments_of_the_wrong_type_are_type_errors(argument: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"port": 8080, **argument}
    with pytest.raises(TypeError):
        await pht.open_pht_stream("127.0.0.1", **kwargs)  # type: ignore[arg-type]


async def test_proxy_with_tls_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="cannot carry phts"):
        await pht.open_pht_stream("127.0.0.1", 8443, tls=True, proxy="http://127.0.0.1:3128")


async def _scripted_legacy_server(stream: trio.SocketStream) -> None:
    """Answers authorize with Connection: close, the pull with one line, pushes with 200."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        if head.startswith(b"GET /authorize"):
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoken=t1"
            )
            return
        if head.startswith(b"GET /pull"):
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naGk=\n\r\n"
            )
            await trio.sleep_forever()
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(buffer) < length:
            buffer += await stream.receive_some(4096)
        buffer = buffer[length:]
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


async def test_pull_goes_on_a_new_connection_when_authorize_closed_its_own(
    nursery: trio.Nursery,
) -> None:
    serve = functools.partial(trio.serve_tcp, _scripted_legacy_server, 0, host="127.0.0.1")
    (listener,) = await nursery.start(serve)
    port = listener.socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
    assert stream.token == "t1"
    assert await stream.receive_some() == b"hi"
    await stream.aclose()
