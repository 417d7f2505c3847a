"""Helpers shared by the ``test_hardening_*`` modules (this module has no tests).

A real :func:`pht.serve_pht` on a loopback port, a raw HTTP client that sends
exactly the bytes a test wants and parses what comes back by hand, and a check
that an ordinary tunnel on the same server still carries data.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

import pht

from .support import echo as echo  # re-exported for the hardening tests
from .support import receive_exactly
from .support import start_server as start_server

Handler = Callable[[pht.PHTStream], Awaitable[object]]

#: Real-time guard for anything that could hang on a bug (never reached when all is well).
GUARD = 20.0


async def echo_round_trip(stream: trio.abc.Stream, size: int = 3000) -> None:
    """Send ``size`` random bytes through an echoing tunnel and check they come back."""
    payload = os.urandom(size)
    await stream.send_all(payload)
    assert await receive_exactly(stream, size) == payload


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")


class RawClient:
    """One raw TCP connection to the server: write any bytes, parse answers by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        if self.eof:
            raise EOFError("server closed the connection")
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            raise EOFError("server closed the connection")
        self.buffer += data

    async def _read_until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            await self._fill()
        data = bytes(self.buffer[: end + len(marker)])
        del self.buffer[: end + len(marker)]
        return data

    async def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def head(self) -> Response:
        """Read a response head (the body is left unread)."""
        raw = await self._read_until(b"\r\n\r\n")
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return Response(status, headers, b"", raw)

    async def chunk(self) -> bytes:
        """Read one chunk of a chunked body (``b""`` for the last one)."""
        size = int((await self._read_until(b"\r\n"))[:-2].split(b";")[0], 16)
        data = await self._read_exactly(size)
        assert await self._read_exactly(2) == b"\r\n"
        return data

    async def response(self) -> Response:
        """Read a whole response (Content-Length or chunked body)."""
        response = await self.head()
        if response.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while chunk := await self.chunk():
                parts.append(chunk)
            response.body = b"".join(parts)
        else:
            response.body = await self._read_exactly(
                int(response.headers.get(b"content-length", b"0"))
            )
        return response

    async def is_closed(self) -> bool:
        """Whether the server closed the connection (reads past any leftover bytes)."""
        try:
            while True:
                await self._fill()
                self.buffer.clear()
        except EOFError:
            return True

    async def aclose(self) -> None:
        await self.stream.aclose()


def push_request(token: str, body: bytes, *, extra_headers: bytes = b"") -> bytes:
    return (
        b"POST /push?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n"
        % (token.encode(), len(body), extra_headers)
    ) + body


def pull_request(token: str) -> bytes:
    return b"GET /pull?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % token.encode()


async def exchange(port: int, request: bytes) -> tuple[Response, bool]:
    """Send one request on a fresh connection; return the answer and whether it closed."""
    client = await RawClient.connect(port)
    try:
        await client.send(request)
        response = await client.response()
        if response.headers.get(b"connection", b"").lower() == b"close":
            closed = await client.is_closed()
        else:
            closed = False
        return response, closed
    finally:
        await client.aclose()
