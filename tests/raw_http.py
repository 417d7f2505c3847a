"""A hand-written HTTP/1.1 client for PHT servers: blocking sockets, every byte visible.

The resume tests drive the servers the way a client of another language
would: requests written by hand, answers parsed by hand, connections cut
wherever the test says. :class:`RawPull` is one pull response read line by
line; :func:`raw_push` one push and its answer. Loopback only; every read is
bounded by the socket timeout (a guard against a hang, not a timed check).
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterable

#: Guard for every socket operation (never reached when all is well).
TIMEOUT = 30.0

Headers = dict[bytes, bytes]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _request(method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def until(self, marker: bytes) -> bytes:
        while (index := self.buffer.find(marker)) < 0:
            if not self.fill():
                raise ConnectionError(f"closed before {marker!r}: {bytes(self.buffer[:200])!r}")
        data = bytes(self.buffer[: index + len(marker)])
        del self.buffer[: index + len(marker)]
        return data

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise ConnectionError(f"closed {size - len(self.buffer)} bytes short")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def head(self) -> tuple[int, Headers, bytes]:
        """Status, headers (lowercase names) and the raw head of the next answer."""
        raw = self.until(b"\r\n\r\n")
        status_line, *fields = raw[:-4].split(b"\r\n")
        headers: Headers = {}
        for field in fields:
            name, _, value = field.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split(b" ")[1]), headers, raw


def resume_headers(headers: Headers) -> Headers:
    """The ``PHT-*`` headers among ``headers``."""
    return {name: value for name, value in headers.items() if name.startswith(b"pht-")}


def raw_push(
    port: int,
    path: str,
    token: str,
    data: bytes | None,
    headers: Iterable[tuple[str, str]] = (),
) -> tuple[int, Headers]:
    """One push (``data=None``: the close notification, an empty body) and its answer."""
    body = b"" if data is None else base64.b64encode(data) + b"\n"
    with _connect(port) as sock:
        sock.sendall(_request("POST", f"{path}?token={token}", headers, body))
        reader = _Reader(sock)
        status, answer, _ = reader.head()
        reader.exactly(int(answer.get(b"content-length", b"0")))
    return status, answer


class RawPull:
    """One pull response, read line by line (heartbeats skipped)."""

    def __init__(
        self, port: int, path: str, token: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.sock = _connect(port)
        self.sock.sendall(_request("GET", f"{path}?token={token}", headers, b""))
        self._reader = _Reader(self.sock)
        self.status, self.headers, self.raw_head = self._reader.head()
        self._text = bytearray()  # body text not yet split into lines
        self.ended = self.status != 200
        if self.status != 200:
            self._reader.exactly(int(self.headers.get(b"content-length", b"0")))

    def __enter__(self) -> RawPull:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Cut the pull's connection (whatever is unread is lost)."""
        self.sock.close()

    def _chunk(self) -> None:
        size = int(self._reader.until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            self._reader.until(b"\r\n")
            self.ended = True
            return
        self._text += self._reader.exactly(size)
        self._reader.exactly(2)

    def line(self) -> bytes | None:
        """The data of the next data line; ``None`` once the response ended."""
        while True:
            index = self._text.find(b"\n")
            if index >= 0:
                text = bytes(self._text[:index])
                del self._text[: index + 1]
                if text:
                    return base64.b64decode(text, validate=True)
                continue  # a heartbeat
            if self.ended:
                return None
            self._chunk()

    def read(self, size: int) -> bytes:
        """At least ``size`` bytes of whole lines (fewer only if the response ended)."""
        data = bytearray()
        while len(data) < size:
            line = self.line()
            if line is None:
                break
            data += line
        return bytes(data)

    def rest(self) -> bytes:
        """Every line until the response ends."""
        data = bytearray()
        while (line := self.line()) is not None:
            data += line
        return bytes(data)
