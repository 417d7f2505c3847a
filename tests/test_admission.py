"""Admission: one client address cannot lock the others out.

Real loopback sockets; 127.0.0.2 and 127.0.0.3 are other client addresses
than 127.0.0.1 (Linux routes all of 127.0.0.0/8 to the loopback interface).
The global limits are kept small so that, without per-address budgets, the
flooding address would take all of them.
"""

from __future__ import annotations

import base64
import itertools
import os
from typing import Any

import pytest
import trio
import trio.testing

import pht

from .support import echo
from .test_hardening_support import (
    GUARD,
    RawClient,
    Response,
    echo_round_trip,
    pull_request,
    push_request,
    start_server,
)

ATTACKER = "127.0.0.2"
PROXY = "127.0.0.3"
AUTHORIZE = b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"
HELLO = b"aGVsbG8=\n"  # base64("hello") and its newline
_numbers = itertools.count()


def junk_token() -> str:
    return f"junk-{os.getpid()}-{next(_numbers):06d}"


async def connect_from(address: str, port: int) -> RawClient:
    return RawClient(await trio.open_tcp_stream("127.0.0.1", port, local_address=address))


async def exchange_from(address: str, port: int, request: bytes) -> Response:
    client = await connect_from(address, port)
    try:
        await client.send(request)
        return await client.response()
    finally:
        await client.aclose()


class CountingEcho:
    """An echo handler that counts the sessions it was started for."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def __call__(self, stream: pht.PHTStream) -> None:
        self.tokens.append(stream.token)
        await echo(stream)


SMALL: dict[str, Any] = {
    "max_sessions": 12,
    "backlog": 6,
    "max_sessions_per_address": 4,
    "max_pending_per_address": 2,
}


@pytest.mark.parametrize("authorize", [False, True])
async def test_junk_pushes_from_one_address_leave_room_for_others(
    nursery: trio.Nursery, authorize: bool
) -> None:
    handler = CountingEcho()
    port = await start_server(nursery, handler, **SMALL)
    with trio.fail_after(GUARD):
        statuses = []
        for _ in range(20):  # empty pushes to random tokens, as fast as it can
            answer = await exchange_from(ATTACKER, port, push_request(junk_token(), b"\n"))
            statuses.append(answer.status)
        assert statuses[:4] == [200] * 4
        assert set(statuses[4:]) == {429}  # over the attacker's budget
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
        await echo_round_trip(stream)
        await stream.aclose()
    assert handler.tokens == [stream.token]  # no handler ran for the junk


async def test_held_pulls_from_one_address_leave_room_for_others(
    nursery: trio.Nursery,
) -> None:
    handler = CountingEcho()
    port = await start_server(nursery, handler, **SMALL)
    held = []
    with trio.fail_after(GUARD):
        for _ in range(4):
            client = await connect_from(ATTACKER, port)
            await client.send(pull_request(junk_token()))
            assert (await client.head()).status == 200
            held.append(client)
        refused = await exchange_from(ATTACKER, port, pull_request(junk_token()))
        assert refused.status == 429
        for authorize in (False, True):
            stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
            await echo_round_trip(stream)
            await stream.aclose()
        for client in held:
            await client.aclose()


@pytest.mark.parametrize("strict", [False, True])
async def test_authorize_flood_from_one_address_leaves_room_for_others(
    nursery: trio.Nursery, strict: bool
) -> None:
    handler = CountingEcho()
    port = await start_server(nursery, handler, strict=strict, **SMALL)
    with trio.fail_after(GUARD):
        client = await connect_from(ATTACKER, port)
        statuses = []
        for _ in range(10):
            await client.send(AUTHORIZE)
            statuses.append((await client.response()).status)
        await client.aclose()
        assert statuses == [200, 200] + [429] * 8
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
        await echo_round_trip(stream)
        await stream.aclose()
    assert handler.tokens == [stream.token]


async def test_connections_per_address_are_bounded(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, max_connections_per_address=3)
    with trio.fail_after(GUARD):
        clients = [await connect_from(ATTACKER, port) for _ in range(3)]
        extra = await connect_from(ATTACKER, port)
        assert await extra.is_closed()  # closed at once, nothing read
        stream = await pht.open_pht_stream("127.0.0.1", port)
        await echo_round_trip(stream)
        await stream.aclose()
        for client in clients:
            await client.aclose()
        await extra.aclose()


async def test_lazy_sessions_without_a_pull_expire_in_seconds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_server(nursery, max_sessions=2, lazy_timeout=10.0, idle_timeout=600.0)
    for _ in range(2):
        answer = await exchange_from(ATTACKER, port, push_request(junk_token(), b"\n"))
        assert answer.status == 200
    answer = await exchange_from(ATTACKER, port, push_request(junk_token(), b"\n"))
    assert answer.status == 429  # the table is full ...
    await trio.sleep(20)  # mock time: ... for lazy_timeout and a reaper round, not 600 s
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await echo_round_trip(stream)
    await stream.aclose()


async def test_handler_starts_on_first_byte_or_pull_not_before(nursery: trio.Nursery) -> None:
    started: list[str] = []

    async def greeter(stream: pht.PHTStream) -> None:
        started.append(stream.token)
        await stream.send_all(b"220 ready\r\n")  # the server speaks first
        await echo(stream)

    port = await start_server(nursery, greeter)
    with trio.fail_after(GUARD):
        # A close, an empty push and a refused request start nothing.
        for token, body in (("quiet-one", b""), ("quiet-two", b"\n")):
            answer = await exchange_from(ATTACKER, port, push_request(token, body))
            assert answer.status == 200
        bad = await exchange_from(ATTACKER, port, push_request("quiet-three", b"!!\n"))
        assert bad.status == 400
        assert started == []
        # A pull alone starts it: the greeting arrives without a push.
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        assert await stream.receive_some() == b"220 ready\r\n"
        assert started == [stream.token]
        await stream.aclose()
        # So does a first pushed byte, before any pull (GOST's modern client may).
        answer = await exchange_from(ATTACKER, port, push_request("pushes-first-token", HELLO))
        assert answer.status == 200
        assert started[-1] == "pushes-first-token"


async def test_trusted_proxy_reports_the_client_address(nursery: trio.Nursery) -> None:
    seen: dict[str, str | None] = {}

    async def record(stream: pht.PHTStream) -> None:
        seen[stream.token] = stream.remote_address
        await echo(stream)

    port = await start_server(nursery, record, trusted_proxies=[PROXY], max_sessions_per_address=2)
    forwarded = b"X-Forwarded-For: 198.51.100.7, 10.9.9.9\r\n"
    with trio.fail_after(GUARD):
        # Through the trusted proxy: the rightmost untrusted entry is the client.
        for token in ("via-proxy-token-1", "via-proxy-token-2"):
            request = push_request(token, HELLO, extra_headers=forwarded)
            assert (await exchange_from(PROXY, port, request)).status == 200
            assert seen[token] == "10.9.9.9"
        # That client's budget is used up; another one behind the proxy is not.
        request = push_request("via-proxy-token-3", HELLO, extra_headers=forwarded)
        assert (await exchange_from(PROXY, port, request)).status == 429
        other = push_request("via-proxy-token-4", HELLO, extra_headers=b"X-Real-IP: 10.1.1.1\r\n")
        assert (await exchange_from(PROXY, port, other)).status == 200
        assert seen["via-proxy-token-4"] == "10.1.1.1"
        # From an untrusted peer the header proves nothing.
        request = push_request("spoofed-token-0001", HELLO, extra_headers=forwarded)
        assert (await exchange_from(ATTACKER, port, request)).status == 200
        address = seen["spoofed-token-0001"]
        assert address is not None
        assert address.startswith(f"{ATTACKER}:")


async def test_trusted_proxies_must_be_addresses(nursery: trio.Nursery) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        await start_server(nursery, trusted_proxies=["not an address"])
    with pytest.raises(TypeError, match="list"):
        await start_server(nursery, trusted_proxies="127.0.0.1")


async def test_a_session_nobody_pulls_cannot_queue_max_buffered(nursery: trio.Nursery) -> None:
    queued = trio.Event()
    piece = b"x" * (16 * 1024)

    async def talker(stream: pht.PHTStream) -> None:
        assert await stream.receive_some() == b"hello"
        for _ in range(4):  # 256 KiB for the client, more than may wait for a pull
            await stream.send_all(piece)
        queued.set()
        await echo(stream)

    port = await start_server(nursery, talker, max_buffered=1024 * 1024)
    token = "unpulled-session-token-01"
    with trio.fail_after(GUARD):
        answer = await exchange_from(ATTACKER, port, push_request(token, HELLO))
        assert answer.status == 200  # the handler took the bytes ...
        await trio.testing.wait_all_tasks_blocked()
        assert not queued.is_set()  # ... and waits: no pull to take its answer
        client = await connect_from(ATTACKER, port)
        await client.send(pull_request(token))
        assert (await client.head()).status == 200
        received = b""
        while len(received) < 4 * len(piece):
            lines = (await client.chunk()).split(b"\n")
            received += b"".join(base64.b64decode(line) for line in lines)
        assert received == piece * 4
        await queued.wait()
        await client.aclose()
