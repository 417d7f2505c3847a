"""The registry of GOST options ``pht`` knows: each is supported or refused.

GOST reads metadata keys (``-L ...?key=value``, YAML ``metadata:``) for the
listener, the handler, the dialer and the connector of a node. A GOST user
who moves a command to ``pht`` must never have an option silently dropped:
every option GOST's PHT/PHTS listener and dialer and the handlers and
connectors ``pht`` ships read is listed here, either ``supported`` (with
GOST's meaning) or ``refused`` (an error that names it). A key that is in
neither list is logged as a WARNING. ``docs/cli.md`` keeps the same table; a
test compares the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OPTIONS", "Option", "lookup"]

Part = Literal["listener", "handler", "dialer", "connector"]
Status = Literal["supported", "refused"]


@dataclass(frozen=True)
class Option:
    """One GOST metadata key: where GOST reads it, and what ``pht`` does with it."""

    name: str
    parts: tuple[Part, ...]
    status: Status
    meaning: str


def _s(name: str, parts: tuple[Part, ...], meaning: str) -> Option:
    return Option(name, parts, "supported", meaning)


def _r(name: str, parts: tuple[Part, ...], meaning: str) -> Option:
    return Option(name, parts, "refused", meaning)


OPTIONS: tuple[Option, ...] = (
    # PHT / PHTS listener
    _s("authorizePath", ("listener", "dialer"), "path of the authorize request"),
    _s("pushPath", ("listener", "dialer"), "path of the push (POST) requests"),
    _s("pullPath", ("listener", "dialer"), "path of the pull (GET) requests"),
    _s("backlog", ("listener",), "tokens issued but not used yet"),
    _r("mptcp", ("listener", "dialer"), "Multipath TCP"),
    _s(
        "trustedProxies",
        ("listener",),
        "reverse proxies whose X-Forwarded-For / X-Real-IP name the client (pht only)",
    ),
    _r("proxyProtocol", ("listener",), "PROXY protocol v1/v2 in front of each connection"),
    _s("pullMaxBytes", ("listener",), "end each pull response after this many bytes (pht only)"),
    _s("pullMaxMs", ("listener",), "end each pull response after this many ms (pht only)"),
    _s("resumeWindow", ("listener",), "resume extension: replay window in bytes per session"),
    _s("gracePeriod", ("listener",), "resume extension: how long a cut session waits (60s)"),
    _s("legacyGrace", ("listener",), "a grace period for clients without resume (GOST's)"),
    # TLS files and options (phts listener and dialer)
    _s("certFile", ("listener", "dialer"), "certificate file (alias cert)"),
    _s("keyFile", ("listener", "dialer"), "private key file (alias key)"),
    _s("caFile", ("listener", "dialer"), "CA file (alias ca)"),
    _s("secure", ("dialer",), "verify the server's certificate"),
    _s("serverName", ("dialer",), "TLS server name (SNI and verification)"),
    _s("minVersion", ("listener", "dialer"), "lowest TLS version (VersionTLS12, 1.2, ...)"),
    _s("maxVersion", ("listener", "dialer"), "highest TLS version"),
    _s("cipherSuites", ("listener", "dialer"), "allowed TLS 1.2 cipher suites (comma-separated)"),
    _s("alpn", ("listener", "dialer"), "ALPN protocols offered (comma-separated)"),
    # PHT / PHTS dialer
    _s("host", ("dialer",), "Host header of every request"),
    _s("header", ("dialer",), "extra request headers: header.NAME=VALUE"),
    _s("proxy", ("dialer",), "forward HTTP proxy for the PHT requests (pht only)"),
    _s("pushWindow", ("dialer",), "pushes awaiting their answer at once (pht only)"),
    _s("resume", ("listener", "dialer"), "the resume extension: serve it / offer it"),
    # handlers (auto, http, socks4, socks5, relay, forward) and connectors
    _s("auth", ("handler", "connector"), "base64 of user:password"),
    _s("nodelay", ("handler", "connector"), "relay: answer / ask at once, not with data"),
    _s("notls", ("handler", "connector"), "socks5: no TLS method (pht never offers one)"),
    _s("connectTimeout", ("connector",), "time limit of the connector's handshake"),
    _r("udp", ("handler",), "UDP relay"),
    _r("udpBufferSize", ("handler",), "UDP relay buffer"),
    _r("bind", ("handler",), "BIND command"),
    _r("comp", ("handler",), "SOCKS5 compatibility mode"),
    _r("readTimeout", ("handler",), "handshake read timeout"),
    _r("probeResistance", ("handler",), "HTTP probe resistance"),
    _r("knock", ("handler",), "HTTP probe resistance knock host"),
    _r("authBasicRealm", ("handler",), "HTTP Basic realm"),
    _r("sniffing", ("handler",), "traffic sniffing"),
    _r("hash", ("handler",), "hash-based node selection"),
    _r("observePeriod", ("handler",), "observer period"),
    _r("limiter.in", ("handler",), "traffic limiter"),
    _r("limiter.out", ("handler",), "traffic limiter"),
    _r("relay", ("connector",), "socks5 relay mode"),
    _r("interface", ("dialer",), "outgoing interface"),
    _r("so_mark", ("dialer",), "socket mark"),
    # access control: ignoring these would leave a service more open than written
    _r("admission", ("handler",), "admission control"),
    _r("auther", ("handler",), "authenticator plugin"),
    _r("bypass", ("handler",), "bypass rules"),
)

_BY_NAME = {option.name.lower(): option for option in OPTIONS}


def lookup(key: str) -> Option | None:
    """The option named ``key`` (case-insensitive), if GOST has it."""
    return _BY_NAME.get(key.lower())
