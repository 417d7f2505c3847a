"""The grace period of serve_pht end to end, on loopback sockets, under trio's MockClock.

A resume session whose pull is cut waits ``grace_period`` for its client:
its handler sees a pause, not the end; a pull that re-attaches in time gets
the replay; once the period ran out, the handler sees EOF and the token gets
``410`` with ``PHT-Gone: expired``.
"""

from __future__ import annotations

import base64

import trio
import trio.testing

import pht

from .support import start_server

GRACE = 5


async def request(port: int, raw: bytes) -> tuple[trio.SocketStream, bytes]:
    """Send ``raw``; the connection and the answer's head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(raw)
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    return stream, head


def pull(token: str, ack: int | None = None) -> bytes:
    lines = [f"GET /pull?token={token} HTTP/1.1", "Host: x", "PHT-Resume: 1"]
    if ack is not None:
        lines.append(f"PHT-Ack: {ack}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def push(token: str, data: bytes, offset: int) -> bytes:
    body = base64.b64encode(data) + b"\n"
    head = (
        f"POST /push?token={token} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"PHT-Resume: 1\r\nPHT-Offset: {offset}\r\nPHT-Ack: 0\r\n\r\n"
    )
    return head.encode() + body


async def test_a_cut_pull_waits_for_its_grace_period_then_the_session_expires(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    received: list[bytes] = []
    ended = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        while data := await stream.receive_some():
            received.append(bytes(data))
        ended.set()

    port = await start_server(nursery, handler, grace_period=GRACE)
    token = "g" * 22
    first, head = await request(port, pull(token))
    assert b"PHT-Resume: 1; window=4194304; grace=5\r\n" in head
    pusher, answer = await request(port, push(token, b"hello", 0))
    await pusher.aclose()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"PHT-Received: 5\r\n" in answer
    await first.aclose()  # the pull is cut
    await trio.sleep(GRACE - 1)
    assert not ended.is_set()  # a pause, not the end
    again, head = await request(port, pull(token, ack=0))  # back in time
    assert b"PHT-Offset: 0\r\n" in head
    await again.aclose()  # cut again: a new grace period
    await trio.sleep(GRACE + 2)
    assert ended.is_set()  # ran out: the handler saw EOF
    assert received == [b"hello"]
    late, head = await request(port, pull(token, ack=0))
    assert head.startswith(b"HTTP/1.1 410 Gone\r\n")
    assert b"PHT-Gone: expired\r\n" in head
    await late.aclose()
