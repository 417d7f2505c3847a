"""A Starlette site with PHT mounted beside an ordinary route, for the ASGI tests.

The tests run it with the real ``uvicorn`` and ``hypercorn`` commands
(``tests.asgi_site:app``). ``/tunnel`` echoes; ``/farewell`` writes a greeting
and closes the session from the server's side; ``/stuck`` never reads (its
pushes get 410 after half a second); ``/small`` issues one pending token at
most (429 beyond); ``/hello`` is an ordinary route. ``conformance`` is
served alone, for the GOST capture replay. ``PHT_HEARTBEAT`` sets
the heartbeat interval (seconds). Every session end is printed as
``session-ended <token> <bytes echoed>``, for the tests to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from pht.asgi import PHTApp

GREETING = b"farewell from the server"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    echoed = 0
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
            echoed += len(data)
    except ConnectionError:
        pass
    finally:
        writer.close()
        print("session-ended", writer.get_extra_info("pht_token"), echoed, flush=True)


async def farewell(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(GREETING)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await writer.wait_closed()  # the session's end, without reading a byte


async def echo_or_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GOST's echo server of the conformance captures; 'farclose' sessions get its bye."""
    if writer.get_extra_info("pht_token").startswith("farclose"):
        writer.write(b"bye #1\n")
        writer.close()
        return
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello from the site\n")


heartbeat = float(os.environ.get("PHT_HEARTBEAT", "10"))
tunnel = PHTApp(echo, heartbeat_interval=heartbeat, shutdown_timeout=1.0, max_header_size=8192)
closing = PHTApp(farewell, heartbeat_interval=heartbeat, shutdown_timeout=1.0)
stuck_app = PHTApp(stuck, push_timeout=0.5, shutdown_timeout=1.0)
small = PHTApp(echo, backlog=1, shutdown_timeout=1.0)
APPS = (tunnel, closing, stuck_app, small)
#: Served alone (at the root, as GOST's captures ask) by the conformance replay.
conformance = PHTApp(echo_or_bye, heartbeat_interval=0.2, shutdown_timeout=1.0)


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for pht_app in APPS:
            await stack.enter_async_context(pht_app.lifespan(app))
        yield


app = Starlette(
    routes=[
        Route("/hello", hello),
        Mount("/tunnel", app=tunnel),
        Mount("/farewell", app=closing),
        Mount("/stuck", app=stuck_app),
        Mount("/small", app=small),
    ],
    lifespan=_lifespan,
)
