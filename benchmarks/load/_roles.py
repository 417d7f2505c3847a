"""The suite's subprocesses: the echo target, the library server and the canary."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from typing import Any

import trio

import pht

from ._common import (
    CANARY_INTERVAL,
    ECHO_SIZE,
    ECHO_TIMEOUT,
    HOST,
    PROBE_TIMEOUT,
    describe,
    receive_exactly,
    wait_stdin_eof,
)

# --- role: echo target ---------------------------------------------------------------------


async def run_target() -> None:
    """A TCP echo server that counts the connections it accepts."""
    counts = {"accepted": 0, "open": 0, "peak_open": 0}

    async def echo(stream: trio.SocketStream) -> None:
        counts["accepted"] += 1
        counts["open"] += 1
        counts["peak_open"] = max(counts["peak_open"], counts["open"])
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            counts["open"] -= 1
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host=HOST, backlog=4096)
    print(json.dumps({"port": listeners[0].socket.getsockname()[1]}), flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, echo, listeners)
        await wait_stdin_eof()
        nursery.cancel_scope.cancel()
    print(json.dumps(counts), flush=True)


# --- role: library server ------------------------------------------------------------------


async def run_library_server(args: argparse.Namespace) -> None:
    """``serve_pht`` with pht.proxy's forward handler: settings the CLI lacks."""
    import pht.proxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    handler = pht.proxy.ForwardHandler(HOST, args.target)
    options: dict[str, Any] = {"strict": args.strict}
    if args.keepalive_timeout is not None:
        options["keepalive_timeout"] = args.keepalive_timeout
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: pht.serve_pht(handler, args.port, host=HOST, **options))
        await wait_stdin_eof()
        nursery.cancel_scope.cancel()


# --- role: canary --------------------------------------------------------------------------


async def run_canary(args: argparse.Namespace) -> None:
    """One tunnel echoing 1 KiB every 100 ms, and a fresh tunnel every 1-2 s.

    Prints ``ready`` once the first echo came back (or failed), and at the
    end (stdin closed) one JSON object: every echo and every probe, stamped
    with ``time.monotonic()`` (the same clock as the parent's phases).
    """
    echoes: list[tuple[float, float | None, str | None]] = []
    probes: list[tuple[float, float | None, str | None]] = []
    payload = os.urandom(ECHO_SIZE)
    ready = trio.Event()
    port = args.port

    opened = 0

    async def open_tunnel() -> trio.abc.Stream:
        nonlocal opened
        stream = await pht.open_pht_stream(HOST, port, connect_timeout=PROBE_TIMEOUT)
        opened += 1
        return stream

    async def echo_once(stream: trio.abc.Stream) -> None:
        await stream.send_all(payload)
        if await receive_exactly(stream, ECHO_SIZE) != payload:
            raise ValueError("echo corrupted")

    async def canary() -> None:
        stream: trio.abc.Stream | None = None
        next_time = trio.current_time()
        while True:
            started = time.monotonic()
            try:
                with trio.fail_after(ECHO_TIMEOUT):
                    if stream is None:
                        stream = await open_tunnel()
                        started = time.monotonic()
                    await echo_once(stream)
                echoes.append((started, time.monotonic() - started, None))
            except Exception as exc:
                echoes.append((started, None, describe(exc)))
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                stream = None
            ready.set()
            next_time = max(next_time + CANARY_INTERVAL, trio.current_time())
            await trio.sleep_until(next_time)

    async def probe(nursery: trio.Nursery) -> None:
        started = time.monotonic()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                stream = await open_tunnel()
                try:
                    await echo_once(stream)
                finally:
                    nursery.start_soon(stream.aclose)
            probes.append((started, time.monotonic() - started, None))
        except Exception as exc:
            probes.append((started, None, describe(exc)))

    async def prober(nursery: trio.Nursery) -> None:
        rng = random.Random(1)
        while True:
            await trio.sleep(rng.uniform(1.0, 2.0))
            nursery.start_soon(probe, nursery)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(canary)
        await ready.wait()
        print("ready", flush=True)
        nursery.start_soon(prober, nursery)
        await wait_stdin_eof()
        nursery.cancel_scope.cancel()
    print(json.dumps({"echoes": echoes, "probes": probes, "opened": opened}), flush=True)
