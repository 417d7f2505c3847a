"""Hypothesis over raw bytes for both sans-IO ends (the drivers are in tests/fuzz/).

The client side gets arbitrary server answers to authorize, push, pull and
close; the server side gets request heads followed by anything. Only pht's
protocol errors may escape, refusals are ``4xx``, and no event carries more
than was fed (see :mod:`tests.fuzz.drivers` for the promises checked).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pht

from .fuzz.drivers import KINDS, drive_client, drive_server, refusal_status_ok, split


@contextlib.contextmanager
def hang_guard(seconds: int = 5) -> Iterator[None]:
    """Turn an endless loop in synchronous code into a test failure."""

    def expire(signum: int, frame: object) -> None:
        raise AssertionError(f"still running after {seconds} s: an endless loop")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


cuts = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20)

RESPONSE_HEADS = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    b"",
]

REQUEST_HEADS = [
    b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n",
    b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data\r\n"
    b"Content-Length: 8\r\n\r\n",
    b"GET /pull?token=abc HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /pull?token=abc HTTP/1.0\r\n\r\n",
    b"",
]


def chunked(body: bytes, sizes: list[int]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in split(body, sizes)) + b"0\r\n\r\n"


@st.composite
def pull_bodies(draw: st.DrawFn) -> bytes:
    """Mostly-valid pull bodies: base64 lines, heartbeats and garbage, chunked or not."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=200).map(pht.encode_line),
                st.just(b"\n"),
                st.binary(max_size=50),
            ),
            max_size=8,
        )
    )
    body = b"".join(parts)
    if draw(st.booleans()):
        return chunked(body, draw(cuts))
    return body


answers = st.one_of(
    st.binary(max_size=1500),
    st.tuples(st.sampled_from(RESPONSE_HEADS), pull_bodies()).map(b"".join),
    st.tuples(st.sampled_from(RESPONSE_HEADS), st.binary(max_size=800)).map(b"".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), authorize=st.booleans(), answer=answers, sizes=cuts)
def test_client_channel_survives_any_answer(
    kind: str, authorize: bool, answer: bytes, sizes: list[int]
) -> None:
    with hang_guard():
        drive_client(kind, authorize, split(answer, sizes))


def test_client_driver_sees_good_answers() -> None:
    """The driver itself works: a well-formed pull yields the data."""
    wire = RESPONSE_HEADS[0] + chunked(pht.encode_line(b"hello") + b"\n", [3])
    events = drive_client("pull", False, split(wire, [7]))
    assert pht.DataReceived(data=b"hello") in events
    assert events[-1] == pht.PullEnded(session_over=True)


requests = st.one_of(
    st.binary(max_size=1500),
    st.tuples(st.sampled_from(REQUEST_HEADS), st.binary(max_size=800)).map(b"".join),
    st.tuples(st.sampled_from(REQUEST_HEADS), pull_bodies()).map(b"".join),
    st.lists(st.sampled_from(REQUEST_HEADS), max_size=4).map(b"".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests, sizes=cuts)
def test_server_connection_answers_any_request_with_200_or_a_refusal(
    request: bytes, sizes: list[int]
) -> None:
    with hang_guard():
        statuses = drive_server(split(request, sizes))
    for status in statuses:
        assert status == 200 or refusal_status_ok(status)


def test_server_driver_sees_good_requests() -> None:
    wire = b"".join(REQUEST_HEADS[3:5])
    assert drive_server(split(wire, [5])) == [200, 200]


EOF_AFTER = {
    "authorize": b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n",
    "push": b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\naGk=\n",
    "form push": b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: multipart/form-data\r\nContent-Length: 8\r\n\r\n=9=6 -n6",
}


@pytest.mark.parametrize("piece_size", [1, 2, 7, 1000])
@pytest.mark.parametrize("name", list(EOF_AFTER))
def test_server_next_event_after_eof_returns(name: str, piece_size: int) -> None:
    """``receive_data(b"")`` between requests, then ``next_event()``: NEED_DATA, CLOSED."""
    with hang_guard():
        assert drive_server(split(EOF_AFTER[name], [piece_size])) == [200]
        conn = pht.ServerConnection()
        conn.receive_data(EOF_AFTER[name])
        assert not isinstance(conn.next_event(), pht.NeedData)
        if name == "authorize":
            conn.send_token("abc")
        else:
            conn.send_push_ack()
        conn.receive_data(b"")
        assert conn.next_event() is pht.NEED_DATA
        assert conn.state is pht.ServerConnectionState.CLOSED


def test_head_request_to_an_unknown_path_gets_a_bodyless_404() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(b"HEAD /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, pht.BadRequest)
    assert event.status_code == 404
    answer = conn.send_status(404)
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert answer.endswith(b"\r\n\r\n")  # headers only
