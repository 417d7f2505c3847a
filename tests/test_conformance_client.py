"""Feed the responses of GOST's own server, as captured, to the sans-IO client.

The client's requests are compared with those GOST's client sent in the same
captures (method, path, token placement, Content-Length, body, custom
headers), and GOST's answers must produce the right events.
"""

from __future__ import annotations

import h11
import pytest

import pht

from .transcripts import raw_http_exchanges, wire_pieces


def parse_request(data: bytes) -> tuple[h11.Request, bytes]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            return request, body


def events(channel: pht.ClientChannel, data: bytes, *, byte_at_a_time: bool) -> list[object]:
    result: list[object] = []
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_at_a_time else [data]
    for piece in pieces:
        channel.receive_data(piece)
        while (event := channel.next_event()) is not pht.NEED_DATA:
            result.append(event)
    return result


def comparable(request: h11.Request, body: bytes) -> tuple[bytes, bytes, bytes | None, bytes]:
    headers = dict(request.headers)
    return request.method, request.target, headers.get(b"content-length"), body


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_legacy_go_client_session(byte_at_a_time: bool) -> None:
    """Authorize, pull, push, heartbeat-and-end, re-poll, push: as GOST legacy."""
    pieces = wire_pieces("legacy_go_client_wire.txt")
    config = pht.ClientConfig.build("127.0.0.1:18702", headers={"X-Test": "abc"})
    control, pusher = pht.ClientChannel(config), pht.ClientChannel(config)
    server = [p.data for p in pieces if p.direction == "S>C"]
    gost_requests = [parse_request(p.data) for p in pieces if p.direction == "C>S"]

    ours = control.authorize()
    assert comparable(*parse_request(ours)) == comparable(*gost_requests[0])
    assert (b"x-test", b"abc") in parse_request(ours)[0].headers
    assert events(control, server[0], byte_at_a_time=byte_at_a_time) == [
        pht.Authorized(token="nqirv7vovj4duofe4n00")
    ]
    assert control.state is pht.ChannelState.IDLE

    ours = control.pull("nqirv7vovj4duofe4n00")
    assert comparable(*parse_request(ours)) == comparable(*gost_requests[1])
    assert events(control, server[1], byte_at_a_time=byte_at_a_time) == [pht.PullStarted()]

    ours_push = b"".join(pusher.push("nqirv7vovj4duofe4n00", b"hello\n"))
    assert comparable(*parse_request(ours_push)) == comparable(*gost_requests[2])
    data_events = events(control, server[2], byte_at_a_time=byte_at_a_time)
    assert data_events == [pht.DataReceived(data=b"hello\n")]
    assert events(pusher, server[3], byte_at_a_time=byte_at_a_time) == [pht.PushAcknowledged()]

    # Legacy: a heartbeat, then the response ends: poll again, the session lives.
    assert events(control, server[4], byte_at_a_time=byte_at_a_time) == [
        pht.Heartbeat(),
        pht.PullEnded(session_over=False),
    ]
    ours = control.pull("nqirv7vovj4duofe4n00")
    assert comparable(*parse_request(ours)) == comparable(*gost_requests[3])
    assert events(control, server[5] + server[6], byte_at_a_time=byte_at_a_time) == [
        pht.PullStarted(),
        pht.DataReceived(data=b"again\n"),
    ]


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_modern_go_client_session(byte_at_a_time: bool) -> None:
    """Self-made token, pull first, heartbeat keeps the response open, close notification."""
    pieces = wire_pieces("modern_go_client_wire.txt")
    token = "0jlvkbo4h2ijdbnmiu20"
    config = pht.ClientConfig.build("127.0.0.1:18702", headers={"X-Test": "abc"}, authorize=False)
    puller, pusher = pht.ClientChannel(config), pht.ClientChannel(config)
    gost_requests = [parse_request(p.data) for p in pieces if p.direction == "C>S"]
    by_conn = {1: [p.data for p in pieces if p.direction == "S>C" and p.connection == 1]}
    push_answers = [p.data for p in pieces if p.direction == "S>C" and p.connection == 2]

    assert comparable(*parse_request(puller.pull(token))) == comparable(*gost_requests[0])
    pull_bytes = by_conn[1]
    assert events(puller, pull_bytes[0], byte_at_a_time=byte_at_a_time) == [pht.PullStarted()]
    push = b"".join(pusher.push(token, b"hello\n"))
    assert comparable(*parse_request(push)) == comparable(*gost_requests[1])
    assert events(pusher, push_answers[0], byte_at_a_time=byte_at_a_time) == [
        pht.PushAcknowledged()
    ]
    assert events(puller, pull_bytes[1], byte_at_a_time=byte_at_a_time) == [
        pht.DataReceived(data=b"hello\n")
    ]
    assert events(puller, pull_bytes[2], byte_at_a_time=byte_at_a_time) == [pht.Heartbeat()]
    assert puller.state is pht.ChannelState.PULLING
    # The close notification is an empty POST, exactly as GOST's modern client sends it.
    closer = pht.ClientChannel(config)
    assert comparable(*parse_request(closer.close_session(token))) == comparable(*gost_requests[3])
    # Modern: the end of the pull response is the end of the session.
    assert events(puller, pull_bytes[3] + pull_bytes[4], byte_at_a_time=byte_at_a_time) == [
        pht.DataReceived(data=b"again\n"),
        pht.PullEnded(session_over=True),
    ]


def test_legacy_pull_of_a_closed_session_is_eof() -> None:
    """Legacy server, far side closed: the re-poll gets an empty body: EOF."""
    captured = raw_http_exchanges("legacy_raw_http.txt")["18b"]
    channel = pht.ClientChannel(pht.ClientConfig.build("127.0.0.1"))
    channel.pull("cdc0gvemf38p6sjhpcbg")
    assert events(channel, captured.response, byte_at_a_time=False) == [
        pht.PullStarted(),
        pht.PullEnded(session_over=True),
    ]


@pytest.mark.parametrize(
    ("section", "status"), [("4b", 403), ("5", 400), ("13", 400), ("16", 404)]
)
def test_gost_refusals_become_rejected_events(section: str, status: int) -> None:
    captured = raw_http_exchanges("legacy_raw_http.txt")[section]
    channel = pht.ClientChannel(pht.ClientConfig.build("127.0.0.1"))
    if captured.request.startswith(b"GET /pull"):
        channel.pull("t0ken")
        kind = pht.RequestKind.PULL
    else:
        channel.push("t0ken", b"x")
        kind = pht.RequestKind.PUSH
    (event,) = events(channel, captured.response, byte_at_a_time=False)
    assert isinstance(event, pht.Rejected)
    assert (event.kind, event.status_code) == (kind, status)
    assert channel.state is pht.ChannelState.CLOSED


def test_gost_bulk_pull_chunks_reassemble() -> None:
    """GOST cuts pull lines into 2048-byte chunks; lines are rebuilt across them."""
    line = pht.encode_line(bytes(range(256)) * 200)  # one 51200-byte read
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(line[i : i + 2048]), line[i : i + 2048])
        for i in range(0, len(line), 2048)
    )
    head = b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
    channel = pht.ClientChannel(pht.ClientConfig.build("h", authorize=False))
    channel.pull("tok")
    got = events(channel, head + chunked + b"0\r\n\r\n", byte_at_a_time=False)
    assert got == [
        pht.PullStarted(),
        pht.DataReceived(data=bytes(range(256)) * 200),
        pht.PullEnded(session_over=True),
    ]
