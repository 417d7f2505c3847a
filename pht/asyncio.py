"""PHT for asyncio (and uvloop): tunnels as asyncio's own streams.

``reader, writer = await pht.asyncio.open_pht_connection(host, port)`` opens
a tunnel as :func:`asyncio.open_connection` opens a TCP connection; the
reader and writer are :class:`asyncio.StreamReader` and
:class:`asyncio.StreamWriter`. ``start_pht_server`` serves tunnels as
:func:`asyncio.start_server` serves connections. Both run on the same
sans-IO core as the trio adapters, on asyncio's default loop and on uvloop.
"""

from __future__ import annotations

from ._asyncio_client import (
    TransportReader,
    TransportWriter,
    open_pht_connection,
)
from ._asyncio_common import SessionGoneResetError, TunnelResetError
from ._asyncio_server import PHTServer, start_pht_server
from ._errors import PHTError, TunnelError

__all__ = [
    "PHTError",
    "PHTServer",
    "SessionGoneResetError",
    "TransportReader",
    "TransportWriter",
    "TunnelError",
    "TunnelResetError",
    "open_pht_connection",
    "start_pht_server",
]
