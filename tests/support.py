"""Small helpers shared by the sans-IO test modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

import pht

Handler = Callable[[pht.PHTStream], Awaitable[object]]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """Split ``data`` into pieces of the given sizes, cycling through them.

    This is how the tests model TCP segmentation and HTTP chunking.
    """
    pieces, offset, i = [], 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        pieces.append(data[offset : offset + size])
        offset += size
        i += 1
    return pieces


async def echo(stream: pht.PHTStream) -> None:
    """A handler that echoes until EOF (or until the client vanishes)."""
    try:
        while data := await stream.receive_some():
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def start_server(nursery: trio.Nursery, handler: Handler = echo, **kwargs: Any) -> int:
    """Start ``serve_pht`` on 127.0.0.1, port 0, and return the bound port."""
    listeners = await nursery.start(
        lambda task_status: pht.serve_pht(
            handler, 0, host="127.0.0.1", task_status=task_status, **kwargs
        )
    )
    listener = getattr(listeners[0], "transport_listener", listeners[0])  # TLS or plain
    port: int = listener.socket.getsockname()[1]
    return port


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """Read exactly ``size`` bytes; fail on an early EOF."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)
