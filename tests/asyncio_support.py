"""Run asyncio code from pytest-trio's suite, on the default loop or on uvloop.

The suite runs in ``trio_mode``, so asyncio tests are plain functions that
call :func:`run` (through the ``aio`` fixture of the modules using it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: A bound for a whole asyncio test, so that a hang fails instead of blocking the suite.
TEST_TIMEOUT = 60.0

LOOPS = ["asyncio", "uvloop"]


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(name: str, coro: Coroutine[Any, Any, T], *, timeout: float = TEST_TIMEOUT) -> T:
    """Run ``coro`` on a new loop of kind ``name``; leftover tasks fail the test."""
    loop = loop_factory(name)()
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers))
        assert not leftovers, f"tasks left running: {leftovers}"
        return result
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until EOF (or a reset), then close ``writer``."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
