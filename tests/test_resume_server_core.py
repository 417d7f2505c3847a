"""The resume extension's server rules, sans-IO: the core, the session machine, the connection.

Requests are raw HTTP bytes fed to the core's :class:`~pht.ServerConnection`;
answers are the bytes it writes; time is passed in. What each test checks is
one rule of docs/resume.md (negotiation, the grace period, tombstones,
bounded pulls...); :mod:`tests.test_resume_server` checks the same on real
sockets for every adapter.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pht._events import BadRequest, CloseRequest, PullRequest, PushRequest
from pht._resume import GoneReason
from pht._server import ServerConnection
from pht._server_core import PullAction, Push, ServerCore, SessionBuffers
from pht._server_session import Input, PushVerdict, ServerOptions, ServerSession, ServerSessions

PEER = "192.0.2.1:1000"
OPTIONS = ServerOptions(push_timeout=30.0, heartbeat_interval=8.0, resume_window=64 * 1024)


class Stream(SessionBuffers):
    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        super().__init__(session, remote_address, max_buffered)
        self.woken: list[str] = []

    def _wake_pull(self) -> None:
        self.woken.append("pull")

    def _wake_sender(self) -> None:
        self.woken.append("sender")


class Core(ServerCore[Stream]):
    def __init__(self, options: ServerOptions = OPTIONS) -> None:
        super().__init__(options, ServerSessions(options), Stream)
        self.started: list[Stream] = []

    def _start_handler(self, stream: Stream) -> None:
        self.started.append(stream)
        self.handler_started(stream)


def request(core: Core, raw: bytes) -> tuple[ServerConnection, Any]:
    conn = core.new_connection()
    conn.receive_data(raw)
    return conn, conn.next_event()


def pull_request(token: str, *headers: str) -> bytes:
    fields = "".join(f"{header}\r\n" for header in headers)
    return f"GET /pull?token={token} HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode()


def push_request(token: str, data: bytes | None, *headers: str) -> bytes:
    body = b"" if data is None else base64.b64encode(data) + b"\n"
    fields = "".join(f"{header}\r\n" for header in headers)
    head = f"POST /push?token={token} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return (head + fields + "\r\n").encode() + body


def resume_push(token: str, data: bytes | None, offset: int, ack: int) -> bytes:
    return push_request(token, data, "PHT-Resume: 1", f"PHT-Offset: {offset}", f"PHT-Ack: {ack}")


def open_pull(
    core: Core, token: str, *headers: str, now: float = 0.0
) -> tuple[ServerConnection, Stream | int]:
    conn, event = request(core, pull_request(token, *headers))
    assert isinstance(event, PullRequest)
    stream = core.pull_for(conn, event, PEER, now)
    if isinstance(stream, Stream):
        _, start = core.attach_pull(stream, conn, now)
        core.pull_started(stream, conn, start)
    return conn, stream


def drain_pull(core: Core, conn: ServerConnection, stream: Stream, now: float = 0.0) -> bytes:
    """The pull's body bytes until it waits or ends (heartbeats included)."""
    out = bytearray()
    while True:
        action = stream.pull_action(now)
        if action is PullAction.WRITE:
            out += conn.send_pull_data(stream.take_outbound())
        elif action is PullAction.HEARTBEAT:
            out += conn.send_heartbeat()
        elif action is PullAction.END:
            out += conn.end_pull()
            return bytes(out)
        else:
            return bytes(out)


def lines_of(body: bytes) -> tuple[bytes, int]:
    """The data of the complete lines in a chunked pull body cut anywhere, and their count."""
    text = bytearray()
    rest = body
    while rest:
        size_line, sep, after = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        text += after[:size]
        rest = after[size + 2 :]
        if size == 0 or len(after) < size:
            break
    complete = bytes(text[: text.rfind(b"\n") + 1])
    lines = [line for line in complete.split(b"\n") if line]
    return b"".join(base64.b64decode(line) for line in lines), len(lines)


def resume_session(core: Core, token: str) -> tuple[ServerConnection, Stream]:
    conn, stream = open_pull(core, token, "PHT-Resume: 1")
    assert isinstance(stream, Stream)
    assert stream.session.resume is not None
    return conn, stream


# --- connection: the fields on both paths ------------------------------------------


def test_fields_are_read_on_the_fast_path_and_on_h11() -> None:
    core = Core()
    conn, event = request(core, resume_push("t" * 22, b"abc", 7, 9))
    assert isinstance(event, PushRequest)
    assert conn._fast_request  # a canonical push: read without h11
    assert (conn.resume.offset, conn.resume.ack) == (7, 9)
    raw = resume_push("t" * 22, b"abc", 7, 9).replace(
        b"Host: x", b"Host: x\r\nExpect: 100-continue"
    )
    conn, event = request(core, raw)
    assert isinstance(event, PushRequest)
    assert not conn._fast_request
    assert (conn.resume.offset, conn.resume.ack) == (7, 9)


@pytest.mark.parametrize("expect", ["", "Expect: 100-continue"])
def test_a_malformed_resume_header_is_400_and_names_no_session(expect: str) -> None:
    raw = push_request("t" * 22, b"abc", "PHT-Offset: 007", *([expect] if expect else []))
    conn, event = request(Core(), raw)
    assert isinstance(event, BadRequest)
    assert (event.status_code, event.token) == (400, None)  # the session is not affected
    assert conn.send_status(400).startswith(b"HTTP/1.1 400 ")


def test_with_resume_off_the_headers_are_not_even_read() -> None:
    core = Core(ServerOptions(resume=False))
    conn, event = request(core, push_request("t" * 22, b"abc", "PHT-Offset: 007"))
    assert isinstance(event, PushRequest)
    conn, stream = open_pull(core, "u" * 22, "PHT-Resume: 1")
    assert isinstance(stream, Stream)
    assert stream.session.resume is None
    assert b"PHT-" not in conn.start_pull()


# --- negotiation ------------------------------------------------------------------


def test_negotiation_only_on_the_opening_pull_and_only_for_version_1() -> None:
    core = Core(ServerOptions())
    conn, _ = open_pull(core, "a" * 22, "PHT-Resume: 1; window=100000; future=3")
    head = conn.start_pull()
    assert b"PHT-Resume: 1; window=100000; grace=60\r\nPHT-Offset: 0\r\n" in head
    conn, other = open_pull(core, "b" * 22, "PHT-Resume: 2")
    assert isinstance(other, Stream)
    assert other.session.resume is None
    assert b"PHT-" not in conn.start_pull()
    conn, plain = open_pull(core, "c" * 22)
    assert isinstance(plain, Stream)
    assert plain.session.resume is None
    # A later pull cannot turn a plain session into a resume one.
    conn, again = open_pull(core, "c" * 22, "PHT-Resume: 1")
    assert again is plain
    assert plain.session.resume is None
    assert b"PHT-" not in conn.start_pull()


def test_bytes_queued_before_the_negotiation_are_replayed_from_offset_0() -> None:
    core = Core()
    stream = core.stream_for("a" * 22, PEER, None, 0.0)
    assert isinstance(stream, Stream)
    stream.queue(b"early")
    conn, same = resume_session(core, "a" * 22)
    assert same is stream
    conn.start_pull()
    assert lines_of(drain_pull(core, conn, stream))[0] == b"early"


def test_the_opening_pull_again_replays_unless_the_client_acknowledged() -> None:
    core = Core()
    token = "a" * 22
    conn, stream = resume_session(core, token)
    stream.queue(b"hello")
    conn, again = open_pull(core, token, "PHT-Resume: 1")  # its answer was lost
    assert again is stream
    conn.start_pull()
    assert lines_of(drain_pull(core, conn, stream))[0] == b"hello"
    conn, acked = open_pull(core, token, "PHT-Resume: 1", "PHT-Ack: 5")
    assert acked is stream
    conn, refused = open_pull(core, token, "PHT-Resume: 1")
    assert refused == 409
    assert conn.send_status(409).startswith(b"HTTP/1.1 409 Conflict\r\n")


# --- pushes -----------------------------------------------------------------------


def step_push(core: Core, stream: Stream, raw: bytes, now: float = 0.0) -> tuple[int, bytes]:
    conn, event = request(core, raw)
    assert isinstance(event, PushRequest)
    push = core.push(event, conn, PEER, now)
    if isinstance(push, Push):
        verdict = push.step(now)
        if verdict is PushVerdict.WAIT:
            while stream.readable:
                stream.take(1 << 20)
            verdict = push.step(now)
        status = core.push_over(push, verdict, now)
    else:
        status = push
    answer = conn.send_push_ack() if status == 200 else conn.send_status(status)
    return status, answer


def test_push_offsets_are_checked_at_the_push_turn() -> None:
    core = Core()
    token = "a" * 22
    _, stream = resume_session(core, token)
    status, answer = step_push(core, stream, resume_push(token, b"abc", 0, 0))
    assert status == 200
    assert b"PHT-Received: 3\r\n" in answer
    assert step_push(core, stream, resume_push(token, b"abc", 0, 0))[0] == 200  # a retry
    status, answer = step_push(core, stream, resume_push(token, b"xy", 9, 0))
    assert answer.startswith(b"HTTP/1.1 409 Conflict\r\n")
    assert b"PHT-Received: 3\r\n" in answer
    assert not stream.session.closed
    assert stream.bytes_in == 3  # the duplicate and the gap delivered nothing


def test_a_resume_push_without_its_headers_ends_the_session() -> None:
    core = Core()
    token = "a" * 22
    _, stream = resume_session(core, token)
    status, _ = step_push(core, stream, push_request(token, b"abc"))
    assert status == 400
    assert stream.session.closed
    conn, event = request(core, resume_push(token, b"x", 0, 0))
    assert core.push(event, conn, PEER, 1.0) == 410
    assert b"PHT-Gone: aborted\r\n" in conn.send_status(410)


def test_acks_free_the_replay_buffer_and_let_the_handler_send_again() -> None:
    core = Core()
    token = "a" * 22
    conn, stream = resume_session(core, token)
    conn.start_pull()
    stream.queue(bytes(64 * 1024 + 10))  # 10 bytes more than the window
    assert stream.must_wait_room
    drain_pull(core, conn, stream)
    assert stream.must_wait_room  # sent is not acknowledged
    stream.woken.clear()
    step_push(core, stream, resume_push(token, b"", 0, 32 * 1024))  # ack-only
    assert not stream.must_wait_room
    assert "pull" in stream.woken
    assert "sender" in stream.woken


def test_the_close_notification_checks_the_count() -> None:
    core = Core()
    token = "a" * 22
    _, stream = resume_session(core, token)
    step_push(core, stream, resume_push(token, b"abc", 0, 0))
    conn, event = request(core, resume_push(token, None, 5, 0))
    assert isinstance(event, CloseRequest)
    answer = core.answer(conn, event, PEER, 1.0)
    assert answer.startswith(b"HTTP/1.1 409")
    assert b"PHT-Received: 3\r\n" in answer
    conn, event = request(core, resume_push(token, None, 3, 0))
    answer = core.answer(conn, event, PEER, 1.0)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"PHT-Received: 3\r\n" in answer
    assert stream.session.closed
    conn, event = request(core, resume_push(token, None, 3, 0))
    assert b"PHT-Gone: closed\r\n" in core.answer(conn, event, PEER, 2.0)


# --- the grace period and tombstones ------------------------------------------------


def test_a_lost_pull_starts_the_grace_period_then_the_session_expires() -> None:
    core = Core()
    token = "a" * 22
    conn, stream = resume_session(core, token)
    core.pull_over(stream, conn, None, hung_up=True, stalled=False, now=10.0)
    assert stream.session.detached
    assert not stream.session.closed
    step_push(core, stream, resume_push(token, b"x", 0, 0), now=40.0)  # restarts the period
    list(core.reap(99.0))
    assert stream.session.detached
    list(core.reap(100.0))
    assert stream.session.closed
    assert stream.finished
    assert stream.session.ended_by is Input.GRACE_EXPIRED
    conn, gone = open_pull(core, token, "PHT-Resume: 1", "PHT-Ack: 0", now=101.0)
    assert gone == 410
    assert b"PHT-Gone: expired\r\n" in conn.send_status(410)


def test_a_pull_that_comes_back_in_time_ends_the_grace_period() -> None:
    core = Core()
    token = "a" * 22
    conn, stream = resume_session(core, token)
    core.pull_over(stream, conn, None, hung_up=True, stalled=True, now=0.0)
    assert stream.session.detached
    _, back = open_pull(core, token, "PHT-Resume: 1", "PHT-Ack: 0", now=59.0)
    assert back is stream
    assert not stream.session.detached
    assert len(core.sessions.grace) == 0
    list(core.reap(200.0))
    assert not stream.session.closed


def test_sessions_in_grace_are_bounded_and_count_against_their_address() -> None:
    options = ServerOptions(max_grace_sessions=1, max_sessions_per_address=2)
    core = Core(options)
    first_conn, first = resume_session(core, "a" * 22)
    second_conn, second = resume_session(core, "b" * 22)
    assert core.stream_for("c" * 22, PEER, None, 0.0) == 429  # two sessions for the address
    core.pull_over(first, first_conn, None, hung_up=True, stalled=False, now=0.0)
    assert first.session.detached
    assert core.stream_for("c" * 22, PEER, None, 0.0) == 429  # a session in grace still counts
    core.pull_over(second, second_conn, None, hung_up=True, stalled=False, now=0.0)
    assert second.session.closed  # no room for a second grace period: it ends at once
    assert first.session.detached


def test_legacy_grace_keeps_a_plain_session_across_a_reopened_pull() -> None:
    core = Core(ServerOptions(legacy_grace=True))
    token = "a" * 22
    conn, stream = open_pull(core, token)
    assert isinstance(stream, Stream)
    assert stream.session.resume is None
    core.pull_over(stream, conn, None, hung_up=True, stalled=False, now=0.0)
    assert stream.session.detached
    conn, back = open_pull(core, token, now=5.0)
    assert back is stream
    stream.queue(b"on")
    conn.start_pull()
    assert lines_of(drain_pull(core, conn, stream))[0] == b"on"
    # Without legacy_grace, today's rule: the hang-up ends the session.
    core = Core()
    conn, plain = open_pull(core, token)
    assert isinstance(plain, Stream)
    core.pull_over(plain, conn, None, hung_up=True, stalled=False, now=0.0)
    assert plain.session.closed


def test_the_end_of_the_stream_ends_pulls_until_the_client_acknowledged_it() -> None:
    core = Core()
    token = "a" * 22
    conn, stream = resume_session(core, token)
    conn.start_pull()
    stream.queue(b"last words")
    stream.close_handler()
    body = drain_pull(core, conn, stream)
    assert body.endswith(b"0\r\n\r\n")
    assert lines_of(body)[0] == b"last words"
    core.pull_over(stream, conn, None, hung_up=False, stalled=False, now=1.0)
    assert not stream.session.closed
    assert not stream.finished
    conn, again = open_pull(core, token, "PHT-Resume: 1", "PHT-Ack: 10", now=2.0)
    assert again is stream
    head = conn.start_pull()
    assert b"PHT-Offset: 10\r\nPHT-End: 10\r\n" in head
    assert stream.finished  # every byte acknowledged: the handler's part is over
    assert drain_pull(core, conn, stream) == b"0\r\n\r\n"
    core.handler_done(stream, 3.0, 0.0)
    assert core.sessions.tombstones.reason(token, 4.0) is GoneReason.CLOSED


# --- bounded pulls -----------------------------------------------------------------


def test_a_bounded_pull_ends_after_its_bytes_at_a_line_boundary() -> None:
    core = Core(ServerOptions(pull_max_bytes=10_000, legacy_grace=False))
    token = "a" * 22
    data = bytes(range(256)) * 200  # 51,200 bytes
    conn, stream = open_pull(core, token)
    assert isinstance(stream, Stream)
    conn.start_pull()
    stream.queue(data)
    got = bytearray()
    responses = 0
    while True:
        body = drain_pull(core, conn, stream)
        payload, _ = lines_of(body)
        assert len(base64.b64encode(payload)) <= 10_000
        got += payload
        responses += 1
        if len(got) == len(data):
            assert not body.endswith(b"0\r\n\r\n")  # under the bound: the pull waits on
            break
        assert body.endswith(b"\n\r\n0\r\n\r\n")  # a complete line, then the end
        core.pull_over(stream, conn, None, hung_up=False, stalled=False, now=0.0)
        assert not stream.session.closed  # the session goes on
        conn, _ = open_pull(core, token)
        conn.start_pull()
    assert bytes(got) == data
    assert responses == 7  # 7,500 bytes each (10,000 of base64), then the rest


def test_a_bounded_pull_ends_at_its_time_with_a_heartbeat_if_it_carried_nothing() -> None:
    core = Core(ServerOptions(pull_max_ms=200))
    conn, stream = open_pull(core, "a" * 22, now=1.0)
    assert isinstance(stream, Stream)
    conn.start_pull()
    assert stream.pull_deadline() == pytest.approx(1.2)
    assert stream.pull_action(1.1) is PullAction.WAIT
    assert stream.pull_action(1.2) is PullAction.HEARTBEAT
    assert stream.pull_action(1.2) is PullAction.END
    conn, stream = open_pull(core, "a" * 22, now=2.0)
    assert isinstance(stream, Stream)
    stream.queue(b"x")
    assert stream.pull_action(2.0) is PullAction.WRITE
    stream.take_outbound()
    assert stream.pull_action(2.1) is PullAction.WAIT
    assert stream.pull_action(2.2) is PullAction.END


def test_bounded_pull_options_are_validated() -> None:
    with pytest.raises(ValueError, match="pull_max_bytes"):
        ServerOptions(pull_max_bytes=0)
    with pytest.raises(ValueError, match="pull_max_ms"):
        ServerOptions(pull_max_ms=0)
    with pytest.raises(TypeError, match="pull_max_ms"):
        ServerOptions(pull_max_ms=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resume_window"):
        ServerOptions(resume_window=1024)
    with pytest.raises(ValueError, match="grace_period"):
        ServerOptions(grace_period=0)


# --- any cut, the same stream ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 200_000),
    cuts=st.lists(st.floats(0, 1), min_size=1, max_size=4),
    writes=st.integers(1, 5),
)
def test_pulls_cut_anywhere_and_reattached_deliver_every_byte_once(
    size: int, cuts: list[float], writes: int
) -> None:
    core = Core(ServerOptions(resume_window=256 * 1024))
    token = "a" * 22
    data = bytes((i * 7 + i // 251) & 0xFF for i in range(size))
    conn, stream = resume_session(core, token)
    step = -(-size // writes)
    for start in range(0, size, step):
        stream.queue(data[start : start + step])
    stream.close_handler()
    got = bytearray()
    for cut in [*cuts, None]:
        head = conn.start_pull()
        offset = int(head.split(b"PHT-Offset: ")[1].split(b"\r\n")[0])
        assert offset == len(got)
        body = drain_pull(core, conn, stream)
        received, _ = lines_of(body if cut is None else body[: int(len(body) * cut)])
        got += received
        core.pull_over(stream, conn, None, hung_up=cut is not None, stalled=False, now=0.0)
        conn, again = open_pull(core, token, "PHT-Resume: 1", f"PHT-Ack: {len(got)}")
        assert again is stream
    assert bytes(got) == data
    assert stream.finished  # the last pull's ack covered the end


def test_a_refused_request_that_ends_a_resume_session_buries_it_as_aborted() -> None:
    core = Core(ServerOptions(max_push_line=64))
    token = "a" * 22
    _, stream = resume_session(core, token)
    conn, event = request(core, resume_push(token, bytes(100), 0, 0))
    assert isinstance(event, BadRequest)
    assert event.status_code == 413
    assert core.answer(conn, event, PEER, 1.0).startswith(b"HTTP/1.1 413")
    assert stream.session.ended_by is Input.REFUSED
    assert core.sessions.tombstones.reason(token, 2.0) is GoneReason.ABORTED
