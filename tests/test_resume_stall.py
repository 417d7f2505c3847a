"""An ack-only push's answer acknowledges upstream bytes too (issue 13: a stalled ``drain()``).

The answer to an ack-only push carries ``PHT-Received``, like any push
answer. When it covers a data push whose own answer is then lost, nothing
is left to push again, so no later push answer reports those bytes: unless
the ack-only answer does, the asyncio client's ``drain()`` waits forever
for an acknowledgement the server already gave. The session rule is
tested sans-IO; the asyncio client through a relay that loses the data
push's answer while the ack-only push goes through.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import pht.asyncio
from pht._asyncio_server import start_pht_server
from pht._client_session import WriteDone
from pht._errors import TunnelError
from pht._events import DataReceived, PushAcknowledged

from .asyncio_support import LOOPS, run
from .faults import Cut, FaultRelay
from .test_client_resume import open_resume
from .test_resume_scale import RelayThread, relay_thread

__all__ = ["relay_thread"]  # the fixture, for the tests below

UP = 1000
#: The server's replay window (the smallest allowed): an ack-only push every 32 KiB.
WINDOW = 65536
DOWN = 40 * 1024


def test_an_ack_only_answer_acknowledges_pushed_bytes() -> None:
    session = open_resume(push_window=2)
    session.resume_write(b"0123456789")
    session.resume_push()
    session.pull_event(DataReceived(data=b"x" * 32768))
    assert session.ack_due
    ack, _ = session.ack_only_headers()
    assert not session.ack_only_answer(ack, PushAcknowledged(), [(b"pht-received", b"10")])
    assert session.acknowledged == 10
    # The data push's own answer is lost: nothing is left to push again,
    # so no push answer will ever report these 10 bytes.
    session.push_lost(OSError("reset"), now=0.0)
    assert session.resume is not None
    assert session.resume.unpushed == 0
    assert session.resume_step(writing=False, in_flight=0, window=2, keep=0) == WriteDone()
    assert session.acknowledged == 10


def test_a_push_acknowledged_short_of_its_end_fails_the_session() -> None:
    # A 200 says the server has the push's bytes; a PHT-Received below its
    # end would leave them unacknowledged for good (drain() waiting forever).
    session = open_resume(push_window=2)
    session.resume_write(b"0123456789")
    session.resume_push()
    with pytest.raises(TunnelError, match="ending at 10 with PHT-Received: 4"):
        session.answer_push(
            PushAcknowledged(), [(b"pht-received", b"4")], closed=False, still_in_flight=0, now=0.0
        )
    assert session.error is not None


async def _send_down_after_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Take ``UP`` bytes, then send ``DOWN`` (more than half the window), then echo to the end."""
    await reader.readexactly(UP)
    writer.write(b"d" * DOWN)
    await writer.drain()
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_drain_returns_when_an_ack_only_push_acknowledged_the_bytes(
    relay_thread: RelayThread, loop: str
) -> None:
    payload = os.urandom(UP)
    # The data push's answer is lost (a reset as it starts); the ack-only
    # push, on a connection of its own (push #1), is answered.
    relay = FaultRelay(0, [Cut("down", 0, "rst", kind="push", nth=0)], fin_linger=1.0)

    async def main() -> None:
        served = await start_pht_server(
            _send_down_after_up,
            "127.0.0.1",
            0,
            resume=True,
            resume_window=WINDOW,
            shutdown_timeout=2,
        )
        relay.target = served.sockets[0].getsockname()[1]
        port = await asyncio.to_thread(relay_thread.start, relay)
        try:
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1",
                port,
                authorize=False,
                resume=True,
                # The back-off after the lost answer is 1 to 2 s, and the
                # ack-only push is answered long before it ends: that answer
                # must let drain() return, as nothing is pushed again after it.
                reconnect_delay=(2.0, 2.0),
            )
            writer.write(payload)
            # Bounds a hang (the bug: drain() never returns); it returns in milliseconds.
            await asyncio.wait_for(writer.drain(), 30)
            assert writer.transport.get_write_buffer_size() == 0
            # What made drain() return: the ack-only push, not a push sent again.
            kinds = [connection.kind for connection in relay.connections]
            assert kinds.count("push") == 2, relay.describe()
            assert len(relay.faults) == 1, relay.describe()
            assert await reader.readexactly(DOWN) == b"d" * DOWN
            writer.write(b"end")
            await writer.drain()
            assert await reader.readexactly(3) == b"end"
            writer.close()
            await writer.wait_closed()
        finally:
            served.close()
            await served.wait_closed()

    run(loop, main())
