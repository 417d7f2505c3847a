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
import errno
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, NoReturn
from urllib.parse import quote

import trio

import pht
from pht import proxy
from pht._stats import ChainStats, ServiceStats, Stats

from ._log import JSONFormatter, TextFormatter, open_output
from ._meta import parse_address
from ._metrics import MetricsServer
from ._spec import (
    Address,
    ChainSpec,
    ClientTLS,
    Config,
    ConfigError,
    Credentials,
    DefaultTLS,
    HopSpec,
    MetricsSpec,
    NodeSpec,
    ServerTLS,
    ServiceSpec,
    TLSOptions,
)
from ._url import DIRECT, parse_node, parse_service

__all__ = ["build_config", "build_parser", "run"]

log = logging.getLogger("pht.cli")

Handler = Callable[[trio.abc.Stream], Awaitable[None]]
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


def _version() -> str:
    """The version and the backends in use: base64 codec, TLS library, trio, Python."""
    python = ".".join(str(part) for part in sys.version_info[:3])
    return (
        f"pht {pht.__version__} (base64 {pht.BASE64_BACKEND}, TLS {ssl.OPENSSL_VERSION}, "
        f"trio {trio.__version__}, python {python})"
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
        choices=["debug", "info", "warning", "error"],
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
        "needs pip install 'pht[metrics]'",
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


_SSL_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def apply_tls_options(context: ssl.SSLContext, options: TLSOptions, where: str) -> None:
    """GOST's ``minVersion``/``maxVersion``/``cipherSuites``/``alpn`` on ``context``.

    Cipher suites use OpenSSL's names and bound TLS 1.2 and below (Python's
    ssl module cannot choose TLS 1.3 suites).
    """
    try:
        if options.min_version:
            context.minimum_version = _SSL_VERSIONS[options.min_version]
        if options.max_version:
            context.maximum_version = _SSL_VERSIONS[options.max_version]
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: TLS version not available: {_ssl_reason(exc)}") from None
    if options.cipher_suites:
        try:
            context.set_ciphers(":".join(options.cipher_suites))
        except ssl.SSLError:
            raise ConfigError(
                f"{where}: cipherSuites {','.join(options.cipher_suites)!r}: no usable cipher "
                "(use OpenSSL names such as ECDHE-RSA-AES128-GCM-SHA256)"
            ) from None
    if options.alpn:
        context.set_alpn_protocols(list(options.alpn))


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
    apply_tls_options(context, tls.options, where)
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


_RELAY_FAILURES = {
    0x04: proxy.DialFailure.TIMEOUT,
    0x05: proxy.DialFailure.REFUSED,
    0x06: proxy.DialFailure.HOST_UNREACHABLE,
    0x07: proxy.DialFailure.NETWORK_UNREACHABLE,
}
_SOCKS5_FAILURES = {
    0x03: proxy.DialFailure.NETWORK_UNREACHABLE,
    0x04: proxy.DialFailure.HOST_UNREACHABLE,
    0x05: proxy.DialFailure.REFUSED,
    0x06: proxy.DialFailure.TIMEOUT,
}


def _target_failure(connector: str, exc: proxy.ProxyError) -> proxy.DialFailure:
    """What a hop's refusal code says about the target it could not reach."""
    code = exc.code
    if code is None:
        return proxy.DialFailure.OTHER
    if connector == "relay":
        return _RELAY_FAILURES.get(code, proxy.DialFailure.OTHER)
    if connector == "socks5":
        return _SOCKS5_FAILURES.get(code, proxy.DialFailure.OTHER)
    if connector == "http" and code == 504:
        return proxy.DialFailure.TIMEOUT
    return proxy.DialFailure.OTHER


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, ``__context__``, group members)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        members = getattr(current, "exceptions", None)
        if isinstance(members, tuple):
            todo.extend(member for member in members if isinstance(member, BaseException))
        for inner in (current.__cause__, current.__context__):
            if inner is not None:
                todo.append(inner)


def _cause(exc: BaseException) -> str:
    """An exception in words for a log line: its message, plus the OS's reason
    found deeper in the chain (``Connection refused``), never a repr."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror and exc.errno is not None:
        return exc.strerror
    for inner in _causes(exc):
        if isinstance(inner, OSError) and inner.strerror and inner.errno is not None:
            if inner.strerror not in text:
                text = f"{text} ({inner.strerror})"
            break
    return text


class _HopErrors(trio.abc.Stream):
    """Turns a lazy relay hop's refusal (raised on the first read) into a HopError
    that names the hop, so that the handler's log line and reply say who failed."""

    def __init__(self, transport_stream: trio.abc.Stream, hop: str, connector: str) -> None:
        self.transport_stream = transport_stream
        self._hop = hop
        self._connector = connector

    def _wrap(self, exc: proxy.ProxyError) -> proxy.HopError:
        if isinstance(exc, proxy.ProxyConnectError):
            return proxy.HopError(
                f"{self._hop}: {exc}", target_failure=_target_failure(self._connector, exc)
            )
        return proxy.HopError(f"{self._hop}: {exc}")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self.transport_stream.receive_some(max_bytes)
        except proxy.ProxyError as exc:
            raise self._wrap(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.transport_stream.send_all(data)
        except proxy.ProxyError as exc:
            raise self._wrap(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


def _fold_proxy_hop(chain: ChainSpec, where: str) -> tuple[tuple[HopSpec, ...], dict[int, str]]:
    """The hops to dial, and the forward proxy of each PHT node that has one.

    A PHT hop cannot run inside another hop's stream. Behind one plain HTTP
    proxy hop it needs none: the proxy hop becomes the PHT nodes' ``proxy=``
    (their requests go through it in absolute form) and leaves the chain.
    """
    hops = list(chain.hops)
    proxies: dict[int, str] = {}
    for index, hop in enumerate(hops[1:], start=1):
        if all(node.dialer == "tcp" for node in hop.nodes):
            continue
        before = hops[index - 1].nodes
        if (
            index != 1
            or len(before) != 1
            or (before[0].connector, before[0].dialer) != ("http", "tcp")
            or any(node.dialer != "pht" for node in hop.nodes)
        ):
            raise ConfigError(
                f"{where}: hop {hop.name!r} uses the {hop.nodes[0].dialer} dialer; a "
                "PHT hop can only be first, or second after one plain HTTP proxy "
                "hop (-F http://proxy:port -F socks5+pht://server:port)"
            )
        credentials = ""
        if before[0].auth is not None:
            credentials = (
                f"{quote(before[0].auth.username, safe='')}:"
                f"{quote(before[0].auth.password, safe='')}@"
            )
        for node in hop.nodes:
            proxies[id(node)] = node.proxy or f"http://{credentials}{before[0].addr}"
    if proxies:
        del hops[0]
    return tuple(hops), proxies


def _proxy_url(proxy: str | None) -> str | None:
    return None if proxy in (None, DIRECT) else proxy


class ChainDialer:
    """Opens a connection to ``(host, port)`` through the hops of a chain.

    The first hop is dialled directly (TCP or a PHT tunnel; with several nodes,
    each connection starts at the next one and the others are tried if it
    cannot be reached). Then each hop's connector asks its node to connect to
    the next hop's node, and the last one to the target. A PHT hop needs HTTP
    connections of its own, so it can follow only a plain HTTP proxy hop
    (``-F http://proxy:3128 -F socks5+pht://server``): its requests then go
    through that proxy in absolute form, without CONNECT.

    Failures raise :class:`pht.proxy.HopError` naming the hop and the cause,
    with ``target_failure`` set only when a hop reported that the target
    (not the hop itself) cannot be reached.
    """

    def __init__(self, chain: ChainSpec, stats: ChainStats | None = None) -> None:
        self.chain = chain
        self.stats = stats if stats is not None else ChainStats(chain.name)
        where = f"chain {chain.name!r}"
        self._hops, self._proxies = _fold_proxy_hop(chain, where)
        self._environment_proxies(self._hops[0])
        self._selectors = [_RoundRobin(len(hop.nodes)) for hop in self._hops]
        self._contexts: dict[int, ssl.SSLContext] = {}
        for hop in self._hops:
            for node in hop.nodes:
                if node.dialer == "phts":
                    self._contexts[id(node)] = client_context(
                        node.tls, f"{where}, {hop.name}, {node.name}"
                    )

    def _environment_proxies(self, first: HopSpec) -> None:
        """``http_proxy``/``no_proxy`` for the first hop's pht nodes that name no proxy.

        Like curl and every HTTP client: a PHT tunnel is HTTP, so the proxy
        the environment names carries it (absolute form, no CONNECT), unless
        ``no_proxy`` covers the server or the node says ``proxy=direct``.
        ``https_proxy`` is not used: a phts tunnel would need CONNECT.
        """
        url = urllib.request.getproxies_environment().get("http")
        if not url:
            return
        for node in first.nodes:
            if node.dialer != "pht" or node.proxy is not None or id(node) in self._proxies:
                continue
            if urllib.request.proxy_bypass(node.addr.host):
                continue
            log.info(
                "%s: %s://%s goes through the http_proxy of the environment",
                self.chain.name,
                node.scheme,
                node.addr,
            )
            self._proxies[id(node)] = url

    def describe(self) -> str:
        return " -> ".join(
            ",".join(f"{node.scheme}://{node.addr}" for node in hop.nodes)
            for hop in self.chain.hops
        )

    @staticmethod
    def _label(hop: HopSpec, node: NodeSpec) -> str:
        return f"{hop.name} ({node.scheme}://{node.addr})"

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
            proxy=_proxy_url(self._proxies.get(id(node), node.proxy)),
        )

    def _open_failure(self, hop: HopSpec, node: NodeSpec, exc: BaseException) -> str:
        cause = _cause(exc)
        hint = ""
        chain = list(_causes(exc))
        reset = any(
            isinstance(inner, OSError) and inner.errno in (errno.ECONNRESET, errno.EPIPE)
            for inner in chain
        )
        # (A phts client meeting a plain server gets the library's own hint.)
        if node.dialer == "pht" and (reset or "Connection reset" in cause):
            # A TLS server drops a plain HTTP request.
            hint = " (is it a phts server? then write phts://)"
        return f"{self._label(hop, node)}: {cause}{hint}"

    async def _connect(
        self, node: NodeSpec, stream: trio.abc.Stream, target: Address
    ) -> trio.abc.Stream:
        auth = _auth(node.auth)
        with trio.fail_after(node.connect_timeout or float("inf")):
            if node.connector == "http":
                return await proxy.http_connect(stream, target.host, target.port, auth=auth)
            if node.connector == "socks5":
                return await proxy.socks5_connect(stream, target.host, target.port, auth=auth)
            if node.connector == "relay":
                return await proxy.relay_connect(
                    stream, target.host, target.port, auth=auth, lazy=not node.nodelay
                )
        # forward: the node itself forwards the stream to its own target.
        return stream

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        hops = self._hops
        path = [hop.nodes[sel.order()[0]] for hop, sel in zip(hops, self._selectors, strict=True)]
        failures: list[str] = []
        stream: trio.abc.Stream | None = None
        for index in self._selectors[0].order():
            first = hops[0].nodes[index]
            try:
                stream = await self._open(first)
                path[0] = first
                break
            except (OSError, pht.PHTError, trio.BrokenResourceError) as exc:
                self.stats.error(first.name)
                failures.append(self._open_failure(hops[0], first, exc))
                log.debug("%s: %s", self.chain.name, failures[-1])
        if stream is None:
            raise proxy.HopError("; ".join(failures))
        try:
            for position, node in enumerate(path):
                last = position + 1 == len(path)
                target = Address(host, port) if last else path[position + 1].addr
                try:
                    stream = await self._step(hops[position], node, stream, target, last)
                except proxy.HopError:
                    self.stats.error(node.name)
                    raise
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def _step(
        self, hop: HopSpec, node: NodeSpec, stream: trio.abc.Stream, target: Address, last: bool
    ) -> trio.abc.Stream:
        """Run ``node``'s connector; failures become HopError naming the hop."""
        label = self._label(hop, node)
        try:
            stream = await self._connect(node, stream, target)
        except proxy.ProxyConnectError as exc:
            # The hop answered: it cannot reach what it was asked for. That is
            # the target's fault only on the last hop.
            failure = _target_failure(node.connector, exc) if last else None
            raise proxy.HopError(f"{label}: {exc}", target_failure=failure) from exc
        except (proxy.ProxyError, OSError, trio.BrokenResourceError) as exc:
            raise proxy.HopError(f"{label}: {_cause(exc)}") from exc
        except trio.TooSlowError:
            raise proxy.HopError(
                f"{label}: no answer within connectTimeout={node.connect_timeout or 0:g}s"
            ) from None
        if node.connector == "relay" and not node.nodelay:
            stream = _HopErrors(stream, label, node.connector)
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


class _CountingStream(trio.abc.Stream):
    """Counts the bytes read from and written to a client into the service's stats."""

    def __init__(self, transport_stream: trio.abc.Stream, stats: ServiceStats) -> None:
        self.transport_stream = transport_stream
        self._stats = stats
        remote = getattr(transport_stream, "remote_address", None)
        if isinstance(remote, str):
            self.remote_address = remote

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.transport_stream.receive_some(max_bytes)
        self._stats.transferred(received=len(data))
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)
        self._stats.transferred(sent=len(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


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
    ) -> None:
        self.spec = spec
        self.make_handler = make_handler
        self.dial = dial
        self.route = route
        self.tls = tls
        self.stats = stats if stats is not None else ServiceStats(spec.name)

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
        stats = self.stats
        failed = False
        started = trio.current_time()
        stats.request_started()

        async def dial(host: str, port: int) -> trio.abc.Stream:
            nonlocal failed
            target = Address(host, port)
            try:
                upstream = await self.dial(host, port)
            except Exception as exc:
                # The handler logs the failure (WARNING) and answers it.
                failed = True
                log.debug("%s: %s -> %s: %s", name, peer, target, _cause(exc))
                raise
            log.info("%s: %s -> %s opened", name, peer, target)
            return upstream

        try:
            await self.make_handler(dial)(_CountingStream(stream, stats))
        except (trio.BrokenResourceError, trio.ClosedResourceError, pht.PHTError) as exc:
            failed = True
            log.warning("%s: %s: connection failed: %s", name, peer, _cause(exc))
        except Exception as exc:
            failed = True
            # A bug, not a network event: say so, the traceback at DEBUG.
            log.error(
                "%s: %s: internal error: %s: %s (run with -D for the traceback)",
                name,
                peer,
                type(exc).__name__,
                exc,
            )
            log.debug("%s: traceback", name, exc_info=True)
        finally:
            stats.request_finished(trio.current_time() - started, failed=failed)
            await trio.aclose_forcefully(stream)


def prepare(config: Config, stats: Stats | None = None) -> list[Service]:
    """Build every service (handlers, chains, TLS contexts) or raise ConfigError.

    Their counters go to ``stats`` (a fresh :class:`Stats` if not given).
    """
    if stats is None:
        stats = Stats()
    dialers: dict[str, ChainDialer] = {}
    for chain in config.chains:
        dialers[chain.name] = ChainDialer(chain, stats.chain(chain.name))
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


async def serve_all(services: Sequence[Service], metrics: MetricsServer | None = None) -> None:
    """Start every service (all or none) and the metrics endpoint, then run until a signal."""
    failure: str | None = None
    async with trio.open_nursery() as nursery:
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
        if failure is None:
            log.info("%s: running", _version())
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
    logs = _LogSetup()
    try:
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
            services = prepare(config, stats)
            metrics = MetricsServer(config.metrics, stats) if config.metrics else None
        except ConfigError as exc:
            logs.decide(logging.INFO)
            _fail(str(exc))
            return EXIT_USAGE
        try:
            trio.run(serve_all, services, metrics)
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
