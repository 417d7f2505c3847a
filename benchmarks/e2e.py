#!/usr/bin/env python3
"""End-to-end benchmark of the deployed shape: two ``pht`` processes and TCP programs.

Users do not call the library in one process; they run a client that listens
on a local port and a server that forwards to a target::

    pht -L pht://127.0.0.1:S/127.0.0.1:T                           # server
    pht -L tcp://127.0.0.1:P/127.0.0.1:T -F forward+pht://127.0.0.1:S  # client

This script starts exactly that (and the same with ``phts``), a target
process (``e2e.py --target``: a TCP sink, source or echo, chosen by a 9-byte
header) and drives it from this process with blocking sockets, through the
client's port and, as the baseline, straight to the target (raw TCP). Per run
and per path (raw, pht, phts, in a rotating order): upload and download MB/s, 1-byte
round trip median and p99, tunnel setup (connect to the first echoed byte),
and CPU seconds of both tunnel processes per GiB moved, from
``/proc/PID/stat``. Figures are medians over ``--runs`` runs with min and
max, next to raw TCP and to GOST's figures (``GOST_REFERENCE``).

``--base64 binascii`` starts the tunnel processes with pybase64 hidden, as a
``pip install`` without it would run; ``--profile`` adds ``py-spy record``
profiles of both tunnel processes during an upload, a download and a
round-trip run (and ``perf record``'s split by binary when perf is installed);
``--push-window N`` adds ``?pushWindow=N`` to the pht client nodes;
``--gost PATH`` also measures GOST's own pairs (pht and phts) and pht with a
GOST server or client, in the same runs, and then compares with those
instead of ``GOST_REFERENCE``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
_ROOT = Path(__file__).resolve().parent
_HEADER = struct.Struct("!cQ")  # command, size (the same framing as run.py)
#: Bytes per write and per read of the driver and the target.
BLOCK = 256 * 1024
#: Every socket operation gives up after this long: a stuck tunnel fails the run.
TIMEOUT = 60.0


@dataclass(frozen=True)
class Pair:
    """A tunnel: which program is the client, which the server, over which scheme."""

    client: str  # "pht" or "gost"
    server: str
    scheme: str  # "pht" or "phts"


#: The tunnels measured in every run (raw TCP is measured too, as "raw").
PHT_PAIRS = {"pht": Pair("pht", "pht", "pht"), "phts": Pair("pht", "pht", "phts")}
#: With ``--gost PATH``: GOST's pairs and the mixed ones, in the same runs.
GOST_PAIRS = {
    "gost": Pair("gost", "gost", "pht"),
    "gosts": Pair("gost", "gost", "phts"),
    "pht-to-gost": Pair("pht", "gost", "pht"),
    "gost-to-pht": Pair("gost", "pht", "pht"),
}
GIB = 2**30

#: GOST's own PHT code (a reference build of its PHT client and server), measured
#: end to end on this kind of machine (2 vCPUs) with the same workloads: 64 MiB
#: each way, 1-byte echo, medians of 3 runs. The phts MB/s are approximate (half
#: of the "2x GOST's phts" targets). ``None``: not measured.
GOST_REFERENCE: dict[str, dict[str, float | None]] = {
    "pht": {
        "upload": 102.0,
        "download": 197.0,
        "rtt_median": 110.0,
        "rtt_p99": None,
        "setup": None,
        "cpu_upload": 12.0,
        "cpu_download": 9.0,
    },
    "phts": {
        "upload": 85.0,
        "download": 135.0,
        "rtt_median": 154.0,
        "rtt_p99": None,
        "setup": None,
        "cpu_upload": None,
        "cpu_download": None,
    },
}

#: Issue 11's targets for the command-line tunnel where they differ from
#: ``GOST_REFERENCE`` (the round trip and CPU targets are GOST's figures): 2 x GOST's MB/s.
TARGETS: dict[str, dict[str, float]] = {
    "pht": {"upload": 200.0, "download": 400.0},
    "phts": {"upload": 170.0, "download": 270.0},
}

#: name -> (unit, higher is better, description)
METRICS: dict[str, tuple[str, bool, str]] = {
    "upload": ("MB/s", True, "driver -> target, ack after the last byte"),
    "download": ("MB/s", True, "target -> driver"),
    "rtt_median": ("µs", False, "1-byte echo round trip, median"),
    "rtt_p99": ("µs", False, "1-byte echo round trip, 99th percentile"),
    "setup": ("ms", False, "connect to the first echoed byte, median"),
    "cpu_upload": ("CPU-s/GiB", False, "both tunnel processes, user + system, upload"),
    "cpu_download": ("CPU-s/GiB", False, "both tunnel processes, user + system, download"),
}


@dataclass(frozen=True)
class Settings:
    runs: int
    size: int
    round_trips: int
    setups: int


FULL = Settings(runs=5, size=64 * 2**20, round_trips=3000, setups=30)
QUICK = Settings(runs=1, size=4 * 2**20, round_trips=200, setups=5)


# --- the target process ------------------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _serve_connection(sock: socket.socket, block: memoryview) -> None:
    """One target connection: ``U`` sink (answers ``K``), ``D`` source, ``E`` echo."""
    buffer = bytearray(BLOCK)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    command, size = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
                except EOFError:
                    return
                if command == b"U":
                    remaining = size
                    while remaining:
                        got = sock.recv_into(buffer, min(BLOCK, remaining))
                        if not got:
                            return
                        remaining -= got
                    sock.sendall(b"K")
                elif command == b"D":
                    remaining = size
                    while remaining:
                        piece = block[: min(remaining, BLOCK)]
                        sock.sendall(piece)
                        remaining -= len(piece)
                elif command == b"E":
                    while data := sock.recv(BLOCK):
                        sock.sendall(data)
                    return
                else:
                    return
        except OSError:
            return


def run_target() -> None:
    """Listen on a free loopback port, print it, serve each connection in a thread."""
    block = memoryview(os.urandom(BLOCK))
    listener = socket.create_server((HOST, 0), backlog=512)
    print(listener.getsockname()[1], flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(sock, block), daemon=True).start()


# --- processes -------------------------------------------------------------------------

#: Hides pybase64 from pht, as an installation without it.
_NO_PYBASE64 = "import sys; sys.modules['pybase64'] = None; "


def _python_command(backend: str, code: str) -> list[str]:
    prelude = _NO_PYBASE64 if backend == "binascii" else ""
    return [sys.executable, "-c", prelude + code]


def _pht_command(backend: str, args: Sequence[str]) -> list[str]:
    """The ``pht`` command line; with pybase64 hidden when ``backend`` is binascii."""
    script = Path(sys.executable).parent / "pht"
    if backend == "installed" and script.exists():
        return [str(script), *args]
    code = "from pht.cli import main; sys.argv[0] = 'pht'; raise SystemExit(main())"
    command = _python_command(backend, "import sys; " + code)
    return [*command, *args]


def describe_backends(backend: str) -> dict[str, str]:
    """What the tunnel processes run with, asked of a process started the same way."""
    code = (
        "import json, ssl, sys, importlib.util, importlib.metadata as m, h11, trio, pht; "
        "print(json.dumps({"
        "'pht': pht.__version__, 'base64': pht.BASE64_BACKEND, 'ssl': ssl.OPENSSL_VERSION,"
        "'trio': trio.__version__, 'h11': h11.__version__, 'python': sys.version.split()[0],"
        "'anyio': m.version('anyio'), 'uvloop': ("
        "m.version('uvloop') if importlib.util.find_spec('uvloop') else None)}))"
    )
    output = subprocess.run(
        _python_command(backend, code), capture_output=True, text=True, check=True, timeout=60
    ).stdout
    result: dict[str, str] = json.loads(output)
    return result


def _gost_version(path: str) -> str:
    """What ``gost -V`` prints (GOST's version line), to record next to the figures."""
    completed = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=60)
    return (completed.stdout or completed.stderr).strip().splitlines()[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def _loop_arguments(loop: str | None) -> list[str]:
    return ["--backend", loop] if loop else []


def _server_arguments(kind: str, target: str, port: int, loop: str | None = None) -> list[str]:
    return ["-L", f"{kind}://{HOST}:{port}/{target}", *_loop_arguments(loop)]


def _client_arguments(
    kind: str,
    target: str,
    server: int,
    port: int,
    loop: str | None = None,
    push_window: int | None = None,
) -> list[str]:
    query = f"?pushWindow={push_window}" if push_window else ""
    return [
        "-L",
        f"tcp://{HOST}:{port}/{target}",
        "-F",
        f"forward+{kind}://{HOST}:{server}{query}",
        *_loop_arguments(loop),
    ]


#: What ``--loops`` takes: pht's ``--backend`` values (``all``: every one installed).
LOOPS = ("trio", "asyncio", "uvloop")


def available_loops() -> list[str]:
    """The event loops both tunnel ends can run on here (uvloop only if installed)."""
    return [loop for loop in LOOPS if loop != "uvloop" or importlib.util.find_spec("uvloop")]


def loop_pairs(loops: Sequence[str]) -> tuple[dict[str, Pair], dict[str, str]]:
    """A pht and a phts pair per event loop (``pht-trio``...), and kind -> loop."""
    pairs: dict[str, Pair] = {}
    kinds: dict[str, str] = {}
    for loop in loops:
        for scheme in ("pht", "phts"):
            pairs[f"{scheme}-{loop}"] = Pair("pht", "pht", scheme)
            kinds[f"{scheme}-{loop}"] = loop
    return pairs, kinds


class Processes:
    """The target and, per tunnel (``Pair``), a server and a client process."""

    def __init__(
        self,
        backend: str,
        logs: Path,
        pairs: dict[str, Pair],
        gost: str | None = None,
        loops: dict[str, str] | None = None,
        push_window: int | None = None,
    ) -> None:
        self.backend = backend
        self.logs = logs
        self.pairs = pairs
        self.gost = gost
        #: kind -> the ``--backend`` of its pht ends (none: pht's default)
        self.loops = loops or {}
        #: ``pushWindow`` of the pht clients (none: pht's default)
        self.push_window = push_window
        self.children: list[subprocess.Popen[bytes]] = []
        self.target_port = 0
        #: kind -> (client port, [client pid, server pid])
        self.tunnels: dict[str, tuple[int, list[int]]] = {}

    @property
    def kinds(self) -> list[str]:
        return ["raw", *self.pairs]

    def start(self) -> None:
        sink = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--target"], stdout=subprocess.PIPE
        )
        self.children.append(sink)
        assert sink.stdout is not None
        self.target_port = int(sink.stdout.readline())
        target = f"{HOST}:{self.target_port}"
        for kind, pair in self.pairs.items():
            loop = self.loops.get(kind)
            window = self.push_window if pair.client == "pht" else None
            server_port, server = self._start_tunnel_end(
                f"{kind}-server",
                pair.server,
                partial(_server_arguments, pair.scheme, target, loop=loop),
            )
            client_port, client = self._start_tunnel_end(
                f"{kind}-client",
                pair.client,
                partial(
                    _client_arguments,
                    pair.scheme,
                    target,
                    server_port,
                    loop=loop,
                    push_window=window,
                ),
            )
            self.tunnels[kind] = (client_port, [client.pid, server.pid])

    def _start_tunnel_end(
        self, name: str, program: str, arguments: Callable[[int], list[str]]
    ) -> tuple[int, subprocess.Popen[bytes]]:
        """Start ``pht`` or GOST on a free port; another port if that one was taken meanwhile.

        Both take the same command line; GOST is ready once its port accepts.
        """
        # Logging stays at its default (info, one line per connection): what users run.
        log = self.logs / f"{self.backend}-{name}.log"
        for _ in range(5):
            port = _free_port()
            args = arguments(port)
            if program == "gost" and self.gost is not None:
                command = [self.gost, *args]
            else:
                command = _pht_command(self.backend, args)
            with open(log, "wb") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while not (
                b"listening on" in log.read_bytes() or (program == "gost" and _accepts(port))
            ):
                if process.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                self.children.append(process)
                return port, process
            process.kill()
            process.wait()
            if b"address already in use" not in log.read_bytes().lower():
                break
        raise RuntimeError(f"pht {' '.join(args)} did not start:\n{log.read_text()}")

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children.clear()

    def port(self, kind: str) -> int:
        return self.target_port if kind == "raw" else self.tunnels[kind][0]

    def pids(self, kind: str) -> list[int]:
        return [] if kind == "raw" else self.tunnels[kind][1]


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of processes so far.

    From each process's CPU-time clock (on Linux, the clock id that glibc's
    ``clock_getcpuclockid`` makes: nanoseconds), else from clock ticks
    (10 ms, which round a quick run's few milliseconds to nothing).
    """
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of pid
        except OSError:
            total += sum(cpu_times(pid))
    return total


# --- the driver --------------------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextlib.contextmanager
def _cpu(pids: Sequence[int], into: list[float]) -> Iterator[None]:
    before = cpu_seconds(pids)
    yield
    into.append(cpu_seconds(pids) - before)


def upload(port: int, size: int, pids: Sequence[int]) -> tuple[float, float]:
    """Send ``size`` bytes; (MB/s, tunnel CPU seconds)."""
    block = memoryview(os.urandom(BLOCK))
    cpu: list[float] = []
    with _connect(port) as sock, _cpu(pids, cpu):
        start = time.perf_counter()
        sock.sendall(_HEADER.pack(b"U", size))
        remaining = size
        while remaining:
            piece = block[: min(remaining, BLOCK)]
            sock.sendall(piece)
            remaining -= len(piece)
        if _recv_exactly(sock, 1) != b"K":
            raise RuntimeError("bad upload acknowledgement")
        elapsed = time.perf_counter() - start
    return size / elapsed / 1e6, cpu[0]


def download(port: int, size: int, pids: Sequence[int]) -> tuple[float, float]:
    """Receive ``size`` bytes; (MB/s, tunnel CPU seconds)."""
    buffer = bytearray(BLOCK)
    cpu: list[float] = []
    with _connect(port) as sock, _cpu(pids, cpu):
        start = time.perf_counter()
        sock.sendall(_HEADER.pack(b"D", size))
        remaining = size
        while remaining:
            got = sock.recv_into(buffer, min(BLOCK, remaining))
            if not got:
                raise EOFError(f"download ended {remaining} bytes early")
            remaining -= got
        elapsed = time.perf_counter() - start
    return size / elapsed / 1e6, cpu[0]


def round_trips(port: int, count: int) -> list[float]:
    """``count`` 1-byte echoes after 50 warm-up ones; each in µs."""
    times = []
    clock = time.perf_counter_ns
    with _connect(port) as sock:
        sock.sendall(_HEADER.pack(b"E", 0))
        for _ in range(50):
            sock.sendall(b"x")
            _recv_exactly(sock, 1)
        for _ in range(count):
            start = clock()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("bad echo")
            times.append((clock() - start) / 1000)
    return times


def setups(port: int, count: int) -> list[float]:
    """``count`` sequential tunnels: connect to the first echoed byte, in ms."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(port) as sock:
            sock.sendall(_HEADER.pack(b"E", 0) + b"x")
            if _recv_exactly(sock, 1) != b"x":
                raise RuntimeError("bad echo")
            times.append((time.perf_counter() - start) * 1000)
    return times


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure_once(processes: Processes, kind: str, settings: Settings) -> dict[str, float | None]:
    """Every figure of one path, once."""
    port, pids = processes.port(kind), processes.pids(kind)
    size = settings.size
    up, up_cpu = upload(port, size, pids)
    down, down_cpu = download(port, size, pids)
    times = round_trips(port, settings.round_trips)
    setup = statistics.median(setups(port, settings.setups))
    return {
        "upload": up,
        "download": down,
        "rtt_median": statistics.median(times),
        "rtt_p99": _percentile(times, 0.99),
        "setup": setup,
        "cpu_upload": up_cpu / (size / GIB) if pids else None,
        "cpu_download": down_cpu / (size / GIB) if pids else None,
    }


def measure(processes: Processes, settings: Settings) -> dict[str, dict[str, list[float]]]:
    """``runs`` rounds of raw TCP and every tunnel, in a rotating order.

    Returns kind -> metric -> one value per run.
    """
    kinds = processes.kinds
    runs: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
    for kind in kinds:  # warm-up, not recorded: first connections, imports, caches
        port, pids = processes.port(kind), processes.pids(kind)
        setups(port, 3)
        upload(port, 2**20, pids)
        download(port, 2**20, pids)
    for run in range(settings.runs):
        order = kinds[run % len(kinds) :] + kinds[: run % len(kinds)]
        for kind in order:
            print(f"... {processes.backend} run {run + 1}: {kind}", file=sys.stderr, flush=True)
            for metric, value in measure_once(processes, kind, settings).items():
                if value is not None:
                    runs[kind].setdefault(metric, []).append(value)
    return runs


def summarize(
    runs: dict[str, dict[str, list[float]]], pairs: dict[str, Pair]
) -> dict[str, dict[str, Any]]:
    """metric -> kind -> {min, median, max, runs, ratio to raw, GOST, ratio to GOST}.

    GOST is its pair measured in the same run when there is one (``--gost``),
    else ``GOST_REFERENCE``.
    """
    gost_pairs = {
        pair.scheme: kind
        for kind, pair in pairs.items()
        if pair.client == "gost" and pair.server == "gost"
    }
    figures: dict[str, dict[str, Any]] = {}
    for metric, (unit, higher, description) in METRICS.items():
        entry: dict[str, Any] = {"unit": unit, "higher_is_better": higher, "note": description}
        raw = runs["raw"].get(metric)
        raw_median = statistics.median(raw) if raw else None
        for kind in runs:
            values = runs[kind].get(metric)
            if not values:
                continue
            median = statistics.median(values)
            stats: dict[str, Any] = {
                "min": min(values),
                "median": median,
                "max": max(values),
                "runs": values,
            }
            if kind != "raw":
                scheme = pairs[kind].scheme
                measured = runs.get(gost_pairs.get(scheme, ""), {}).get(metric)
                if measured and gost_pairs[scheme] != kind:
                    gost: float | None = statistics.median(measured)
                    stats["gost_source"] = "measured in this run"
                else:
                    gost = GOST_REFERENCE[scheme][metric]
                    stats["gost_source"] = "reference"
                stats["ratio_to_raw"] = median / raw_median if raw_median else None
                stats["gost"] = gost
                stats["ratio_to_gost"] = median / gost if gost else None
            entry[kind] = stats
        figures[metric] = entry
    return figures


# --- profiles ---------------------------------------------------------------------------


def _py_spy() -> str:
    script = Path(sys.executable).parent / "py-spy"
    return str(script) if script.exists() else "py-spy"


def profile(processes: Processes, settings: Settings, folder: Path) -> dict[str, Any]:
    """``py-spy record`` of the plain tunnel's client and server during an upload, a
    download and a round-trip run; the top functions by own and by inclusive samples."""
    port, pids = processes.port("pht"), processes.pids("pht")
    workloads: dict[str, Callable[[], object]] = {
        # Four times a run's size: at 200-400 MB/s a smaller transfer is over in
        # a fraction of a second, too few samples to rank functions.
        "upload": lambda: upload(port, settings.size * 4, pids),
        "download": lambda: download(port, settings.size * 4, pids),
        "round_trip": lambda: round_trips(port, settings.round_trips * 3),
    }
    summary: dict[str, Any] = {}
    for workload, run in workloads.items():
        recorders = []
        for role, pid in zip(("client", "server"), pids, strict=True):
            # Two views: every sample of a running thread, and only those holding the
            # GIL (Python code running: no socket call, no epoll wait).
            for view, extra in (("busy", []), ("gil", ["--gil"])):
                output = folder / f"profile-{processes.backend}-{workload}-{role}-{view}.txt"
                command = [_py_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate",
                           "500", "--nonblocking", *extra, "--output", str(output)]  # fmt: skip
                recorder = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                recorders.append((role, view, output, recorder))
        natives = _start_perf(pids, folder / f"perf-{processes.backend}-{workload}")
        time.sleep(1.0)  # py-spy attaches
        before = dict(zip(("client", "server"), [cpu_times(pid) for pid in pids], strict=True))
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        after = dict(zip(("client", "server"), [cpu_times(pid) for pid in pids], strict=True))
        for role, shares in _stop_perf(natives).items():
            summary.setdefault(f"{workload}/{role}", {})["native"] = shares
        for role, view, output, recorder in recorders:
            recorder.send_signal(signal.SIGINT)
            try:
                _, error = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                _, error = recorder.communicate()
            if not output.exists():
                raise RuntimeError(f"py-spy wrote no profile: {error.decode(errors='replace')}")
            entry = summary.setdefault(f"{workload}/{role}", {})
            entry[view] = top_functions(output.read_text())
            old, new = before[role], after[role]
            # py-spy counts a runnable thread that waits for a CPU as busy: the
            # process's own CPU time says how much of the wall time it really ran.
            entry["cpu"] = {"user": new[0] - old[0], "system": new[1] - old[1], "wall": wall}
    return summary


def _start_perf(
    pids: Sequence[int], prefix: Path
) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    """``perf record`` of each tunnel process, if perf is installed and allowed.

    py-spy sees Python frames only; perf's samples say which binary the CPU time
    went to: the interpreter, the kernel (system calls, loopback TCP), uvloop and
    libuv, pybase64, OpenSSL. ``perf`` refused (``perf_event_paranoid``): no view.
    """
    perf = shutil.which("perf")
    if perf is None:
        return []
    started = []
    for role, pid in zip(("client", "server"), pids, strict=True):
        output = prefix.with_name(f"{prefix.name}-{role}.data")
        command = [perf, "record", "-F", "999", "-p", str(pid), "-o", str(output), "--quiet"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((role, output, process))
    return started


def _stop_perf(
    started: Sequence[tuple[str, Path, subprocess.Popen[bytes]]],
) -> dict[str, dict[str, float]]:
    """Stop the recorders; role -> binary -> share of the samples (from ``perf report``)."""
    shares: dict[str, dict[str, float]] = {}
    for role, output, process in started:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if not output.exists():
            continue
        report = subprocess.run(
            ["perf", "report", "-i", str(output), "--sort", "dso", "--stdio", "--percent-limit",
             "0.5"], capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        entry: dict[str, float] = {}
        for line in report.splitlines():
            share, _, name = line.strip().partition("%")
            if line.startswith("#") or not name:
                continue
            with contextlib.suppress(ValueError):
                entry[_dso(name.strip())] = entry.get(_dso(name.strip()), 0.0) + float(share)
        if entry:
            shares[role] = entry
    return shares


def _dso(name: str) -> str:
    """``libpython3.11.so.1.0`` -> ``Python interpreter``; other binaries by what they do."""
    # Extension modules (``loop.cpython-311-x86_64-linux-gnu.so``) before the interpreter.
    if name.startswith("[kernel"):
        return "kernel (system calls, TCP)"
    if name.startswith("loop.cpython") or "uvloop" in name:
        return "uvloop and libuv"
    if "pybase64" in name:
        return "pybase64"
    if name.startswith(("libssl", "libcrypto", "_ssl.")):
        return "OpenSSL"
    if "python" in name:
        return "Python interpreter"
    if name.startswith("libc.so"):
        return "libc"
    return name


def top_functions(collapsed: str, count: int = 12) -> dict[str, Any]:
    """Busy samples and the functions with the most own samples, from py-spy's raw output.

    Each line is ``frame;frame;...;leaf COUNT`` with frames ``name (file:line)``;
    the line number is dropped so that a function's samples add up.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [_frame(frame) for frame in stack.split(";")]
        name, path = frames[-1]
        own[f"{name} ({path})"] += int(number)
        areas[_area(name, path)] += int(number)
        # pht's functions below the command line's entry points, each counted once
        # per sample however deep it recurses.
        callers = {f"{n} ({p})" for n, p in frames if p.startswith("pht/")}
        for caller in {c for c in callers if "(pht/cli/" not in c}:
            inclusive[caller] += int(number)
        total += int(number)
    return {
        "busy_samples": total,
        "top": [
            {"function": name, "share": samples / total if total else 0.0}
            for name, samples in own.most_common(count)
        ],
        "areas": {area: samples / total for area, samples in areas.most_common()},
        "pht_inclusive": [
            {"function": name, "share": samples / total if total else 0.0}
            for name, samples in inclusive.most_common(count)
        ],
    }


def _frame(frame: str) -> tuple[str, str]:
    """``name (path:line)`` -> (name, short path without the line)."""
    name, _, where = frame.partition(" (")
    return name, _short(where.rsplit(":", 1)[0])


def _area(function: str, path: str) -> str:
    """A coarse bucket for a leaf frame; socket calls run inside trio's socket wrappers.

    On asyncio and uvloop the loop's own work in C (uvloop's callbacks, its socket
    calls) has no Python frame: those samples land on the Python frame that entered
    the loop (``run_forever``, ``run_until_complete``), bucketed as the event loop.
    """
    if path.startswith("trio/_socket.py") or path == "ssl.py":
        return "socket and TLS calls"
    if path.startswith(("asyncio/selector_events.py", "asyncio/sslproto.py")):
        return "asyncio transports"
    if path.startswith(("asyncio/", "uvloop/")):
        return "event loop (asyncio/uvloop)"
    if path.startswith("anyio/"):
        return "anyio"
    if path == "pht/_codec.py":
        return "base64 (pht/_codec.py)"
    if path.startswith("trio/_core"):
        return "trio scheduler and epoll"
    if path.startswith("trio/"):
        return "trio streams"
    if path.startswith("pht/"):
        return "pht"
    if path.startswith("h11/"):
        return "h11"
    if path.startswith("logging/"):
        return "logging"
    return "other"


def _short(path: str) -> str:
    """``.../site-packages/trio/_core/_run.py`` -> ``trio/_core/_run.py``."""
    parts = Path(path).parts
    for anchor in ("site-packages", "lib-dynload"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    for anchor in ("pht", "python3.11", "python3.12", "python3.13", "python3.10"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index:] if anchor == "pht" else parts[index + 1 :])
    return path


# --- table and plot -----------------------------------------------------------------------


def _format(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_table(results: dict[str, Any]) -> str:
    lines = []
    for backend, group in results["backends"].items():
        info = group["versions"]
        lines.append(
            f"tunnel processes: base64 {info['base64']} ({backend}), {info['ssl']}, "
            f"trio {info['trio']}, anyio {info.get('anyio')}, uvloop {info.get('uvloop')}, "
            f"Python {info['python']}"
        )
        rows = [["figure", "unit", "path", "median (min-max)", "raw TCP", "/raw", "GOST",
                 "/GOST"]]  # fmt: skip
        for metric, entry in group["figures"].items():
            raw = entry.get("raw")
            for kind in results["kinds"]:
                stats = entry.get(kind)
                if stats is None:
                    continue
                row = [metric, entry["unit"], kind]
                row.append(
                    f"{_format(stats['median'])} ({_format(stats['min'])}-{_format(stats['max'])})"
                )
                if kind == "raw":
                    rows.append([*row, "", "", "", ""])
                    continue
                row.append(_format(raw["median"]) if raw else "-")
                row.append(f"{stats['ratio_to_raw']:.2f}" if stats["ratio_to_raw"] else "-")
                gost = stats["gost"]
                source = "" if stats["gost_source"] == "reference" else " (this run)"
                row.append(f"{_format(gost)}{source}" if gost else "-")
                row.append(f"{stats['ratio_to_gost']:.2f}" if stats["ratio_to_gost"] else "-")
                rows.append(row)
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for index, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
            if index == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
    if results["gost_version"]:
        lines.append(f"GOST: {results['gost_version']}")
    load = ", ".join(f"{value:.2f}" for value in results["load_average"]["end"])
    lines.append(f"load average at the end: {load}")
    for name, entry in results.get("profile", {}).items():
        cpu = entry["cpu"]
        lines.append(
            f"profile {name}: CPU user {cpu['user']:.2f} s + system {cpu['system']:.2f} s "
            f"in {cpu['wall']:.2f} s"
        )
        for view, label in (("busy", "running"), ("gil", "holding the GIL")):
            summary = entry[view]
            areas = ", ".join(f"{a} {v * 100:.0f} %" for a, v in summary["areas"].items())
            lines.append(f"  {summary['busy_samples']} samples {label}: {areas}")
            for item in summary["top"][:6]:
                lines.append(f"    {item['share'] * 100:5.1f} %  {item['function']}")
        if "native" in entry:
            native = ", ".join(f"{n} {v:.0f} %" for n, v in entry["native"].items())
            lines.append(f"  perf, by binary: {native}")
        lines.append("  pht functions, inclusive (running):")
        for item in entry["busy"]["pht_inclusive"][:6]:
            lines.append(f"    {item['share'] * 100:5.1f} %  {item['function']}")
    return "\n".join(lines)


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """Bars per path (raw TCP, each tunnel) with min-max whiskers; GOST's reference as lines."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return False
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    panels = [
        ("throughput, MB/s (log)", ["upload", "download"], True),
        ("latency (log)", ["rtt_median", "rtt_p99", "setup"], True),
        ("CPU-s per GiB moved, both tunnel processes", ["cpu_upload", "cpu_download"], False),
    ]
    backends = list(results["backends"])
    tunnels = [kind for kind in results["kinds"] if kind != "raw"]
    series = [(backends[0], "raw")] + [(b, k) for b in backends for k in tunnels]
    colours = {key: f"C{index}" for index, key in enumerate(series[1:])}
    colours[series[0]] = "tab:gray"
    loops: dict[str, str] = results.get("loops") or {}
    if loops:  # one colour per event loop, phts hatched
        order = list(dict.fromkeys(loops.values()))
        for backend, kind in series[1:]:
            if kind in loops:
                colours[backend, kind] = f"C{order.index(loops[kind])}"
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for axis, (title, metrics, log) in zip(axes, panels, strict=True):
        width = 0.8 / len(series)
        for index, (backend, kind) in enumerate(series):
            figures = results["backends"][backends[0] if kind == "raw" else backend]["figures"]
            xs, ys, low, high = [], [], [], []
            for position, metric in enumerate(metrics):
                stats = figures[metric].get(kind)
                if stats is None:
                    continue
                xs.append(position - 0.4 + width * (index + 0.5))
                ys.append(stats["median"])
                low.append(stats["median"] - stats["min"])
                high.append(stats["max"] - stats["median"])
            if not xs:
                continue
            if kind == "raw":
                label = "raw TCP"
            elif "pht" in results["pairs"][kind].values():  # a pht end: its base64 matters
                base64 = results["backends"][backend]["versions"]["base64"]
                label = f"{kind} ({base64})"
            else:
                label = f"{kind} ({backend} run)"
            hatch = "//" if results["pairs"].get(kind, {}).get("scheme") == "phts" else None
            axis.bar(xs, ys, width, yerr=[low, high], label=label, color=colours[backend, kind],
                     hatch=hatch, edgecolor="white")  # fmt: skip
        for kind, style in (("pht", "k--"), ("phts", "k:")):
            legend: str | None = f"GOST {kind} (reference)"
            for position, metric in enumerate(metrics):
                gost = GOST_REFERENCE[kind][metric]
                if gost is not None:
                    ends = [position - 0.45, position + 0.45]
                    axis.plot(ends, [gost, gost], style, label=legend)
                    legend = None  # one legend entry per line style
            legend = f"target {kind} (2 x GOST)"
            for position, metric in enumerate(metrics):
                target = TARGETS[kind].get(metric)
                if target is not None:
                    ends = [position - 0.45, position + 0.45]
                    axis.plot(ends, [target, target], "r" + style[1:], label=legend)
                    legend = None
        units = {m: METRICS[m][0] for m in metrics}
        axis.set_xticks(range(len(metrics)), [f"{m}\n({units[m]})" for m in metrics])
        if log:
            axis.set_yscale("log")
        axis.set_title(title)
        axis.legend(fontsize=8)
    load = results["load_average"]["end"][0]
    fig.suptitle(
        f"pht command line, end to end on loopback, {os.cpu_count()} CPUs "
        f"(load average {load:.1f}); medians of {results['settings']['runs']} runs, min-max"
        + (f"; pushWindow={results['push_window']}" if results.get("push_window") else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- main --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 MiB, 1 run (smoke test)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5)")
    parser.add_argument("--size", type=int, help="MiB each way per run (default 64)")
    parser.add_argument("--round-trips", type=int, help="1-byte echoes per run (default 3000)")
    parser.add_argument("--setups", type=int, help="tunnels opened per run (default 30)")
    parser.add_argument(
        "--base64",
        choices=("installed", "binascii", "both"),
        help="base64 of the tunnel processes: as installed, binascii (pybase64 hidden), or "
        "both (the default in full mode when pybase64 is installed)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy profiles (plain pht)")
    parser.add_argument(
        "--gost",
        metavar="PATH",
        help="a GOST binary: also measure GOST's pairs and pht with a GOST end, same runs",
    )
    parser.add_argument(
        "--loops",
        metavar="LIST",
        help="measure pht and phts per event loop instead of pht's default: a comma-separated "
        f"list of {', '.join(LOOPS)}, or all (those installed); kinds pht-LOOP, phts-LOOP",
    )
    parser.add_argument(
        "--push-window",
        type=int,
        metavar="N",
        help="pushWindow=N on every pht client node (default: pht's own default)",
    )
    parser.add_argument("--output", type=Path, default=_ROOT / "results", help="result folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.target:
        run_target()
        return 0
    settings = QUICK if args.quick else FULL
    overrides = {
        "runs": args.runs,
        "size": args.size * 2**20 if args.size else None,
        "round_trips": args.round_trips,
        "setups": args.setups,
    }
    settings = Settings(**(asdict(settings) | {k: v for k, v in overrides.items() if v}))
    choice = args.base64 or ("installed" if args.quick else "both")
    backends = ["installed", "binascii"] if choice == "both" else [choice]
    args.output.mkdir(parents=True, exist_ok=True)

    loops: dict[str, str] = {}
    if args.loops:
        names = available_loops() if args.loops == "all" else args.loops.split(",")
        unknown = sorted(set(names) - set(LOOPS))
        if unknown:
            parser.error(f"--loops: unknown {', '.join(unknown)} (choose from {', '.join(LOOPS)})")
        tunnels, loops = loop_pairs(names)
    else:
        tunnels = PHT_PAIRS
    pairs = tunnels | (GOST_PAIRS if args.gost else {})
    results: dict[str, Any] = {
        "command": " ".join(["benchmarks/e2e.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": asdict(settings),
        "cpus": os.cpu_count(),
        # Other work on the machine skews every figure: recorded, not hidden.
        "load_average": {"start": list(os.getloadavg())},
        "gost_reference": GOST_REFERENCE,
        "kinds": ["raw", *pairs],
        "gost_version": _gost_version(args.gost) if args.gost else None,
        "pairs": {kind: asdict(pair) for kind, pair in pairs.items()},
        "loops": loops,
        "push_window": args.push_window,
        "backends": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pht-e2e-") as logs:
        for backend in backends:
            versions = describe_backends(backend)
            installed = results["backends"].get("installed")
            if installed and installed["versions"]["base64"] == versions["base64"]:
                continue  # pybase64 is not installed: it would be the same run again
            processes = Processes(backend, Path(logs), pairs, args.gost, loops, args.push_window)
            try:
                processes.start()
                runs = measure(processes, settings)
                results["backends"][backend] = {
                    "versions": versions,
                    "figures": summarize(runs, pairs),
                }
                if args.profile and backend == backends[0]:
                    print("... profiles", file=sys.stderr, flush=True)
                    results["profile"] = profile(processes, settings, args.output)
            finally:
                processes.stop()
    results["load_average"]["end"] = list(os.getloadavg())
    results["seconds"] = time.monotonic() - started
    (args.output / "e2e.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render_table(results))
    if not args.no_plot:
        if write_plot(results, args.output / "e2e.png"):
            print(f"\nplot: {args.output / 'e2e.png'}")
        else:
            print("\nplot skipped: matplotlib is not installed")
    print(f"json: {args.output / 'e2e.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
