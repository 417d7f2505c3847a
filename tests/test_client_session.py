"""The client session machine, driven by events and times only (no trio, no sockets)."""

from __future__ import annotations

import math
import ssl
from pathlib import Path

import pytest

import pht
from pht._client_session import (
    SETTLE_ACKS,
    TRANSITIONS,
    ClientOptions,
    ClientSession,
    ClientSessionState,
    CollectAck,
    Deliver,
    EndOfStream,
    Established,
    PollAgain,
    PushChunk,
    SendAuthorize,
    SendPull,
    Wait,
    WriteDone,
    describe_failure,
    render_transitions,
    ssl_context_for,
)
from pht._events import (
    Authorized,
    DataReceived,
    Heartbeat,
    PullEnded,
    PullStarted,
    PushAcknowledged,
    Rejected,
    RequestKind,
)

from .test_client_resume import GRANT, open_resume

State = ClientSessionState


def _state(session: ClientSession) -> ClientSessionState:
    """The state, read through a call (so that mypy does not narrow it between moves)."""
    return session.state


def _options(*, authorize: bool, **kwargs: object) -> ClientOptions:
    config = pht.ClientConfig.build("example.com", authorize=authorize)
    return ClientOptions(config=config, **kwargs)  # type: ignore[arg-type]


def _rejected(status: int, kind: RequestKind = RequestKind.PULL) -> Rejected:
    return Rejected(kind=kind, status_code=status, reason="No")


def _open_legacy() -> ClientSession:
    session = ClientSession(_options(authorize=True))
    assert session.start() is None
    assert _state(session) is State.AUTHORIZING
    assert session.pull_event(Authorized(token="t1")) == SendPull("t1")
    assert _state(session) is State.STARTING
    assert session.pull_event(PullStarted()) == Wait()
    assert _state(session) is State.OPEN
    return session


def _open_modern(**kwargs: object) -> ClientSession:
    session = ClientSession(_options(authorize=False, token_source=lambda: "made", **kwargs))
    assert session.start() == SendPull("made")
    assert _state(session) is State.STARTING
    assert session.pull_event(PullStarted()) == Wait()
    return session


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_push_size": 0}, ValueError),
        ({"max_push_size": 1.5}, TypeError),
        ({"push_window": 0}, ValueError),
        ({"push_window": True}, TypeError),
        ({"connect_timeout": 0}, ValueError),
        ({"connect_timeout": math.inf}, ValueError),
        ({"connect_timeout": "5"}, TypeError),
        ({"close_timeout": -1}, ValueError),
        ({"close_timeout": None}, TypeError),
        ({"token": ""}, TypeError),
    ],
)
def test_options_refuse_bad_values(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        _options(authorize=False, **kwargs)


def test_options_refuse_a_token_for_the_legacy_flow() -> None:
    with pytest.raises(ValueError, match="authorize=False"):
        _options(authorize=True, token="mine")


def test_options_refuse_something_else_than_a_config() -> None:
    with pytest.raises(TypeError, match="ClientConfig"):
        ClientOptions(config="example.com")  # type: ignore[arg-type]


def test_options_are_frozen() -> None:
    options = _options(authorize=False)
    with pytest.raises(AttributeError):
        options.push_window = 3  # type: ignore[misc]


# --- the handshake -----------------------------------------------------------------------


def test_legacy_handshake_authorizes_then_pulls_with_the_issued_token() -> None:
    session = _open_legacy()
    assert session.token == "t1"
    assert session.established


def test_modern_handshake_uses_the_given_token() -> None:
    session = ClientSession(_options(authorize=False, token="fixed"))
    assert session.start() == SendPull("fixed")


def test_modern_handshake_makes_a_token() -> None:
    session = _open_modern()
    assert session.token == "made"


def test_refused_authorize_is_an_error_with_its_status() -> None:
    session = ClientSession(_options(authorize=True))
    session.start()
    with pytest.raises(pht.TunnelError, match="429") as caught:
        session.pull_event(_rejected(429, RequestKind.AUTHORIZE))
    assert caught.value.status == 429
    assert "too many pending sessions" in str(caught.value)
    assert _state(session) is State.ERROR
    assert session.error is caught.value


def test_403_to_the_first_pull_is_an_error_not_an_eof() -> None:
    session = ClientSession(_options(authorize=False))
    session.start()
    with pytest.raises(pht.TunnelError) as caught:
        session.pull_event(_rejected(403))
    assert caught.value.status == 403
    # The modern flow against a legacy server: say what to change.
    assert "authorize=True" in str(caught.value)
    assert _state(session) is State.ERROR


def test_handshake_failure_is_a_tunnel_error() -> None:
    session = ClientSession(_options(authorize=True))
    session.start()
    error = session.handshake_failed(OSError("reset"))
    assert isinstance(error, pht.TunnelError)
    assert "handshake" in str(error)
    assert _state(session) is State.ERROR


# --- data, re-polls and the end ----------------------------------------------------------


def test_data_and_heartbeats_while_open() -> None:
    session = _open_modern()
    assert session.pull_event(DataReceived(data=b"hi")) == Deliver(b"hi")
    assert session.pull_event(Heartbeat()) == Wait()
    assert _state(session) is State.OPEN


def test_legacy_poll_end_asks_for_a_new_poll() -> None:
    session = _open_legacy()
    assert session.pull_event(PullEnded(session_over=False)) == PollAgain("t1")
    assert _state(session) is State.REPOLLING
    assert session.pull_event(PullStarted()) == Wait()
    assert _state(session) is State.OPEN


def test_legacy_403_to_a_repoll_is_the_end_of_the_stream() -> None:
    session = _open_legacy()
    session.pull_event(PullEnded(session_over=False))
    assert session.pull_event(_rejected(403)) == EndOfStream()
    assert _state(session) is State.ENDED
    assert session.send_error is not None  # nothing can be sent to an ended session


def test_410_to_a_repoll_is_data_lost_not_an_eof() -> None:
    session = _open_legacy()
    session.pull_event(PullEnded(session_over=False))
    with pytest.raises(pht.TunnelError, match="410") as caught:
        session.pull_event(_rejected(410))
    assert caught.value.status == 410
    assert "not consumed" in str(caught.value)
    assert _state(session) is State.ERROR


def test_403_to_a_push_of_an_established_session_says_how_it_ended() -> None:
    session = _open_modern()
    session.pull_failed(OSError("cut"))
    with pytest.raises(pht.TunnelError, match="no longer knows this session") as caught:
        session.push_answer(_rejected(403, RequestKind.PUSH), closed=True, still_in_flight=0)
    assert "its pull failed: cut" in str(caught.value)


def test_modern_pull_end_is_the_end_of_the_stream() -> None:
    session = _open_modern()
    assert session.pull_event(PullEnded(session_over=True)) == EndOfStream()
    assert _state(session) is State.ENDED


def test_legacy_empty_poll_is_the_end_of_the_stream() -> None:
    session = _open_legacy()
    assert session.pull_event(PullEnded(session_over=True)) == EndOfStream()


@pytest.mark.parametrize("legacy", [True, False])
def test_data_lost_is_never_an_eof(legacy: bool) -> None:
    session = _open_legacy() if legacy else _open_modern()
    error = session.push_failed("push to the PHT server failed: reset")
    assert session.send_error is not None
    assert str(session.send_error) == str(error)
    # The pull goes on after a failed push: data still on its way arrives.
    assert session.pull_event(DataReceived(data=b"x")) == Deliver(b"x")
    if legacy:
        session.pull_event(PullEnded(session_over=False))
        end = _rejected(403)
    else:
        end = PullEnded(session_over=True)  # type: ignore[assignment]
    with pytest.raises(pht.TunnelError, match="ended after a push failed"):
        session.pull_event(end)
    assert _state(session) is State.ERROR


def test_pull_failure_says_how_long_the_server_was_quiet() -> None:
    session = _open_modern()
    error = session.pull_failed(OSError("reset"), quiet_for=75.0)
    assert "75 s after the server last sent anything" in str(error)
    assert _state(session) is State.ERROR
    assert session.error is error
    quick = _open_modern().pull_failed(OSError("reset"), quiet_for=0.2)
    assert "after the server" not in str(quick)


def test_repoll_failure_is_an_error() -> None:
    session = _open_legacy()
    session.pull_event(PullEnded(session_over=False))
    error = session.repoll_failed(OSError("refused"))
    assert "pull from the PHT server failed" in str(error)
    assert _state(session) is State.ERROR


def test_events_out_of_order_are_a_local_error() -> None:
    session = _open_modern()
    with pytest.raises(pht.LocalProtocolError, match="unexpected Authorized"):
        session.pull_event(Authorized(token="late"))
    assert _state(session) is State.ERROR


# --- pushes ------------------------------------------------------------------------------


def test_push_window_within_one_large_write() -> None:
    session = ClientSession(_options(authorize=False, max_push_size=10, push_window=1))
    assert session.push_window_for(10) == 1
    assert session.push_window_for(11) == 2
    wide = ClientSession(_options(authorize=False, max_push_size=10, push_window=4))
    assert wide.push_window_for(11) == 4


def _drive_write(session: ClientSession, size: int, *, window: int, keep: int) -> list[str]:
    """The steps of one write of ``size`` bytes, answers arriving when collected."""
    steps: list[str] = []
    queued, in_flight = size, 0
    for _ in range(100):
        step = session.write_step(queued=queued, in_flight=in_flight, window=window, keep=keep)
        if isinstance(step, PushChunk):
            steps.append(f"push {step.size}")
            session.pushed(step.size)
            queued -= step.size
            in_flight += 1
        elif isinstance(step, CollectAck):
            steps.append("ack")
            in_flight -= 1
            session.push_answer(PushAcknowledged(), closed=False, still_in_flight=in_flight)
        else:
            assert step == WriteDone()
            return steps
    raise AssertionError("the write never finished")


def test_handshake_steps_legacy_flow() -> None:
    session = ClientSession(_options(authorize=True))
    assert session.handshake_step() == SendAuthorize()
    assert session.handshake_step(Authorized(token="t1")) == SendPull("t1")
    assert session.handshake_step(PullStarted()) == Established()
    assert session.token == "t1"
    assert _state(session) is State.OPEN


def test_handshake_steps_modern_flow() -> None:
    session = ClientSession(_options(authorize=False, token_source=lambda: "mine"))
    assert session.handshake_step() == SendPull("mine")
    assert session.handshake_step(PullStarted()) == Established()


def test_handshake_refusal_raises_with_the_status() -> None:
    session = ClientSession(_options(authorize=False, token_source=lambda: "mine"))
    session.handshake_step()
    with pytest.raises(pht.TunnelError) as caught:
        session.handshake_step(_rejected(403))
    assert caught.value.status == 403
    assert _state(session) is State.ERROR


def test_stop_and_wait_write() -> None:
    session = _open_modern(max_push_size=10, push_window=1)
    window = session.push_window_for(5)
    assert _drive_write(session, 5, window=window, keep=session.keep_after_write) == [
        "push 5",
        "ack",
    ]
    assert session.acknowledged == 5


def test_large_write_pipelines_two_pushes_and_returns_acknowledged() -> None:
    session = _open_modern(max_push_size=10, push_window=1)
    window = session.push_window_for(25)
    steps = _drive_write(session, 25, window=window, keep=session.keep_after_write)
    assert steps == ["push 10", "push 10", "ack", "push 5", "ack", "ack"]
    assert session.acknowledged == 25


def test_windowed_write_returns_with_pushes_in_flight() -> None:
    session = _open_modern(max_push_size=10, push_window=3)
    assert session.keep_after_write == 2
    assert session.options.channel_push_window == 3
    steps = _drive_write(session, 40, window=session.push_window_for(40), keep=2)
    assert steps == ["push 10", "push 10", "push 10", "ack", "push 10", "ack"]
    assert session.acknowledged == 20  # two of the four pushes are still unanswered
    # Settling (before a close, or on an idle connection) collects them all.
    assert session.write_step(queued=0, in_flight=3, window=1, keep=0) == CollectAck()
    assert session.write_step(queued=0, in_flight=0, window=1, keep=0) == WriteDone()


def test_channel_window_is_two_at_least() -> None:
    assert _options(authorize=False, push_window=1).channel_push_window == 2


def test_unanswered_bytes_after_a_write() -> None:
    assert _options(authorize=False, push_window=1).unanswered_bytes == 0
    assert _options(authorize=False, push_window=3, max_push_size=10).unanswered_bytes == 20


def test_a_refused_push_forgets_the_sizes_in_flight() -> None:
    session = _open_modern()
    session.pushed(3)
    session.pushed(4)
    with pytest.raises(pht.TunnelError):
        session.push_answer(_rejected(410, RequestKind.PUSH), closed=True, still_in_flight=1)
    session.pushed(5)
    session.push_answer(PushAcknowledged(), closed=False, still_in_flight=0)
    assert session.acknowledged == 5


def test_connect_failures_name_what_was_dialled() -> None:
    options = ClientOptions.build("example.com", 8080, connect_timeout=3)
    assert options.dial_address == ("example.com", 8080)
    assert str(options.connect_failed(ConnectionRefusedError(111, "Connection refused"))) == (
        "cannot connect to example.com:8080: Connection refused"
    )
    proxied = ClientOptions.build("example.com", 8080, proxy="http://10.0.0.1:3128")
    assert proxied.dial_address == ("10.0.0.1", 3128)
    assert str(proxied.connect_timed_out()) == "timed out connecting to proxy 10.0.0.1:3128"
    assert str(proxied.connect_failed(RuntimeError("no route"))) == (
        "cannot connect to proxy 10.0.0.1:3128: no route"
    )
    message = str(options.tls_failed(ValueError("bad certificate")))
    assert message.startswith("TLS handshake with example.com:8080 failed: bad certificate;")


def test_failure_mentions_a_long_idle_time() -> None:
    assert describe_failure(OSError("reset"), 0.5) == "reset"
    assert describe_failure(OSError("reset"), 61.2) == (
        "reset (the connection had been idle for 61 s)"
    )


def test_idle_pushes_are_settled_after_a_while() -> None:
    session = _open_modern()
    assert not session.should_settle(0, 100.0)
    assert not session.should_settle(2, SETTLE_ACKS - 0.01)
    assert session.should_settle(2, SETTLE_ACKS)
    # A resume session does not: a push lost with its connection is pushed again.
    assert not open_resume().should_settle(2, SETTLE_ACKS)


def test_push_acknowledged() -> None:
    session = _open_modern()
    ack = PushAcknowledged()
    assert session.push_answer(ack, closed=False, still_in_flight=0) is False
    assert session.push_answer(ack, closed=True, still_in_flight=0) is True
    assert session.send_error is None


def test_push_connection_closed_with_pushes_unanswered_breaks_sending() -> None:
    session = _open_modern()
    with pytest.raises(pht.TunnelError, match="pushes unanswered"):
        session.push_answer(PushAcknowledged(), closed=True, still_in_flight=1)
    assert session.send_error is not None
    assert _state(session) is State.OPEN  # the pull side goes on


@pytest.mark.parametrize("earlier", [True, False])
def test_refused_push_carries_its_status(earlier: bool) -> None:
    session = _open_modern()
    if earlier:
        session.write_returned(1)  # a write returned with this push unanswered
    with pytest.raises(pht.TunnelError) as caught:
        session.push_answer(_rejected(413, RequestKind.PUSH), closed=True, still_in_flight=0)
    assert caught.value.status == 413
    assert str(caught.value).startswith("an earlier push was refused") is earlier
    assert "client_max_body_size" in str(caught.value)
    assert session.send_error is not None
    assert session.send_error.status == 413


def test_acknowledgements_timed_out_breaks_sending() -> None:
    session = _open_modern()
    assert "timed out" in str(session.acks_timed_out())
    assert session.send_error is not None


# --- closing -----------------------------------------------------------------------------


def test_close_notifies_an_open_session() -> None:
    session = _open_modern()
    assert session.close(pushes_settled=True) is True
    assert _state(session) is State.CLOSED


def test_close_does_not_notify_an_ended_session() -> None:
    session = _open_modern()
    session.pull_event(PullEnded(session_over=True))
    assert session.close(pushes_settled=True) is False


def test_close_does_not_notify_with_pushes_unsettled() -> None:
    session = _open_modern()
    assert session.close(pushes_settled=False) is False


def test_failure_after_close_keeps_closed() -> None:
    session = _open_modern()
    session.close(pushes_settled=True)
    session.pull_failed(OSError("closed"))
    assert _state(session) is State.CLOSED


# --- the connection reuse rule (per channel, with the time passed in) ---------------------


def test_idle_connection_is_reused_only_below_keepalive_expiry() -> None:
    config = pht.ClientConfig.build("example.com", keepalive_expiry=50.0)
    fresh = pht.ClientChannel(config)
    assert fresh.reusable(49.9)
    stale = pht.ClientChannel(config)
    assert not stale.reusable(50.0)
    assert stale.state is pht.ChannelState.CLOSED
    ended = pht.ClientChannel(config)
    ended.receive_data(b"")  # the server closed it while idle
    assert not ended.reusable(0.0)


# --- the table ---------------------------------------------------------------------------


def test_every_transition_is_reachable() -> None:
    """Each row of the table is taken by one of the flows above."""
    taken: set[tuple[ClientSessionState, str]] = set()
    original = ClientSession._enter

    def spy(self: ClientSession, what: str) -> None:
        taken.add((self.state, what))
        original(self, what)

    ClientSession._enter = spy  # type: ignore[method-assign]
    try:
        legacy = _open_legacy()
        legacy.pull_event(DataReceived(data=b"a"))
        legacy.pull_event(Heartbeat())
        legacy.pull_event(PullEnded(session_over=False))
        legacy.pull_event(PullStarted())
        legacy.pull_event(PullEnded(session_over=False))
        legacy.pull_event(_rejected(403))
        _open_modern().pull_event(PullEnded(session_over=True))
        resumed = open_resume()
        resumed.pull_event(PullEnded(session_over=True))  # re-attach
        resumed.pull_event(PullStarted(), GRANT)
        resumed.pull_lost(OSError("cut"), now=0.0)
        resumed.pull_lost(OSError("cut again"), now=0.1)
        resumed.pull_event(_rejected(503))
        resumed.pull_event(_rejected(410), [(b"pht-gone", b"closed")])
        ended = open_resume()
        ended.pull_event(PullEnded(session_over=True))
        ended.pull_event(PullStarted(), [*GRANT[:1], (b"pht-offset", b"0"), (b"pht-end", b"1")])
        ended.pull_event(DataReceived(data=b"x"))
        ended.pull_event(PullEnded(session_over=True))
    finally:
        ClientSession._enter = original  # type: ignore[method-assign]
    assert taken == set(TRANSITIONS)


def test_the_end_states_have_no_way_out() -> None:
    sources = {state for state, _ in TRANSITIONS}
    assert not sources & {State.ENDED, State.CLOSED, State.ERROR}


# --- a channel and the session together, over bytes --------------------------------------

_AUTHORIZED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ntoken=t1"
_ONE_POLL = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\naGk=\n\r\n1\r\n\n\r\n0\r\n\r\n"
)
_FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"


def _feed(
    channel: pht.ClientChannel, session: ClientSession, data: bytes, step: int
) -> list[object]:
    actions: list[object] = []
    for start in range(0, len(data), step):
        channel.receive_data(data[start : start + step])
        while not isinstance(event := channel.next_event(), pht.NeedData):
            actions.append(session.pull_event(event))
    return actions


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_legacy_session_over_bytes(step: int) -> None:
    """Authorize, one poll with data and a heartbeat, a re-poll refused with 403: EOF."""
    options = _options(authorize=True)
    session = ClientSession(options)
    channel = pht.ClientChannel(options.config)
    assert session.start() is None
    channel.authorize()
    (send_pull,) = _feed(channel, session, _AUTHORIZED, step)
    assert isinstance(send_pull, SendPull)
    channel.pull(send_pull.token)
    actions = _feed(channel, session, _ONE_POLL, step)
    assert [a for a in actions if isinstance(a, Deliver)] == [Deliver(b"hi")]
    assert actions[-1] == PollAgain("t1")
    assert channel.reusable(0.0)
    channel.pull("t1")
    assert _feed(channel, session, _FORBIDDEN, step) == [EndOfStream()]


def test_protocol_doc_shows_the_table_from_the_code() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = doc.split("## The client session machine", 1)[1].split("\n## ", 1)[0]
    assert render_transitions() in section


# --- options from open_pht_stream's keyword arguments -------------------------------------


def test_build_from_keywords() -> None:
    options = ClientOptions.build(
        "::1", 8443, secure=True, authorize=False, proxy=None, push_window=3, pull_path="/p"
    )
    assert options.address == "[::1]:8443"
    assert options.config.host == "[::1]:8443"
    assert options.config.scheme == "https"
    assert options.config.paths.pull == "/p"
    assert options.push_window == 3
    default_port = ClientOptions.build("example.com", 80)
    assert default_port.config.host == "example.com"


def test_build_with_a_proxy() -> None:
    options = ClientOptions.build("example.com", 8080, proxy="http://u%40x:p@127.0.0.1:3128")
    assert options.proxy == ("127.0.0.1", 3128)
    assert options.config.proxy_authority == "example.com:8080"
    assert options.config.proxy_authorization is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"port": 0}, ValueError, "1-65535"),
        ({"port": "80"}, TypeError, "port must be an int"),
        ({"port": 80, "proxy": "socks5://127.0.0.1:1080"}, ValueError, "http://"),
        ({"port": 443, "proxy": "http://127.0.0.1:3128", "secure": True}, ValueError, "phts"),
    ],
)
def test_build_refuses_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ClientOptions.build("example.com", **kwargs)  # type: ignore[arg-type]


def test_only_pushes_of_returned_writes_count_as_earlier() -> None:
    session = _open_modern()
    session.write_returned(1)
    session.push_answer(PushAcknowledged(), closed=False, still_in_flight=1)  # the earlier one
    with pytest.raises(pht.TunnelError) as caught:
        session.push_answer(_rejected(403, RequestKind.PUSH), closed=True, still_in_flight=0)
    assert not str(caught.value).startswith("an earlier push")


def test_handshake_timeout_names_the_server_and_the_step() -> None:
    session = ClientSession(ClientOptions.build("127.0.0.1", 8080, connect_timeout=3))
    session.start()
    error = session.handshake_timed_out()
    assert str(error).startswith("127.0.0.1:8080 accepted the connection")
    assert "authorize or pull request within 3s" in str(error)
    assert _state(session) is State.ERROR


def test_ssl_context_for_the_adapters_tls_arguments() -> None:
    context = ssl.create_default_context()
    assert ssl_context_for(context) is context
    assert ssl_context_for(False) is None
    made = ssl_context_for(True)
    assert made is not None
    assert made.verify_mode is ssl.CERT_REQUIRED
    with pytest.raises(TypeError, match=r"tls must be a bool or an ssl\.SSLContext, not NoneType"):
        ssl_context_for(None)
    assert ssl_context_for(None, name="ssl", none_ok=True) is None
    with pytest.raises(TypeError, match=r"ssl must be None, a bool or an ssl\.SSLContext"):
        ssl_context_for("yes", name="ssl", none_ok=True)  # type: ignore[arg-type]
