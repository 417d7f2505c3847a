"""The trio adapters over real loopback sockets (and trio's own stream checks)."""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio
import trio.testing

import pht

from .support import receive_exactly, start_server

Handler = Callable[[pht.PHTStream], Awaitable[object]]


@pytest.mark.parametrize("authorize", [True, False])
async def test_16_mib_each_way(nursery: trio.Nursery, authorize: bool) -> None:
    size = 16 * 1024 * 1024
    upload = os.urandom(size)
    download = os.urandom(size)
    digests: dict[str, str] = {}

    async def handler(stream: pht.PHTStream) -> None:
        got = await receive_exactly(stream, size)
        digests["server got"] = hashlib.sha256(got).hexdigest()
        await stream.send_all(download)
        await stream.aclose()

    port = await start_server(nursery, handler)
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
    async with trio.open_nursery() as inner:
        inner.start_soon(client.send_all, upload)
        received = await receive_exactly(client, size)
    assert await client.receive_some() == b""  # the server closed: EOF
    await client.aclose()
    assert digests["server got"] == hashlib.sha256(upload).hexdigest()
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(download).hexdigest()


async def test_fifty_tunnels_at_once(nursery: trio.Nursery) -> None:
    port = await start_server(nursery)
    results: dict[int, bool] = {}

    async def one(i: int) -> None:
        stream = await pht.open_pht_stream("127.0.0.1", port, authorize=i % 2 == 0)
        payload = os.urandom(20_000 + i)
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.send_all, payload)
            results[i] = await receive_exactly(stream, len(payload)) == payload
        await stream.aclose()

    async with trio.open_nursery() as clients:
        for i in range(50):
            clients.start_soon(one, i)
    assert len(results) == 50
    assert all(results.values())


async def test_tls_with_generated_certificate(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, tls=True)
    # Trust on first use: fetch the certificate the server made, then verify it.
    pem = await trio.to_thread.run_sync(ssl.get_server_certificate, ("127.0.0.1", port))
    context = ssl.create_default_context(cadata=pem)
    stream = await pht.open_pht_stream("127.0.0.1", port, tls=context, server_hostname="gost.run")
    await stream.send_all(b"over tls")
    assert await receive_exactly(stream, 8) == b"over tls"
    await stream.aclose()
    # The generated certificate names GOST, as GOST's does.
    from cryptography import x509

    subject = x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string()
    assert subject == "CN=gost.run,O=GOST"


async def test_tls_refused_handshake_is_explained(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, tls=True)
    with pytest.raises(pht.TunnelError, match=r"TLS handshake .* failed"):
        await pht.open_pht_stream("127.0.0.1", port, tls=True)  # does not trust it


async def test_plain_client_to_tls_server_fails_clearly(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, tls=True)
    with pytest.raises(pht.TunnelError):
        with trio.fail_after(10):
            await pht.open_pht_stream("127.0.0.1", port)


async def test_custom_paths(nursery: trio.Nursery) -> None:
    paths: dict[str, Any] = {"authorize_path": "/a/auth", "push_path": "/up", "pull_path": "/down"}
    port = await start_server(nursery, **paths)
    stream = await pht.open_pht_stream("127.0.0.1", port, **paths)
    await stream.send_all(b"custom")
    assert await receive_exactly(stream, 6) == b"custom"
    await stream.aclose()
    for authorize in (True, False):
        with pytest.raises(pht.TunnelError, match="paths match") as info:
            await pht.open_pht_stream(
                "127.0.0.1", port, authorize=authorize, push_path="/up", pull_path="/pull"
            )
        assert info.value.status in (403, 404)


async def test_custom_headers_and_host_reach_the_server(nursery: trio.Nursery) -> None:
    """A relay of the test's own records every request the client makes."""
    port = await start_server(nursery)
    seen: list[bytes | bytearray] = []

    async def relay(client_side: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", port)

        async def pump(a: trio.abc.Stream, b: trio.abc.Stream, record: bool) -> None:
            try:
                while data := await a.receive_some(65536):
                    if record:
                        seen.append(data)
                    await b.send_all(data)
            except trio.BrokenResourceError:
                pass
            await b.aclose()

        async with trio.open_nursery() as pair:
            pair.start_soon(pump, client_side, upstream, True)
            pair.start_soon(pump, upstream, client_side, False)

    listeners = await nursery.start(trio.serve_tcp, relay, 0)
    relay_port = listeners[0].socket.getsockname()[1]
    stream = await pht.open_pht_stream(
        "127.0.0.1",
        relay_port,
        headers={"X-Test": "abc"},
        host_header="front.example",
    )
    await stream.send_all(b"x")
    assert await receive_exactly(stream, 1) == b"x"
    await stream.aclose()
    requests = [r for r in b"".join(seen).split(b"\r\n\r\n") if b" HTTP/1.1\r\n" in r]
    methods = [r.split(b" ", 1)[0].split(b"\n")[-1] for r in requests]
    assert {b"GET", b"POST"} <= set(methods)
    for request in requests:
        assert b"\r\nX-Test: abc" in request
        assert b"\r\nHost: front.example" in request


async def test_heartbeats_keep_an_idle_pull_alive(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Under a mock clock: an idle pull gets a heartbeat every interval, no real sleep."""
    port = await start_server(nursery, heartbeat_interval=10.0)
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    await raw.send_all(b"GET /pull?token=heartbeat-test-token HTTP/1.1\r\nHost: x\r\n\r\n")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/pull", headers=[("Host", "x")]))
    start = trio.current_time()
    beats: list[float] = []
    while len(beats) < 3:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await raw.receive_some(4096))
        elif isinstance(event, h11.Data):
            assert event.data == b"\n"
            beats.append(trio.current_time() - start)
    assert [round(b) for b in beats] == [10, 20, 30]
    await raw.aclose()


async def test_client_close_reaches_server_as_eof(nursery: trio.Nursery) -> None:
    seen = trio.Event()
    result: list[bytes | bytearray] = []

    async def handler(stream: pht.PHTStream) -> None:
        result.append(await receive_exactly(stream, 5))
        result.append(await stream.receive_some())
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"too late")
        seen.set()

    port = await start_server(nursery, handler)
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    await client.send_all(b"hello")
    await client.aclose()
    await client.aclose()  # idempotent
    with trio.fail_after(10):
        await seen.wait()
    assert result == [b"hello", b""]
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()


@pytest.mark.parametrize("authorize", [True, False])
async def test_server_close_reaches_client_as_eof(nursery: trio.Nursery, authorize: bool) -> None:
    async def handler(stream: pht.PHTStream) -> None:
        await stream.send_all(b"bye #1\n")
        await stream.aclose()

    port = await start_server(nursery, handler)
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
    with trio.fail_after(10):
        assert await receive_exactly(client, 7) == b"bye #1\n"
        assert await client.receive_some() == b""
        assert await client.receive_some() == b""  # and stays at EOF: no redial
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"after close")
    await client.aclose()


async def test_handler_errors_do_not_stop_other_tunnels(nursery: trio.Nursery) -> None:
    async def handler(stream: pht.PHTStream) -> None:
        data = await stream.receive_some()
        if data == b"crash":
            raise RuntimeError("handler bug")
        await stream.send_all(data)

    port = await start_server(nursery, handler)
    bad = await pht.open_pht_stream("127.0.0.1", port)
    await bad.send_all(b"crash")
    with trio.fail_after(10):
        assert await bad.receive_some() == b""
    good = await pht.open_pht_stream("127.0.0.1", port)
    await good.send_all(b"fine")
    assert await receive_exactly(good, 4) == b"fine"
    await good.aclose()
    await bad.aclose()


async def test_legacy_server_flow_repolls_after_heartbeat(nursery: trio.Nursery) -> None:
    """A scripted server that behaves as legacy GOST: pull ends after a heartbeat."""
    token = b"legacytoken000000000"
    polls: list[bytes] = []
    pushed: list[bytes | bytearray] = []

    async def legacy_server(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                target = event.target
                body = b""
                while not isinstance(e := conn.next_event(), h11.EndOfMessage):
                    if e is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(e, h11.Data):
                        body += e.data
                if target == b"/authorize":
                    answer = b"token=" + token
                    out = conn.send(
                        h11.Response(
                            status_code=200, headers=[("Content-Length", str(len(answer)))]
                        )
                    )
                    out += conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage())
                elif target.startswith(b"/pull"):
                    polls.append(target)
                    out = conn.send(
                        h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")])
                    )
                    if len(polls) == 1:
                        out += conn.send(h11.Data(data=b"\n"))  # heartbeat, then end: legacy
                    else:
                        out += conn.send(h11.Data(data=pht.encode_line(b"after re-poll")))
                        out += conn.send(h11.Data(data=b"\n"))
                    out += conn.send(h11.EndOfMessage())
                else:
                    pushed.append(body)
                    out = conn.send(
                        h11.Response(status_code=200, headers=[("Content-Length", "0")])
                    )
                    out += conn.send(h11.EndOfMessage())
                await stream.send_all(out or b"")
                conn.start_next_cycle()

    listeners = await nursery.start(trio.serve_tcp, legacy_server, 0)
    port = listeners[0].socket.getsockname()[1]
    client = await pht.open_pht_stream("127.0.0.1", port, authorize=True)
    assert client.token == token.decode()
    with trio.fail_after(10):
        assert await receive_exactly(client, 13) == b"after re-poll"
    await client.send_all(b"up")
    assert polls == [b"/pull?token=" + token] * 2
    assert pushed[0] == b"dXA=\n"
    await client.aclose()


async def test_stream_contract_misuse(nursery: trio.Nursery) -> None:
    port = await start_server(nursery)
    stream = await pht.open_pht_stream("127.0.0.1", port)
    with pytest.RaisesGroup(trio.BusyResourceError):
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.receive_some)
            inner.start_soon(stream.receive_some)
    await stream.aclose()
    with pytest.raises(TypeError, match="tls must be"):
        await pht.open_pht_stream("127.0.0.1", port, tls="yes")  # type: ignore[arg-type]
    with pytest.raises(pht.TunnelError, match="cannot connect"):
        await pht.open_pht_stream("127.0.0.1", 1)


async def test_trio_stream_conformance(nursery: trio.Nursery) -> None:
    """trio's own checks, on a (client stream, server stream) pair."""
    server_streams: trio.MemorySendChannel[pht.PHTStream]
    server_streams, incoming = trio.open_memory_channel[pht.PHTStream](1)

    async def handler(stream: pht.PHTStream) -> None:
        done = trio.Event()
        await server_streams.send(stream)
        await done.wait()  # the checks own the stream until the server stops

    port = await start_server(nursery, handler, push_timeout=60.0)

    async def stream_maker() -> tuple[trio.abc.Stream, trio.abc.Stream]:
        client = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
        async with trio.open_nursery() as inner:
            # The session starts with the first push, acknowledged once consumed.
            inner.start_soon(client.send_all, b"!")
            server = await incoming.receive()
            assert await server.receive_some() == b"!"
        return client, server

    with trio.fail_after(20):
        await trio.testing.check_two_way_stream(stream_maker, None)


async def test_unconsumed_push_gets_410_after_push_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """GOST's rule: a push is acknowledged once consumed, else 410 and the session ends."""
    stalled = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        await stalled.wait()  # never reads

    port = await start_server(nursery, handler, push_timeout=30.0)
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError, match="410"):
        await stream.send_all(b"nobody reads this")
    assert 30.0 <= trio.current_time() - start <= 35.0
    stalled.set()
    await stream.aclose()


async def test_slow_header_client_is_cut_and_others_carry_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Slowloris: a request head dribbled a byte at a time is cut at request_timeout."""
    port = await start_server(nursery, request_timeout=20.0, keepalive_timeout=300.0)
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    head = b"GET /pull?token=slowloris-token-0001 HTTP/1.1\r\nHost: x\r\nX-Pad: "

    async def dribble() -> None:
        for index in range(10_000):  # bounded: far more bytes than the deadline allows
            await slow.send_all(head[index : index + 1] or b"a")
            await trio.sleep(1.0)

    with pytest.raises(trio.BrokenResourceError):
        await dribble()
    assert 20.0 <= trio.current_time() - start <= 25.0
    good = await pht.open_pht_stream("127.0.0.1", port)
    await good.send_all(b"still serving")
    assert await receive_exactly(good, 13) == b"still serving"
    await good.aclose()
    await slow.aclose()


async def test_idle_keepalive_connection_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_server(nursery, keepalive_timeout=50.0)
    raw = await trio.open_tcp_stream("127.0.0.1", port)
    await raw.send_all(b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await raw.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    start = trio.current_time()
    with trio.fail_after(100):
        assert await raw.receive_some(4096) == b""  # the server closed it
    assert 50.0 <= trio.current_time() - start <= 52.0
    await raw.aclose()
