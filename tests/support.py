"""Small helpers shared by the sans-IO test modules."""

from __future__ import annotations


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
