#!/usr/bin/env python3
"""Benchmarks for pht: a PHT tunnel against a plain TCP connection.

Run ``scripts/bench.sh`` (or ``.venv/bin/python benchmarks/run.py``). The
script starts a server process (``run.py --serve``) that listens for PHT,
PHT over TLS, TCP and TCP over TLS on loopback, all with the same handler,
and drives the workloads from this process: every PHT figure is measured next
to the same workload over plain TCP (the baseline). It prints a table, writes
``benchmarks/results/results.json`` and a PNG plot.

``--quick`` uses small sizes and two runs (a smoke test, under a minute);
``--only SECTION`` runs one section (bulk, latency, setup, concurrency, core).
"""

from __future__ import annotations

import argparse
import binascii
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import ssl
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

import pht
from pht import (
    NEED_DATA,
    ClientChannel,
    ClientConfig,
    DataReceived,
    PushRequest,
    ServerConnection,
)

HOST = "127.0.0.1"
#: Bytes per application write in the bulk workloads (a relay's typical read size).
APP_WRITE = 256 * 1024
#: Bytes per application read.
APP_READ = 256 * 1024
#: push_window of the pipelined upload figure.
PIPELINED_WINDOW = 4
_HEADER = struct.Struct("!cQ")  # command, size
_ROOT = Path(__file__).resolve().parent

# --- the server process ---------------------------------------------------------


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


#: What the source sends, shared by every handler (a per-tunnel block would
#: count against the tunnel's memory).
_SOURCE_BLOCK = memoryview(os.urandom(APP_WRITE))


async def bench_handler(stream: trio.abc.Stream) -> None:
    """The far side of every benchmark tunnel: a sink, a source or an echo.

    Each command is a 9-byte header (command byte, 64-bit size). ``U``: read
    ``size`` bytes, answer ``K``. ``D``: send ``size`` bytes. ``E``: echo
    everything until EOF.
    """
    block = _SOURCE_BLOCK
    try:
        while True:
            try:
                header = await _receive_exactly(stream, _HEADER.size)
            except EOFError:
                return
            command, size = _HEADER.unpack(header)
            if command == b"U":
                remaining = size
                while remaining:
                    data = await stream.receive_some(min(APP_READ, remaining))
                    if not data:
                        return
                    remaining -= len(data)
                await stream.send_all(b"K")
            elif command == b"D":
                remaining = size
                while remaining:
                    piece = block[: min(remaining, APP_WRITE)]
                    await stream.send_all(piece)
                    remaining -= len(piece)
            elif command == b"E":
                while True:
                    data = await stream.receive_some(APP_READ)
                    if not data:
                        return
                    await stream.send_all(data)
            else:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _port_of(listener: Any) -> int:
    while isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    return int(listener.socket.getsockname()[1])


async def _serve() -> None:
    certificate = pht.make_self_signed_certificate()
    context = certificate.server_context()
    async with trio.open_nursery() as nursery:
        ports: dict[str, int] = {}
        for name, tls in (("pht", False), ("pht_tls", True)):
            listeners = await nursery.start(
                partial(
                    pht.serve_pht,
                    bench_handler,
                    0,
                    host=HOST,
                    tls=certificate if tls else False,
                    backlog=4096,
                )
            )
            ports[name] = _port_of(listeners[0])
        tcp = await nursery.start(partial(trio.serve_tcp, bench_handler, 0, host=HOST))
        ports["tcp"] = _port_of(tcp[0])
        tcp_tls = await nursery.start(
            partial(trio.serve_ssl_over_tcp, bench_handler, 0, context, host=HOST)
        )
        ports["tcp_tls"] = _port_of(tcp_tls[0])
        print(json.dumps(ports), flush=True)


# --- statistics -----------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "runs": list(values),
    }


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Figure:
    """One measured quantity: PHT's runs next to the baseline's."""

    name: str
    unit: str
    higher_is_better: bool
    pht: list[float]
    baseline: list[float]
    baseline_label: str = "TCP"
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "pht": _stats(self.pht),
            "baseline_label": self.baseline_label,
            "note": self.note,
        }
        if self.baseline:
            result["baseline"] = _stats(self.baseline)
            base = statistics.median(self.baseline)
            result["ratio"] = statistics.median(self.pht) / base if base else None
        else:
            result["baseline"] = None
            result["ratio"] = None
        return result


# --- client side ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    runs: int
    bulk_size: int
    round_trips: int
    setups: int
    concurrency: tuple[int, ...]
    concurrency_bytes: int
    core_size: int


FULL = Settings(
    runs=3,
    bulk_size=256 * 1024 * 1024,
    round_trips=3000,
    setups=200,
    concurrency=(1, 100, 1000),
    concurrency_bytes=128 * 1024 * 1024,
    core_size=64 * 1024 * 1024,
)
QUICK = Settings(
    runs=2,
    bulk_size=8 * 1024 * 1024,
    round_trips=300,
    setups=30,
    concurrency=(1, 20, 100),
    concurrency_bytes=8 * 1024 * 1024,
    core_size=8 * 1024 * 1024,
)


def _client_context() -> ssl.SSLContext:
    # GOST's clients do not verify the self-signed certificate either.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Client:
    """Drives the workloads; owns the server process (``run.py --serve``)."""

    def __init__(self) -> None:
        self.context = _client_context()
        self.server: subprocess.Popen[str] | None = None
        self.ports: dict[str, int] = {}
        self.server_pid = 0

    def start_server(self) -> None:
        """(Re)start the server process, so that memory figures start clean."""
        self.stop_server()
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        self.ports = json.loads(self.server.stdout.readline())
        self.server_pid = self.server.pid

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=10)
            self.server = None

    async def open(
        self, kind: str, *, tls: bool, authorize: bool = True, push_window: int = 1
    ) -> trio.abc.Stream:
        if kind == "pht":
            port = self.ports["pht_tls" if tls else "pht"]
            return await pht.open_pht_stream(
                HOST,
                port,
                tls=self.context if tls else False,
                authorize=authorize,
                push_window=push_window,
            )
        port = self.ports["tcp_tls" if tls else "tcp"]
        stream: trio.abc.Stream = await trio.open_tcp_stream(HOST, port)
        if tls:
            ssl_stream = trio.SSLStream(stream, self.context, server_hostname="gost.run")
            await ssl_stream.do_handshake()
            stream = ssl_stream
        return stream

    def server_rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        with open(f"/proc/{self.server_pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


async def _upload(stream: trio.abc.Stream, size: int) -> float:
    block = memoryview(os.urandom(APP_WRITE))
    start = time.perf_counter()
    await stream.send_all(_HEADER.pack(b"U", size))
    remaining = size
    while remaining:
        piece = block[: min(remaining, APP_WRITE)]
        await stream.send_all(piece)
        remaining -= len(piece)
    if await _receive_exactly(stream, 1) != b"K":
        raise RuntimeError("bad upload acknowledgement")
    return time.perf_counter() - start


async def _download(stream: trio.abc.Stream, size: int) -> float:
    start = time.perf_counter()
    await stream.send_all(_HEADER.pack(b"D", size))
    remaining = size
    while remaining:
        data = await stream.receive_some(APP_READ)
        if not data:
            raise EOFError("download ended early")
        remaining -= len(data)
    return time.perf_counter() - start


async def bench_bulk(client: Client, settings: Settings) -> list[Figure]:
    figures = []
    size = settings.bulk_size
    for direction, move in (("upload", _upload), ("download", _download)):
        for tls in (False, True):
            values: dict[str, list[float]] = {"pht": [], "tcp": []}
            for _ in range(settings.runs):
                for kind in ("pht", "tcp"):
                    stream = await client.open(kind, tls=tls)
                    try:
                        elapsed = await move(stream, size)
                    finally:
                        await stream.aclose()
                    values[kind].append(size / elapsed / 1e6)
            figures.append(
                Figure(
                    f"{direction}_{'tls' if tls else 'plain'}",
                    "MB/s",
                    True,
                    values["pht"],
                    values["tcp"],
                    "TLS over TCP" if tls else "TCP",
                    f"{size // 2**20} MiB in {APP_WRITE // 1024} KiB writes",
                )
            )
    # Pipelined pushes (open_pht_stream(push_window=PIPELINED_WINDOW)), plain only.
    values = {"pht": [], "tcp": []}
    for _ in range(settings.runs):
        for kind in ("pht", "tcp"):
            stream = await client.open(kind, tls=False, push_window=PIPELINED_WINDOW)
            try:
                elapsed = await _upload(stream, size)
            finally:
                await stream.aclose()
            values[kind].append(size / elapsed / 1e6)
    figures.append(
        Figure(
            "upload_plain_pipelined",
            "MB/s",
            True,
            values["pht"],
            values["tcp"],
            "TCP",
            f"{size // 2**20} MiB in {APP_WRITE // 1024} KiB writes, "
            f"push_window={PIPELINED_WINDOW}",
        )
    )
    return figures


async def _round_trips(stream: trio.abc.Stream, count: int) -> list[float]:
    await stream.send_all(_HEADER.pack(b"E", 0))
    for _ in range(min(50, count)):  # warm-up
        await stream.send_all(b"x")
        await _receive_exactly(stream, 1)
    times = []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        await stream.send_all(b"x")
        if await stream.receive_some(1) != b"x":
            raise RuntimeError("bad echo")
        times.append((clock() - start) / 1000)
    return times


async def bench_latency(client: Client, settings: Settings) -> list[Figure]:
    medians: dict[str, list[float]] = {"pht": [], "tcp": []}
    p99s: dict[str, list[float]] = {"pht": [], "tcp": []}
    for _ in range(settings.runs):
        for kind in ("pht", "tcp"):
            stream = await client.open(kind, tls=False)
            try:
                times = await _round_trips(stream, settings.round_trips)
            finally:
                await stream.aclose()
            medians[kind].append(statistics.median(times))
            p99s[kind].append(_percentile(times, 0.99))
    note = f"1-byte echo, {settings.round_trips} round trips per run"
    return [
        Figure("rtt_median", "µs", False, medians["pht"], medians["tcp"], note=note),
        Figure("rtt_p99", "µs", False, p99s["pht"], p99s["tcp"], note=note),
    ]


async def _first_byte(client: Client, kind: str, authorize: bool) -> tuple[float, trio.abc.Stream]:
    start = time.perf_counter()
    stream = await client.open(kind, tls=False, authorize=authorize)
    await stream.send_all(_HEADER.pack(b"E", 0) + b"x")
    if await _receive_exactly(stream, 1) != b"x":
        raise RuntimeError("bad echo")
    return time.perf_counter() - start, stream


async def bench_setup(client: Client, settings: Settings) -> list[Figure]:
    figures = []
    for authorize in (True, False):
        first: dict[str, list[float]] = {"pht": [], "tcp": []}
        rates: dict[str, list[float]] = {"pht": [], "tcp": []}
        for _ in range(settings.runs):
            for kind in ("pht", "tcp"):
                times = []
                start = time.perf_counter()
                for _ in range(settings.setups):
                    elapsed, stream = await _first_byte(client, kind, authorize)
                    await stream.aclose()
                    times.append(elapsed * 1000)
                rates[kind].append(settings.setups / (time.perf_counter() - start))
                first[kind].append(statistics.median(times))
        label = "authorize" if authorize else "noauth"
        note = (
            "open_pht_stream to first echoed byte; "
            + ("GET /authorize first (legacy GOST)" if authorize else "self-made token")
            + "; baseline: TCP connect to first echoed byte"
        )
        figures.append(
            Figure(f"setup_{label}", "ms", False, first["pht"], first["tcp"], note=note)
        )
        figures.append(
            Figure(
                f"tunnels_per_second_{label}",
                "1/s",
                True,
                rates["pht"],
                rates["tcp"],
                note="sequential open, first byte, close",
            )
        )
    return figures


async def _open_many(client: Client, kind: str, count: int) -> list[trio.abc.Stream]:
    streams: list[trio.abc.Stream] = []
    limiter = trio.CapacityLimiter(32)

    async def one() -> None:
        async with limiter:
            stream = await client.open(kind, tls=False, authorize=False)
            streams.append(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return streams


async def _close_all(streams: list[trio.abc.Stream]) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.aclose)


async def bench_concurrency(client: Client, settings: Settings) -> list[Figure]:
    figures = []
    for count in settings.concurrency:
        per_tunnel = max(64 * 1024, settings.concurrency_bytes // count // 2)
        throughput: dict[str, list[float]] = {"pht": [], "tcp": []}
        rss: dict[str, list[float]] = {"pht": [], "tcp": []}
        first: dict[str, list[float]] = {"pht": [], "tcp": []}
        for _ in range(settings.runs):
            for kind in ("pht", "tcp"):
                client.start_server()  # a fresh process for each memory figure
                await trio.sleep(0.3)
                before = client.server_rss()
                streams = await _open_many(client, kind, count)
                try:
                    # Each tunnel's handler is running and waiting: the tunnels are idle.
                    await trio.sleep(0.5)
                    rss[kind].append((client.server_rss() - before) / count / 1024)
                    elapsed, extra = await _first_byte(client, kind, False)
                    await extra.aclose()
                    first[kind].append(elapsed * 1000)
                    start = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        for stream in streams:
                            nursery.start_soon(_upload, stream, per_tunnel)
                    async with trio.open_nursery() as nursery:
                        for stream in streams:
                            nursery.start_soon(_download, stream, per_tunnel)
                    elapsed = time.perf_counter() - start
                    throughput[kind].append(2 * per_tunnel * count / elapsed / 1e6)
                finally:
                    await _close_all(streams)
        note = f"{count} tunnels, {per_tunnel // 1024} KiB up then down each"
        figures.append(
            Figure(
                f"concurrency_{count}_throughput",
                "MB/s",
                True,
                throughput["pht"],
                throughput["tcp"],
                note=note,
            )
        )
        figures.append(
            Figure(
                f"concurrency_{count}_idle_rss_per_tunnel",
                "KiB",
                False,
                rss["pht"],
                rss["tcp"],
                note="server RSS growth / tunnels, tunnels open and idle",
            )
        )
        figures.append(
            Figure(
                f"concurrency_{count}_new_tunnel_first_byte",
                "ms",
                False,
                first["pht"],
                first["tcp"],
                note=f"a new tunnel's first echoed byte while {count} others are open",
            )
        )
    return figures


# --- the sans-IO core, no sockets -------------------------------------------------

_ACK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_TOKEN = "bench0000000000000000"


def _core_push_encode(data: bytes, chunk: int) -> float:
    channel = ClientChannel(ClientConfig(host="bench"))
    view = memoryview(data)
    start = time.perf_counter()
    for offset in range(0, len(view), chunk):
        channel.push(_TOKEN, view[offset : offset + chunk])
        channel.receive_data(_ACK)
        channel.next_event()
    return time.perf_counter() - start


def _core_push_decode(data: bytes, chunk: int) -> float:
    channel = ClientChannel(ClientConfig(host="bench"))
    requests = []
    for offset in range(0, len(data), chunk):
        requests.append(b"".join(channel.push(_TOKEN, data[offset : offset + chunk])))
        channel.receive_data(_ACK)
        channel.next_event()
    server = ServerConnection()
    start = time.perf_counter()
    for request in requests:
        # As serve_pht does: ask for an event after every read.
        event: object = NEED_DATA
        for piece in range(0, len(request), APP_READ):
            server.receive_data(request[piece : piece + APP_READ])
            event = server.next_event()
        if not isinstance(event, PushRequest):
            raise RuntimeError(f"unexpected {event}")
        server.send_push_ack()
    return time.perf_counter() - start


def _pull_response(data: bytes, chunk: int) -> tuple[ServerConnection, bytes]:
    server = ServerConnection()
    server.receive_data(f"GET /pull?token={_TOKEN} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    server.next_event()
    head = server.start_pull()
    return server, head


def _core_pull_encode(data: bytes, chunk: int) -> float:
    server, _ = _pull_response(data, chunk)
    view = memoryview(data)
    start = time.perf_counter()
    for offset in range(0, len(view), chunk):
        server.send_pull_data(view[offset : offset + chunk])
    return time.perf_counter() - start


def _core_pull_decode(data: bytes, chunk: int) -> float:
    server, head = _pull_response(data, chunk)
    body = b"".join(
        server.send_pull_data(data[offset : offset + chunk])
        for offset in range(0, len(data), chunk)
    )
    channel = ClientChannel(ClientConfig(host="bench", authorize=False))
    channel.pull(_TOKEN)
    channel.receive_data(head)
    channel.next_event()
    received = 0
    start = time.perf_counter()
    for offset in range(0, len(body), APP_READ):
        channel.receive_data(body[offset : offset + APP_READ])
        while True:
            event = channel.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, DataReceived):
                received += len(event.data)
    elapsed = time.perf_counter() - start
    if received != len(data):
        raise RuntimeError(f"reassembled {received} of {len(data)} bytes")
    return elapsed


def _b64_encode(data: bytes, chunk: int, backend: str) -> float:
    view = memoryview(data)
    start = time.perf_counter()
    if backend == "binascii":
        for offset in range(0, len(view), chunk):
            binascii.b2a_base64(view[offset : offset + chunk], newline=True)
    else:
        import pybase64

        for offset in range(0, len(view), chunk):
            pybase64.b64encode(view[offset : offset + chunk])
    return time.perf_counter() - start


def _b64_decode(data: bytes, chunk: int, backend: str) -> float:
    lines = [
        binascii.b2a_base64(data[offset : offset + chunk], newline=False)
        for offset in range(0, len(data), chunk)
    ]
    # strict_mode (Python 3.11+) is what pht's binascii fallback uses.
    options: dict[str, Any] = {"strict_mode": True} if sys.version_info >= (3, 11) else {}
    a2b: Any = binascii.a2b_base64
    start = time.perf_counter()
    if backend == "binascii":
        for line in lines:
            a2b(line, **options)
    else:
        import pybase64

        for line in lines:
            pybase64.b64decode(line, validate=True)
    return time.perf_counter() - start


def bench_core(settings: Settings) -> list[Figure]:
    data = os.urandom(settings.core_size)
    push_chunk = 1024 * 1024
    pull_chunk = 1024 * 1024
    measured: dict[str, list[float]] = {}
    work: list[tuple[str, Callable[[], float]]] = [
        ("push_encode", partial(_core_push_encode, data, push_chunk)),
        ("push_decode", partial(_core_push_decode, data, push_chunk)),
        ("pull_encode", partial(_core_pull_encode, data, pull_chunk)),
        ("pull_reassembly", partial(_core_pull_decode, data, pull_chunk)),
        ("b64_encode_pybase64", partial(_b64_encode, data, push_chunk, "pybase64")),
        ("b64_decode_pybase64", partial(_b64_decode, data, push_chunk, "pybase64")),
        ("b64_encode_binascii", partial(_b64_encode, data, push_chunk, "binascii")),
        ("b64_decode_binascii", partial(_b64_decode, data, push_chunk, "binascii")),
    ]
    for _ in range(settings.runs):
        for name, run in work:
            measured.setdefault(name, []).append(len(data) / run() / 1e6)
    backend = pht.BASE64_BACKEND
    encode_base = measured[f"b64_encode_{backend}"]
    decode_base = measured[f"b64_decode_{backend}"]
    label = f"bare {backend}"
    return [
        Figure("core_push_encode", "MB/s", True, measured["push_encode"], encode_base, label,
               "ClientChannel.push of 1 MiB + ack parsing"),
        Figure("core_push_decode", "MB/s", True, measured["push_decode"], decode_base, label,
               "ServerConnection: 1 MiB POST fed in 256 KiB reads -> PushRequest"),
        Figure("core_pull_encode", "MB/s", True, measured["pull_encode"], encode_base, label,
               "ServerConnection.send_pull_data of 1 MiB (32 KiB lines, chunked)"),
        Figure("core_pull_reassembly", "MB/s", True, measured["pull_reassembly"], decode_base,
               label, "ClientChannel: chunked pull body fed in 256 KiB reads -> data"),
        Figure("core_b64_encode_pybase64_vs_binascii", "MB/s", True,
               measured["b64_encode_pybase64"], measured["b64_encode_binascii"], "binascii",
               "1 MiB buffers"),
        Figure("core_b64_decode_pybase64_vs_binascii", "MB/s", True,
               measured["b64_decode_pybase64"], measured["b64_decode_binascii"], "binascii",
               "1 MiB lines, validated"),
    ]  # fmt: skip


# --- targets, table, plot ------------------------------------------------------------


def _targets(figures: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    def median(name: str) -> float | None:
        figure = figures.get(name)
        return None if figure is None else float(figure["pht"]["median"])

    checks: list[tuple[str, str, bool | None]] = []

    def check(label: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        checks.append((label, shown if value is not None else "not measured",
                       None if value is None else ok(value)))  # fmt: skip

    up, down = median("upload_plain"), median("download_plain")
    check("bulk upload >= 200 MB/s", up, lambda v: v >= 200, f"{up or 0:.0f} MB/s")
    piped = median("upload_plain_pipelined")
    if piped is not None:
        check(f"bulk upload, push_window={PIPELINED_WINDOW}, >= 200 MB/s", piped,
              lambda v: v >= 200, f"{piped:.0f} MB/s")  # fmt: skip
    check("bulk download >= 300 MB/s", down, lambda v: v >= 300, f"{down or 0:.0f} MB/s")
    for direction, plain in (("upload", up), ("download", down)):
        tls = median(f"{direction}_tls")
        ratio = None if tls is None or not plain else tls / plain
        check(f"TLS {direction} within 30 % of plain", ratio, lambda v: v >= 0.7,
              f"{(ratio or 0) * 100:.0f} % of plain")  # fmt: skip
    rtt = median("rtt_median")
    check("1-byte round trip median <= 250 µs", rtt, lambda v: v <= 250, f"{rtt or 0:.0f} µs")
    largest = max((int(k.split("_")[1]) for k in figures if k.startswith("concurrency_")),
                  default=None)  # fmt: skip
    if largest is not None:
        rss = median(f"concurrency_{largest}_idle_rss_per_tunnel")
        check(f"{largest} idle tunnels <= 64 KiB RSS each", rss, lambda v: v <= 64,
              f"{rss or 0:.1f} KiB")  # fmt: skip
        first = median(f"concurrency_{largest}_new_tunnel_first_byte")
        check(f"first byte with {largest} tunnels open <= 10 ms", first, lambda v: v <= 10,
              f"{first or 0:.2f} ms")  # fmt: skip
    return checks


def _format(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = ", ".join(f"{value:.2f}" for value in machine["load_average_at_end"])
    header = (
        f"{machine['cpu']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"base64: {machine['base64']}, {machine['ssl']}, trio {machine['trio']}, "
        f"h11 {machine['h11']}, load average at end: {load}\n"
    )
    rows = [("figure", "unit", "PHT min / median / max", "baseline median", "PHT/baseline")]
    for name, figure in results["figures"].items():
        stats = figure["pht"]
        base = figure["baseline"]
        ratio = figure["ratio"]
        rows.append(
            (
                name,
                figure["unit"],
                " / ".join(_format(stats[key]) for key in ("min", "median", "max")),
                f"{_format(base['median'])} ({figure['baseline_label']})" if base else "-",
                f"{ratio:.3f}" if ratio is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append("targets:")
    for label, shown, ok in results["targets"]:
        mark = "n/a" if ok is None else ("MET" if ok else "NOT MET")
        lines.append(f"  {mark:8} {label}: {shown}")
    return header + "\n".join(lines)


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Bar charts of throughput and latency against the baseline (needs matplotlib)."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    figures = results["figures"]
    groups = [
        ("throughput (MB/s, log scale)",
         [n for n in ("upload_plain", "upload_plain_pipelined", "upload_tls", "download_plain",
                       "download_tls")
          if n in figures] + [n for n in figures if n.endswith("_throughput")]),
        ("latency (log scale)",
         [n for n in ("rtt_median", "rtt_p99", "setup_authorize", "setup_noauth") if n in figures]
         + [n for n in figures if n.endswith("_first_byte")]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for axis, (title, names) in zip(axes, groups, strict=True):
        positions = range(len(names))
        pht_values = [figures[n]["pht"]["median"] for n in names]
        pht_errors = [
            [figures[n]["pht"]["median"] - figures[n]["pht"]["min"] for n in names],
            [figures[n]["pht"]["max"] - figures[n]["pht"]["median"] for n in names],
        ]
        base_values = [
            figures[n]["baseline"]["median"] if figures[n]["baseline"] else 0 for n in names
        ]
        axis.bar([p - 0.2 for p in positions], pht_values, 0.4, yerr=pht_errors, label="pht")
        axis.bar([p + 0.2 for p in positions], base_values, 0.4, label="baseline (TCP)")
        labels = [f"{n}\n({figures[n]['unit']})" for n in names]
        axis.set_xticks(list(positions), labels, rotation=35, ha="right", fontsize=8)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.legend()
    gost = {"upload_plain": 90.0, "download_plain": 180.0, "rtt_median": 135.0}
    for axis, (_, names) in zip(axes, groups, strict=True):
        for index, name in enumerate(names):
            if name in gost:
                axis.plot([index - 0.4, index + 0.4], [gost[name]] * 2, "k--")
    axes[0].text(0.01, 0.01, "dashed: GOST on this machine (PROTOCOL.md)",
                 transform=axes[0].transAxes, fontsize=8)  # fmt: skip
    fig.suptitle(f"pht {pht.__version__} vs plain TCP, loopback, {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- orchestration -------------------------------------------------------------------

SECTIONS = ("core", "bulk", "latency", "setup", "concurrency")


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "trio": trio.__version__,
        "pht": pht.__version__,
        # The backends pht runs with (the end-to-end benchmark reports the same).
        "base64": pht.BASE64_BACKEND,
        "ssl": ssl.OPENSSL_VERSION,
        "h11": importlib.metadata.version("h11"),
        # Other work on the machine skews every figure: recorded, not hidden.
        "load_average_at_end": list(os.getloadavg()),
    }


async def _client_main(
    client: Client, settings: Settings, sections: Sequence[str]
) -> list[Figure]:
    figures: list[Figure] = []
    steps: dict[str, Callable[[Client, Settings], Awaitable[list[Figure]]]] = {
        "bulk": bench_bulk,
        "latency": bench_latency,
        "setup": bench_setup,
        "concurrency": bench_concurrency,
    }
    for section in sections:
        if section in steps:
            print(f"... {section}", file=sys.stderr, flush=True)
            figures += await steps[section](client, settings)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 runs (smoke test)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only SECTION")
    parser.add_argument("--runs", type=int, help="runs per figure")
    parser.add_argument("--tunnels", help="comma-separated tunnel counts for concurrency")
    parser.add_argument("--output", type=Path, default=_ROOT / "results", help="result folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(_serve)
        return 0
    settings = QUICK if args.quick else FULL
    if args.runs:
        settings = Settings(**{**settings.__dict__, "runs": args.runs})
    if args.tunnels:
        counts = tuple(int(count) for count in args.tunnels.split(","))
        settings = Settings(**{**settings.__dict__, "concurrency": counts})
    sections = args.only or list(SECTIONS)
    # Each PHT tunnel holds two sockets on each side.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))

    figures: list[Figure] = []
    if "core" in sections:
        print("... core", file=sys.stderr, flush=True)
        figures += bench_core(settings)
    for section in sections:
        if section == "core":
            continue
        # A fresh server process per section.
        client = Client()
        client.start_server()
        try:
            figures += trio.run(_client_main, client, settings, [section])
        finally:
            client.stop_server()

    results: dict[str, Any] = {
        "machine": _machine(),
        "mode": "quick" if args.quick else "full",
        "settings": settings.__dict__ | {"concurrency": list(settings.concurrency)},
        "command": " ".join(["benchmarks/run.py", *(argv or sys.argv[1:])]),
        "figures": {figure.name: figure.as_json() for figure in figures},
    }
    results["targets"] = _targets(results["figures"])
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render_table(results))
    if not args.no_plot:
        if write_plot(results, args.output / "results.png"):
            print(f"\nplot: {args.output / 'results.png'}")
        else:
            print("\nplot skipped: matplotlib is not installed")
    print(f"json: {args.output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
