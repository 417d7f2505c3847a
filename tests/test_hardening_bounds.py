"""Resource bounds of ``serve_pht`` and the tokens it hands out, over real sockets.

Each bound is exercised on a server that also carries an ordinary tunnel,
which must keep working while another session is refused or closed.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import logging
import re
import select
from pathlib import Path

import pytest
import trio
import trio.testing

import pht

from .support import LogLine
from .test_hardening_support import (
    GUARD,
    RawClient,
    echo_round_trip,
    exchange,
    pull_request,
    push_request,
    start_server,
)

BASE32HEX = frozenset("0123456789abcdefghijklmnopqrstuv")


async def test_oversized_push_is_413_and_closes_only_its_session(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, max_push_line=4096)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        await echo_round_trip(good)
        # The victim session exists (a push opened it) ...
        victim = "victim-session-token-0001"
        answer, _ = await exchange(port, push_request(victim, base64.b64encode(b"hi") + b"\n"))
        assert answer.status == 200
        # ... until a push longer than max_push_line, announced by Content-Length.
        line = base64.b64encode(b"x" * 8192) + b"\n"
        answer, closed = await exchange(port, push_request(victim, line))
        assert (answer.status, closed) == (413, True)
        answer, _ = await exchange(port, push_request(victim, b"aGk=\n"))
        assert answer.status == 403  # the session is over and stays over
        # Without Content-Length (chunked), the line is cut off while being read.
        other = "victim-session-token-0002"
        client = await RawClient.connect(port)
        await client.send(
            b"POST /push?token=%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            % other.encode()
        )
        for _ in range(4):  # 8 KiB without a newline, more than max_push_line
            await client.send(b"800\r\n" + b"A" * 2048 + b"\r\n")
        response = await client.response()
        assert response.status == 413
        assert await client.is_closed()
        await client.aclose()
        answer, _ = await exchange(port, push_request(other, b"aGk=\n"))
        assert answer.status == 403
        await echo_round_trip(good)  # the other tunnel carried on
        await good.aclose()


async def test_oversized_header_sent_in_pieces_is_431(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, max_header_size=2048)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", port)
        client = await RawClient.connect(port)
        await client.send(b"GET /pull?token=abc HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(16):  # up to 4 KiB of one header, 256 bytes per write
            await client.send(b"a" * 256)
            await trio.testing.wait_all_tasks_blocked()
            if select.select([client.stream.socket.fileno()], [], [], 0)[0]:
                break  # the server answered: stop writing (a write now would reset)
        response = await client.response()
        assert response.status == 431
        assert await client.is_closed()
        await client.aclose()
        # Just under the bound is fine.
        request = b"GET /authorize HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1500 + b"\r\n\r\n"
        answer, _ = await exchange(port, request)
        assert answer.status == 200
        await echo_round_trip(good)
        await good.aclose()


async def test_oversized_header_sent_at_once_is_431(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, max_header_size=2048)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", port)
        request = b"GET /authorize HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
        try:
            answer, closed = await exchange(port, request)
        finally:
            await echo_round_trip(good)
            await good.aclose()
        assert (answer.status, closed) == (431, True)


async def test_max_sessions_refuses_a_new_modern_token_with_429(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, max_sessions=2)
    with trio.fail_after(GUARD):
        first = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        second = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        with pytest.raises(pht.TunnelError) as info:
            await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        assert info.value.status == 429
        answer, _ = await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 429  # the table is full for issued tokens too
        await echo_round_trip(first)
        await echo_round_trip(second)
        await first.aclose()
        # The close notification was acknowledged: the slot is free again.
        third = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        await echo_round_trip(third)
        await third.aclose()
        await second.aclose()


async def test_backlog_bounds_unused_authorized_tokens(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, backlog=3)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        tokens = []
        for _ in range(3):
            answer, _ = await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.status == 200
            tokens.append(answer.body.decode().removeprefix("token="))
        answer, _ = await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 429
        with pytest.raises(pht.TunnelError) as info:
            await pht.open_pht_stream("127.0.0.1", port)  # authorize=True
        assert info.value.status == 429
        # Using an issued token takes it off the backlog: one more can be issued.
        answer, _ = await exchange(port, push_request(tokens[0], b"aGk=\n"))
        assert answer.status == 200
        answer, _ = await exchange(port, b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 200
        await echo_round_trip(good)
        await good.aclose()


async def test_strict_mode_accepts_only_issued_tokens(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, strict=True)
    with trio.fail_after(GUARD):
        with pytest.raises(pht.TunnelError) as info:
            await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        assert info.value.status == 403
        answer, _ = await exchange(port, push_request(pht.new_token(), b"aGk=\n"))
        assert answer.status == 403
        answer, _ = await exchange(port, pull_request(pht.new_token()))
        assert answer.status == 403
        issued = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
        await echo_round_trip(issued)
        await issued.aclose()


# --- tokens -------------------------------------------------------------------


def test_new_tokens_carry_at_least_128_random_bits() -> None:
    count = 20_000
    tokens = [pht.new_token() for _ in range(count)]
    assert len(set(tokens)) == count
    lengths = {len(token) for token in tokens}
    assert len(lengths) == 1
    length = lengths.pop()
    assert length >= 26
    for token in tokens:
        assert BASE32HEX.issuperset(token), token
    # Every position takes all 32 symbols: each character is a full 5 random
    # bits (a fixed or biased position, as in GOST's xids, would show here).
    for position in range(length):
        assert len({token[position] for token in tokens}) == 32, position
    assert 5 * length >= 128


async def test_server_issues_long_random_tokens(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, backlog=64, max_pending_per_address=None)
    seen = set()
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        for _ in range(64):  # one keep-alive connection, 64 authorizes
            await client.send(b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await client.response()
            assert answer.status == 200
            token = answer.body.decode().removeprefix("token=")
            assert len(token) >= 26
            assert BASE32HEX.issuperset(token)
            seen.add(token)
        await client.aclose()
    assert len(seen) == 64


# --- the security page matches the code ------------------------------------------

SECURITY = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def _size(value: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if value % size == 0:
            return f"{value // size} {unit}"
    return str(value)


def test_security_page_states_the_real_defaults() -> None:
    text = SECURITY.read_text()
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(pht.serve_pht).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    defaults.update(
        (option.name, option.default) for option in dataclasses.fields(pht.ServerOptions)
    )
    for name in (
        "max_push_line",
        "max_header_size",
        "max_buffered",
        "max_sessions",
        "max_sessions_per_address",
        "max_pending_per_address",
        "max_connections_per_address",
        "listen_backlog",
        "backlog",
        "issued_timeout",
        "lazy_timeout",
        "idle_timeout",
        "push_timeout",
        "pull_write_timeout",
        "request_timeout",
        "keepalive_timeout",
        "heartbeat_interval",
    ):
        value = defaults[name]
        if value is None:
            shown = "None"
        elif name in ("max_push_line", "max_header_size", "max_buffered"):
            shown = _size(value)
        elif isinstance(value, float):
            shown = f"{value:g} s"
        else:
            shown = f"{value:,}".replace(",", " ") if value >= 10_000 else str(value)
        row = re.search(rf"^\|\s*`{name}`\s*\|\s*([^|]+)\|", text, re.MULTILINE)
        assert row is not None, f"docs/security.md has no table row for `{name}`"
        assert row.group(1).strip() == shown, (name, row.group(1).strip(), shown)
    lowered = text.lower()
    for must in ("strict", "phts", "proxy logs", "replay", "128 bits", "prefix"):
        assert must in lowered, must


async def test_server_logs_only_a_token_prefix(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pht")
    closed = LogLine("closed after")
    logging.getLogger("pht").addHandler(closed)
    port = await start_server(nursery)
    with trio.fail_after(GUARD):
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        await echo_round_trip(stream)
        # A refused request and a broken session are logged too.
        await exchange(port, push_request(stream.token, b"not base64!\n"))
        await stream.aclose()
        try:
            await closed.seen.wait()  # the session's end is logged
        finally:
            logging.getLogger("pht").removeHandler(closed)
    messages = [record.getMessage() for record in caplog.records]
    assert any(stream.token[:8] in message for message in messages)
    assert not [message for message in messages if stream.token in message]
