"""The client side of a chain: hops of nodes, each dialled or asked through the one before.

:class:`ChainDialer` opens a connection to a target through the ``-F`` hops
(or a YAML chain); its failures are :class:`pht.proxy.HopError`, which names
the hop and the cause, so that handlers answer and log them correctly.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import quote

import anyio
import anyio.abc
import trio

import pht
from pht import proxy
from pht._stats import ChainStats

from ._backend import Backend, open_pht
from ._spec import Address, ChainSpec, Credentials, HopSpec, NodeSpec
from ._tls import client_context
from ._url import DIRECT

__all__ = ["ChainDialer", "RoundRobin", "describe_cause", "to_auth"]

log = logging.getLogger("pht.cli")

#: ``open_pht``'s ``open_transport``: a stream to ``(host, port)``.
_Opener = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]


#: What a failed tunnel or connection open raises (the trio client may raise trio's).
_OPEN_ERRORS = (OSError, pht.PHTError, anyio.BrokenResourceError, trio.BrokenResourceError)


def to_auth(credentials: Credentials | None) -> proxy.Auth | None:
    if credentials is None:
        return None
    return proxy.Auth(credentials.username, credentials.password)


class RoundRobin:
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


def _os_reason(exc: OSError) -> str:
    """The OS's words for an error: asyncio puts its own text in ``strerror``
    ("Connect call failed ('127.0.0.1', 1)"); resolver errors keep theirs."""
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno)
    return str(exc.strerror)


def describe_cause(exc: BaseException) -> str:
    """An exception in words for a log line: its message, plus the OS's reason
    found deeper in the chain (``Connection refused``), never a repr."""
    if isinstance(exc, (TimeoutError, trio.TooSlowError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror and exc.errno is not None:
        return _os_reason(exc)
    for inner in _causes(exc):
        if isinstance(inner, OSError) and inner.strerror and inner.errno is not None:
            reason = _os_reason(inner)
            if reason not in text:
                text = f"{text} ({reason})"
            break
    return text


class _HopErrors(anyio.abc.ByteStream):
    """Turns a lazy relay hop's refusal (raised on the first read) into a HopError
    that names the hop, so that the handler's log line and reply say who failed."""

    def __init__(self, transport_stream: anyio.abc.ByteStream, hop: str, connector: str) -> None:
        self.transport_stream = transport_stream
        self._hop = hop
        self._connector = connector

    def _wrap(self, exc: proxy.ProxyError) -> proxy.HopError:
        if isinstance(exc, proxy.ProxyConnectError):
            return proxy.HopError(
                f"{self._hop}: {exc}", target_failure=_target_failure(self._connector, exc)
            )
        return proxy.HopError(f"{self._hop}: {exc}")

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self.transport_stream.receive(max_bytes)
        except proxy.ProxyError as exc:
            raise self._wrap(exc) from exc

    async def send(self, item: bytes) -> None:
        try:
            await self.transport_stream.send(item)
        except proxy.ProxyError as exc:
            raise self._wrap(exc) from exc

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


def _fold_proxy_hop(chain: ChainSpec) -> tuple[tuple[HopSpec, ...], dict[int, str]]:
    """The hops to dial, and the forward proxy of each PHT node that has one.

    Behind one plain HTTP proxy hop a PHT hop needs no CONNECT: the proxy hop
    becomes the PHT nodes' ``proxy=`` (their requests go through it in
    absolute form) and leaves the chain. A PHT hop anywhere else opens its
    HTTP connections through the hops before it.
    """
    hops = list(chain.hops)
    if len(hops) < 2:
        return tuple(hops), {}
    before, hop = hops[0].nodes, hops[1]
    if (
        len(before) != 1
        or (before[0].connector, before[0].dialer) != ("http", "tcp")
        or any(node.dialer != "pht" for node in hop.nodes)
    ):
        return tuple(hops), {}
    credentials = ""
    if before[0].auth is not None:
        credentials = (
            f"{quote(before[0].auth.username, safe='')}:{quote(before[0].auth.password, safe='')}@"
        )
    proxies = {
        id(node): node.proxy or f"http://{credentials}{before[0].addr}" for node in hop.nodes
    }
    return tuple(hops[1:]), proxies


def _proxy_url(proxy: str | None) -> str | None:
    return None if proxy in (None, DIRECT) else proxy


class ChainDialer:
    """Opens a connection to ``(host, port)`` through the hops of a chain.

    The first hop is dialled directly (TCP or a PHT tunnel; with several nodes,
    each connection starts at the next one and the others are tried if it
    cannot be reached). Then each hop's connector asks its node to connect to
    the next hop's node, and the last one to the target. A PHT hop may stand
    anywhere: it opens each of its HTTP connections through the hops before
    it (``open_transport`` of either client, so on every loop). Right after one plain HTTP
    proxy hop (``-F http://proxy:3128 -F socks5+pht://server``) its requests
    go through that proxy in absolute form instead, without CONNECT.

    Failures raise :class:`pht.proxy.HopError` naming the hop and the cause,
    with ``target_failure`` set only when a hop reported that the target
    (not the hop itself) cannot be reached.
    """

    def __init__(
        self, chain: ChainSpec, stats: ChainStats | None = None, backend: Backend | None = None
    ) -> None:
        self.chain = chain
        self.backend = backend if backend is not None else Backend("trio")
        self.stats = stats if stats is not None else ChainStats(chain.name)
        where = f"chain {chain.name!r}"
        self._hops, self._proxies = _fold_proxy_hop(chain)
        self._environment_proxies(self._hops[0])
        self._selectors = [RoundRobin(len(hop.nodes)) for hop in self._hops]
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

    async def _open(
        self, node: NodeSpec, open_transport: _Opener | None = None
    ) -> anyio.abc.ByteStream:
        if node.dialer == "tcp":
            if open_transport is not None:
                return await open_transport(node.addr.host, node.addr.port)
            return await anyio.connect_tcp(node.addr.host, node.addr.port)
        return await open_pht(
            self.backend,
            node.addr.host,
            node.addr.port,
            tls=self._contexts.get(id(node)),
            open_transport=open_transport,
            server_hostname=node.tls.server_name,
            authorize_path=node.paths.authorize_path,
            push_path=node.paths.push_path,
            pull_path=node.paths.pull_path,
            headers=list(node.headers) or None,
            host_header=node.host_header,
            proxy=_proxy_url(self._proxies.get(id(node), node.proxy)),
            push_window=node.push_window,
            resume=node.resume,
        )

    def _open_failure(self, hop: HopSpec, node: NodeSpec, exc: BaseException) -> str:
        cause = describe_cause(exc)
        hint = ""
        chain = list(_causes(exc))
        reset = any(
            isinstance(inner, OSError) and inner.errno in (errno.ECONNRESET, errno.EPIPE)
            for inner in chain
        )
        # (A phts client meeting a plain server gets the library's own hint.)
        dropped = reset or "Connection reset" in cause or "closed the connection without" in cause
        if node.dialer == "pht" and dropped:
            # A TLS server drops a plain HTTP request (a reset, or on asyncio
            # often a plain close before any answer).
            hint = " (is it a phts server? then write phts://)"
        return f"{self._label(hop, node)}: {cause}{hint}"

    async def _connect(
        self, node: NodeSpec, stream: anyio.abc.ByteStream, target: Address
    ) -> anyio.abc.ByteStream:
        auth = to_auth(node.auth)
        with anyio.fail_after(node.connect_timeout or None):
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

    async def __call__(self, host: str, port: int) -> anyio.abc.ByteStream:
        # The first hop's node is chosen (with failover) as it is dialled.
        path = [self._hops[0].nodes[0]]
        for hop, selector in zip(self._hops[1:], self._selectors[1:], strict=True):
            path.append(hop.nodes[selector.order()[0]])
        return await self._through(len(path) - 1, path, Address(host, port), last=True)

    async def _through(
        self,
        position: int,
        path: list[NodeSpec],
        target: Address,
        *,
        last: bool = False,
        for_pht: bool = False,
    ) -> anyio.abc.ByteStream:
        """A stream to ``target`` through the nodes of ``path`` up to ``position``."""
        hop, node = self._hops[position], path[position]
        stream = await self._reach(position, path)
        try:
            try:
                return await self._step(hop, node, stream, target, last=last, for_pht=for_pht)
            except proxy.HopError:
                self.stats.error(path[position].name)
                raise
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise

    async def _reach(self, position: int, path: list[NodeSpec]) -> anyio.abc.ByteStream:
        """A stream to the service of ``path[position]``, through the nodes before it.

        On the first hop, a node that cannot be reached is skipped for the next.
        """
        if position == 0:
            return await self._open_first(path)
        hop, node = self._hops[position], path[position]

        if node.dialer == "tcp":
            return await self._through(position - 1, path, node.addr)

        async def open_transport(host: str, port: int) -> anyio.abc.ByteStream:
            return await self._through(position - 1, path, Address(host, port), for_pht=True)

        try:
            return await self._open(node, open_transport)
        except _OPEN_ERRORS as exc:
            if not any(isinstance(inner, proxy.HopError) for inner in _causes(exc)):
                self.stats.error(node.name)  # (a hop before it failed: counted there)
            raise proxy.HopError(self._open_failure(hop, node, exc)) from exc

    async def _open_first(self, path: list[NodeSpec]) -> anyio.abc.ByteStream:
        hop = self._hops[0]
        failures: list[str] = []
        for index in self._selectors[0].order():
            node = hop.nodes[index]
            try:
                stream = await self._open(node)
            except _OPEN_ERRORS as exc:
                self.stats.error(node.name)
                failures.append(self._open_failure(hop, node, exc))
                log.debug("%s: %s", self.chain.name, failures[-1])
                continue
            path[0] = node
            return stream
        raise proxy.HopError("; ".join(failures))

    async def _step(
        self,
        hop: HopSpec,
        node: NodeSpec,
        stream: anyio.abc.ByteStream,
        target: Address,
        *,
        last: bool,
        for_pht: bool,
    ) -> anyio.abc.ByteStream:
        """Run ``node``'s connector; failures become HopError naming the hop.

        A lazy relay hop (not ``nodelay``) reports a refusal on the first
        read: as a HopError naming it, except under a PHT hop's HTTP
        connection, whose client handles the relay's own (pht) error.
        """
        label = self._label(hop, node)
        try:
            stream = await self._connect(node, stream, target)
        except TimeoutError:
            # (Before OSError, which TimeoutError is.)
            raise proxy.HopError(
                f"{label}: no answer within connectTimeout={node.connect_timeout or 0:g}s"
            ) from None
        except proxy.ProxyConnectError as exc:
            # The hop answered: it cannot reach what it was asked for. That is
            # the target's fault only on the last hop.
            failure = _target_failure(node.connector, exc) if last else None
            raise proxy.HopError(f"{label}: {exc}", target_failure=failure) from exc
        except (proxy.ProxyError, OSError, anyio.BrokenResourceError) as exc:
            raise proxy.HopError(f"{label}: {describe_cause(exc)}") from exc
        if node.connector == "relay" and not node.nodelay and not for_pht:
            stream = _HopErrors(stream, label, node.connector)
        return stream
