"""Pieces shared by the trio client and server adapters."""

from __future__ import annotations

import trio

__all__ = ["RECEIVE_SIZE", "PHTStream", "write_pieces"]

#: Bytes asked of a socket per read: large reads keep the per-call overhead low.
RECEIVE_SIZE = 256 * 1024
_JOIN_LIMIT = 64 * 1024


class PHTStream(trio.abc.Stream):
    """A PHT tunnel as a :class:`trio.abc.Stream` (PHT has no half-close).

    Both ends of a tunnel are ``PHTStream`` objects: the one returned by
    :func:`pht.open_pht_stream` and the one handed to a :func:`pht.serve_pht`
    handler.
    """

    #: The session's token (as it travels in ``?token=``).
    token: str
    #: ``host:port`` of the peer that opened the session (server side), else
    #: the server's address (client side).
    remote_address: str | None


async def write_pieces(transport: trio.abc.Stream, pieces: list[bytes]) -> None:
    """Write ``pieces`` in order: joined when small, one by one when large."""
    if len(pieces) == 1:
        await transport.send_all(pieces[0])
        return
    total = sum(len(piece) for piece in pieces)
    if total <= _JOIN_LIMIT:
        await transport.send_all(b"".join(pieces))
    else:
        for piece in pieces:
            await transport.send_all(piece)
