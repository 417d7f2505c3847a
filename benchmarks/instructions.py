#!/usr/bin/env python3
"""CPU instructions per operation, counted by valgrind: a figure that load cannot move.

Timings on a shared 2-core machine move by 15 % between runs, which hides
the 5 % a change may cost. Instructions do not: ``valgrind --tool=callgrind``
counts what the process executes (user space only, not the kernel), and the
count of a run is the same whatever else the machine is doing. This script
runs a tunnel's client and server in one trio process under callgrind and
reports instructions per 1-byte round trip and per MiB each way, with the
same workloads over plain trio TCP in the same run as the baseline.

Each workload runs twice, with N and 2N operations; the difference divided by
N is the cost of one operation, without start-up and imports. Compare two
trees by running this script in each (``--json`` for the figures): it
measures the ``pht`` it imports.

Needs valgrind (Debian: ``apt-get install valgrind``). Slow: about a minute
per workload and path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

#: workload -> (operations per unit of N, unit label)
WORKLOADS = {"rtt": "round trip", "upload": "MiB", "download": "MiB"}
PATHS = ("tcp", "pht")
_TOTAL = re.compile(r"^summary:\s+(\d+)", re.MULTILINE)
_ROOT = Path(__file__).resolve().parent


def _inner(workload: str, path: str, count: int) -> None:
    """Run ``count`` operations of ``workload`` over ``path``, client and server here."""
    import trio

    import pht

    block = b"x" * 65536

    async def handler(stream: trio.abc.Stream) -> None:
        if workload == "download":
            for _ in range(count * 16):
                await stream.send_all(block)
        else:
            while data := await stream.receive_some(65536):
                if workload == "rtt":
                    await stream.send_all(data)
        await trio.aclose_forcefully(stream)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if path == "pht":
                listeners = await nursery.start(
                    lambda task_status: pht.serve_pht(
                        handler, 0, host="127.0.0.1", task_status=task_status
                    )
                )
                port = listeners[0].socket.getsockname()[1]
                stream: trio.abc.Stream = await pht.open_pht_stream("127.0.0.1", port)
            else:
                listeners = await nursery.start(
                    lambda task_status: trio.serve_tcp(
                        handler, 0, host="127.0.0.1", task_status=task_status
                    )
                )
                port = listeners[0].socket.getsockname()[1]
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            if workload == "rtt":
                for _ in range(count):
                    await stream.send_all(b"x")
                    await stream.receive_some(1)
            elif workload == "upload":
                for _ in range(count * 16):
                    await stream.send_all(block)
            else:
                left = count * 16 * len(block)
                while left:
                    left -= len(await stream.receive_some(65536))
            await stream.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)


def count_instructions(workload: str, path: str, count: int) -> int:
    """Instructions of one whole process that runs ``count`` operations."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(Path(__file__).resolve()),
                "--inner",
                workload,
                path,
                str(count),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        match = _TOTAL.search(Path(out).read_text(errors="replace"))
        if match is None:
            raise RuntimeError("callgrind wrote no summary")
        return int(match.group(1))


def per_operation(workload: str, path: str, count: int) -> float:
    """Instructions per operation: (I(2N) - I(N)) / N."""
    return (
        count_instructions(workload, path, 2 * count) - count_instructions(workload, path, count)
    ) / count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", default="rtt,upload,download", help="comma-separated: rtt, upload, download"
    )
    parser.add_argument("--round-trips", type=int, default=500, help="N of rtt (default 500)")
    parser.add_argument("--mib", type=int, default=8, help="N of upload/download (default 8)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        workload, path, count = args.inner
        _inner(workload, path, int(count))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    workloads = [name for name in args.workloads.split(",") if name]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    results: dict[str, dict[str, float]] = {}
    print(f"{'workload':<10}{'unit':>12}{'tcp':>14}{'pht':>14}{'pht/tcp':>10}")
    for workload in workloads:
        # An upload/download unit is 16 writes of 64 KiB: 1 MiB.
        count = args.round_trips if workload == "rtt" else args.mib
        figures = {path: per_operation(workload, path, count) for path in PATHS}
        results[workload] = figures
        print(
            f"{workload:<10}{WORKLOADS[workload]:>12}{figures['tcp']:>14,.0f}"
            f"{figures['pht']:>14,.0f}{figures['pht'] / figures['tcp']:>10.2f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
