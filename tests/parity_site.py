"""The asyncio side of the cross-adapter tests: handler behaviours and the ASGI site.

The handlers here serve ``start_pht_server`` (in the test process) and
``PHTApp`` (under the real ``uvicorn``, in a process of its own) alike, so
both asyncio server adapters run the very same application code; the trio
server runs their twins in :mod:`tests.adapters`. Behaviours:

- ``echo``: every byte back until EOF, then close;
- ``sink``: read until EOF, then report ``sink <token> <bytes> <sha256>``;
- ``source``: write ``size`` bytes of :func:`payload`, then close (the
  session ends from the server's side);
- ``gost``: GOST's echo target of the conformance captures ('farclose'
  sessions get its ``bye #1`` and the server closes);
- ``stuck``: never read (pushes beyond the reader's buffer are not consumed);
- ``crash``: read a byte, then raise (a bug in the application).

``uvicorn --factory tests.parity_site:make_app`` builds a Starlette site that
mounts one ``PHTApp`` per entry of the JSON list in ``PHT_PARITY_SPECS``
(``{"mount", "behaviour", "size", "options"}``) under its mount. Reports
go to standard output, one line each, for the test process to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Report = Callable[[str], None]
Callback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Environment variable carrying the site's endpoints (a JSON list).
SPECS_VARIABLE = "PHT_PARITY_SPECS"


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible bytes that are not all alike (fast: no hashing per block)."""
    return random.Random(seed).randbytes(size)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _print_report(line: str) -> None:
    print(line, flush=True)


def asyncio_handler(behaviour: str, size: int = 0, report: Report = _print_report) -> Callback:
    """The ``client_connected_cb`` for ``behaviour`` (see the module docstring)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hasher, count = hashlib.sha256(), 0
        try:
            while data := await reader.read(256 * 1024):
                hasher.update(data)
                count += len(data)
        except ConnectionError as exc:
            report(f"broken {writer.get_extra_info('pht_token')} {exc!r}")
        else:
            report(f"sink {writer.get_extra_info('pht_token')} {count} {hasher.hexdigest()}")
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload(size))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def gost(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if writer.get_extra_info("pht_token").startswith("farclose"):
            writer.write(b"bye #1\n")
            writer.close()
            return
        await echo(reader, writer)

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()  # holds the writer (dropping it would close it)

    async def crash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        raise RuntimeError("a handler bug (on purpose)")

    handlers: dict[str, Callback] = {
        "crash": crash,
        "echo": echo,
        "sink": sink,
        "source": source,
        "gost": gost,
        "stuck": stuck,
    }
    return handlers[behaviour]


def make_app() -> Any:
    """The Starlette site ``uvicorn --factory`` serves (see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from pht.asgi import PHTApp

    specs: list[dict[str, Any]] = json.loads(os.environ[SPECS_VARIABLE])
    apps = [
        PHTApp(asyncio_handler(spec["behaviour"], spec["size"]), **spec["options"])
        for spec in specs
    ]

    @contextlib.asynccontextmanager
    async def lifespan(site: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for pht_app in apps:
                await stack.enter_async_context(pht_app.lifespan(site))
            yield

    routes = [Mount(spec["mount"], app=app) for spec, app in zip(specs, apps, strict=True)]
    return Starlette(routes=routes, lifespan=lifespan)
