"""One way to start a PHT server, and to open a client, on every adapter pht has.

Server adapters (:data:`SERVER_ADAPTERS`): ``trio`` (:func:`pht.serve_pht`),
``asyncio`` and ``uvloop`` (:func:`pht.asyncio.start_pht_server` on asyncio's
default loop and on uvloop) and ``uvicorn`` (:class:`pht.asgi.PHTApp`
mounted in a Starlette site run by the real ``uvicorn`` command). A
:class:`ServerSet` starts several endpoints (each a :class:`Spec`: a handler
behaviour from :mod:`tests.parity_site` and server options) at once: the
in-process adapters on one event loop in one background thread, one listener
per endpoint; uvicorn in one process, one mount per endpoint. Tests address
an endpoint as an :class:`Endpoint` (port, paths, TLS) whatever served it.

Client adapters (:data:`CLIENT_ADAPTERS`): ``trio`` (:func:`pht.open_pht_stream`),
``asyncio`` and ``uvloop`` (:func:`pht.asyncio.open_pht_connection`). A test
writes its client side once, as a *scenario*: an ``async`` function that
only awaits the :class:`Tunnel` methods, so the same coroutine runs under
trio and under asyncio. :func:`run_client` runs it in the test's own thread,
on a fresh event loop of the adapter's kind, bounded by a timeout.

Why this shape: each side keeps its own event loop (no loop is shared across
threads; nothing is polled on a timer: the uvicorn process's output, with
its handlers' reports, is read from its pipe as it comes); a scenario is written once, not once per
library; the servers start once per module (uvicorn takes about a second);
and a failure in a scenario is an ordinary exception in the test's thread,
with the adapter's own traceback. Subprocess clients would cost a start-up
per test and hide the tracebacks; one shared loop would hide exactly the
loop-specific behaviour these tests look for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import trio

import pht
import pht.asyncio
from pht._asyncio_server import PHTServer

from .asyncio_support import loop_factory
from .asyncio_support import run as run_asyncio
from .middlebox import harness
from .parity_site import SPECS_VARIABLE, asyncio_handler, payload
from .support import start_server
from .test_conformance_server import echo_or_bye

T = TypeVar("T")

SERVER_ADAPTERS = ("trio", "asyncio", "uvloop", "uvicorn")
CLIENT_ADAPTERS = ("trio", "asyncio", "uvloop")

#: Bound for anything that could hang on a bug (never reached when all is well).
GUARD = 30.0
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- servers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One endpoint: its name, its handler behaviour, and the server's options."""

    name: str
    behaviour: str = "echo"
    size: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    #: Where uvicorn's site mounts it ("" is the root); ``/<name>`` by default.
    mount: str | None = None

    @property
    def prefix(self) -> str:
        return f"/{self.name}" if self.mount is None else self.mount


@dataclass(frozen=True)
class Endpoint:
    """Where a client finds one endpoint of a started :class:`ServerSet`."""

    adapter: str
    port: int
    prefix: str  # the ASGI mount ("" for the servers that listen themselves)
    tls: bool
    options: dict[str, Any]

    def path(self, kind: str) -> str:
        """The full path of ``kind`` ("authorize", "push" or "pull")."""
        default = f"/{kind}"
        return self.prefix + str(self.options.get(f"{kind}_path", default))

    def paths(self) -> dict[str, Any]:
        return {f"{kind}_path": self.path(kind) for kind in ("authorize", "push", "pull")}


class Reports:
    """Lines the handlers report (``sink <token> <bytes> <sha256>``), thread-safe."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._changed = threading.Condition()

    def add(self, line: str) -> None:
        with self._changed:
            self._lines.append(line)
            self._changed.notify_all()

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def wait_for(self, found: Callable[[list[str]], bool], timeout: float) -> None:
        """Wait until ``found(lines)`` holds, or ``timeout`` passed (the caller checks)."""
        with self._changed:
            self._changed.wait_for(lambda: found(self._lines), timeout)


class ProcessOutput(Reports):
    """Another process's output lines, waited on as they come (no polling of a file).

    A thread reads the process's stdout pipe, copies each line to ``log`` (for
    failure messages) and adds it, waking the waiters; so does the pipe's end
    (:attr:`ended`: the process exited or closed its output). ``also`` gets
    every line too: tests that wait on several processes at once share one.
    """

    def __init__(self, pipe: IO[bytes], log: Path, also: Reports | None = None) -> None:
        super().__init__()
        self.ended = False
        self._also = also
        self._thread = threading.Thread(target=self._copy, args=(pipe, log), daemon=True)
        self._thread.start()

    def _copy(self, pipe: IO[bytes], log: Path) -> None:
        with pipe, log.open("ab") as copy:
            for raw in pipe:
                copy.write(raw)
                copy.flush()
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.add(line)
                if self._also is not None:
                    self._also.add(line)
        with self._changed:
            self.ended = True
            self._changed.notify_all()
        if self._also is not None:
            self._also.add("")  # wake its waiters too

    def text(self) -> str:
        """Everything the process printed so far."""
        return "".join(line + "\n" for line in self.lines())

    def wait_for(self, found: Callable[[list[str]], bool], timeout: float) -> None:
        """As :meth:`Reports.wait_for`, but also returns once the output ended."""
        super().wait_for(lambda lines: self.ended or found(lines), timeout)

    def wait_ended(self, timeout: float) -> bool:
        """Wait (bounded) until the process closed its output; whether it did."""
        self.wait_for(lambda lines: False, timeout)
        return self.ended


def start_watched(
    command: list[str], log: Path, *, also: Reports | None = None, **popen: Any
) -> tuple[subprocess.Popen[bytes], ProcessOutput]:
    """Start ``command`` with its stdout and stderr watched as :class:`ProcessOutput`."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **popen,
    )
    assert process.stdout is not None
    return process, ProcessOutput(process.stdout, log, also)


def _trio_handler(
    behaviour: str, size: int, reports: Reports
) -> Callable[[pht.PHTStream], Awaitable[None]]:
    """The trio twin of :func:`tests.parity_site.asyncio_handler`."""

    async def echo(stream: pht.PHTStream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    async def sink(stream: pht.PHTStream) -> None:
        hasher, count = hashlib.sha256(), 0
        try:
            while data := await stream.receive_some():
                hasher.update(data)
                count += len(data)
        except trio.BrokenResourceError as exc:
            reports.add(f"broken {stream.token} {exc!r}")
        else:
            reports.add(f"sink {stream.token} {count} {hasher.hexdigest()}")
        await stream.aclose()

    async def source(stream: pht.PHTStream) -> None:
        try:
            await stream.send_all(payload(size))
        except trio.BrokenResourceError:
            pass
        await stream.aclose()

    async def gost(stream: pht.PHTStream) -> None:
        await echo_or_bye(stream)

    async def stuck(stream: pht.PHTStream) -> None:
        await trio.sleep_forever()

    async def crash(stream: pht.PHTStream) -> None:
        await stream.receive_some(1)
        raise RuntimeError("a handler bug (on purpose)")

    handlers = {
        "echo": echo,
        "sink": sink,
        "source": source,
        "gost": gost,
        "stuck": stuck,
        "crash": crash,
    }
    return handlers[behaviour]


class ServerSet:
    """Endpoints served by one adapter; :meth:`stop` ends them all."""

    def __init__(
        self, adapter: str, specs: list[Spec], *, tls: bool = False, directory: Path
    ) -> None:
        if adapter == "uvloop" or adapter == "uvicorn":
            pytest.importorskip("uvloop")
        self.adapter = adapter
        self.specs = specs
        self.tls = tls
        self.reports = Reports()
        self.certificate = pht.make_self_signed_certificate()
        self.endpoints: dict[str, Endpoint] = {}
        self._stop: Callable[[], None] = lambda: None
        self._error: BaseException | None = None
        self._site: harness.ManagedProcess | None = None
        if adapter == "trio":
            self._start_trio()
        elif adapter in ("asyncio", "uvloop"):
            self._start_asyncio()
        else:
            self._start_uvicorn(directory)

    def __getitem__(self, name: str) -> Endpoint:
        return self.endpoints[name]

    @staticmethod
    def _options(spec: Spec) -> dict[str, Any]:
        """The spec's options; stopping gives open sessions half a second, not 30 s."""
        return {"shutdown_timeout": 0.5, **spec.options}

    def _endpoint(self, spec: Spec, port: int, prefix: str = "") -> None:
        self.endpoints[spec.name] = Endpoint(self.adapter, port, prefix, self.tls, spec.options)

    def _start_trio(self) -> None:
        ready = threading.Event()
        state: dict[str, Any] = {}

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                state["token"] = trio.lowlevel.current_trio_token()
                state["scope"] = nursery.cancel_scope
                for spec in self.specs:
                    handler = _trio_handler(spec.behaviour, spec.size, self.reports)
                    tls = {"tls": self.certificate} if self.tls else {}
                    port = await start_server(nursery, handler, **tls, **self._options(spec))
                    self._endpoint(spec, port)
                ready.set()

        def thread() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # shown by stop() or by the start below
                self._error = exc
                ready.set()

        worker = threading.Thread(target=thread, daemon=True)
        worker.start()
        if not ready.wait(GUARD) or self._error is not None:
            raise RuntimeError(f"the trio servers did not start: {self._error!r}")

        def stop() -> None:
            trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
            worker.join(GUARD)

        self._stop = stop

    def _start_asyncio(self) -> None:
        loop = loop_factory(self.adapter)()
        ready = threading.Event()
        servers: list[PHTServer] = []
        stopping: asyncio.Future[None] = loop.create_future()

        async def main() -> None:
            for spec in self.specs:
                handler = asyncio_handler(spec.behaviour, spec.size, self.reports.add)
                server = await pht.asyncio.start_pht_server(
                    handler,
                    "127.0.0.1",
                    0,
                    ssl=self.certificate if self.tls else None,
                    **self._options(spec),
                )
                servers.append(server)
                self._endpoint(spec, server.sockets[0].getsockname()[1])
            ready.set()
            await stopping
            for server in servers:
                server.close()
            for server in servers:
                await server.wait_closed()

        def thread() -> None:
            try:
                loop.run_until_complete(main())
            except BaseException as exc:
                self._error = exc
                ready.set()
            finally:
                loop.close()

        worker = threading.Thread(target=thread, daemon=True)
        worker.start()
        if not ready.wait(GUARD) or self._error is not None:
            raise RuntimeError(f"the asyncio servers did not start: {self._error!r}")

        def stop() -> None:
            loop.call_soon_threadsafe(stopping.set_result, None)
            worker.join(GUARD)

        self._stop = stop

    def _start_uvicorn(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        port = harness.free_port()
        command = [str(BIN / "uvicorn"), "--factory", "tests.parity_site:make_app"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "auto"]
        command += ["--timeout-graceful-shutdown", "1", "--log-level", "warning"]
        if self.tls:
            key, cert = directory / "key.pem", directory / "cert.pem"
            key.write_bytes(self.certificate.key_pem)
            cert.write_bytes(self.certificate.cert_pem)
            command += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
        specs = [
            {
                "mount": s.prefix,
                "behaviour": s.behaviour,
                "size": s.size,
                "options": self._options(s),
            }
            for s in self.specs
        ]
        env = {**os.environ, SPECS_VARIABLE: json.dumps(specs), "PYTHONUNBUFFERED": "1"}
        log = directory / f"uvicorn-{port}.log"
        process, self.reports = start_watched(command, log, cwd=ROOT, env=env)
        site = harness.ManagedProcess("uvicorn", process, log)
        site.port = port
        harness.wait_for_port(port, site)
        self._site = site
        for spec in self.specs:
            self._endpoint(spec, port, spec.prefix)
        self._stop = site.stop

    def report_lines(self) -> list[str]:
        return self.reports.lines()

    def wait_report(self, kind: str, token: str) -> list[str]:
        """The fields of the handler's ``<kind> <token> ...`` report, once there (bounded)."""

        def find(lines: list[str]) -> list[str] | None:
            for line in lines:
                fields = line.split()
                if len(fields) >= 2 and fields[1] == token and fields[0] in (kind, "broken"):
                    return fields
            return None

        # In process or uvicorn's output: woken by each line, bounded.
        self.reports.wait_for(lambda lines: find(lines) is not None, GUARD)
        fields = find(self.report_lines())
        assert fields is not None, f"no {kind} report for {token}: {self.log_tail()}"
        return fields

    def log_tail(self) -> str:
        return "\n".join(self.report_lines()[-30:])

    def stop(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error


# --- clients --------------------------------------------------------------------------


class TunnelBroken(Exception):
    """A tunnel (or its opening) failed; ``status`` is the HTTP status, when one said so."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


def _broken(exc: BaseException) -> TunnelBroken:
    """One exception for every adapter's failure, with every message of the chain."""
    messages: list[str] = []
    status: int | None = None
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        messages.append(f"{type(current).__name__}: {current}")
        status = status or getattr(current, "status", None)
        current = current.__cause__ or current.__context__
    if status is None:
        found = re.search(r"\b(4\d\d|5\d\d)\b", " | ".join(messages))
        status = int(found.group(1)) if found else None
    return TunnelBroken(" <- ".join(messages), status)


_FAILURES = (pht.PHTError, trio.BrokenResourceError, ConnectionError, asyncio.IncompleteReadError)


class Tunnel:
    """What a scenario may do with a tunnel, whichever client adapter opened it."""

    token: str

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def receive(self, max_bytes: int = 256 * 1024) -> bytes:
        """Up to ``max_bytes``; ``b""`` at EOF; :class:`TunnelBroken` on an error."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def receive_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            piece = await self.receive(min(size - len(data), 256 * 1024))
            if not piece:
                raise AssertionError(f"EOF after {len(data)} of {size} bytes")
            data += piece
        return bytes(data)

    async def receive_until_eof(self) -> bytes:
        data = bytearray()
        while piece := await self.receive():
            data += piece
        return bytes(data)


class Client:
    """A client adapter as a scenario sees it: open tunnels, run things side by side, idle."""

    name = ""

    async def open(self, endpoint: Endpoint, host: str = "127.0.0.1", **options: Any) -> Tunnel:
        """Open a tunnel to ``endpoint`` (``host`` is only for a proxy to resolve)."""
        raise NotImplementedError

    async def both(
        self, first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None]]
    ) -> None:
        """Run two parts of a scenario at the same time (a nursery / a gather)."""
        raise NotImplementedError

    async def idle(self, seconds: float) -> None:
        """Sleep on the client's own loop (for heartbeats, which run on the real clock)."""
        raise NotImplementedError


def client_tls_context() -> ssl.SSLContext:
    """Accept the server's self-signed certificate, as GOST's own client does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _TrioTunnel(Tunnel):
    def __init__(self, stream: pht.PHTStream) -> None:
        self.stream = stream
        self.token = stream.token

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _FAILURES as exc:
            raise _broken(exc) from exc

    async def receive(self, max_bytes: int = 256 * 1024) -> bytes:
        try:
            return bytes(await self.stream.receive_some(max_bytes))
        except _FAILURES as exc:
            raise _broken(exc) from exc

    async def close(self) -> None:
        await self.stream.aclose()


class _TrioClient(Client):
    name = "trio"

    async def open(self, endpoint: Endpoint, host: str = "127.0.0.1", **options: Any) -> Tunnel:
        tls: ssl.SSLContext | bool = client_tls_context() if endpoint.tls else False
        try:
            stream = await pht.open_pht_stream(
                host, endpoint.port, tls=tls, **endpoint.paths(), **options
            )
        except _FAILURES as exc:
            raise _broken(exc) from exc
        return _TrioTunnel(stream)

    async def both(
        self, first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None]]
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)

    async def idle(self, seconds: float) -> None:
        # Real time: the server's own timers (heartbeats) run in another
        # thread or process, which no mock clock of this loop reaches.
        await trio.sleep(seconds)


class _AsyncioTunnel(Tunnel):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.token = writer.get_extra_info("pht_token")

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except _FAILURES as exc:
            raise _broken(exc) from exc

    async def receive(self, max_bytes: int = 256 * 1024) -> bytes:
        try:
            return await self.reader.read(max_bytes)
        except _FAILURES as exc:
            raise _broken(exc) from exc

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except _FAILURES:
            pass  # the tunnel's error was the scenario's to see


class _AsyncioClient(Client):
    def __init__(self, name: str) -> None:
        self.name = name

    async def open(self, endpoint: Endpoint, host: str = "127.0.0.1", **options: Any) -> Tunnel:
        context = client_tls_context() if endpoint.tls else None
        try:
            reader, writer = await pht.asyncio.open_pht_connection(
                host, endpoint.port, ssl=context, **endpoint.paths(), **options
            )
        except _FAILURES as exc:
            raise _broken(exc) from exc
        return _AsyncioTunnel(reader, writer)

    async def both(
        self, first: Callable[[], Awaitable[None]], second: Callable[[], Awaitable[None]]
    ) -> None:
        async def run(part: Callable[[], Awaitable[None]]) -> None:
            await part()

        await asyncio.gather(run(first), run(second))

    async def idle(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # real time: as the trio client's idle()


Scenario = Callable[[Client], Coroutine[Any, Any, T]]


def run_client(adapter: str, scenario: Scenario[T], *, timeout: float = GUARD) -> T:
    """Run ``scenario`` with client adapter ``adapter``, on a fresh loop, bounded."""
    if adapter == "trio":

        async def bounded() -> T:
            with trio.fail_after(timeout):
                return await scenario(_TrioClient())

        return trio.run(bounded)
    if adapter == "uvloop":
        pytest.importorskip("uvloop")
    return run_asyncio(adapter, scenario(_AsyncioClient(adapter)), timeout=timeout)
