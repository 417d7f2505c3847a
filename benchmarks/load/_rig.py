"""The processes of one scenario, their phases, samples from /proc, and the figures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._common import (
    CLK_TCK,
    ECHO_SERVERS,
    HOST,
    PROBE_OK,
    ROOT,
    SESSION_LINE,
    STALL,
    Size,
    percentile,
)

# --- the measuring rig ---------------------------------------------------------------------


@dataclass
class Sample:
    """One reading of a process's /proc files."""

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
    """A named stretch of a scenario, in ``time.monotonic()`` seconds (shared by processes)."""

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
    harness_cpu: dict[int, float] = field(default_factory=dict)
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
            for pid in self.harness_pids:
                sample = read_proc(pid)
                if sample is not None:  # an exited process keeps its last reading
                    self.harness_cpu[pid] = sample.cpu_seconds
            self.harness.append((time.monotonic(), sum(self.harness_cpu.values())))
            await trio.sleep(0.25)

    def count_sessions(self) -> int | None:
        """Sessions the server logged (``session ... accepted``), if its log says so."""
        if self.server_log is None or not self.server_log.exists():
            return None
        return len(SESSION_LINE.findall(self.server_log.read_bytes()))


def free_port() -> int:
    """A port free on HOST now (for a server that must be told its port)."""
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
    """Return once ``port`` accepts connections; fail if ``process`` exits first."""
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
    """One line of a role process's output (``buffer`` keeps what came after it)."""
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
    size: Size,
    *,
    server: str = "cli",
    strict: bool = False,
    keepalive: float | None = None,
    max_sessions: int | None = None,
    server_gc: str = "default",
) -> AsyncIterator[Rig]:
    """Target, server and canary up, the canary's baseline taken; all stopped on exit.

    ``server``: ``cli`` (``pht -L forward+pht://...`` to the target),
    ``library`` (``serve_pht`` with the forward handler), or ``trio``,
    ``asyncio``, ``uvloop``: ``serve_pht`` or ``pht.asyncio.start_pht_server``
    (on asyncio's loop or uvloop) with an in-process echo handler.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pht-load-"))
    rig = Rig(tmp)
    me = [sys.executable, "-m", "benchmarks.load"]
    target = await trio.lowlevel.open_process(
        [*me, "--role", "target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
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
        if server in ECHO_SERVERS:
            command += ["--server", server, "--echo", "--server-gc", server_gc]
        if max_sessions is not None:
            command += ["--max-sessions", str(max_sessions)]
        if strict:
            command.append("--strict")
        if keepalive is not None:
            command += ["--keepalive-timeout", str(keepalive)]
    with rig.server_log.open("wb") as log_file:
        server_process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=log_file, stderr=log_file, cwd=ROOT
        )
    rig.server_pid = server_process.pid
    canary: trio.Process | None = None
    try:
        await wait_listening(rig.server_port, server_process)
        canary = await trio.lowlevel.open_process(
            [*me, "--role", "canary", "--port", str(rig.server_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert canary.stdout is not None
        canary_buffer = bytearray()
        with trio.fail_after(30):
            await read_line(canary.stdout, canary_buffer)
        rig.harness_pids = [target.pid, canary.pid, os.getpid()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.sampler)
            await rig.hold("baseline", size.baseline)
            try:
                yield rig
            except BaseException:
                # A server that died (or hung) is a finding: show the end of its log.
                log_tail = rig.server_log.read_bytes()[-4000:].decode(errors="replace")
                print(f"server log (end):\n{log_tail}", file=sys.stderr, flush=True)
                raise
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
        keys = ("cpu_pct", "runq_wait_pct", "harness_cpu_pct", "rss_mib_end", "rss_mib_peak")
        return dict.fromkeys(keys)
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
    """A scenario's own figures, the canary's and the server's over the whole run, per phase."""
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
