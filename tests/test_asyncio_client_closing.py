"""The asyncio client's HTTP connection closes cleanly in every state of asyncio's transport.

A server that half-closes (FIN) while the client still has request bytes
buffered makes asyncio close the transport once they are flushed; the
client's later close (``abort()``) must then be a no-op, not an
``AttributeError`` from deep inside asyncio (seen under cut pushes with
resume, where the failed push's connection is dropped after the FIN).
"""

from __future__ import annotations

import asyncio
import socket

import pht
from pht._asyncio_client import _Connection

from .asyncio_support import run


def test_close_after_a_fin_and_a_flushed_buffer_is_a_no_op() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        channel = pht.ClientChannel(pht.ClientConfig.build("h"))
        transport, connection = await loop.create_connection(
            lambda: _Connection(channel, loop), sock=ours
        )
        transport.write(b"x" * 8 * 1024 * 1024)  # more than the socket takes: buffered
        assert transport.get_write_buffer_size() > 0
        theirs.shutdown(socket.SHUT_WR)  # the FIN: asyncio closes once the buffer is flushed
        received = 0
        while not transport.is_closing() or transport.get_write_buffer_size():
            try:
                received += len(await loop.sock_recv(theirs, 1024 * 1024))
            except BlockingIOError:
                await asyncio.sleep(0)
        for _ in range(3):  # let connection_lost run
            await asyncio.sleep(0)
        connection.close()  # AttributeError from asyncio before the fix
        theirs.close()

    run("asyncio", main())
