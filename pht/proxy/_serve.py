"""The run-a-handshake-then-relay skeleton every stream handler shares."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ._stream import Truncated, describe_peer, relay

__all__ = ["Connected", "Reject", "send_quietly", "serve_handshake"]


class Reject(Exception):
    """Ends a handshake: send ``reply`` (may be empty) to the client, close.

    ``reason`` is for the log; ``level`` lets dial failures (the client did
    nothing wrong) log at INFO while malformed input stays at DEBUG.
    """

    def __init__(self, reply: bytes, reason: str, *, level: int = logging.DEBUG) -> None:
        super().__init__(reason)
        self.reply = reply
        self.level = level


@dataclass
class Connected:
    """A finished handshake: the client side (with read-ahead pushed back),
    the upstream stream, and ``host:port`` for the log."""

    client: trio.abc.Stream
    upstream: trio.abc.Stream
    target: str


async def send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    """Send ``data`` if the stream still takes it; a client that left is no error."""
    if not data:
        return
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_handshake(
    log: logging.Logger,
    protocol: str,
    stream: trio.abc.Stream,
    handshake: Callable[[trio.abc.Stream, str], Awaitable[Connected]],
) -> None:
    """Run ``handshake(stream, peer)``, then relay; always close ``stream``.

    A :class:`Reject` is answered with its reply; a client that hangs up or
    breaks mid-handshake is logged at DEBUG. Nothing caused by client input
    escapes.
    """
    peer = describe_peer(stream)
    # Context fields for structured log output (GOST's names).
    fields = {"handler": protocol, "remote": peer}
    started = trio.current_time()
    try:
        connected = await handshake(stream, peer)
    except Reject as exc:
        log.log(exc.level, "%s %s: %s", protocol, peer, exc, extra=fields)
        await send_quietly(stream, exc.reply)
        await trio.aclose_forcefully(stream)
        return
    except (Truncated, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug(
            "%s %s: handshake ended: %s",
            protocol,
            peer,
            exc or type(exc).__name__,
            extra=fields,
        )
        await trio.aclose_forcefully(stream)
        return
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    log.debug("%s %s -> %s connected", protocol, peer, connected.target, extra=fields)
    up, down = await relay(connected.client, connected.upstream)
    log.info(
        "%s %s -> %s closed: %d B up, %d B down, %.2f s",
        protocol,
        peer,
        connected.target,
        up,
        down,
        trio.current_time() - started,
        extra=fields,
    )
