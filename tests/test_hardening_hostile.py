"""Hostile and broken input over real sockets, against serve_pht and open_pht_stream.

Server side: every malformed request gets the right ``4xx``, its connection is
closed or stays usable, and an ordinary tunnel on the same server keeps
working. Client side: a server that answers garbage or cuts a pull ends in
``TunnelError`` / ``BrokenResourceError``, never in a hang.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import pytest
import trio
import trio.testing

import pht

from .test_hardening_support import (
    GUARD,
    RawClient,
    echo_round_trip,
    exchange,
    pull_request,
    push_request,
    start_server,
)

MiB = 1024 * 1024
AUTHORIZE = b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[int, pht.PHTStream]]:
    """An echo server and one good tunnel to it, checked again after the test."""
    port = await start_server(nursery)
    with trio.fail_after(GUARD):
        good = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        await echo_round_trip(good)
    yield port, good
    with trio.fail_after(GUARD):
        await echo_round_trip(good)  # the good tunnel carried on
        await good.aclose()


@dataclass(frozen=True)
class Case:
    request: bytes
    statuses: tuple[int, ...]  # the answers, in order
    closed: bool  # whether the server closes the connection after them


def post(target: bytes, body: bytes, headers: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n"
        % (target, len(body), headers)
    ) + body


CASES = {
    "bad base64": Case(push_request("tok-bad-b64", b"!!not base64!!\n"), (400,), False),
    "base64 without padding": Case(push_request("tok-no-pad", b"aGVsbG8\n"), (400,), False),
    "base64 url alphabet": Case(push_request("tok-url-b64", b"-_-_\n"), (400,), False),
    "body longer than Content-Length": Case(
        push_request("tok-longer", b"aGk=\n") + b"GARBAGE AFTER THE BODY\r\n\r\n",
        (200, 400),
        True,
    ),
    "chunked upload": Case(
        b"POST /push?token=tok-chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\naGV\r\n6\r\nsbG8=\n\r\n0\r\n\r\n",
        (200,),
        False,
    ),
    "chunked with a bad chunk size": Case(
        b"POST /push?token=tok-badchunk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\naGk=\n\r\n0\r\n\r\n",
        (400,),
        True,
    ),
    "pipelined pushes": Case(
        push_request("tok-pipe", b"YQ==\n") + push_request("tok-pipe", b"Yg==\n") + AUTHORIZE,
        (200, 200, 200),
        False,
    ),
    "GET to push": Case(b"GET /push?token=tok-m1 HTTP/1.1\r\nHost: x\r\n\r\n", (400,), False),
    "PUT to push": Case(
        post(b"/push?token=tok-m2", b"aGk=\n").replace(b"POST", b"PUT"), (400,), False
    ),
    "POST to pull": Case(post(b"/pull?token=tok-m3", b""), (400,), False),
    "DELETE to authorize (any method, as GOST)": Case(
        b"DELETE /authorize HTTP/1.1\r\nHost: x\r\n\r\n", (200,), False
    ),
    "unknown path": Case(b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", (404,), False),
    "missing token": Case(post(b"/push", b"aGk=\n"), (403,), False),
    "empty token": Case(b"GET /pull?token= HTTP/1.1\r\nHost: x\r\n\r\n", (403,), False),
    "conflicting tokens": Case(post(b"/push?token=aaaa&token=bbbb", b"aGk=\n"), (400,), False),
    "repeated token": Case(post(b"/push?token=tok-rep&token=tok-rep", b"aGk=\n"), (200,), False),
    "token 129 characters": Case(post(b"/push?token=" + b"a" * 129, b"aGk=\n"), (403,), False),
    "token 128 characters": Case(post(b"/push?token=" + b"a" * 128, b"aGk=\n"), (200,), False),
    "token 8 KiB long": Case(post(b"/push?token=" + b"a" * 8192, b"aGk=\n"), (403,), False),
    "url-encoded CRLF in the token": Case(
        post(b"/push?token=ab%0D%0Acd", b"aGk=\n"), (403,), False
    ),
    "url-encoded NUL in the token": Case(post(b"/push?token=ab%00cd", b"aGk=\n"), (403,), False),
    "invalid UTF-8 in the token": Case(post(b"/push?token=%ff%fe", b"aGk=\n"), (403,), False),
    "raw bytes in the target": Case(
        b"GET /pull?token=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", (400,), True
    ),
    "two Content-Lengths": Case(
        b"POST /push?token=tok-cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\naGk=\n",
        (400,),
        True,
    ),
    "unknown transfer coding (501, as RFC 9112 asks)": Case(
        b"POST /push?token=tok-te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        (501,),
        True,
    ),
    "no Host header": Case(b"GET /authorize HTTP/1.1\r\n\r\n", (400,), True),
    "TLS hello to the plain server": Case(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", (400,), True
    ),
    "not HTTP at all": Case(b"HELLO THERE\r\n\r\n", (400,), True),
    "HTTP/2 preface": Case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (404, 400), True),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_malformed_request_gets_4xx_and_the_server_carries_on(
    server: tuple[int, pht.PHTStream], name: str
) -> None:
    port, _ = server
    case = CASES[name]
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(case.request)
        statuses = []
        for _ in case.statuses:
            statuses.append((await client.response()).status)
        assert tuple(statuses) == case.statuses
        if case.closed:
            assert await client.is_closed()
        else:  # consistent: the same connection serves the next request
            await client.send(AUTHORIZE)
            answer = await client.response()
            assert answer.status == 200
            assert answer.body.startswith(b"token=")
        await client.aclose()


async def test_head_to_an_unknown_path_gets_404(server: tuple[int, pht.PHTStream]) -> None:
    port, _ = server
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(b"HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            response = await client.head()
        finally:
            await client.aclose()
        assert response.status == 404


async def test_url_encoded_token_names_the_same_session(nursery: trio.Nursery) -> None:
    got = bytearray()
    done = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        got.extend(await stream.receive_some())
        await stream.send_all(b"back")
        done.set()
        await trio.sleep_forever()

    port = await start_server(nursery, handler)
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(b"GET /pull?token=url%2Dencoded%5Ftoken HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.head()).status == 200
        answer, _ = await exchange(port, push_request("url-encoded_token", b"aGk=\n"))
        assert answer.status == 200
        await done.wait()
        assert bytes(got) == b"hi"
        assert await client.chunk() == pht.encode_line(b"back")
        await client.aclose()


async def test_refused_push_ends_its_session(server: tuple[int, pht.PHTStream]) -> None:
    port, _ = server
    with trio.fail_after(GUARD):
        token = "session-with-bad-base64"
        assert (await exchange(port, push_request(token, b"aGk=\n")))[0].status == 200
        assert (await exchange(port, push_request(token, b"%%%%\n")))[0].status == 400
        assert (await exchange(port, push_request(token, b"aGk=\n")))[0].status == 403
        assert (await exchange(port, pull_request(token)))[0].status == 403


async def test_line_without_newline_closes_the_session(nursery: trio.Nursery) -> None:
    got: list[bytes | bytearray] = []
    ended = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        while data := await stream.receive_some():
            got.append(data)
        ended.set()

    port = await start_server(nursery, handler)
    with trio.fail_after(GUARD):
        token = "session-line-no-newline"
        assert (await exchange(port, push_request(token, b"aGk=\n")))[0].status == 200
        # GOST reads a body without newline as a close: the data is dropped.
        assert (await exchange(port, push_request(token, b"aGVsbG8=")))[0].status == 200
        await ended.wait()
        assert got == [b"hi"]
        assert (await exchange(port, push_request(token, b"aGk=\n")))[0].status == 403


async def test_pipelined_pushes_arrive_in_order(nursery: trio.Nursery) -> None:
    got = bytearray()
    done = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        while data := await stream.receive_some():
            got.extend(data)
            if len(got) >= 30:
                done.set()

    port = await start_server(nursery, handler)
    token = "pipelined-pushes-token-1"
    pieces = [b"%02d-" % i + b"x" * 0 for i in range(10)]
    request = b"".join(push_request(token, pht.encode_line(piece)) for piece in pieces)
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(request)
        for _ in pieces:
            assert (await client.response()).status == 200
        await done.wait()
        await client.aclose()
    assert bytes(got) == b"".join(pieces)


async def test_body_shorter_than_content_length_then_close(
    server: tuple[int, pht.PHTStream],
) -> None:
    port, _ = server
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(
            b"POST /push?token=short-body-token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            b"aGk=\n"
        )
        await client.stream.send_eof()  # the client gives up half-way
        # The server answers 400 (or just closes), and frees the connection.
        try:
            assert (await client.response()).status == 400
        except EOFError:
            pass
        assert await client.is_closed()
        await client.aclose()


async def test_pull_connection_streaming_junk_is_not_buffered(
    server: tuple[int, pht.PHTStream],
) -> None:
    """A pull connection that keeps sending bytes after its GET must not fill memory."""
    port, _ = server
    junk = b"J" * (64 * 1024)
    sent = 0
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        with trio.fail_after(GUARD):
            client = await RawClient.connect(port)
            await client.send(pull_request("junk-after-pull-token"))
            assert (await client.head()).status == 200
            with trio.move_on_after(5):  # real time; the loop normally ends well before
                try:
                    while sent < 64 * MiB:
                        await client.send(junk)
                        sent += len(junk)
                except trio.BrokenResourceError:
                    pass  # closing the connection is a fine answer too
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            _, peak = tracemalloc.get_traced_memory()
            await client.aclose()
    finally:
        tracemalloc.stop()
    print(
        f"\njunk after a pull: sent {sent / MiB:.0f} MiB, "
        f"traced peak +{(peak - base) / MiB:.1f} MiB"
    )
    assert peak - base < 16 * MiB


# --- slow clients ----------------------------------------------------------------


SLOW_CLIENTS: dict[str, Callable[[int], bytes]] = {
    "header byte every 5 s": lambda i: (
        b"GET /pull?token=slowloris HTTP/1.1\r\nX-A: "[i : i + 1] or b"a"
    ),
    "silent connection": lambda i: b"",
    "body byte every 5 s": lambda i: (
        b"POST /push?token=slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        if i == 0
        else b"A"
    ),
}


@pytest.mark.parametrize("name", list(SLOW_CLIENTS))
async def test_slow_client_connection_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, name: str
) -> None:
    """Slowloris: a request trickling in (or nothing at all) does not hold a connection.

    ``request_timeout`` (60 s) bounds a request from its first byte, and
    ``keepalive_timeout`` (120 s) a connection that sends nothing.
    """
    port = await start_server(nursery)
    client = await RawClient.connect(port)
    start = trio.current_time()
    closed_after = None
    for i in range(120):  # at most ten minutes of mock time, a byte every 5 s
        piece = SLOW_CLIENTS[name](i)
        try:
            if piece:
                await client.send(piece)
        except trio.BrokenResourceError:
            closed_after = trio.current_time() - start
            break
        await trio.sleep(5)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.001):
            try:
                data = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 4"):
                closed_after = trio.current_time() - start
                break
    await client.aclose()
    assert closed_after is not None, "the server still holds the connection after ten minutes"
    assert closed_after <= 130.0


# --- a hostile or broken server, seen by the client ----------------------------------

CLOSE = b"<close>"
HANG = b"<hang>"

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
TOKEN_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\ntoken=abcdefghijklmnopqrstuvwxyz"
ACK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def fake_server(nursery: trio.Nursery, answers: dict[bytes, list[bytes]]) -> int:
    """A scripted HTTP server: for each request path, the pieces to write (or CLOSE/HANG)."""

    async def serve(stream: trio.SocketStream) -> None:
        client = RawClient(stream)
        try:
            while True:
                try:
                    head = await client._read_until(b"\r\n\r\n")
                except EOFError:
                    return
                target = head.split(b" ")[1]
                path = target.split(b"?")[0]
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await client._read_exactly(int(line.split(b":")[1]))
                for piece in answers.get(
                    path, [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]
                ):
                    if piece is CLOSE:
                        return
                    if piece is HANG:
                        await trio.sleep_forever()
                    await stream.send_all(piece)
        except trio.BrokenResourceError:
            pass  # the client gave up on us first: fine
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


OPEN_FAILURES = {
    "garbage to authorize": {b"/authorize": [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", CLOSE]},
    "authorize closes at once": {b"/authorize": [CLOSE]},
    "authorize without a token": {
        b"/authorize": [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"]
    },
    "authorize body cut short": {
        b"/authorize": [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\ntoken=abc", CLOSE]
    },
    "authorize answers 500": {b"/authorize": [b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"]},
    "oversized authorize body": {
        b"/authorize": [b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"t" * 1000000]
    },
    "garbage to pull": {b"/authorize": [TOKEN_ANSWER], b"/pull": [b"\x00\x01\x02\r\n\r\n", CLOSE]},
    "pull headers cut": {
        b"/authorize": [TOKEN_ANSWER],
        b"/pull": [b"HTTP/1.1 200 OK\r\nTrans", CLOSE],
    },
}


@pytest.mark.parametrize("name", list(OPEN_FAILURES))
async def test_open_fails_cleanly_on_a_broken_server(nursery: trio.Nursery, name: str) -> None:
    port = await fake_server(nursery, OPEN_FAILURES[name])
    with trio.fail_after(GUARD), pytest.raises(pht.TunnelError):
        await pht.open_pht_stream("127.0.0.1", port)


PULL_FAILURES = {
    "ends mid-line": [CHUNKED_HEAD, chunk(b"aGVsbG8=\naGVs"), b"0\r\n\r\n"],
    "cut mid-line": [CHUNKED_HEAD, chunk(b"aGVsbG8=\naGVs"), CLOSE],
    "cut mid-chunk": [CHUNKED_HEAD, b"20\r\naGVsbG8=\naGVs", CLOSE],
    "bad chunk framing": [CHUNKED_HEAD, chunk(b"aGVsbG8=\n"), b"zz\r\nxx\r\n"],
    "bad base64 line": [CHUNKED_HEAD, chunk(b"aGVsbG8=\n!!!!\n"), HANG],
    "endless line": [CHUNKED_HEAD, chunk(b"aGVsbG8=\n")] + [chunk(b"A" * 65536)] * 80 + [HANG],
}


@pytest.mark.parametrize("name", list(PULL_FAILURES))
@pytest.mark.parametrize("authorize", [True, False])
async def test_broken_pull_breaks_receive_some(
    nursery: trio.Nursery, name: str, authorize: bool
) -> None:
    port = await fake_server(
        nursery, {b"/authorize": [TOKEN_ANSWER], b"/pull": PULL_FAILURES[name]}
    )
    with trio.fail_after(GUARD):
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
        received = b""
        with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 - the loop is the call
            while data := await stream.receive_some():
                received += data
        # The complete line before the damage, unless both arrived in one read.
        assert received in (b"", b"hello")
        await stream.aclose()


PUSH_FAILURES = {
    "garbage": [b"HTTP/9 banana\r\n\r\n", CLOSE],
    "closed": [CLOSE],
    "cut answer": [b"HTTP/1.1 200 OK\r\nContent-", CLOSE],
    "huge body": [b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 200000, HANG],
    "403": [b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"],
}


@pytest.mark.parametrize("name", list(PUSH_FAILURES))
async def test_broken_push_answer_breaks_send_all(nursery: trio.Nursery, name: str) -> None:
    port = await fake_server(
        nursery,
        {
            b"/authorize": [TOKEN_ANSWER],
            b"/pull": [CHUNKED_HEAD, HANG],
            b"/push": PUSH_FAILURES[name],
        },
    )
    with trio.fail_after(GUARD):
        stream = await pht.open_pht_stream("127.0.0.1", port)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"hello")
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"again")  # broken stays broken
        await stream.aclose()


@pytest.mark.parametrize("silent", [b"/authorize", b"/pull"])
async def test_silent_server_fails_the_open_within_connect_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, silent: bytes
) -> None:
    answers = {b"/authorize": [TOKEN_ANSWER], b"/pull": [CHUNKED_HEAD, HANG]}
    answers[silent] = [HANG]
    port = await fake_server(nursery, answers)
    with trio.move_on_after(600) as guard, pytest.raises(pht.TunnelError):  # mock time
        await pht.open_pht_stream("127.0.0.1", port, connect_timeout=30.0)
    assert not guard.cancelled_caught
