"""Parse GOST's ``-L`` (service) and ``-F`` (chain hop) URLs.

``-L [HANDLER][+LISTENER]://[USER:PASS@][HOST]:PORT[/TARGET[,TARGET...]][?KEY=VALUE&...]``
``-F [CONNECTOR][+DIALER]://[USER:PASS@]HOST:PORT[,HOST:PORT...][?KEY=VALUE&...]``

The rules follow GOST's ``config/cmd`` package: one scheme word names both
parts; a handler name GOST does not know becomes ``auto`` and a listener name
it does not know becomes ``tcp``; a path lists forward targets; the query holds
metadata. Names that GOST knows but ``pht`` does not implement (``ws``, ``tls``,
``ss``, ...) are refused with a clear message instead of silently becoming
something else.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from collections.abc import Mapping
from typing import TypeVar
from urllib.parse import parse_qsl, unquote

from .. import _server_session
from ._meta import Metadata, parse_address
from ._spec import (
    DEFAULT_AUTHORIZE_PATH,
    DEFAULT_BACKLOG,
    DEFAULT_PULL_PATH,
    DEFAULT_PUSH_PATH,
    DEFAULT_PUSH_WINDOW,
    ClientTLS,
    ConfigError,
    ConnectorType,
    Credentials,
    DialerType,
    HandlerType,
    HopSpec,
    ListenerResume,
    ListenerType,
    NodeSpec,
    PHTPaths,
    ServerTLS,
    ServiceSpec,
    TLSOptions,
)

__all__ = [
    "HANDLERS",
    "LISTENERS",
    "client_tls",
    "dialer_tls",
    "listener_resume",
    "node_paths",
    "normalize_connector",
    "normalize_dialer",
    "normalize_handler",
    "normalize_listener",
    "parse_node",
    "parse_service",
    "server_paths",
    "server_tls",
    "tls_options",
    "trusted_proxies",
]

log = logging.getLogger("pht.cli")

HANDLERS: dict[str, HandlerType] = {
    "auto": "auto",
    "http": "http",
    "socks5": "socks5",
    "socks": "socks5",
    "socks4": "socks4",
    "socks4a": "socks4",
    "relay": "relay",
    "forward": "forward",
    "tcp": "tcp",
}
LISTENERS: dict[str, ListenerType] = {"tcp": "tcp", "pht": "pht", "phts": "phts"}
CONNECTORS: dict[str, ConnectorType] = {
    "http": "http",
    "socks5": "socks5",
    "socks": "socks5",
    "relay": "relay",
    "forward": "forward",
}
DIALERS: dict[str, DialerType] = {"tcp": "tcp", "pht": "pht", "phts": "phts"}

# Names GOST has in its registries that pht does not implement. GOST would
# honour them; pht refuses them rather than run something else under the name.
_GOST_HANDLERS = frozenset(
    [
        "dns",
        "file",
        "http2",
        "http3",
        "metrics",
        "red",
        "redir",
        "redirect",
        "redu",
        "router",
        "rtcp",
        "rudp",
        "serial",
        "sni",
        "ss",
        "ssu",
        "sshd",
        "tap",
        "tun",
        "tunnel",
        "udp",
        "unix",
        "runix",
    ]
)
_GOST_TRANSPORTS = frozenset(
    [
        "dtls",
        "dns",
        "ftcp",
        "grpc",
        "h2",
        "h2c",
        "h3",
        "http2",
        "http3",
        "icmp",
        "kcp",
        "mtcp",
        "mtls",
        "mwss",
        "mws",
        "obfs-http",
        "obfs-tls",
        "ohttp",
        "otls",
        "quic",
        "red",
        "redir",
        "redu",
        "rtcp",
        "rudp",
        "runix",
        "serial",
        "ssh",
        "sshd",
        "stdio",
        "tap",
        "tls",
        "tun",
        "udp",
        "unix",
        "wg",
        "wss",
        "ws",
        "wt",
    ]
)
_GOST_CONNECTORS = frozenset(
    [
        "direct",
        "http2",
        "router",
        "serial",
        "sni",
        "socks4",
        "socks4a",
        "ss",
        "ssu",
        "sshd",
        "tunnel",
        "unix",
        "virtual",
    ]
)


_Name = TypeVar("_Name", bound=str)


def _normalize(
    name: str,
    table: Mapping[str, _Name],
    gost_names: frozenset[str],
    fallback: _Name,
    *,
    role: str,
    where: str,
    strict: bool,
) -> _Name:
    """GOST's rule: a known name maps to pht's, one GOST has but pht lacks is an
    error, and any other name falls back to ``fallback`` (unless ``strict``)."""
    name = name.strip().lower()
    if name in table:
        return table[name]
    if name in gost_names or strict:
        choices = ", ".join(sorted(set(table)))
        raise ConfigError(
            f"{where}: {role} {name!r} is not supported by pht (use one of: {choices})"
        )
    return fallback


def normalize_handler(name: str, *, where: str, strict: bool = False) -> HandlerType:
    """Map a handler name to pht's; unknown names become ``auto`` unless ``strict``."""
    return _normalize(
        name, HANDLERS, _GOST_HANDLERS, "auto", role="handler", where=where, strict=strict
    )


def normalize_listener(name: str, *, where: str, strict: bool = False) -> ListenerType:
    """Map a listener name to pht's; unknown names become ``tcp`` unless ``strict``."""
    return _normalize(
        name, LISTENERS, _GOST_TRANSPORTS, "tcp", role="listener", where=where, strict=strict
    )


def normalize_connector(name: str, *, where: str, strict: bool = False) -> ConnectorType:
    """Map a connector name to pht's; unknown names become ``http`` unless ``strict``."""
    return _normalize(
        name, CONNECTORS, _GOST_CONNECTORS, "http", role="connector", where=where, strict=strict
    )


def normalize_dialer(name: str, *, where: str, strict: bool = False) -> DialerType:
    """Map a dialer name to pht's; unknown names become ``tcp`` unless ``strict``."""
    return _normalize(
        name, DIALERS, _GOST_TRANSPORTS, "tcp", role="dialer", where=where, strict=strict
    )


def server_paths(meta: Metadata) -> PHTPaths:
    return PHTPaths(
        authorize_path=meta.path("authorizePath", DEFAULT_AUTHORIZE_PATH),
        push_path=meta.path("pushPath", DEFAULT_PUSH_PATH),
        pull_path=meta.path("pullPath", DEFAULT_PULL_PATH),
    )


node_paths = server_paths


def server_tls(meta: Metadata) -> ServerTLS | None:
    """``certFile``/``keyFile``/``caFile`` of a listener; None without a certificate."""
    cert_file = meta.string("certFile")
    key_file = meta.string("keyFile")
    ca_file = meta.string("caFile")
    if not cert_file:
        if key_file:
            raise ConfigError(f"{meta.where}: keyFile given without certFile")
        if ca_file:
            log.debug("%s: caFile without certFile: ignored", meta.where)
        return None
    return ServerTLS(cert_file=cert_file, key_file=key_file or None, ca_file=ca_file or None)


def trusted_proxies(meta: Metadata, listener: ListenerType) -> tuple[str, ...]:
    """``trustedProxies=10.0.0.0/8,127.0.0.1``: the reverse proxies a PHT listener believes.

    Requests from these addresses name the real client in ``X-Forwarded-For``
    or ``X-Real-IP``; from anyone else those headers are ignored (a client
    could write anything there). Each entry is an address or a network; they
    come back as networks (``127.0.0.1/32``).
    """
    entries = meta.strings("trustedProxies")
    if not entries:
        return ()
    if listener == "tcp":
        raise ConfigError(
            f"{meta.where}: trustedProxies needs a pht or phts listener "
            "(a tcp listener sees no HTTP headers)"
        )
    networks = []
    for entry in entries:
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise ConfigError(
                f"{meta.where}: trustedProxies: {entry!r} is not an IP address or network "
                "(e.g. 10.0.0.0/8,127.0.0.1)"
            ) from None
    return tuple(networks)


_TLS_VERSIONS = {
    "versiontls10": "1.0",
    "versiontls11": "1.1",
    "versiontls12": "1.2",
    "versiontls13": "1.3",
    "tls1.0": "1.0",
    "tls1.1": "1.1",
    "tls1.2": "1.2",
    "tls1.3": "1.3",
    "1.0": "1.0",
    "1.1": "1.1",
    "1.2": "1.2",
    "1.3": "1.3",
}


def _tls_version(meta: Metadata, key: str) -> str | None:
    value = meta.string(key)
    if not value:
        return None
    text = value.strip().lower()
    if text.startswith("tlsv"):  # TLSv1.2, OpenSSL's spelling
        text = "tls" + text[4:]
    version = _TLS_VERSIONS.get(text)
    if version is None:
        raise ConfigError(
            f"{meta.where}: {key}={value!r} is not a TLS version "
            "(VersionTLS10, VersionTLS11, VersionTLS12 or VersionTLS13)"
        )
    return version


def tls_options(meta: Metadata) -> TLSOptions:
    """GOST's TLS ``options``: ``minVersion``, ``maxVersion``, ``cipherSuites``, ``alpn``."""
    return TLSOptions(
        min_version=_tls_version(meta, "minVersion"),
        max_version=_tls_version(meta, "maxVersion"),
        cipher_suites=meta.strings("cipherSuites"),
        alpn=meta.strings("alpn"),
    )


def client_tls(meta: Metadata) -> ClientTLS:
    key_file = meta.string("keyFile")
    cert_file = meta.string("certFile")
    if key_file and not cert_file:
        raise ConfigError(f"{meta.where}: keyFile given without certFile")
    return ClientTLS(
        secure=bool(meta.boolean("secure")),
        server_name=meta.string("serverName") or None,
        ca_file=meta.string("caFile") or None,
        cert_file=cert_file or None,
        key_file=key_file or None,
        options=tls_options(meta),
    )


def dialer_tls(tls: ClientTLS, dialer: DialerType, where: str) -> ClientTLS:
    """``tls`` for a phts dialer; for any other, a WARNING and no TLS settings.

    ``-F pht://server?secure=true`` sends plain HTTP: saying nothing would let
    the user believe the server is verified.
    """
    if dialer == "phts" or tls == ClientTLS():
        return tls
    log.warning(
        "%s: TLS options (secure, serverName, caFile, certFile, ...) are used only by a "
        "phts dialer: ignored, this %s node does not encrypt (did you mean phts://?)",
        where,
        dialer,
    )
    return ClientTLS()


def _split_url(text: str, *, where: str) -> tuple[str, str, str, str, str]:
    """Cut ``scheme://userinfo@hostport/path?query`` into its five parts (no decoding)."""
    scheme, _, rest = text.partition("://")
    if not scheme:
        raise ConfigError(f"{where}: missing scheme before '://'")
    rest = rest.split("#", 1)[0]
    end = len(rest)
    for stop in "/?":
        index = rest.find(stop)
        if 0 <= index < end:
            end = index
    authority, tail = rest[:end], rest[end:]
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        userinfo = ""
    path, _, query = tail.partition("?")
    return scheme.lower(), userinfo if at else "", hostport, path, query


def _credentials(userinfo: str, meta: Metadata) -> Credentials | None:
    """``USER:PASS@`` (percent-decoded), else GOST's ``auth=base64(user:pass)`` option."""
    encoded = meta.string("auth")
    if userinfo:
        username, _, password = userinfo.partition(":")
        return Credentials(unquote(username), unquote(password))
    if encoded:
        padded = encoded + "=" * (-len(encoded) % 4)
        try:
            try:
                raw = base64.urlsafe_b64decode(padded)
            except binascii.Error:
                raw = base64.b64decode(padded)
            text = raw.decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ConfigError(
                f"{meta.where}: auth={encoded!r} is not base64 of user:password"
            ) from None
        username, _, password = text.partition(":")
        return Credentials(username, password)
    return None


def _metadata(query: str, *, where: str) -> Metadata:
    return Metadata(parse_qsl(query, keep_blank_values=True), where=where)


def _schemes(scheme: str, *, where: str) -> tuple[str, str]:
    parts = scheme.split("+")
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigError(f"{where}: scheme {scheme!r} has more than two parts")


def parse_service(text: str, *, name: str = "service-0") -> ServiceSpec:
    """Parse one ``-L`` value into a :class:`ServiceSpec`."""
    where = f"-L {text!r}"
    text = text.strip()
    if not text:
        raise ConfigError("-L: empty service")
    if text.startswith(":") or "://" not in text:
        text = "auto://" + text
    scheme, userinfo, hostport, path, query = _split_url(text, where=where)
    if scheme == "https":
        scheme = "http+tls"
    handler_name, listener_name = _schemes(scheme, where=where)
    handler = normalize_handler(handler_name, where=where)
    listener = normalize_listener(listener_name, where=where)
    listen = parse_address(hostport, where=where, allow_zero_port=True)
    meta = _metadata(query, where=where)

    targets = tuple(
        parse_address(item, where=f"{where}: target", default_host="localhost")
        for item in path.strip("/").split(",")
        if item
    )
    if targets and handler != "relay":
        handler = "tcp" if listener == "tcp" else "forward"
    if handler in ("forward", "tcp") and not targets:
        raise ConfigError(
            f"{where}: handler {handler!r} needs a target: write {scheme}://{hostport}/HOST:PORT"
        )

    auth = _credentials(userinfo, meta)
    paths = server_paths(meta)
    backlog = meta.integer("backlog", minimum=0) or DEFAULT_BACKLOG
    trusted = trusted_proxies(meta, listener)
    pull_max_bytes = meta.integer("pullMaxBytes", minimum=1)
    pull_max_ms = meta.integer("pullMaxMs", minimum=1)
    resume = listener_resume(meta, listener)
    tls = server_tls(meta)
    if tls is not None and listener != "phts":
        log.warning("%s: TLS files are used only by a phts listener: ignored", where)
        tls = None
    options = tls_options(meta)
    nodelay = bool(meta.boolean("nodelay"))
    if nodelay and handler != "relay":
        log.warning("%s: nodelay is a relay handler option: it has no effect here", where)
    meta.boolean("notls")  # pht's SOCKS5 never offers GOST's TLS method
    meta.report_unused()
    return ServiceSpec(
        name=name,
        listen=listen,
        handler=handler,
        listener=listener,
        auth=auth,
        targets=targets,
        paths=paths,
        backlog=backlog,
        tls=tls,
        tls_options=options,
        nodelay=nodelay,
        trusted_proxies=trusted,
        pull_max_bytes=pull_max_bytes,
        pull_max_ms=pull_max_ms,
        resume=resume,
    )


def listener_resume(meta: Metadata, listener: ListenerType) -> ListenerResume:
    """The resume extension as a PHT listener serves it (docs/resume.md).

    ``resume=false`` serves plain PHT to every client; ``resumeWindow``
    (bytes) and ``gracePeriod`` (a duration in whole seconds) set the replay
    window and the grace period; ``legacyGrace=true`` gives sessions without
    the extension (GOST's clients) a grace period too.
    """
    enabled = meta.boolean("resume")
    window = meta.integer("resumeWindow", minimum=1)
    grace = meta.seconds("gracePeriod")
    legacy = meta.boolean("legacyGrace")
    given = [enabled, window, grace, legacy]
    if listener == "tcp":
        if any(value is not None for value in given):
            raise ConfigError(
                f"{meta.where}: resume, resumeWindow, gracePeriod and legacyGrace "
                "need a pht or phts listener"
            )
        return ListenerResume()
    if grace is not None and not grace.is_integer():
        raise ConfigError(f"{meta.where}: gracePeriod must be whole seconds, got {grace:g}s")
    settings = ListenerResume(
        enabled=enabled is not False,
        window=window,
        grace_period=None if grace is None else int(grace),
        legacy_grace=bool(legacy),
    )
    defaults = _server_session.ServerOptions()
    try:  # the library's own checks, with its messages
        _server_session.ServerOptions(
            resume_window=defaults.resume_window if window is None else window,
            grace_period=defaults.grace_period if grace is None else int(grace),
        )
    except ValueError as exc:
        raise ConfigError(f"{meta.where}: {exc}") from None
    return settings


#: ``proxy=direct``: no forward proxy, whatever ``http_proxy`` says.
DIRECT = "direct"


def node_push_window(meta: Metadata, dialer: DialerType) -> int:
    """``pushWindow=N``: how many pushes a pht/phts node keeps awaiting their answer."""
    window = meta.integer("pushWindow", minimum=1)
    if window is None:
        return DEFAULT_PUSH_WINDOW
    if dialer == "tcp":
        raise ConfigError(f"{meta.where}: pushWindow works with the pht and phts dialers only")
    return window


def node_resume(meta: Metadata, dialer: DialerType) -> bool:
    """``resume=true``: a pht/phts node offers the resume extension (docs/resume.md)."""
    resume = meta.boolean("resume")
    if resume and dialer == "tcp":
        raise ConfigError(f"{meta.where}: resume works with the pht and phts dialers only")
    return bool(resume)


def node_proxy(meta: Metadata, dialer: DialerType) -> str | None:
    """``proxy=http://[user:pass@]host:port``: a forward HTTP proxy for a pht dialer.

    ``proxy=direct`` (or ``none``) returns :data:`DIRECT`: connect directly
    even if the ``http_proxy`` environment variable names a proxy.
    """
    proxy = meta.string("proxy")
    if not proxy:
        return None
    if proxy.strip().lower() in (DIRECT, "none"):
        return DIRECT
    if not proxy.lower().startswith("http://"):
        raise ConfigError(
            f"{meta.where}: proxy={proxy!r} must look like http://[user:pass@]host:port"
        )
    if dialer != "pht":
        raise ConfigError(
            f"{meta.where}: proxy= works with the pht dialer only (the proxy sees plain "
            f"HTTP requests; a {dialer} dialer cannot use it)"
        )
    return proxy


def parse_node(text: str, *, name: str = "hop-0") -> HopSpec:
    """Parse one ``-F`` value into a :class:`HopSpec` (one node per listed address)."""
    where = f"-F {text!r}"
    text = text.strip()
    if not text:
        raise ConfigError("-F: empty node")
    if text.startswith(":") or "://" not in text:
        text = "auto://" + text
    scheme, userinfo, hostport, path, query = _split_url(text, where=where)
    if scheme == "https":
        scheme = "http+tls"
    connector_name, dialer_name = _schemes(scheme, where=where)
    connector = normalize_connector(connector_name, where=where)
    dialer = normalize_dialer(dialer_name, where=where)
    if path.strip("/"):
        log.warning("%s: a path on a -F node is ignored", where)
    meta = _metadata(query, where=where)
    auth = _credentials(userinfo, meta)
    paths = node_paths(meta)
    host_header = meta.string("host") or None
    headers = meta.headers()
    tls = dialer_tls(client_tls(meta), dialer, where)
    proxy = node_proxy(meta, dialer)
    push_window = node_push_window(meta, dialer)
    resume = node_resume(meta, dialer)
    nodelay = bool(meta.boolean("nodelay"))
    if nodelay and connector != "relay":
        log.warning("%s: nodelay is a relay connector option: it has no effect here", where)
    connect_timeout = meta.seconds("connectTimeout")
    meta.boolean("notls")  # pht's SOCKS5 never offers GOST's TLS method
    meta.report_unused()

    addresses = [item for item in hostport.split(",") if item]
    if not addresses:
        raise ConfigError(f"{where}: missing HOST:PORT")
    nodes = tuple(
        NodeSpec(
            name=f"node-{index}",
            addr=parse_address(item, where=where, default_host="localhost"),
            connector=connector,
            dialer=dialer,
            auth=auth,
            paths=paths,
            host_header=host_header,
            headers=headers,
            tls=tls,
            proxy=proxy,
            push_window=push_window,
            resume=resume,
            nodelay=nodelay,
            connect_timeout=connect_timeout,
        )
        for index, item in enumerate(addresses)
    )
    return HopSpec(name=name, nodes=nodes)
