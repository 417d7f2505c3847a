"""The server session machine, driven by inputs and times only (no trio, no sockets)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pht
from pht._server_session import (
    TRANSITIONS,
    Input,
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
    ServerSessionState,
    transition_table_markdown,
)

S = ServerSessionState
TOKEN = "a-session-token-0001"


def machine(**options: object) -> ServerSessions[object]:
    tokens = iter(f"issued-token-{n:07d}" for n in range(1000))
    return ServerSessions(ServerOptions(**options), lambda: next(tokens))  # type: ignore[arg-type]


def session(**options: object) -> ServerSession[object]:
    admitted = machine(**options).admit(TOKEN, 0.0, "10.0.0.1")
    assert isinstance(admitted, ServerSession)
    return admitted


# --- when the handler starts ------------------------------------------------------


def test_first_pushed_byte_starts_the_handler_once() -> None:
    one = session()
    assert one.state.name == "ADMITTED"
    assert one.push_data() is True
    assert one.state.name == "STARTED"
    assert one.push_data() is False
    assert one.attach_pull("pull", 1.0) == (None, False)  # started already
    assert one.state is S.PULLED


def test_first_pull_starts_the_handler() -> None:
    one = session()
    assert one.attach_pull("pull", 1.0) == (None, True)
    assert one.push_data() is False


def test_nothing_starts_a_closed_session() -> None:
    one = session()
    one.end(Input.CLOSE)
    assert one.push_data() is False
    assert one.attach_pull("pull", 1.0) == (None, False)
    assert one.state is S.CLOSED
    assert one.ended_by is Input.CLOSE


# --- push acknowledgement ---------------------------------------------------------


def test_push_is_acknowledged_only_once_its_bytes_are_consumed() -> None:
    one = session(push_timeout=30.0)
    one.push_data()
    one.wait_for_push(5.0)
    goal = one.deposit(10, 5.0)
    assert one.verdict(goal, 6.0) is PushVerdict.WAIT
    one.took(4)
    assert one.verdict(goal, 20.0) is PushVerdict.WAIT
    one.took(6)
    assert one.verdict(goal, 20.0) is PushVerdict.ACK
    one.push_over(PushVerdict.ACK)
    assert one.push_deadline == math.inf
    assert one.state is S.STARTED


def test_push_not_consumed_within_push_timeout_is_gone_and_ends_the_session() -> None:
    one = session(push_timeout=30.0)
    one.push_data()
    one.wait_for_push(5.0)
    goal = one.deposit(10, 5.0)
    assert one.push_deadline == 35.0
    assert one.deadline() == 35.0  # the adapter wakes then
    one.took(3)
    assert one.verdict(goal, 34.999) is PushVerdict.WAIT
    assert one.verdict(goal, 35.0) is PushVerdict.GONE
    one.push_over(PushVerdict.GONE)
    assert one.state is S.CLOSED
    assert one.ended_by is Input.PUSH_EXPIRED
    assert one.deposited == one.consumed == 3  # the untaken rest is dropped


def test_pushes_take_turns_and_each_gets_its_own_deadline() -> None:
    one = session(push_timeout=30.0)
    one.push_data()
    one.wait_for_push(0.0)
    first = one.deposit(5, 0.0)
    assert not one.may_deposit()  # a second push waits for its turn
    one.took(5)
    assert one.verdict(first, 10.0) is PushVerdict.ACK
    one.push_over(PushVerdict.ACK)
    assert one.may_deposit()
    second = one.deposit(5, 10.0)
    assert one.push_deadline == 40.0
    assert one.verdict(second, 39.0) is PushVerdict.WAIT


def test_push_to_an_ended_session_is_gone() -> None:
    one = session()
    one.push_data()
    goal = one.deposit(1, 0.0)
    one.end(Input.CLOSE)
    assert one.verdict(goal, 0.0) is PushVerdict.GONE


# --- pulls ----------------------------------------------------------------------------


def test_newer_pull_replaces_a_stale_one() -> None:
    one = session()
    assert one.attach_pull("old", 0.0) == (None, True)
    assert one.attach_pull("new", 1.0) == ("old", False)
    # The stale pull ending (even by hang-up) does not end the session.
    assert one.pull_ended("old", hung_up=True, stalled=False) is False
    assert one.state is S.PULLED
    assert one.pull == "new"


def test_pull_hang_up_ends_the_session() -> None:
    one = session()
    one.attach_pull("pull", 0.0)
    assert one.pull_ended("pull", hung_up=True, stalled=False) is True
    assert one.state is S.CLOSED
    assert one.ended_by is Input.PULL_LOST


def test_pull_that_ends_normally_leaves_the_session_open() -> None:
    one = session()
    one.attach_pull("pull", 0.0)
    assert one.pull_ended("pull", hung_up=False, stalled=False) is False
    assert one.state is S.PULLED
    assert one.pull is None
    assert one.heartbeat_due() == math.inf


def test_stalled_pull_ends_the_session() -> None:
    one = session()
    one.attach_pull("old", 0.0)
    one.attach_pull("new", 0.0)
    assert one.pull_ended("old", hung_up=False, stalled=True) is True
    assert one.ended_by is Input.PULL_STALLED


def test_heartbeat_due_after_interval_of_quiet() -> None:
    one = session(heartbeat_interval=10.0)
    assert one.heartbeat_due() == math.inf  # no pull
    one.attach_pull("pull", 100.0)
    assert one.heartbeat_due() == 110.0
    one.wrote(105.0)
    assert one.heartbeat_due() == 115.0
    assert one.deadline() == 115.0
    one.end(Input.EXPIRED)
    assert one.heartbeat_due() == math.inf


# --- admission: 503, 429, 403 ----------------------------------------------------------


def test_draining_refuses_new_sessions_with_503_but_not_running_ones() -> None:
    sessions = machine()
    running = sessions.admit(TOKEN, 0.0, None)
    assert isinstance(running, ServerSession)
    sessions.drain()
    assert sessions.authorize(1.0, None) == 503
    assert sessions.admit("another-token-000001", 1.0, None) == 503
    assert sessions.admit(TOKEN, 1.0, None) is running


def test_full_or_over_budget_is_429() -> None:
    sessions = machine(max_sessions=2, max_sessions_per_address=1, max_pending_per_address=1)
    assert isinstance(sessions.admit("first-token-00000001", 0.0, "a"), ServerSession)
    assert sessions.admit("second-token-0000001", 0.0, "a") == 429  # over a's budget
    assert isinstance(sessions.authorize(0.0, "b"), str)
    assert sessions.authorize(0.0, "b") == 429  # b's pending budget
    assert sessions.admit("third-token-00000001", 0.0, "c") == 429  # table full


def test_closed_and_unknown_tokens_are_403() -> None:
    sessions = machine()
    one = sessions.admit(TOKEN, 0.0, None)
    assert isinstance(one, ServerSession)
    assert sessions.close(TOKEN, 1.0) is one
    assert one.closed
    assert sessions.admit(TOKEN, 2.0, None) == 403
    strict = machine(strict=True)
    assert strict.admit(TOKEN, 0.0, None) == 403
    token = strict.authorize(0.0, None)
    assert isinstance(token, str)
    assert isinstance(strict.admit(token, 0.0, None), ServerSession)


# --- expiry --------------------------------------------------------------------------


def test_issued_lazy_and_idle_expiry() -> None:
    sessions = machine(issued_timeout=60.0, lazy_timeout=10.0, idle_timeout=600.0)
    issued = sessions.authorize(0.0, None)
    lazy = sessions.admit("lazy-token-000000001", 0.0, None)
    alive = sessions.admit("alive-token-00000001", 0.0, None)
    assert isinstance(issued, str)
    assert isinstance(lazy, ServerSession)
    assert isinstance(alive, ServerSession)
    sessions.attach_pull(alive, "pull", 0.0)
    alive.pull_ended("pull", hung_up=False, stalled=False)
    assert [record.token for record in sessions.expired(9.0)] == []
    assert [record.token for record in sessions.expired(10.0)] == [lazy.token]
    assert [record.token for record in sessions.expired(60.0)] == [issued, lazy.token]
    assert alive.token not in [record.token for record in sessions.expired(599.0)]
    assert alive.token in [record.token for record in sessions.expired(600.0)]


def test_a_session_with_a_pull_attached_does_not_expire() -> None:
    sessions = machine(lazy_timeout=10.0, idle_timeout=600.0)
    one = sessions.admit(TOKEN, 0.0, None)
    assert isinstance(one, ServerSession)
    sessions.attach_pull(one, "pull", 0.0)
    assert sessions.expired(10_000.0) == []  # touched instead
    one.pull_ended("pull", hung_up=False, stalled=False)
    assert sessions.expired(10_599.0) == []
    assert [record.token for record in sessions.expired(10_600.0)] == [TOKEN]


# --- states as data --------------------------------------------------------------------


def test_misuse_enters_error_through_one_door() -> None:
    one = session()
    with pytest.raises(pht.LocalProtocolError, match="not allowed in state ADMITTED"):
        one.end(Input.HANDLER_DONE)  # no handler ran
    assert one.state is S.ERROR
    with pytest.raises(pht.LocalProtocolError, match="not allowed in state ERROR"):
        one.push_data()
    other = session()
    with pytest.raises(pht.LocalProtocolError, match="does not end a session"):
        other.end(Input.PUSH_DATA)
    assert other.state is S.ERROR


def test_transition_table_covers_every_live_state_and_closed_absorbs_all() -> None:
    for event in Input:
        assert TRANSITIONS[(S.CLOSED, event)] is S.CLOSED
        assert (S.ERROR, event) not in TRANSITIONS
    for state in (S.STARTED, S.PULLED, S.DETACHED):
        assert all((state, event) in TRANSITIONS for event in Input)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"push_timeout": 0}, "push_timeout"),
        ({"max_buffered": 0}, "max_buffered"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_sessions_per_address": 0}, "max_sessions_per_address"),
        ({"trusted_proxies": ["not an address"]}, "trusted_proxies"),
    ],
)
def test_server_options_are_validated(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptions.build(**options)  # type: ignore[arg-type]


def test_server_options_are_frozen_and_parse_trusted_proxies() -> None:
    options = ServerOptions.build(trusted_proxies=["10.0.0.0/8", "::1"], push_path="/p")
    assert [str(network) for network in options.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert options.paths.push == "/p"
    with pytest.raises(AttributeError):
        options.push_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="not a str"):
        ServerOptions.build(trusted_proxies="10.0.0.1")


def test_client_address_behind_trusted_proxies() -> None:
    sessions = machine(trusted_proxies=("10.0.0.0/8",))
    assert sessions.client_of("10.1.2.3:80", b"192.0.2.7, 10.9.9.9") == (
        "192.0.2.7",
        "192.0.2.7",
    )
    assert sessions.client_of("192.0.2.1:80", b"203.0.113.5") == ("192.0.2.1", "192.0.2.1:80")
    assert sessions.connection_budget("10.1.2.3") is None
    assert sessions.connection_budget("192.0.2.1") == 1024


def test_core_imports_neither_trio_nor_asyncio() -> None:
    code = (
        "import sys, pht._server_session, pht._server;"
        "print(sorted(m for m in ('trio', 'asyncio') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_protocol_doc_shows_the_transition_table() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = doc.split("## The server session machine", 1)[1].split("\n## ", 1)[0]
    assert transition_table_markdown() in section


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(1, 50)),
        st.tuples(st.just("take"), st.integers(1, 50)),
        st.tuples(st.just("pull"), st.sampled_from("abc")),
        st.tuples(st.just("pull end"), st.sampled_from("abc"), st.booleans(), st.booleans()),
        st.tuples(
            st.just("end"),
            st.sampled_from([Input.CLOSE, Input.EXPIRED, Input.SHUTDOWN, Input.HANDLER_DONE]),
        ),
        st.tuples(st.just("wait"), st.floats(0, 40)),
    ),
    max_size=40,
)


@given(OPERATIONS)
def test_any_sequence_of_adapter_inputs_keeps_the_rules(operations: list[tuple[Any, ...]]) -> None:
    """Whatever an adapter feeds in (in an allowed order), the session rules hold."""
    one = session(push_timeout=30.0, heartbeat_interval=10.0)
    now, goal, started = 0.0, 0, 0
    for operation in operations:
        was_closed = one.closed
        kind = operation[0]
        if kind == "push":
            started += one.push_data()
            if one.may_deposit() and not one.closed:
                one.wait_for_push(now)
                goal = one.deposit(operation[1], now)
        elif kind == "take":
            one.took(min(operation[1], one.deposited - one.consumed))
        elif kind == "pull":
            started += one.attach_pull(operation[1], now)[1]
        elif kind == "pull end":
            one.pull_ended(operation[1], hung_up=operation[2], stalled=operation[3])
        elif kind == "end":
            if operation[1] is Input.HANDLER_DONE and one.state is S.ADMITTED:
                continue  # no handler ran: the adapter never says this
            one.end(operation[1])
        else:
            now += operation[1]
        if goal:
            verdict = one.verdict(goal, now)
            if verdict is not PushVerdict.WAIT:
                one.push_over(verdict)
                assert verdict is PushVerdict.GONE or one.consumed >= goal
                goal = 0
        assert one.consumed <= one.deposited
        assert started <= 1  # the handler starts once at most
        if was_closed:
            assert one.closed  # nothing reopens a session
        if one.closed:
            assert one.pull is None
            assert one.deadline() == math.inf
            assert one.ended_by is not None
        else:
            assert one.state is not S.ERROR
            assert (one.pull is None) == (one.heartbeat_due() == math.inf)


def test_server_side_uses_no_h11_internals() -> None:
    """The server modules use h11's public API only (no private buffers, no fake requests)."""
    root = Path(__file__).parent.parent / "pht"
    for name in ("_server.py", "_server_session.py", "_trio_server.py"):
        source = (root / name).read_text(encoding="utf-8")
        for internal in ("_receive_buffer", "_SYNC_REQUEST", "maybe_extract", "h11._"):
            assert internal not in source, (name, internal)
