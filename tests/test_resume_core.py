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
from hypothesis import given, settings
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
    GoneReason,
    GraceTable,
    InboundTracker,
    OffsetGap,
    PullMeter,
    Reconnect,
    ReplayBuffer,
    RequestFields,
    ResponseFields,
    ResumeHeaderError,
    ResumeOffer,
    ResumeSettings,
    ResumeTerms,
    SessionGone,
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


# --- a whole exchange, cut anywhere --------------------------------------------------------


@dataclass
class Push:
    """A push request on its way: its headers as sent, and its body's data."""

    headers: list[tuple[bytes, bytes]]
    data: bytes


@dataclass
class Peer:
    """One end's application streams and resume state."""

    window: int
    to_send: bytes  # what the application will write, in order
    written: int = 0  # how much of it the replay buffer took so far
    delivered: bytearray = field(default_factory=bytearray)
    outbound: ReplayBuffer = field(init=False)
    inbound: InboundTracker = field(default_factory=InboundTracker)
    high_water: int = 0  # the largest the replay buffer ever was

    def __post_init__(self) -> None:
        self.outbound = ReplayBuffer(self.window)

    def write(self, size: int) -> None:
        """The application writes up to ``size`` more bytes; back-pressure keeps the rest."""
        piece = self.to_send[self.written : self.written + size]
        self.written += self.outbound.append(piece)
        self.high_water = max(self.high_water, len(self.outbound))


class Exchange:
    """A client and a server of one resume session, joined by a faulty link.

    Pushes may be reordered and lost in either direction; pulls may be lost
    or cut at any byte of their base64 body. Every header goes through the
    module's formatting and parsing, as it would on the wire.
    """

    def __init__(self, up: bytes, down: bytes, limit: int, push_size: int, line: int) -> None:
        self.terms = ResumeSettings(window=MIN_WINDOW).grant(ResumeOffer())
        self.limit = limit  # both replay buffers' bound (small, so that they fill)
        self.client = Peer(window=limit, to_send=up)
        self.server = Peer(window=limit, to_send=down)
        self.push_size = push_size
        self.line = line
        self.next_push = 0  # upstream offset of the next data push
        self.in_flight: list[Push] = []
        self.refused = 0  # 409 answers seen

    # client side
    def send_push(self, ack_only: bool) -> None:
        client = self.client
        offset = max(self.next_push, client.outbound.start)  # a late answer acked more
        data = b"" if ack_only else client.outbound.read(offset, self.push_size)
        ack = client.inbound.received
        self.in_flight.append(Push(RequestFields.push_headers(offset, ack), data))
        self.next_push = offset + len(data)

    def push_answer(self, push: Push, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ack = RequestFields.from_headers(push.headers).ack
        assert ack is not None
        self.client.inbound.ack_confirmed(ack)
        fields = ResponseFields.from_headers(headers)
        assert fields.received is not None
        self.client.outbound.ack(fields.received)  # a lower, late one frees nothing
        if status == 409:
            self.refused += 1
            self.push_failed()

    def push_failed(self) -> None:
        """Go back: push again from what the server acknowledged."""
        self.next_push = self.client.outbound.start

    def receive_pull(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The client decodes the complete lines it got of a pull response."""
        fields = ResponseFields.from_headers(headers)
        assert fields.terms == self.terms
        assert fields.offset is not None
        client = self.client
        client.inbound.check_start(fields.offset)  # a gap would be a broken server
        offset = fields.offset
        *lines, _partial = body.split(b"\n")  # a cut line counts for nothing
        for line in lines:
            data = base64.b64decode(line, validate=True)
            client.delivered += client.inbound.accept(offset, data)
            offset += len(data)

    # server side
    def serve_push(self, push: Push) -> tuple[int, list[tuple[bytes, bytes]]]:
        server = self.server
        fields = RequestFields.from_headers(push.headers)
        assert fields.continues
        assert fields.ack is not None
        assert fields.offset is not None
        server.outbound.ack(fields.ack)  # on arrival, whatever the push's fate
        try:
            server.delivered += server.inbound.accept(fields.offset, push.data)
        except OffsetGap as gap:
            return 409, ResponseFields.push_headers(gap.expected)
        return 200, ResponseFields.push_headers(server.inbound.received)

    def serve_pull(
        self, request: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        server = self.server
        fields = RequestFields.from_headers(request)
        assert fields.ack is not None
        server.outbound.ack(fields.ack)
        start = max(fields.ack, server.outbound.start)
        lines = []
        position = start
        while position < server.outbound.end:
            data = server.outbound.read(position, self.line)
            lines.append(base64.b64encode(data) + b"\n")
            position += len(data)
        return ResponseFields.pull_headers(self.terms, start, None), b"".join(lines)

    # the link
    def step(self, action: str, n: int) -> None:
        client, server = self.client, self.server
        if action == "client writes":
            client.write(n % (2 * self.push_size) + 1)
        elif action == "server writes":
            server.write(n % (3 * self.line) + 1)
        elif action == "push":
            self.send_push(ack_only=False)
        elif action == "ack-only push":
            self.send_push(ack_only=True)
        elif action == "deliver push" and self.in_flight:
            push = self.in_flight.pop(n % len(self.in_flight))  # any order
            fate = (n // 7) % 3
            if fate == 0:  # lost before the server got it
                self.push_failed()
                return
            status, headers = self.serve_push(push)
            if fate == 1:  # the server handled it, its answer was lost
                self.push_failed()
            else:
                self.push_answer(push, status, headers)
        elif action == "pull":
            ack = client.inbound.received
            request = RequestFields.pull_headers(ResumeOffer(), ack)
            if n % 5 == 0:  # the pull never reached the server
                return
            headers, body = self.serve_pull(request)
            client.inbound.ack_confirmed(ack)
            self.receive_pull(headers, body[: n % (len(body) + 1)])  # cut anywhere
        elif action == "ack if due" and client.inbound.ack_due(self.limit):
            self.send_push(ack_only=True)

    def heal(self) -> None:
        """The link recovers: finish both streams without faults (bounded).

        One long-poll pull stays attached, as in a real tunnel: the server's
        buffer is freed only by the acknowledgements of pushes (data pushes,
        and ack-only pushes when due), so this also shows that the ack-only
        rule never lets the two ends wait for each other.
        """
        client, server = self.client, self.server
        self.in_flight.clear()  # whatever was on its way is lost
        self.push_failed()
        request = RequestFields.pull_headers(ResumeOffer(), client.inbound.received)
        headers, body = self.serve_pull(request)
        client.inbound.ack_confirmed(client.inbound.received)
        self.receive_pull(headers, body)
        on_the_pull = server.outbound.end  # the long poll carried everything so far
        for _ in range(1_000):  # each round moves half a window or more each way
            down_done = client.delivered == server.to_send
            if down_done and server.delivered == client.to_send and not len(client.outbound):
                break
            client.write(len(client.to_send))
            server.write(len(server.to_send))
            while on_the_pull < server.outbound.end:  # new lines on the same response
                data = server.outbound.read(on_the_pull, self.line)
                client.delivered += client.inbound.accept(on_the_pull, data)
                on_the_pull += len(data)
            while self.next_push < client.outbound.end:  # push all that is buffered
                self.send_push(ack_only=False)
                push = self.in_flight.pop()
                self.push_answer(push, *self.serve_push(push))
            if client.inbound.ack_due(self.limit):
                self.send_push(ack_only=True)
                push = self.in_flight.pop()
                self.push_answer(push, *self.serve_push(push))
        else:
            raise AssertionError("the exchange did not finish")
        # The end of the stream: the client polls again, its ack frees the rest.
        request = RequestFields.pull_headers(ResumeOffer(), client.inbound.received)
        headers, body = self.serve_pull(request)
        assert body == b""
        assert len(server.outbound) == 0
        assert len(client.outbound) == 0


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
        assert up.startswith(bytes(exchange.server.delivered))
        assert down.startswith(bytes(exchange.client.delivered))
    exchange.heal()
    assert bytes(exchange.server.delivered) == up
    assert bytes(exchange.client.delivered) == down
    assert exchange.client.high_water <= limit
    assert exchange.server.high_water <= limit


@settings(max_examples=200, deadline=None)
@given(
    up_size=st.integers(0, 20_000),
    down_size=st.integers(0, 20_000),
    push_size=st.integers(1, 3000),
    line=st.integers(1, 2000),
    steps=actions,
)
def test_small_windows_apply_back_pressure_not_loss(
    up_size: int, down_size: int, push_size: int, line: int, steps: list[tuple[str, int]]
) -> None:
    """With more to send than the window holds, writers wait, and nothing is lost.

    A download with little or no upload must move on ack-only pushes alone.
    """
    rng = random.Random(up_size * 20_001 + down_size)
    up, down = rng.randbytes(up_size), rng.randbytes(down_size)
    exchange = Exchange(up, down, 1024, push_size, line)
    for action, n in steps:
        exchange.step(action, n)
    assert exchange.client.high_water <= 1024
    assert exchange.server.high_water <= 1024
    exchange.heal()
    assert bytes(exchange.server.delivered) == up
    assert bytes(exchange.client.delivered) == down
