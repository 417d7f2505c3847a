"""Resume with the asyncio client: the trio server and the fault relay run in a thread.

The asyncio client (default loop and uvloop) echoes 16 MiB each way through
many FIN/RST cuts and gets every byte once (sha256), plain and phts; a
server that does not grant the extension gets today's protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Iterator

import pytest
import trio

import pht
import pht.asyncio

from .asyncio_support import LOOPS, run
from .faults import FaultRelay
from .resume_server import ResumeServer, serve_resume
from .support import TrioThread, echo, start_server
from .test_client_resume import open_resume
from .test_resume_e2e import _cuts

CERTIFICATE = pht.make_self_signed_certificate()
SIZE = 16 * 1024 * 1024


class Relays(TrioThread):
    """Per test, a resume server behind a fault relay, in a trio thread of its own."""

    def start(self, seed: int, *, tls: bool, resume: bool = True) -> tuple[int, FaultRelay]:
        async def start(nursery: trio.Nursery) -> tuple[int, FaultRelay]:
            port = await start_server(
                nursery, echo, resume=resume, tls=CERTIFICATE if tls else False
            )
            relay = FaultRelay(port, _cuts(seed, tls), fin_linger=1.0)
            relay_port: int = await nursery.start(relay.serve)
            return relay_port, relay

        return self.run(start)

    def scripted(self) -> tuple[int, ResumeServer]:
        """A scripted resume server (``tests/resume_server.py``), no relay."""

        async def start(nursery: trio.Nursery) -> tuple[int, ResumeServer]:
            server = ResumeServer()
            return await serve_resume(nursery, server), server

        return self.run(start)


@pytest.fixture(scope="module")
def relays() -> Iterator[Relays]:
    running = Relays()
    yield running
    running.stop()


async def _echo_through(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    async def write() -> None:
        for start in range(0, len(payload), 300_000):
            writer.write(payload[start : start + 300_000])
            await writer.drain()

    writing = asyncio.ensure_future(write())
    got = await reader.readexactly(len(payload))
    await writing
    return got


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
def test_many_random_cuts_lose_and_duplicate_nothing(relays: Relays, loop: str, tls: bool) -> None:
    port, relay = relays.start(7, tls=tls)
    payload = os.urandom(SIZE)
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context()
        CERTIFICATE.configure_trust(context)

    async def main() -> bytes:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", port, ssl=context, authorize=False, resume=True, push_window=4
        )
        got = await _echo_through(reader, writer, payload)
        writer.close()
        await writer.wait_closed()
        return got

    got = run(loop, main(), timeout=60)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), relay.describe()
    assert len(relay.faults) >= 6, relay.describe()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_server_without_resume_gets_todays_protocol(relays: Relays, loop: str) -> None:
    port, relay = relays.start(8, tls=False, resume=False)
    relay.cuts.clear()

    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", port, authorize=False, resume=True
        )
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        await writer.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_session_gone_ends_the_reader_with_a_named_error(relays: Relays, loop: str) -> None:
    port, server = relays.scripted()

    async def main() -> None:
        reader, writer = await pht.asyncio.open_pht_connection(
            "127.0.0.1", port, authorize=False, resume=True
        )
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        (token,) = server.sessions
        relays.run_sync(lambda: server._end(token, pht.GoneReason.ABORTED))
        with pytest.raises(pht.SessionGone) as caught:
            await reader.read(100)
        assert isinstance(caught.value, ConnectionResetError)
        assert isinstance(caught.value, pht.asyncio.SessionGoneResetError)
        assert caught.value.reason is pht.GoneReason.ABORTED
        assert caught.value.status == 410
        writer.close()
        with pytest.raises(pht.SessionGone):
            await writer.wait_closed()

    run(loop, main())


def test_reconnect_delay_sets_the_back_off() -> None:
    # jitter 0.5: each delay is 3/4 of min(initial * 2**n, maximum).
    session = open_resume(reconnect_delay=(0.01, 0.03))
    delays = [session.pull_lost(OSError("reset"), now=100.0 + n) for n in range(4)]
    assert delays == pytest.approx([0.0075, 0.015, 0.0225, 0.0225])
    default = open_resume()
    assert default.pull_lost(OSError("reset"), now=100.0) == pytest.approx(0.075)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ((0, 1), ValueError, "reconnect_delay's initial must be a positive"),
        ((2, 1), ValueError, r"initial \(2 s\) must not exceed its maximum \(1 s\)"),
        ((0.1, float("inf")), ValueError, "reconnect_delay's maximum must be a positive"),
        (0.1, TypeError, r"reconnect_delay must be a tuple \(initial, maximum\)"),
        (("0.1", 1), TypeError, "reconnect_delay's initial must be a number"),
    ],
)
def test_a_bad_reconnect_delay_is_refused_by_both_clients(
    value: object, error: type[Exception], message: str
) -> None:
    # Refused before connecting: port 1 is never dialled.
    with pytest.raises(error, match=message):
        run(
            "asyncio",
            pht.asyncio.open_pht_connection(
                "127.0.0.1",
                1,
                resume=True,
                reconnect_delay=value,  # type: ignore[arg-type]
            ),
        )
    with pytest.raises(error, match=message):
        trio.run(
            lambda: pht.open_pht_stream(
                "127.0.0.1",
                1,
                resume=True,
                reconnect_delay=value,  # type: ignore[arg-type]
            )
        )
