"""The asyncio server's heartbeats on idle pulls: written without waking the pulls' tasks.

10,000 idle tunnels need 1,000 heartbeats a second at the default interval;
the heartbeat task writes each one itself while the pull's task waits with
nothing to write. Real loopback sockets against :func:`start_pht_server` on
asyncio's loop and on uvloop (in a thread, as in ``test_asyncio_server``).
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable

import pytest

from pht._asyncio_server import _Stream

from .raw_http import TIMEOUT
from .test_asyncio_server import ServerThread, loop_name, serve
from .test_asyncio_server_hangup import Ended, ended, token
from .test_hardening_support import pull_request, push_request

__all__ = ["ended", "loop_name", "serve"]

#: An empty pull line (a heartbeat) as one chunk.
HEARTBEAT = b"1\r\n\n\r\n"


def read_chunk(sock: socket.socket, buffer: bytearray) -> bytes:
    """The next chunk of a chunked pull response (its data)."""
    while (end := buffer.find(b"\r\n")) < 0:
        buffer += sock.recv(65536) or b"<EOF>"
        assert not buffer.endswith(b"<EOF>"), buffer
    size = int(buffer[:end], 16)
    while len(buffer) < end + 2 + size + 2:
        chunk = sock.recv(65536)
        assert chunk, buffer
        buffer += chunk
    data = bytes(buffer[end + 2 : end + 2 + size])
    del buffer[: end + 2 + size + 2]
    return data


def test_an_idle_pull_gets_heartbeats_without_its_task_waking(
    serve: Callable[..., ServerThread], ended: Ended, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes: list[str] = []
    original = _Stream._wake_pull

    def wake_pull(stream: _Stream) -> None:
        wakes.append(stream.token)
        original(stream)

    monkeypatch.setattr(_Stream, "_wake_pull", wake_pull)
    server = serve(ended, heartbeat_interval=0.05)
    name = token(7)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(pull_request(name))
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += sock.recv(65536)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        buffer[:] = rest
        for _ in range(3):
            assert read_chunk(sock, buffer) == b"\n"  # a heartbeat
        assert wakes == []  # the heartbeat task wrote them
        # Data still wakes the pull, and the heartbeats go on after it.
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as push:
            push.sendall(push_request(name, base64.b64encode(b"ping") + b"\n"))
            assert push.recv(65536).startswith(b"HTTP/1.1 200 ")
        while (line := read_chunk(sock, buffer)) == b"\n":
            pass
        assert base64.b64decode(line) == b"ping"
        assert name in wakes
        assert read_chunk(sock, buffer) == b"\n"
    assert ended.wait(1) == [name]  # the hang-up ends the session
