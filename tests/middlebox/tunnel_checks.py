"""Checks shared by the middlebox tests: byte-for-byte transfers through a tunnel."""

from __future__ import annotations

import hashlib

import trio

import pht

from ..support import receive_exactly

#: Generous bound for "this must not hang"; never a performance expectation.
HANG_BOUND = 60.0


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that are not all alike (so that a shuffled chunk would show)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def echo_roundtrip(
    stream: pht.PHTStream, payload: bytes, *, piece: int = 256 * 1024
) -> None:
    """Send ``payload`` while reading the echo, and check it byte for byte."""
    received = bytearray()

    async def send() -> None:
        for start in range(0, len(payload), piece):
            await stream.send_all(payload[start : start + piece])

    with trio.fail_after(HANG_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received += await receive_exactly(stream, len(payload))
    assert received == payload
