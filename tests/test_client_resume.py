"""The client side of the resume extension, sans-IO: channel headers and the session rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pht
from pht._client_session import (
    ClientOptions,
    ClientSession,
    ClientSessionState,
    CollectAck,
    Deliver,
    EndOfStream,
    PollAgain,
    PushChunk,
    Reattach,
    SendPull,
    Wait,
    WriteDone,
)
from pht._events import (
    DataReceived,
    PullEnded,
    PullStarted,
    PushAcknowledged,
    Rejected,
    RequestKind,
)
from pht._resume import GoneReason, ResumeTerms, ServerResume, SessionGone

GRANT = [(b"pht-resume", b"1; window=65536; grace=10"), (b"pht-offset", b"0")]
TOKEN = "tok"


def _options(**kwargs: object) -> ClientOptions:
    values: dict[str, object] = {
        "config": pht.ClientConfig.build("h", authorize=False),
        "token": TOKEN,
        "resume": True,
        "jitter": lambda: 0.5,
        "max_push_size": 10,
    }
    values.update(kwargs)
    return ClientOptions(**values)  # type: ignore[arg-type]


def open_resume(grant: bool = True, **kwargs: object) -> ClientSession:
    """A session whose opening pull offered resume and got ``GRANT`` (or nothing)."""
    session = ClientSession(_options(**kwargs))
    step = session.handshake_step()
    assert step == SendPull(TOKEN)
    assert session.pull_headers() == [(b"PHT-Resume", b"1")]
    session.pull_event(PullStarted(), GRANT if grant else [])
    return session


def _rejected(status: int, kind: RequestKind = RequestKind.PULL) -> Rejected:
    return Rejected(kind=kind, status_code=status, reason="X")


# -- options --------------------------------------------------------------------------


def test_resume_is_off_by_default_and_validated() -> None:
    assert ClientOptions(config=pht.ClientConfig.build("h")).resume is False
    with pytest.raises(TypeError, match="resume must be a bool"):
        _options(resume="yes")
    with pytest.raises(TypeError, match="jitter"):
        _options(jitter=0.5)


def test_without_resume_no_header_is_sent() -> None:
    session = ClientSession(_options(resume=False))
    session.handshake_step()
    assert session.pull_headers() == []
    session.pull_event(PullStarted(), GRANT)  # even a confused server grants nothing
    assert session.resume is None


# -- negotiation -----------------------------------------------------------------------


def test_a_grant_makes_a_resume_session() -> None:
    session = open_resume()
    assert session.resume is not None
    assert session.resume.terms.grace == 10
    assert session.resuming
    assert session.pull_headers() == [(b"PHT-Resume", b"1"), (b"PHT-Ack", b"0")]


def test_no_grant_falls_back_silently() -> None:
    session = open_resume(grant=False)
    assert session.resume is None
    assert not session.resuming
    assert session.pull_headers() == []
    assert session.close_headers() == []
    assert session.pull_event(PullEnded(session_over=True)) == EndOfStream()


def test_a_malformed_grant_fails_the_session() -> None:
    session = ClientSession(_options())
    session.handshake_step()
    with pytest.raises(pht.TunnelError, match="resume failed"):
        session.pull_event(PullStarted(), [(b"pht-resume", b"1; window=x")])
    assert session.state is ClientSessionState.ERROR


# -- the pull -----------------------------------------------------------------------


def test_an_ended_pull_is_re_attached_with_the_count() -> None:
    session = open_resume()
    assert session.pull_event(DataReceived(data=b"hello")) == Deliver(b"hello")
    assert session.pull_event(PullEnded(session_over=True)) == PollAgain(TOKEN)
    assert session.state is ClientSessionState.RECONNECTING
    assert session.pull_headers() == [(b"PHT-Resume", b"1"), (b"PHT-Ack", b"5")]
    reattached = [(b"pht-resume", b"1; window=65536; grace=10"), (b"pht-offset", b"3")]
    assert session.pull_event(PullStarted(), reattached) == Wait()
    # The replay's overlap ("lo") is dropped, the rest delivered once.
    assert session.pull_event(DataReceived(data=b"lo world")) == Deliver(b" world")
    assert session.resuming
    assert session.pull_headers()[1] == (b"PHT-Ack", b"11")


def test_a_lost_pull_backs_off_within_the_grace_period() -> None:
    session = open_resume()
    assert session.pull_lost(OSError("reset"), now=100.0) == pytest.approx(0.075)
    assert session.state is ClientSessionState.RECONNECTING
    assert session.pull_lost(OSError("refused"), now=101.0) == pytest.approx(0.15)
    assert session.pull_event(_rejected(503), []) == Reattach("server answered 503 X")
    with pytest.raises(SessionGone, match="grace period") as caught:
        session.pull_lost(OSError("refused"), now=110.0)
    assert caught.value.reason is GoneReason.EXPIRED
    assert session.error is caught.value
    assert session.send_error is caught.value


def test_a_success_resets_the_back_off() -> None:
    session = open_resume()
    session.pull_lost(OSError("reset"), now=0.0)
    session.pull_headers()
    session.pull_event(PullStarted(), [*GRANT])
    assert session.pull_lost(OSError("reset"), now=50.0) == pytest.approx(0.075)


def test_the_end_of_stream_is_pht_end() -> None:
    session = open_resume()
    session.pull_event(DataReceived(data=b"abc"))
    session.pull_event(PullEnded(session_over=True))
    session.pull_headers()
    ended = [*GRANT[:1], (b"pht-offset", b"3"), (b"pht-end", b"3")]
    assert session.pull_event(PullStarted(), ended) == EndOfStream()
    assert session.state is ClientSessionState.ENDED


def test_end_reached_by_data_then_the_response_ends() -> None:
    session = open_resume()
    session.pull_event(PullEnded(session_over=True))
    session.pull_headers()
    ending = [*GRANT[:1], (b"pht-offset", b"0"), (b"pht-end", b"2")]
    assert session.pull_event(PullStarted(), ending) == Wait()
    assert session.pull_event(DataReceived(data=b"ok")) == Deliver(b"ok")
    assert session.pull_event(PullEnded(session_over=True)) == EndOfStream()


@pytest.mark.parametrize(
    ("gone", "eof"),
    [(b"closed", True), (b"expired", False), (b"aborted", False), (b"unknown", False)],
)
def test_gone_on_re_attach(gone: bytes, eof: bool) -> None:
    session = open_resume()
    session.pull_lost(OSError("cut"), now=0.0)
    session.pull_headers()
    if eof:
        assert session.pull_event(_rejected(410), [(b"pht-gone", gone)]) == EndOfStream()
        return
    with pytest.raises(SessionGone) as caught:
        session.pull_event(_rejected(410), [(b"pht-gone", gone)])
    assert caught.value.reason is GoneReason(gone.decode())
    assert isinstance(caught.value, pht.TunnelError)
    assert caught.value.status == 410
    assert session.error is caught.value


def test_a_410_without_pht_gone_is_an_error() -> None:
    session = open_resume()
    session.pull_lost(OSError("cut"), now=0.0)
    with pytest.raises(pht.TunnelError, match="PHT-Gone"):
        session.pull_event(_rejected(410), [])


def test_a_gap_downstream_fails_the_session() -> None:
    session = open_resume()
    session.pull_event(PullEnded(session_over=True))
    session.pull_headers()
    with pytest.raises(pht.TunnelError, match="resume failed"):
        session.pull_event(PullStarted(), [*GRANT[:1], (b"pht-offset", b"9")])


# -- the pushes ---------------------------------------------------------------------


def test_pushes_carry_offsets_and_are_pushed_again_after_a_loss() -> None:
    session = open_resume(push_window=2)
    assert session.resume_write(b"0123456789abcdef") == 16
    step = session.resume_step(writing=False, in_flight=0, window=2, keep=1)
    assert step == PushChunk(10)
    data, headers = session.resume_push()
    assert data == b"0123456789"
    assert headers == [(b"PHT-Resume", b"1"), (b"PHT-Offset", b"0"), (b"PHT-Ack", b"0")]
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"abcdef", (b"PHT-Offset", b"10"))
    assert session.resume_step(writing=False, in_flight=2, window=2, keep=1) == CollectAck()
    answer = [(b"pht-received", b"10")]
    assert not session.resume_push_answer(PushAcknowledged(), answer)
    assert session.acknowledged == 10
    assert session.resume_step(writing=False, in_flight=1, window=2, keep=1) == WriteDone()
    # The second push's answer is lost with its connection: push it again.
    assert session.push_lost(OSError("reset"), now=0.0) == pytest.approx(0.075)
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"abcdef", (b"PHT-Offset", b"10"))


def test_a_409_rewinds_to_what_the_server_has() -> None:
    session = open_resume()
    session.resume_write(b"abcdefghij")
    session.resume_push()
    conflict = _rejected(409, RequestKind.PUSH)
    assert session.resume_push_answer(conflict, [(b"pht-received", b"4")])
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"efghij", (b"PHT-Offset", b"4"))


def test_a_push_answer_without_pht_received_fails() -> None:
    session = open_resume()
    session.resume_write(b"abc")
    session.resume_push()
    with pytest.raises(pht.TunnelError, match="PHT-Received"):
        session.resume_push_answer(PushAcknowledged(), [])


def test_a_push_to_a_finished_session_fails_the_writes() -> None:
    session = open_resume()
    session.resume_write(b"abc")
    session.resume_push()
    with pytest.raises(pht.TunnelError, match="finished"):
        session.resume_push_answer(_rejected(410, RequestKind.PUSH), [(b"pht-gone", b"closed")])
    assert session.send_error is not None
    assert session.error is None  # the pull goes on to the end of the stream


def test_a_full_buffer_waits_for_answers() -> None:
    session = open_resume(push_window=1)
    assert session.resume_write(b"x" * 30) == 20  # channel window 2 x 10 bytes
    session.resume_push()
    session.resume_push()
    assert session.resume_step(writing=True, in_flight=2, window=2, keep=0) == CollectAck()


def test_ack_only_pushes_when_half_the_window_is_unacknowledged() -> None:
    session = open_resume()
    session.pull_event(DataReceived(data=b"x" * 32767))
    assert not session.ack_due
    session.pull_event(DataReceived(data=b"x"))
    assert session.ack_due
    ack, headers = session.ack_only_headers()
    assert ack == 32768
    assert (b"PHT-Ack", b"32768") in headers
    assert not session.ack_only_answer(ack, PushAcknowledged(), [(b"pht-received", b"0")])
    assert not session.ack_due
    assert session.ack_only_answer(ack, _rejected(502, RequestKind.PUSH), [])


def test_close_headers_say_everything_written() -> None:
    session = open_resume()
    session.resume_write(b"abc")
    assert session.close_headers()[1] == (b"PHT-Offset", b"3")


# -- the channel --------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_channel_writes_resume_headers_and_reads_them_back(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pht._client._FAST_PATH", fast)
    channel = pht.ClientChannel(pht.ClientConfig.build("h"), push_window=2)
    headers = [(b"PHT-Resume", b"1"), (b"PHT-Offset", b"7"), (b"PHT-Ack", b"0")]
    head = b"".join(channel.push(TOKEN, b"hi", headers))
    assert b"\r\nPHT-Offset: 7\r\n" in head
    assert head.endswith(b"\r\n\r\naGk=\n")
    channel.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nPHT-Received: 2\r\n\r\n")
    assert channel.next_event() == PushAcknowledged()
    assert channel.resume_headers == [(b"pht-received", b"2")]
    ack_only = b"".join(channel.ack_only(TOKEN, headers))
    assert b"Content-Length: 1\r\n" in ack_only
    assert ack_only.endswith(b"\r\n\r\n\n")
    channel.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nPHT-Received: 9\r\n\r\n")
    assert channel.next_event() == PushAcknowledged()
    assert channel.resume_headers == [(b"pht-received", b"9")]
    pull = channel.pull(TOKEN, [(b"PHT-Resume", b"1")])
    assert b"\r\nPHT-Resume: 1\r\n" in pull
    channel.receive_data(b"HTTP/1.1 200 OK\r\nPHT-Offset: 0\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert channel.next_event() == PullStarted()
    assert channel.resume_headers == [(b"pht-offset", b"0")]


def test_fast_and_reference_push_heads_match() -> None:
    headers = [(b"PHT-Resume", b"1"), (b"PHT-Offset", b"7"), (b"PHT-Ack", b"3")]
    fast = pht.ClientChannel(pht.ClientConfig.build("h"))
    reference = pht.ClientChannel(pht.ClientConfig.build("h"))
    reference._fast_enabled = False  # the h11 path
    assert fast.push(TOKEN, b"abc", headers) == reference.push(TOKEN, b"abc", headers)


def test_a_bad_resume_header_value_is_refused() -> None:
    channel = pht.ClientChannel(pht.ClientConfig.build("h"))
    with pytest.raises(pht.LocalProtocolError):
        channel.push(TOKEN, b"abc", [(b"PHT-Offset", b"1\r\nX: y")])


# -- the pull side over bytes, cut anywhere (Hypothesis) -------------------------------


def _pull_response(server: ServerResume, ack: int, line_sizes: list[int]) -> bytes:
    """A re-attached pull's answer as the server writes it: head, then chunked lines."""
    head = [b"HTTP/1.1 200 OK"]
    head += [b"%s: %s" % (name, value) for name, value in server.attach(ack)]
    head.append(b"Transfer-Encoding: chunked")
    body = bytearray()
    for size in itertools.cycle(line_sizes):  # until everything not acknowledged is sent
        data = server.next_line(size)
        if not data:
            break
        line = pht.encode_line(data)
        body += b"%x\r\n%s\r\n" % (len(line), line)
    return b"\r\n".join(head) + b"\r\n\r\n" + bytes(body)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.binary(min_size=300, max_size=4000),
    line_sizes=st.lists(st.integers(1, 300), min_size=1, max_size=20),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    stale=st.lists(st.integers(0, 100), min_size=7, max_size=7),
)
def test_cut_pulls_deliver_every_byte_once(
    stream: bytes, line_sizes: list[int], cuts: list[int], stale: list[int]
) -> None:
    """Pulls cut at any byte (head, chunk size, line) re-attach; a cut line counts
    for nothing, and when the server replays from an older offset (the ack it
    applied is ``stale`` percent behind: a delayed pull) the overlap is dropped."""
    server = ServerResume(ResumeTerms(window=65536, grace=10))
    server.write(stream)
    session = open_resume()
    delivered = bytearray()
    for cut, percent in zip([*cuts, None], stale, strict=False):
        session.pull_lost(OSError("cut"), now=0.0)
        headers = dict(session.pull_headers())
        channel = pht.ClientChannel(pht.ClientConfig.build("h", authorize=False))
        channel.pull(TOKEN, list(headers.items()))
        start, count = server.downstream.start, int(headers[b"PHT-Ack"])
        ack = count - (count - start) * percent // 100
        answer = _pull_response(server, ack, line_sizes)
        channel.receive_data(answer if cut is None else answer[:cut])
        channel.receive_data(b"")  # the connection ends here
        try:
            while not isinstance(event := channel.next_event(), pht.NeedData):
                action = session.pull_event(event, channel.resume_headers)
                if isinstance(action, Deliver):
                    delivered += action.data
        except pht.RemoteProtocolError:
            pass  # the cut: re-attach
    assert bytes(delivered) == stream


def test_a_waiting_receive_settles_a_resume_sessions_pushes() -> None:
    """push_window > 1: a receive also pushes again what a returned write lost."""
    session = open_resume(push_window=4)
    assert not session.watch_answers(0)
    session.resume_write(b"abc")  # written, not pushed (a rewind, or a write cut short)
    assert session.watch_answers(0)
    session.resume_push()
    assert session.watch_answers(1)
    assert not open_resume(push_window=1).watch_answers(1)  # the write settles its own
