"""Pieces shared by the trio client and server adapters."""

from __future__ import annotations

from types import TracebackType

import trio

from ._errors import LocalProtocolError, TunnelError

__all__ = [
    "RECEIVE_SIZE",
    "BrokenTunnelError",
    "BusyTunnelError",
    "ClosedTunnelError",
    "ConflictDetector",
    "PHTStream",
    "write_pieces",
]

#: Bytes asked of a socket per read: large reads keep the per-call overhead low.
RECEIVE_SIZE = 256 * 1024
_JOIN_LIMIT = 64 * 1024
#: Small pieces are written together with this much of a large neighbour.
_EDGE = 16 * 1024


class BrokenTunnelError(trio.BrokenResourceError, TunnelError):
    """A tunnel broke: trio's :class:`~trio.BrokenResourceError` and a :class:`~pht.TunnelError`.

    ``status`` holds the HTTP status when a refusal broke it. Defined here,
    in the trio adapter, because the sans-IO core does not import trio.
    """


class ClosedTunnelError(trio.ClosedResourceError, LocalProtocolError):
    """The stream was used after ``aclose``: trio's error and a pht misuse error."""


class BusyTunnelError(trio.BusyResourceError, LocalProtocolError):
    """Two tasks used one direction of a stream at once."""


class ConflictDetector:
    """Detects two tasks doing the same thing at once, as trio's streams do.

    ``with detector:`` around a ``send_all`` (or ``receive_some``) raises
    :class:`trio.BusyResourceError` (as :class:`BusyTunnelError`) when another
    task is inside already. :attr:`busy` tells whether one is.
    """

    __slots__ = ("_message", "busy")

    def __init__(self, message: str) -> None:
        self._message = message
        self.busy = False

    def __enter__(self) -> None:
        if self.busy:
            raise BusyTunnelError(self._message)
        self.busy = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.busy = False


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
    """Write ``pieces`` in order, in as few writes as a small copy allows.

    Small pieces are joined. Large ones are written from a memoryview, but
    a small piece next to one (a request head, a body's final newline) goes
    out joined with ``_EDGE`` bytes of it: a write of a few bytes becomes a
    TCP segment of its own, and a relay with Nagle's algorithm on holds such
    a segment for a delayed ACK (a 40 ms wait per push). The copy is at most
    ``2 * _EDGE`` bytes per large piece, whatever its size.
    """
    if len(pieces) == 1:
        await transport.send_all(pieces[0])
        return
    total = sum(len(piece) for piece in pieces)
    if total <= _JOIN_LIMIT:
        await transport.send_all(b"".join(pieces))
        return
    for write in _coalesce(pieces):
        await transport.send_all(write)


def _coalesce(pieces: list[bytes]) -> list[bytes | memoryview]:
    """The writes for ``pieces``: each large piece's middle alone, the rest joined."""
    writes: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < 3 * _EDGE:
            small.append(piece)
            continue
        view = memoryview(piece)
        if small:
            small.append(view[:_EDGE])
            writes.append(b"".join(small))
            view = view[_EDGE:]
        writes.append(view[:-_EDGE])
        small = [view[-_EDGE:]]
    if small:
        writes.append(b"".join(small) if len(small) > 1 else small[0])
    return writes
