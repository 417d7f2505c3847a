"""What a command line or a YAML file asks `pht` to run, as plain frozen data.

`_url` (for ``-L``/``-F``) and `_yaml` (for ``-C``) both produce these objects;
`_run` turns them into listening services. Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_AUTHORIZE_PATH",
    "DEFAULT_BACKLOG",
    "DEFAULT_PULL_PATH",
    "DEFAULT_PUSH_PATH",
    "DEFAULT_PUSH_WINDOW",
    "Address",
    "ChainSpec",
    "ClientTLS",
    "Config",
    "ConfigError",
    "ConnectorType",
    "Credentials",
    "DefaultTLS",
    "DialerType",
    "HandlerType",
    "HopSpec",
    "ListenerResume",
    "ListenerType",
    "MetricsSpec",
    "NodeSpec",
    "PHTPaths",
    "ServerTLS",
    "ServiceSpec",
    "TLSOptions",
]

DEFAULT_AUTHORIZE_PATH = "/authorize"
DEFAULT_PUSH_PATH = "/push"
DEFAULT_PULL_PATH = "/pull"
DEFAULT_BACKLOG = 128
#: Pushes a ``pht``/``phts`` node keeps awaiting their answer (``pushWindow``):
#: 4 keeps the uplink busy (GOST's client waits for each answer: 1).
DEFAULT_PUSH_WINDOW = 4

HandlerType = Literal["auto", "http", "socks5", "socks4", "relay", "forward", "tcp"]
ListenerType = Literal["tcp", "pht", "phts"]
ConnectorType = Literal["http", "socks5", "relay", "forward"]
DialerType = Literal["tcp", "pht", "phts"]


class ConfigError(ValueError):
    """A command line or configuration file that `pht` cannot run.

    The message is one line that names the offending part, ready to be shown
    to the user after ``pht: error:``.
    """


@dataclass(frozen=True)
class Address:
    """A host and a port. An empty host means "all interfaces" for a listener."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    """A user name and password (``USER:PASS@`` in a URL, ``auth:`` in YAML)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class PHTPaths:
    """The three request paths of a PHT tunnel; client and server must agree."""

    authorize_path: str = DEFAULT_AUTHORIZE_PATH
    push_path: str = DEFAULT_PUSH_PATH
    pull_path: str = DEFAULT_PULL_PATH


@dataclass(frozen=True)
class TLSOptions:
    """GOST's TLS ``options``: version bounds, TLS 1.2 cipher suites, ALPN."""

    min_version: str | None = None
    max_version: str | None = None
    cipher_suites: tuple[str, ...] = ()
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerTLS:
    """Certificate of a ``phts`` listener. ``ca_file`` asks for client certificates."""

    cert_file: str
    key_file: str | None = None
    ca_file: str | None = None


@dataclass(frozen=True)
class ClientTLS:
    """How a ``phts`` dialer checks the server.

    ``secure=False`` (GOST's default) accepts any certificate; with a
    ``ca_file`` the chain must still lead to that CA (the name is not
    checked), as in GOST. ``secure=True`` checks chain and name.
    ``cert_file``/``key_file`` present a client certificate.
    """

    secure: bool = False
    server_name: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    options: TLSOptions = TLSOptions()

    @property
    def verify(self) -> bool:
        return self.secure or self.ca_file is not None


@dataclass(frozen=True)
class DefaultTLS:
    """The top-level ``tls:`` block of a YAML file: the default server certificate.

    With a ``cert_file`` the files are loaded; without, a self-signed
    certificate is generated at start with the given names and validity.
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    common_name: str | None = None
    organization: str | None = None
    validity_days: float | None = None


@dataclass(frozen=True, kw_only=True)
class ListenerResume:
    """The resume extension (docs/resume.md) as a PHT listener serves it.

    ``None`` leaves the library's default (a 4 MiB replay window, a 60 s
    grace period); ``enabled=False`` serves plain PHT to every client.
    """

    enabled: bool = True
    window: int | None = None
    grace_period: int | None = None
    legacy_grace: bool = False

    def keywords(self) -> dict[str, object]:
        """The server keywords these settings stand for (``serve_pht``'s names)."""
        keywords: dict[str, object] = {"resume": self.enabled, "legacy_grace": self.legacy_grace}
        if self.window is not None:
            keywords["resume_window"] = self.window
        if self.grace_period is not None:
            keywords["grace_period"] = self.grace_period
        return keywords


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """One ``-L`` (or one entry of YAML ``services:``): a listening service."""

    name: str
    listen: Address
    handler: HandlerType
    listener: ListenerType
    auth: Credentials | None = None
    targets: tuple[Address, ...] = ()
    paths: PHTPaths = PHTPaths()
    backlog: int = DEFAULT_BACKLOG
    tls: ServerTLS | None = None
    tls_options: TLSOptions = TLSOptions()
    chain: str | None = None
    nodelay: bool = False
    #: Networks (``10.0.0.0/8``, ``127.0.0.1/32``) of reverse proxies whose
    #: ``X-Forwarded-For`` / ``X-Real-IP`` name the real client (PHT listeners).
    trusted_proxies: tuple[str, ...] = ()
    #: Bounded pulls (PHT listeners): each pull response ends after this many
    #: bytes of lines / milliseconds (``None``: pulls stay open).
    pull_max_bytes: int | None = None
    pull_max_ms: int | None = None
    #: The resume extension as the listener serves it (PHT listeners).
    resume: ListenerResume = field(default_factory=ListenerResume)

    @property
    def scheme(self) -> str:
        """``handler+listener`` as GOST would write it, for log lines."""
        return f"{self.handler}+{self.listener}"


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """One node of a hop: where to connect (dialer) and what to say (connector)."""

    name: str
    addr: Address
    connector: ConnectorType
    dialer: DialerType
    auth: Credentials | None = None
    paths: PHTPaths = PHTPaths()
    host_header: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    tls: ClientTLS = ClientTLS()
    proxy: str | None = None
    push_window: int = DEFAULT_PUSH_WINDOW
    resume: bool = False
    nodelay: bool = False
    connect_timeout: float | None = None

    @property
    def scheme(self) -> str:
        return f"{self.connector}+{self.dialer}"


@dataclass(frozen=True, kw_only=True)
class HopSpec:
    """One ``-F`` (or one entry of a chain's ``hops:``). Nodes are used in turn."""

    name: str
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError(f"hop {self.name!r} has no nodes")


@dataclass(frozen=True, kw_only=True)
class ChainSpec:
    """A forwarding chain: the hops a service's outbound connections go through."""

    name: str
    hops: tuple[HopSpec, ...]


@dataclass(frozen=True, kw_only=True)
class MetricsSpec:
    """GOST's ``metrics:`` block (``-metrics ADDR``): a Prometheus endpoint."""

    addr: Address
    path: str = "/metrics"


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything `pht` runs: services, the chains they use, the default TLS."""

    services: tuple[ServiceSpec, ...] = ()
    chains: tuple[ChainSpec, ...] = ()
    tls: DefaultTLS | None = None
    log_level: str | None = None
    log_format: str | None = None
    log_output: str | None = None
    metrics: MetricsSpec | None = None

    def chain(self, name: str) -> ChainSpec:
        for chain in self.chains:
            if chain.name == name:
                return chain
        raise ConfigError(f"unknown chain {name!r}")
