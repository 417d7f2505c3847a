"""Read a GOST YAML (or JSON) configuration file (``-C FILE``).

The subset that matters for PHT: ``services`` (handler, listener, forwarder,
metadata, TLS files), ``chains`` (hops of nodes with a connector and a
dialer), the top-level ``tls`` block (default certificate), ``log`` (level,
format, output) and ``metrics``. Keys are case-insensitive, as in GOST. Keys
pht does not know are ignored with a WARNING (GOST ignores them silently); a
value of the wrong type is an error, and so is an option that would restrict
access (``auther``, ``admission``, ``bypass``), because ignoring it would
leave a service more open than written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from ._meta import Metadata, go_duration, parse_address
from ._spec import (
    DEFAULT_BACKLOG,
    Address,
    ChainSpec,
    Config,
    ConfigError,
    Credentials,
    DefaultTLS,
    HopSpec,
    MetricsSpec,
    NodeSpec,
    ServiceSpec,
)
from ._url import (
    client_tls,
    dialer_tls,
    listener_resume,
    node_paths,
    node_proxy,
    node_push_window,
    node_resume,
    normalize_connector,
    normalize_dialer,
    normalize_handler,
    normalize_listener,
    server_paths,
    server_tls,
    tls_options,
    trusted_proxies,
)

__all__ = ["load_config", "parse_config"]

log = logging.getLogger("pht.cli")

_REFUSED = frozenset(
    {"auther", "authers", "auths", "admission", "admissions", "bypass", "bypasses"}
)
_LOG_LEVELS = {
    "trace": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "fatal": "CRITICAL",
}


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


class _Section:
    """One YAML map with case-insensitive, typed access and unused-key reporting."""

    def __init__(self, value: object, where: str, known: frozenset[str]) -> None:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a map, got {_type_name(value)}")
        self.where = where
        self.fields: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: keys must be strings, got {key!r}")
            lowered = key.lower()
            if lowered in _REFUSED:
                raise ConfigError(f"{where}.{key}: not supported by pht")
            if lowered not in known:
                log.warning("%s: unknown key %r: ignored", where, key)
                continue
            self.fields[lowered] = item

    def get(self, key: str) -> object:
        return self.fields.get(key.lower())

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.where}: missing {key}")
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}.{key}: expected a string, got {_type_name(value)}")
        return value

    def items(self, key: str) -> list[object]:
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self.where}.{key}: expected a list, got {_type_name(value)}")
        return value

    def section(self, key: str, known: frozenset[str]) -> _Section:
        return _Section(self.get(key), f"{self.where}.{key}", known)

    def metadata(self, key: str = "metadata") -> Metadata:
        value = self.get(key)
        where = f"{self.where}.{key}"
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a map, got {_type_name(value)}")
        return Metadata.from_mapping(value, where=where)

    def tls_metadata(self) -> Metadata:
        """The ``tls:`` map, with GOST's ``options:`` sub-map (versions, ciphers, ALPN) inlined."""
        value = self.get("tls")
        where = f"{self.where}.tls"
        if value is None:
            return Metadata((), where=where)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a map, got {_type_name(value)}")
        items = [(key, item) for key, item in value.items() if str(key).lower() != "options"]
        for key, item in value.items():
            if str(key).lower() == "options":
                if not isinstance(item, Mapping):
                    raise ConfigError(f"{where}.options: expected a map, got {_type_name(item)}")
                items.extend(item.items())
        return Metadata(items, where=where)


def _fields(*names: str) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


_SERVICE_KEYS = _fields("name", "addr", "handler", "listener", "forwarder", "metadata")
_HANDLER_KEYS = _fields("type", "auth", "chain", "metadata")
_LISTENER_KEYS = _fields("type", "metadata", "tls")
_FORWARDER_KEYS = _fields("nodes", "targets")
_TARGET_KEYS = _fields("name", "addr")
_AUTH_KEYS = _fields("username", "password")
_CHAIN_KEYS = _fields("name", "hops")
_HOP_KEYS = _fields("name", "nodes")
_NODE_KEYS = _fields("name", "addr", "connector", "dialer", "metadata")
_CONNECTOR_KEYS = _fields("type", "auth", "metadata")
_DIALER_KEYS = _fields("type", "metadata", "tls")
_TLS_KEYS = _fields("certFile", "keyFile", "caFile", "validity", "commonName", "organization")
_TOP_KEYS = _fields("services", "chains", "tls", "log", "metrics")
_LOG_KEYS = _fields("level", "format", "output")
_METRICS_KEYS = _fields("addr", "path", "auth")


def _auth(section: _Section) -> Credentials | None:
    if section.get("auth") is None:
        return None
    auth = section.section("auth", _AUTH_KEYS)
    username = auth.string("username") or ""
    password = auth.string("password") or ""
    if not username and not password:
        return None
    return Credentials(username, password)


def _targets(service: _Section) -> tuple[Address, ...]:
    if service.get("forwarder") is None:
        return ()
    forwarder = service.section("forwarder", _FORWARDER_KEYS)
    targets: list[Address] = []
    for index, item in enumerate(forwarder.items("nodes")):
        node = _Section(item, f"{forwarder.where}.nodes[{index}]", _TARGET_KEYS)
        addr = node.string("addr", required=True) or ""
        targets.append(parse_address(addr, where=node.where, default_host="localhost"))
    for index, item in enumerate(forwarder.items("targets")):
        where = f"{forwarder.where}.targets[{index}]"
        if not isinstance(item, str):
            raise ConfigError(f"{where}: expected a string, got {_type_name(item)}")
        targets.append(parse_address(item, where=where, default_host="localhost"))
    return tuple(targets)


def _service(value: object, index: int, chains: Mapping[str, ChainSpec]) -> ServiceSpec:
    service = _Section(value, f"services[{index}]", _SERVICE_KEYS)
    name = service.string("name") or f"service-{index}"
    where = f"services[{index}] ({name})"
    service.where = where
    addr = service.string("addr", required=True) or ""
    listen = parse_address(addr, where=f"{where}.addr", allow_zero_port=True)

    handler_section = service.section("handler", _HANDLER_KEYS)
    listener_section = service.section("listener", _LISTENER_KEYS)
    handler = normalize_handler(
        handler_section.string("type") or "auto", where=handler_section.where, strict=True
    )
    listener = normalize_listener(
        listener_section.string("type") or "tcp", where=listener_section.where, strict=True
    )
    targets = _targets(service)
    if handler in ("forward", "tcp") and not targets:
        raise ConfigError(f"{where}: handler {handler!r} needs forwarder.nodes")
    if targets and handler not in ("forward", "tcp", "relay"):
        log.warning("%s: forwarder is used only by forward, tcp and relay handlers", where)
        targets = ()

    chain = handler_section.string("chain")
    if chain is not None and chain not in chains:
        raise ConfigError(f"{handler_section.where}.chain: unknown chain {chain!r}")

    listener_meta = listener_section.metadata()
    paths = server_paths(listener_meta)
    backlog = listener_meta.integer("backlog", minimum=0) or DEFAULT_BACKLOG
    trusted = trusted_proxies(listener_meta, listener)
    pull_max_bytes = listener_meta.integer("pullMaxBytes", minimum=1)
    pull_max_ms = listener_meta.integer("pullMaxMs", minimum=1)
    resume = listener_resume(listener_meta, listener)
    listener_meta.report_unused()
    handler_meta = handler_section.metadata().merged(service.metadata())
    nodelay = bool(handler_meta.boolean("nodelay"))
    handler_meta.boolean("notls")  # pht's SOCKS5 never offers GOST's TLS method
    handler_meta.report_unused()

    tls = None
    tls_section = listener_section.tls_metadata()
    tls = server_tls(tls_section)
    options = tls_options(tls_section)
    tls_section.report_unused()
    if tls is not None and listener != "phts":
        log.warning("%s: listener.tls is used only by a phts listener: ignored", where)
        tls = None

    return ServiceSpec(
        name=name,
        listen=listen,
        handler=handler,
        listener=listener,
        auth=_auth(handler_section),
        targets=targets,
        paths=paths,
        backlog=backlog,
        tls=tls,
        tls_options=options,
        chain=chain,
        nodelay=nodelay,
        trusted_proxies=trusted,
        pull_max_bytes=pull_max_bytes,
        pull_max_ms=pull_max_ms,
        resume=resume,
    )


def _node(value: object, where: str, index: int) -> NodeSpec:
    node = _Section(value, where, _NODE_KEYS)
    name = node.string("name") or f"node-{index}"
    addr = parse_address(
        node.string("addr", required=True) or "", where=f"{where}.addr", default_host="localhost"
    )
    connector_section = node.section("connector", _CONNECTOR_KEYS)
    dialer_section = node.section("dialer", _DIALER_KEYS)
    connector = normalize_connector(
        connector_section.string("type") or "http", where=connector_section.where, strict=True
    )
    dialer = normalize_dialer(
        dialer_section.string("type") or "tcp", where=dialer_section.where, strict=True
    )
    meta = dialer_section.metadata()
    paths = node_paths(meta)
    host_header = meta.string("host") or None
    headers = meta.headers()
    proxy = node_proxy(meta, dialer)
    push_window = node_push_window(meta, dialer)
    resume = node_resume(meta, dialer)
    meta.report_unused()
    connector_meta = connector_section.metadata().merged(node.metadata())
    nodelay = bool(connector_meta.boolean("nodelay"))
    connect_timeout = connector_meta.seconds("connectTimeout")
    connector_meta.boolean("notls")  # pht's SOCKS5 never offers GOST's TLS method
    connector_meta.report_unused()
    tls_meta = dialer_section.tls_metadata()
    tls = dialer_tls(client_tls(tls_meta), dialer, dialer_section.where)
    tls_meta.report_unused()
    return NodeSpec(
        name=name,
        addr=addr,
        connector=connector,
        dialer=dialer,
        auth=_auth(connector_section),
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


def _chain(value: object, index: int) -> ChainSpec:
    chain = _Section(value, f"chains[{index}]", _CHAIN_KEYS)
    name = chain.string("name") or f"chain-{index}"
    hops: list[HopSpec] = []
    for hop_index, hop_value in enumerate(chain.items("hops")):
        hop = _Section(hop_value, f"chains[{index}].hops[{hop_index}]", _HOP_KEYS)
        hop_name = hop.string("name") or f"hop-{hop_index}"
        nodes = tuple(
            _node(node_value, f"{hop.where}.nodes[{node_index}]", node_index)
            for node_index, node_value in enumerate(hop.items("nodes"))
        )
        if not nodes:
            raise ConfigError(f"{hop.where}: a hop needs at least one node")
        hops.append(HopSpec(name=hop_name, nodes=nodes))
    if not hops:
        raise ConfigError(f"chains[{index}] ({name}): a chain needs at least one hop")
    return ChainSpec(name=name, hops=tuple(hops))


def _duration_days(value: object, where: str) -> float:
    """A Go duration (``8760h``, ``720h30m``) in days."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a duration such as '8760h', got {_type_name(value)}")
    seconds = go_duration(value, where=where)
    if seconds <= 0:
        raise ConfigError(f"{where}: {value!r} must be a positive duration")
    return seconds / 86400.0


def _default_tls(value: object) -> DefaultTLS:
    section = _Section(value, "tls", _TLS_KEYS)
    validity = section.get("validity")
    cert_file = section.string("certFile")
    key_file = section.string("keyFile")
    if key_file and not cert_file:
        raise ConfigError("tls: keyFile given without certFile")
    return DefaultTLS(
        cert_file=cert_file or None,
        key_file=key_file or None,
        ca_file=section.string("caFile") or None,
        common_name=section.string("commonName") or None,
        organization=section.string("organization") or None,
        validity_days=None if validity is None else _duration_days(validity, "tls.validity"),
    )


def _unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"two {what} are named {name!r}")
        seen.add(name)


def _load_document(text: str, source: str) -> object:
    """The document in ``text``: YAML with PyYAML, else JSON (which needs nothing)."""
    try:
        import yaml
    except ImportError:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{source}: not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}), "
                "and reading YAML needs PyYAML: pip install 'pht-tunnel[cli]'"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML: {problem}{at}") from None


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse the text of a GOST YAML/JSON configuration (JSON needs no PyYAML)."""
    document = _load_document(text, source)
    try:
        return _config(document)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _config(document: object) -> Config:
    top = _Section(document, "config", _TOP_KEYS)
    chains = [_chain(value, index) for index, value in enumerate(top.items("chains"))]
    _unique([chain.name for chain in chains], "chains")
    by_name = {chain.name: chain for chain in chains}
    services = [
        _service(value, index, by_name) for index, value in enumerate(top.items("services"))
    ]
    _unique([service.name for service in services], "services")
    log_level = log_format = log_output = None
    if top.get("log") is not None:
        log_section = top.section("log", _LOG_KEYS)
        level = log_section.string("level")
        if level is not None:
            if level.lower() not in _LOG_LEVELS:
                raise ConfigError(f"log.level: unknown level {level!r}")
            log_level = _LOG_LEVELS[level.lower()]
        log_format = log_section.string("format")
        if log_format is not None:
            log_format = log_format.strip().lower()
            if log_format not in ("json", "text"):
                raise ConfigError(f"log.format: {log_format!r} is not json or text")
        log_output = log_section.string("output") or None
    metrics = None
    if top.get("metrics") is not None:
        section = top.section("metrics", _METRICS_KEYS)
        if section.get("auth") is not None:
            # Serving the metrics openly would be more open than written.
            raise ConfigError("metrics.auth: not supported by pht (put the endpoint on loopback)")
        addr = section.string("addr", required=True) or ""
        path = section.string("path") or "/metrics"
        if not path.startswith("/"):
            raise ConfigError(f"metrics.path: {path!r} must start with '/'")
        metrics = MetricsSpec(
            addr=parse_address(addr, where="metrics.addr", allow_zero_port=True), path=path
        )
    return Config(
        services=tuple(services),
        chains=tuple(chains),
        tls=None if top.get("tls") is None else _default_tls(top.get("tls")),
        log_level=log_level,
        log_format=log_format,
        log_output=log_output,
        metrics=metrics,
    )


def load_config(path: str) -> Config:
    """Read and parse ``path``; a missing or unreadable file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(f"-C {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"-C {path}: not a UTF-8 text file") from None
    return parse_config(text, source=path)
