"""Log levels that mean something, JSON lines with GOST's field names, tokens cut."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing

from pht import proxy
from pht.cli._log import JSONFormatter, TextFormatter, redact
from pht.cli._run import Service
from pht.cli._spec import Address, ServiceSpec
from pht.proxy._stream import as_anyio

TOKEN = "0123456789abcdefghijklmnop"


def test_redact_cuts_tokens_to_eight_characters() -> None:
    text = f"GET /pull?token={TOKEN}&x=1 failed; /push?token={TOKEN}"
    assert redact(text) == "GET /pull?token=01234567…&x=1 failed; /push?token=01234567…"


def _record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("pht.cli", level, __file__, 1, message, (), None)


def test_json_formatter_fields() -> None:
    entry = json.loads(JSONFormatter().format(_record(f"refused ?token={TOKEN}")))
    assert entry["level"] == "warning"
    assert entry["msg"] == "refused ?token=01234567…"
    assert entry["logger"] == "pht.cli"
    assert "T" in entry["time"]
    assert TOKEN not in TextFormatter().format(_record(f"?token={TOKEN}"))


def _service() -> Service:
    spec = ServiceSpec(
        name="service-0", listen=Address("127.0.0.1", 0), handler="auto", listener="tcp"
    )

    def broken_handler(dial: proxy.Dialer) -> proxy.ForwardHandler:
        raise RuntimeError("a bug")

    return Service(spec, make_handler=broken_handler, dial=proxy.tcp_dialer, route="", tls=False)


async def test_internal_error_is_an_error_with_the_traceback_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = _service()
    _client, server = trio.testing.memory_stream_pair()
    with caplog.at_level(logging.DEBUG, logger="pht.cli"):
        await service.handle(as_anyio(server))
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "internal error: RuntimeError: a bug" in errors[0].getMessage()
    assert errors[0].exc_info is None
    debug = [record for record in caplog.records if record.levelno == logging.DEBUG]
    assert any(record.exc_info for record in debug)
    assert service.stats.handler_errors == 1
    assert service.stats.requests_in_flight == 0


def test_json_formatter_adds_gosts_context_fields() -> None:
    record = _record("service-0: 10.1.2.3 -> example.org:443 opened", logging.INFO)
    record.__dict__.update(service="service-0", remote="10.1.2.3", handler="socks5", other="x")
    entry = json.loads(JSONFormatter().format(record))
    assert (entry["service"], entry["remote"], entry["handler"]) == (
        "service-0",
        "10.1.2.3",
        "socks5",
    )
    assert "other" not in entry
