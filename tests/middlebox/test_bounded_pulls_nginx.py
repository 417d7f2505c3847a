"""Bounded pulls through an nginx that buffers every response (docs/deployment.md).

nginx is told to ignore ``X-Accel-Buffering`` and to buffer: a long poll
would never reach the client. With ``pull_max_bytes`` / ``pull_max_ms`` the
server ends each pull response after a complete line, nginx delivers it
whole, and pht's legacy-flow client polls again: the tunnel works, both ways.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import trio

import pht
from pht._stats import NullStats

from ..support import echo
from . import harness
from .conftest import NginxFactory
from .tunnel_checks import HANG_BOUND, echo_roundtrip, pattern

pytestmark = pytest.mark.middlebox

#: A front that buffers whole responses whatever the backend says.
NGINX_BUFFERING_SITE = """\
upstream pht_backend {
    server @BACKEND@;
    keepalive 32;
}

server {
    listen @LISTEN@;

    location / {
        proxy_pass http://pht_backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering on;
        proxy_ignore_headers X-Accel-Buffering;
        proxy_read_timeout @READ_TIMEOUT@;
        client_max_body_size @MAX_BODY@;
    }
}
"""

PULL_MAX_BYTES = 1024 * 1024
PULL_MAX_MS = 250
DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def render_buffering(listen: str, backend: str) -> str:
    values = {**harness.DOC_VALUES, "LISTEN": listen, "BACKEND": backend}
    return harness.render(NGINX_BUFFERING_SITE, values)


class Pulls(NullStats):
    """Counts the pull responses the server began."""

    def __init__(self) -> None:
        self.count = 0

    def pull(self) -> None:
        self.count += 1


async def _serve(nursery: trio.Nursery, pulls: Pulls) -> int:
    serve = functools.partial(
        pht.serve_pht,
        echo,
        0,
        host="127.0.0.1",
        pull_max_bytes=PULL_MAX_BYTES,
        pull_max_ms=PULL_MAX_MS,
        stats=pulls,
    )
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_a_tunnel_through_a_buffering_nginx_with_bounded_pulls(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    pulls = Pulls()
    backend = await _serve(nursery, pulls)
    proxy = start_nginx(lambda listen: render_buffering(listen, f"127.0.0.1:{backend}"))
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=True)
    async with stream:
        for byte in (b"x", b"y", b"z"):
            await stream.send_all(byte)
            # The byte waits for its response to end: about pull_max_ms.
            with trio.fail_after(2 * PULL_MAX_MS / 1000):
                assert await stream.receive_some() == byte
        size = 16 * 1024 * 1024
        with trio.fail_after(HANG_BOUND):
            await echo_roundtrip(stream, pattern(size), piece=1024 * 1024)
    # The bulk went down in bounded responses (base64: 4 bytes per 3), each
    # delivered whole by nginx, and the client polled again after each one.
    assert pulls.count >= size * 4 // 3 // PULL_MAX_BYTES


def test_the_documented_recipe_is_the_tested_one() -> None:
    text = DOC.read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    assert render_buffering(harness.DOC_VALUES["LISTEN"], harness.DOC_VALUES["BACKEND"]) in blocks
