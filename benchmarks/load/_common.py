"""Constants, sizes and small helpers shared by the load suite."""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

#: The repository: the suite's own processes run ``python -m benchmarks.load`` from here.
ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
#: The canary and the fresh-tunnel prober connect from HOST; load comes from
#: other loopback addresses, so per-address budgets can be seen to work.
ATTACKER = "127.0.0.2"
ECHO_SIZE = 1024
CANARY_INTERVAL = 0.100
#: An echo slower than this is a stall.
STALL = 0.100
#: A fresh tunnel must open and echo within this to count as a success.
PROBE_OK = 1.0
PROBE_TIMEOUT = 5.0
ECHO_TIMEOUT = 10.0
#: Open-file limit the suite asks for (the server, target and canary inherit it).
NOFILE = 65536
SCENARIOS = (
    "idle",
    "junk-push",
    "junk-push-strict",
    "held-pulls",
    "held-pulls-strict",
    "authorize",
    "authorize-strict",
    "endless-lines",
    "keepalive",
)
#: Servers the idle scenario can run with an in-process echo handler (no target socket).
ECHO_SERVERS = ("trio", "asyncio", "uvloop")
#: A client process of the idle scenario opens at most this many connections.
CONNECTIONS_PER_CLIENT = 6000
CLK_TCK = os.sysconf("SC_CLK_TCK")
SESSION_LINE = re.compile(rb"session \S+ accepted")


# --- sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """How big each scenario is: counts, and seconds per phase."""

    baseline: float  # canary alone before the load
    after: float  # canary after the load stopped
    idle_tunnels: int
    idle_seconds: float
    flood_seconds: float
    junk_pushes: int
    held_pulls: int
    hold_seconds: float
    endless_connections: int
    endless_bytes: int  # per connection
    keepalive_timeout: float
    concurrency: int  # attacker connections / tunnels opened at once
    open_timeout: float  # bound on any phase that opens or sends (the whole run stays bounded)


SIZES = {
    "quick": Size(1.0, 1.0, 200, 2.0, 2.0, 2_000, 200, 2.0, 50, 256 * 1024, 1.0, 16, 30.0),
    "medium": Size(3.0, 3.0, 2_000, 10.0, 8.0, 10_000, 2_000, 5.0, 300, 1 << 20, 3.0, 32, 60.0),
    "full": Size(
        5.0, 5.0, 10_000, 20.0, 45.0, 20_000, 10_000, 10.0, 1_000, 1 << 20, 5.0, 64, 60.0
    ),
}


# --- small helpers -------------------------------------------------------------------------


def raise_nofile(wanted: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE (the hard limit too, where allowed); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    """``size`` bytes from ``stream``; EOFError if it ends first."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def wait_stdin_eof() -> None:
    """Return when the parent closes our stdin (how it stops a role process)."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    try:
        while await stdin.receive_some(4096):
            pass
    finally:
        await stdin.aclose()


def describe(exc: BaseException) -> str:
    """An exception in one short line, for the tables."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 160 else text[:157] + "..."


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
