"""Counters of services and chains, with no dependency: what a metrics endpoint shows.

The command line feeds a :class:`Stats` object and, with ``-metrics``, serves
it in Prometheus form with GOST's metric names. An embedding program can feed
and read the same object and report it its own way (no Prometheus needed).

:class:`ServiceStats` has two groups of counters. The first is what GOST
counts per service (connections, bytes each way, handler errors, durations),
fed by whoever runs the handler. The second is PHT's own (sessions, pushes,
pulls, refusals by HTTP status): only a PHT server sees those events, so it
feeds them through the calls of :class:`PHTStatsSink`, which
:class:`ServiceStats` implements. They stay off (``pht_enabled`` false, not
exported) until the server says it will feed them (:meth:`ServiceStats.enable_pht`)
or feeds one. Everything is plain integer arithmetic in the caller's thread
(trio code is single-threaded): no locks, nothing to await, no I/O, so a
server may call it on its hot paths.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "DURATION_BUCKETS",
    "ChainStats",
    "NullStats",
    "PHTStatsSink",
    "ServiceStats",
    "Stats",
]

#: Upper bounds (seconds) of the request-duration histogram buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class PHTStatsSink(Protocol):
    """What a PHT server reports about one listener, as it happens.

    A server given one calls :meth:`enable_pht` once when it starts
    listening, then one method per event. Each call is cheap and never
    raises for a well-formed call, so it can sit on the request paths.
    """

    def enable_pht(self) -> None:
        """The server listens and will report: PHT's counters exist from now on, at zero."""

    def session_opened(self) -> None:
        """A session came into being (a new token's first push or pull)."""

    def session_closed(self) -> None:
        """A session that :meth:`session_opened` reported ended (closed, expired, failed)."""

    def push(self) -> None:
        """A push (POST) was accepted: its bytes reached the session."""

    def pull(self) -> None:
        """A pull (GET) was accepted: its streamed answer began."""

    def refused(self, status: int) -> None:
        """A request was answered with the error ``status`` (400 to 599)."""


class NullStats:
    """A :class:`PHTStatsSink` that counts nothing: a server given no sink uses it."""

    def enable_pht(self) -> None:
        """Nothing to enable."""

    def session_opened(self) -> None:
        """Not counted."""

    def session_closed(self) -> None:
        """Not counted."""

    def push(self) -> None:
        """Not counted."""

    def pull(self) -> None:
        """Not counted."""

    def refused(self, status: int) -> None:
        """Not counted."""


@dataclass
class ServiceStats:
    """The counters of one service (``name`` is the service's name)."""

    name: str
    requests_total: int = 0
    requests_in_flight: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    handler_errors: int = 0
    duration_count: int = 0
    duration_sum: float = 0.0
    #: Observations per bucket of :data:`DURATION_BUCKETS` (not cumulative),
    #: plus one last slot for longer ones.
    duration_buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    # PHT's own, fed by a PHT server.
    pht_enabled: bool = False
    sessions_total: int = 0
    sessions_open: int = 0
    pushes_total: int = 0
    pulls_total: int = 0
    refusals: Counter[int] = field(default_factory=Counter)

    # --- what a handler runner feeds ---------------------------------------------------

    def request_started(self) -> None:
        """A connection (a PHT session, a TCP connection) reached the handler."""
        self.requests_total += 1
        self.requests_in_flight += 1

    def request_finished(self, duration: float, *, failed: bool = False) -> None:
        """The handler returned after ``duration`` seconds; ``failed`` counts an error."""
        self.requests_in_flight -= 1
        if failed:
            self.handler_errors += 1
        self.duration_count += 1
        self.duration_sum += duration
        self.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, duration)] += 1

    def transferred(self, *, received: int = 0, sent: int = 0) -> None:
        """Bytes read from the client (input) and written to it (output)."""
        self.input_bytes += received
        self.output_bytes += sent

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at or below it)``, ending with ``inf``."""
        total = 0
        result = []
        for bound, count in zip(
            (*DURATION_BUCKETS, float("inf")), self.duration_buckets, strict=True
        ):
            total += count
            result.append((bound, total))
        return result

    # --- what a PHT server feeds (PHTStatsSink) -------------------------------------------

    def enable_pht(self) -> None:
        """The server will feed PHT's counters: export them from now on, at zero."""
        self.pht_enabled = True

    def session_opened(self) -> None:
        """A session came into being."""
        self.pht_enabled = True
        self.sessions_total += 1
        self.sessions_open += 1

    def session_closed(self) -> None:
        """A session reported by :meth:`session_opened` ended."""
        self.pht_enabled = True
        self.sessions_open -= 1

    def push(self) -> None:
        """A push request was accepted."""
        self.pht_enabled = True
        self.pushes_total += 1

    def pull(self) -> None:
        """A pull request was accepted."""
        self.pht_enabled = True
        self.pulls_total += 1

    def refused(self, status: int) -> None:
        """A request answered with an error ``status`` (400, 403, 404, 410, 429, 503...)."""
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"refused() takes an HTTP error status (400-599), got {status!r}")
        self.pht_enabled = True
        self.refusals[status] += 1


@dataclass
class ChainStats:
    """Failures of a chain, per node (``gost_chain_errors_total``)."""

    name: str
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, node: str) -> None:
        self.errors[node] += 1


class Stats:
    """Every service's and chain's counters, created on first use by name."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceStats] = {}
        self.chains: dict[str, ChainStats] = {}

    def service(self, name: str) -> ServiceStats:
        """The counters of service ``name`` (made on first call)."""
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats(name)
        return stats

    def chain(self, name: str) -> ChainStats:
        """The counters of chain ``name`` (made on first call)."""
        stats = self.chains.get(name)
        if stats is None:
            stats = self.chains[name] = ChainStats(name)
        return stats
