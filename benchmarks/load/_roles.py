"""The suite's subprocesses: the echo target, the library server and the canary."""

from __future__ import annotations

import argparse
import gc
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


async def _trio_echo(stream: trio.abc.Stream) -> None:
    """An in-process echo handler: a tunnel costs the server no target socket."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


def tune_gc() -> None:
    """What a server for many tunnels can do about full collections (``--server-gc tuned``).

    CPython collects its oldest generation each time the heap grew by a
    quarter: opening 10,000 tunnels runs about seven full collections, each
    walking every object (the last ones take hundreds of milliseconds, and
    every tunnel waits). Frozen start-up objects are never walked again, and
    a high third threshold leaves full collections to much later (objects of
    ended sessions are freed by reference counting meanwhile).
    """
    gc.freeze()
    first, second, _ = gc.get_threshold()
    gc.set_threshold(first, second, 10_000)


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"strict": args.strict}
    if args.keepalive_timeout is not None:
        options["keepalive_timeout"] = args.keepalive_timeout
    if args.max_sessions is not None:
        options["max_sessions"] = args.max_sessions
    return options


async def run_library_server(args: argparse.Namespace) -> None:
    """``serve_pht`` with pht.proxy's forward handler (settings the CLI lacks) or an echo."""
    import pht.proxy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    handler: Any = _trio_echo if args.echo else pht.proxy.ForwardHandler(HOST, args.target)
    options = _server_options(args)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: pht.serve_pht(
                handler, args.port, host=HOST, task_status=task_status, **options
            )
        )
        if args.server_gc == "tuned":
            tune_gc()
        await wait_stdin_eof()
        nursery.cancel_scope.cancel()


def run_asyncio_server(args: argparse.Namespace) -> None:
    """``pht.asyncio.start_pht_server`` with an echo handler, on asyncio or uvloop.

    The command line serves with this same server (on uvloop when installed);
    an in-process echo stands in for its handler so that a tunnel costs no
    target socket.
    """
    import asyncio

    import pht.asyncio

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve() -> None:
        server = await pht.asyncio.start_pht_server(echo, HOST, args.port, **_server_options(args))
        if args.server_gc == "tuned":
            tune_gc()
        loop = asyncio.get_running_loop()
        stdin_closed = loop.create_future()

        def readable() -> None:
            if not os.read(0, 4096) and not stdin_closed.done():
                stdin_closed.set_result(None)

        loop.add_reader(0, readable)
        try:
            await stdin_closed
        finally:
            loop.remove_reader(0)
            server.close()
            await asyncio.wait_for(server.wait_closed(), 30)

    if args.server == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


# --- role: idle tunnels --------------------------------------------------------------------


async def run_tunnels(args: argparse.Namespace) -> None:
    """Open idle tunnels (as pht's or GOST's client leaves them), hold them, close them at once.

    Tunnels ``--first`` to ``--first + --tunnels - 1`` of the idle scenario,
    so that several of these processes share the load (each under its own
    open-file limit). Prints one JSON line when they are open, then waits for
    a ``close`` line on stdin, closes them all at once (the empty-body push
    that ends a pht session, then the sockets), prints a JSON line, and
    exits at stdin's EOF.
    """
    from collections import Counter

    import h11

    from ._wire import Raw, StatusError, error_key, idle_source, open_held_pull

    held: list[tuple[Raw, Raw | None, str]] = []
    statuses: Counter[str] = Counter()
    dropped = 0
    per_tunnel = args.tunnel_connections
    stdin = trio.lowlevel.FdStream(os.dup(0))

    async def drain(raw: Raw) -> None:
        nonlocal dropped
        try:
            while await raw.stream.receive_some(4096):
                pass
            dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def open_one(index: int, limiter: trio.CapacityLimiter, readers: trio.Nursery) -> None:
        async with limiter:
            source = idle_source(index, args.addresses)
            try:
                pull, token = await open_held_pull(args.port, source)
            except (OSError, EOFError, StatusError, h11.ProtocolError) as exc:
                statuses[error_key(exc)] += 1
                return
            push: Raw | None = None
            try:
                if per_tunnel == 2:
                    push = await Raw.connect(source, args.port)
            except OSError as exc:
                statuses[error_key(exc)] += 1
                await pull.aclose()
                return
            except BaseException:  # cancelled: the opening phase ran out of time
                await pull.aclose()
                raise
            statuses["200"] += 1
            held.append((pull, push, token))
            readers.start_soon(drain, pull)

    async def close_one(pull: Raw, push: Raw | None, token: str) -> None:
        # pht's client: the empty-body push (close notification), then hang up.
        if push is None:  # GOST's legacy client just hangs up
            await pull.aclose()
            return
        with trio.move_on_after(5):
            try:
                await push.request("POST", f"/push?token={token}", b"")
            except (OSError, EOFError, trio.BrokenResourceError, h11.ProtocolError):
                pass
        await push.aclose()
        await pull.aclose()

    async with trio.open_nursery() as readers:
        started = time.monotonic()
        limiter = trio.CapacityLimiter(args.concurrency)
        with trio.move_on_after(args.open_timeout):
            async with trio.open_nursery() as nursery:
                for index in range(args.first, args.first + args.tunnels):
                    nursery.start_soon(open_one, index, limiter, readers)
        report = {"opened": len(held), "statuses": dict(statuses)}
        report["seconds"] = time.monotonic() - started
        print(json.dumps(report), flush=True)
        command = await stdin.receive_some(4096)
        report = {"dropped_while_idle": dropped}
        if command.strip() == b"close":
            started = time.monotonic()
            with trio.move_on_after(10):
                async with trio.open_nursery() as nursery:
                    for pull, push, token in held:
                        nursery.start_soon(close_one, pull, push, token)
            for pull, push, _ in held:  # whatever the bound cut short
                await pull.aclose()
                if push is not None:
                    await push.aclose()
            report["seconds"] = time.monotonic() - started
        print(json.dumps(report), flush=True)
        readers.cancel_scope.cancel()
    while await stdin.receive_some(4096):
        pass
    await stdin.aclose()


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

    async def close_quietly(stream: trio.abc.Stream) -> None:
        # A probe cut short by its timeout may fail to close: already counted.
        try:
            await stream.aclose()
        except Exception:
            await trio.aclose_forcefully(stream)

    async def probe(nursery: trio.Nursery) -> None:
        started = time.monotonic()
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                stream = await open_tunnel()
                try:
                    await echo_once(stream)
                finally:
                    nursery.start_soon(close_quietly, stream)
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
