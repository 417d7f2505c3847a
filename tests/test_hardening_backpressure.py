"""Back-pressure in both directions, and memory that stays flat while a side stalls.

The figures (bytes held, traced memory) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import socket
import tracemalloc
from typing import Any

import pytest
import trio
import trio.testing

import pht

from .test_hardening_support import (
    GUARD,
    RawClient,
    pull_request,
    push_request,
    start_server,
)

MiB = 1024 * 1024


def held_inbound(stream: Any) -> int:
    """Bytes pushed into a server-side stream and not yet taken by its handler."""
    return sum(len(piece) for piece in stream._inbound or ()) - int(stream._inbound_offset)


def held_outbound(stream: Any) -> int:
    """Bytes a handler wrote that the pull has not taken yet."""
    return len(stream._outbound)


async def test_stalled_handler_blocks_the_pusher_then_410(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    streams: list[pht.PHTStream] = []

    async def stalled(stream: pht.PHTStream) -> None:
        streams.append(stream)
        await trio.sleep_forever()  # never reads

    push_size = 256 * 1024
    port = await start_server(nursery, stalled, push_timeout=30.0, max_buffered=push_size)
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=False, max_push_size=push_size)
    payload = bytes(64 * MiB)
    peak_held = 0
    sending = True

    async def watch() -> None:
        nonlocal peak_held
        while sending:
            if streams:
                peak_held = max(peak_held, held_inbound(streams[0]))
            await trio.sleep(1)

    nursery.start_soon(watch)
    tracemalloc.start()
    try:
        start = trio.current_time()
        with trio.fail_after(300), pytest.raises(trio.BrokenResourceError, match="410"):
            await client.send_all(payload)
        blocked_for = trio.current_time() - start
        # Further attempts fail at once; nothing more is queued on the server.
        for _ in range(255):
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(payload[:push_size])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sending = False
    print(
        f"\nstalled handler: send_all blocked {blocked_for:.0f} s (mock), peak bytes queued "
        f"server-side {peak_held}, traced peak {peak / MiB:.1f} MiB for 64 MiB x 256 attempts"
    )
    assert blocked_for >= 30.0  # the push was not acknowledged before push_timeout
    assert 0 < peak_held <= push_size
    assert peak < 8 * MiB
    await client.aclose()


async def test_concurrent_pushes_to_a_stalled_session_stay_bounded(
    nursery: trio.Nursery,
) -> None:
    streams: list[pht.PHTStream] = []

    async def stalled(stream: pht.PHTStream) -> None:
        streams.append(stream)
        await trio.sleep_forever()

    max_buffered = 256 * 1024
    port = await start_server(
        nursery, stalled, push_timeout=3600.0, max_buffered=max_buffered, max_push_line=2 * MiB
    )
    token = "concurrent-pushes-token-01"
    request = push_request(token, pht.encode_line(bytes(MiB)))
    clients = [await RawClient.connect(port) for _ in range(64)]
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as senders:
            for client in clients:
                senders.start_soon(client.send, request)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    held = held_inbound(streams[0])
    print(f"\n64 concurrent 1 MiB pushes to one stalled session: {held / MiB:.1f} MiB queued")
    # Pushes of one session take turns: one push is queued, the others wait.
    for client in clients:
        await client.aclose()
    assert held <= max_buffered + MiB


async def test_pull_client_that_stops_reading_slows_the_handler(nursery: trio.Nursery) -> None:
    """A pull whose client never reads: send_all blocks, memory stays flat."""
    max_buffered = MiB
    chunk = bytes(MiB)
    goal = 256 * MiB
    accepted = 0
    outcome: list[str] = []
    streams: list[pht.PHTStream] = []
    started, ended = trio.Event(), trio.Event()

    async def sender(stream: pht.PHTStream) -> None:
        nonlocal accepted
        streams.append(stream)
        started.set()
        try:
            with trio.fail_after(GUARD):
                while accepted < goal:  # bounded: 256 writes of 1 MiB at most
                    await stream.send_all(chunk)
                    accepted += len(chunk)
            outcome.append("sent everything")
        except trio.BrokenResourceError:
            outcome.append("broken")
        except trio.TooSlowError:
            outcome.append("guard")
        finally:
            ended.set()

    port = await start_server(nursery, sender, max_buffered=max_buffered)
    raw = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await raw.connect(("127.0.0.1", port))
    await raw.send(pull_request("stalled-pull-token-0001"))  # and never recv()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        with trio.fail_after(GUARD):
            await started.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    queued = held_outbound(streams[0])
    print(
        f"\nstalled pull: handler's send_all blocked after {accepted / MiB:.0f} MiB of "
        f"{goal / MiB:.0f} MiB; {queued / MiB:.2f} MiB queued in the stream; traced memory "
        f"+{(now - base) / MiB:.1f} MiB now, peak +{(peak - base) / MiB:.1f} MiB"
    )
    assert not outcome  # still blocked in send_all, neither done nor broken
    assert queued <= max_buffered
    # max_buffered, one 1 MiB pull write in flight and the socket buffers
    # (Linux grows a send buffer up to tcp_wmem's 4 MiB): far below 256 MiB.
    assert accepted <= max_buffered + 8 * MiB
    assert peak - base <= 16 * MiB
    raw.close()  # the client goes away: the handler's send_all breaks
    with trio.fail_after(GUARD):
        await ended.wait()
    assert outcome == ["broken"]


async def test_bytes_of_a_push_refused_with_410_are_not_delivered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """At most once: what the client was told failed must not reach the handler later."""
    got: list[bytes | bytearray] = []
    start_reading = trio.Event()
    done = trio.Event()

    async def late_reader(stream: pht.PHTStream) -> None:
        await start_reading.wait()  # busy elsewhere until the push timed out
        while data := await stream.receive_some():
            got.append(data)
        done.set()

    port = await start_server(nursery, late_reader, push_timeout=30.0)
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    with pytest.raises(trio.BrokenResourceError, match="410"):
        await client.send_all(b"the client was told this failed")
    start_reading.set()
    with trio.fail_after(60):  # mock time
        await done.wait()
    await client.aclose()
    assert got == []
