"""The exception hierarchy shared by the sans-IO core and the trio adapters.

Errors are split by blame, as in h11: a :class:`LocalProtocolError` means the
code driving a state machine misused it; a :class:`RemoteProtocolError` means
the peer sent something the protocol does not allow. A remote error raised on
the server side carries the HTTP status the server should answer with.
"""

from __future__ import annotations

__all__ = [
    "LocalProtocolError",
    "PHTError",
    "RemoteProtocolError",
    "TunnelError",
]


class PHTError(Exception):
    """Base class of every exception raised by ``pht``."""


class LocalProtocolError(PHTError):
    """The caller asked a state machine to do something its state forbids.

    The object that raised it is now in its ``ERROR`` state.
    """


class RemoteProtocolError(PHTError):
    """The peer violated the protocol (malformed HTTP, bad base64, ...).

    ``status_hint`` is the HTTP status a server answers with for it.
    """

    def __init__(self, message: str, *, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class TunnelError(PHTError):
    """A tunnel could not be opened or broke: the message says what to check.

    Raised by the trio adapters, e.g. when the server refuses the session
    (``status`` holds the HTTP status then), the TLS handshake fails, or the
    server cannot be reached.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
