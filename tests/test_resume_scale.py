"""Resume at scale: hundreds of cuts in a 64 MiB echo, byte-identical both ways.

A fault relay between client and server cuts every connection it relays
(FIN or RST, in request and answer heads and bodies, pushes and pulls; with
TLS both directions of each connection at independent offsets) until at
least 240 cuts fired; 64 MiB go up and come back, and the sha256 of what
came back is the sha256 of what was sent. The trio client against the trio
server (virtual clock: back-off costs no wall time), and the asyncio client
against the asyncio server (real clock, so with a short reconnect back-off,
``RECONNECT_DELAY``, that the default would stretch to most of a minute;
the relay runs in a trio thread), plain and phts.

Each moves 128 MiB; they carry the ``slow``
marker, which the default run includes (``-m "not slow"`` leaves them out).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections import Counter
from collections.abc import Iterator

import pytest
import trio
import trio.testing

import pht
import pht.asyncio
from pht._asyncio_server import start_pht_server

from .asyncio_support import run
from .faults import CutEveryConnection, FaultRelay
from .support import TrioThread, echo, echo_through, start_server

CERTIFICATE = pht.make_self_signed_certificate()
SIZE = 64 * 1024 * 1024
#: The relay stops cutting new connections once this many cuts fired.
UNTIL = 240
#: What each run must show: at least this many cuts fired.
AT_LEAST = 200
#: The asyncio client's reconnect back-off (real clock): 5 to 50 ms, not 0.1 to 5 s.
RECONNECT_DELAY = (0.005, 0.05)

pytestmark = pytest.mark.slow


def summary(relay: FaultRelay) -> str:
    """How many cuts fired, by kind, direction and how; the last connections for context."""
    fired = Counter(
        f"{fault.kind} {fault.cut.direction} {fault.cut.how}" for fault in relay.faults
    )
    lines = [f"{len(relay.faults)} cuts fired in {len(relay.connections)} connections: {fired}"]
    lines += [str(fault) for fault in relay.faults[-5:]]
    lines += [str(connection) for connection in relay.connections[-5:]]
    return "\n".join(lines)


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    CERTIFICATE.configure_trust(context)
    return context


@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
async def test_trio_hundreds_of_cuts_in_64_mib(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tls: bool
) -> None:
    port = await start_server(nursery, echo, resume=True, tls=CERTIFICATE if tls else False)
    relay = FaultRelay(port, fin_linger=1.0)
    relay.planner = CutEveryConnection(relay, 31 + tls, until=UNTIL, spare=1 if tls else 0)
    relay_port = await nursery.start(relay.serve)
    payload = os.urandom(SIZE)
    with trio.fail_after(3600):  # virtual seconds (back-off); bounded all the same
        stream = await pht.open_pht_stream(
            "127.0.0.1",
            relay_port,
            tls=client_context() if tls else False,
            authorize=False,
            resume=True,
            push_window=4,
        )
        got = await echo_through(stream, payload, piece=300_000)
        await stream.aclose()
    assert len(got) == SIZE, summary(relay)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), summary(relay)
    assert len(relay.faults) >= AT_LEAST, summary(relay)
    print(summary(relay).splitlines()[0])  # the figure, with pytest -s


class RelayThread(TrioThread):
    """A fault relay in a trio thread of its own, for a server on an asyncio loop."""

    def start(self, relay: FaultRelay) -> int:
        async def start(nursery: trio.Nursery) -> int:
            port: int = await nursery.start(relay.serve)
            return port

        return self.run(start)


@pytest.fixture
def relay_thread() -> Iterator[RelayThread]:
    running = RelayThread()
    yield running
    running.stop()


async def _asyncio_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
def test_asyncio_hundreds_of_cuts_in_64_mib(relay_thread: RelayThread, tls: bool) -> None:
    payload = os.urandom(SIZE)
    relays: list[FaultRelay] = []

    async def main() -> bytes:
        served = await start_pht_server(
            _asyncio_echo, "127.0.0.1", 0, ssl=CERTIFICATE if tls else None, resume=True
        )
        relay = FaultRelay(served.sockets[0].getsockname()[1], fin_linger=1.0)
        relay.planner = CutEveryConnection(relay, 41 + tls, until=UNTIL, spare=1 if tls else 0)
        relays.append(relay)
        port = await asyncio.to_thread(relay_thread.start, relay)
        try:
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1",
                port,
                ssl=client_context() if tls else None,
                authorize=False,
                resume=True,
                push_window=4,
                reconnect_delay=RECONNECT_DELAY,
            )

            async def write() -> None:
                for start in range(0, SIZE, 300_000):
                    writer.write(payload[start : start + 300_000])
                    await writer.drain()

            writing = asyncio.ensure_future(write())
            got = await reader.readexactly(SIZE)
            await writing
            writer.close()
            await writer.wait_closed()
            return got
        finally:
            served.close()
            await served.wait_closed()

    try:
        got = run("asyncio", main(), timeout=300)
    except Exception:
        if relays:
            print(summary(relays[0]))
        raise
    (relay,) = relays
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), summary(relay)
    assert len(relay.faults) >= AT_LEAST, summary(relay)
    print(summary(relay).splitlines()[0])  # the figure, with pytest -s
