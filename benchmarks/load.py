#!/usr/bin/env python3
"""Load and abuse scenarios against a pht server, watched by a canary tunnel.

Run ``scripts/load.sh`` (or ``.venv/bin/python benchmarks/load.py``); see
docs/load.md. Each scenario starts a fresh server as users run it (the
``pht`` command line, ``forward+pht://`` to a TCP echo target, or
``serve_pht`` in a subprocess where a setting only the library has is
needed), a canary process (one tunnel echoing 1 KiB every 100 ms, plus a
fresh tunnel every 1-2 s), then loads the server from other loopback
addresses and prints what the canary saw, the server's memory and CPU (from
/proc), and what the attacker got. Everything is bounded in count and time,
and talks to loopback only.

Only pht's public API and the ``pht`` command are used, so the suite
measures whatever pht is installed. The same file is the target, the
library server and the canary (``--role``), started as subprocesses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

import pht

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
    "held-pulls",
    "held-pulls-strict",
    "authorize",
    "endless-lines",
    "keepalive",
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SESSION_LINE = re.compile(rb"session \S+ accepted")


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
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 160 else text[:157] + "..."


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


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


# --- raw HTTP for the load (any source address) --------------------------------------------


class Raw:
    """One HTTP/1.1 connection from a chosen loopback address (h11 on a socket)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, source: str, port: int) -> Raw:
        stream = await trio.open_tcp_stream(HOST, port, local_address=source)
        return cls(stream)

    async def send(self, method: str, target: str, body: bytes | None = None) -> None:
        headers = [("Host", f"{HOST}")]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def response(self) -> h11.Response:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("server closed the connection")

    async def body(self) -> bytes:
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return bytes(body)

    async def request(
        self, method: str, target: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """Send a request and read its whole answer; the connection is reusable after."""
        await self.send(method, target, body)
        status = (await self.response()).status_code
        content = await self.body()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        else:
            raise EOFError("connection not reusable")
        return status, content

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def status_key(exc_or_status: int | BaseException) -> str:
    if isinstance(exc_or_status, int):
        return str(exc_or_status)
    if isinstance(exc_or_status, (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError)):
        return "closed"
    if isinstance(exc_or_status, OSError):
        return "connect-error"
    return type(exc_or_status).__name__


# --- the measuring rig ---------------------------------------------------------------------


@dataclass
class Sample:
    time: float
    rss_kib: int
    hwm_kib: int
    cpu_seconds: float
    #: Seconds spent runnable but waiting for a CPU (other jobs on the machine).
    wait_seconds: float


def read_proc(pid: int) -> Sample | None:
    """VmRSS and VmHWM (KiB), CPU seconds, and run-queue wait seconds of a process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
        schedstat = Path(f"/proc/{pid}/schedstat").read_text().split()
    except OSError:
        return None
    wait = int(schedstat[1]) / 1e9 if len(schedstat) > 1 else 0.0
    values = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    fields = stat.rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of /proc/PID/stat (1-based).
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return Sample(time.monotonic(), values.get("VmRSS", 0), values.get("VmHWM", 0), cpu, wait)


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0


@dataclass
class Rig:
    """The processes of one scenario, the phases it went through, and the samples."""

    tmp: Path
    target_port: int = 0
    server_port: int = 0
    server_pid: int = 0
    samples: list[Sample] = field(default_factory=list)
    #: CPU seconds of the suite's own processes (target, canary, this one), sampled alike.
    harness_pids: list[int] = field(default_factory=list)
    harness: list[tuple[float, float]] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    canary: dict[str, Any] = field(default_factory=dict)
    target: dict[str, int] = field(default_factory=dict)
    server_log: Path | None = None
    sessions: int | None = None

    @asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[Phase]:
        current = Phase(name, time.monotonic())
        self.phases.append(current)
        try:
            yield current
        finally:
            current.end = time.monotonic()

    async def hold(self, name: str, seconds: float) -> None:
        async with self.phase(name):
            await trio.sleep(seconds)

    def sample(self) -> Sample:
        sample = read_proc(self.server_pid)
        if sample is None:
            raise RuntimeError("the server process is gone")
        self.samples.append(sample)
        return sample

    async def sampler(self) -> None:
        while True:
            if read_proc(self.server_pid) is None:
                return
            self.sample()
            cpu = 0.0
            for pid in self.harness_pids:
                sample = read_proc(pid)
                cpu += sample.cpu_seconds if sample is not None else 0.0
            self.harness.append((time.monotonic(), cpu))
            await trio.sleep(0.25)

    def count_sessions(self) -> int | None:
        """Sessions the server logged (``session ... accepted``), if its log says so."""
        if self.server_log is None or not self.server_log.exists():
            return None
        return len(_SESSION_LINE.findall(self.server_log.read_bytes()))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pht_command() -> list[str]:
    """The installed ``pht`` command (next to this Python), or ``python -m pht``."""
    beside = Path(sys.executable).with_name("pht")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pht")
    return [found] if found else [sys.executable, "-m", "pht"]


async def wait_listening(port: int, process: trio.Process, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}")
            try:
                stream = await trio.open_tcp_stream(HOST, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("process ended")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def read_all(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while chunk := await stream.receive_some(1 << 20):
        buffer += chunk
    return bytes(buffer)


@asynccontextmanager
async def start_rig(
    size: Size, *, server: str = "cli", strict: bool = False, keepalive: float | None = None
) -> AsyncIterator[Rig]:
    """Target, server and canary up, the canary's baseline taken; all stopped on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="pht-load-"))
    rig = Rig(tmp)
    me = [sys.executable, str(Path(__file__).resolve())]
    target = await trio.lowlevel.open_process(
        [*me, "--role", "target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert target.stdin is not None
    assert target.stdout is not None
    target_buffer = bytearray()
    rig.target_port = json.loads(await read_line(target.stdout, target_buffer))["port"]
    rig.server_port = free_port()
    rig.server_log = tmp / "server.log"
    if server == "cli":
        url = f"forward+pht://{HOST}:{rig.server_port}/{HOST}:{rig.target_port}"
        command = [*pht_command(), "-L", url]
    else:
        command = [*me, "--role", "server", "--port", str(rig.server_port)]
        command += ["--target", str(rig.target_port)]
        if strict:
            command.append("--strict")
        if keepalive is not None:
            command += ["--keepalive-timeout", str(keepalive)]
    with rig.server_log.open("wb") as log_file:
        server_process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=log_file, stderr=log_file
        )
    rig.server_pid = server_process.pid
    canary: trio.Process | None = None
    try:
        await wait_listening(rig.server_port, server_process)
        canary = await trio.lowlevel.open_process(
            [*me, "--role", "canary", "--port", str(rig.server_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert canary.stdout is not None
        canary_buffer = bytearray()
        with trio.fail_after(30):
            await read_line(canary.stdout, canary_buffer)
        rig.harness_pids = [target.pid, canary.pid, os.getpid()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.sampler)
            await rig.hold("baseline", size.baseline)
            yield rig
            await rig.hold("after", size.after)
            rig.sample()
            nursery.cancel_scope.cancel()
        assert canary.stdin is not None
        await canary.stdin.aclose()
        with trio.fail_after(30):
            output = await read_all(canary.stdout, canary_buffer)
        rig.canary = json.loads(output.strip().splitlines()[-1])
    finally:
        for process in (canary, server_process):
            if process is None:
                continue
            if server_process is process and server == "cli":
                process.send_signal(2)  # SIGINT: how a user stops pht
            elif process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        await target.stdin.aclose()
        with trio.move_on_after(10):
            rig.target = json.loads((await read_all(target.stdout, target_buffer)).strip())
        if target.returncode is None:
            target.kill()
        await target.wait()
        rig.sessions = rig.count_sessions()
        shutil.rmtree(tmp, ignore_errors=True)


# --- figures -------------------------------------------------------------------------------


def canary_figures(rig: Rig, start: float, end: float) -> dict[str, float | int | None]:
    """The canary's echoes and the prober's fresh tunnels that started in [start, end)."""
    echoes = [e for e in rig.canary.get("echoes", []) if start <= e[0] < end]
    latencies = [e[1] for e in echoes if e[1] is not None]
    probes = [p for p in rig.canary.get("probes", []) if start <= p[0] < end]
    opened = [p[1] for p in probes if p[1] is not None]
    ok = [value for value in opened if value <= PROBE_OK]
    ms = 1000.0
    return {
        "echoes": len(echoes),
        "echo_errors": len(echoes) - len(latencies),
        "echo_median_ms": statistics.median(latencies) * ms if latencies else None,
        "echo_p99_ms": percentile(latencies, 0.99) * ms if latencies else None,
        "echo_max_ms": max(latencies) * ms if latencies else None,
        "stalls_over_100ms": sum(1 for value in latencies if value > STALL)
        + (len(echoes) - len(latencies)),
        "probes": len(probes),
        "probes_ok_within_1s": len(ok),
        "probe_success": len(ok) / len(probes) if probes else None,
        "probe_median_ms": statistics.median(opened) * ms if opened else None,
    }


def server_figures(rig: Rig, start: float, end: float) -> dict[str, float | None]:
    """The server's CPU and run-queue wait (% of one core's time) and RSS over a phase.

    The suite's own CPU (target, canary, load) is given beside: with both
    figures low during a stall, the server was waiting, not computing; a high
    wait means other jobs on the machine held the CPUs.
    """
    inside = [s for s in rig.samples if start <= s.time <= end]
    before = [s for s in rig.samples if s.time <= start]
    first = before[-1] if before else (inside[0] if inside else None)
    last = inside[-1] if inside else None
    if first is None or last is None or last.time <= first.time:
        return {
            "cpu_pct": None,
            "harness_cpu_pct": None,
            "rss_mib_end": None,
            "rss_mib_peak": None,
        }
    cpu = (last.cpu_seconds - first.cpu_seconds) / (last.time - first.time) * 100
    wait = (last.wait_seconds - first.wait_seconds) / (last.time - first.time) * 100
    harness = [h for h in rig.harness if first.time <= h[0] <= last.time]
    harness_cpu = None
    if len(harness) > 1 and harness[-1][0] > harness[0][0]:
        harness_cpu = (harness[-1][1] - harness[0][1]) / (harness[-1][0] - harness[0][0]) * 100
    return {
        "cpu_pct": cpu,
        "runq_wait_pct": wait,
        "harness_cpu_pct": harness_cpu,
        "rss_mib_end": last.rss_kib / 1024,
        "rss_mib_peak": max(s.rss_kib for s in [first, *inside]) / 1024,
    }


def scenario_result(
    name: str, rig: Rig, settings: dict[str, Any], figures: dict[str, Any]
) -> dict[str, Any]:
    phases = {}
    for phase in rig.phases:
        phases[phase.name] = {
            "seconds": phase.end - phase.start,
            **canary_figures(rig, phase.start, phase.end),
            **server_figures(rig, phase.start, phase.end),
        }
    everything = canary_figures(rig, 0.0, float("inf"))
    baseline = rig.samples[0] if rig.samples else None
    peak = max((s.hwm_kib for s in rig.samples), default=0)
    figures = {
        **figures,
        "canary_echo_p99_ms": everything["echo_p99_ms"],
        "canary_echo_max_ms": everything["echo_max_ms"],
        "canary_stalls_over_100ms": everything["stalls_over_100ms"],
        "fresh_tunnel_success": everything["probe_success"],
        "server_rss_mib_start": baseline.rss_kib / 1024 if baseline else None,
        "server_rss_mib_peak": peak / 1024 if baseline else None,
        "server_rss_growth_mib": (peak - baseline.rss_kib) / 1024 if baseline else None,
        "sessions_logged": rig.sessions,
        "target_accepts": rig.target.get("accepted"),
        "fresh_tunnels_tried": everything["probes"],
    }
    return {"scenario": name, "settings": settings, "figures": figures, "phases": phases}


# --- load generators -----------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float, count: int | None = None) -> None:
        self.end = trio.current_time() + seconds
        self.left = count

    def expired(self) -> bool:
        return trio.current_time() >= self.end or self.left == 0

    def take(self) -> bool:
        if trio.current_time() >= self.end:
            return False
        if self.left is not None:
            if self.left <= 0:
                return False
            self.left -= 1
        return True


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")
#: The junk-push flood stops early after this many 429 answers (sessions full).
LOCKOUT_SHOWN = 1000
#: Requests a flooding connection sends ahead of their answers (pipelined).
PIPELINE = 16


async def flood(
    port: int,
    connections: int,
    deadline: Deadline,
    request: Callable[[], bytes],
    statuses: Counter[str],
    until: Callable[[], bool] = lambda: False,
) -> None:
    """``connections`` kept-alive connections send ``request()`` until the deadline, pipelined.

    Each keeps up to PIPELINE requests unanswered (a stop-and-wait attacker
    would measure its own round trips, not the server), counts the status of
    every answer, and reconnects when the server hangs up.
    """

    async def connection() -> None:
        try:
            stream = await trio.open_tcp_stream(HOST, port, local_address=ATTACKER)
        except OSError:
            statuses["connect-error"] += 1
            await trio.sleep(0.05)
            return
        window = trio.Semaphore(PIPELINE)
        outstanding = 0

        async def read_answers(cancel: trio.CancelScope) -> None:
            nonlocal outstanding
            tail = b""
            try:
                while chunk := await stream.receive_some(65536):
                    data = tail + chunk
                    last = 0
                    for match in _STATUS_LINE.finditer(data):
                        statuses[match.group(1).decode()] += 1
                        outstanding -= 1
                        window.release()
                        last = match.end()
                    tail = data[last:][-32:]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_answers, nursery.cancel_scope)
            try:
                while not until() and deadline.take():
                    await window.acquire()
                    outstanding += 1
                    await stream.send_all(request())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(2.0):
                while outstanding > 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        if outstanding > 0:  # still unanswered 2 s after the last request
            statuses["unanswered"] += outstanding
        await trio.aclose_forcefully(stream)

    async def worker() -> None:
        while not deadline.expired() and not until():
            await connection()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)


def junk_push() -> bytes:
    """A push of 16 bytes under a token nobody was issued."""
    body = pht.encode_line(os.urandom(16))
    return (
        f"POST /push?token={pht.new_token()} HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def authorize_call() -> bytes:
    return f"GET /authorize HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def token_from(body: bytes) -> str:
    text = body.decode("ascii", "replace").strip()
    return text.split("=", 1)[1] if text.startswith("token=") else text


async def open_held_pull(port: int, source: str) -> tuple[Raw, str]:
    """Authorize, then start a pull on the same connection; the pull is left unread."""
    raw = await Raw.connect(source, port)
    try:
        status, body = await raw.request("GET", "/authorize")
        if status != 200:
            raise StatusError(status)
        token = token_from(body)
        await raw.send("GET", f"/pull?token={token}")
        response = await raw.response()
        if response.status_code != 200:
            raise StatusError(response.status_code)
    except BaseException:
        await raw.aclose()
        raise
    return raw, token


class StatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def error_key(exc: BaseException) -> str:
    if isinstance(exc, StatusError):
        return str(exc.status)
    return status_key(exc)


def idle_source(index: int, per_address: int) -> str:
    """127.1.x.y: ``per_address`` idle tunnels per loopback address."""
    number = index // per_address
    return f"127.1.{number // 250}.{number % 250 + 1}"


# --- scenarios -----------------------------------------------------------------------------


async def scenario_idle(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """N idle tunnels (wire-identical to pht's client) opened, held idle, closed all at once."""
    requested = args.tunnels or size.idle_tunnels
    per_tunnel = args.tunnel_connections
    # The server holds per tunnel its connections plus one to the target; the
    # open-file limit (inherited from this process) caps how many fit.
    fit = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256) // (per_tunnel + 1)
    count = min(requested, fit)
    held: list[tuple[Raw, Raw | None, str]] = []
    statuses: Counter[str] = Counter()
    dropped = 0
    async with start_rig(size) as rig:
        before = rig.sample()

        async def drain(raw: Raw) -> None:
            nonlocal dropped
            try:
                while await raw.stream.receive_some(4096):
                    pass
                dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as readers:
            async with rig.phase("open") as opening:
                limiter = trio.CapacityLimiter(size.concurrency)

                async def open_one(index: int) -> None:
                    async with limiter:
                        source = idle_source(index, args.per_address)
                        try:
                            pull, token = await open_held_pull(rig.server_port, source)
                        except (OSError, EOFError, StatusError, h11.ProtocolError) as exc:
                            statuses[error_key(exc)] += 1
                            return
                        push: Raw | None = None
                        try:
                            if per_tunnel == 2:
                                push = await Raw.connect(source, rig.server_port)
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

                with trio.move_on_after(args.open_timeout or size.open_timeout):
                    async with trio.open_nursery() as nursery:
                        for index in range(count):
                            nursery.start_soon(open_one, index)
            open_seconds = opening.end - opening.start
            await trio.sleep(1.0)  # let the server settle before measuring memory
            loaded = rig.sample()
            idle_seconds = args.idle_seconds or size.idle_seconds
            await rig.hold("idle", idle_seconds)
            dropped_idle = dropped
            async with rig.phase("close"):
                close_started = trio.current_time()

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

                with trio.move_on_after(10):
                    async with trio.open_nursery() as nursery:
                        for pull, push, token in held:
                            nursery.start_soon(close_one, pull, push, token)
                for pull, push, _ in held:  # whatever the bound cut short
                    await pull.aclose()
                    if push is not None:
                        await push.aclose()
                close_seconds = trio.current_time() - close_started
                await trio.sleep(2.0)  # the server's work after a mass close shows here
            readers.cancel_scope.cancel()
    opened = len(held)
    idle = next(p for p in rig.phases if p.name == "idle")
    idle_cpu = server_figures(rig, idle.start, idle.end)["cpu_pct"]
    figures = {
        "tunnels_requested": requested,
        "tunnels_fitting_open_files": fit,
        "tunnels_opened": opened,
        "open_statuses": dict(statuses),
        "open_seconds": open_seconds,
        "close_seconds": close_seconds,
        "rss_per_tunnel_kib": (loaded.rss_kib - before.rss_kib) / opened if opened else None,
        "idle_cpu_pct": idle_cpu,
        "dropped_while_idle": dropped_idle,
    }
    for name in ("open", "idle", "close"):
        phase = next(p for p in rig.phases if p.name == name)
        stats = canary_figures(rig, phase.start, phase.end)
        figures[f"{name}_echo_p99_ms"] = stats["echo_p99_ms"]
        figures[f"{name}_stalls_over_100ms"] = stats["stalls_over_100ms"]
    settings = {
        "tunnels": count,
        "connections_per_tunnel": per_tunnel,
        "per_address": args.per_address,
        "idle_seconds": idle_seconds,
    }
    return scenario_result("idle", rig, settings, figures)


async def scenario_junk_push(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """Pushes with random tokens at full speed: each may create a session (and a dial)."""
    count = args.count or size.junk_pushes
    seconds = args.duration or size.flood_seconds
    statuses: Counter[str] = Counter()
    async with start_rig(size) as rig, rig.phase("attack") as attack:
        deadline = Deadline(seconds, count)

        def locked_out() -> bool:
            # The lock-out is shown once new sessions are refused; more adds nothing.
            return statuses["429"] >= LOCKOUT_SHOWN

        await flood(rig.server_port, size.concurrency, deadline, junk_push, statuses, locked_out)
    sent = sum(statuses.values())
    figures = {
        "pushes_sent": sent,
        "push_statuses": dict(statuses),
        "pushes_per_second": sent / (attack.end - attack.start),
        **attack_figures(rig),
    }
    settings = {
        "max_pushes": count,
        "seconds": seconds,
        "connections": size.concurrency,
        "stop_after_429s": LOCKOUT_SHOWN,
    }
    return scenario_result("junk-push", rig, settings, figures)


async def scenario_authorize(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """``/authorize`` calls at full speed: tokens issued and never used."""
    seconds = args.duration or min(size.flood_seconds, 15.0)  # the backlog fills at once
    statuses: Counter[str] = Counter()
    async with start_rig(size) as rig, rig.phase("attack") as attack:
        deadline = Deadline(seconds, args.count or None)
        await flood(rig.server_port, size.concurrency, deadline, authorize_call, statuses)
    calls = sum(statuses.values())
    figures = {
        "authorize_calls": calls,
        "authorize_statuses": dict(statuses),
        "authorize_per_second": calls / (attack.end - attack.start),
        **attack_figures(rig),
    }
    settings = {"seconds": seconds, "connections": size.concurrency}
    return scenario_result("authorize", rig, settings, figures)


def attack_figures(rig: Rig) -> dict[str, Any]:
    """What the canary saw during the attack and after it, and the target's dials."""
    figures: dict[str, Any] = {}
    for phase in rig.phases:
        if phase.name in ("baseline",):
            continue
        stats = canary_figures(rig, phase.start, phase.end)
        figures[f"{phase.name}_echo_p99_ms"] = stats["echo_p99_ms"]
        figures[f"{phase.name}_stalls_over_100ms"] = stats["stalls_over_100ms"]
        figures[f"{phase.name}_fresh_tunnel_success"] = stats["probe_success"]
        figures[f"{phase.name}_fresh_tunnel_median_ms"] = stats["probe_median_ms"]
    accepted = rig.target.get("accepted")
    opened = rig.canary.get("opened")
    if accepted is not None and opened is not None:
        # Every tunnel the canary and the prober opened dials the target once.
        figures["target_dials_not_by_canary"] = max(0, accepted - opened)
    return figures


async def scenario_held_pulls(
    size: Size, args: argparse.Namespace, strict: bool
) -> dict[str, Any]:
    """Authorize, then hold pulls open without reading; then release them all at once."""
    count = args.count or size.held_pulls
    held: list[Raw] = []
    statuses: Counter[str] = Counter()
    server = "library" if strict else "cli"
    async with start_rig(size, server=server, strict=strict) as rig:
        async with rig.phase("open") as opening:
            limiter = trio.CapacityLimiter(size.concurrency)

            async def open_one() -> None:
                async with limiter:
                    try:
                        raw, _ = await open_held_pull(rig.server_port, ATTACKER)
                    except (OSError, EOFError, StatusError, h11.ProtocolError) as exc:
                        statuses[error_key(exc)] += 1
                        return
                    statuses["200"] += 1
                    held.append(raw)

            with trio.move_on_after(args.open_timeout or size.open_timeout):
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(open_one)
        await rig.hold("hold", args.hold_seconds or size.hold_seconds)
        async with rig.phase("release") as release:
            for raw in held:
                await raw.aclose()
            await trio.sleep(2.0)
    name = "held-pulls-strict" if strict else "held-pulls"
    figures = {
        "pulls_held": len(held),
        "open_statuses": dict(statuses),
        "open_seconds": opening.end - opening.start,
        "release_echo_max_ms": canary_figures(rig, release.start, release.end)["echo_max_ms"],
        **attack_figures(rig),
    }
    settings = {"pulls": count, "server": server, "strict": strict}
    return scenario_result(name, rig, settings, figures)


async def scenario_endless_lines(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """M connections each sending one push line that never ends, slowly."""
    count = args.count or size.endless_connections
    per_connection = args.line_bytes or size.endless_bytes
    piece = b"2000\r\n" + b"A" * 0x2000 + b"\r\n"  # one 8 KiB chunk of base64 text
    pace = 0.05
    cap_kib = args.rss_cap * 1024
    statuses: Counter[str] = Counter()
    sent: list[int] = []
    capped = False
    stop = trio.Event()
    streams: list[trio.SocketStream] = []
    async with start_rig(size) as rig:
        base = rig.sample()

        async def watch_memory() -> None:
            nonlocal capped
            while not stop.is_set():
                if rig.sample().rss_kib - base.rss_kib > cap_kib:
                    capped = True
                    stop.set()
                await trio.sleep(0.25)

        async def answer(stream: trio.SocketStream) -> None:
            data = b""
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk[: 64 - len(data)] if len(data) < 64 else b""
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
            statuses[match.group(1).decode() if match else "none"] += 1

        async def one(index: int, readers: trio.Nursery, started: trio.Event) -> None:
            try:
                stream = await trio.open_tcp_stream(HOST, rig.server_port, local_address=ATTACKER)
            except OSError:
                statuses["connect-error"] += 1
                return
            streams.append(stream)
            readers.start_soon(answer, stream)
            # Chunked: a body with no declared end, so no length check can refuse it upfront.
            head = (
                f"POST /push?token={pht.new_token()} HTTP/1.1\r\nHost: {HOST}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            total = 0
            try:
                await stream.send_all(head)
                await started.wait()
                while total < per_connection and not stop.is_set():
                    await stream.send_all(piece)
                    total += 0x2000
                    await trio.sleep(pace)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            sent.append(total)

        async with trio.open_nursery() as readers:
            async with rig.phase("attack"):
                started = trio.Event()
                with trio.move_on_after(args.open_timeout or size.open_timeout):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch_memory)
                        async with trio.open_nursery() as senders:
                            for index in range(count):
                                senders.start_soon(one, index, readers, started)
                            await trio.sleep(0.5)  # connections opened, heads sent
                            started.set()
                        stop.set()
            await trio.sleep(1.0)
            loaded = rig.sample()
            async with rig.phase("release"):
                for stream in streams:
                    await trio.aclose_forcefully(stream)
                await trio.sleep(2.0)
            released = rig.sample()
            readers.cancel_scope.cancel()
    attack = next(p for p in rig.phases if p.name == "attack")
    peak = max((s.rss_kib for s in rig.samples if s.time <= attack.end + 1.5), default=0)
    figures = {
        "connections": len(streams),
        "mib_sent": sum(sent) / (1 << 20),
        "kib_sent_per_connection": sum(sent) / max(1, len(sent)) / 1024,
        "stopped_at_rss_cap": capped,
        "line_rss_growth_mib": (peak - base.rss_kib) / 1024,
        "rss_mib_while_held": loaded.rss_kib / 1024,
        "rss_mib_after_release": released.rss_kib / 1024,
        "answers": dict(statuses),
        **attack_figures(rig),
    }
    settings = {
        "connections": count,
        "bytes_per_connection": per_connection,
        "rss_cap_mib": args.rss_cap,
    }
    return scenario_result("endless-lines", rig, settings, figures)


async def echo_after_idle(stream: trio.abc.Stream, idle: float) -> str | None:
    """Echo, stay idle for ``idle`` seconds, echo again: None if both worked, else why not."""
    payload = os.urandom(ECHO_SIZE)
    try:
        with trio.fail_after(ECHO_TIMEOUT):
            await stream.send_all(payload)
            await receive_exactly(stream, ECHO_SIZE)
    except Exception as exc:
        return "first echo: " + describe(exc)
    await trio.sleep(idle)
    try:
        with trio.fail_after(ECHO_TIMEOUT):
            await stream.send_all(payload)
            if await receive_exactly(stream, ECHO_SIZE) != payload:
                return "echo corrupted"
    except Exception as exc:
        return describe(exc)
    return None


async def scenario_keepalive(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """A tunnel idle past the server's keep-alive timeout, then an echo (library and CLI)."""
    keepalive = args.keepalive_timeout or size.keepalive_timeout
    idle = args.idle_seconds or keepalive + 2.0
    outcome: dict[str, str | None] = {}
    async with start_rig(size, server="library", keepalive=keepalive) as rig:

        async def library() -> None:
            try:
                stream = await pht.open_pht_stream(HOST, rig.server_port)
            except Exception as exc:
                outcome["library"] = "open: " + describe(exc)
                return
            try:
                outcome["library"] = await echo_after_idle(stream, idle)
            finally:
                await trio.aclose_forcefully(stream)

        async def command_line() -> None:
            local = free_port()
            route = f"forward+pht://{HOST}:{rig.server_port}"
            command = [*pht_command(), "-L", f"tcp://{HOST}:{local}/{HOST}:{rig.target_port}"]
            client = await trio.lowlevel.open_process(
                [*command, "-F", route],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                await wait_listening(local, client)
                stream = await trio.open_tcp_stream(HOST, local)
                try:
                    outcome["cli"] = await echo_after_idle(stream, idle)
                finally:
                    await trio.aclose_forcefully(stream)
            except Exception as exc:
                outcome["cli"] = describe(exc)
            finally:
                client.send_signal(2)
                with trio.move_on_after(10):
                    await client.wait()
                if client.returncode is None:
                    client.kill()
                    await client.wait()

        async with rig.phase("idle"), trio.open_nursery() as nursery:
            nursery.start_soon(library)
            nursery.start_soon(command_line)
    figures = {
        "library_echo_after_idle": int(outcome.get("library", "missing") is None),
        "cli_echo_after_idle": int(outcome.get("cli", "missing") is None),
        "library_error": outcome.get("library"),
        "cli_error": outcome.get("cli"),
    }
    settings = {"server": "library", "keepalive_timeout": keepalive, "idle_seconds": idle}
    return scenario_result("keepalive", rig, settings, figures)


RUNNERS: dict[str, Callable[[Size, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "idle": scenario_idle,
    "junk-push": scenario_junk_push,
    "held-pulls": lambda size, args: scenario_held_pulls(size, args, strict=False),
    "held-pulls-strict": lambda size, args: scenario_held_pulls(size, args, strict=True),
    "authorize": scenario_authorize,
    "endless-lines": scenario_endless_lines,
    "keepalive": scenario_keepalive,
}


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
    parser.add_argument("--role", choices=("target", "server", "canary"), help=argparse.SUPPRESS)
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
        trio.run(run_library_server, args)
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
