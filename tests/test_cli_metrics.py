"""The stats object, its Prometheus form, and the error without prometheus-client."""

from __future__ import annotations

import re
import sys

import pytest

from pht._stats import DURATION_BUCKETS, PHTStatsSink, Stats
from pht.cli._metrics import MetricsServer
from pht.cli._run import build_config, prepare
from pht.cli._spec import Address, ConfigError, MetricsSpec


def test_service_counters() -> None:
    stats = Stats()
    service = stats.service("s")
    assert stats.service("s") is service
    service.request_started()
    service.transferred(received=10, sent=25)
    assert service.requests_in_flight == 1
    service.request_finished(0.3, failed=True)
    service.request_started()
    service.request_finished(1000.0)
    assert (service.requests_total, service.requests_in_flight) == (2, 0)
    assert (service.input_bytes, service.output_bytes, service.handler_errors) == (10, 25, 1)
    buckets = dict(service.cumulative_buckets())
    assert buckets[0.25] == 0
    assert buckets[0.5] == 1
    assert buckets[DURATION_BUCKETS[-1]] == 1
    assert buckets[float("inf")] == 2
    assert service.duration_sum == pytest.approx(1000.3)


def test_pht_counters_appear_once_fed() -> None:
    pytest.importorskip("prometheus_client")
    stats = Stats()
    service = stats.service("tunnel")
    server = MetricsServer(MetricsSpec(addr=Address("127.0.0.1", 0)), stats)
    assert b"pht_sessions" not in server.render()
    service.session_opened()
    service.push()
    service.pull()
    service.refused(404)
    text = server.render().decode()
    assert 'pht_sessions_total{host="' in text
    assert 'pht_sessions_open{host="' in text
    assert 'status="404"} 1.0' in text


def test_render_has_gosts_names() -> None:
    pytest.importorskip("prometheus_client")
    stats = Stats()
    stats.service("service-0").request_started()
    stats.chain("chain-0").error("node-0")
    text = MetricsServer(MetricsSpec(addr=Address("", 0)), stats).render().decode()
    for name in (
        "gost_services",
        "gost_service_requests_total",
        "gost_service_requests_in_flight",
        "gost_service_transfer_input_bytes_total",
        "gost_service_transfer_output_bytes_total",
        "gost_service_handler_errors_total",
        "gost_service_request_duration_seconds_bucket",
        "gost_chain_errors_total",
    ):
        assert f"\n{name}{{" in text, name
    assert 'service="service-0"' in text
    assert 'chain="chain-0",host=' in text or 'node="node-0"' in text


def test_metrics_without_prometheus_client_name_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    config = build_config(["socks5://127.0.0.1:0"], [], None, "127.0.0.1:0")
    assert config.metrics is not None
    prepare(config)
    with pytest.raises(ConfigError, match=r"pip install 'pht-tunnel\[metrics\]'"):
        MetricsServer(config.metrics, Stats())


def test_enable_pht_exports_the_pht_counters_at_zero() -> None:
    pytest.importorskip("prometheus_client")
    stats = Stats()
    stats.service("plain")  # a tcp service: no PHT counters
    sink: PHTStatsSink = stats.service("tunnel")
    sink.enable_pht()
    text = MetricsServer(MetricsSpec(addr=Address("127.0.0.1", 0)), stats).render().decode()
    for name in ("pht_sessions_total", "pht_sessions_open", "pht_pushes_total", "pht_pulls_total"):
        assert re.search(rf'^{name}{{host="[^"]*",service="tunnel"}} 0\.0$', text, re.M), name
    assert 'service="plain"' not in text.split("# HELP pht_", 1)[1]


def test_pht_counters_count_each_event() -> None:
    service = Stats().service("tunnel")
    service.session_opened()
    service.session_opened()
    service.session_closed()
    for _ in range(3):
        service.push()
    service.pull()
    service.refused(404)
    service.refused(404)
    service.refused(429)
    assert (service.sessions_total, service.sessions_open) == (2, 1)
    assert (service.pushes_total, service.pulls_total) == (3, 1)
    assert service.refusals == {404: 2, 429: 1}


@pytest.mark.parametrize("status", [200, 302, 600, "404", True])
def test_refused_takes_an_error_status(status: object) -> None:
    service = Stats().service("tunnel")
    with pytest.raises(ValueError, match="HTTP error status"):
        service.refused(status)  # type: ignore[arg-type]
    assert not service.refusals
    assert not service.pht_enabled
