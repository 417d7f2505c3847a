"""Pieces shared by the trio client and server adapters."""

from __future__ import annotations

from types import TracebackType

import trio

from ._common import JOIN_LIMIT, plan_writes
from ._errors import LocalProtocolError, TunnelError
from ._resume import GoneReason, SessionGone

__all__ = [
    "RECEIVE_SIZE",
    "BrokenSessionGone",
    "BrokenTunnelError",
    "BusyTunnelError",
    "ClosedTunnelError",
    "ConflictDetector",
    "PHTStream",
    "write_pieces",
]

#: Bytes asked of a socket per read: large reads keep the per-call overhead low.
RECEIVE_SIZE = 256 * 1024


class BrokenTunnelError(trio.BrokenResourceError, TunnelError):
    """A tunnel broke: trio's :class:`~trio.BrokenResourceError` and a :class:`~pht.TunnelError`.

    ``status`` holds the HTTP status when a refusal broke it. Defined here,
    in the trio adapter, because the sans-IO core does not import trio.
    """


class BrokenSessionGone(BrokenTunnelError, SessionGone):
    """A resume session the server will never resume: :class:`~pht.SessionGone`
    as trio's stream contract wants it (a :class:`trio.BrokenResourceError`)."""

    def __init__(self, reason: GoneReason, message: str | None = None) -> None:
        SessionGone.__init__(self, reason)
        if message is not None:
            self.args = (message,)


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

    __slots__ = ()  # the server's streams have slots (thousands of idle tunnels)

    #: The session's token (as it travels in ``?token=``).
    token: str
    #: ``host:port`` of the peer that opened the session (server side), else
    #: the server's address (client side).
    remote_address: str | None


async def write_pieces(transport: trio.abc.Stream, pieces: list[bytes]) -> None:
    """Write ``pieces`` in order, as :func:`~pht._common.plan_writes` groups them."""
    if len(pieces) == 1:
        await transport.send_all(pieces[0])
        return
    if sum(len(piece) for piece in pieces) <= JOIN_LIMIT:  # plan_writes's first case, inline
        await transport.send_all(b"".join(pieces))
        return
    for write in plan_writes(pieces):
        await transport.send_all(write)
