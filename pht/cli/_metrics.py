"""GOST's Prometheus endpoint (``-metrics :9000``, YAML ``metrics:``) for a stats object.

Metric names and labels are GOST v3's, so that dashboards built for GOST
work: ``gost_services``, ``gost_service_requests_total``,
``gost_service_requests_in_flight``, ``gost_service_transfer_input_bytes_total``,
``gost_service_transfer_output_bytes_total``, ``gost_service_handler_errors_total``,
``gost_service_request_duration_seconds`` (labels ``host``, ``service``) and
``gost_chain_errors_total`` (``host``, ``chain``, ``node``). PHT's own
counters (``pht_sessions_*``, ``pht_pushes_total``, ``pht_pulls_total``,
``pht_refusals_total`` by ``status``) appear once a PHT server feeds them.

The values are read from the stats object at each scrape (a collector), so
counting costs no Prometheus call. The endpoint is a small anyio HTTP server
(h11) serving ``GET path``; ``prometheus-client`` is an optional extra.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import h11

from pht._stats import Stats
from pht.proxy._stream import read_some

from ._spec import ConfigError, MetricsSpec

__all__ = ["MetricsServer", "require_prometheus"]

log = logging.getLogger("pht.cli")

_MAX_REQUEST = 16 * 1024


def require_prometheus() -> Any:
    """The ``prometheus_client`` module, or a ConfigError naming the extra to install."""
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics need the prometheus-client package: pip install 'pht-tunnel[metrics]'"
        ) from None
    return prometheus_client


class _Collector:
    """Turns the stats object into metric families at each scrape."""

    def __init__(self, stats: Stats, host: str) -> None:
        self.stats = stats
        self.host = host

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        host = self.host
        services = list(self.stats.services.values())
        gauge = GaugeMetricFamily("gost_services", "Number of services", labels=["host"])
        gauge.add_metric([host], len(services))
        yield gauge

        def service_family(kind: type[Any], name: str, text: str, attr: str) -> Any:
            family = kind(name, text, labels=["host", "service"])
            for item in services:
                family.add_metric([host, item.name], getattr(item, attr))
            return family

        yield service_family(
            CounterMetricFamily, "gost_service_requests", "Number of requests", "requests_total"
        )
        yield service_family(
            GaugeMetricFamily,
            "gost_service_requests_in_flight",
            "Number of requests in flight",
            "requests_in_flight",
        )
        yield service_family(
            CounterMetricFamily,
            "gost_service_transfer_input_bytes",
            "Bytes read from clients",
            "input_bytes",
        )
        yield service_family(
            CounterMetricFamily,
            "gost_service_transfer_output_bytes",
            "Bytes written to clients",
            "output_bytes",
        )
        yield service_family(
            CounterMetricFamily,
            "gost_service_handler_errors",
            "Number of handler errors",
            "handler_errors",
        )
        durations = HistogramMetricFamily(
            "gost_service_request_duration_seconds",
            "Distribution of request durations",
            labels=["host", "service"],
        )
        for item in services:
            durations.add_metric(
                [host, item.name],
                [(_bound(bound), count) for bound, count in item.cumulative_buckets()],
                item.duration_sum,
            )
        yield durations

        chain_errors = CounterMetricFamily(
            "gost_chain_errors", "Number of chain errors", labels=["host", "chain", "node"]
        )
        for chain in self.stats.chains.values():
            for node, count in chain.errors.items():
                chain_errors.add_metric([host, chain.name, node], count)
        yield chain_errors

        fed = [item for item in services if item.pht_enabled]
        if fed:
            pht_families = [
                (CounterMetricFamily, "pht_sessions", "PHT sessions opened", "sessions_total"),
                (GaugeMetricFamily, "pht_sessions_open", "PHT sessions open", "sessions_open"),
                (CounterMetricFamily, "pht_pushes", "PHT push requests", "pushes_total"),
                (CounterMetricFamily, "pht_pulls", "PHT pull requests", "pulls_total"),
            ]
            for kind, name, text, attr in pht_families:
                family = kind(name, text, labels=["host", "service"])
                for item in fed:
                    family.add_metric([host, item.name], getattr(item, attr))
                yield family
            refusals = CounterMetricFamily(
                "pht_refusals",
                "PHT requests refused, by status",
                labels=["host", "service", "status"],
            )
            for item in fed:
                for status, count in sorted(item.refusals.items()):
                    refusals.add_metric([host, item.name, str(status)], count)
            yield refusals


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class MetricsServer:
    """Serves ``GET spec.path`` with the metrics of ``stats`` in Prometheus text form."""

    def __init__(self, spec: MetricsSpec, stats: Stats) -> None:
        self.spec = spec
        prometheus = require_prometheus()
        self._registry = prometheus.CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(stats, socket.gethostname()))
        self._generate = prometheus.generate_latest
        self._content_type: str = prometheus.CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        """The current metrics, as a scrape would get them."""
        data: bytes = self._generate(self._registry)
        return data

    async def serve(
        self,
        *,
        task_status: anyio.abc.TaskStatus[list[socket.socket]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``spec.addr``; report the listening sockets to ``task_status``."""
        listener = await anyio.create_tcp_listener(
            local_host=self.spec.addr.host or None, local_port=self.spec.addr.port
        )
        async with listener:
            task_status.started(
                [inner.extra(anyio.abc.SocketAttribute.raw_socket) for inner in listener.listeners]
            )
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            with anyio.move_on_after(30):
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        data = await read_some(stream, _MAX_REQUEST)
                        connection.receive_data(data)
                        if not data:
                            return
                        continue
                    if not isinstance(event, h11.Request):
                        return
                    path = event.target.split(b"?", 1)[0]
                    if event.method not in (b"GET", b"HEAD"):
                        status, body, kind = 405, b"method not allowed\n", "text/plain"
                    elif path != self.spec.path.encode():
                        status, body, kind = 404, b"not found\n", "text/plain"
                    else:
                        status, body, kind = 200, self.render(), self._content_type
                    headers = [
                        ("Content-Type", kind),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ]
                    out = connection.send(h11.Response(status_code=status, headers=headers))
                    if event.method != b"HEAD":
                        out = (out or b"") + (connection.send(h11.Data(data=body)) or b"")
                    out = (out or b"") + (connection.send(h11.EndOfMessage()) or b"")
                    await stream.send(out)
                    return
        except (h11.ProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            log.debug("metrics: request ended: %s", exc or type(exc).__name__)
        finally:
            await anyio.aclose_forcefully(stream)
