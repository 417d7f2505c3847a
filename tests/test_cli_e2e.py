"""End to end: a pht server, a pht client, and real curl through both.

Every command of GOST's PHT page, written for ``pht`` (and as YAML), carries
a 1 MiB random body from a local HTTP server to curl, byte for byte. Wrong
credentials, mismatched paths and an unverifiable certificate fail quickly
with a message instead of hanging.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import pht

from .test_cli_run import (
    START_TIMEOUT,
    PhtProcess,
    backend_of_pht_processes,
    child_env,
    free_port,
)
from .test_cli_run import cli_backend as cli_backend  # the fixtures, used by name
from .test_cli_run import cli_backend_all as cli_backend_all

#: The tests that move bytes and fail connections run on trio and on asyncio
#: (uvloop), a few on every loop; the configuration-only twins run on the
#: default loop.
on_every_backend = pytest.mark.usefixtures("cli_backend")
on_every_loop = pytest.mark.usefixtures("cli_backend_all")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.middlebox,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

BODY = os.urandom(1024 * 1024)
CURL_TIMEOUT = 60


class _BlobHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/blob":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    """A local HTTP server with ``/blob``; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BlobHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def curl(url: str, *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", str(CURL_TIMEOUT), "-o", "-", *options, url],
        capture_output=True,
        timeout=CURL_TIMEOUT + 10,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def fetch_via(client_port: int, mode: str, origin_port: int) -> subprocess.CompletedProcess[bytes]:
    """curl ``/blob`` through the client's local proxy (``http`` or ``socks5``)."""
    url = f"http://127.0.0.1:{origin_port}/blob"
    if mode == "http":
        return curl(url, "-x", f"http://127.0.0.1:{client_port}")
    return curl(url, "--socks5-hostname", f"127.0.0.1:{client_port}")


def assert_body(result: subprocess.CompletedProcess[bytes], *logs: PhtProcess) -> None:
    context = "\n".join(log.output() for log in logs)
    assert result.returncode == 0, f"curl: {result.stderr.decode()}\n{context}"
    assert len(result.stdout) == len(BODY)
    assert result.stdout == BODY


@dataclass(frozen=True)
class Case:
    """A server command and the -F node a client uses to reach it."""

    server: Callable[[], list[str]]
    node: str  # "{port}" is replaced by the server's port
    curl: str = "http"


def _forwarded(scheme: str) -> Callable[[], list[str]]:
    # gost -L pht://:8443/:1080 -L socks5://:1080 (the SOCKS5 port must be
    # known before the server starts, hence a free port instead of 0)
    def server() -> list[str]:
        socks = free_port()
        return [
            "-L",
            f"{scheme}://127.0.0.1:0/127.0.0.1:{socks}",
            "-L",
            f"socks5://127.0.0.1:{socks}",
        ]

    return server


PATHS = "authorizePath=/authorize&pushPath=/push&pullPath=/pull"
CASES = {
    "http+pht": Case(
        lambda: ["-L", f"http+pht://127.0.0.1:0?{PATHS}"], f"http+pht://127.0.0.1:{{port}}?{PATHS}"
    ),
    "http+pht-custom-paths": Case(
        lambda: ["-L", "http+pht://127.0.0.1:0?authorizePath=/a&pushPath=/up&pullPath=/down"],
        "http+pht://127.0.0.1:{port}?authorizePath=/a&pushPath=/up&pullPath=/down",
        "socks5",
    ),
    "http+phts": Case(
        lambda: ["-L", f"http+phts://127.0.0.1:0?{PATHS}"], "http+phts://127.0.0.1:{port}"
    ),
    "socks5+pht": Case(
        lambda: ["-L", "socks5+pht://127.0.0.1:0"], "socks5+pht://127.0.0.1:{port}"
    ),
    "socks5+phts-auth": Case(
        lambda: ["-L", "socks5+phts://user:secret@127.0.0.1:0"],
        "socks5+phts://user:secret@127.0.0.1:{port}",
        "socks5",
    ),
    "relay+pht": Case(
        lambda: ["-L", "relay+pht://127.0.0.1:0"], "relay+pht://127.0.0.1:{port}", "socks5"
    ),
    "relay+phts-auth": Case(
        lambda: ["-L", "relay+phts://user:secret@127.0.0.1:0"],
        "relay+phts://user:secret@127.0.0.1:{port}",
    ),
    "pht-auto": Case(lambda: ["-L", "pht://127.0.0.1:0"], "pht://127.0.0.1:{port}", "socks5"),
    "pht-forward-to-socks5": Case(_forwarded("pht"), "socks5+pht://127.0.0.1:{port}"),
    "forward+pht-to-socks5": Case(
        _forwarded("forward+pht"), "socks5+pht://127.0.0.1:{port}", "socks5"
    ),
}


@on_every_backend
@pytest.mark.parametrize("name", list(CASES))
def test_proxy_over_pht(name: str, origin: int) -> None:
    _proxy_over_pht(name, origin)


@pytest.mark.parametrize("name", ["http+phts", "relay+pht", "pht-forward-to-socks5"])
def test_proxy_over_pht_on_asyncios_own_loop(name: str, origin: int) -> None:
    # The matrix runs on trio and uvloop; asyncio's default loop shares
    # pht.asyncio with uvloop: a listener of each kind, pht and phts, there.
    with backend_of_pht_processes("asyncio"):
        _proxy_over_pht(name, origin)


def _proxy_over_pht(name: str, origin: int) -> None:
    case = CASES[name]
    with PhtProcess(*case.server()) as server:
        node = case.node.format(port=server.port())
        # gost -L :1080 -F <node>: a local HTTP+SOCKS proxy through the tunnel
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            result = fetch_via(client.port(), case.curl, origin)
            assert_body(result, server, client)
            client.wait_for(rf"-> 127\.0\.0\.1:{origin} opened")
        server.wait_for(rf"-> 127\.0\.0\.1:{origin} opened")


@on_every_backend
def test_tcp_port_forwarding_through_the_chain(origin: int) -> None:
    # gost -L tcp://:2222/10.0.0.5:22 -F pht://server:8443, with the origin as target
    with PhtProcess("-L", "pht://127.0.0.1:0") as server:
        node = f"pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", f"tcp://127.0.0.1:0/127.0.0.1:{origin}", "-F", node) as client:
            assert_body(curl(f"http://127.0.0.1:{client.port()}/blob"), server, client)


@on_every_backend
def test_forward_connector(origin: int) -> None:
    # The client's forward connector sends the stream as is; the server's
    # forward handler takes it to its own target.
    with PhtProcess("-L", f"forward+pht://127.0.0.1:0/127.0.0.1:{origin}") as server:
        node = f"forward+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "tcp://127.0.0.1:0/127.0.0.1:1", "-F", node) as client:
            assert_body(curl(f"http://127.0.0.1:{client.port()}/blob"), server, client)


@on_every_backend
def test_parallel_downloads_through_one_client(origin: int) -> None:
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0") as server:
        node = f"socks5+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            port = client.port()
            with ThreadPoolExecutor(max_workers=4) as pool:
                results = list(
                    pool.map(lambda mode: fetch_via(port, mode, origin), ["http", "socks5"] * 2)
                )
            for result in results:
                assert_body(result, server, client)


# --- the YAML twins --------------------------------------------------------------------


def _client_yaml(node_type: str, port: int, extra_dialer: str = "", auth: str = "") -> str:
    connector, dialer = node_type.split("+")
    return f"""
services:
- name: local
  addr: "127.0.0.1:0"
  handler: {{type: auto, chain: chain-0}}
  listener: {{type: tcp}}
chains:
- name: chain-0
  hops:
  - name: hop-0
    nodes:
    - name: node-0
      addr: "127.0.0.1:{port}"
      connector: {{type: {connector}{auth}}}
      dialer:
        type: {dialer}
{extra_dialer}
"""


YAML_SERVERS = {
    "http+pht": """
services:
- name: tunnel
  addr: "127.0.0.1:0"
  handler: {type: http}
  listener:
    type: pht
    metadata: {authorizePath: /authorize, pushPath: /push, pullPath: /pull}
""",
    "socks5+phts": """
services:
- name: tunnel
  addr: "127.0.0.1:0"
  handler: {type: socks5, auth: {username: user, password: secret}}
  listener: {type: phts}
""",
    "relay+pht": """
services:
- name: tunnel
  addr: "127.0.0.1:0"
  handler: {type: relay}
  listener: {type: pht}
""",
}
YAML_CLIENT_AUTH = {"socks5+phts": ", auth: {username: user, password: secret}"}
YAML_DIALER_META = {
    "http+pht": "        metadata: {authorizePath: /authorize, pushPath: /push, pullPath: /pull}"
}


@pytest.mark.parametrize("name", list(YAML_SERVERS))
def test_yaml_twins(name: str, origin: int, tmp_path: Path) -> None:
    server_file = tmp_path / "server.yaml"
    server_file.write_text(YAML_SERVERS[name])
    with PhtProcess("-C", str(server_file)) as server:
        client_file = tmp_path / "client.yaml"
        client_file.write_text(
            _client_yaml(
                name,
                server.port("tunnel"),
                YAML_DIALER_META.get(name, ""),
                YAML_CLIENT_AUTH.get(name, ""),
            )
        )
        with PhtProcess("-C", str(client_file)) as client:
            port = client.port("local")
            assert_body(fetch_via(port, "http", origin), server, client)
            assert_body(fetch_via(port, "socks5", origin), server, client)


def test_yaml_port_forwarding_twin(origin: int, tmp_path: Path) -> None:
    socks = free_port()
    server_file = tmp_path / "server.yaml"
    server_file.write_text(
        f"""
services:
- name: service-0
  addr: "127.0.0.1:0"
  handler: {{type: forward}}
  listener: {{type: pht}}
  forwarder:
    nodes:
    - name: target-0
      addr: "127.0.0.1:{socks}"
- name: service-1
  addr: "127.0.0.1:{socks}"
  handler: {{type: socks5}}
  listener: {{type: tcp}}
"""
    )
    with PhtProcess("-C", str(server_file)) as server:
        server.port("service-1")
        client_file = tmp_path / "client.yaml"
        client_file.write_text(_client_yaml("socks5+pht", server.port()))
        with PhtProcess("-C", str(client_file)) as client:
            assert_body(fetch_via(client.port("local"), "socks5", origin), server, client)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    made = pht.make_self_signed_certificate(common_name="tunnel.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(made.cert_pem)
    key.write_bytes(made.key_pem)
    return cert, key


def test_verified_phts_with_certificate_files(
    origin: int, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_file = tmp_path / "server.yaml"
    server_file.write_text(
        f"""
services:
- name: tunnel
  addr: "127.0.0.1:0"
  handler: {{type: http}}
  listener:
    type: phts
    tls: {{certFile: "{cert}", keyFile: "{key}"}}
"""
    )
    with PhtProcess("-C", str(server_file)) as server:
        port = server.port("tunnel")
        tls = f'        tls: {{secure: true, caFile: "{cert}", serverName: tunnel.test}}'
        client_file = tmp_path / "client.yaml"
        client_file.write_text(_client_yaml("http+phts", port, tls))
        with PhtProcess("-C", str(client_file)) as client:
            assert_body(fetch_via(client.port("local"), "http", origin), server, client)

        # caFile without secure: the chain must lead to the CA, the name is
        # not checked (GOST's rule).
        node = f"http+phts://127.0.0.1:{port}?caFile={cert}&serverName=other.name"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            assert_body(fetch_via(client.port(), "http", origin), server, client)

        # Another CA: refused.
        other = tmp_path / "other.pem"
        other.write_bytes(pht.make_self_signed_certificate().cert_pem)
        node = f"http+phts://127.0.0.1:{port}?caFile={other}"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            result = fetch_via(client.port(), "http", origin)
            assert result.returncode != 0
            client.wait_for(r"(?i)certificate verify failed")

        # The same server, verified against the system's CAs: refused.
        node = f"http+phts://127.0.0.1:{port}?secure=true&serverName=tunnel.test"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            result = fetch_via(client.port(), "http", origin)
            assert result.returncode != 0
            assert result.stdout == b""
            client.wait_for(r"(?i)certificate verify failed")


# --- failures are quick and say why ----------------------------------------------------


@on_every_backend
@pytest.mark.parametrize(
    ("server_url", "node"),
    [
        ("socks5+pht://user:secret@127.0.0.1:0", "socks5+pht://user:wrong@127.0.0.1:{port}"),
        ("socks5+pht://user:secret@127.0.0.1:0", "socks5+pht://127.0.0.1:{port}"),
        ("http+pht://user:secret@127.0.0.1:0", "http+pht://user:wrong@127.0.0.1:{port}"),
        ("relay+pht://user:secret@127.0.0.1:0", "relay+pht://user:wrong@127.0.0.1:{port}"),
    ],
)
def test_wrong_credentials_are_refused(server_url: str, node: str, origin: int) -> None:
    with PhtProcess("-L", server_url) as server:
        with PhtProcess("-L", "127.0.0.1:0", "-F", node.format(port=server.port())) as client:
            for mode in ("http", "socks5"):
                result = fetch_via(client.port(), mode, origin)
                assert result.returncode != 0, client.output()
                assert result.stdout == b""
        assert f"127.0.0.1:{origin} opened" not in server.output()


@on_every_backend
@pytest.mark.parametrize(
    "server_query",
    ["pushPath=/elsewhere", "pullPath=/elsewhere", "authorizePath=/elsewhere"],
)
def test_mismatched_paths_fail_with_a_message(server_query: str, origin: int) -> None:
    with PhtProcess("-L", f"http+pht://127.0.0.1:0?{server_query}") as server:
        node = f"http+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            result = fetch_via(client.port(), "http", origin)
            assert result.returncode != 0
            assert result.stdout == b""
            # The hop is at fault, not the target: the line names the hop.
            line = client.wait_for(
                r"WARNING .*502 Bad Gateway: no way to 127\.0\.0\.1:\d+: "
                r"hop-0 \(http\+pht://127\.0\.0\.1:\d+\): .*",
                timeout=START_TIMEOUT,
            )
            assert "paths match" in line.group(0)
            assert "cannot reach" not in client.output()


@on_every_backend
def test_two_hop_chain(origin: int) -> None:
    # -F socks5+pht://S -F http://P: the PHT tunnel's SOCKS5 CONNECT reaches the
    # second hop (a plain HTTP proxy), whose CONNECT reaches the origin.
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0", "-L", "http://127.0.0.1:0") as server:
        first, second = server.port("service-0"), server.port("service-1")
        with PhtProcess(
            "-L",
            "127.0.0.1:0",
            "-F",
            f"socks5+pht://127.0.0.1:{first}",
            "-F",
            f"http://127.0.0.1:{second}",
        ) as client:
            assert_body(fetch_via(client.port(), "socks5", origin), server, client)
        server.wait_for(rf"service-0: .* -> 127\.0\.0\.1:{second} opened")
        server.wait_for(rf"service-1: .* -> 127\.0\.0\.1:{origin} opened")
