"""The client's push fast path behaves exactly as the pure-h11 channel.

A channel with the fast path (hand-written push heads, hand-parsed plain
acknowledgements) and a reference channel without it are given the same
requests and the same response bytes, cut the same way: the request bytes,
the events, the exception classes and the states must be the same, whatever
the bytes are (canonical acknowledgements, other statuses, bodies, chunked
answers, HTTP/1.0, garbage, mutations of all of these, early EOFs).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pht
from pht import _client

from .support import cut

TOKEN = "0jlvkbo4h2ijdbnmiu20"


def make_channel(config: pht.ClientConfig, *, fast: bool) -> pht.ClientChannel:
    saved = _client._FAST_PATH
    _client._FAST_PATH = fast
    try:
        return pht.ClientChannel(config)
    finally:
        _client._FAST_PATH = saved


@dataclass
class Round:
    """One request and the server's bytes for it, cut into pieces."""

    close: bool
    data: bytes
    pieces: list[bytes]
    eof: bool


def run(channel: pht.ClientChannel, rounds: list[Round]) -> list[object]:
    """Drive ``channel``; return everything observable, up to the first exception."""
    trace: list[object] = []
    try:
        for step in rounds:
            if step.close:
                trace.append(("request", channel.close_session(TOKEN)))
            else:
                trace.append(("request", b"".join(channel.push(TOKEN, step.data))))
            trace.append(("state", channel.state))
            for piece in [*step.pieces, *([b""] if step.eof else [])]:
                channel.receive_data(piece)
                while (event := channel.next_event()) is not pht.NEED_DATA:
                    trace.append(event)
                trace.append(("state", channel.state))
    except Exception as exc:  # h11 itself can fail oddly (AttributeError): both must agree
        trace.append(("raised", type(exc), channel.state))
    return trace


def ack(
    *,
    reason: bytes = b"OK",
    headers: tuple[bytes, ...] = (b"Content-Length: 0",),
    version: bytes = b"HTTP/1.1",
    status: bytes = b"200",
    body: bytes = b"",
) -> bytes:
    lines = [b"%s %s %s" % (version, status, reason), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CANONICAL = [
    ack(),
    ack(headers=(b"Date: Sun, 29 Nov 2026 07:00:00 GMT", b"Content-Length: 0")),
    ack(headers=(b"content-length:0", b"Connection: close")),
    ack(headers=(b"Content-Length: 0", b"Connection: Keep-Alive")),
    ack(headers=(b"Content-Length: \t0 \t", b"X-Empty:")),
    ack(reason=b""),
    ack(reason=b"Fine by me"),
]
UNUSUAL = [
    ack(status=b"403", reason=b"Forbidden"),
    ack(status=b"410", reason=b"Gone"),
    ack(status=b"404", headers=(b"Content-Length: 19",), body=b"404 page not found\n"),
    ack(headers=(b"Content-Length: 3",), body=b"abc"),
    ack(headers=(b"Transfer-Encoding: chunked",), body=b"3\r\nabc\r\n0\r\n\r\n"),
    ack(version=b"HTTP/1.0"),
    ack(headers=(b"Content-Length: 0", b"Content-Length: 0")),
    ack(headers=(b"Content-Length: 0", b"Content-Length: 1"), body=b"x"),
    ack(headers=(b"Content-Length: 0", b"Connection: upgrade, close")),
    ack(headers=()),
    ack(status=b"100", reason=b"Continue", headers=()) + ack(),
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    ack(headers=(b"Content-Length: 0", b" folded")),
    ack(headers=(b"X-Long: " + b"a" * 5000, b"Content-Length: 0")),
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"",
]


@st.composite
def response_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["canonical", "unusual", "mutated", "garbage", "two"]))
    if kind == "garbage":
        return draw(st.binary(max_size=80))
    base = draw(st.sampled_from(CANONICAL if kind != "unusual" else UNUSUAL))
    if kind == "two":
        return base + draw(st.sampled_from(CANONICAL + UNUSUAL))
    if kind == "mutated" and base:
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["flip", "insert", "delete"]))
            byte = draw(st.sampled_from(list(b"\r\n :0\t\x00\x7fa1")))
            if action == "flip":
                data[at] = byte
            elif action == "insert":
                data.insert(at, byte)
            elif len(data) > 1:
                del data[at]
        return bytes(data)
    return base


@st.composite
def rounds(draw: st.DrawFn) -> list[Round]:
    result = []
    for _ in range(draw(st.integers(1, 3))):
        response = draw(response_bytes())
        sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=6))
        result.append(
            Round(
                close=draw(st.booleans()),
                data=draw(st.binary(min_size=1, max_size=40)),
                pieces=cut(response, sizes),
                eof=draw(st.integers(0, 5)) == 0,
            )
        )
    return result


configs = st.sampled_from(
    [
        pht.ClientConfig.build("127.0.0.1:8080", authorize=False),
        pht.ClientConfig.build("h", headers={"X-Test": "abc", "Accept": "*/*"}),
        pht.ClientConfig.build(
            "srv:80",
            proxy_authority="srv:80",
            proxy_credentials=("u", "p"),
            host_header="front.example",
        ),
    ]
)


@settings(max_examples=600, deadline=None)
@given(config=configs, script=rounds())
def test_fast_path_matches_h11(config: pht.ClientConfig, script: list[Round]) -> None:
    fast = run(make_channel(config, fast=True), script)
    reference = run(make_channel(config, fast=False), script)
    assert fast == reference


@pytest.mark.parametrize("response", CANONICAL)
def test_canonical_acknowledgements_take_the_fast_path(response: bytes) -> None:
    channel = make_channel(pht.ClientConfig.build("h"), fast=True)
    channel.push(TOKEN, b"x")
    channel.receive_data(response)
    assert channel.next_event() == pht.PushAcknowledged()
    assert channel._fast_in is not None  # h11 was never needed
    closes = b"close" in response.lower()
    assert channel.state is (pht.ChannelState.CLOSED if closes else pht.ChannelState.IDLE)


def test_push_heads_are_those_h11_writes() -> None:
    config = pht.ClientConfig.build("h:1", headers=[("X-A", "1"), ("x-b", "two words")])
    fast, reference = make_channel(config, fast=True), make_channel(config, fast=False)
    for size in (1, 2, 100, 5000, 64 * 1024, 300_000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        pieces = fast.push("t k", data)
        assert b"".join(pieces) == b"".join(reference.push("t k", data))
        # A large body comes as its text and its newline (no copy of the line).
        assert len(pieces) == (3 if size >= 64 * 1024 else 2)
        for channel in (fast, reference):
            channel.receive_data(ack())
            assert channel.next_event() == pht.PushAcknowledged()
    assert fast.close_session("other") == reference.close_session("other")


def test_fast_path_hands_over_to_h11_for_a_pull_and_comes_back() -> None:
    """The pull of a channel goes through h11; a later push takes the fast path again."""
    channel = make_channel(pht.ClientConfig.build("h"), fast=True)
    channel.push(TOKEN, b"x")
    channel.receive_data(ack())
    assert channel.next_event() == pht.PushAcknowledged()
    channel.pull(TOKEN)
    channel.receive_data(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\n\r\n0\r\n\r\n"
    )
    assert channel.next_event() == pht.PullStarted()
    assert channel.next_event() == pht.Heartbeat()
    assert channel.next_event() == pht.PullEnded(session_over=False)
    assert channel.state is pht.ChannelState.IDLE
    channel.push(TOKEN, b"y")
    assert channel._fast_in is not None
    channel.receive_data(ack())
    assert channel.next_event() == pht.PushAcknowledged()
