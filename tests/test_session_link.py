"""Client and server session machines joined through an in-memory link.

Events and times only: no trio, no sockets. :mod:`tests.session_link` is a
tiny third adapter; here Hypothesis chooses how the bytes are cut on every
connection, the order in which ready tasks run, the data and the push
window, for both GOST flows (``authorize=True``: legacy, ``False``: modern).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pht
from pht._client_session import ClientOptions, Wait
from pht._errors import TunnelError
from pht._events import PullEnded
from pht._server_session import Input, PushVerdict, ServerOptions, ServerSessions

from .session_link import Client, Server, Stream, Task, World

pieces = st.lists(st.integers(1, 40) | st.just(1) | st.just(1 << 20), min_size=1, max_size=8)
chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=6)
flows = st.booleans()
SETTINGS = settings(max_examples=60, deadline=None)


def make_world(
    sizes: list[int],
    seed: int,
    handler: Callable[[Stream], Task],
    *,
    authorize: bool,
    push_window: int = 1,
    max_push_size: int = 64,
    legacy_polls: bool = False,
    **server_options: object,
) -> tuple[World, Client, Server]:
    world = World(sizes, random.Random(seed))
    options = ServerOptions(**server_options)  # type: ignore[arg-type]
    server = Server(world, ServerSessions(options), handler, legacy_polls=legacy_polls)
    config = pht.ClientConfig.build("example.com", authorize=authorize)
    client_options = ClientOptions(
        config=config, push_window=push_window, max_push_size=max_push_size
    )
    return world, Client(world, server, client_options), server


def open_client(world: World, client: Client) -> None:
    done: list[bool] = []

    def task() -> Task:
        yield from client.open()
        done.append(True)

    world.spawn(task())
    world.run(lambda: bool(done))


class Collector:
    """A server handler: writes ``replies``, then reads until EOF (or ``expect`` bytes)."""

    def __init__(self, replies: list[bytes], expect: int | None = None) -> None:
        # With ``expect``, the handler returns once its last push was answered:
        # see test_push_consumed_before_the_session_ended_is_acknowledged.
        self.replies, self.expect = replies, expect
        self.received = bytearray()
        self.eof = False
        self.stream: Stream | None = None

    def __call__(self, stream: Stream) -> Task:
        self.stream = stream
        for reply in self.replies:
            stream.send_all(reply)
        while self.expect is None or len(self.received) < self.expect:
            yield stream.readable
            data = stream.take()
            if not data:
                self.eof = True
                return
            self.received += data
        yield lambda: stream.session.may_deposit() and stream.session.push_deadline == math.inf


def echo(stream: Stream) -> Task:
    while True:
        yield stream.readable
        data = stream.take()
        if not data:
            return
        stream.send_all(data)


@SETTINGS
@given(
    sizes=pieces,
    seed=st.integers(0, 2**32),
    authorize=flows,
    window=st.integers(1, 3),
    sent=chunks,
    pauses=st.lists(st.floats(0, 25), max_size=6),
)
def test_echo_arrives_intact_and_client_close_is_eof_for_the_handler(
    sizes: list[int],
    seed: int,
    authorize: bool,
    window: int,
    sent: list[bytes],
    pauses: list[float],
) -> None:
    ended: list[Stream] = []

    def handler(stream: Stream) -> Task:
        yield from echo(stream)
        ended.append(stream)

    # A legacy flow meets a server that ends every poll after a heartbeat, too.
    world, client, server = make_world(
        sizes, seed, handler, authorize=authorize, push_window=window, legacy_polls=authorize
    )
    open_client(world, client)
    world.spawn(client.reader())
    total = b"".join(sent)
    closed: list[bool] = []

    def app() -> Task:
        for chunk, pause in zip(sent, [*pauses, *[0.0] * len(sent)], strict=False):
            yield from client.send_all(chunk)
            if pause:  # quiet time: heartbeats may come, the client ignores them
                yield from world.sleep_until(world.now + pause)
        yield from world.sleep_until(world.now + 1000, lambda: len(client.received) >= len(total))
        yield from client.aclose()
        closed.append(True)

    world.spawn(app())
    world.run(lambda: bool(closed) and bool(ended))
    assert bytes(client.received) == total
    assert client.error is None
    if any(pause > 10.0 for pause in pauses[: len(sent)]):  # the default heartbeat_interval
        assert client.heartbeats >= 1
        if authorize:  # each heartbeat ended a poll; the client polled again
            assert server.polls > client.heartbeats


@SETTINGS
@given(
    sizes=pieces,
    seed=st.integers(0, 2**32),
    authorize=flows,
    window=st.integers(1, 3),
    up=chunks,
    down=chunks,
    client_closes=st.booleans(),
)
def test_independent_streams_arrive_intact_and_either_close_is_a_clean_eof(
    sizes: list[int],
    seed: int,
    authorize: bool,
    window: int,
    up: list[bytes],
    down: list[bytes],
    client_closes: bool,
) -> None:
    total_up, total_down = b"".join(up), b"".join(down)
    handler = Collector(down, expect=None if client_closes else len(total_up))
    world, client, _ = make_world(sizes, seed, handler, authorize=authorize, push_window=window)
    open_client(world, client)
    world.spawn(client.reader())
    closed: list[bool] = []

    def app() -> Task:
        for chunk in up:
            yield from client.send_all(chunk)
        if client_closes:
            yield from world.sleep_until(
                world.now + 1000, lambda: len(client.received) >= len(total_down)
            )
        else:  # the server ends the session: the client reads to EOF first
            yield from world.sleep_until(world.now + 1000, lambda: client.eof)
        yield from client.aclose()
        closed.append(True)

    world.spawn(app())
    if client_closes:
        world.run(lambda: bool(closed) and handler.eof)
    else:
        world.run(lambda: bool(closed))
        assert client.eof  # the handler returned: EOF, not an error
    assert client.error is None
    assert bytes(handler.received) == total_up
    assert bytes(client.received) == total_down


@pytest.mark.parametrize("authorize", [True, False])
def test_heartbeats_come_when_the_clock_passes_the_interval_and_are_ignored(
    authorize: bool,
) -> None:
    world, client, _ = make_world(
        [7], 0, Collector([b"hello"]), authorize=authorize, heartbeat_interval=10.0
    )
    open_client(world, client)
    world.spawn(client.reader())
    world.run(lambda: bytes(client.received) == b"hello")
    assert client.heartbeats == 0
    world.run(lambda: world.now >= 35.0 and client.heartbeats == 3)
    assert world.now == pytest.approx(40.0)  # due 10 s after the last write each time
    done: list[bool] = []

    def app() -> Task:
        yield from client.send_all(b"after")
        yield from client.aclose()
        done.append(True)

    world.spawn(app())
    world.run(lambda: bool(done))
    assert bytes(client.received) == b"hello"
    assert client.error is None


def sluggish(stream: Stream) -> Task:
    """A handler that never reads."""
    yield lambda: stream.session.closed


def run_until_410(
    sizes: list[int], seed: int, authorize: bool, window: int
) -> tuple[World, Client, Server, list[TunnelError]]:
    world, client, server = make_world(
        sizes, seed, sluggish, authorize=authorize, push_window=window, push_timeout=5.0
    )
    open_client(world, client)
    world.spawn(client.reader())
    failures: list[TunnelError] = []

    def app() -> Task:
        try:
            for _ in range(3):
                yield from client.send_all(b"x" * 10)
            yield from client.aclose()
        except TunnelError as exc:
            failures.append(exc)

    world.spawn(app())
    world.run(lambda: bool(failures) and (client.error is not None or client.eof))
    return world, client, server, failures


@SETTINGS
@given(sizes=pieces, seed=st.integers(0, 2**32), authorize=flows, window=st.integers(1, 3))
def test_push_not_consumed_in_time_is_refused_with_410(
    sizes: list[int], seed: int, authorize: bool, window: int
) -> None:
    world, client, server, failures = run_until_410(sizes, seed, authorize, window)
    assert failures[0].status == 410  # the writer sees it, whatever the push window
    # Pipelined pushes behind the refused one find the session gone (403).
    assert server.refused[0] == 410
    assert set(server.refused) <= {403, 410}
    assert world.now == 5.0  # push_timeout after the push, not earlier
    # Data was lost: the reader sees an error, never EOF (the pull is cut, not ended).
    assert not client.eof
    assert client.error is not None


def test_receive_side_sees_the_end_after_a_410_as_an_error_never_eof() -> None:
    # One-byte pieces: the pull's 5-byte end arrives before the push's 410 head.
    _, client, _, failures = run_until_410([1], 0, authorize=False, window=1)
    assert failures[0].status == 410
    assert not client.eof, "the session ended with data lost: EOF hides it from the reader"
    assert client.error is not None


def test_push_consumed_before_the_session_ended_is_acknowledged() -> None:
    # A handler that takes the pushed bytes and returns at once ends the
    # session (HANDLER_DONE) before the waiting push asks for its verdict:
    # the client is then told 410, data lost, for bytes the handler took.
    sessions: ServerSessions[object] = ServerSessions(ServerOptions())
    session = sessions.admit("t" * 16, 0.0, "127.0.0.1")
    assert not isinstance(session, int)
    session.push_data()
    goal = session.deposit(3, 0.0)
    session.took(3)
    session.end(Input.HANDLER_DONE)
    assert session.verdict(goal, 0.0) is PushVerdict.ACK


@pytest.mark.parametrize("authorize", [True, False])
@pytest.mark.parametrize("budget", ["max_sessions", "per_address"])
def test_full_server_refuses_the_handshake_with_429(authorize: bool, budget: str) -> None:
    limits = (
        {"max_sessions": 1}
        if budget == "max_sessions"
        else {"max_sessions_per_address": 1, "max_pending_per_address": 1}
    )
    world = World([5, 1, 100], random.Random(1))
    server = Server(world, ServerSessions(ServerOptions(**limits)), Collector([]))  # type: ignore[arg-type]
    config = pht.ClientConfig.build("example.com", authorize=authorize)
    first = Client(world, server, ClientOptions(config=config))
    open_client(world, first)
    second = Client(world, server, ClientOptions(config=config))
    with pytest.raises(TunnelError) as caught:
        open_client(world, second)
    assert caught.value.status == 429
    assert server.refused == [429]


@pytest.mark.parametrize("authorize", [True, False])
def test_draining_server_answers_503_to_a_new_session_but_serves_the_running_one(
    authorize: bool,
) -> None:
    handler = Collector([b"still here"])
    world, first, server = make_world([3], 2, handler, authorize=authorize)
    open_client(world, first)
    world.spawn(first.reader())
    server.sessions.drain()
    config = pht.ClientConfig.build("example.com", authorize=authorize)
    second = Client(world, server, ClientOptions(config=config))
    with pytest.raises(TunnelError) as caught:
        open_client(world, second)
    assert caught.value.status == 503
    done: list[bool] = []

    def app() -> Task:
        yield from first.send_all(b"ping")
        yield from first.aclose()
        done.append(True)

    world.spawn(app())
    world.run(lambda: bool(done) and handler.eof)
    assert bytes(handler.received) == b"ping"
    assert bytes(first.received) == b"still here"


def test_pull_event_racing_the_applications_close_is_not_a_protocol_misuse() -> None:
    # aclose() closes the session, then waits for the close notification's
    # answer; meanwhile the server ends the pull and a receive_some still
    # running reads that end. The link's reader checks for the close itself.
    world, client, _ = make_world([64], 0, echo, authorize=False)
    open_client(world, client)
    client.session.close(pushes_settled=True)
    assert isinstance(client.session.pull_event(PullEnded(session_over=True)), Wait)
