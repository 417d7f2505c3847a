"""The scenarios of issue 9, each bounded in count and time."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import resource
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio

import pht

from ._common import (
    ATTACKER,
    CONNECTIONS_PER_CLIENT,
    ECHO_SIZE,
    ECHO_TIMEOUT,
    HOST,
    ROOT,
    Size,
    describe,
    receive_exactly,
)
from ._rig import (
    Rig,
    canary_figures,
    free_port,
    pht_command,
    read_line,
    scenario_result,
    server_figures,
    start_rig,
    wait_listening,
)
from ._wire import (
    LOCKOUT_SHOWN,
    Deadline,
    Raw,
    StatusError,
    authorize_call,
    error_key,
    flood,
    junk_push,
    open_held_pull,
)

# --- scenarios -----------------------------------------------------------------------------


def default_idle_server() -> str:
    """The command line's own server: uvloop where installed, else asyncio's loop."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


async def scenario_idle(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """N idle tunnels (wire-identical to pht's client) opened, held idle, closed all at once.

    The tunnels are opened by ``--client-processes`` processes (each under its
    own open-file limit), so that the server alone holds the whole load.
    """
    requested = args.tunnels or size.idle_tunnels
    per_tunnel = args.tunnel_connections
    server = args.server or default_idle_server()
    # The server holds per tunnel its connections, plus one to the target
    # behind the command line's forward handler; the open-file limit
    # (inherited from this process) caps how many fit.
    server_fds = per_tunnel + (1 if server == "cli" else 0)
    fit = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256) // server_fds
    count = min(requested, fit)
    processes = args.client_processes or max(
        1, math.ceil(count * per_tunnel / CONNECTIONS_PER_CLIENT)
    )
    addresses = max(1, math.ceil(count / args.per_address))
    open_timeout = args.open_timeout or size.open_timeout
    idle_seconds = args.idle_seconds or size.idle_seconds
    # The session table must hold the tunnels, the canary's and its probes'.
    max_sessions = max(10_000, count + 1_000) if server != "cli" else None
    opened: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    clients: list[tuple[trio.Process, bytearray]] = []
    gc_mode = args.server_gc if server != "cli" else "default"
    async with start_rig(size, server=server, max_sessions=max_sessions, server_gc=gc_mode) as rig:
        before = rig.sample()
        try:
            async with rig.phase("open") as opening:
                for number in range(processes):
                    first = count * number // processes
                    share = count * (number + 1) // processes - first
                    command = [sys.executable, "-m", "benchmarks.load", "--role", "tunnels"]
                    command += ["--port", str(rig.server_port), "--first", str(first)]
                    command += ["--tunnels", str(share), "--addresses", str(addresses)]
                    command += ["--tunnel-connections", str(per_tunnel)]
                    command += ["--concurrency", str(max(4, size.concurrency // processes))]
                    command += ["--open-timeout", str(open_timeout)]
                    process = await trio.lowlevel.open_process(
                        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
                    )
                    clients.append((process, bytearray()))
                    rig.harness_pids.append(process.pid)
                with trio.fail_after(open_timeout + 30):
                    await gather_lines(clients, opened)
            await trio.sleep(1.0)  # let the server settle before measuring memory
            loaded = rig.sample()
            await rig.hold("idle", idle_seconds)
            async with rig.phase("close"):
                for process, _ in clients:
                    assert process.stdin is not None
                    await process.stdin.send_all(b"close\n")
                with trio.fail_after(40):
                    await gather_lines(clients, closed)
                await trio.sleep(2.0)  # the server's work after a mass close shows here
        finally:
            for process, _ in clients:
                if process.stdin is not None:
                    await process.stdin.aclose()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    tunnels = sum(report["opened"] for report in opened)
    statuses: Counter[str] = Counter()
    for report in opened:
        statuses.update(report["statuses"])
    idle = next(p for p in rig.phases if p.name == "idle")
    idle_cpu = server_figures(rig, idle.start, idle.end)["cpu_pct"]
    figures = {
        "tunnels_requested": requested,
        "tunnels_fitting_open_files": fit,
        "tunnels_opened": tunnels,
        "open_statuses": dict(statuses),
        "open_seconds": opening.end - opening.start,
        "close_seconds": max(report["seconds"] for report in closed),
        "rss_per_tunnel_kib": (loaded.rss_kib - before.rss_kib) / tunnels if tunnels else None,
        "idle_cpu_pct": idle_cpu,
        "dropped_while_idle": sum(report["dropped_while_idle"] for report in closed),
    }
    for name in ("open", "idle", "close"):
        phase = next(p for p in rig.phases if p.name == name)
        stats = canary_figures(rig, phase.start, phase.end)
        figures[f"{name}_echo_p99_ms"] = stats["echo_p99_ms"]
        figures[f"{name}_echo_max_ms"] = stats["echo_max_ms"]
        figures[f"{name}_stalls_over_100ms"] = stats["stalls_over_100ms"]
    settings = {
        "server": server,
        "server_gc": gc_mode,
        "tunnels": count,
        "connections_per_tunnel": per_tunnel,
        "client_processes": processes,
        "per_address": args.per_address,
        "idle_seconds": idle_seconds,
    }
    return scenario_result("idle", rig, settings, figures)


async def gather_lines(clients: list[tuple[trio.Process, bytearray]], into: list[Any]) -> None:
    """One JSON line from each client process, read at the same time."""

    async def one(process: trio.Process, buffer: bytearray) -> None:
        assert process.stdout is not None
        into.append(json.loads(await read_line(process.stdout, buffer)))

    async with trio.open_nursery() as nursery:
        for process, buffer in clients:
            nursery.start_soon(one, process, buffer)


async def scenario_junk_push(
    size: Size, args: argparse.Namespace, *, strict: bool = False
) -> dict[str, Any]:
    """Pushes with random tokens at full speed: each may create a session (and a dial)."""
    count = args.count or size.junk_pushes
    seconds = args.duration or size.flood_seconds
    statuses: Counter[str] = Counter()
    server = "library" if strict else "cli"  # the command line has no strict mode
    async with start_rig(size, server=server, strict=strict) as rig, rig.phase("attack") as attack:
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
        "server": server,
        "strict": strict,
    }
    return scenario_result("junk-push-strict" if strict else "junk-push", rig, settings, figures)


async def scenario_authorize(
    size: Size, args: argparse.Namespace, *, strict: bool = False
) -> dict[str, Any]:
    """``/authorize`` calls at full speed: tokens issued and never used."""
    seconds = args.duration or min(size.flood_seconds, 15.0)  # the backlog fills at once
    statuses: Counter[str] = Counter()
    server = "library" if strict else "cli"  # the command line has no strict mode
    async with start_rig(size, server=server, strict=strict) as rig, rig.phase("attack") as attack:
        deadline = Deadline(seconds, args.count or None)
        await flood(rig.server_port, size.concurrency, deadline, authorize_call, statuses)
    calls = sum(statuses.values())
    figures = {
        "authorize_calls": calls,
        "authorize_statuses": dict(statuses),
        "authorize_per_second": calls / (attack.end - attack.start),
        **attack_figures(rig),
    }
    settings = {
        "seconds": seconds,
        "connections": size.concurrency,
        "server": server,
        "strict": strict,
    }
    return scenario_result("authorize-strict" if strict else "authorize", rig, settings, figures)


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
    sent = [0] * count  # base64 bytes each connection got out
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
            try:
                await stream.send_all(head)
                await started.wait()
                while sent[index] < per_connection and not stop.is_set():
                    await stream.send_all(piece)
                    sent[index] += 0x2000
                    await trio.sleep(pace)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

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
        "kib_sent_per_connection": sum(sent) / max(1, len(streams)) / 1024,
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
    "junk-push-strict": lambda size, args: scenario_junk_push(size, args, strict=True),
    "held-pulls": lambda size, args: scenario_held_pulls(size, args, strict=False),
    "held-pulls-strict": lambda size, args: scenario_held_pulls(size, args, strict=True),
    "authorize": scenario_authorize,
    "authorize-strict": lambda size, args: scenario_authorize(size, args, strict=True),
    "endless-lines": scenario_endless_lines,
    "keepalive": scenario_keepalive,
}
