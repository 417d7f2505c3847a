#!/usr/bin/env python3
"""pht's adapters side by side: trio, asyncio and asyncio on uvloop.

Every adapter serves the same workloads from its own server process
(``adapters.py --serve ADAPTER``: PHT and, as that loop's baseline, plain TCP),
and every adapter drives every server from its own client process
(``adapters.py --drive ADAPTER``). So each pair (client adapter, server
adapter) is two processes on loopback, as two programs using the library
would be, and each figure stands next to raw TCP on the same loops in the
same run. Per run, pairs go in a rotating order; figures are medians over
``--runs`` runs, with min and max.

The far side of each tunnel reads a 9-byte header (command byte, 64-bit
size): ``U`` reads ``size`` bytes and answers ``K``; ``D`` sends ``size``
bytes; ``E`` echoes until EOF.

``--quick`` is a smoke run (1 MiB, 50 round trips, one run). The command
line's tunnel (two ``pht`` processes) is measured by ``e2e.py``; the library
on trio alone, with TLS and the core's codecs, by ``run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ADAPTERS = ("trio", "asyncio", "uvloop")
_HEADER = struct.Struct("!cQ")
#: Bytes per application write and read in the bulk workloads.
BLOCK = 256 * 1024
_ROOT = Path(__file__).resolve().parent
_SOURCE = memoryview(os.urandom(BLOCK))

# --- the far side, once per event loop -----------------------------------------------


async def _trio_handler(stream: Any) -> None:
    import trio

    async def exactly(size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    try:
        while True:
            command, size = _HEADER.unpack(await exactly(_HEADER.size))
            if command == b"U":
                while size:
                    data = await stream.receive_some(min(BLOCK, size))
                    if not data:
                        return
                    size -= len(data)
                await stream.send_all(b"K")
            elif command == b"D":
                while size:
                    piece = _SOURCE[: min(size, BLOCK)]
                    await stream.send_all(piece)
                    size -= len(piece)
            else:
                while data := await stream.receive_some(BLOCK):
                    await stream.send_all(data)
                return
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _asyncio_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            command, size = _HEADER.unpack(await reader.readexactly(_HEADER.size))
            if command == b"U":
                while size:
                    data = await reader.read(min(BLOCK, size))
                    if not data:
                        return
                    size -= len(data)
                writer.write(b"K")
                await writer.drain()
            elif command == b"D":
                while size:
                    piece = _SOURCE[: min(size, BLOCK)]
                    writer.write(piece)
                    await writer.drain()
                    size -= len(piece)
            else:
                while data := await reader.read(BLOCK):
                    writer.write(data)
                    await writer.drain()
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def _serve_trio() -> None:
    import trio

    import pht

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: pht.serve_pht(
                _trio_handler, 0, host=HOST, backlog=4096, task_status=task_status
            )
        )
        tcp = await nursery.start(functools.partial(trio.serve_tcp, _trio_handler, 0, host=HOST))
        ports = {
            "pht": listeners[0].socket.getsockname()[1],
            "tcp": tcp[0].socket.getsockname()[1],
        }
        print(json.dumps(ports), flush=True)


async def _serve_asyncio() -> None:
    import pht.asyncio

    server = await pht.asyncio.start_pht_server(_asyncio_handler, HOST, 0, backlog=4096)
    tcp = await asyncio.start_server(_asyncio_handler, HOST, 0)
    ports = {
        "pht": server.sockets[0].getsockname()[1],
        "tcp": tcp.sockets[0].getsockname()[1],
    }
    print(json.dumps(ports), flush=True)
    async with server, tcp:
        await asyncio.gather(server.serve_forever(), tcp.serve_forever())


# --- the driver, once per event loop -------------------------------------------------


class _Figures:
    """What one driver process measures on one path (PHT or TCP) of one server."""

    def __init__(self, size: int, round_trips: int) -> None:
        self.size = size
        self.round_trips = round_trips
        self.result: dict[str, float] = {}

    def bulk(self, name: str, started: float) -> None:
        self.result[name] = self.size / (time.perf_counter() - started) / 1e6

    def rtts(self, times: list[float]) -> None:
        ordered = sorted(times)
        self.result["rtt_median"] = statistics.median(ordered) * 1e6
        self.result["rtt_p99"] = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))] * 1e6


async def _drive_trio(path: str, port: int, figures: _Figures) -> None:
    import trio

    import pht

    async def connect() -> Any:
        if path == "pht":
            return await pht.open_pht_stream(HOST, port)
        return await trio.open_tcp_stream(HOST, port)

    async def exactly(stream: Any, size: int) -> None:
        while size:
            data = await stream.receive_some(min(size, BLOCK))
            if not data:
                raise EOFError("the far side ended early")
            size -= len(data)

    stream = await connect()
    started = time.perf_counter()
    await stream.send_all(_HEADER.pack(b"U", figures.size))
    left = figures.size
    while left:
        piece = _SOURCE[: min(left, BLOCK)]
        await stream.send_all(piece)
        left -= len(piece)
    await exactly(stream, 1)
    figures.bulk("upload", started)
    started = time.perf_counter()
    await stream.send_all(_HEADER.pack(b"D", figures.size))
    await exactly(stream, figures.size)
    figures.bulk("download", started)
    await stream.aclose()

    stream = await connect()
    await stream.send_all(_HEADER.pack(b"E", 0))
    times = []
    for _ in range(figures.round_trips):
        started = time.perf_counter()
        await stream.send_all(b"x")
        await exactly(stream, 1)
        times.append(time.perf_counter() - started)
    figures.rtts(times)
    await stream.aclose()


async def _drive_asyncio(path: str, port: int, figures: _Figures) -> None:
    import pht.asyncio

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if path == "pht":
            return await pht.asyncio.open_pht_connection(HOST, port)
        return await asyncio.open_connection(HOST, port)

    async def close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()

    reader, writer = await connect()
    started = time.perf_counter()
    writer.write(_HEADER.pack(b"U", figures.size))
    left = figures.size
    while left:
        piece = _SOURCE[: min(left, BLOCK)]
        writer.write(piece)
        await writer.drain()
        left -= len(piece)
    await reader.readexactly(1)
    figures.bulk("upload", started)
    started = time.perf_counter()
    writer.write(_HEADER.pack(b"D", figures.size))
    left = figures.size
    while left:
        data = await reader.read(min(left, BLOCK))
        if not data:
            raise EOFError("the far side ended early")
        left -= len(data)
    figures.bulk("download", started)
    await close(writer)

    reader, writer = await connect()
    writer.write(_HEADER.pack(b"E", 0))
    times = []
    for _ in range(figures.round_trips):
        started = time.perf_counter()
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        times.append(time.perf_counter() - started)
    figures.rtts(times)
    await close(writer)


def _run_on(adapter: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on ``adapter``'s event loop."""
    if adapter == "trio":
        importlib.import_module("trio").run(main)
    elif adapter == "uvloop":
        importlib.import_module("uvloop").run(main())
    else:
        asyncio.run(main())


def drive(adapter: str, ports: dict[str, int], size: int, round_trips: int) -> None:
    """Measure both paths of one server from this process; print JSON."""
    results: dict[str, dict[str, float]] = {}

    async def main() -> None:
        for path in ("tcp", "pht"):
            figures = _Figures(size, round_trips)
            if adapter == "trio":
                await _drive_trio(path, ports[path], figures)
            else:
                await _drive_asyncio(path, ports[path], figures)
            results[path] = figures.result

    _run_on(adapter, main)
    print(json.dumps(results), flush=True)


# --- the run ---------------------------------------------------------------------------

METRICS = {
    "upload": ("MB/s", True),
    "download": ("MB/s", True),
    "rtt_median": ("µs", False),
    "rtt_p99": ("µs", False),
}


def _available(adapter: str) -> bool:
    module = {"trio": "trio", "asyncio": "asyncio", "uvloop": "uvloop"}[adapter]
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _start_server(adapter: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", adapter],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError(f"the {adapter} server did not start")
    return process, json.loads(line)


def measure(
    adapters: Sequence[str], runs: int, size: int, round_trips: int
) -> dict[str, dict[str, list[float]]]:
    """pair ("client/server", or "client/server tcp") -> metric -> one figure per run."""
    servers = {adapter: _start_server(adapter) for adapter in adapters}
    pairs = [(client, server) for server in adapters for client in adapters]
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        for run in range(runs):
            order = pairs[run % len(pairs) :] + pairs[: run % len(pairs)]
            for client, server in order:
                completed = subprocess.run(
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--drive",
                        client,
                        "--ports",
                        json.dumps(servers[server][1]),
                        "--size",
                        str(size),
                        "--round-trips",
                        str(round_trips),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                result = json.loads(completed.stdout)
                labels = {"pht": f"{client}/{server}", "tcp": f"{client}/{server} tcp"}
                for path, label in labels.items():
                    entry = figures.setdefault(label, {})
                    for metric, value in result[path].items():
                        entry.setdefault(metric, []).append(value)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)
    return figures


def summarize(figures: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians, min and max per pair and metric, and each PHT figure against its TCP."""
    summary: dict[str, Any] = {}
    for label, metrics in figures.items():
        entry: dict[str, Any] = {}
        for metric, values in metrics.items():
            entry[metric] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "runs": values,
            }
        summary[label] = entry
    for label, entry in summary.items():
        if label.endswith(" tcp"):
            continue
        base = summary[f"{label} tcp"]
        for metric, (_unit, _higher) in METRICS.items():
            entry[metric]["vs_tcp"] = entry[metric]["median"] / base[metric]["median"]
    return summary


def render(summary: dict[str, Any]) -> str:
    """One row per pair (client/server), PHT with its ratio to TCP on the same loops."""
    header = f"{'client/server':<18}" + "".join(
        f"{metric + ' (' + unit + ')':>22}" for metric, (unit, _) in METRICS.items()
    )
    lines = [header, "-" * len(header)]
    for label in sorted(summary, key=lambda name: (name.endswith(" tcp"), name)):
        entry = summary[label]
        cells = []
        for metric in METRICS:
            figure = entry[metric]
            text = f"{figure['median']:.4g}"
            if "vs_tcp" in figure:
                text += f" ({figure['vs_tcp']:.2f}x tcp)"
            cells.append(f"{text:>22}")
        lines.append(f"{label:<18}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MiB, 50 round trips, 1 run")
    parser.add_argument("--runs", type=int, help="runs per pair (default 5)")
    parser.add_argument("--size", type=int, help="MiB each way per run (default 32)")
    parser.add_argument("--round-trips", type=int, help="1-byte echoes per run (default 2000)")
    parser.add_argument(
        "--adapters",
        default=",".join(ADAPTERS),
        help="comma-separated, from trio, asyncio, uvloop (default: all installed)",
    )
    parser.add_argument("--output", type=Path, default=_ROOT / "results", help="result folder")
    parser.add_argument("--serve", choices=ADAPTERS, help=argparse.SUPPRESS)
    parser.add_argument("--drive", choices=ADAPTERS, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        _run_on(args.serve, _serve_trio if args.serve == "trio" else _serve_asyncio)
        return 0
    if args.drive:
        drive(args.drive, json.loads(args.ports), args.size, args.round_trips)
        return 0

    runs = args.runs or (1 if args.quick else 5)
    size = (args.size or (1 if args.quick else 32)) * 2**20
    round_trips = args.round_trips or (50 if args.quick else 2000)
    adapters = [name for name in args.adapters.split(",") if name]
    unknown = sorted(set(adapters) - set(ADAPTERS))
    if unknown:
        parser.error(f"unknown adapter(s): {', '.join(unknown)}")
    missing = [name for name in adapters if not _available(name)]
    for name in missing:
        print(f"{name}: not installed, skipped (pip install 'pht-tunnel[uvloop]')")
    adapters = [name for name in adapters if name not in missing]

    summary = summarize(measure(adapters, runs, size, round_trips))
    print(f"{runs} run(s), {size >> 20} MiB each way, {round_trips} round trips; medians")
    print(render(summary))
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "adapters.json"
    path.write_text(
        json.dumps(
            {"runs": runs, "size": size, "round_trips": round_trips, "pairs": summary}, indent=2
        )
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
