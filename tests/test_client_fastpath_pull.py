"""The client's pull fast path (chunk framing parsed by hand) behaves as h11.

The same pull responses, chunked any way (extensions, upper-case hex,
trailing blanks, trailers), cut into any TCP segments, with malformed
framing, truncations and EOFs, are fed to a channel with the fast path and
to a pure-h11 reference: the data, the structure events, the exception
classes and the states must agree. Heartbeats are compared as liveness
only: the fast path reports a batch of lines as one event.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pht
from pht import _client

from .support import cut

TOKEN = "0jlvkbo4h2ijdbnmiu20"
HEAD = b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"


def make_channel(config: pht.ClientConfig, *, fast: bool) -> pht.ClientChannel:
    saved = _client._FAST_PATH
    _client._FAST_PATH = fast
    try:
        return pht.ClientChannel(config)
    finally:
        _client._FAST_PATH = saved


def run(
    channel: pht.ClientChannel, responses: list[list[bytes]], eof: bool
) -> tuple[list[object], bytes]:
    """Pull, feed each response's pieces; return the structure trace and the data."""
    trace: list[object] = []
    data = bytearray()
    try:
        for number, pieces in enumerate(responses):
            if channel.state is not pht.ChannelState.IDLE:
                break
            channel.pull(TOKEN)
            last = number == len(responses) - 1
            for piece in [*pieces, *([b""] if eof and last else [])]:
                channel.receive_data(piece)
                while (event := channel.next_event()) is not pht.NEED_DATA:
                    if isinstance(event, pht.DataReceived):
                        data += event.data
                    elif not isinstance(event, pht.Heartbeat):
                        trace.append(event)
            trace.append(("state", channel.state))
    except Exception as exc:  # both must fail the same way
        trace.append(("raised", type(exc), channel.state))
    return trace, bytes(data)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A pull body's line text and the data it carries."""
    text, data = bytearray(), bytearray()
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 3)) == 0:
            text += b"\n"
        else:
            piece = draw(st.binary(min_size=1, max_size=300))
            text += pht.encode_line(piece)
            data += piece
    return bytes(text), bytes(data)


@st.composite
def chunked(draw: st.DrawFn, text: bytes) -> bytes:
    out, offset = bytearray(), 0
    while offset < len(text):
        size = draw(st.integers(1, 200))
        piece = text[offset : offset + size]
        offset += len(piece)
        digits = b"%x" % len(piece)
        style = draw(st.integers(0, 5))
        if style == 1:
            digits = digits.upper()
        elif style == 2:
            digits = b"00" + digits
        elif style == 3:
            digits += b";name=value"
        elif style == 4:
            digits += b" \t"
        out += digits + b"\r\n" + piece + b"\r\n"
    out += draw(st.sampled_from([b"0\r\n\r\n", b"0;x=y\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"]))
    return bytes(out)


def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not buffer:
            break
        at = draw(st.integers(0, len(buffer) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        byte = draw(st.sampled_from(list(b"\r\n;0aAzG \t")))
        if action == "flip":
            buffer[at] = byte
        elif action == "insert":
            buffer.insert(at, byte)
        elif action == "delete":
            del buffer[at]
        else:
            del buffer[at:]
    return bytes(buffer)


@st.composite
def scripts(draw: st.DrawFn) -> tuple[list[list[bytes]], bytes, bool, bool]:
    responses, expected, malformed = [], bytearray(), False
    for _ in range(draw(st.integers(1, 3))):
        text, data = draw(bodies())
        kind = draw(st.sampled_from(["chunked"] * 4 + ["mutated", "length", "ten"]))
        if kind == "length":
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text)
        elif kind == "ten":  # an HTTP/1.0 proxy: close-delimited, the last response
            response = b"HTTP/1.0 200 OK\r\n\r\n" + text
            malformed = True
        else:
            response = HEAD + draw(chunked(text))
            if kind == "mutated":
                response = HEAD + mutate(draw, response[len(HEAD) :])
                malformed = True
        if draw(st.booleans()):  # stray bytes after the response
            response += b"HTTP/1.1 200 OK\r\n"
            malformed = True
        expected += data
        sizes = draw(st.lists(st.integers(1, 500), min_size=1, max_size=6))
        responses.append(cut(response, sizes))
    return responses, bytes(expected), draw(st.booleans()), malformed


@settings(max_examples=400, deadline=None)
@given(script=scripts(), legacy=st.booleans())
def test_pull_fast_path_matches_h11(
    script: tuple[list[list[bytes]], bytes, bool, bool], legacy: bool
) -> None:
    responses, expected, eof, malformed = script
    config = pht.ClientConfig.build("h", authorize=legacy)
    fast_trace, fast_data = run(make_channel(config, fast=True), responses, eof)
    reference_trace, reference_data = run(make_channel(config, fast=False), responses, eof)
    assert fast_trace == reference_trace
    if fast_trace and fast_trace[-1][0] == "raised":  # type: ignore[index]
        # On an error, the lines of the failing batch may be dropped by one of them.
        if not malformed:
            assert expected.startswith(fast_data)
            assert expected.startswith(reference_data)
    else:
        assert fast_data == reference_data
        if not malformed:
            assert fast_data == expected


def test_malformed_chunk_framing_is_a_remote_error_in_both() -> None:
    for body in (
        b"4\r\naGVsXX",  # bad footer
        b"4\r\naGVs\r\nXX",  # bad size line
        b"zz\r\n",  # bad size
        b"4\r\naGVs\r\n" + b"1" * 300,  # size line that never ends
    ):
        for fast in (True, False):
            channel = make_channel(pht.ClientConfig.build("h"), fast=fast)
            channel.pull(TOKEN)
            channel.receive_data(HEAD)
            assert channel.next_event() == pht.PullStarted()
            channel.receive_data(body)
            channel.receive_data(b"")
            try:
                while channel.next_event() is not pht.NEED_DATA:
                    pass
            except pht.RemoteProtocolError:
                assert channel.state is pht.ChannelState.ERROR
            else:
                raise AssertionError(f"no error for {body!r} (fast={fast})")


def test_bulk_pull_takes_the_fast_path() -> None:
    payload = bytes(range(256)) * 1000
    line = pht.encode_line(payload)
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(line[i : i + 2048]), line[i : i + 2048])
        for i in range(0, len(line), 2048)
    )
    channel = make_channel(pht.ClientConfig.build("h", authorize=False), fast=True)
    channel.pull(TOKEN)
    channel.receive_data(HEAD)
    assert channel.next_event() == pht.PullStarted()
    assert channel._chunk_in is not None
    received = bytearray()
    for piece in cut(body + b"0\r\n\r\n", [65536]):
        channel.receive_data(piece)
        while (event := channel.next_event()) is not pht.NEED_DATA:
            if isinstance(event, pht.DataReceived):
                received += event.data
            else:
                assert event == pht.PullEnded(session_over=True)
    assert received == payload
    assert channel.state is pht.ChannelState.IDLE


_BODY = b"5\r\naGk=\n\r\n0\r\n\r\n"


@given(
    head=st.sampled_from(
        [
            HEAD,
            b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD,  # an interim answer first
            b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n",  # bare LF line ends
            b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 20_000 + b"\r\n\r\n",  # too long a head
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\n",  # a refusal
            b"\r\n" + HEAD,  # a blank line before the status line
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",  # cut short
        ]
    ),
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=4),
    eof=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_pull_heads_given_to_h11_alone_match_h11(head: bytes, sizes: list[int], eof: bool) -> None:
    """The fast path finds the head's end itself and hands h11 only the head."""
    config = pht.ClientConfig.build("h", authorize=False)
    responses = [cut(head + _BODY, sizes)]
    fast = run(make_channel(config, fast=True), responses, eof)
    reference = run(make_channel(config, fast=False), responses, eof)
    assert fast == reference


def test_bad_chunk_end_is_reported_in_pht_words() -> None:
    channel = make_channel(pht.ClientConfig.build("h"), fast=True)
    channel.pull(TOKEN)
    channel.receive_data(HEAD)
    assert channel.next_event() == pht.PullStarted()
    channel.receive_data(b"4\r\naGVsXX")
    with pytest.raises(pht.RemoteProtocolError, match=r"ends in b'XX', not in CRLF"):
        channel.next_event()
