"""The command line's running side: argparse, start-up checks, services, chains.

Everything that can be checked before listening (URLs, YAML, certificate
files, handler names) is checked first, so a bad command fails at once with
one line on stderr (``pht: error: ...``) and exit status 2. A failure while
starting to listen (port in use) exits with status 1. SIGINT (Ctrl-C) and
SIGTERM stop every service and exit with status 0, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import NoReturn

import trio

import pht
from pht import proxy

from ._spec import (
    Address,
    ChainSpec,
    ClientTLS,
    Config,
    ConfigError,
    Credentials,
    DefaultTLS,
    NodeSpec,
    ServerTLS,
    ServiceSpec,
)
from ._url import parse_node, parse_service

__all__ = ["build_config", "build_parser", "run"]

log = logging.getLogger("pht.cli")

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
HandlerFactory = Callable[[proxy.Dialer], Handler]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATE_FORMAT = "%Y/%m/%d %H:%M:%S"


class StartupError(Exception):
    """A service could not start (port in use, permission denied...)."""


# --- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"pht {pht.__version__} (python {python}, trio {trio.__version__})"


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
            "Quote URLs that contain '&'. See docs/cli.md."
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
        choices=["debug", "info", "warning", "error"],
        help="log level (default: info, or log.level of the -C file)",
    )
    parser.add_argument("-V", "--version", action="version", version=_version())
    return parser


def _free_name(prefix: str, taken: set[str]) -> str:
    for index in itertools.count():
        name = f"{prefix}-{index}"
        if name not in taken:
            taken.add(name)
            return name
    raise AssertionError("unreachable")  # pragma: no cover


def _load_config(path: str) -> Config:
    try:
        from ._yaml import load_config
    except ImportError:
        raise ConfigError("-C needs PyYAML: install it with pip install 'pht[cli]'") from None
    return load_config(path)


def build_config(
    services: Sequence[str], nodes: Sequence[str], config_file: str | None = None
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
    if not config.services:
        raise ConfigError("nothing to run: give a service with -L or a configuration file with -C")
    return config


# --- TLS ---------------------------------------------------------------------------------


def _require_file(path: str, what: str, where: str) -> None:
    if not os.path.isfile(path):
        reason = "not found" if not os.path.exists(path) else "not a file"
        raise ConfigError(f"{where}: {what} {path!r}: {reason}")


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def server_context(tls: ServerTLS | DefaultTLS, where: str) -> ssl.SSLContext:
    """A server context from certificate files; ``ca_file`` asks clients for certificates."""
    assert tls.cert_file is not None
    _require_file(tls.cert_file, "certificate file", where)
    if tls.key_file:
        _require_file(tls.key_file, "key file", where)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: cannot load certificate {tls.cert_file!r}: {_ssl_reason(exc)}"
        ) from None
    if tls.ca_file:
        _require_file(tls.ca_file, "CA file", where)
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{where}: cannot load CA file {tls.ca_file!r}: {_ssl_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: ClientTLS, where: str) -> ssl.SSLContext:
    """A client context, with GOST's rules.

    ``secure=false`` (the default) checks nothing, unless a ``caFile`` is
    given: then the chain must lead to that CA, but the name is not checked.
    ``secure=true`` checks chain and name (against ``caFile`` or the system's CAs).
    """
    if tls.ca_file:
        _require_file(tls.ca_file, "CA file", where)
    try:
        if tls.verify:
            context = ssl.create_default_context(cafile=tls.ca_file)
            context.check_hostname = tls.secure
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert_file:
            _require_file(tls.cert_file, "certificate file", where)
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: cannot set up TLS: {_ssl_reason(exc)}") from None
    return context


# --- chains ------------------------------------------------------------------------------


def _auth(credentials: Credentials | None) -> proxy.Auth | None:
    if credentials is None:
        return None
    return proxy.Auth(credentials.username, credentials.password)


class _RoundRobin:
    """GOST's default node selector: each use starts one further along."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next = 0

    def order(self) -> list[int]:
        start = self._next
        self._next = (start + 1) % self._count
        return [(start + offset) % self._count for offset in range(self._count)]


class ChainDialer:
    """Opens a connection to ``(host, port)`` through the hops of a chain.

    The first hop is dialled directly (TCP or a PHT tunnel; with several nodes,
    each connection starts at the next one and the others are tried if it
    cannot be reached). Then each hop's connector asks its node to connect to
    the next hop's node, and the last one to the target. Hops after the first
    must use the ``tcp`` dialer: a PHT tunnel needs HTTP connections of its
    own and cannot be opened inside another hop's stream.
    """

    def __init__(self, chain: ChainSpec) -> None:
        self.chain = chain
        where = f"chain {chain.name!r}"
        for hop in chain.hops[1:]:
            for node in hop.nodes:
                if node.dialer != "tcp":
                    raise ConfigError(
                        f"{where}: hop {hop.name!r} uses the {node.dialer} dialer; only the "
                        "first hop of a chain can be a PHT tunnel"
                    )
        self._selectors = [_RoundRobin(len(hop.nodes)) for hop in chain.hops]
        self._contexts: dict[int, ssl.SSLContext] = {}
        for hop in chain.hops:
            for node in hop.nodes:
                if node.dialer == "phts":
                    self._contexts[id(node)] = client_context(
                        node.tls, f"{where}, {hop.name}, {node.name}"
                    )

    def describe(self) -> str:
        return " -> ".join(
            ",".join(f"{node.scheme}://{node.addr}" for node in hop.nodes)
            for hop in self.chain.hops
        )

    async def _open(self, node: NodeSpec) -> trio.abc.Stream:
        if node.dialer == "tcp":
            return await trio.open_tcp_stream(node.addr.host, node.addr.port)
        return await pht.open_pht_stream(
            node.addr.host,
            node.addr.port,
            tls=self._contexts.get(id(node), False),
            server_hostname=node.tls.server_name,
            authorize_path=node.paths.authorize_path,
            push_path=node.paths.push_path,
            pull_path=node.paths.pull_path,
            headers=list(node.headers) or None,
            host_header=node.host_header,
        )

    async def _connect(
        self, node: NodeSpec, stream: trio.abc.Stream, target: Address
    ) -> trio.abc.Stream:
        auth = _auth(node.auth)
        if node.connector == "http":
            return await proxy.http_connect(stream, target.host, target.port, auth=auth)
        if node.connector == "socks5":
            return await proxy.socks5_connect(stream, target.host, target.port, auth=auth)
        if node.connector == "relay":
            return await proxy.relay_connect(stream, target.host, target.port, auth=auth)
        # forward: the node itself forwards the stream to its own target.
        return stream

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        hops = self.chain.hops
        later = [
            hop.nodes[sel.order()[0]]
            for hop, sel in zip(hops[1:], self._selectors[1:], strict=True)
        ]
        failure: Exception | None = None
        stream: trio.abc.Stream | None = None
        first: NodeSpec | None = None
        for index in self._selectors[0].order():
            first = hops[0].nodes[index]
            try:
                stream = await self._open(first)
                break
            except (OSError, pht.PHTError) as exc:
                log.debug("%s %s://%s: %s", self.chain.name, first.scheme, first.addr, exc)
                failure = exc
        if stream is None or first is None:
            assert failure is not None
            raise failure
        path = [first, *later]
        try:
            for position, node in enumerate(path):
                target = (
                    path[position + 1].addr if position + 1 < len(path) else Address(host, port)
                )
                stream = await self._connect(node, stream, target)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream


# --- services ----------------------------------------------------------------------------


def _handler_factory(spec: ServiceSpec) -> HandlerFactory:
    auth = _auth(spec.auth)
    targets = [(target.host, target.port) for target in spec.targets]
    selector = _RoundRobin(max(1, len(targets)))

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
            auth=auth, target=next_target() if targets else None, dial=dial
        )
    # forward / tcp
    if auth is not None:
        log.debug(
            "%s: a %s handler has no authentication: USER:PASS ignored", spec.name, spec.handler
        )
    assert targets, "the parsers guarantee a target"

    def forward(dial: proxy.Dialer) -> Handler:
        host, port = next_target()
        return proxy.ForwardHandler(host, port, dial=dial)

    return forward


def _peer(stream: trio.abc.Stream) -> str:
    remote = getattr(stream, "remote_address", None)
    if isinstance(remote, str):
        return remote
    while not isinstance(stream, trio.SocketStream):
        inner = getattr(stream, "transport_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            return "?"
        stream = inner
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        return str(Address(str(address[0]), int(address[1])))
    return str(address)


def _listener_addresses(listeners: Sequence[object]) -> str:
    names = []
    for listener in listeners:
        inner = getattr(listener, "transport_listener", listener)
        sock = getattr(inner, "socket", None)
        if sock is None:
            continue
        address = sock.getsockname()
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            names.append(str(Address(str(address[0]), int(address[1]))))
        else:
            names.append(str(address))
    return ", ".join(names) or "?"


class Service:
    """One listening service: its listener, its handler and its dialer."""

    def __init__(
        self,
        spec: ServiceSpec,
        *,
        make_handler: HandlerFactory,
        dial: proxy.Dialer,
        route: str,
        tls: bool | ssl.SSLContext,
    ) -> None:
        self.spec = spec
        self.make_handler = make_handler
        self.dial = dial
        self.route = route
        self.tls = tls

    def describe(self) -> str:
        details = self.spec.scheme
        if self.spec.targets:
            details += " to " + ",".join(str(target) for target in self.spec.targets)
        if self.route:
            details += f" via {self.route}"
        return details

    async def serve(
        self, *, task_status: trio.TaskStatus[Sequence[object]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        spec = self.spec
        host = spec.listen.host or None
        if spec.listener == "tcp":
            await trio.serve_tcp(
                self.handle,
                spec.listen.port,
                host=host,
                backlog=spec.backlog,
                task_status=task_status,
            )
        else:
            await pht.serve_pht(
                self.handle,
                spec.listen.port,
                host=host,
                tls=self.tls,
                authorize_path=spec.paths.authorize_path,
                push_path=spec.paths.push_path,
                pull_path=spec.paths.pull_path,
                backlog=spec.backlog,
                task_status=task_status,
            )

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Run one connection; a failing handler is logged, never fatal to the service."""
        peer = _peer(stream)
        name = self.spec.name

        async def dial(host: str, port: int) -> trio.abc.Stream:
            target = Address(host, port)
            try:
                upstream = await self.dial(host, port)
            except Exception as exc:
                log.debug("%s: %s -> %s: %s", name, peer, target, exc or type(exc).__name__)
                raise
            log.info("%s: %s -> %s opened", name, peer, target)
            return upstream

        try:
            await self.make_handler(dial)(stream)
        except Exception as exc:
            log.warning("%s: %s: connection failed: %r", name, peer, exc)
            log.debug("%s: traceback", name, exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)


def prepare(config: Config) -> list[Service]:
    """Build every service (handlers, chains, TLS contexts) or raise ConfigError."""
    dialers: dict[str, ChainDialer] = {}
    for chain in config.chains:
        dialers[chain.name] = ChainDialer(chain)
    default_tls: bool | ssl.SSLContext | None = None  # made on first use
    services = []
    for spec in config.services:
        where = f"service {spec.name!r}"
        tls: bool | ssl.SSLContext = False
        if spec.listener == "phts":
            if spec.tls is not None:
                tls = server_context(spec.tls, where)
            else:
                if default_tls is None:
                    default_tls = _default_server_tls(config.tls)
                tls = default_tls
        if spec.chain is not None:
            if spec.chain not in dialers:
                raise ConfigError(f"{where}: unknown chain {spec.chain!r}")
            chain_dialer = dialers[spec.chain]
            dial: proxy.Dialer = chain_dialer
            route = chain_dialer.describe()
        else:
            dial, route = proxy.tcp_dialer, ""
        services.append(
            Service(spec, make_handler=_handler_factory(spec), dial=dial, route=route, tls=tls)
        )
    return services


def _default_server_tls(tls: DefaultTLS | None) -> bool | ssl.SSLContext:
    """The certificate of phts listeners without their own: files, generated, or GOST's."""
    if tls is None:
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
    return True


# --- running -----------------------------------------------------------------------------


async def _watch_signals(
    cancel_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    wanted = [signal.SIGINT]
    if hasattr(signal, "SIGTERM"):
        wanted.append(signal.SIGTERM)
    with trio.open_signal_receiver(*wanted) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: stopping", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def serve_all(services: Sequence[Service]) -> None:
    """Start every service (all or none), then run until a signal arrives."""
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, nursery.cancel_scope)
        for service in services:
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
                if isinstance(cause, OSError) and cause.strerror:
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
    """Logging to stderr for the ``pht`` loggers, undone when the run ends.

    Until the level is known (it may come from the -C file's ``log.level``),
    records are kept; :meth:`decide` then shows those at or above the level.
    """

    def __init__(self, level: int | None) -> None:
        self.logger = logging.getLogger("pht")
        self.previous_level = self.logger.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter(_LOG_FORMAT, _DATE_FORMAT))
        self.pending: list[logging.LogRecord] = []
        self.buffer: logging.Handler | None = None
        if level is None:
            pending = self.pending

            class _Keep(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    pending.append(record)

            self.buffer = _Keep(logging.DEBUG)
            self.logger.addHandler(self.buffer)
            self.logger.setLevel(logging.DEBUG)
        else:
            self.logger.addHandler(self.handler)
            self.logger.setLevel(level)

    def decide(self, level: int) -> None:
        if self.buffer is None:
            return
        self.logger.removeHandler(self.buffer)
        self.buffer = None
        self.logger.setLevel(level)
        self.logger.addHandler(self.handler)
        for record in self.pending:
            if record.levelno >= level:
                self.handler.handle(record)
        self.pending.clear()

    def close(self) -> None:
        self.decide(logging.INFO)
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous_level)


def run(argv: Sequence[str] | None = None) -> int:
    """The whole command: parse, check, serve until a signal; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    explicit_level = "debug" if args.debug else args.log_level
    logs = _LogSetup(None if explicit_level is None else getattr(logging, explicit_level.upper()))
    try:
        try:
            config = build_config(args.services, args.nodes, args.config)
            logs.decide(getattr(logging, config.log_level or "INFO"))
            services = prepare(config)
        except ConfigError as exc:
            logs.decide(logging.INFO)
            _fail(str(exc))
            return EXIT_USAGE
        try:
            trio.run(serve_all, services)
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
            _fail(f"unexpected failure: {leaves[0]!r} (run with -D for details)")
            return EXIT_RUNTIME
        return EXIT_OK
    finally:
        logs.close()
