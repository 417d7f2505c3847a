"""Load and abuse scenarios against a pht server, watched by a canary tunnel.

Run ``scripts/load.sh`` (or ``.venv/bin/python -m benchmarks.load`` from the
repository's root); see docs/load.md. Each scenario starts a fresh server as
users run it (the ``pht`` command line, ``forward+pht://`` to a TCP echo
target, or ``serve_pht`` in a subprocess where a setting only the library
has is needed), a canary process (one tunnel echoing 1 KiB every 100 ms, plus a
fresh tunnel every 1-2 s), then loads the server from other loopback
addresses and prints what the canary saw, the server's memory and CPU (from
/proc), and what the attacker got. Everything is bounded in count and time,
and talks to loopback only.

Only pht's public API and the ``pht`` command are used, so the suite
measures whatever pht is installed. The same command is also the target,
the library server and the canary (``--role``), started as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import pht

from ._common import CONNECTIONS_PER_CLIENT, ECHO_SERVERS, SCENARIOS, SIZES, raise_nofile
from ._roles import run_asyncio_server, run_canary, run_library_server, run_target, run_tunnels
from ._scenarios import RUNNERS

# --- output --------------------------------------------------------------------------------


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in sorted(value.items()))
    return str(value)


def table(result: dict[str, Any]) -> str:
    lines = [f"== {result['scenario']}  ({show(result['settings'])})"]
    width = max(len(name) for name in result["figures"])
    for name, value in result["figures"].items():
        lines.append(f"  {name:<{width}}  {show(value)}")
    columns = [
        ("phase", None, 9),
        ("secs", "seconds", 6),
        ("echoes", "echoes", 7),
        ("med ms", "echo_median_ms", 7),
        ("p99 ms", "echo_p99_ms", 8),
        ("max ms", "echo_max_ms", 8),
        ("stalls", "stalls_over_100ms", 7),
        ("probes", "probes", 7),
        ("ok<1s", "probe_success", 6),
        ("cpu %", "cpu_pct", 6),
        ("wait %", "runq_wait_pct", 6),
        ("load %", "harness_cpu_pct", 6),
        ("rss MiB", "rss_mib_end", 8),
    ]
    lines.append("  " + " ".join(f"{title:>{w}}" for title, _, w in columns))
    for name, phase in result["phases"].items():
        cells = [f"{name:>9}"]
        cells += [f"{show(phase[key]):>{w}}" for _, key, w in columns[1:] if key]
        lines.append("  " + " ".join(cells))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run this scenario (repeatable; default: all)",
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="size",
        help="every scenario tiny (seconds): a smoke test",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tunnels", type=int, help="idle: how many tunnels")
    parser.add_argument(
        "--count",
        type=int,
        help="junk pushes, held pulls, authorize calls or endless lines",
    )
    parser.add_argument("--duration", type=float, help="seconds of flooding (junk, authorize)")
    parser.add_argument("--idle-seconds", type=float, help="idle and keepalive: seconds idle")
    parser.add_argument("--hold-seconds", type=float, help="held pulls: seconds held")
    parser.add_argument(
        "--per-address", type=int, default=100, help="idle: tunnels per source address (127.1.x.y)"
    )
    parser.add_argument(
        "--open-timeout",
        type=float,
        help="bound on any opening or sending phase, seconds",
    )
    parser.add_argument(
        "--tunnel-connections",
        type=int,
        choices=(1, 2),
        default=2,
        help="idle: connections per tunnel: 2 as pht's client (pull and push), "
        "1 as GOST's (its pool reuses one connection until a write)",
    )
    parser.add_argument(
        "--server",
        choices=("cli", *ECHO_SERVERS),
        help="idle: the server: the pht command line (forward to a TCP echo target), or "
        "serve_pht (trio) / start_pht_server (asyncio, uvloop) with an in-process echo "
        "(default: uvloop, the command line's server, where installed)",
    )
    parser.add_argument(
        "--server-gc",
        choices=("default", "tuned"),
        default="default",
        help="idle (trio, asyncio, uvloop): the server's garbage collector as Python sets it, "
        "or tuned for many tunnels (gc.freeze() after start-up, a high third threshold)",
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        help="idle: processes opening the tunnels (default: one per "
        f"{CONNECTIONS_PER_CLIENT:,} connections)",
    )
    parser.add_argument("--line-bytes", type=int, help="endless lines: bytes per connection")
    parser.add_argument(
        "--rss-cap",
        type=int,
        default=2048,
        help="endless lines: stop sending once the server grew by this many MiB",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        help="keepalive: the server's keep-alive timeout, seconds",
    )
    # The processes the suite starts: the target, the library server, the canary.
    parser.add_argument(
        "--role", choices=("target", "server", "canary", "tunnels"), help=argparse.SUPPRESS
    )
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-sessions", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--addresses", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--strict", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def run_scenarios(args: argparse.Namespace) -> list[dict[str, Any]]:
    size = SIZES[args.size]
    results = []
    for name in args.scenario or SCENARIOS:
        started = time.monotonic()
        result = await RUNNERS[name](size, args)
        result["wall_seconds"] = time.monotonic() - started
        print(table(result), flush=True)
        print(flush=True)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    if args.role == "target":
        trio.run(run_target)
        return 0
    if args.role == "server":
        if args.server in ("asyncio", "uvloop"):
            run_asyncio_server(args)
        else:
            trio.run(run_library_server, args)
        return 0
    if args.role == "tunnels":
        trio.run(run_tunnels, args)
        return 0
    if args.role == "canary":
        trio.run(run_canary, args)
        return 0
    print(f"pht {pht.__version__}, size {args.size}, open files {nofile}", flush=True)
    results = trio.run(run_scenarios, args)
    if args.json:
        report = {
            "settings": {"size": args.size, "nofile": nofile, **vars(SIZES[args.size])},
            "machine": {
                "python": sys.version.split()[0],
                "cpus": os.cpu_count(),
                "pht": pht.__version__,
            },
            "scenarios": {result["scenario"]: result for result in results},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
