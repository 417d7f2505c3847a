"""The client session's one step API for adapters, sans-IO (events and times only).

``write_step``, ``answer_push``, ``push_broke``, ``push_connect_failed``,
``push_interrupted``, ``settle_due``, ``pull_broken`` and ``repoll_broken``
answer the same questions for a plain session and a resume session, so an
adapter's loops need not know which one it runs.
"""

from __future__ import annotations

import pytest

import pht
from pht._client_session import (
    ClientOptions,
    ClientSession,
    ClientSessionState,
    CollectAck,
    EndOfStream,
    PushChunk,
    PushVerdict,
    Reattach,
    SendPull,
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
from pht._resume import GoneReason, SessionGone

from .test_client_resume import open_resume

KEEP = PushVerdict()
DROP = PushVerdict(drop=True)
#: The first back-off of a resume session in these tests: initial 0.1 s, jitter 0.5
#: (the same float the schedule computes).
FIRST_DELAY = 0.05 + 0.5 * 0.05


def _plain(**kwargs: object) -> ClientSession:
    config = pht.ClientConfig.build("example.com", authorize=False)
    options = ClientOptions(config=config, token="t", max_push_size=10, **kwargs)  # type: ignore[arg-type]
    session = ClientSession(options)
    assert session.handshake_step() == SendPull("t")
    session.pull_event(PullStarted())
    return session


def _refusal(status: int) -> Rejected:
    return Rejected(kind=RequestKind.PUSH, status_code=status, reason="No")


def _received(count: int) -> list[tuple[bytes, bytes]]:
    return [(b"pht-received", b"%d" % count)]


# --- write_step ------------------------------------------------------------------------


def test_write_step_of_a_plain_session_pushes_the_queued_bytes() -> None:
    session = _plain(push_window=2)
    assert session.write_step(queued=25, in_flight=0, window=2, keep=1) == PushChunk(10)
    assert session.write_step(queued=15, in_flight=2, window=2, keep=1) == CollectAck()
    assert session.write_step(queued=0, in_flight=2, window=2, keep=1) == CollectAck()
    assert session.write_step(queued=0, in_flight=1, window=2, keep=1) == WriteDone()


def test_write_step_of_a_resume_session_pushes_from_the_replay_buffer() -> None:
    session = open_resume(push_window=2)  # max_push_size 10: a 20-byte replay buffer
    taken = session.resume_write(b"x" * 30)
    assert taken == 20
    # 10 bytes wait for room: push what the buffer holds, then collect answers.
    assert session.write_step(queued=10, in_flight=0, window=2, keep=1) == PushChunk(10)
    session.resume_push()
    session.resume_push()
    assert session.write_step(queued=10, in_flight=2, window=2, keep=1) == CollectAck()
    verdict = session.answer_push(
        PushAcknowledged(), _received(10), closed=False, still_in_flight=1, now=0.0
    )
    assert verdict == KEEP
    assert session.resume_write(b"x" * 10) == 10
    assert session.write_step(queued=0, in_flight=1, window=2, keep=1) == PushChunk(10)
    session.resume_push()
    assert session.write_step(queued=0, in_flight=2, window=2, keep=1) == CollectAck()
    assert session.write_step(queued=0, in_flight=1, window=2, keep=1) == WriteDone()


# --- settle_due ------------------------------------------------------------------------


def test_settle_due_of_a_plain_session_is_answers_in_flight() -> None:
    session = _plain()
    assert not session.settle_due(0)
    assert session.settle_due(1)


def test_settle_due_of_a_resume_session_includes_bytes_not_pushed() -> None:
    session = open_resume()
    assert not session.settle_due(0)
    session.resume_write(b"abc")
    assert session.settle_due(0)  # lost pushes are pushed again before a close
    session.break_sending("cancelled")
    assert not session.settle_due(1)  # they cannot reach the server any more


# --- answer_push -----------------------------------------------------------------------


def test_answer_push_of_a_plain_session() -> None:
    session = _plain()
    session.pushed(3)
    ack = PushAcknowledged()
    assert session.answer_push(ack, [], closed=False, still_in_flight=0, now=0.0) == KEEP
    session.pushed(4)
    assert session.answer_push(ack, [], closed=True, still_in_flight=0, now=0.0) == DROP
    assert session.acknowledged == 7
    with pytest.raises(pht.TunnelError) as caught:
        session.answer_push(_refusal(413), [], closed=True, still_in_flight=0, now=0.0)
    assert caught.value.status == 413
    assert session.send_error is not None


def test_answer_push_of_a_resume_session_pushes_again_after_a_409() -> None:
    session = open_resume()
    session.resume_write(b"abcdefghij")
    session.resume_push()
    verdict = session.answer_push(
        _refusal(409), _received(4), closed=False, still_in_flight=0, now=0.0
    )
    assert verdict == PushVerdict(drop=True, retry_after=FIRST_DELAY)
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"efghij", (b"PHT-Offset", b"4"))


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_answer_push_of_a_resume_session_retries_an_overwhelmed_hop(status: int) -> None:
    session = open_resume()
    session.resume_write(b"abc")
    session.resume_push()
    verdict = session.answer_push(_refusal(status), [], closed=True, still_in_flight=0, now=0.0)
    assert verdict.drop
    assert verdict.retry_after == pytest.approx(FIRST_DELAY)
    assert session.send_error is None


def test_answer_push_of_a_resume_session_when_the_server_closes() -> None:
    session = open_resume(push_window=2)
    session.resume_write(b"x" * 20)
    session.resume_push()
    session.resume_push()
    ack = PushAcknowledged()
    # Closed with the second push unanswered: its answer is lost, push it again.
    verdict = session.answer_push(ack, _received(10), closed=True, still_in_flight=1, now=0.0)
    assert verdict == PushVerdict(drop=True, retry_after=FIRST_DELAY)
    data, _ = session.resume_push()
    assert len(data) == 10
    # Closed with nothing unanswered: only a new connection for the next push.
    assert session.answer_push(ack, _received(20), closed=True, still_in_flight=0, now=1.0) == DROP


def test_answer_push_of_a_resume_session_raises_for_a_gone_session() -> None:
    session = open_resume()
    session.resume_write(b"abc")
    session.resume_push()
    with pytest.raises(SessionGone) as caught:
        session.answer_push(
            _refusal(410), [(b"pht-gone", b"expired")], closed=True, still_in_flight=0, now=0.0
        )
    assert caught.value.reason is GoneReason.EXPIRED


# --- push failures -----------------------------------------------------------------------


def test_push_broke_in_a_plain_session_breaks_sending_and_the_end() -> None:
    session = _plain()
    with pytest.raises(pht.TunnelError, match="idle for 70 s") as caught:
        session.push_broke(OSError("reset"), idle_for=70.0, now=0.0)
    assert str(caught.value).startswith("push to the PHT server failed: reset")
    assert session.send_error is not None
    # Data may be lost: the end of the session is an error, not EOF.
    with pytest.raises(pht.TunnelError, match="after a push failed"):
        session.pull_event(PullEnded(session_over=True))


def test_push_broke_in_a_resume_session_pushes_again_until_the_grace_runs_out() -> None:
    session = open_resume()  # grace 10 s
    session.resume_write(b"abc")
    session.resume_push()
    first = session.push_broke(OSError("reset"), idle_for=0.0, now=100.0)
    assert first == PushVerdict(drop=True, retry_after=FIRST_DELAY)
    second = session.push_broke(OSError("reset"), idle_for=0.0, now=101.0)
    assert second.retry_after == pytest.approx(2 * FIRST_DELAY)  # the back-off grows
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"abc", (b"PHT-Offset", b"0"))
    with pytest.raises(SessionGone, match="grace period"):
        session.push_broke(OSError("refused"), idle_for=0.0, now=110.0)
    assert session.send_error is not None


def test_push_connect_failed_in_a_plain_session_loses_no_data() -> None:
    session = _plain()
    with pytest.raises(pht.TunnelError, match="cannot connect"):
        session.push_connect_failed(pht.TunnelError("cannot connect to x:1: refused"), now=0.0)
    assert session.send_error is not None
    # Nothing was written: the end of the session is still an EOF.
    assert session.pull_event(PullEnded(session_over=True)) == EndOfStream()


def test_push_connect_failed_in_a_resume_session_backs_off() -> None:
    session = open_resume()
    verdict = session.push_connect_failed(pht.TunnelError("cannot connect"), now=0.0)
    assert verdict.retry_after == pytest.approx(FIRST_DELAY)
    assert session.send_error is None


def test_push_interrupted_in_a_resume_session_pushes_again_at_once() -> None:
    session = open_resume()
    session.resume_write(b"abcdef")
    session.resume_push()
    session.push_interrupted()
    data, headers = session.resume_push()
    assert (data, headers[1]) == (b"abcdef", (b"PHT-Offset", b"0"))
    # No back-off was counted: the next loss waits the first delay.
    assert session.push_broke(OSError("x"), idle_for=0.0, now=0.0).retry_after == pytest.approx(
        FIRST_DELAY
    )


def test_push_interrupted_in_a_plain_session_leaves_the_report_to_the_write() -> None:
    session = _plain()
    session.push_interrupted()
    assert session.send_error is None


# --- pull failures -----------------------------------------------------------------------


def test_pull_broken_in_a_plain_session_fails_it() -> None:
    session = _plain()
    with pytest.raises(pht.TunnelError, match="30 s after the server last sent"):
        session.pull_broken(OSError("reset"), quiet_for=30.0)
    assert session.state is ClientSessionState.ERROR


def test_pull_broken_reports_an_earlier_refused_push_first() -> None:
    session = _plain(push_window=2)
    session.write_returned(1)
    with pytest.raises(pht.TunnelError):
        session.answer_push(_refusal(404), [], closed=True, still_in_flight=0, now=0.0)
    with pytest.raises(pht.TunnelError, match="an earlier push was refused") as caught:
        session.pull_broken(OSError("reset"), quiet_for=0.0)
    assert caught.value.status == 404


def test_pull_broken_in_a_resume_session_re_attaches() -> None:
    session = open_resume()
    session.pull_event(DataReceived(data=b"abc"))
    assert session.pull_broken(OSError("reset"), quiet_for=0.0) == Reattach("reset")
    assert session.pull_lost("reset", now=0.0) == pytest.approx(FIRST_DELAY)
    assert session.pull_headers()[1] == (b"PHT-Ack", b"3")


def test_repoll_broken() -> None:
    plain = _plain()
    plain.pull_event(PullEnded(session_over=False))
    with pytest.raises(pht.TunnelError, match="pull from the PHT server failed: refused"):
        plain.repoll_broken(OSError("refused"))
    assert plain.state is ClientSessionState.ERROR
    resumed = open_resume()
    assert resumed.repoll_broken(OSError("refused")) == Reattach("refused")


def test_a_late_answer_can_leave_nothing_to_push_after_write_step_said_push() -> None:
    """Why an adapter checks ``unpushed`` again after waiting for a push connection.

    Both pushes' answers are lost, so the session pushes again from the
    start; while the adapter opens a connection for that, an ack-only
    push's answer says the server has every byte: there is nothing left to
    push (``resume_push`` would give no data, and an empty push is a close).
    """
    session = open_resume(push_window=2)
    session.resume_write(b"x" * 20)
    session.resume_push()
    session.resume_push()
    session.push_broke(OSError("reset"), idle_for=0.0, now=0.0)
    assert session.resume is not None
    assert session.resume.unpushed == 20
    assert session.write_step(queued=0, in_flight=0, window=2, keep=0) == PushChunk(10)
    ack, _ = session.ack_only_headers()
    assert not session.ack_only_answer(ack, PushAcknowledged(), _received(20))
    assert session.resume.unpushed == 0
    assert session.write_step(queued=0, in_flight=0, window=2, keep=0) == WriteDone()
