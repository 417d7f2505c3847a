"""The server's push fast path behaves exactly as h11 does.

``ServerConnection`` reads a canonical push (and writes its acknowledgement)
without h11, and hands anything else to h11 byte for byte. These tests run
two connections side by side, one with the fast path and one without, over
the same request bytes cut the same way and answered the same way, and
require the same events, the same exceptions (class and status hint), the
same states and the same response bytes at every step. Error messages are
not compared: the fast path words its own, the fallback passes h11's on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import pht

from .support import cut

Answer = tuple[str, int]  # (how to answer the next event, pieces to wait before answering)
Step = tuple[Any, ...]


def answer(conn: pht.ServerConnection, event: object, how: str) -> bytes:
    """Answer ``event`` as a server would, or as ``how`` says (misuse included)."""
    if isinstance(event, pht.PushData):  # delivered; refused mid-body, or read on
        if how in ("status", "gone"):
            conn.discard_push(410)
        return b""
    if how == "status":
        return conn.send_status(403)
    if how == "gone":
        return conn.send_status(410)
    if how == "odd-status":
        return conn.send_status(418)
    if how == "token":
        return conn.send_token("t0ken")
    if how == "pull" or isinstance(event, pht.PullRequest):
        data = conn.start_pull()
        data += conn.send_pull_data(b"pulled")
        data += conn.send_heartbeat()
        return data + conn.end_pull()
    if isinstance(event, pht.BadRequest):
        return conn.send_status(event.status_code)
    if isinstance(event, pht.AuthorizeRequest):
        return conn.send_token("t0ken")
    return conn.send_push_ack()


def transcript(
    pieces: list[bytes],
    answers: list[Answer],
    *,
    fast: bool,
    **options: int,
) -> list[Step]:
    """Everything a server connection does with ``pieces``, step by step."""
    conn = pht.ServerConnection(_fast_path=fast, **options)  # type: ignore[arg-type]
    steps: list[Step] = []

    def record(what: str, action: Callable[[], object]) -> tuple[bool, object]:
        """Run one call; False when the connection is done with (error or closed)."""
        try:
            result = action()
        except pht.RemoteProtocolError as exc:
            steps.append((what, "remote", exc.status_hint, conn.state))
            status = exc.status_hint
            record("refusal", lambda: conn.send_status(status))
            return False, None
        except pht.PHTError as exc:
            steps.append((what, type(exc).__name__, conn.state))
            return False, None
        steps.append((what, result, conn.state))
        return conn.state is not pht.ServerConnectionState.CLOSED, result

    plan = iter(answers)
    pending: object = None
    how, wait = "default", 0
    for piece in pieces:
        if not record("receive", functools.partial(conn.receive_data, piece))[0]:
            return steps
        while True:
            if pending is not None:
                if wait:  # answer later, after more bytes arrived
                    wait -= 1
                    break
                event, how, pending = pending, how, None
                if not record("answer", functools.partial(answer, conn, event, how))[0]:
                    return steps
            going, event = record("event", conn.next_event)
            if not going or event is pht.NEED_DATA:
                break
            pending = event
            how, wait = next(plan, ("default", 0))
    if pending is not None:
        record("answer", lambda: answer(conn, pending, how))
    steps.append(("end", conn.state))
    return steps


def assert_same(pieces: list[bytes], answers: list[Answer], **options: int) -> list[Step]:
    fast = transcript(pieces, answers, fast=True, **options)
    slow = transcript(pieces, answers, fast=False, **options)
    assert fast == slow
    return fast


# --- request streams ----------------------------------------------------------

TOKEN_CHARS = "0123456789abcdefghijklmnopqrstuv"
PRINTABLE = bytes(range(0x20, 0x7F))


MUTATIONS = [
    "method",
    "path",
    "version",
    "request line",
    "no host",
    "two hosts",
    "no length",
    "two lengths",
    "conflicting lengths",
    "length list",
    "signed length",
    "long length",
    "short length",
    "huge length",
    "separator",
    "bare LF",
    "obs-fold",
    "leading newline",
    "connection close",
    "expect",
    "chunked",
    "chunked framing",
    "gzip coding",
    "upgrade",
    "odd value byte",
]


@st.composite
def push_request(draw: st.DrawFn) -> bytes:
    """A canonical push (random token, body, headers), or one with a few mutations."""
    mutations = draw(
        st.one_of(
            st.just(frozenset[str]()),
            st.frozensets(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
        )
    )
    data = draw(st.binary(max_size=400))
    line = pht.encode_line(data)
    body = draw(
        st.sampled_from(
            [
                line,
                line,
                line,
                b"",
                b"\n",
                line + line,
                line[:-1],
                b"not base64!\n",
                b"a=b",
                b"eA\n==",
            ]
        )
    )
    token = draw(st.text(TOKEN_CHARS, max_size=24)).encode()
    query = draw(
        st.sampled_from(
            [b"token=%s"] * 4
            + [
                b"",
                b"token=%s&token=%s",
                b"token=%s&token=other",
                b"x=1&token=%s",
                b"token=%s%%41",
                b"token=a+%s",
                b"token",
                b"token=%s#frag",
                b"token=%s?x",
            ]
        )
    ).replace(b"%s", token)
    method = b"POST"
    if "method" in mutations:
        method = draw(st.sampled_from([b"GET", b"post", b"PUT", b"HEAD", b"CONNECT", b"P\xd6ST"]))
    path = b"/push"
    if "path" in mutations:
        path = draw(
            st.sampled_from(
                [b"/pull", b"/authorize", b"/other", b"http://h:1/push", b"/push/", b"/PUSH", b"*"]
            )
        )
    target = path + (b"?" + query if query else b"")
    version = b"HTTP/1.1"
    if "version" in mutations:
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.10"]))
    request_line = b"%s %s %s" % (method, target, version)
    if "request line" in mutations:
        request_line = draw(
            st.sampled_from(
                [
                    b"%s  %s %s" % (method, target, version),
                    b"%s %s %s " % (method, target, version),
                    b" %s %s %s" % (method, target, version),
                    b"%s %s\x01 %s" % (method, target, version),
                    b"%s %s" % (method, target),
                ]
            )
        )

    host = draw(st.sampled_from([b"127.0.0.1:8080", b"example.org", b""]))
    headers: list[tuple[bytes, bytes]] = []
    if "no host" not in mutations:
        headers.append((b"Host", host))
    if "two hosts" in mutations:
        headers.append((b"Host", b"other"))
    length = b"%d" % len(body)
    lengths = [length]
    for mutation, replacement in [
        ("no length", []),
        ("two lengths", [length, length]),
        ("conflicting lengths", [length, b"%d" % (len(body) + 1)]),
        ("length list", [b"%s, %s" % (length, length)]),
        ("signed length", [b"+" + length]),
        ("long length", [b"0" * 19 + length]),
        ("short length", [b"%d" % max(0, len(body) - 1)]),
        ("huge length", [b"1" + b"0" * 25]),
    ]:
        if mutation in mutations:
            lengths = replacement
    headers += [(b"Content-Length", value) for value in lengths]
    safe_extras = [
        (b"User-Agent", b"Go-http-client/1.1"),
        (b"Accept-Encoding", b"gzip"),
        (b"Content-Type", b"application/x-www-form-urlencoded"),
        (b"Content-Type", b"Multipart/Form-Data; boundary=x"),
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive"),
        (b"Connection", b"Keep-Alive, TE"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Via", b"1.1 squid"),
        (b"X-Custom", bytes(PRINTABLE[x % 95] for x in draw(st.binary(max_size=16)))),
        (b"X-Custom", b"a \t b"),
        (b"X-Empty", b""),
    ]
    headers += draw(st.lists(st.sampled_from(safe_extras), max_size=4))
    for mutation, header in [
        ("connection close", (b"Connection", b"Keep-Alive, Close")),
        ("expect", (b"Expect", b"100-continue")),
        ("chunked", (b"Transfer-Encoding", b"chunked")),
        ("gzip coding", (b"Transfer-Encoding", b"gzip")),
        ("upgrade", (b"Upgrade", b"websocket")),
    ]:
        if mutation in mutations:
            headers.append(header)
    if "odd value byte" in mutations:
        headers.append(
            (b"X-Odd", b"a" + draw(st.sampled_from([b"\xe9", b"\x01", b"\x7f", b"\r"])))
        )
    headers = draw(st.permutations(headers))
    case = draw(st.sampled_from(["as is", "as is", "lower", "upper"]))
    separator = draw(st.sampled_from([b": ", b": ", b":", b":\t", b":  "]))
    padding = draw(st.sampled_from([b"", b"", b" ", b"\t "]))
    lines = [request_line]
    for name, value in headers:
        name = name.lower() if case == "lower" else name.upper() if case == "upper" else name
        lines.append(name + separator + value + padding)
    if "separator" in mutations and len(lines) > 1:
        lines[-1] = lines[-1].replace(b":", b" :", 1)
    if "obs-fold" in mutations and len(lines) > 1:
        lines.insert(draw(st.integers(2, len(lines))), b" folded")
    line_end = b"\n" if "bare LF" in mutations else b"\r\n"
    head = line_end.join(lines) + b"\r\n\r\n"
    if "chunked framing" in mutations:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    prefix = b"\r\n" if "leading newline" in mutations else b""
    return prefix + head + body


other_request = st.sampled_from(
    [
        b"GET /pull?token=abc HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /pull?token=abc HTTP/1.0\r\n\r\n",
        b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\neA\r\n3\r\n==\n\r\n0\r\n\r\n",
    ]
)
requests = st.one_of(push_request(), push_request(), push_request(), other_request, st.binary())
answers = st.lists(
    st.tuples(
        st.sampled_from(["default"] * 8 + ["status", "gone", "odd-status", "token", "pull"]),
        st.sampled_from([0] * 6 + [1, 2]),
    ),
    max_size=8,
)
cuts = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=20)
limits = st.sampled_from(
    [
        {},
        {},
        {"max_push_line": 16},
        {"max_push_line": 40},
        {"max_header_size": 120},
        {"max_push_line": 24, "max_header_size": 200},
        {"_push_piece": 4},
        {"_push_piece": 8, "max_push_line": 40},
    ]
)


_HOST = b"Host: 127.0.0.1:8080\r\n"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # a head of exactly max_header_size bytes, written without optional spaces
    stream=[
        b"POST /push?token= HTTP/1.1\r\n" + _HOST + b"Content-Length: 1\r\n\r\n\n",
        b"POST /push?token= HTTP/1.1\r\nHost:127.0.0.1:8080\r\nContent-Length:1\r\n"
        b"X-Forwarded-For:10.0.0.1\r\nVia:1.1 squid\r\nX-Empty:\r\n\r\n\n",
    ],
    truncate=None,
    eof=False,
    sizes=[1],
    plan=[],
    options={"max_header_size": 120},
)
@example(  # a pull answer to a HEAD request with a body
    stream=[b"HEAD /push?token= HTTP/1.1\r\n" + _HOST + b"Content-Length: 1\r\n\r\n\n"],
    truncate=None,
    eof=False,
    sizes=[1],
    plan=[("pull", 0)],
    options={},
)
@given(
    stream=st.lists(requests, min_size=1, max_size=4),
    truncate=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
    eof=st.booleans(),
    sizes=cuts,
    plan=answers,
    options=limits,
)
def test_fast_path_is_indistinguishable_from_h11(
    stream: list[bytes],
    truncate: int | None,
    eof: bool,
    sizes: list[int],
    plan: list[Answer],
    options: dict[str, int],
) -> None:
    data = b"".join(stream)
    if truncate is not None:
        data = data[:truncate]
    pieces = cut(data, sizes) + ([b""] if eof else [])
    if eof and sizes[0] % 3 == 0:
        pieces.append(b"late")  # data after EOF: a local error in both
    assert_same(pieces, plan, **options)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=6),
    token=st.text(TOKEN_CHARS, min_size=20, max_size=20),
    sizes=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20),
)
def test_pipelined_canonical_pushes(data: list[bytes], token: str, sizes: list[int]) -> None:
    """Back-to-back pushes (as a pipelining client sends them) stay on the fast path."""
    client = pht.ClientChannel(pht.ClientConfig.build("h", authorize=False))
    wire = b""
    for item in data:
        wire += b"".join(client.push(token, item))
        client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert client.next_event() == pht.PushAcknowledged()
    steps = assert_same(cut(wire, sizes), [])
    events = [step[1] for step in steps if step[0] == "event" and step[1] is not pht.NEED_DATA]
    assert events == [pht.PushRequest(token=token, data=item) for item in data]
    answers = [step[1] for step in steps if step[0] == "answer"]
    assert answers == [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"] * len(data)


@pytest.mark.parametrize("piece", [65536, 1000, 4099])
@pytest.mark.parametrize(
    ("size", "options"),
    [
        (1 << 20, {}),
        (1 << 20, {"max_push_line": 1 << 20}),  # the line is longer: 413 mid-body
        (5000, {"max_push_line": 6000}),  # 6668 base64 bytes: 413 from the line buffer
        (4500, {"max_push_line": 6000}),  # fits, with Content-Length at the bound
    ],
)
def test_large_pushes(piece: int, size: int, options: dict[str, int]) -> None:
    line = pht.encode_line(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    head = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(line)
    request = head + line
    steps = assert_same(cut(request + request, [piece]), [], **options)
    events = [step[1] for step in steps if step[0] == "event" and step[1] is not pht.NEED_DATA]
    assert events  # each run produced the push, or its refusal


def test_body_slack_after_first_line_counts_toward_the_limit() -> None:
    """A body with more after its first line is refused by size only once seen in pieces."""
    body = b"eA==\n" + b"z" * 20
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    for sizes in ([len(request)], [len(request) - 20, 20], [1]):
        assert_same(cut(request, sizes), [], max_push_line=24)


def test_canonical_push_is_read_without_h11() -> None:
    """The fast path is taken: h11 never sees a canonical push."""
    conn = pht.ServerConnection()
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    conn.receive_data(request * 2)
    assert conn.next_event() == pht.PushRequest(token="t", data=b"x")
    assert conn.send_push_ack() == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert conn.next_event() == pht.PushRequest(token="t", data=b"x")
    conn.send_push_ack()
    assert conn._h11 is None  # never made: an idle connection holds no h11 machine
    assert conn._conn.their_state is conn._conn.our_state is h11.IDLE
    assert conn._conn.trailing_data == (b"", False)


@pytest.mark.parametrize("fast", [True, False])
def test_end_of_file_closes_without_looping(fast: bool) -> None:
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    conn = pht.ServerConnection(_fast_path=fast)
    conn.receive_data(request)
    conn.receive_data(b"")
    assert conn.next_event() == pht.PushRequest(token="t", data=b"x")
    conn.send_push_ack()
    assert conn.next_event() is pht.NEED_DATA
    assert conn.state is pht.ServerConnectionState.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(
            st.integers(min_value=1, max_value=100),
            st.sampled_from([32767, 32768, 32769, 65536, 70000]),
        ),
        min_size=1,
        max_size=6,
    ),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    after_push=st.booleans(),
)
def test_pull_framing_is_h11s(sizes: list[int], version: bytes, after_push: bool) -> None:
    """Pull chunks framed by hand are h11's bytes; an HTTP/1.0 pull stays raw."""
    push = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    pull = b"GET /pull?token=t %s\r\nHost: x\r\n\r\n" % version
    wires = []
    for fast in (True, False):
        conn = pht.ServerConnection(_fast_path=fast)
        wire = b""
        if after_push:
            conn.receive_data(push)
            assert conn.next_event() == pht.PushRequest(token="t", data=b"x")
            wire += conn.send_push_ack()
        conn.receive_data(pull)
        assert conn.next_event() == pht.PullRequest(token="t")
        wire += conn.start_pull()
        for size in sizes:
            wire += conn.send_pull_data(bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))
            wire += conn.send_heartbeat()
        wire += conn.end_pull()
        wires.append((wire, conn.state))
    assert wires[0] == wires[1]
    chunked = version == b"HTTP/1.1"
    assert (b"Transfer-Encoding: chunked\r\n" in wires[0][0]) is chunked
    assert wires[0][1] is (
        pht.ServerConnectionState.IDLE if chunked else pht.ServerConnectionState.CLOSED
    )


@pytest.mark.parametrize(
    "connection", [b"", b"Connection: keep-alive\r\n", b"Connection: Close\r\n"]
)
def test_open_pull_holds_no_h11(connection: bytes) -> None:
    """An open pull (an idle tunnel's only connection) drops h11, and ends as h11 would.

    The request read while the pull was open is served after its end, and a
    ``Connection: close`` pull closes the connection after it, on both paths.
    """
    pull = b"GET /pull?token=t HTTP/1.1\r\nHost: x\r\n%s\r\n" % connection
    push = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    results = []
    for fast in (True, False):
        conn = pht.ServerConnection(_fast_path=fast)
        conn.receive_data(pull)
        assert conn.next_event() == pht.PullRequest(token="t")
        wire = conn.start_pull()
        if fast:
            assert conn._h11 is None  # what an open pull holds: no h11 machine
        conn.receive_data(push[:30])  # pipelined behind the pull (a proxy's next request)
        wire += conn.send_pull_data(b"pulled") + conn.send_heartbeat()
        conn.receive_data(push[30:])
        wire += conn.end_pull()
        steps: list[object] = [conn.state]
        if conn.state is pht.ServerConnectionState.IDLE:
            event = conn.next_event()
            steps += [event, conn.send_push_ack() if event is not pht.NEED_DATA else b""]
        results.append((wire, steps))
    assert results[0] == results[1]
    closing = b"Close" in connection
    assert results[0][1][0] is (
        pht.ServerConnectionState.CLOSED if closing else pht.ServerConnectionState.IDLE
    )
    if not closing:
        assert results[0][1][1] == pht.PushRequest(token="t", data=b"x")


def test_pull_answer_to_a_head_request_is_refused_on_both_paths() -> None:
    """Found by hypothesis: the fast path framed pull data for a HEAD request by hand."""
    push = b"POST /push?token= HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n\n"
    head = b"HEAD /push?token= HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n\n"
    for method in (b"HEAD", b"CONNECT"):
        odd = head.replace(b"HEAD", method)
        steps = assert_same(cut(push + odd + push, [1]), [("default", 0), ("pull", 0)])
        assert any(step[1:2] == ("LocalProtocolError",) for step in steps)


def test_fast_path_answers_without_h11_and_words_its_own_errors() -> None:
    """A fast push is answered (even with a pull) while h11 never leaves IDLE."""
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\neA==\n"
    conn = pht.ServerConnection()
    conn.receive_data(request)
    assert conn.next_event() == pht.PushRequest(token="t", data=b"x")
    wire = conn.start_pull() + conn.send_pull_data(b"x") + conn.end_pull()
    assert wire.endswith(b"\r\n0\r\n\r\n")
    assert conn._conn.their_state is conn._conn.our_state is h11.IDLE
    conn.receive_data(request[:-2])
    assert conn.next_event() is pht.NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(pht.RemoteProtocolError, match="closed in the body after 3 of 5 bytes"):
        conn.next_event()
    with pytest.raises(pht.LocalProtocolError, match="after b''"):
        conn.receive_data(b"more")
    refused = pht.ServerConnection()
    refused.receive_data(request)
    refused.next_event()
    with pytest.raises(pht.LocalProtocolError, match="status 200-999, not 101"):
        refused.send_status(101)
