"""Unit tests of the sans-IO core: states, errors, bounds, tokens."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pht
from pht._codec import LineBuffer


def test_core_does_not_import_trio() -> None:
    code = (
        "import sys, pht, pht._resume;"
        "pht.ClientChannel, pht.ServerConnection, pht.SessionRegistry;"
        "bad = [m for m in ('trio', 'asyncio', 'socket', 'ssl') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "trio" not in out.stdout.split(","), out.stdout
    assert "asyncio" not in out.stdout.split(","), out.stdout


def test_tokens_are_long_random_base32hex() -> None:
    tokens = {pht.new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    for token in tokens:
        assert len(token) >= 20
        assert set(token) <= set("0123456789abcdefghijklmnopqrstuv")


def test_paths_are_validated() -> None:
    with pytest.raises(pht.LocalProtocolError, match="must start with '/'"):
        pht.Paths(push="push")
    with pytest.raises(pht.LocalProtocolError, match="two roles"):
        pht.Paths(push="/x", pull="/x")


def test_headers_are_validated() -> None:
    with pytest.raises(pht.LocalProtocolError, match="managed by pht"):
        pht.ClientConfig.build("h", headers={"Content-Length": "1"})
    with pytest.raises(pht.LocalProtocolError, match="invalid header"):
        pht.ClientConfig.build("h", headers=[("X-A", "1\r\nInjected: yes")])


def test_client_refuses_a_second_request_while_busy() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    channel.pull("tok")
    with pytest.raises(pht.LocalProtocolError, match="PULLING"):
        channel.push("tok", b"x")
    with pytest.raises(pht.LocalProtocolError, match="close_session"):
        pht.ClientChannel(pht.ClientConfig.build("h")).push("tok", b"")


def test_push_request_shape() -> None:
    channel = pht.ClientChannel(
        pht.ClientConfig.build("example:8443", host_header="front.example")
    )
    head, body = channel.push("a b", b"hello")
    assert head.startswith(b"POST /push?token=a%20b HTTP/1.1\r\nHost: front.example\r\n")
    assert b"content-length: 9\r\n" in head.lower()
    assert b"content-type" not in head.lower()
    assert body == b"aGVsbG8=\n"


def test_proxy_requests_are_absolute_form_with_credentials() -> None:
    config = pht.ClientConfig.build(
        "srv:8080", proxy_authority="srv:8080", proxy_credentials=("u", "p")
    )
    request = pht.ClientChannel(config).pull("tok")
    assert request.startswith(b"GET http://srv:8080/pull?token=tok HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in request


def test_client_pull_ending_mid_line_is_a_remote_error() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    channel.pull("tok")
    channel.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\naGVs\r\n0\r\n\r\n"
    )
    assert channel.next_event() == pht.PullStarted()
    with pytest.raises(pht.RemoteProtocolError, match="middle of a line"):
        channel.next_event()
    assert channel.state is pht.ChannelState.ERROR


def test_client_server_closing_mid_pull_is_a_remote_error() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    channel.pull("tok")
    channel.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert channel.next_event() == pht.PullStarted()
    channel.receive_data(b"")
    with pytest.raises(pht.RemoteProtocolError):
        channel.next_event()


def test_client_garbage_from_server_is_a_remote_error() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    channel.authorize()
    channel.receive_data(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(pht.RemoteProtocolError, match="malformed HTTP"):
        channel.next_event()
    assert channel.state is pht.ChannelState.ERROR


def test_client_bad_base64_in_pull_is_a_remote_error() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    channel.pull("tok")
    channel.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n!!!!\n\r\n")
    assert channel.next_event() == pht.PullStarted()
    with pytest.raises(pht.RemoteProtocolError, match="base64"):
        channel.next_event()


def server_events(data: bytes, **kwargs: int) -> tuple[pht.ServerConnection, list[object]]:
    conn = pht.ServerConnection(**kwargs)  # type: ignore[arg-type]
    conn.receive_data(data)
    result: list[object] = []
    while (event := conn.next_event()) is not pht.NEED_DATA:
        result.append(event)
        break
    return conn, result


def test_server_push_events() -> None:
    _, got = server_events(
        b"POST /push?token=t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    )
    assert got == [pht.PushRequest(token="t1", data=b"x")]
    _, got = server_events(b"POST /push?token=t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert got == [pht.CloseRequest(token="t1", reason="empty push")]
    _, got = server_events(
        b"POST /push?token=t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n\n"
    )
    assert got == [pht.PushRequest(token="t1", data=b"")]


def test_server_chunked_upload_is_accepted() -> None:
    request = (
        b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\neA\r\n3\r\n==\n\r\n0\r\n\r\n"
    )
    assert server_events(request)[1] == [pht.PushRequest(token="t", data=b"x")]


def test_server_oversized_push_is_413_and_closes() -> None:
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"A" * 100
    conn, got = server_events(request, max_push_line=16)
    assert got == [pht.BadRequest(status_code=413, reason="push body too large", token="t")]
    answer = conn.send_status(413)
    assert answer.startswith(b"HTTP/1.1 413 ")
    chunked = (
        b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"40\r\n" + b"A" * 64 + b"\r\n"
    )
    conn, got = server_events(chunked, max_push_line=16)
    assert isinstance(got[0], pht.BadRequest)
    assert got[0].status_code == 413
    assert b"connection: close" in conn.send_status(413).lower()
    assert conn.state is pht.ServerConnectionState.CLOSED


def test_server_oversized_headers_are_refused() -> None:
    conn = pht.ServerConnection(max_header_size=1024)
    conn.receive_data(b"GET /pull?token=t HTTP/1.1\r\nX-Big: " + b"a" * 4096)
    with pytest.raises(pht.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.status_hint == 431
    assert conn.send_status(info.value.status_hint).startswith(b"HTTP/1.1 431 ")
    assert conn.state is pht.ServerConnectionState.CLOSED


def test_server_pull_response_framing() -> None:
    conn, got = server_events(b"GET /pull?token=t HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == [pht.PullRequest(token="t")]
    head = conn.start_pull()
    assert b"X-Accel-Buffering: no\r\n" in head
    assert b"Transfer-Encoding: chunked\r\n" in head
    big = conn.send_pull_data(b"\0" * (70 * 1024))
    lines = big.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0].split(b"\n")
    assert [len(pht.decode_line(line)) for line in lines[:-1]] == [32768, 32768, 6144]
    assert conn.send_heartbeat() == b"1\r\n\n\r\n"
    assert conn.end_pull() == b"0\r\n\r\n"
    assert conn.state is pht.ServerConnectionState.IDLE
    with pytest.raises(pht.LocalProtocolError, match="IDLE"):
        conn.send_heartbeat()


def test_server_misuse_raises_local_error() -> None:
    conn = pht.ServerConnection()
    with pytest.raises(pht.LocalProtocolError):
        conn.send_push_ack()


def test_registry_lifecycle() -> None:
    tokens = iter(["tok-a", "tok-b", "tok-c"])
    registry: pht.SessionRegistry[object] = pht.SessionRegistry(
        backlog=2, token_source=lambda: next(tokens), issued_timeout=5, idle_timeout=50
    )
    assert registry.issue(0) == "tok-a"
    assert registry.issue(0) == "tok-b"
    assert registry.issue(0) is None  # backlog of unused tokens full: 429
    record = registry.lookup("tok-a", 1)
    assert isinstance(record, pht.SessionRecord)
    assert record.state is pht.SessionState.OPEN
    assert registry.issue(1) == "tok-c"
    assert [r.token for r in registry.expired(5.5)] == ["tok-b"]
    assert [r.token for r in registry.expired(100)] == ["tok-a", "tok-b", "tok-c"]
    registry.close("tok-a", 2)
    assert registry.lookup("tok-a", 3) is pht.LookupResult.CLOSED
    assert pht.LookupResult.CLOSED.status_code == 403
    modern = registry.lookup("client-made-token", 3)
    assert isinstance(modern, pht.SessionRecord)
    assert registry.lookup("", 3) is pht.LookupResult.UNKNOWN
    assert registry.lookup("x" * 500, 3) is pht.LookupResult.UNKNOWN


def test_strict_registry_accepts_only_issued_tokens() -> None:
    registry: pht.SessionRegistry[object] = pht.SessionRegistry(strict=True)
    assert registry.lookup("client-made-token", 0) is pht.LookupResult.UNKNOWN
    token = registry.issue(0)
    assert token is not None
    assert isinstance(registry.lookup(token, 0), pht.SessionRecord)


def test_registry_max_sessions() -> None:
    registry: pht.SessionRegistry[object] = pht.SessionRegistry(max_sessions=1)
    assert isinstance(registry.lookup("first-token", 0), pht.SessionRecord)
    assert registry.lookup("second-token", 0) is pht.LookupResult.FULL
    assert pht.LookupResult.FULL.status_code == 429


def test_line_buffer_bounds_incomplete_lines() -> None:
    buffer = LineBuffer(max_line=8)
    buffer.feed(b"abc\nde")
    assert list(buffer.lines()) == [b"abc"]
    buffer.feed(b"fghijkl")
    with pytest.raises(pht.RemoteProtocolError) as info:
        list(buffer.lines())
    assert info.value.status_hint == 413
