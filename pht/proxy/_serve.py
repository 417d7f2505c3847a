"""The run-a-handshake-then-relay skeleton every stream handler shares."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

from ._stream import AnyStream, Truncated, as_anyio, describe_peer, relay

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

    client: anyio.abc.ByteStream
    upstream: anyio.abc.ByteStream
    target: str


async def send_quietly(stream: anyio.abc.ByteStream, data: bytes) -> None:
    """Send ``data`` if the stream still takes it; a client that left is no error."""
    if not data:
        return
    try:
        await stream.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


async def serve_handshake(
    log: logging.Logger,
    protocol: str,
    stream: AnyStream,
    handshake: Callable[[anyio.abc.ByteStream, str], Awaitable[Connected]],
) -> None:
    """Run ``handshake(stream, peer)``, then relay; always close ``stream``.

    A :class:`Reject` is answered with its reply; a client that hangs up or
    breaks mid-handshake is logged at DEBUG. Nothing caused by client input
    escapes.
    """
    client = as_anyio(stream)
    peer = describe_peer(client)
    # Context fields for structured log output (GOST's names).
    fields = {"handler": protocol, "remote": peer}
    started = anyio.current_time()
    try:
        connected = await handshake(client, peer)
    except Reject as exc:
        log.log(exc.level, "%s %s: %s", protocol, peer, exc, extra=fields)
        await send_quietly(client, exc.reply)
        await anyio.aclose_forcefully(client)
        return
    except (Truncated, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        log.debug(
            "%s %s: handshake ended: %s",
            protocol,
            peer,
            exc or type(exc).__name__,
            extra=fields,
        )
        await anyio.aclose_forcefully(client)
        return
    except BaseException:
        await anyio.aclose_forcefully(client)
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
        anyio.current_time() - started,
        extra=fields,
    )
