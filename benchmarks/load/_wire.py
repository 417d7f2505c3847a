"""HTTP from chosen loopback addresses: raw requests, floods and held pulls."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable

import h11
import trio

import pht

from ._common import ATTACKER, HOST

# --- raw HTTP for the load (any source address) --------------------------------------------


class Raw:
    """One HTTP/1.1 connection from a chosen loopback address (h11 on a socket)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, source: str, port: int) -> Raw:
        stream = await trio.open_tcp_stream(HOST, port, local_address=source)
        return cls(stream)

    async def send(self, method: str, target: str, body: bytes | None = None) -> None:
        headers = [("Host", HOST)]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def response(self) -> h11.Response:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("server closed the connection")

    async def body(self) -> bytes:
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return bytes(body)

    async def request(
        self, method: str, target: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send a request and read its whole answer; the connection is reusable after."""
        await self.send(method, target, body)
        status = (await self.response()).status_code
        content = await self.body()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        else:
            raise EOFError("connection not reusable")
        return status, content

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def status_key(exc_or_status: int | BaseException) -> str:
    """How an attempt ended, as counted in the figures: a status or what went wrong."""
    if isinstance(exc_or_status, int):
        return str(exc_or_status)
    if isinstance(exc_or_status, (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError)):
        return "closed"
    if isinstance(exc_or_status, OSError):
        return "connect-error"
    return type(exc_or_status).__name__


# --- load generators -----------------------------------------------------------------------


class Deadline:
    """A time limit and an optional count, shared by the workers of a flood."""

    def __init__(self, seconds: float, count: int | None = None) -> None:
        self.end = trio.current_time() + seconds
        self.left = count

    def expired(self) -> bool:
        return trio.current_time() >= self.end or self.left == 0

    def take(self) -> bool:
        """May one more request go? (Counts it.)"""
        if trio.current_time() >= self.end:
            return False
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        return True


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
#: The junk-push flood stops early after this many 429 answers (sessions full).
LOCKOUT_SHOWN = 1000
#: Requests a flooding connection sends ahead of their answers (pipelined).
PIPELINE = 16


async def flood(
    port: int,
    connections: int,
    deadline: Deadline,
    request: Callable[[], bytes],
    statuses: Counter[str],
    until: Callable[[], bool] = lambda: False,
) -> None:
    """``connections`` kept-alive connections send ``request()`` until the deadline, pipelined.

    Each keeps up to PIPELINE requests unanswered (a stop-and-wait attacker
    would measure its own round trips, not the server), counts the status of
    every answer, and reconnects when the server hangs up.
    """

    async def connection() -> None:
        try:
            stream = await trio.open_tcp_stream(HOST, port, local_address=ATTACKER)
        except OSError:
            statuses["connect-error"] += 1
            await trio.sleep(0.05)
            return
        window = trio.Semaphore(PIPELINE)
        outstanding = 0

        async def read_answers(cancel: trio.CancelScope) -> None:
            nonlocal outstanding
            tail = b""
            try:
                while chunk := await stream.receive_some(65536):
                    data = tail + chunk
                    last = 0
                    for match in _STATUS_LINE.finditer(data):
                        statuses[match.group(1).decode()] += 1
                        outstanding -= 1
                        window.release()
                        last = match.end()
                    tail = data[last:][-32:]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_answers, nursery.cancel_scope)
            try:
                while not until() and deadline.take():
                    await window.acquire()
                    outstanding += 1
                    await stream.send_all(request())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(2.0):
                while outstanding > 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        if outstanding > 0:  # still unanswered 2 s after the last request
            statuses["unanswered"] += outstanding
        await trio.aclose_forcefully(stream)

    async def worker() -> None:
        while not deadline.expired() and not until():
            await connection()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)


def junk_push() -> bytes:
    """A push of 16 bytes under a token nobody was issued."""
    body = pht.encode_line(os.urandom(16))
    return (
        f"POST /push?token={pht.new_token()} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def authorize_call() -> bytes:
    """A token request (never used afterwards)."""
    return f"GET /authorize HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def token_from(body: bytes) -> str:
    """The token of an authorize answer (``token=...``, as GOST writes it)."""
    text = body.decode("ascii", "replace").strip()
    return text.split("=", 1)[1] if text.startswith("token=") else text


async def open_held_pull(port: int, source: str) -> tuple[Raw, str]:
    """Authorize, then start a pull on the same connection; the pull is left unread."""
    raw = await Raw.connect(source, port)
    try:
        status, body = await raw.request("GET", "/authorize")
        if status != 200:
            raise StatusError(status)
        token = token_from(body)
        await raw.send("GET", f"/pull?token={token}")
        response = await raw.response()
        if response.status_code != 200:
            raise StatusError(response.status_code)
    except BaseException:
        await raw.aclose()
        raise
    return raw, token


class StatusError(Exception):
    """The server answered a status other than 200 to a step of the load."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def error_key(exc: BaseException) -> str:
    """``status_key`` for a failed step, with the status of a StatusError."""
    if isinstance(exc, StatusError):
        return str(exc.status)
    return status_key(exc)


def idle_source(index: int, addresses: int) -> str:
    """127.1.x.y: the idle tunnels spread round-robin over ``addresses`` loopback addresses.

    Round-robin, so that the tunnels being opened at any moment come from many
    addresses (the server bounds tokens pending per address).
    """
    number = index % addresses
    return f"127.1.{number // 250}.{number % 250 + 1}"
