"""PHT for asyncio (and uvloop): tunnels as asyncio's own streams.

``reader, writer = await pht.asyncio.open_pht_connection(host, port)`` opens
a tunnel as :func:`asyncio.open_connection` opens a TCP connection; the
reader and writer are :class:`asyncio.StreamReader` and
:class:`asyncio.StreamWriter`. ``start_pht_server`` serves tunnels as
:func:`asyncio.start_server` serves connections. Both run on the same
sans-IO core as the trio adapters, on asyncio's default loop and on uvloop.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._asyncio_client import open_pht_connection
from ._asyncio_common import TunnelResetError
from ._errors import PHTError, TunnelError

__all__ = ["PHTError", "TunnelError", "TunnelResetError", "open_pht_connection"]


def __getattr__(name: str) -> Any:
    # The server side (pht._asyncio_server) loads on first use.
    if name == "start_pht_server":
        value = importlib.import_module("pht._asyncio_server").start_pht_server
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pht.asyncio' has no attribute {name!r}")
