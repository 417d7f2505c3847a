"""The server's sans-IO bookkeeping (pht._server_core): no event loop, time passed in."""

from __future__ import annotations

import errno
import logging
import math
import subprocess
import sys
from typing import Any

import pytest

from pht._events import AuthorizeRequest, BadRequest, PushData, PushRequest
from pht._resume import PullMeter
from pht._server_core import (
    PARK_AFTER,
    PULL_PROGRESS,
    PULL_WRITE_SIZE,
    TEARDOWN_BATCH,
    UNPULLED_ROOM,
    AcceptFailures,
    ConnectionTimer,
    HeartbeatWheel,
    PullAction,
    PullInput,
    PullWriteTimer,
    Push,
    ServerCore,
    SessionBuffers,
    Timer,
    TimerWheel,
    Watchdog,
)
from pht._server_session import Input, PushVerdict, ServerOptions, ServerSession, ServerSessions

OPTIONS = ServerOptions(push_timeout=30.0, heartbeat_interval=8.0, max_buffered=64 * 1024)


class Recorder(SessionBuffers):
    """Buffers that record which waiters the core wakes."""

    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        super().__init__(session, remote_address, max_buffered)
        self.woken: list[str] = []

    def _wake_reader(self) -> None:
        self.woken.append("reader")

    def _wake_pushes(self) -> None:
        self.woken.append("pushes")

    def _wake_pull(self) -> None:
        self.woken.append("pull")

    def _wake_sender(self) -> None:
        self.woken.append("sender")

    def _wake_finished(self) -> None:
        self.woken.append("finished")


def make_stream(max_buffered: int = 64 * 1024) -> Recorder:
    session: ServerSession[Recorder] = ServerSession("t" * 22, 30.0, 8.0)
    return Recorder(session, "127.0.0.1:1", max_buffered)


# --- timers -------------------------------------------------------------------------


def test_timer_wheel_fires_at_the_slot_after_the_due_time_never_before() -> None:
    wheel: TimerWheel[Timer] = TimerWheel(1.0)
    early, late = Timer(), Timer()
    assert wheel.add(early, 2.5) is True  # first timer: the deadline got earlier
    assert wheel.add(late, 7.0) is False
    assert wheel.next_deadline() == 3.0
    assert wheel.due(2.9) == []
    assert wheel.due(3.0) == [early]
    assert wheel.next_deadline() == 7.0
    assert len(wheel) == 1
    wheel.discard(late)
    wheel.discard(late)  # twice is harmless
    assert wheel.next_deadline() == math.inf
    assert wheel.due(100.0) == []


def test_timer_wheel_refuses_a_tick_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="tick"):
        TimerWheel(0.0)


def test_heartbeat_wheel_wakes_pulls_that_are_due_and_refiles_the_others() -> None:
    wheel = HeartbeatWheel(8.0)
    busy: ServerSession[None] = ServerSession("a" * 22, 30.0, 8.0)
    idle: ServerSession[None] = ServerSession("b" * 22, 30.0, 8.0)
    busy.attach_pull("busy-pull", 0.0)
    idle.attach_pull("idle-pull", 0.0)
    _, wake = wheel.add(busy, "busy-pull")
    assert wake is True
    assert wheel.add(idle, "idle-pull")[1] is False
    busy.wrote(5.0)  # data went out: its heartbeat is due later
    assert wheel.due(7.9) == []
    assert wheel.due(8.0) == ["idle-pull"]
    assert wheel.next_deadline() == 13.0  # busy's new due time, the idle one's after that
    assert wheel.due(13.0) == ["busy-pull"]


def test_heartbeat_wheel_drops_a_replaced_pull_and_files_no_closed_one() -> None:
    wheel = HeartbeatWheel(8.0)
    session: ServerSession[None] = ServerSession("a" * 22, 30.0, 8.0)
    session.attach_pull("old", 0.0)
    wheel.add(session, "old")
    session.attach_pull("new", 1.0)
    assert wheel.due(9.0) == []  # "old" was replaced: nothing to wake
    session.end(Input.CLOSE)
    timer, wake = wheel.add(session, "new")
    assert wake is False
    assert timer.slot is None


class Item:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = 0

    def expire(self) -> None:
        self.expired += 1


def test_watchdog_expires_what_is_due_and_checks_several_times_per_timeout() -> None:
    watchdog = Watchdog(ServerOptions(push_timeout=4.0, request_timeout=60.0))
    assert watchdog.interval == 0.5
    due, later = Item(10.0), Item(20.0)
    watchdog.add(due)
    watchdog.add(later)
    assert watchdog.expire_due(10.0) == 1
    assert (due.expired, later.expired) == (1, 0)
    watchdog.discard(later)
    assert watchdog.expire_due(30.0) == 1  # only the one still watched


def test_connection_timer_keepalive_then_request_timeout_then_none_while_answering() -> None:
    options = ServerOptions(request_timeout=5.0, keepalive_timeout=100.0)
    timer = ConnectionTimer(options, 0.0)
    assert timer.deadline == 100.0
    timer.received(10.0)  # a request began: all of it within request_timeout
    assert timer.deadline == 15.0
    timer.received(14.0)  # more of it: the deadline stays (slowloris)
    assert timer.deadline == 15.0
    timer.answering()
    assert timer.deadline == math.inf
    timer.reading_on(20.0)
    assert timer.deadline == 25.0
    timer.idle(30.0)
    assert timer.deadline == 130.0
    assert timer.between_requests
    timer.handshaking(31.0)
    assert timer.deadline == 36.0


def test_watchdog_expiring_steps_leave_alone_what_changed_between_steps() -> None:
    """The adapter yields between steps: an item answered or discarded meanwhile is spared."""
    watchdog = Watchdog(ServerOptions())
    items = [Item(1.0) for _ in range(3)]
    for item in items:
        watchdog.add(item)
    steps = watchdog.expiring(5.0)
    first = next(steps)
    answered, closed = (item for item in items if item is not first)
    answered.deadline = 100.0  # a request arrived meanwhile
    watchdog.discard(closed)  # the connection closed meanwhile
    assert list(steps) == []
    assert first in items
    assert [item.expired for item in items if item is not first] == [0, 0]
    assert sum(item.expired for item in items) == 1


class ParkingTimer(ConnectionTimer):
    def __init__(self, options: ServerOptions, now: float, *, parks: bool) -> None:
        super().__init__(options, now, parks=parks)
        self.calls: list[str] = []

    def _park(self) -> None:
        self.calls.append("park")

    def _close(self) -> None:
        self.calls.append("close")


def test_connection_timer_parks_an_idle_connection_once_then_closes_it_at_keepalive() -> None:
    options = ServerOptions(request_timeout=5.0, keepalive_timeout=100.0)
    timer = ParkingTimer(options, 0.0, parks=True)
    assert timer.deadline == PARK_AFTER  # a new connection idles too
    timer.received(1.0)
    timer.answering()
    timer.idle(10.0)
    assert (timer.deadline, timer.idle_until) == (10.0 + PARK_AFTER, 110.0)
    timer.expire()
    assert timer.calls == ["park"]
    assert timer.deadline == 110.0  # the keep-alive allowance is unchanged
    timer.expire()
    assert timer.calls == ["park", "close"]


def test_connection_timer_parks_at_once_after_an_answer_that_ended_a_session() -> None:
    """Its client is about to hang up: parked now, still closed at the keep-alive deadline."""
    options = ServerOptions(request_timeout=5.0, keepalive_timeout=100.0)
    timer = ParkingTimer(options, 0.0, parks=True)
    timer.received(1.0)
    timer.answering()
    assert timer.idle(2.0) is False  # an ordinary answer: parked after PARK_AFTER
    timer.received(3.0)
    timer.answering()
    assert timer.idle(4.0, session_over=True) is True
    assert (timer.deadline, timer.idle_until) == (104.0, 104.0)
    timer.expire()
    assert timer.calls == ["close"]  # never parked twice
    plain = ParkingTimer(options, 0.0, parks=False)
    assert plain.idle(4.0, session_over=True) is False  # an adapter that cannot park
    assert plain.deadline == 104.0


def test_connection_timer_without_parking_and_mid_request_closes() -> None:
    options = ServerOptions(request_timeout=5.0, keepalive_timeout=100.0)
    plain = ParkingTimer(options, 0.0, parks=False)
    assert plain.deadline == 100.0
    plain.expire()
    assert plain.calls == ["close"]
    parking = ParkingTimer(options, 0.0, parks=True)
    parking.received(1.0)  # a request began: its timeout closes, never parks
    parking.expire()
    assert parking.calls == ["close"]
    handshaking = ParkingTimer(options, 0.0, parks=True)
    handshaking.handshaking(0.0)
    handshaking.expire()
    assert handshaking.calls == ["close"]
    # A keep-alive shorter than PARK_AFTER: nothing to gain, never parked.
    short = ParkingTimer(ServerOptions(keepalive_timeout=PARK_AFTER / 2), 0.0, parks=True)
    short.expire()
    assert short.calls == ["close"]


def test_pull_write_timer_pieces_and_expiry() -> None:
    cancelled = []

    class Writer(PullWriteTimer):
        def _cancel(self) -> None:
            cancelled.append(True)

    writer = Writer(60.0)
    assert writer.pieces(b"x") == (b"x",)
    pieces = writer.pieces(b"y" * (2 * PULL_PROGRESS + 1))
    assert [len(piece) for piece in pieces] == [PULL_PROGRESS, PULL_PROGRESS, 1]
    writer.writing(10.0)
    assert writer.deadline == 70.0
    writer.expire()
    assert writer.timed_out
    assert cancelled == [True]
    writer.written()
    assert writer.deadline == math.inf


# --- one session's buffers ----------------------------------------------------------


def test_take_hands_bytes_over_in_pieces_and_wakes_pushes() -> None:
    stream = make_stream()
    push = stream.push(b"abcdef", 0.0)
    assert isinstance(push, Push)
    assert push.step(0.0) is PushVerdict.WAIT
    assert stream.readable
    assert stream.woken == ["reader"]
    assert stream.take(4) == b"abcd"
    assert push.step(1.0) is PushVerdict.WAIT  # two bytes still untaken
    assert stream.take(4) == b"ef"
    assert stream.woken.count("pushes") == 2
    assert push.step(2.0) is PushVerdict.ACK
    assert stream.bytes_in == 6
    assert not stream.readable


def test_pushes_take_turns() -> None:
    stream = make_stream()
    first, second = stream.push(b"one", 0.0), stream.push(b"two", 0.0)
    assert isinstance(first, Push)
    assert isinstance(second, Push)
    assert first.step(0.0) is PushVerdict.WAIT
    assert second.step(0.0) is PushVerdict.WAIT  # waits for its turn, queues nothing
    assert stream.take(100) == b"one"
    assert first.step(1.0) is PushVerdict.ACK
    assert second.step(1.0) is PushVerdict.WAIT
    assert stream.take(100) == b"two"
    assert second.step(2.0) is PushVerdict.ACK


def test_a_push_not_taken_by_its_deadline_is_gone_and_its_bytes_dropped() -> None:
    stream = make_stream()
    push = stream.push(b"late", 0.0)
    assert isinstance(push, Push)
    assert push.step(0.0) is PushVerdict.WAIT
    assert push.deadline == 30.0
    push.expire()
    assert stream.woken[-1] == "pushes"
    assert push.step(30.0) is PushVerdict.GONE
    assert not stream.readable  # the client was told: it must not get them later
    assert stream.session.closed
    assert stream.session.lost_data
    assert stream.push(b"more", 31.0) is False


def test_a_push_to_a_closed_handler_is_gone() -> None:
    stream = make_stream()
    push = stream.push(b"data", 0.0)
    assert isinstance(push, Push)
    assert push.step(0.0) is PushVerdict.WAIT
    stream.close_handler()
    assert push.step(1.0) is PushVerdict.GONE


def test_an_empty_push_is_acknowledged_at_once() -> None:
    assert make_stream().push(b"", 0.0) is True


def test_outbound_room_is_small_until_a_pull_attaches() -> None:
    stream = make_stream(max_buffered=UNPULLED_ROOM * 4)
    stream.queue(b"x" * UNPULLED_ROOM)
    assert stream.must_wait_room
    stream.pull_attached()
    assert not stream.must_wait_room
    assert stream.woken == ["sender"]
    stream.queue(b"x" * UNPULLED_ROOM * 3)
    assert stream.must_wait_room
    assert stream.bytes_out == UNPULLED_ROOM * 4
    assert len(stream.take_outbound(1024)) == 1024
    assert not stream.must_wait_room
    assert stream.woken[-1] == "sender"


def test_pull_actions_in_order() -> None:
    stream = make_stream()
    session = stream.session
    session.attach_pull("pull", 0.0)
    assert stream.pull_action(1.0) is PullAction.WAIT
    stream.queue(b"data")
    assert stream.pull_action(1.0) is PullAction.WRITE
    assert stream.take_outbound() == b"data"
    assert stream.pull_action(8.0) is PullAction.HEARTBEAT
    assert session.heartbeat_due() == 16.0  # counted as written
    stream.queue(b"last")
    assert stream.close_handler() is True
    assert not stream.finished
    assert stream.close_handler() is False
    assert stream.pull_action(9.0) is PullAction.WRITE
    stream.take_outbound()
    assert stream.finished
    assert stream.woken[-1] == "finished"
    assert stream.pull_action(9.0) is PullAction.END


def test_a_session_that_refused_pushed_bytes_cuts_its_pull() -> None:
    stream = make_stream()
    stream.session.attach_pull("pull", 0.0)
    push = stream.push(b"x", 0.0)
    assert isinstance(push, Push)
    push.step(0.0)
    assert push.step(31.0) is PushVerdict.GONE
    stream.close_from_client()
    assert stream.at_eof
    assert stream.pull_action(31.0) is PullAction.CUT


# --- one listener -------------------------------------------------------------------


class Core(ServerCore[Recorder]):
    def __init__(self, options: ServerOptions = OPTIONS) -> None:
        super().__init__(options, ServerSessions(options), Recorder)
        self.started: list[Recorder] = []

    def _start_handler(self, stream: Recorder) -> None:
        self.started.append(stream)


def test_connection_budget_per_address() -> None:
    core = Core(ServerOptions.build(max_connections_per_address=2, trusted_proxies=["10.0.0.1"]))
    assert core.connection_opened("192.0.2.1")
    assert core.connection_opened("192.0.2.1")
    assert not core.connection_opened("192.0.2.1")
    core.connection_closed("192.0.2.1")
    assert core.connection_opened("192.0.2.1")
    assert all(core.connection_opened("10.0.0.1") for _ in range(5))  # a trusted proxy
    assert core.connection_opened(None)
    core.connection_closed("10.0.0.1")
    assert core.connections_per_address == {"192.0.2.1": 2}


def test_first_pushed_byte_starts_the_handler_and_a_late_push_gets_410() -> None:
    core = Core()
    token = "p" * 22
    conn = core.new_connection()

    def push(data: bytes, now: float) -> Push | int:
        return core.push(PushRequest(token=token, data=data), conn, "127.0.0.1:1", now)

    assert push(b"", 0.0) == 200
    assert core.started == []  # an empty push starts nothing
    waiting = push(b"hi", 0.0)
    assert isinstance(waiting, Push)
    assert len(core.started) == 1
    stream = core.started[0]
    core.handler_started(stream)
    assert waiting.step(0.0) is PushVerdict.WAIT
    verdict = waiting.step(30.0)
    assert core.push_over(waiting, verdict, 30.0) == 410
    assert push(b"again", 31.0) == 403  # closed token
    assert core.handler_done(stream, 31.0, 0.0) is True


def test_a_pull_starts_the_handler_and_files_its_heartbeat() -> None:
    core = Core()
    stream = core.stream_for("q" * 22, "127.0.0.1:1", None, 0.0)
    assert isinstance(stream, Recorder)
    replaced, start = core.attach_pull(stream, "pull", 0.0)
    assert replaced is None
    assert start
    timer, wake = core.pull_started(stream, "pull", start)
    assert wake
    assert core.started == [stream]
    assert core.wheel.next_deadline() == 8.0
    assert core.attach_pull(stream, "newer", 1.0) == ("pull", False)
    core.pull_over(stream, "pull", timer, hung_up=True, stalled=False, now=2.0)
    assert not stream.session.closed  # a newer pull took over
    core.pull_over(stream, "newer", None, hung_up=True, stalled=False, now=3.0)
    assert stream.session.closed
    assert stream.finished


def test_reaping_yields_after_every_batch() -> None:
    options = ServerOptions(lazy_timeout=1.0, max_sessions_per_address=None)
    core = Core(options)
    for number in range(TEARDOWN_BATCH * 2 + 1):
        stream = core.stream_for(f"{number:022d}", "127.0.0.1:1", None, 0.0)
        assert isinstance(stream, Recorder)
    yields = sum(1 for _ in core.reap(100.0))
    assert yields == 2
    records = list(core.sessions.registry)
    assert all(record.payload is None or record.payload.closed for record in records)


def test_the_pull_must_look_after_a_write_it_did_not_make_only_when_more_may_follow() -> None:
    stream = make_stream()
    stream.queue(b"x" * 10)
    assert stream.pull_must_look  # queued, not written yet
    stream.take_outbound()
    assert not stream.pull_must_look  # plain and unbounded: nothing more to do
    stream.queue(b"x" * (PULL_WRITE_SIZE + 1))
    stream.take_outbound()
    assert stream.pull_must_look  # the rest of a large write
    stream.take_outbound()
    assert not stream.pull_must_look
    stream.meter = PullMeter(max_bytes=1000)
    assert stream.pull_must_look  # a bounded response may have reached its end


def test_a_refused_piece_of_a_long_push_is_counted_and_its_body_dropped() -> None:
    refusals: list[int] = []
    core = Core()
    core.stats.refused = refusals.append  # type: ignore[method-assign,assignment]
    body = b"QUJD" * 40_000 + b"\n"  # a line longer than one piece
    head = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    for status, reason in ((410, "push not consumed in time"), (403, "push refused")):
        conn = core.new_connection()
        conn.receive_data(head % len(body) + body[:100_000])  # the line is still arriving
        assert isinstance(conn.next_event(), PushData)
        core.piece_delivered(conn, status)
        conn.receive_data(body[100_000:])  # read to its end, not decoded
        assert conn.next_event() == BadRequest(status_code=status, reason=reason)
    assert refusals == [410, 403]
    # A piece that was taken leaves the push to go on.
    conn = core.new_connection()
    conn.receive_data(head % len(body) + body[:100_000])
    assert isinstance(conn.next_event(), PushData)
    core.piece_delivered(conn, 200)
    conn.receive_data(body[100_000:])
    assert isinstance(conn.next_event(), PushData | PushRequest)
    assert refusals == [410, 403]


def test_a_push_answer_acknowledges_200_and_refuses_the_rest_counted() -> None:
    counted: list[object] = []
    core = Core()
    core.stats.push = lambda: counted.append("push")  # type: ignore[method-assign]
    core.stats.refused = counted.append  # type: ignore[method-assign,assignment]
    push = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nYWJj\n"
    conn = core.new_connection()
    conn.receive_data(push)
    assert isinstance(conn.next_event(), PushRequest)
    assert core.push_answer(conn, 200).startswith(b"HTTP/1.1 200 ")
    conn.receive_data(push)
    assert isinstance(conn.next_event(), PushRequest)
    assert core.push_answer(conn, 410).startswith(b"HTTP/1.1 410 ")
    assert counted == ["push", 410]


def test_drain_then_cut_ends_the_sessions_still_open() -> None:
    core = Core()
    stream = core.stream_for("r" * 22, "127.0.0.1:1", None, 0.0)
    assert isinstance(stream, Recorder)
    core.handler_started(stream)
    assert core.drain() == {stream}
    assert core.authorize("127.0.0.1:1", None, 1.0) == 503
    assert core.cut(2.0) == ("rrrrrrrr…",)
    assert stream.session.ended_by is Input.SHUTDOWN
    assert stream.at_eof


def test_server_core_imports_no_event_loop() -> None:
    code = (
        "import sys, pht._server_core;"
        "print(sorted(m for m in ('trio', 'asyncio', 'socket') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_requests_that_need_no_waiting_are_answered_and_counted() -> None:
    core = Core()
    conn = core.new_connection()
    conn.receive_data(b"POST /authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, AuthorizeRequest)
    answer = core.answer(conn, event, "127.0.0.1:1", 0.0)
    assert answer.startswith(b"HTTP/1.1 200")
    conn.receive_data(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    refused = conn.next_event()
    assert isinstance(refused, BadRequest)
    refusal = core.answer(conn, refused, "127.0.0.1:1", 0.0)
    assert refusal.startswith(b"HTTP/1.1 404")


def test_accept_failures_back_off_and_warn_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = AcceptFailures(interval=10.0, backoff=0.1)
    full = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="pht.server"):
        for tenth in range(250):  # 25 s of failures, one per backoff
            failures.failed(full, tenth * 0.1)
    assert len(caplog.records) == 3  # at 0 s, 10 s and 20 s
    assert "(100 times since the last warning)" in caplog.records[1].getMessage()
    with pytest.raises(OSError, match="broken"):
        failures.failed(OSError(errno.EBADF, "broken"), 30.0)


def test_pull_input_keeps_a_pipelined_request_and_stops_past_a_head() -> None:
    options = ServerOptions(max_header_size=64)
    conn = Core(options).new_connection()
    watch = PullInput(conn, options)
    assert watch.received(b"GET /authorize HTTP/1.1\r\n")
    assert not watch.received(b"X: " + b"a" * 64)  # more than a request head
    assert not PullInput(conn, options).received(b"")  # the client closed
