"""Server defects found by load and fuzz runs, each pinned by a test.

Sans-IO checks for what the core decides; real loopback sockets where a
client would meet the behaviour.
"""

from __future__ import annotations

import base64
import collections
import errno
import logging
import os
import shutil
import socket
import subprocess
import tracemalloc
from typing import Any

import pytest
import trio
import trio.testing

import pht
from pht._server import DEFAULT_MAX_PUSH_LINE
from pht._trio_server import _accept_loop

from .support import cut
from .test_hardening_support import (
    GUARD,
    RawClient,
    exchange,
    pull_request,
    push_request,
    start_server,
)

AUTHORIZE = b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"
HELLO = b"aGVsbG8=\n"  # base64("hello") and its newline


# --- CONNECT and HEAD on the authorize path -----------------------------------------


def test_connect_is_refused_with_405_and_the_connection_stays_usable() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(b"CONNECT /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    event = conn.next_event()
    assert isinstance(event, pht.BadRequest)
    assert event.status_code == 405
    answer = conn.send_status(405)
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD, POST\r\n" in answer
    conn.receive_data(AUTHORIZE)
    assert isinstance(conn.next_event(), pht.AuthorizeRequest)
    assert conn.send_token("t0ken").endswith(b"\r\n\r\ntoken=t0ken")


def test_head_authorize_gets_headers_only() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(b"HEAD /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(conn.next_event(), pht.AuthorizeRequest)
    answer = conn.send_token("t0ken")
    assert answer.endswith(b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
    assert b"\r\nContent-Length: 11\r\n" in answer
    assert conn.state is pht.ServerConnectionState.IDLE


async def test_connect_authorize_issues_no_token(nursery: trio.Nursery) -> None:
    port = await start_server(nursery, backlog=1)
    with trio.fail_after(GUARD):
        answer, _ = await exchange(port, b"CONNECT /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 405
        # Had the CONNECT taken the only backlog slot, this would be 429.
        answer, _ = await exchange(port, AUTHORIZE)
        assert answer.status == 200
        assert answer.body.startswith(b"token=")


# --- the no-resurrection table --------------------------------------------------------


def test_junk_closes_do_not_evict_closed_sessions() -> None:
    registry: pht.SessionRegistry[object] = pht.SessionRegistry(max_sessions=10)
    assert isinstance(registry.lookup("a-real-session-token", 0), pht.SessionRecord)
    registry.close("a-real-session-token", 1)
    for number in range(20_000):  # close notifications for tokens never seen
        registry.close(f"junk-{number}", 2)
    assert registry.lookup("a-real-session-token", 3) is pht.LookupResult.CLOSED
    # The junk is remembered too, within its own bound.
    assert registry.lookup("junk-19999", 3) is pht.LookupResult.CLOSED


# --- request framing ------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_content_length_with_chunked_closes_after_the_answer(fast: bool) -> None:
    conn = pht.ServerConnection(_fast_path=fast)
    smuggled = b"GET /pull?token=victim HTTP/1.1\r\nHost: x\r\n\r\n"
    conn.receive_data(
        b"POST /push?token=abc HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nQUJD\n\r\n0\r\n\r\n" + smuggled
    )
    event = conn.next_event()
    assert event == pht.PushRequest(token="abc", data=b"ABC")
    answer = conn.send_push_ack()
    assert b"\r\nConnection: close\r\n" in answer
    assert conn.state is pht.ServerConnectionState.CLOSED
    assert conn.next_event() is pht.NEED_DATA  # the smuggled pull is never served


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "head",
    [
        b"POST /push?token=abc HTTP/1.1\nHost: x\nContent-Length: 5\n\n",
        b"POST /push?token=abc HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\n",
        b"GET /pull?token=abc HTTP/1.1\r\nHost: x\r\n\n",
    ],
)
def test_bare_lf_in_a_request_head_is_400(fast: bool, head: bytes) -> None:
    conn = pht.ServerConnection(_fast_path=fast)
    conn.receive_data(head + b"QUJD\n")
    with pytest.raises(pht.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.status_hint == 400
    assert b"Connection: close" in conn.send_status(400)
    assert conn.state is pht.ServerConnectionState.CLOSED


def test_bare_lf_is_refused_in_a_pipelined_request_too() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(
        b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /push?token=abc HTTP/1.1\nHost: x\nContent-Length: 5\n\nQUJD\n"
    )
    assert isinstance(conn.next_event(), pht.AuthorizeRequest)
    conn.send_token("t0ken")
    with pytest.raises(pht.RemoteProtocolError):
        conn.next_event()


async def test_expect_100_continue_is_answered(nursery: trio.Nursery) -> None:
    port = await start_server(nursery)
    with trio.fail_after(GUARD):
        client = await RawClient.connect(port)
        await client.send(
            b"POST /push?token=expecting-token-000001 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 9\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await client.head()  # sent before the body, as RFC 9110 asks
        assert interim.status == 100
        await client.send(HELLO)
        answer = await client.response()
        assert answer.status == 200
        await client.aclose()


# --- a pull that stops reading ----------------------------------------------------------


async def test_pull_that_stops_reading_ends_its_session(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    outcome: list[str] = []

    async def flood(stream: pht.PHTStream) -> None:
        try:
            while True:
                await stream.send_all(b"x" * 65536)
        except trio.BrokenResourceError:
            outcome.append("broken")

    port = await start_server(nursery, flood, pull_write_timeout=60.0, idle_timeout=None)
    token = "stalled-reader-token-0001"
    client = await RawClient.connect(port)
    await client.send(pull_request(token))
    assert (await client.head()).status == 200
    # The client reads nothing more: kernel buffers fill, the pull write blocks.
    with trio.fail_after(3600):  # mock time
        while not outcome:
            await trio.sleep(1)
    assert outcome == ["broken"]
    answer, _ = await exchange(port, push_request(token, HELLO))
    assert answer.status == 403  # the session is over, not resurrected
    await client.aclose()


# --- listening and accepting -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize(("options", "at_least"), [({}, 129), ({"listen_backlog": 300}, 300)])
async def test_listen_queue_is_not_the_session_backlog(
    nursery: trio.Nursery, options: dict[str, Any], at_least: int
) -> None:
    port = await start_server(nursery, backlog=128, **options)
    shown = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    queue = int(shown[2])  # Send-Q of a listening socket: its accept queue length
    if "listen_backlog" in options:
        assert queue == at_least
    else:
        assert queue >= at_least


class _ExhaustedListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose process is out of file descriptors."""

    def __init__(self) -> None:
        self.attempts = 0

    async def accept(self) -> trio.abc.Stream:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, "Too many open files")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_fd_exhaustion_logs_one_warning_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listener = _ExhaustedListener()

    async def never(stream: trio.abc.Stream) -> None:
        raise AssertionError("nothing is accepted")

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(25):  # mock time
            await _accept_loop(listener, never, nursery)
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 3  # at 0 s, 10 s and 20 s
    assert all(record.exc_info is None for record in caplog.records)
    assert "Too many open files" in warnings[0].getMessage()
    assert "ulimit" in warnings[0].getMessage()
    assert 100 <= listener.attempts <= 300  # backed off, not spinning


# --- memory per connection ---------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_endless_push_line_is_held_in_pieces_not_whole(fast: bool) -> None:
    conn = pht.ServerConnection(_fast_path=fast)
    conn.receive_data(
        b"POST /push?token=endless HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        % (DEFAULT_MAX_PUSH_LINE + 1)
    )
    assert conn.next_event() is pht.NEED_DATA
    text = base64.b64encode(os.urandom(48 * 1024))  # 64 KiB of base64 per read
    delivered = 0
    tracemalloc.start()
    try:
        for _ in range(64):  # a 4 MiB line, no newline in sight
            conn.receive_data(text)
            while (event := conn.next_event()) is not pht.NEED_DATA:
                assert isinstance(event, pht.PushData)
                assert event.token == "endless"
                delivered += len(event.data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert delivered == 64 * 48 * 1024
    assert peak < 512 * 1024  # was the whole line: 4 MiB and growing
    # Past max_push_line the push is refused all the same.
    while True:
        conn.receive_data(text)
        event = conn.next_event()
        if isinstance(event, pht.BadRequest):
            break
        assert isinstance(event, pht.PushData)
    assert event.status_code == 413


def test_long_push_line_arrives_whole_and_in_order_in_pieces() -> None:
    data = os.urandom(300_000)
    conn = pht.ServerConnection()
    body = base64.b64encode(data) + b"\n"
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    received = bytearray()
    for piece in cut(request + body, [1000, 70_000, 3]):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not pht.NEED_DATA:
            received += event.data  # type: ignore[union-attr]
            if isinstance(event, pht.PushRequest):
                conn.send_push_ack()
    assert received == data


def test_bad_base64_in_a_long_line_is_400_at_once() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(
        b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        + b"!" * 70_000
    )
    event = conn.next_event()
    assert isinstance(event, pht.BadRequest)
    assert (event.status_code, event.token) == (400, "t")
    assert b"Connection: close" in conn.send_status(400)


async def test_long_pushes_reach_the_handler_in_order(nursery: trio.Nursery) -> None:
    received = bytearray()
    done = trio.Event()

    async def collect(stream: pht.PHTStream) -> None:
        while data := await stream.receive_some():
            received.extend(data)
            if len(received) >= 2 * 3_000_000:
                done.set()

    port = await start_server(nursery, collect)
    payload = os.urandom(2 * 3_000_000)
    with trio.fail_after(GUARD):
        for start in (0, 3_000_000):  # two 4 MB lines on one keep-alive connection
            line = base64.b64encode(payload[start : start + 3_000_000]) + b"\n"
            answer, _ = await exchange(port, push_request("long-lines-token-0001", line))
            assert answer.status == 200
        await done.wait()
    assert received == payload


def test_a_long_push_refused_midway_is_read_to_its_end_then_answered() -> None:
    conn = pht.ServerConnection()
    body = base64.b64encode(os.urandom(300_000)) + b"\n"
    request = b"POST /push?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    conn.receive_data((request + body)[: len(request) + 100_000])
    assert isinstance(conn.next_event(), pht.PushData)
    conn.discard_push(403)  # e.g. the token turned out to be closed
    assert conn.next_event() is pht.NEED_DATA  # the rest is read, not decoded
    conn.receive_data((request + body)[len(request) + 100_000 :])
    event = conn.next_event()
    assert event == pht.BadRequest(status_code=403, reason="push refused")
    assert b"Connection: close" not in conn.send_status(403)  # the answer is not lost
    conn.receive_data(AUTHORIZE)
    assert isinstance(conn.next_event(), pht.AuthorizeRequest)


# --- heartbeats --------------------------------------------------------------------------


async def test_heartbeats_keep_their_interval_and_data_postpones_them(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start_server(nursery, heartbeat_interval=10.0, idle_timeout=None)
    token = "heartbeat-wheel-token-01"
    client = await RawClient.connect(port)
    await client.send(pull_request(token))
    assert (await client.head()).status == 200
    last = trio.current_time()
    for _ in range(5):
        assert await client.chunk() == b"\n"
        now = trio.current_time()
        assert 10.0 <= now - last <= 10.0 * 9 / 8
        last = now
    await trio.sleep(6)
    assert (await exchange(port, push_request(token, HELLO)))[0].status == 200
    assert await client.chunk() == HELLO  # echoed at once: the pull wrote at +6 s
    echoed = trio.current_time()
    assert await client.chunk() == b"\n"
    assert 10.0 <= trio.current_time() - echoed <= 10.0 * 9 / 8
    await client.aclose()


# --- mass closes ---------------------------------------------------------------------------


class _Batches(trio.abc.Instrument):
    """Counts the scheduler's batches: one I/O wait between two batches."""

    def __init__(self) -> None:
        self.number = 0

    def before_io_wait(self, timeout: float) -> None:
        self.number += 1


async def test_sessions_ending_at_once_take_turns(nursery: trio.Nursery) -> None:
    sessions = 100
    batches = _Batches()
    ended_in: list[int] = []
    started = trio.Event()
    all_ended = trio.Event()
    running = 0

    async def handler(stream: pht.PHTStream) -> None:
        nonlocal running
        running += 1
        if running == sessions:
            started.set()
        while await stream.receive_some():
            pass
        ended_in.append(batches.number)
        if len(ended_in) == sessions:
            all_ended.set()

    port = await start_server(nursery, handler, heartbeat_interval=60.0)
    tokens = [f"mass-close-token-{number:04d}" for number in range(sessions)]
    # Plain blocking sockets: the test writes to all of them without a
    # checkpoint in between, so the server reads them in one batch.
    pulls, pushes = [], []
    with trio.fail_after(GUARD):
        for token in tokens:
            pull = socket.create_connection(("127.0.0.1", port))
            pull.sendall(pull_request(token))
            pulls.append(pull)
        await started.wait()
        pushes = [socket.create_connection(("127.0.0.1", port)) for _ in tokens]
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(batches)
        try:
            for push, token in zip(pushes, tokens, strict=True):
                push.sendall(push_request(token, b""))  # close notifications
            await all_ended.wait()
        finally:
            trio.lowlevel.remove_instrument(batches)
            for sock in pulls + pushes:
                sock.close()
    per_batch = collections.Counter(ended_in)
    assert max(per_batch.values()) <= 32  # without the gate: all 100 in one batch


async def test_sessions_expiring_at_once_take_turns(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sessions = 100
    batches = _Batches()
    ended_in: list[int] = []
    all_ended = trio.Event()

    async def handler(stream: pht.PHTStream) -> None:
        while await stream.receive_some():
            pass
        ended_in.append(batches.number)
        if len(ended_in) == sessions:
            all_ended.set()

    port = await start_server(nursery, handler, lazy_timeout=10.0)
    for number in range(sessions):  # pushed to, never pulled: all expire together
        answer, _ = await exchange(port, push_request(f"expiring-together-{number:04d}", HELLO))
        assert answer.status == 200
    trio.lowlevel.add_instrument(batches)
    try:
        with trio.fail_after(60):  # mock time
            await all_ended.wait()
    finally:
        trio.lowlevel.remove_instrument(batches)
    assert max(collections.Counter(ended_in).values()) <= 32


async def test_a_slow_reader_keeps_its_pull(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """pull_write_timeout cuts a pull that stopped, not one that reads slowly."""
    size = 8 * 1024 * 1024  # more than the kernel buffers hold
    payload = os.urandom(size)
    outcome: list[str] = []

    async def download(stream: pht.PHTStream) -> None:
        try:
            await stream.send_all(payload)
            outcome.append("sent")
            await stream.receive_some()  # stay: returning would end the session
        except trio.BrokenResourceError:
            outcome.append("broken")

    port = await start_server(nursery, download, pull_write_timeout=60.0, idle_timeout=None)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await sock.connect(("127.0.0.1", port))
    client = RawClient(trio.SocketStream(sock))
    await client.send(pull_request("slow-reader-token-0001"))
    assert (await client.head()).status == 200
    text_size = (size // (32 * 1024)) * (len(base64.b64encode(bytes(32 * 1024))) + 1)
    with trio.fail_after(100_000):  # mock time
        while len(client.buffer) < text_size:
            await trio.sleep(2.5)  # 16 KiB per 2.5 s: slow, but reading
            client.buffer += await client.stream.receive_some(16 * 1024)
        received = bytearray()
        while len(received) < size:
            for line in (await client.chunk()).split(b"\n"):
                received += base64.b64decode(line)
    assert bytes(received) == payload
    assert outcome == ["sent"]
    await client.aclose()


async def test_handler_stream_allows_one_task_per_direction(nursery: trio.Nursery) -> None:
    """Two tasks receiving (or sending) on a handler's stream at once: BusyResourceError."""
    seen: list[str] = []

    async def handler(stream: pht.PHTStream) -> None:
        async def send() -> None:
            await stream.send_all(b"x")

        for name, call in (("receive", stream.receive_some), ("send", send)):
            with pytest.RaisesGroup(trio.BusyResourceError):
                async with trio.open_nursery() as both:
                    both.start_soon(call)
                    both.start_soon(call)
            seen.append(name)
        await stream.send_all(b"done")

    port = await start_server(nursery, handler)
    client = await pht.open_pht_stream("127.0.0.1", port)
    received = b""
    with trio.fail_after(10):
        while not received.endswith(b"done"):
            received += await client.receive_some()
    assert seen == ["receive", "send"]
    assert received == b"xdone"  # the second send was refused, not queued
    await client.aclose()
