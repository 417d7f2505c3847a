"""``pht -L 'forward+pht://...?trustedProxies=...'`` behind a real nginx.

nginx connects to the server from its own address (``proxy_bind``) and names
the client in ``X-Forwarded-For`` / ``X-Real-IP``. The server believes those
headers from nginx only: its log lines and the stream its handler gets carry
the client's address, and a header a client forged is ignored, whether it
came through nginx or straight to the server.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
import trio

import pht
from tests.support import tcp_echo_server
from tests.test_cli_run import PhtProcess

from . import harness
from .conftest import NginxFactory

pytestmark = [pytest.mark.middlebox, pytest.mark.slow]

#: The address nginx connects to the server from; the test client uses 127.0.0.1.
NGINX_SOURCE = "127.0.0.5"
FORGED = "203.0.113.9"

#: The documented single-server site, plus the two headers and a source address.
_SITE = """\
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
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_bind @SOURCE@;
        proxy_read_timeout 60s;
        client_max_body_size 2m;
    }
}
"""


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on loopback; yields its port."""
    with tcp_echo_server() as port:
        yield port


def _can_bind(address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _behind_nginx(start_nginx: NginxFactory, server_port: int) -> int:
    if not _can_bind(NGINX_SOURCE):
        pytest.skip(f"cannot bind {NGINX_SOURCE} (no 127.0.0.0/8 on loopback)")
    values = {"BACKEND": f"127.0.0.1:{server_port}", "SOURCE": NGINX_SOURCE}
    nginx = start_nginx(lambda listen: harness.render(_SITE, {**values, "LISTEN": listen}))
    return nginx.port


def _echo_through(port: int, headers: list[tuple[str, str]]) -> None:
    """One tunnel to ``127.0.0.1:port``: a round trip through the server's forward target."""

    async def main() -> None:
        with trio.fail_after(30):
            stream = await pht.open_pht_stream("127.0.0.1", port, headers=headers)
            async with stream:
                await stream.send_all(b"ping")
                received = b""
                while len(received) < 4:
                    chunk = await stream.receive_some()
                    assert chunk, "the tunnel ended before the echo"
                    received += chunk
                assert received == b"ping"

    trio.run(main)


def _server(echo: int, query: str, *options: str) -> PhtProcess:
    return PhtProcess("-L", f"forward+pht://127.0.0.1:0/127.0.0.1:{echo}{query}", *options)


def _opened(server: PhtProcess, echo: int) -> str:
    """The peer of the first session, as the server's 'opened' line names it."""
    match = server.wait_for(rf"service-0: (\S+) -> 127\.0\.0\.1:{echo} opened")
    return match.group(1)


@pytest.mark.parametrize("forged", [False, True], ids=["plain", "forged-header"])
def test_server_behind_nginx_sees_the_client_address(
    start_nginx: NginxFactory, echo: int, forged: bool
) -> None:
    headers = [("X-Forwarded-For", FORGED), ("X-Real-IP", FORGED)] if forged else []
    with _server(echo, f"?trustedProxies={NGINX_SOURCE},10.0.0.0/8") as server:
        nginx_port = _behind_nginx(start_nginx, server.port())
        _echo_through(nginx_port, headers)
        # The 'opened' line comes from the runner, the 'closed' one from the
        # forward handler itself: both see the stream's remote address.
        assert _opened(server, echo) == "127.0.0.1"
        server.wait_for(rf"forward 127\.0\.0\.1 -> 127\.0\.0\.1:{echo} closed: 4 B up, 4 B down")
        status, output = server.stop()
    assert status == 0
    start, _, traffic = output.partition(": running")
    assert f"client addresses from {NGINX_SOURCE}/32,10.0.0.0/8" in start
    assert NGINX_SOURCE not in traffic
    assert FORGED not in output


def test_without_trusted_proxies_the_peer_is_nginx(start_nginx: NginxFactory, echo: int) -> None:
    with _server(echo, "") as server:
        nginx_port = _behind_nginx(start_nginx, server.port())
        _echo_through(nginx_port, [])
        assert re.fullmatch(rf"{re.escape(NGINX_SOURCE)}:\d+", _opened(server, echo))


def test_forged_header_from_an_untrusted_peer_is_ignored(echo: int) -> None:
    with _server(echo, f"?trustedProxies={NGINX_SOURCE}") as server:
        _echo_through(server.port(), [("X-Forwarded-For", FORGED), ("X-Real-IP", FORGED)])
        assert re.fullmatch(r"127\.0\.0\.1:\d+", _opened(server, echo))
        _, output = server.stop()
    assert FORGED not in output


def test_json_log_lines_carry_the_client_address(start_nginx: NginxFactory, echo: int) -> None:
    query = f"?trustedProxies={NGINX_SOURCE}"
    with _server(echo, query, "--log-format", "json") as server:
        nginx_port = _behind_nginx(start_nginx, server.port())
        _echo_through(nginx_port, [("X-Forwarded-For", FORGED)])
        server.wait_for(r"forward 127\.0\.0\.1 -> .* closed")
        _, output = server.stop()
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    with_remote = [entry for entry in entries if "remote" in entry]
    assert {entry["remote"] for entry in with_remote} == {"127.0.0.1"}
    assert any(entry.get("service") == "service-0" for entry in with_remote)
    assert any(entry.get("handler") == "forward" for entry in with_remote)
