"""``pht -L :P -F http://squid -F socks5+pht://server``: a PHT hop behind a forward
HTTP proxy that denies CONNECT, from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_cli_e2e import assert_body, fetch_via
from tests.test_cli_e2e import origin as origin  # the fixture
from tests.test_cli_run import PhtProcess

from . import harness
from .conftest import SquidFactory

pytestmark = [
    pytest.mark.middlebox,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]


def _open_rules(listen: str, directory: Path) -> str:
    return harness.render(harness.SQUID_OPEN_RULES, {"LISTEN": listen, "CLIENTS": "127.0.0.1/32"})


@pytest.mark.parametrize("form", ["two-hops", "proxy-option"])
def test_pht_hop_through_squid_without_connect(
    start_squid: SquidFactory, origin: int, form: str
) -> None:
    squid = start_squid(_open_rules)
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0") as server:
        node = f"socks5+pht://127.0.0.1:{server.port()}"
        if form == "two-hops":
            chain = ["-F", f"http://127.0.0.1:{squid.port}", "-F", node]
        else:
            chain = ["-F", f"{node}?proxy=http://127.0.0.1:{squid.port}"]
        with PhtProcess("-L", "127.0.0.1:0", *chain) as client:
            assert_body(fetch_via(client.port(), "socks5", origin), server, client)
            assert_body(fetch_via(client.port(), "http", origin), server, client)
    log = (squid.log.parent / "access.log").read_text(errors="replace")
    assert f"POST http://127.0.0.1:{server.port()}/push" in log
    assert "CONNECT" not in log
