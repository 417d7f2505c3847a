"""Dialers, credentials, and the mapping of dial failures to reply codes."""

from __future__ import annotations

import enum
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc
import trio

__all__ = [
    "DEFAULT_DIAL_TIMEOUT",
    "Auth",
    "DialFailed",
    "DialFailure",
    "Dialer",
    "HopError",
    "dial_upstream",
    "tcp_dialer",
]

Dialer = Callable[[str, int], Awaitable[anyio.abc.ByteStream | trio.abc.Stream]]
"""How handlers reach their targets: ``await dial(host, port)`` returns an open
stream (an anyio byte stream; on the trio backend a trio stream will do).
:func:`tcp_dialer` is the default; pass another one to chain proxies or to
restrict where a handler may connect."""

DEFAULT_DIAL_TIMEOUT = 10.0
"""Seconds a handler waits for an upstream connection by default."""


@dataclass(frozen=True)
class Auth:
    """A username and password (SOCKS5 RFC 1929, HTTP Basic, relay user feature)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Auth(username={self.username!r}, password='***')"


async def tcp_dialer(host: str, port: int) -> anyio.abc.ByteStream:
    """The default :data:`Dialer`: a plain TCP connection (happy eyeballs), on
    whichever backend runs (``anyio.connect_tcp``)."""
    return await anyio.connect_tcp(host, port)


class DialFailure(enum.Enum):
    """Why an upstream connection could not be opened, as the replies tell it."""

    REFUSED = "connection refused"
    NETWORK_UNREACHABLE = "network unreachable"
    HOST_UNREACHABLE = "host unreachable"
    TIMEOUT = "timed out"
    HOP = "a proxy of the chain failed"
    OTHER = "failed"


class HopError(Exception):
    """A hop of a proxy chain failed; the message names the hop and the cause.

    ``target_failure`` is set when the hop was reached and reported that it
    cannot reach what it was asked for (then the handler's reply tells that
    cause, e.g. SOCKS5 ``connection refused``); without it the hop itself
    failed (unreachable, wrong credentials, wrong paths), which handlers
    answer as a general failure / ``502`` and never as "cannot reach" the
    target. A dialer that runs a chain raises it.
    """

    def __init__(self, message: str, *, target_failure: DialFailure | None = None) -> None:
        super().__init__(message)
        self.target_failure = target_failure

    @property
    def failure(self) -> DialFailure:
        return self.target_failure or DialFailure.HOP


class DialFailed(Exception):
    """An upstream dial failed; ``failure`` classifies it, the message tells why."""

    def __init__(self, failure: DialFailure, message: str, *, hop: bool = False) -> None:
        super().__init__(message)
        self.failure = failure
        self.hop = hop

    def describe(self, target: str) -> str:
        """The cause in words for a log line: "cannot reach" only when the target is at fault."""
        if self.hop:
            return f"no way to {target}: {self}"
        return f"cannot reach {target}: {self.failure.value} ({self})"


_ERRNO_FAILURES = {
    errno.ECONNREFUSED: DialFailure.REFUSED,
    errno.ENETUNREACH: DialFailure.NETWORK_UNREACHABLE,
    errno.ENETDOWN: DialFailure.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: DialFailure.HOST_UNREACHABLE,
    errno.EHOSTDOWN: DialFailure.HOST_UNREACHABLE,
    errno.ETIMEDOUT: DialFailure.TIMEOUT,
}


def classify_dial_error(exc: BaseException) -> DialFailure:
    """Map an exception from a dialer to a :class:`DialFailure`.

    ``anyio.connect_tcp`` and ``trio.open_tcp_stream`` attach the
    per-address errors (an exception group) as ``__cause__``; the first one
    with an ``errno`` decides.
    """
    if isinstance(exc, HopError):
        return exc.failure
    if isinstance(exc, (TimeoutError, trio.TooSlowError)):
        return DialFailure.TIMEOUT
    if isinstance(exc, socket.gaierror):
        # The name does not resolve.
        return DialFailure.HOST_UNREACHABLE
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_FAILURES.get(exc.errno, DialFailure.OTHER)
    nested: list[BaseException] = []
    group_members = getattr(exc, "exceptions", None)
    if isinstance(group_members, tuple):
        nested.extend(e for e in group_members if isinstance(e, BaseException))
    if exc.__cause__ is not None:
        nested.append(exc.__cause__)
    for inner in nested:
        failure = classify_dial_error(inner)
        if failure is not DialFailure.OTHER:
            return failure
    return DialFailure.OTHER


async def dial_upstream(
    dialer: Dialer, host: str, port: int, timeout: float | None
) -> anyio.abc.ByteStream:
    """Call ``dialer`` within ``timeout`` seconds; raise :class:`DialFailed`.

    Any exception from the dialer (OS errors, a chained proxy's errors) becomes
    :class:`DialFailed`; cancellation passes through. A trio stream is
    returned as an anyio one.
    """
    from ._stream import as_anyio

    try:
        with anyio.fail_after(timeout):
            return as_anyio(await dialer(host, port))
    except TimeoutError:
        raise DialFailed(DialFailure.TIMEOUT, f"no connection within {timeout} s") from None
    except HopError as exc:
        raise DialFailed(exc.failure, str(exc), hop=exc.target_failure is None) from exc
    except Exception as exc:
        raise DialFailed(classify_dial_error(exc), str(exc) or type(exc).__name__) from exc


class DialingHandler:
    """What the proxy handlers share: credentials, how to dial, how long to wait."""

    log: logging.Logger = logging.getLogger("pht.proxy")

    def __init__(
        self,
        *,
        auth: Auth | None = None,
        dial: Dialer = tcp_dialer,
        dial_timeout: float | None = DEFAULT_DIAL_TIMEOUT,
    ) -> None:
        self.auth = auth
        self.dial = dial
        self.dial_timeout = dial_timeout
