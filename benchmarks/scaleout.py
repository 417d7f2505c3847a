#!/usr/bin/env python3
"""Does throughput grow with pht server processes behind nginx?

Starts N ``pht`` server processes (``tests/middlebox/pid_echo_server.py``)
behind one nginx that routes by token (the scaled-out recipe of
``docs/deployment.md``, rendered by the same code the tests use), then runs
client processes that each keep several tunnels busy echoing data, and
reports the aggregate echo throughput for each N. Needs nginx
(``scripts/setup.sh --system``).

    .venv/bin/python benchmarks/scaleout.py [--processes 1 2] [--runs 3]

This is a measurement, not a test: the figures depend on the machine (on a
2-vCPU machine, clients, nginx and servers share the same two CPUs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import pht

_ROOT = Path(__file__).resolve().parent.parent


def _load_harness() -> Any:
    """The middlebox tests' process helpers (tests/ is not an installed package)."""
    sys.path.insert(0, str(_ROOT / "tests"))
    return importlib.import_module("middlebox.harness")


harness = _load_harness()

PIECE = 256 * 1024
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its children that still run (from /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


# --- one client process -------------------------------------------------------------


async def _tunnel(port: int, size: int, done: list[int]) -> None:
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False)
    async with stream:
        line = b""
        while not line.endswith(b"\n"):  # the server's pid line
            line += await stream.receive_some(1)
        payload = bytes(PIECE)

        async def send() -> None:
            for _ in range(size // PIECE):
                await stream.send_all(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            received = 0
            while received < size // PIECE * PIECE:
                data = await stream.receive_some()
                if not data:
                    raise RuntimeError("tunnel ended early")
                received += len(data)
    done.append(received)


async def _client(port: int, sessions: int, size: int) -> None:
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(_tunnel, port, size, done)
    print(sum(done), flush=True)


# --- the driver ----------------------------------------------------------------------


def _measure(port: int, clients: int, sessions: int, size: int) -> float:
    """Run the client processes at once; return echoed MB/s (one direction counted)."""
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", str(port), str(sessions), str(size)],
            stdout=subprocess.PIPE,
        )
        for _ in range(clients)
    ]
    total = 0
    for process in processes:
        out, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"client process failed with {process.returncode}")
        total += int(out.split()[-1])
    elapsed = time.perf_counter() - start
    return total / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--sessions", type=int, default=8, help="tunnels per client process")
    parser.add_argument("--mib", type=int, default=16, help="MiB echoed per tunnel")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--work",
        type=int,
        default=0,
        help="SHA-256 passes the server handler makes over each echoed chunk (CPU-bound handlers)",
    )
    parser.add_argument("--client", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        trio.run(_client, *args.client)
        return
    if harness.find_program("nginx") is None:
        sys.exit("nginx is not installed (scripts/setup.sh --system)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="pht-scaleout-") as scratch:
        for count in args.processes:
            servers = [
                harness.start_pid_echo_server(Path(scratch), work=args.work) for _ in range(count)
            ]
            try:
                port = harness.free_port()
                backends = [f"127.0.0.1:{server.port}" for server in servers]
                site = harness.render_nginx_scaled(f"127.0.0.1:{port}", backends)
                nginx = harness.start_nginx(Path(scratch) / f"nginx-{count}", site, port)
                try:
                    _measure(port, 1, 2, 1024 * 1024)  # warm up
                    pids = [server.process.pid for server in servers]
                    before = [_cpu_seconds(pid) for pid in [nginx.process.pid, *pids]]
                    clients_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    started = time.perf_counter()
                    runs = [
                        _measure(port, args.clients, args.sessions, args.mib * 1024 * 1024)
                        for _ in range(args.runs)
                    ]
                    wall = time.perf_counter() - started
                    after = [_cpu_seconds(pid) for pid in [nginx.process.pid, *pids]]
                    clients_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                finally:
                    nginx.stop()
            finally:
                for server in servers:
                    server.stop()
            results[count] = runs
            busy = [(b - a) / wall for a, b in zip(before, after, strict=True)]
            clients_busy = (
                clients_after.ru_utime
                + clients_after.ru_stime
                - clients_before.ru_utime
                - clients_before.ru_stime
            ) / wall
            print(
                f"{count} server process(es): median {statistics.median(runs):7.1f} MB/s "
                f"echoed (runs: {', '.join(f'{run:.1f}' for run in runs)}); CPUs busy: "
                f"nginx {busy[0]:.2f}, servers {sum(busy[1:]):.2f}, clients {clients_busy:.2f}",
                flush=True,
            )
    print(
        json.dumps(
            {
                "clients": args.clients,
                "sessions": args.sessions,
                "work": args.work,
                "mb_s": results,
            }
        )
    )


if __name__ == "__main__":
    main()
