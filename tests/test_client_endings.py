"""How a client tunnel ends: a clean end is EOF, an end with data lost is an error.

And the messages fit the situation: a push refused after the session ended
says so, instead of suggesting mismatched paths (issue 9).
"""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

import pht

from .support import receive_exactly, start_server
from .test_client_idle import ScriptedServer, _scripted


class CuttingRelay:
    """A TCP relay to ``backend`` whose connections the test can cut (both ways)."""

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.scopes: list[trio.CancelScope] = []

    async def _pipe(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.backend)

        async def copy(source: trio.SocketStream, target: trio.SocketStream) -> None:
            try:
                while data := await source.receive_some(65536):
                    await target.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        with trio.CancelScope() as scope:
            self.scopes.append(scope)
            async with trio.open_nursery() as inner:
                inner.start_soon(copy, client, server)
                inner.start_soon(copy, server, client)
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(client)

    async def start(self, nursery: trio.Nursery) -> int:
        serve = functools.partial(trio.serve_tcp, self._pipe, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port: int = listeners[0].socket.getsockname()[1]
        return port


async def test_a_refused_push_makes_the_end_of_the_session_an_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """410: the server dropped the pushed data and ended the session; that is no EOF."""
    stalled = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        await stalled.wait()  # never reads

    port = await start_server(nursery, handler, push_timeout=30.0)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    with pytest.raises(trio.BrokenResourceError, match="410"):
        await stream.send_all(b"nobody reads this")
    with trio.fail_after(60), pytest.raises(trio.BrokenResourceError) as caught:
        await stream.receive_some()
    assert "ended after a push failed" in str(caught.value)
    assert "410" in str(caught.value)
    with pytest.raises(trio.BrokenResourceError):  # and it stays an error
        await stream.receive_some()
    stalled.set()
    await stream.aclose()


async def test_a_clean_end_by_the_server_is_still_eof(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(stream: pht.PHTStream) -> None:
        assert await receive_exactly(stream, 5) == b"hello"
        await stream.send_all(b"bye")
        await stream.aclose()

    port = await start_server(nursery, handler)
    for authorize in (True, False):
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
        await stream.send_all(b"hello")
        with trio.fail_after(60):
            assert await receive_exactly(stream, 3) == b"bye"
            assert await stream.receive_some() == b""
        await stream.aclose()


@pytest.mark.parametrize(("status", "eof"), [(403, True), (410, False)])
async def test_a_re_poll_refused_with_410_is_no_eof(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, status: int, eof: bool
) -> None:
    """A legacy server forgets a closed session (403 on the re-poll: EOF); 410 is data lost."""
    server = ScriptedServer(idle_close=3600.0, reset=False, legacy_pull=True, repoll_status=status)
    port = await _scripted(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
    with trio.fail_after(60):
        if eof:
            assert await stream.receive_some() == b""
        else:
            with pytest.raises(trio.BrokenResourceError, match="410"):
                await stream.receive_some()
    await stream.aclose()


async def test_a_push_after_a_cut_pull_says_the_session_ended(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    backend = await start_server(nursery)
    relay = CuttingRelay(backend)
    port = await relay.start(nursery)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await stream.send_all(b"ping")
    with trio.fail_after(30):
        assert await receive_exactly(stream, 4) == b"ping"
    relay.scopes[0].cancel()  # the first connection carries the pull
    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError, match="pull"):
        await stream.receive_some()

    async def keep_sending() -> None:
        for _ in range(100):  # bounded: the server forgets the session at once
            await stream.send_all(b"anyone?")
            await trio.sleep(0.05)

    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError) as caught:
        await keep_sending()
    message = str(caught.value)
    assert "403" in message
    assert "paths match" not in message
    assert "no longer knows this session; it ended (its pull failed" in message
    await stream.aclose()


async def test_a_re_poll_that_cannot_connect_is_a_broken_stream(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The stream contract: receive_some fails with trio.BrokenResourceError, not TunnelError."""
    server = ScriptedServer(idle_close=1.0, reset=False, legacy_pull=True)
    async with trio.open_nursery() as serving:
        port = await _scripted(serving, server)
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
        await trio.sleep(10)  # the first pull ends (heartbeat), its connection closes
        serving.cancel_scope.cancel()  # and the server goes away
    with trio.fail_after(60), pytest.raises(trio.BrokenResourceError) as caught:
        await stream.receive_some()
    assert isinstance(caught.value.__cause__, pht.TunnelError)
    assert "could not be polled again" not in str(caught.value)
    assert "cannot connect" in str(caught.value)
    await stream.aclose()


async def test_a_cut_pull_says_closed_by_the_server_and_when(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = ScriptedServer(idle_close=3600.0, reset=False, cut_pull_after=75.0)
    port = await _scripted(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    with trio.fail_after(600), pytest.raises(trio.BrokenResourceError) as caught:
        await stream.receive_some()
    message = str(caught.value)
    assert "the server closed the connection in the middle of its answer to the pull" in message
    assert "(75 s after the server last sent anything)" in message
    assert "malformed" not in message
    await stream.aclose()
