"""The command line's running side: argparse, start-up checks, services, logging, metrics.

Everything that can be checked before listening (URLs, YAML, certificate
files, handler names) is checked first, so a bad command fails at once with
one line on stderr (``pht: error: ...``) and exit status 2. A failure while
starting to listen (port in use) exits with status 1. SIGINT (Ctrl-C) and
SIGTERM stop every service and exit with status 0, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import IO, Any, NoReturn

import anyio
import anyio.abc
import trio

import pht
from pht import proxy
from pht._stats import ServiceStats, Stats
from pht.proxy._stream import AnyStream, describe_peer

from ._backend import BACKEND_CHOICES, Backend, choose_backend, serve_pht, uvloop_available
from ._chain import ChainDialer, RoundRobin, describe_cause, to_auth
from ._log import JSONFormatter, TextFormatter, open_output
from ._meta import parse_address
from ._metrics import MetricsServer
from ._spec import (
    Address,
    ChainSpec,
    Config,
    ConfigError,
    DefaultTLS,
    MetricsSpec,
    ServiceSpec,
    TLSOptions,
)
from ._tls import apply_tls_options, server_context
from ._url import parse_node, parse_service

__all__ = ["build_config", "build_parser", "run"]

log = logging.getLogger("pht.cli")

Handler = Callable[[anyio.abc.ByteStream], Awaitable[None]]
HandlerFactory = Callable[[proxy.Dialer], Handler]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class StartupError(Exception):
    """A service could not start (port in use, permission denied...)."""


# --- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version(backend: Backend | None = None) -> str:
    """The version and the backends in use: base64 codec, TLS library, event loop, Python.

    Without ``backend`` (``--version``) it names what ``--backend auto`` runs on.
    """
    python = ".".join(str(part) for part in sys.version_info[:3])
    if backend is not None:
        loop = f"event loop {backend.describe()}"
    else:
        default = choose_backend("auto")
        others = [
            Backend(name).describe()
            for name in ("uvloop", "trio", "asyncio")
            if name != default.name and (name != "uvloop" or uvloop_available())
        ]
        loop = f"event loops {default.describe()} (auto), {', '.join(others)}"
    return (
        f"pht {pht.__version__} (base64 {pht.BASE64_BACKEND}, TLS {ssl.OPENSSL_VERSION}, "
        f"{loop}, python {python})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pht",
        description=(
            "A GOST-compatible Plain HTTP Tunnel (PHT) server and client.\n"
            "Services (-L) and the chain (-F) use GOST's URL syntax."
        ),
        epilog=(
            "examples:\n"
            "  pht -L socks5+pht://:8443                 SOCKS5 proxy over PHT\n"
            "  pht -L :1080 -F socks5+pht://server:8443  local proxy through the tunnel\n"
            "  pht -L tcp://:2222/10.0.0.5:22 -F pht://server:8443\n"
            "  pht -C gost.yaml\n"
            "Quote URLs that contain '&'. The command line is described in the pht\n"
            "documentation, chapter 'The pht command line'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-L",
        dest="services",
        action="append",
        default=[],
        metavar="URL",
        help="a service: [HANDLER][+LISTENER]://[USER:PASS@][HOST]:PORT[/TARGET,...][?KEY=VALUE]"
        " (repeatable)",
    )
    parser.add_argument(
        "-F",
        dest="nodes",
        action="append",
        default=[],
        metavar="URL",
        help="a hop of the forwarding chain: [CONNECTOR][+DIALER]://[USER:PASS@]HOST:PORT"
        "[?KEY=VALUE] (repeat for several hops, in order)",
    )
    parser.add_argument(
        "-C", dest="config", metavar="FILE", help="a GOST YAML (or JSON) configuration file"
    )
    parser.add_argument("-D", dest="debug", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warn", "warning", "error"],
        help="log level (default: info, or log.level of the -C file)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log format: text (default) or json, one object a line with GOST's field "
        "names (default: log.format of the -C file)",
    )
    parser.add_argument(
        "--log-output",
        metavar="WHERE",
        help="stderr (default), stdout, none, or a file to append to "
        "(default: log.output of the -C file)",
    )
    parser.add_argument(
        "-metrics",
        "--metrics",
        dest="metrics",
        metavar="ADDR",
        help="serve Prometheus metrics on ADDR (e.g. :9000) at /metrics, as GOST's -metrics; "
        "needs pip install 'pht-tunnel[metrics]'",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        metavar="LOOP",
        help="the event loop: " + ", ".join(BACKEND_CHOICES) + " (default: auto, the fastest "
        "as measured: uvloop if installed, else asyncio; trio where only trio can run the "
        "configuration)",
    )
    parser.add_argument(
        "-V",
        "--version",
        action="version",
        version=_version(),
        help="print the version and the backends in use, and exit",
    )
    return parser


def _free_name(prefix: str, taken: set[str]) -> str:
    for index in itertools.count():
        name = f"{prefix}-{index}"
        if name not in taken:
            taken.add(name)
            return name
    raise AssertionError("unreachable")  # pragma: no cover


def _load_config(path: str) -> Config:
    from ._yaml import load_config  # PyYAML is imported there only for YAML

    return load_config(path)


def build_config(
    services: Sequence[str],
    nodes: Sequence[str],
    config_file: str | None = None,
    metrics: str | None = None,
) -> Config:
    """Combine ``-C FILE`` with the ``-L`` services and the ``-F`` chain.

    As in GOST, every ``-L`` service sends its outbound connections through the
    chain made of all ``-F`` hops, in order.
    """
    base = _load_config(config_file) if config_file else Config()
    chains = list(base.chains)
    chain_name = None
    if nodes:
        if not services:
            raise ConfigError("-F needs a -L service that uses the chain")
        chain_name = _free_name("chain", {chain.name for chain in chains})
        hops = tuple(parse_node(text, name=f"hop-{index}") for index, text in enumerate(nodes))
        chains.append(ChainSpec(name=chain_name, hops=hops))
    taken = {service.name for service in base.services}
    parsed = [
        dataclasses.replace(
            parse_service(text, name=_free_name("service", taken)), chain=chain_name
        )
        for text in services
    ]
    config = dataclasses.replace(base, services=(*base.services, *parsed), chains=tuple(chains))
    if metrics is not None:
        # GOST's -metrics ADDR: the path stays the YAML's, or /metrics.
        path = base.metrics.path if base.metrics is not None else "/metrics"
        config = dataclasses.replace(
            config,
            metrics=MetricsSpec(
                addr=parse_address(metrics, where="-metrics", allow_zero_port=True), path=path
            ),
        )
    if not config.services:
        raise ConfigError("nothing to run: give a service with -L or a configuration file with -C")
    return config


# --- services ----------------------------------------------------------------------------


def _handler_factory(spec: ServiceSpec) -> HandlerFactory:
    auth = to_auth(spec.auth)
    targets = [(target.host, target.port) for target in spec.targets]
    selector = RoundRobin(max(1, len(targets)))

    def next_target() -> tuple[str, int]:
        return targets[selector.order()[0]]

    if spec.handler == "auto":
        return lambda dial: proxy.AutoHandler(auth=auth, dial=dial)
    if spec.handler == "http":
        return lambda dial: proxy.HTTPProxyHandler(auth=auth, dial=dial)
    if spec.handler == "socks5":
        return lambda dial: proxy.Socks5Handler(auth=auth, dial=dial)
    if spec.handler == "socks4":
        return lambda dial: proxy.Socks4Handler(auth=auth, dial=dial)
    if spec.handler == "relay":
        return lambda dial: proxy.RelayHandler(
            auth=auth,
            target=next_target() if targets else None,
            dial=dial,
            lazy_reply=not spec.nodelay,
        )
    # forward / tcp
    if auth is not None:
        log.warning(
            "%s: a %s handler has no authentication: USER:PASS ignored", spec.name, spec.handler
        )
    assert targets, "the parsers guarantee a target"

    def forward(dial: proxy.Dialer) -> Handler:
        host, port = next_target()
        return proxy.ForwardHandler(host, port, dial=dial)

    return forward


def _listener_addresses(listeners: Sequence[object]) -> str:
    names = []
    for listener in listeners:
        # A socket (or asyncio's socket-like object), or a trio listener that holds one.
        inner = getattr(listener, "transport_listener", listener)
        sock: Any = inner if hasattr(inner, "getsockname") else getattr(inner, "socket", None)
        if sock is None:
            continue
        address = sock.getsockname()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            names.append(str(Address(str(address[0]), int(address[1]))))
        else:
            names.append(str(address))
    return ", ".join(names) or "?"


class _CountingStream(anyio.abc.ByteStream):
    """Counts the bytes read from and written to a client into the service's stats."""

    def __init__(self, transport_stream: anyio.abc.ByteStream, stats: ServiceStats) -> None:
        self.transport_stream = transport_stream
        self._stats = stats
        self.remote_address = describe_peer(transport_stream)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.transport_stream.receive(max_bytes)
        self._stats.transferred(received=len(data))
        return data

    async def send(self, item: bytes) -> None:
        await self.transport_stream.send(item)
        self._stats.transferred(sent=len(item))

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.transport_stream.extra_attributes


class Service:
    """One listening service: its listener, its handler, its dialer and its counters."""

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        make_handler: HandlerFactory,
        dial: proxy.Dialer,
        route: str,
        tls: bool | ssl.SSLContext,
        stats: ServiceStats | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.spec = spec
        self.make_handler = make_handler
        self.dial = dial
        self.route = route
        self.tls = tls
        self.stats = stats if stats is not None else ServiceStats(spec.name)
        self.backend = backend if backend is not None else Backend("trio")

    def describe(self) -> str:
        details = self.spec.scheme
        if self.spec.targets:
            details += " to " + ",".join(str(target) for target in self.spec.targets)
        if self.route:
            details += f" via {self.route}"
        if self.spec.trusted_proxies:
            details += ", client addresses from " + ",".join(self.spec.trusted_proxies)
        return details

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[Sequence[object]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen and run :meth:`handle` per connection; report the sockets to ``task_status``."""
        spec = self.spec
        host = spec.listen.host or None
        if spec.listener == "tcp":
            listener = await anyio.create_tcp_listener(
                local_host=host, local_port=spec.listen.port, backlog=spec.backlog
            )
            async with listener:
                task_status.started(
                    [
                        inner.extra(anyio.abc.SocketAttribute.raw_socket)
                        for inner in listener.listeners
                    ]
                )
                await listener.serve(self.handle)
        else:
            await serve_pht(
                self.backend,
                self.handle,
                spec.listen.port,
                host=host,
                tls=self.tls,
                authorize_path=spec.paths.authorize_path,
                push_path=spec.paths.push_path,
                pull_path=spec.paths.pull_path,
                backlog=spec.backlog,
                trusted_proxies=spec.trusted_proxies,
                pull_max_bytes=spec.pull_max_bytes,
                pull_max_ms=spec.pull_max_ms,
                **spec.resume.keywords(),
                stats=self.stats,
                task_status=task_status,
            )

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        """Run one connection; a failing handler is logged, never fatal to the service."""
        peer = describe_peer(stream)
        name = self.spec.name
        # GOST's context fields, for JSON log lines.
        fields = {"service": name, "remote": peer}
        stats = self.stats
        failed = False
        started = anyio.current_time()
        stats.request_started()

        async def dial(host: str, port: int) -> AnyStream:
            nonlocal failed
            target = Address(host, port)
            try:
                upstream = await self.dial(host, port)
            except Exception as exc:
                # The handler logs the failure (WARNING) and answers it.
                failed = True
                log.debug(
                    "%s: %s -> %s: %s", name, peer, target, describe_cause(exc), extra=fields
                )
                raise
            log.info("%s: %s -> %s opened", name, peer, target, extra=fields)
            return upstream

        try:
            await self.make_handler(dial)(_CountingStream(stream, stats))
        except (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            pht.PHTError,
        ) as exc:
            failed = True
            log.warning(
                "%s: %s: connection failed: %s", name, peer, describe_cause(exc), extra=fields
            )
        except Exception as exc:
            failed = True
            # A bug, not a network event: say so, the traceback at DEBUG.
            log.error(
                "%s: %s: internal error: %s: %s (run with -D for the traceback)",
                name,
                peer,
                type(exc).__name__,
                exc,
                extra=fields,
            )
            log.debug("%s: traceback", name, exc_info=True, extra=fields)
        finally:
            stats.request_finished(anyio.current_time() - started, failed=failed)
            await anyio.aclose_forcefully(stream)


def prepare(config: Config, stats: Stats | None = None, backend: str = "trio") -> list[Service]:
    """Build every service (handlers, chains, TLS contexts) or raise ConfigError.

    Their counters go to ``stats`` (a fresh :class:`Stats` if not given).
    ``backend`` is what ``--backend`` asked for; the services' ``backend`` is
    what runs (see :func:`choose_backend`).
    """
    if stats is None:
        stats = Stats()
    dialers: dict[str, ChainDialer] = {}
    for chain in config.chains:
        dialers[chain.name] = ChainDialer(chain, stats.chain(chain.name))
    chosen = choose_backend(backend)
    for dialer in dialers.values():
        dialer.backend = chosen
    default_tls: bool | ssl.SSLContext | None = None  # made on first use
    services = []
    for spec in config.services:
        where = f"service {spec.name!r}"
        tls: bool | ssl.SSLContext = False
        if spec.listener == "phts":
            if spec.tls is not None:
                tls = server_context(spec.tls, where)
            elif spec.tls_options != TLSOptions():
                tls = _default_server_tls(config.tls, always_context=True)
            else:
                if default_tls is None:
                    default_tls = _default_server_tls(config.tls)
                tls = default_tls
            if isinstance(tls, ssl.SSLContext) and spec.tls_options != TLSOptions():
                apply_tls_options(tls, spec.tls_options, where)
        if spec.chain is not None:
            if spec.chain not in dialers:
                raise ConfigError(f"{where}: unknown chain {spec.chain!r}")
            chain_dialer = dialers[spec.chain]
            dial: proxy.Dialer = chain_dialer
            route = chain_dialer.describe()
        else:
            dial, route = proxy.tcp_dialer, ""
        services.append(
            Service(
                spec,
                make_handler=_handler_factory(spec),
                dial=dial,
                route=route,
                tls=tls,
                stats=stats.service(spec.name),
                backend=chosen,
            )
        )
    return services


def _default_server_tls(
    tls: DefaultTLS | None, *, always_context: bool = False
) -> bool | ssl.SSLContext:
    """The certificate of phts listeners without their own: files, generated, or GOST's.

    ``True`` lets the server make GOST's certificate; ``always_context`` makes
    it here instead, so that TLS options can be set on its context.
    """
    if tls is None:
        if always_context:
            return pht.make_self_signed_certificate().server_context()
        return True
    if tls.cert_file:
        return server_context(tls, "tls")
    if tls.common_name or tls.organization or tls.validity_days:
        certificate = pht.make_self_signed_certificate(
            common_name=tls.common_name or "gost.run",
            organization=tls.organization or "GOST",
            validity_days=max(1, round(tls.validity_days or 365)),
        )
        return certificate.server_context()
    if always_context:
        return pht.make_self_signed_certificate().server_context()
    return True


# --- running -----------------------------------------------------------------------------


async def _watch_signals(
    cancel_scope: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    wanted = [signal.SIGINT]
    if hasattr(signal, "SIGTERM"):
        wanted.append(signal.SIGTERM)
    with anyio.open_signal_receiver(*wanted) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


#: The collector's third threshold while the services run: a full collection
#: after this many collections of the middle generation (Python's default: 10).
FULL_COLLECTION_THRESHOLD = 10_000


class _Collector:
    """The garbage collector tuned for a long-running server, and undone after.

    A full collection walks every live object: with thousands of tunnels
    open it stops them all for up to a second, and while they are being
    opened Python runs one each time the heap grew by a quarter (see
    docs/load.md). Once the services listen, what start-up made is frozen
    (never walked again) and full collections become much rarer; reference
    counting still frees a closed tunnel's objects at once.
    """

    def __init__(self) -> None:
        self.saved: tuple[int, int, int] | None = None

    def tune(self) -> None:
        if self.saved is not None:
            return
        self.saved = first, second, third = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(first, second, max(third, FULL_COLLECTION_THRESHOLD))
        log.debug(
            "gc: %d start-up objects frozen; a full collection after %d of the middle one",
            gc.get_freeze_count(),
            gc.get_threshold()[2],
        )

    def restore(self) -> None:
        if self.saved is not None:
            gc.set_threshold(*self.saved)
            gc.unfreeze()
            self.saved = None


_COLLECTOR = _Collector()


async def serve_all(services: Sequence[Service], metrics: MetricsServer | None = None) -> None:
    """Start every service (all or none) and the metrics endpoint, then run until a signal."""
    failure: str | None = None
    async with anyio.create_task_group() as nursery:
        await nursery.start(_watch_signals, nursery.cancel_scope)
        if metrics is not None:
            try:
                listeners = await nursery.start(metrics.serve)
            except OSError as exc:
                failure = f"metrics: cannot listen on {metrics.spec.addr}: {exc.strerror or exc}"
                nursery.cancel_scope.cancel()
            else:
                log.info(
                    "metrics: listening on %s (path %s)",
                    _listener_addresses(listeners),
                    metrics.spec.path,
                )
        for service in services if failure is None else ():
            spec = service.spec
            try:
                listeners = await nursery.start(service.serve)
            except Exception as exc:
                # serve_pht binds inside its own nursery: the OSError may come
                # wrapped in an exception group.
                cause = next(
                    (
                        leaf
                        for leaf in _leaves(exc)
                        if isinstance(leaf, (OSError, ValueError, pht.PHTError))
                    ),
                    None,
                )
                if cause is None:
                    raise
                reason = str(cause)
                if isinstance(cause, OSError) and cause.errno is not None:
                    # (asyncio words its bind errors its own way: the OS's words.)
                    reason = os.strerror(cause.errno)
                elif isinstance(cause, OSError) and cause.strerror:
                    reason = cause.strerror
                failure = f"{spec.name}: cannot listen on {spec.listen}: {reason}"
                nursery.cancel_scope.cancel()
                break
            log.info(
                "%s: listening on %s (%s)",
                spec.name,
                _listener_addresses(listeners),
                service.describe(),
            )
        if failure is None:
            log.info("%s: running", _version(services[0].backend if services else None))
            _COLLECTOR.tune()
    if failure is not None:
        raise StartupError(failure)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    members = getattr(exc, "exceptions", None)
    if isinstance(members, tuple):
        for member in members:
            if isinstance(member, BaseException):
                yield from _leaves(member)
    else:
        yield exc


def _fail(message: str) -> None:
    print(f"pht: error: {message}", file=sys.stderr, flush=True)


class _LogSetup:
    """Logging for the ``pht`` loggers, undone when the run ends.

    Until level, format and output are known (they may come from the -C
    file's ``log:`` block), records are kept; :meth:`decide` then writes
    those at or above the level.
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger("pht")
        self.previous_level = self.logger.level
        self.handler: logging.Handler | None = None
        self.file: IO[str] | None = None
        self.pending: list[logging.LogRecord] = []
        pending = self.pending

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                pending.append(record)

        self.buffer: logging.Handler | None = _Keep(logging.DEBUG)
        self.logger.addHandler(self.buffer)
        self.logger.setLevel(logging.DEBUG)

    def decide(self, level: int, log_format: str = "text", output: str | None = None) -> None:
        """Start writing: ``log_format`` ``text`` or ``json``; ``output`` as GOST's
        ``log.output``. Raises ConfigError if the output file cannot be opened."""
        if self.buffer is None:
            return
        try:
            stream = open_output(output)
        except OSError as exc:
            stream = sys.stderr
            output_error: str | None = f"log.output {output}: {exc.strerror or exc}"
        else:
            output_error = None
        if stream is not None and stream not in (sys.stderr, sys.stdout):
            self.file = stream
        self.logger.removeHandler(self.buffer)
        self.buffer = None
        self.logger.setLevel(level)
        handler: logging.Handler = (
            logging.StreamHandler(stream) if stream is not None else logging.NullHandler()
        )
        handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
        self.handler = handler
        self.logger.addHandler(handler)
        for record in self.pending:
            if record.levelno >= level:
                handler.handle(record)
        self.pending.clear()
        if output_error is not None:
            raise ConfigError(output_error)

    def close(self) -> None:
        self.decide(logging.INFO)
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
        if self.file is not None:
            self.file.close()
        self.logger.setLevel(self.previous_level)


def run(argv: Sequence[str] | None = None) -> int:
    """The whole command: parse, check, serve until a signal; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    explicit_level = "debug" if args.debug else args.log_level
    if explicit_level == "warn":  # GOST's spelling
        explicit_level = "warning"
    logs = _LogSetup()
    try:
        return _run(args, explicit_level, logs)
    except KeyboardInterrupt:
        # Ctrl-C before the services' signal handling started (while
        # checking the configuration): stop quietly, as later.
        return EXIT_OK
    finally:
        _COLLECTOR.restore()
        logs.close()


def _run(args: argparse.Namespace, explicit_level: str | None, logs: _LogSetup) -> int:
    """Check the configuration, then serve until a signal; return the exit status."""
    try:
        config = build_config(args.services, args.nodes, args.config, args.metrics)
        level = (explicit_level or config.log_level or "info").upper()
        logs.decide(
            getattr(logging, level),
            args.log_format or config.log_format or "text",
            args.log_output or config.log_output,
        )
        log.debug(
            "log: level %s, format %s, output %s",
            level.lower(),
            args.log_format or config.log_format or "text",
            args.log_output or config.log_output or "stderr",
        )
        stats = Stats()
        services = prepare(config, stats, args.backend)
        backend = services[0].backend
        if backend.reason:
            log.debug("event loop: %s (--backend auto: %s)", backend.name, backend.reason)
        metrics = MetricsServer(config.metrics, stats) if config.metrics else None
    except ConfigError as exc:
        # What was logged so far (warnings about options) goes where the
        # command line said; the -C file's log: block may not have parsed.
        try:
            level = getattr(logging, (explicit_level or "info").upper())
            logs.decide(level, args.log_format or "text", args.log_output)
        except ConfigError as output_error:
            _fail(str(output_error))
        _fail(str(exc))
        return EXIT_USAGE
    try:
        backend.run(serve_all, services, metrics)
    except StartupError as exc:
        _fail(str(exc))
        return EXIT_RUNTIME
    except BaseException as exc:
        leaves = list(_leaves(exc))
        if leaves and all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_OK
        if not isinstance(exc, Exception):
            raise
        log.debug("unexpected failure", exc_info=True)
        leaf = leaves[0]
        _fail(f"unexpected failure: {type(leaf).__name__}: {leaf} (run with -D for details)")
        return EXIT_RUNTIME
    return EXIT_OK
