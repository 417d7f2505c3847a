"""The resume extension's sans-IO core (``pht._resume``): headers, buffers, schedules.

The property tests at the end drive a whole resume exchange built from these
pieces (pushes, ack-only pushes, pulls of base64 lines, with the headers
formatted and parsed as on the wire) and cut it wherever hypothesis likes:
a push lost before or after the server got it, answers lost, pulls cut in
the middle of a line, requests reordered. Both application streams must
arrive byte-identical, each byte once, and no replay buffer may pass its bound.
"""

from __future__ import annotations

import ast
import base64
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pht import LocalProtocolError, RemoteProtocolError, TunnelError
from pht._resume import (
    DEFAULT_GRACE,
    DEFAULT_WINDOW,
    MAX_OFFSET,
    MAX_WINDOW,
    MIN_WINDOW,
    AckOutOfRange,
    Backoff,
    ClientResume,
    GoneReason,
    GraceTable,
    InboundTracker,
    OffsetGap,
    PullMeter,
    Reconnect,
    ReplayBuffer,
    RequestFields,
    ResponseFields,
    ResumeConflict,
    ResumeHeaderError,
    ResumeOffer,
    ResumeSettings,
    ResumeTerms,
    ServerResume,
    SessionGone,
    Tombstones,
    format_offset,
    parse_gone,
    parse_offset,
)


def test_the_core_does_no_io_reads_no_clock_and_draws_no_random_numbers() -> None:
    """Time and randomness are passed in; nothing here may reach for them."""
    source = Path(__file__).parents[1] / "pht" / "_resume.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    allowed = {"__future__", "bisect", "enum", "re", "collections.abc", "dataclasses", "._errors"}
    assert imported <= allowed, imported - allowed


# --- header values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"0", 0), (b"7", 7), (b" 42\t", 42), (b"9223372036854775807", MAX_OFFSET)],
)
def test_offsets_parse(value: bytes, expected: int) -> None:
    assert parse_offset(value) == expected
    assert parse_offset(format_offset(expected)) == expected


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b" ",
        b"-1",
        b"+1",
        b"01",
        b"1 2",
        b"1.0",
        b"0x10",
        b"1e3",
        b"\xd9\xa3",  # an Arabic-Indic digit: str.isdigit() would say yes
        b"9223372036854775808",  # 2**63
        b"10000000000000000000",  # 20 digits
        b"1" * 300,
    ],
)
def test_malformed_offsets_are_refused_with_400(value: bytes) -> None:
    with pytest.raises(ResumeHeaderError) as info:
        parse_offset(value, "PHT-Ack")
    assert info.value.status_hint == 400
    assert "PHT-Ack" in str(info.value)


@pytest.mark.parametrize("value", [-1, MAX_OFFSET + 1, True, 1.0, "1"])
def test_format_offset_refuses_what_a_peer_could_not_parse(value: object) -> None:
    with pytest.raises(LocalProtocolError, match="resume offset"):
        format_offset(value)  # type: ignore[arg-type]


def test_offer_round_trip_and_tolerance() -> None:
    assert ResumeOffer().format() == b"1"
    assert ResumeOffer.parse(b"1") == ResumeOffer()
    assert ResumeOffer(window=MIN_WINDOW).format() == b"1; window=65536"
    assert ResumeOffer.parse(b"1 ;window = 65536") == ResumeOffer(window=MIN_WINDOW)
    # Unknown parameters are room for later versions: ignored.
    assert ResumeOffer.parse(b"1; future-thing=3") == ResumeOffer()
    # A window out of range is clamped: the server decides anyway.
    assert ResumeOffer.parse(b"1; window=1") == ResumeOffer(window=MIN_WINDOW)
    assert ResumeOffer.parse(b"1; window=%d" % MAX_OFFSET) == ResumeOffer(window=MAX_WINDOW)
    # Another version is not an offer this server understands: no resume.
    assert ResumeOffer.parse(b"2") is None
    assert ResumeOffer.parse(b"2; window=65536") is None


@pytest.mark.parametrize(
    "value",
    [b"", b"yes", b"01", b"1;", b"1; window", b"1; Window=3", b"1; w=1; w=2", b"1; w=x", b"1,2"],
)
def test_malformed_offers_are_refused(value: bytes) -> None:
    with pytest.raises(ResumeHeaderError):
        ResumeOffer.parse(value)


def test_terms_round_trip_and_strictness() -> None:
    terms = ResumeTerms(window=DEFAULT_WINDOW, grace=DEFAULT_GRACE)
    assert terms.format() == b"1; window=4194304; grace=60"
    assert ResumeTerms.parse(terms.format()) == terms
    assert ResumeTerms.parse(b"1;grace=5;window=65536;later=1") == ResumeTerms(
        window=MIN_WINDOW, grace=5
    )
    with pytest.raises(ResumeHeaderError, match="lacks 'grace'"):
        ResumeTerms.parse(b"1; window=65536")
    with pytest.raises(ResumeHeaderError, match="not offered"):
        ResumeTerms.parse(b"2; window=65536; grace=5")
    with pytest.raises(ResumeHeaderError, match="out of range"):
        ResumeTerms.parse(b"1; window=10; grace=5")
    with pytest.raises(ResumeHeaderError, match="out of range"):
        ResumeTerms.parse(b"1; window=65536; grace=0")


def test_settings_validate_and_grant_the_smaller_window() -> None:
    settings = ResumeSettings()
    assert settings.grant(ResumeOffer()) == ResumeTerms(window=DEFAULT_WINDOW, grace=60)
    assert settings.grant(ResumeOffer(window=MIN_WINDOW)).window == MIN_WINDOW
    small = ResumeSettings(window=MIN_WINDOW, grace=5)
    assert small.grant(ResumeOffer(window=MAX_WINDOW)) == ResumeTerms(window=MIN_WINDOW, grace=5)
    with pytest.raises(LocalProtocolError, match="window"):
        ResumeSettings(window=MAX_WINDOW + 1)
    with pytest.raises(LocalProtocolError, match="grace"):
        ResumeSettings(grace=0)
    with pytest.raises(LocalProtocolError, match="max_grace_sessions"):
        ResumeSettings(max_grace_sessions=0)
    with pytest.raises(LocalProtocolError, match="window"):
        ResumeOffer(window=1)


def test_request_fields_from_headers() -> None:
    assert RequestFields.from_headers([(b"host", b"x")]) == RequestFields()
    opening = RequestFields.from_headers(RequestFields.pull_headers(ResumeOffer(), None))
    assert opening == RequestFields(offer=ResumeOffer())
    assert not opening.continues
    again = RequestFields.from_headers(RequestFields.pull_headers(ResumeOffer(), 0))
    assert again.continues  # an ack of 0 continues a session too: no resurrection
    push = RequestFields.from_headers(RequestFields.push_headers(5, 7))
    assert push == RequestFields(offer=ResumeOffer(), offset=5, ack=7)
    # h11 lowercases names; anything else is matched case-insensitively too.
    assert RequestFields.from_headers([(b"Pht-Ack", b"3")]).ack == 3
    # A GOST-style offer of another version is no offer, the rest still parses.
    assert RequestFields.from_headers([(b"pht-resume", b"9"), (b"pht-ack", b"1")]) == (
        RequestFields(ack=1)
    )
    with pytest.raises(ResumeHeaderError, match="twice"):
        RequestFields.from_headers([(b"pht-offset", b"1"), (b"pht-offset", b"1")])
    with pytest.raises(ResumeHeaderError, match="PHT-Offset"):
        RequestFields.from_headers([(b"pht-offset", b"-1")])


def test_response_fields_from_headers() -> None:
    terms = ResumeTerms(window=MIN_WINDOW, grace=3)
    assert ResponseFields.from_headers([(b"date", b"x")]) == ResponseFields()
    pull = ResponseFields.from_headers(ResponseFields.pull_headers(terms, 12, None))
    assert pull == ResponseFields(terms=terms, offset=12)
    ended = ResponseFields.from_headers(ResponseFields.pull_headers(terms, 18, 18))
    assert ended.end == 18
    assert ResponseFields.from_headers(ResponseFields.push_headers(5)).received == 5
    for reason in GoneReason:
        gone = ResponseFields.from_headers(ResponseFields.gone_headers(reason))
        assert gone.gone is reason
    with pytest.raises(ResumeHeaderError, match="unknown reason"):
        parse_gone(b"resurrected")
    with pytest.raises(ResumeHeaderError, match="twice"):
        ResponseFields.from_headers([(b"pht-end", b"1"), (b"pht-end", b"2")])


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (GoneReason.CLOSED, "closed"),
        (GoneReason.EXPIRED, "grace period"),
        (GoneReason.ABORTED, "aborted"),
        (GoneReason.UNKNOWN, "restarted"),
    ],
)
def test_session_gone_names_what_happened(reason: GoneReason, words: str) -> None:
    error = SessionGone(reason)
    assert isinstance(error, TunnelError)
    assert error.status == 410
    assert error.reason is reason
    assert words in str(error)
    assert f"PHT-Gone: {reason.value}" in str(error)


def test_gap_and_ack_errors_carry_their_numbers() -> None:
    gap = OffsetGap(expected=10, got=15)
    assert (gap.expected, gap.got, gap.status_hint) == (10, 15, 409)
    assert "resend from offset 10" in str(gap)
    beyond = AckOutOfRange(ack=9, end=4)
    assert isinstance(beyond, RemoteProtocolError)
    assert (beyond.ack, beyond.end, beyond.status_hint) == (9, 4, 400)


# --- the replay buffer -------------------------------------------------------------


def test_replay_buffer_appends_reads_and_frees() -> None:
    buffer = ReplayBuffer(10)
    assert (buffer.start, buffer.end, len(buffer), buffer.room) == (0, 0, 0, 10)
    assert buffer.append(b"hello") == 5
    assert buffer.append(bytearray(b"world!")) == 5  # back-pressure: one byte refused
    assert buffer.full
    assert buffer.append(b"x") == 0
    assert buffer.read(0, 100) == b"helloworld"
    assert buffer.read(3, 4) == b"lowo"
    assert buffer.read(10, 5) == b""
    assert buffer.ack(4) == 4
    assert (buffer.start, buffer.end, buffer.room) == (4, 10, 4)
    assert buffer.read(4, 3) == b"owo"
    assert buffer.ack(2) == 0  # a late, older acknowledgement frees nothing
    assert buffer.ack(10) == 6
    assert len(buffer) == 0
    assert buffer.chunk_count == 0


def test_replay_buffer_refuses_misuse() -> None:
    buffer = ReplayBuffer(8, start=100)
    buffer.append(b"abcd")
    with pytest.raises(AckOutOfRange):
        buffer.ack(105)
    with pytest.raises(LocalProtocolError, match="outside the replay buffer"):
        buffer.read(99, 1)
    with pytest.raises(LocalProtocolError, match="outside the replay buffer"):
        buffer.read(105, 1)
    with pytest.raises(LocalProtocolError, match="max_size"):
        buffer.read(100, 0)
    with pytest.raises(LocalProtocolError, match="positive"):
        ReplayBuffer(0)
    with pytest.raises(LocalProtocolError, match="resume offset"):
        ReplayBuffer(8, start=-1)


def test_replay_buffer_gathers_small_writes() -> None:
    """256 Ki 1-byte writes are 16 chunks, not 256 Ki objects."""
    buffer = ReplayBuffer(1 << 18)
    for i in range(1 << 18):
        buffer.append(b"%c" % (i & 0xFF))
    assert buffer.full
    assert buffer.chunk_count == (1 << 18) // (16 * 1024)
    assert buffer.read(70000, 3) == bytes([70000 & 0xFF, 70001 & 0xFF, 70002 & 0xFF])


def test_replay_buffer_keeps_large_bytes_without_copying() -> None:
    block = bytes(range(256)) * 256  # 64 KiB
    buffer = ReplayBuffer(1 << 20)
    buffer.append(block)
    buffer.append(memoryview(block))
    assert buffer.read(0, len(block)) is block
    assert buffer.read(len(block), len(block)) == block
    assert buffer.read(len(block) - 2, 4) == block[-2:] + block[:2]


def test_replay_buffer_compacts_freed_chunks() -> None:
    buffer = ReplayBuffer(1 << 22)
    block = b"z" * (32 * 1024)
    for _ in range(100):
        buffer.append(block)
    buffer.ack(90 * len(block))
    assert buffer.chunk_count == 10
    assert len(buffer._chunks) == 10  # compacted: the freed slots are gone
    assert buffer.read(buffer.start, 5) == b"zzzzz"


buffer_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=40_000)),
        st.tuples(st.just("ack"), st.integers(0, 60_000)),
        st.tuples(st.just("read"), st.integers(0, 60_000), st.integers(1, 50_000)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 100_000), ops=buffer_ops)
def test_replay_buffer_matches_a_plain_model(limit: int, ops: list[tuple[object, ...]]) -> None:
    buffer = ReplayBuffer(limit)
    stream = bytearray()  # everything ever appended
    start = 0
    for op in ops:
        if op[0] == "append":
            data = op[1]
            assert isinstance(data, bytes)
            taken = buffer.append(data)
            assert taken == min(len(data), limit - (len(stream) - start))
            stream += data[:taken]
        elif op[0] == "ack":
            offset = op[1]
            assert isinstance(offset, int)
            if offset > len(stream):
                with pytest.raises(AckOutOfRange):
                    buffer.ack(offset)
            else:
                assert buffer.ack(offset) == max(0, offset - start)
                start = max(start, offset)
        else:
            offset, size = op[1], op[2]
            assert isinstance(offset, int)
            assert isinstance(size, int)
            offset = start + offset % (len(stream) - start + 1)
            assert buffer.read(offset, size) == bytes(stream[offset : offset + size])
        assert (buffer.start, buffer.end) == (start, len(stream))
        assert len(buffer) <= limit


# --- the receiving end ------------------------------------------------------------


def test_inbound_tracker_drops_overlaps_and_refuses_gaps() -> None:
    tracker = InboundTracker()
    assert tracker.accept(0, b"abc") == b"abc"
    assert tracker.received == 3
    assert bytes(tracker.accept(1, b"bcde")) == b"de"  # a retry that grew
    assert tracker.accept(0, b"abcde") == b""  # a pure retry
    assert tracker.accept(5, b"") == b""  # an ack-only push
    with pytest.raises(OffsetGap) as info:
        tracker.accept(7, b"x")
    assert (info.value.expected, info.value.got) == (5, 7)
    assert tracker.received == 5
    assert tracker.check_start(2) == 3
    with pytest.raises(OffsetGap):
        tracker.check_start(6)
    with pytest.raises(ResumeHeaderError):
        tracker.accept(MAX_OFFSET, b"x")


def test_inbound_tracker_says_when_an_ack_only_push_is_due() -> None:
    tracker = InboundTracker()
    window = 100
    tracker.accept(0, b"x" * 49)
    assert not tracker.ack_due(window)
    tracker.accept(49, b"x")
    assert tracker.ack_due(window)
    # An ack-only push whose answer is lost proves nothing: still due.
    assert tracker.ack_due(window)
    tracker.ack_confirmed(50)
    assert not tracker.ack_due(window)
    tracker.ack_confirmed(10)  # an older request answered late changes nothing
    assert tracker.acknowledged == 50
    with pytest.raises(LocalProtocolError, match="cannot acknowledge"):
        tracker.ack_confirmed(51)


# --- grace, back-off, bounded pulls ----------------------------------------------------


def test_grace_table_expires_in_deadline_order() -> None:
    table = GraceTable(grace=10, max_sessions=3)
    assert table.next_deadline() is None
    assert table.detach("a", now=0)
    assert table.detach("b", now=1)
    assert table.detach("c", now=2)
    assert not table.detach("d", now=3)  # full: "d" ends now, the others keep theirs
    assert "d" not in table
    table.touch("a", now=5)  # a push while waiting: the client is alive
    table.touch("zz", now=5)  # not waiting: nothing happens
    assert table.deadline("a") == 15
    assert table.next_deadline() == 11
    assert table.attach("b")
    assert not table.attach("b")
    assert table.expired(11.9) == []
    assert table.expired(12) == ["c"]
    assert table.expired(100) == ["a"]
    assert len(table) == 0
    with pytest.raises(LocalProtocolError, match="grace"):
        GraceTable(grace=0)
    with pytest.raises(LocalProtocolError, match="max_sessions"):
        GraceTable(max_sessions=0)


def test_tombstones_say_why_a_session_is_gone_for_a_while() -> None:
    tombs = Tombstones(keep=60, max_entries=2)
    assert tombs.reason("a", now=0) is GoneReason.UNKNOWN
    tombs.bury("a", GoneReason.EXPIRED, now=0)
    tombs.bury("b", GoneReason.CLOSED, now=10)
    assert tombs.reason("a", now=59) is GoneReason.EXPIRED
    assert tombs.reason("b", now=59) is GoneReason.CLOSED
    assert tombs.reason("a", now=60) is GoneReason.UNKNOWN  # forgotten after keep
    assert len(tombs) == 1
    tombs.bury("c", GoneReason.ABORTED, now=61)
    tombs.bury("d", GoneReason.ABORTED, now=62)  # bounded: the oldest ("b") goes
    assert len(tombs) == 2
    assert tombs.reason("b", now=62) is GoneReason.UNKNOWN
    assert tombs.reason("d", now=62) is GoneReason.ABORTED
    with pytest.raises(LocalProtocolError, match="keep"):
        Tombstones(keep=0)
    with pytest.raises(LocalProtocolError, match="max_entries"):
        Tombstones(max_entries=0)


def test_backoff_is_bounded_and_jittered() -> None:
    low = Backoff(lambda: 0.0)
    assert [low.next_delay() for _ in range(8)] == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.6,
        2.5,
        2.5,
    ]
    high = Backoff(lambda: 0.999999, initial=1, maximum=3)
    delays = [high.next_delay() for _ in range(200)]
    assert all(d <= 3 for d in delays)
    assert delays[-1] == pytest.approx(3, rel=1e-5)
    high.reset()
    assert high.next_delay() == pytest.approx(1, rel=1e-5)
    rng = random.Random(7)
    spread = Backoff(rng.random, initial=2, maximum=2)
    draws = [spread.next_delay() for _ in range(200)]
    assert all(1 <= d <= 2 for d in draws)
    assert len(set(draws)) == 200  # jittered: clients cut at once do not return at once


def test_backoff_refuses_bad_settings_and_sources() -> None:
    with pytest.raises(LocalProtocolError, match="initial"):
        Backoff(random.random, initial=0)
    with pytest.raises(LocalProtocolError, match="initial"):
        Backoff(random.random, initial=2, maximum=1)
    with pytest.raises(LocalProtocolError, match="multiplier"):
        Backoff(random.random, multiplier=0.5)
    with pytest.raises(LocalProtocolError, match="random source"):
        Backoff(lambda: 1.0).next_delay()


def test_reconnect_gives_up_when_the_grace_period_is_over() -> None:
    reconnect = Reconnect(grace=10, backoff=Backoff(lambda: 0.0, initial=4, maximum=4))
    now = 100.0
    waits = []
    while (delay := reconnect.failed(now)) is not None:
        waits.append(delay)
        now += delay
        assert len(waits) < 100
    assert waits == [2, 2, 2, 2, 2]
    assert now == 110
    error = reconnect.gave_up("connection refused")
    assert "10 s grace period" in str(error)
    assert "connection refused" in str(error)
    reconnect.succeeded()
    assert reconnect.since is None
    assert reconnect.failed(200) == 2  # a new run of failures, a new budget


def test_reconnect_never_waits_past_the_deadline() -> None:
    reconnect = Reconnect(grace=1, backoff=Backoff(lambda: 0.0, initial=5, maximum=5))
    assert reconnect.failed(0) == 1
    assert reconnect.failed(0.75) == 0.25
    assert reconnect.failed(1) is None
    with pytest.raises(LocalProtocolError, match="grace"):
        Reconnect(grace=0, backoff=Backoff(random.random))


def test_pull_meter_bounds() -> None:
    unbounded = PullMeter()
    assert not unbounded.bounded
    unbounded.began(0)
    unbounded.line_sent(10**9)
    assert not unbounded.must_end(10**9)
    assert unbounded.deadline() is None

    meter = PullMeter(max_bytes=100, max_seconds=0.2)
    meter.began(5.0)
    assert meter.needs_heartbeat
    assert meter.deadline() == pytest.approx(5.2)
    meter.line_sent(60)
    assert not meter.needs_heartbeat
    assert not meter.must_end(5.1)
    meter.line_sent(60)
    assert meter.must_end(5.1)  # after the line that crossed the byte bound
    meter.began(9.0)
    assert meter.needs_heartbeat
    assert not meter.must_end(9.1)
    assert meter.must_end(9.2)
    with pytest.raises(LocalProtocolError, match="pull_max_bytes"):
        PullMeter(max_bytes=0)
    with pytest.raises(LocalProtocolError, match="pull_max_ms"):
        PullMeter(max_seconds=0)


def test_the_worked_example_of_the_documentation() -> None:
    """docs/resume.md's exchange, step by step, with the core's objects."""
    terms = ResumeSettings().grant(ResumeOffer())
    server_up, server_down = InboundTracker(), ReplayBuffer(terms.window)
    client_down, client_up = InboundTracker(), ReplayBuffer(1 << 20)
    server_down.append(b"hello\nworld\n")
    headers = ResponseFields.pull_headers(terms, 0, None)
    assert headers == [
        (b"PHT-Resume", b"1; window=4194304; grace=60"),
        (b"PHT-Offset", b"0"),
    ]
    client_down.accept(0, server_down.read(0, 6))
    client_down.accept(6, server_down.read(6, 6))
    # Two pushes; the second one's answer is lost.
    client_up.append(b"abcde")
    assert server_up.accept(0, client_up.read(0, 3)) == b"abc"
    client_up.ack(server_up.received)
    assert bytes(server_up.accept(3, client_up.read(3, 2))) == b"de"
    # The pull is cut in the line of bytes 12-17: the client keeps 12.
    server_down.append(b"again\n")
    request = RequestFields.from_headers(
        RequestFields.pull_headers(ResumeOffer(), client_down.received)
    )
    assert request.ack == 12
    server_down.ack(request.ack)
    assert server_down.start == 12
    assert server_down.read(12, 100) == b"again\n"  # sent again
    client_down.accept(12, b"again\n")
    # The retried push: its overlap is dropped, the answer says 5.
    assert server_up.accept(3, client_up.read(3, 2)) == b""
    assert ResponseFields.push_headers(server_up.received) == [(b"PHT-Received", b"5")]
    client_up.ack(5)
    assert len(client_up) == 0
    # The end: PHT-End equals the client's count.
    ended = ResponseFields.from_headers(ResponseFields.pull_headers(terms, 18, server_down.end))
    assert ended.end == client_down.received == 18


# --- one session's state at each end ----------------------------------------------


def opened(window: int = MIN_WINDOW) -> tuple[ServerResume, ClientResume]:
    """A session negotiated through the opening pull's headers."""
    offer = RequestFields.from_headers(ClientResume.offer())
    server = ServerResume.negotiate(ResumeSettings(window=window), offer)
    assert server is not None
    client = ClientResume.negotiated(
        ResponseFields.from_headers(server.attach(None)), buffer_limit=1 << 16
    )
    assert client is not None
    return server, client


def test_negotiation_needs_an_offer_and_falls_back_without_terms() -> None:
    settings = ResumeSettings()
    assert ServerResume.negotiate(settings, RequestFields()) is None  # a GOST client
    assert (
        ServerResume.negotiate(settings, RequestFields.from_headers([(b"pht-resume", b"2")]))
        is None
    )
    continuing = RequestFields(offer=ResumeOffer(), ack=0)
    assert ServerResume.negotiate(settings, continuing) is None  # never creates on a re-attach
    # A server without the extension answers with no PHT-Resume: fall back.
    assert ClientResume.negotiated(ResponseFields(), buffer_limit=10) is None
    terms = ResumeTerms(window=MIN_WINDOW, grace=1)
    with pytest.raises(ResumeHeaderError, match="PHT-Offset: 0"):
        ClientResume.negotiated(ResponseFields(terms=terms, offset=5), buffer_limit=10)
    server, client = opened()
    assert client.terms == server.terms == ResumeTerms(window=MIN_WINDOW, grace=DEFAULT_GRACE)


def test_server_re_attach_rules() -> None:
    server, _ = opened()
    server.write(b"0123456789")
    assert server.next_line(4) == b"0123"
    assert server.pending == 6
    # The opening pull again (its answer was lost): allowed, nothing was acknowledged.
    headers = ResponseFields.from_headers(server.attach(None))
    assert headers.offset == 0
    server.apply_ack(3)
    with pytest.raises(ResumeConflict) as conflict:
        server.attach(None)
    assert conflict.value.status_hint == 409
    with pytest.raises(AckOutOfRange):
        server.attach(11)
    # A delayed pull with an older ack starts at what is kept.
    assert ResponseFields.from_headers(server.attach(1)).offset == 3
    assert server.next_line(100) == b"3456789"
    assert server.next_line(100) == b""


def test_server_close_and_end() -> None:
    server, _ = opened()
    assert server.push(0, b"abc") == b"abc"
    server.close(3)
    with pytest.raises(OffsetGap):
        server.close(4)
    with pytest.raises(ResumeHeaderError, match="3 arrived"):
        server.close(2)
    server.write(b"xyz")
    assert not server.done
    server.finish()
    with pytest.raises(LocalProtocolError, match="after it finished"):
        server.write(b"more")
    assert ResponseFields.from_headers(server.attach(0)).end == 3
    assert not server.done
    server.apply_ack(3)
    assert server.done


def test_client_push_answers() -> None:
    _, client = opened()
    assert client.write(b"hello") == 5
    assert client.next_push(3) == (0, b"hel")
    assert client.next_push(3) == (3, b"lo")
    assert client.unpushed == 0
    client.push_answered(0, 200, ResponseFields(received=3))
    assert len(client.upstream) == 2
    client.push_failed()
    assert client.next_push(10) == (3, b"lo")  # again, from what the server has
    client.push_answered(0, 409, ResponseFields(received=3))  # a gap: rewind
    assert client.unpushed == 2
    client.push_answered(0, 200, ResponseFields(received=5))  # a late answer
    assert client.next_push(10) == (5, b"")
    close = RequestFields.from_headers(client.close_headers())
    assert (close.offset, close.ack) == (5, 0)
    with pytest.raises(SessionGone, match="grace period") as gone:
        client.push_answered(0, 410, ResponseFields(gone=GoneReason.EXPIRED))
    assert gone.value.reason is GoneReason.EXPIRED
    with pytest.raises(ResumeHeaderError, match="lacks PHT-Received"):
        client.push_answered(0, 200, ResponseFields())
    with pytest.raises(AckOutOfRange):
        client.push_answered(0, 200, ResponseFields(received=6))
    with pytest.raises(LocalProtocolError, match="200, 409 or 410"):
        client.push_answered(0, 500, ResponseFields(received=5))


def test_client_pull_answers() -> None:
    server, client = opened()
    terms = client.terms
    client.pull_started(0, ResponseFields(terms=terms, offset=0))
    assert client.pull_data(b"abc") == b"abc"
    assert RequestFields.from_headers(client.pull_headers()).ack == 3
    # A replay from 1: the overlap is dropped.
    client.pull_started(3, ResponseFields(terms=terms, offset=1))
    assert bytes(client.pull_data(b"bcde")) == b"de"
    with pytest.raises(OffsetGap):
        client.pull_started(5, ResponseFields(terms=terms, offset=6))
    with pytest.raises(ResumeHeaderError, match="lacks PHT-Resume"):
        client.pull_started(5, ResponseFields(offset=5))
    other = ResumeTerms(window=MIN_WINDOW * 2, grace=1)
    with pytest.raises(ResumeHeaderError, match="changed"):
        client.pull_started(5, ResponseFields(terms=other, offset=5))
    with pytest.raises(ResumeHeaderError, match="before the 5 bytes"):
        client.pull_started(5, ResponseFields(terms=terms, offset=5, end=4))
    client.pull_started(5, ResponseFields(terms=terms, offset=5, end=6))
    assert not client.eof
    with pytest.raises(ResumeHeaderError, match="beyond its PHT-End"):
        client.pull_data(b"fg")
    client.pull_data(b"f")
    assert client.eof
    assert server.terms == terms


def test_client_ack_only_pushes_and_gone_answers() -> None:
    _, client = opened()
    client.pull_started(0, ResponseFields(terms=client.terms, offset=0))
    client.pull_data(b"x" * (MIN_WINDOW // 2))
    assert client.ack_due()
    ack_only = RequestFields.from_headers(client.ack_only())
    assert (ack_only.offset, ack_only.ack) == (0, MIN_WINDOW // 2)
    client.push_answered(MIN_WINDOW // 2, 200, ResponseFields(received=0))
    assert not client.ack_due()
    ClientResume.gone(ResponseFields(gone=GoneReason.CLOSED))  # the clean end: no error
    with pytest.raises(SessionGone, match="restarted"):
        ClientResume.gone(ResponseFields(gone=GoneReason.UNKNOWN))
    with pytest.raises(ResumeHeaderError, match="lacks PHT-Gone"):
        ClientResume.gone(ResponseFields())  # GOST's own 410


# --- a whole exchange, cut anywhere --------------------------------------------------------


@dataclass
class Push:
    """A push request on its way: its headers as sent, and its body's data."""

    headers: list[tuple[bytes, bytes]]
    data: bytes


@dataclass
class App:
    """One end's application: what it will write, how far it got, what it received."""

    to_send: bytes
    written: int = 0
    delivered: bytearray = field(default_factory=bytearray)
    high_water: int = 0  # the most bytes its end's replay buffer ever held


class Exchange:
    """A client and a server of one resume session, joined by a faulty link.

    The two ends are :class:`ClientResume` and :class:`ServerResume`; this
    class only moves their messages, through the module's header formatting
    and parsing as on the wire. Pushes may be reordered and lost in either
    direction; pulls may be lost or cut at any byte of their base64 body.
    """

    def __init__(self, up: bytes, down: bytes, limit: int, push_size: int, line: int) -> None:
        """``limit`` bounds the client's push buffer; the server's is the window (64 KiB)."""
        # The opening pull, through its headers.
        offer = RequestFields.from_headers(ClientResume.offer())
        server = ServerResume.negotiate(ResumeSettings(window=MIN_WINDOW), offer)
        assert server is not None
        answer = ResponseFields.from_headers(server.attach(offer.ack))
        client = ClientResume.negotiated(answer, buffer_limit=limit)
        assert client is not None
        self.client, self.server = client, server
        self.limit = limit
        self.client_app, self.server_app = App(up), App(down)
        self.push_size = push_size
        self.line = line
        self.in_flight: list[Push] = []

    def write(self, app: App, resume: ClientResume | ServerResume, size: int) -> None:
        """An application writes up to ``size`` more bytes; back-pressure keeps the rest."""
        app.written += resume.write(app.to_send[app.written : app.written + size])
        buffer = resume.upstream if isinstance(resume, ClientResume) else resume.downstream
        app.high_water = max(app.high_water, len(buffer))

    # client side
    def send_push(self, ack_only: bool) -> None:
        if ack_only:
            self.in_flight.append(Push(self.client.ack_only(), b""))
        else:
            offset, data = self.client.next_push(self.push_size)
            self.in_flight.append(Push(self.client.push_headers(offset), data))

    def push_answer(self, push: Push, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ack = RequestFields.from_headers(push.headers).ack
        assert ack is not None
        self.client.push_answered(ack, status, ResponseFields.from_headers(headers))

    def receive_pull(self, ack: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The client decodes the complete lines it got of a pull response."""
        self.client.pull_started(ack, ResponseFields.from_headers(headers))
        *lines, _partial = body.split(b"\n")  # a cut line counts for nothing
        for line in lines:
            data = base64.b64decode(line, validate=True)
            self.client_app.delivered += self.client.pull_data(data)

    # server side
    def serve_push(self, push: Push) -> tuple[int, list[tuple[bytes, bytes]]]:
        server = self.server
        fields = RequestFields.from_headers(push.headers)
        assert fields.continues
        assert fields.ack is not None
        assert fields.offset is not None
        server.apply_ack(fields.ack)  # on arrival, whatever the push's fate
        try:
            self.server_app.delivered += server.push(fields.offset, push.data)
        except OffsetGap:
            return 409, server.received_headers()
        return 200, server.received_headers()

    def serve_pull(
        self, request: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        fields = RequestFields.from_headers(request)
        assert fields.ack is not None
        headers = self.server.attach(fields.ack)
        return headers, b"".join(self.lines())

    def lines(self) -> list[bytes]:
        """What the current pull carries next, as base64 lines."""
        lines = []
        while data := self.server.next_line(self.line):
            lines.append(base64.b64encode(data) + b"\n")
        return lines

    # the link
    def step(self, action: str, n: int) -> None:
        if action == "client writes":
            self.write(self.client_app, self.client, n % (2 * self.push_size) + 1)
        elif action == "server writes":
            self.write(self.server_app, self.server, n % (3 * self.line) + 1)
        elif action == "push":
            self.send_push(ack_only=False)
        elif action == "ack-only push":
            self.send_push(ack_only=True)
        elif action == "deliver push" and self.in_flight:
            push = self.in_flight.pop(n % len(self.in_flight))  # any order
            fate = (n // 7) % 3
            if fate == 0:  # lost before the server got it
                self.client.push_failed()
                return
            status, headers = self.serve_push(push)
            if fate == 1:  # the server handled it, its answer was lost
                self.client.push_failed()
            else:
                self.push_answer(push, status, headers)
        elif action == "pull":
            ack = self.client.downstream.received
            request = self.client.pull_headers()
            if n % 5 == 0:  # the pull never reached the server
                return
            headers, body = self.serve_pull(request)
            self.receive_pull(ack, headers, body[: n % (len(body) + 1)])  # cut anywhere
        elif action == "ack if due" and self.client.ack_due():
            self.send_push(ack_only=True)

    def exchange_push(self, ack_only: bool = False) -> None:
        self.send_push(ack_only)
        push = self.in_flight.pop()
        self.push_answer(push, *self.serve_push(push))

    def heal(self) -> None:
        """The link recovers: finish both streams without faults (bounded).

        One long-poll pull stays attached, as in a real tunnel: the server's
        buffer is freed only by the acknowledgements of pushes (data pushes,
        and ack-only pushes when due), so this also shows that the ack-only
        rule never lets the two ends wait for each other.
        """
        client, server = self.client, self.server
        client_app, server_app = self.client_app, self.server_app
        self.in_flight.clear()  # whatever was on its way is lost
        client.push_failed()
        ack = client.downstream.received
        self.receive_pull(ack, *self.serve_pull(client.pull_headers()))
        for _ in range(1_000):  # each round moves half a window or more each way
            up_done = server_app.delivered == client_app.to_send and not len(client.upstream)
            if up_done and client_app.delivered == server_app.to_send:
                break
            self.write(client_app, client, len(client_app.to_send))
            self.write(server_app, server, len(server_app.to_send))
            for line in self.lines():  # new lines on the same response
                client_app.delivered += client.pull_data(base64.b64decode(line))
            while client.unpushed:  # push all that is buffered
                self.exchange_push()
            if client.ack_due():
                self.exchange_push(ack_only=True)
        else:
            raise AssertionError("the exchange did not finish")
        # The end: the server's handler finishes, the client polls again and
        # learns where the stream ends; its ack lets the server forget it.
        server.finish()
        ack = client.downstream.received
        self.receive_pull(ack, *self.serve_pull(client.pull_headers()))
        assert client.eof
        assert server.done
        # The client closes: every byte pushed arrived.
        close = RequestFields.from_headers(client.close_headers())
        assert close.offset is not None
        server.close(close.offset)


# Weighted by repetition: data must be written and pushes delivered often
# enough for retries, gaps and replays to meet.
ACTIONS = [
    *["client writes"] * 2,
    *["server writes"] * 2,
    *["push"] * 3,
    "ack-only push",
    *["deliver push"] * 4,
    *["pull"] * 2,
    "ack if due",
]
actions = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.integers(0, 1 << 20)), min_size=10, max_size=120
)


@settings(max_examples=300, deadline=None)
@given(
    up=st.binary(min_size=1, max_size=3000),
    down=st.binary(min_size=1, max_size=3000),
    limit=st.sampled_from([MIN_WINDOW, 4096, 700]),
    push_size=st.integers(1, 700),
    line=st.integers(1, 500),
    steps=actions,
)
def test_streams_survive_any_cut(
    up: bytes,
    down: bytes,
    limit: int,
    push_size: int,
    line: int,
    steps: list[tuple[str, int]],
) -> None:
    exchange = Exchange(up, down, limit, push_size, line)
    for action, n in steps:
        exchange.step(action, n)
        # Never more than what the application wrote, in order: no duplicate.
        assert up.startswith(bytes(exchange.server_app.delivered))
        assert down.startswith(bytes(exchange.client_app.delivered))
    exchange.heal()
    assert bytes(exchange.server_app.delivered) == up
    assert bytes(exchange.client_app.delivered) == down
    assert exchange.client_app.high_water <= limit
    assert exchange.server_app.high_water <= MIN_WINDOW


@settings(max_examples=100, deadline=None)
@example(up_size=0, down_size=3 * MIN_WINDOW, push_size=1, line=5000, steps=[])  # download only
@example(up_size=20_000, down_size=0, push_size=3000, line=100, steps=[])  # upload only
@given(
    up_size=st.integers(0, 20_000),
    down_size=st.integers(0, 3 * MIN_WINDOW),
    push_size=st.integers(1, 3000),
    line=st.integers(100, 8000),
    steps=actions,
)
def test_full_buffers_apply_back_pressure_not_loss(
    up_size: int, down_size: int, push_size: int, line: int, steps: list[tuple[str, int]]
) -> None:
    """With more to send than the buffers hold, writers wait, and nothing is lost.

    A download with little or no upload must move on ack-only pushes alone.
    """
    rng = random.Random(up_size * 1_000_003 + down_size)
    up, down = rng.randbytes(up_size), rng.randbytes(down_size)
    exchange = Exchange(up, down, 1024, push_size, line)
    for action, n in steps:
        exchange.step(action, n * 97)  # writes of up to a few lines, to fill the window
    assert exchange.client_app.high_water <= 1024
    assert exchange.server_app.high_water <= MIN_WINDOW
    exchange.heal()
    assert bytes(exchange.server_app.delivered) == up
    assert bytes(exchange.client_app.delivered) == down
