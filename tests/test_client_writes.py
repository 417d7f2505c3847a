"""What the client hands the socket for a push: no tiny writes around a large body.

A write of a few bytes becomes a TCP segment of its own; behind a relay with
Nagle's algorithm on, such a segment waits for a delayed ACK, once per push
(issue 9: a 64 MiB echo took 29.5 s instead of 3.7 s).
"""

from __future__ import annotations

import base64

import pytest
import trio

import pht
from pht._trio_common import write_pieces


class RecordingStream(trio.abc.Stream):
    """A transport that records each ``send_all`` call's bytes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("not read in this test")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _push_data(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


def _push(size: int) -> list[bytes]:
    channel = pht.ClientChannel(pht.ClientConfig.build("example.com"))
    return channel.push("token", _push_data(size))


@pytest.mark.parametrize("size", [48 * 1024 + 1, 64 * 1024, 1024 * 1024, 3 * 1024 * 1024 + 7])
async def test_a_large_push_has_no_tiny_write(size: int) -> None:
    pieces = _push(size)
    transport = RecordingStream()
    await write_pieces(transport, pieces)
    sent = b"".join(transport.writes)
    assert sent == b"".join(pieces)  # the same bytes, in order
    body = sent.partition(b"\r\n\r\n")[2]
    assert body.endswith(b"\n")
    assert base64.b64decode(body[:-1]) == _push_data(size)
    assert min(len(write) for write in transport.writes) >= 16 * 1024
    assert transport.writes[-1].endswith(b"\n")  # the newline rides with the data
    assert transport.writes[0].startswith(b"POST /push?token=token HTTP/1.1\r\n")
    assert len(transport.writes) <= 3


async def test_a_small_push_is_one_write() -> None:
    pieces = _push(1000)
    transport = RecordingStream()
    await write_pieces(transport, pieces)
    assert transport.writes == [b"".join(pieces)]


async def test_copies_stay_small_for_a_large_body() -> None:
    """The middle of a large body is written from the caller's buffer, not a copy."""
    large = b"a" * (4 * 1024 * 1024)
    writes_seen: list[int] = []

    class Watching(RecordingStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            if isinstance(data, memoryview):
                assert data.obj is large  # a view of the body itself
            writes_seen.append(len(data))
            await trio.lowlevel.checkpoint()

    await write_pieces(Watching(), [b"head", large, b"\n"])
    assert writes_seen == [4 + 16 * 1024, len(large) - 32 * 1024, 16 * 1024 + 1]
