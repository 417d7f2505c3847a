"""The trio client's resume extension over real loopback sockets.

Against a scripted resume server (``tests/resume_server.py``), through the
fault relay (``tests/faults.py``) that cuts connections at exact byte
offsets, and against GOST's server as captured (no grant: today's protocol).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

import pht

from .faults import Cut, FaultRelay
from .resume_server import ResumeServer, serve_resume
from .support import echo_through, receive_exactly, start_server
from .transcripts import wire_pieces


async def _read_to_the_end(stream: pht.PHTStream) -> None:
    while await stream.receive_some():
        pass


async def test_echo_without_cuts(nursery: trio.Nursery) -> None:
    server = ResumeServer()
    port = await serve_resume(nursery, server)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, resume=True)
    payload = os.urandom(300_000)
    with trio.fail_after(20):
        assert await echo_through(stream, payload) == payload
        await stream.aclose()
    (token,) = server.delivered
    assert bytes(server.delivered[token]) == payload
    opening = server.requests[0]
    assert opening[:2] == ("GET", "/pull")
    assert opening[2] == {b"pht-resume": b"1"}
    assert all(
        b"pht-offset" in pht_headers
        for method, _, pht_headers in server.requests
        if method == "POST"
    )
    assert token not in server.sessions  # the close notification ended it


@pytest.mark.parametrize(
    "cut",
    [
        Cut("down", 2000, "rst", kind="pull", anchor="body"),
        Cut("down", 70_000, "fin", kind="pull", anchor="body"),
        Cut("up", 5000, "rst", kind="push", anchor="body"),
        Cut("down", 0, "rst", kind="push", anchor="body"),  # the answer is lost
        Cut("up", 10, "fin", kind="push"),
    ],
    ids=str,
)
async def test_one_cut_is_survived(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, cut: Cut
) -> None:
    server = ResumeServer()
    port = await serve_resume(nursery, server)
    relay = FaultRelay(port, [cut], fin_linger=1.0)
    relay_port = await nursery.start(relay.serve)
    stream = await pht.open_pht_stream("127.0.0.1", relay_port, authorize=False, resume=True)
    payload = os.urandom(200_000)
    with trio.fail_after(60):
        got = await echo_through(stream, payload, piece=50_000)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), relay.describe()
    assert relay.faults, relay.describe()
    await stream.aclose()


async def test_session_gone_is_a_named_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = ResumeServer()
    port = await serve_resume(nursery, server)
    relay = FaultRelay(port, [Cut("down", 100, "rst", kind="pull", anchor="body")])
    relay_port = await nursery.start(relay.serve)
    stream = await pht.open_pht_stream("127.0.0.1", relay_port, authorize=False, resume=True)
    await stream.send_all(b"x" * 50)
    assert await receive_exactly(stream, 50) == b"x" * 50
    (token,) = server.sessions
    server._end(token, pht.GoneReason.EXPIRED)  # as if the grace period ran out
    with trio.fail_after(30), pytest.raises(pht.SessionGone) as caught:
        await stream.send_all(b"y" * 100)
    assert isinstance(caught.value, trio.BrokenResourceError)
    assert caught.value.reason is pht.GoneReason.EXPIRED
    assert caught.value.status == 410
    assert "grace period" in str(caught.value)
    with trio.fail_after(30), pytest.raises(pht.SessionGone) as caught:
        await _read_to_the_end(stream)  # the pull is cut: re-attaching finds it gone
    assert isinstance(caught.value, trio.BrokenResourceError)
    await stream.aclose()


# -- GOST's server does not grant: today's protocol ------------------------------------


class ReplayedGost:
    """GOST's modern server as captured (``modern_go_client_wire.txt``), echoing pushes.

    Its answers are the captured bytes: the pull's head, the pushes'
    acknowledgements, each pushed line sent back as one chunk of the pull, a
    heartbeat after the first, and the last chunk after the close
    notification. It ignores the ``PHT-*`` headers, as GOST does.
    """

    def __init__(self, *, cut_pull_after_first: bool = False) -> None:
        pieces = wire_pieces("modern_go_client_wire.txt")
        answers = [p.data for p in pieces if p.direction == "S>C"]
        self.pull_head, self.ack, self.heartbeat, self.last = (
            answers[0],
            answers[1],
            answers[3],
            answers[-1],
        )
        self.cut_pull_after_first = cut_pull_after_first
        self.heads: list[bytes] = []
        self.pull: trio.SocketStream | None = None
        self.lines = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                if head.startswith(b"GET "):
                    self.pull = stream
                    await stream.send_all(self.pull_head)
                    continue
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer[:length], buffer[length:]
                await stream.send_all(self.ack)
                await self._to_pull(body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client hung up, or this is the pull connection the test cut

    async def _to_pull(self, body: bytes) -> None:
        assert self.pull is not None
        if not body:  # the close notification ends the session
            await self.pull.send_all(self.last)
            return
        await self.pull.send_all(b"%x\r\n%s\r\n" % (len(body), body))
        self.lines += 1
        if self.lines == 1:
            await self.pull.send_all(self.heartbeat)
            if self.cut_pull_after_first:
                await trio.aclose_forcefully(self.pull)


async def test_gost_does_not_grant_and_sees_todays_traffic(nursery: trio.Nursery) -> None:
    gost = ReplayedGost()
    listeners = await nursery.start(trio.serve_tcp, gost, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, resume=True)
    with trio.fail_after(10):
        await stream.send_all(b"hello\n")
        assert await receive_exactly(stream, 6) == b"hello\n"
        await stream.send_all(b"again\n")
        assert await receive_exactly(stream, 6) == b"again\n"
        await stream.aclose()
    opening, *later = gost.heads
    assert opening.startswith(b"GET /pull?token=")
    assert b"\r\nPHT-Resume: 1" in opening  # the only difference: an ignored header
    assert [head.split(b" ")[0] for head in later] == [b"POST"] * 3
    assert not any(b"pht-" in head.lower() for head in later)


async def test_without_a_grant_a_cut_pull_is_never_re_opened(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    gost = ReplayedGost(cut_pull_after_first=True)
    listeners = await nursery.start(trio.serve_tcp, gost, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, resume=True)
    await stream.send_all(b"hello\n")
    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError, match="pull"):
        await _read_to_the_end(stream)
    await stream.aclose()
    assert sum(head.startswith(b"GET ") for head in gost.heads) == 1


# -- push_window > 1: writes return early, a waiting receive settles their pushes ----------


async def test_a_lost_push_of_a_returned_write_is_pushed_again_by_the_receive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The write returned before its push was cut; the reader waiting for the reply
    notices the cut, and pushes the bytes again: nobody writes any more."""
    server = ResumeServer()
    port = await serve_resume(nursery, server)
    relay = FaultRelay(port, [Cut("up", 60, "rst", kind="push")])
    relay_port = await nursery.start(relay.serve)
    stream = await pht.open_pht_stream(
        "127.0.0.1", relay_port, authorize=False, resume=True, push_window=4
    )
    await stream.send_all(b"hello")  # returns with the push in flight
    with trio.fail_after(30):
        assert await receive_exactly(stream, 5) == b"hello"
    assert relay.faults, relay.describe()
    await stream.aclose()


async def test_a_refused_push_of_a_returned_write_wakes_the_receive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_server(nursery, push_path="/elsewhere", resume=True)
    stream = await pht.open_pht_stream(
        "127.0.0.1", port, authorize=False, resume=True, push_window=4
    )
    await stream.send_all(b"hello")
    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError, match="paths match"):
        await stream.receive_some()
    with pytest.raises(trio.BrokenResourceError, match="paths match"):
        await stream.send_all(b"more")
    await stream.aclose()
