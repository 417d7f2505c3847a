"""Session reaping under a mock clock: nothing here sleeps for real.

Tokens authorized but never used, idle sessions and sessions whose pull
connection vanished all end, and their handlers see EOF.
"""

from __future__ import annotations

import trio
import trio.testing

import pht

from .test_hardening_support import (
    RawClient,
    exchange,
    pull_request,
    push_request,
    start_server,
)

HELLO = b"aGVsbG8=\n"  # base64("hello") and its newline


async def authorize(port: int) -> str:
    answer, _ = await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 200
    return answer.body.decode().removeprefix("token=")


async def test_unused_authorized_tokens_expire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_server(nursery, issued_timeout=60.0, backlog=2)
    used_in_time = await authorize(port)
    never_used = await authorize(port)
    assert (await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"))[0].status == 429
    await trio.sleep(30)
    answer, _ = await exchange(port, push_request(used_in_time, HELLO))
    assert answer.status == 200
    await trio.sleep(45)  # 75 s after issue: past issued_timeout (and a reaper round)
    answer, _ = await exchange(port, push_request(never_used, HELLO))
    assert answer.status == 403  # expired, and not resurrected as a modern token
    answer, _ = await exchange(port, pull_request(never_used))
    assert answer.status == 403
    # The expired token no longer counts against the backlog.
    assert len(await authorize(port)) >= 26


async def test_idle_session_expires_and_its_handler_sees_eof(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[tuple[bytes | bytearray, float]] = []
    done = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        seen.append((await stream.receive_some(), trio.current_time()))
        seen.append((await stream.receive_some(), trio.current_time()))
        done.set()

    port = await start_server(
        nursery, handler, idle_timeout=600.0, lazy_timeout=10.0, heartbeat_interval=10.0
    )
    # A session a client made itself: a push, no pull ever attached, never
    # closed. No sign of life: it goes after lazy_timeout, not idle_timeout.
    answer, _ = await exchange(port, push_request("idle-session-token-0001", HELLO))
    assert answer.status == 200
    with trio.fail_after(3600):  # mock time
        await done.wait()
    assert seen[0][0] == b"hello"
    assert seen[1][0] == b""  # EOF: the session expired
    idle_for = seen[1][1] - seen[0][1]
    assert 10.0 <= idle_for <= 20.0
    answer, _ = await exchange(port, push_request("idle-session-token-0001", HELLO))
    assert answer.status == 403


async def test_session_with_a_pull_attached_does_not_expire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    eof_at: list[float] = []
    ended = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        assert await stream.receive_some() == b""
        eof_at.append(trio.current_time())
        ended.set()

    port = await start_server(nursery, handler, idle_timeout=60.0, heartbeat_interval=10.0)
    client = await RawClient.connect(port)
    await client.send(pull_request("pulling-session-token-01"))
    assert (await client.head()).status == 200
    start = trio.current_time()
    for _ in range(30):  # 300 s of heartbeats, five idle timeouts
        assert await client.chunk() == b"\n"
    assert not eof_at
    assert trio.current_time() - start >= 300
    await client.aclose()
    with trio.fail_after(5):
        await ended.wait()


async def test_vanished_pull_ends_the_session_promptly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    got: list[bytes | bytearray] = []
    eof = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        got.append(await stream.receive_some())
        got.append(await stream.receive_some())
        eof.set()

    port = await start_server(nursery, handler, heartbeat_interval=10.0, idle_timeout=600.0)
    token = "vanishing-pull-token-0001"
    client = await RawClient.connect(port)
    await client.send(pull_request(token))
    assert (await client.head()).status == 200
    assert (await exchange(port, push_request(token, HELLO)))[0].status == 200
    closed_at = trio.current_time()
    await client.aclose()  # the pull connection goes away, no FIN handshake awaited
    with trio.fail_after(600):  # mock time; the assertion below is what matters
        await eof.wait()
    assert got == [b"hello", b""]
    # Noticed before the first heartbeat would have been due (GOST: ~4 heartbeats).
    assert trio.current_time() - closed_at < 10.0
    answer, _ = await exchange(port, push_request(token, HELLO))
    assert answer.status == 403
