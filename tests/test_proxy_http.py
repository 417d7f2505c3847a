"""The HTTP proxy handler and the CONNECT connector over in-memory streams."""

from __future__ import annotations

import base64
import errno

import h11
import pytest
import trio
import trio.testing

from pht.proxy import (
    Auth,
    HTTPProxyHandler,
    ProxyAuthError,
    ProxyConnectError,
    ProxyProtocolError,
    http_connect,
)
from tests.test_proxy_support import (
    FakeDialer,
    receive_all,
    receive_exactly,
    refused,
    run_handler_on,
)


class Origin:
    """A tiny keep-alive origin server: answers ``METHOD target|body``."""

    def __init__(self) -> None:
        self.requests: list[h11.Request] = []
        self.connections = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        connection = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                body = b""
                request: h11.Request | None = None
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        connection.receive_data(bytes(await stream.receive_some()))
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                        self.requests.append(event)
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                answer = request.method + b" " + request.target + b"|" + body
                headers = [("Content-Length", str(len(answer))), ("Keep-Alive", "timeout=5")]
                await stream.send_all(
                    connection.send(h11.Response(status_code=200, headers=headers))
                    + connection.send(h11.Data(data=answer))
                    + connection.send(h11.EndOfMessage())
                )
                if connection.our_state is not h11.DONE:
                    return
                connection.start_next_cycle()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 \r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def error(status: int, reason: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n%s\r\n" % (
        status,
        reason,
        extra,
    )


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


async def test_connect_tunnel_with_early_data(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=dialer), server)
    await client.send_all(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nHELLO"
    )
    expected = b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert await receive_exactly(client, len(expected)) == expected
    assert dialer.calls == [("example.com", 443)]
    target = await dialer.target()
    assert await receive_exactly(target, 5) == b"HELLO"
    await target.send_all(b"WORLD")
    assert await receive_exactly(client, 5) == b"WORLD"
    await target.aclose()
    assert await receive_all(client) == b""


async def test_connect_ipv6_target(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=dialer), server)
    await client.send_all(b"CONNECT [::1]:22 HTTP/1.1\r\nHost: [::1]:22\r\n\r\n")
    await receive_exactly(client, 39)
    assert dialer.calls == [("::1", 22)]


async def test_absolute_form_keep_alive_and_host_switch(nursery: trio.Nursery) -> None:
    origin = Origin()
    dialer = FakeDialer(serve=origin.serve, nursery=nursery)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=dialer), server)

    await client.send_all(
        b"GET http://a.example/one?x=1 HTTP/1.1\r\nHost: a.example\r\n"
        b"Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Drop\r\n"
        b"X-Drop: 1\r\nX-Keep: 2\r\nUser-Agent: test\r\n\r\n"
    )
    assert await receive_exactly(client, len(ok(b"GET /one?x=1|"))) == ok(b"GET /one?x=1|")
    await client.send_all(
        b"POST http://a.example/two HTTP/1.1\r\nHost: a.example\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert await receive_exactly(client, len(ok(b"POST /two|abcde"))) == ok(b"POST /two|abcde")
    await client.send_all(b"GET http://b.example:8080 HTTP/1.1\r\nHost: b.example:8080\r\n\r\n")
    assert await receive_exactly(client, len(ok(b"GET /|"))) == ok(b"GET /|")

    assert dialer.calls == [("a.example", 80), ("b.example", 8080)]
    assert origin.connections == 2
    first = origin.requests[0]
    names = [name for name, _ in first.headers]
    assert names == [b"host", b"x-keep", b"user-agent"]
    assert dict(first.headers)[b"host"] == b"a.example"
    assert dict(origin.requests[2].headers)[b"host"] == b"b.example:8080"
    await client.aclose()


async def test_http10_client_gets_close_delimited_answer(nursery: trio.Nursery) -> None:
    origin = Origin()
    dialer = FakeDialer(serve=origin.serve, nursery=nursery)
    answer, _ = await run_handler_on(
        HTTPProxyHandler(dial=dialer), b"GET http://a.example/ HTTP/1.0\r\n\r\n"
    )
    assert answer == b"HTTP/1.1 200 \r\nContent-Length: 6\r\nConnection: close\r\n\r\nGET /|"


async def test_expect_100_continue_is_answered_by_the_proxy(nursery: trio.Nursery) -> None:
    origin = Origin()
    dialer = FakeDialer(serve=origin.serve, nursery=nursery)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=dialer), server)
    await client.send_all(
        b"PUT http://a.example/u HTTP/1.1\r\nHost: a.example\r\n"
        b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    continue_line = b"HTTP/1.1 100 \r\n\r\n"
    assert await receive_exactly(client, len(continue_line)) == continue_line
    await client.send_all(b"data")
    assert await receive_exactly(client, len(ok(b"PUT /u|data"))) == ok(b"PUT /u|data")
    assert b"expect" not in dict(origin.requests[0].headers)


async def test_proxy_auth(nursery: trio.Nursery) -> None:
    origin = Origin()
    dialer = FakeDialer(serve=origin.serve, nursery=nursery)
    handler = HTTPProxyHandler(auth=Auth("user", "secret"), dial=dialer)
    challenge = error(
        407, b"Proxy Authentication Required", b'Proxy-Authenticate: Basic realm="pht"\r\n'
    )
    for header in (
        b"",
        b"Proxy-Authorization: " + basic("user", "wrong") + b"\r\n",
        b"Proxy-Authorization: Basic !!!\r\n",
        b"Proxy-Authorization: Bearer x\r\n",
    ):
        answer, _ = await run_handler_on(
            handler, b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\n" + header + b"\r\n"
        )
        assert answer == challenge
    assert dialer.calls == []
    good = b"Proxy-Authorization: " + basic("user", "secret") + b"\r\n"
    answer, _ = await run_handler_on(
        handler,
        b"GET http://a.example/ HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n"
        + good
        + b"\r\n",
    )
    assert answer == b"HTTP/1.1 200 \r\nContent-Length: 6\r\nConnection: close\r\n\r\nGET /|"
    assert b"proxy-authorization" not in dict(origin.requests[0].headers)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET /origin-form HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET https://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://:80/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT example.com HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab",
        b"GET http://a/ HTTP/1.1\r\n" + b"X: " + b"y" * 70_000 + b"\r\n\r\n",
    ],
    ids=["garbage", "origin-form", "https", "no-host", "no-port", "connect-body", "huge-head"],
)
async def test_malformed_requests_get_400(request_bytes: bytes) -> None:
    dialer = FakeDialer()
    answer, _ = await run_handler_on(HTTPProxyHandler(dial=dialer), request_bytes)
    assert answer == error(400, b"Bad Request")
    assert dialer.calls == []


async def test_truncated_request_is_closed_quietly() -> None:
    answer, _ = await run_handler_on(HTTPProxyHandler(dial=FakeDialer()), b"GET http://a/ HT")
    assert answer == error(400, b"Bad Request")
    answer, _ = await run_handler_on(HTTPProxyHandler(dial=FakeDialer()), b"")
    assert answer == b""


@pytest.mark.parametrize("method", [b"GET http://a.example/", b"CONNECT a.example:443"])
async def test_unreachable_upstream_is_502(method: bytes) -> None:
    for dial_error in (refused(), OSError(errno.ENETUNREACH, "Network is unreachable")):
        answer, _ = await run_handler_on(
            HTTPProxyHandler(dial=FakeDialer(dial_error)),
            method + b" HTTP/1.1\r\nHost: a.example\r\n\r\n",
        )
        assert answer == error(502, b"Bad Gateway")


async def test_dial_timeout_is_504(autojump_clock: trio.abc.Clock) -> None:
    handler = HTTPProxyHandler(dial=FakeDialer(hang=True), dial_timeout=10)
    answer, _ = await run_handler_on(handler, b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n")
    assert answer == error(504, b"Gateway Timeout")


async def test_upstream_garbage_is_502(nursery: trio.Nursery) -> None:
    async def bad_origin(stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"NOT HTTP\r\n\r\n")
        await stream.aclose()

    dialer = FakeDialer(serve=bad_origin, nursery=nursery)
    answer, _ = await run_handler_on(
        HTTPProxyHandler(dial=dialer), b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert answer == error(502, b"Bad Gateway")


async def test_closed_idle_upstream_is_retried_once(nursery: trio.Nursery) -> None:
    served = 0

    async def one_shot_origin(stream: trio.abc.Stream) -> None:
        # Answers one request with keep-alive, then closes (idle timeout).
        nonlocal served
        served += 1
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()

    dialer = FakeDialer(serve=one_shot_origin, nursery=nursery)
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=dialer), server)
    expected = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for _ in range(2):
        await client.send_all(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await receive_exactly(client, len(expected)) == expected
    assert served == 2


# --- connector -------------------------------------------------------------------


async def test_http_connect_against_handler(nursery: trio.Nursery) -> None:
    dialer = FakeDialer()
    auth = Auth("u", "p")
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(auth=auth, dial=dialer), server)
    stream = await http_connect(client, "example.com", 443, auth=auth)
    target = await dialer.target()
    await target.send_all(b"server first")
    assert await receive_exactly(stream, 12) == b"server first"
    await stream.send_all(b"reply")
    assert await receive_exactly(target, 5) == b"reply"


async def test_http_connect_keeps_data_that_follows_the_answer() -> None:
    client, proxy = trio.testing.memory_stream_pair()
    await proxy.send_all(b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-banner")
    stream = await http_connect(client, "::1", 22)
    assert await receive_exactly(stream, 14) == b"SSH-2.0-banner"
    request = await proxy.receive_some()
    assert request == b"CONNECT [::1]:22 HTTP/1.1\r\nHost: [::1]:22\r\n\r\n"


async def test_http_connect_errors(nursery: trio.Nursery) -> None:
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(auth=Auth("u", "p"), dial=FakeDialer()), server)
    with pytest.raises(ProxyAuthError, match="requires authentication") as auth_info:
        await http_connect(client, "example.com", 443)
    assert auth_info.value.code == 407

    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(HTTPProxyHandler(dial=FakeDialer(refused())), server)
    with pytest.raises(ProxyConnectError, match="502 Bad Gateway") as info:
        await http_connect(client, "example.com", 443)
    assert info.value.code == 502


@pytest.mark.parametrize("answer", [b"", b"SSH-2.0-x\r\n\r\n", b"HTTP/1.1 200 OK\r\n"])
async def test_http_connect_protocol_errors(answer: bytes) -> None:
    client, proxy = trio.testing.memory_stream_pair()
    await proxy.send_all(answer)
    await proxy.send_eof()
    with pytest.raises(ProxyProtocolError):
        await http_connect(client, "example.com", 443)
