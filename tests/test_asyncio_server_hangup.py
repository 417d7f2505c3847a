"""The asyncio server notices a pulling client's hang-up without a task per pull.

While a pull streams, the connection's protocol watches for the client
going away (end of file, a reset, or more than a request head sent up the
pull) and hands the pull's end to the server's turns. These tests open
pulls by hand over real loopback sockets (blocking sockets, every read
bounded by a guard) against :func:`start_pht_server` on asyncio's loop and
on uvloop, run in a thread by :class:`~tests.test_asyncio_server.ServerThread`.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pht._asyncio_server import HANG_UP_BATCH, TEARDOWN_PER_TURN, _Connection, _PullWriter
from pht._server_core import PARK_AFTER

from .raw_http import TIMEOUT, RawPull, raw_push
from .test_asyncio_server import ServerThread, loop_name, serve
from .test_hardening_support import GUARD, pull_request, push_request

__all__ = ["loop_name", "serve"]

T = TypeVar("T")


class Ended:
    """An echo handler that records each session it saw end (the reader's EOF)."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self._changed = threading.Condition()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
        with self._changed:
            self.tokens.append(writer.get_extra_info("pht_token"))
            self._changed.notify_all()

    def wait(self, count: int) -> list[str]:
        """The tokens of the ended sessions, once there are ``count`` (a guard bounds the wait)."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.tokens) >= count, GUARD), self.tokens
            return list(self.tokens)


@pytest.fixture
def ended() -> Ended:
    return Ended()


def on_server(server: ServerThread, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` on the server's loop and return its result."""

    async def run() -> T:
        return await work()

    return asyncio.run_coroutine_threadsafe(run(), server.loop).result(GUARD)


def task_count(server: ServerThread) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return on_server(server, count) - 1  # not counting the counter


def token(number: int) -> str:
    return f"hangup-test-token-{number:04d}"


def open_pulls(port: int, count: int) -> list[RawPull]:
    pulls = [RawPull(port, "/pull", token(number)) for number in range(count)]
    assert [pull.status for pull in pulls] == [200] * count
    return pulls


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    sock.settimeout(TIMEOUT)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def test_an_idle_pull_runs_no_task_of_its_own(
    serve: Callable[..., ServerThread], ended: Ended
) -> None:
    """An idle tunnel costs its connection's task and its handler's, nothing that watches it."""
    server = serve(ended)
    before = task_count(server)
    pulls = open_pulls(server.port, 5)
    try:
        assert task_count(server) == before + 2 * len(pulls)
    finally:
        for pull in pulls:
            pull.close()  # a hang-up still ends the session
    assert sorted(ended.wait(len(pulls))) == sorted(token(n) for n in range(len(pulls)))


def record_turns(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """The server loop's turn (see ``count_turns``) at each call of ``owner.name``."""
    seen: list[int] = []
    original = getattr(owner, name)

    def recorded(self: Any) -> None:
        seen.append(turns[0])
        original(self)

    monkeypatch.setattr(owner, name, recorded)
    turns[0] = 0
    return seen


@pytest.fixture
def hang_ups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The turn at each pull ended for a hang-up."""
    return record_turns(monkeypatch, _PullWriter, "hang_up")


@pytest.fixture
def unparks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The turn at each connection let back to the loop's reading."""
    return record_turns(monkeypatch, _Connection, "unparked")


#: The number of the server loop's current turn, while ``count_turns`` runs.
turns = [0]


async def count_turns(stop: asyncio.Event) -> None:
    while not stop.is_set():
        turns[0] += 1
        await asyncio.sleep(0)


def test_a_mass_hang_up_ends_every_session_taking_turns(
    serve: Callable[..., ServerThread], ended: Ended, hang_ups: list[int], unparks: list[int]
) -> None:
    """Pulls hung up together end a batch per turn of the loop, not all in one turn."""
    server = serve(ended)
    count = 4 * TEARDOWN_PER_TURN + 3
    pulls = open_pulls(server.port, count)
    stop = on_server(server, _make_event)
    counter = on_server(server, lambda: _start(count_turns(stop)))
    # Hold the server's loop while every client hangs up, so that it sees
    # all the ends of file in one poll of its sockets.

    def close_all() -> None:
        for pull in pulls:
            pull.close()

    hold_then(server, close_all)
    assert len(ended.wait(count)) == count
    server.loop.call_soon_threadsafe(stop.set)
    on_server(server, lambda: asyncio.wait([counter]))
    assert len(hang_ups) == count
    per_turn = Counter(hang_ups)
    assert max(per_turn.values()) <= TEARDOWN_PER_TURN, per_turn
    assert len(per_turn) >= count // TEARDOWN_PER_TURN
    # The loop itself saw the ends of file a batch per turn, not all in one.
    assert len(unparks) == count
    assert max(Counter(unparks).values()) <= HANG_UP_BATCH


async def _make_event() -> asyncio.Event:
    return asyncio.Event()


async def _start(coro: Any) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


def test_a_request_sent_up_a_pull_is_answered_after_it(
    serve: Callable[..., ServerThread], ended: Ended
) -> None:
    """A proxy's next request, sent before the pull is over, waits for it and is answered."""
    server = serve(ended)
    name = token(1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(pull_request(name))
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
        late = base64.b64encode(b"late") + b"\n"
        sock.sendall(push_request(name, late, extra_headers=b"Connection: close\r\n"))
        # The session ends from another connection (the close notification)...
        assert raw_push(server.port, "/push", name, None)[0] == 200
        assert ended.wait(1) == [name]
        # ...then the pull ends, and the push waiting behind it finds the session gone.
        pull_end, answer = read_to_end(sock).split(b"0\r\n\r\n", 1)
    assert pull_end.endswith(b"\r\n") or not pull_end, pull_end
    assert answer.startswith(b"HTTP/1.1 403 "), answer


def _end_of_file(sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)


def _more_than_a_request_head(sock: socket.socket) -> None:
    sock.sendall(b"X" * 3000)  # max_header_size is 2048


@pytest.mark.parametrize(
    ("goes_away", "when"),
    [
        pytest.param(_end_of_file, "before-the-pull-starts", id="end-of-file-at-once"),
        pytest.param(_end_of_file, "during-the-pull", id="end-of-file"),
        pytest.param(_more_than_a_request_head, "during-the-pull", id="more-than-a-request-head"),
    ],
)
def test_a_client_that_goes_away_up_a_pull_ends_its_session(
    serve: Callable[..., ServerThread],
    ended: Ended,
    goes_away: Callable[[socket.socket], None],
    when: str,
) -> None:
    """As on the trio server: the session ends at once, not at the next heartbeat's write."""
    server = serve(ended, max_header_size=2048)
    name = token(2)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(pull_request(name))
        if when == "during-the-pull":
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        goes_away(sock)
        read_to_end(sock)  # the server closes the connection
    assert ended.wait(1) == [name]


@pytest.mark.parametrize("close_notify", [True, False], ids=["tls-close", "tcp-close"])
def test_a_tls_client_that_hangs_up_a_pull_ends_its_session(
    serve: Callable[..., ServerThread], ended: Ended, close_notify: bool
) -> None:
    """Over TLS the hang-up reaches the protocol as well (with or without TLS's close_notify)."""
    server = serve(ended, ssl=True)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # GOST's self-signed certificate
    name = token(3)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with context.wrap_socket(raw) as sock:
        sock.sendall(pull_request(name))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        if close_notify:
            sock.unwrap().close()
        else:
            sock.shutdown(socket.SHUT_RDWR)  # no close_notify: TCP only
    assert ended.wait(1) == [name]


def park_idle(server: ServerThread) -> int:
    """Run the server's watchdog as if ``PARK_AFTER`` had passed; how many it parked."""

    async def park() -> int:
        assert server.server is not None
        core = server.server._server
        core.watchdog.expire_due(core.loop.time() + PARK_AFTER + 0.5)
        return len(core.hang_ups._parked)

    return on_server(server, park)


def hold_then(server: ServerThread, act: Callable[[], None]) -> None:
    """Run ``act()`` while the server's loop is held, so that it sees all of it in one poll."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(GUARD)

    server.loop.call_soon_threadsafe(hold)
    assert held.wait(GUARD)
    try:
        act()
    finally:
        release.set()


@pytest.mark.parametrize("hang_up", [True, False], ids=["hang-up", "next-request"])
def test_idle_connections_are_parked_and_wake_a_batch_per_turn(
    serve: Callable[..., ServerThread], unparks: list[int], hang_up: bool
) -> None:
    """Keep-alive connections idle for PARK_AFTER cost no wake-up each when their clients act.

    Their clients then hang up all at once (as a client process or proxy
    closing everything), or each send a request: the loop reads them a
    batch per turn, and every request is still answered.
    """
    server = serve(echo_handler)
    count = 4 * HANG_UP_BATCH + 3
    socks = [
        socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) for _ in range(count)
    ]
    try:
        # Each connection idles between requests (one answered request first).
        for sock in socks:
            sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
        assert park_idle(server) == count
        stop = on_server(server, _make_event)
        counter = on_server(server, lambda: _start(count_turns(stop)))
        if hang_up:

            def close_all() -> None:
                for sock in socks:
                    sock.close()

            hold_then(server, close_all)

            async def gone() -> int:
                assert server.server is not None
                core = server.server._server
                while core.connections:
                    await asyncio.sleep(0.01)
                return len(core.hang_ups._parked)

            assert on_server(server, gone) == 0
        else:
            request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

            def send_all() -> None:
                for sock in socks:
                    sock.sendall(request)

            hold_then(server, send_all)
            for sock in socks:
                assert read_to_end(sock).startswith(b"HTTP/1.1 404 ")
        server.loop.call_soon_threadsafe(stop.set)
        on_server(server, lambda: asyncio.wait([counter]))
    finally:
        for sock in socks:
            sock.close()
    assert len(unparks) == count
    per_turn = Counter(unparks)
    assert max(per_turn.values()) <= HANG_UP_BATCH, per_turn
    assert len(per_turn) >= count // HANG_UP_BATCH


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()
