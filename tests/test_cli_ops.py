"""Operating ``pht`` like GOST, over real processes: headers, log levels, JSON
logs, metrics, and the error each client meets when a chain fails.

Each failure case checks the protocol's own answer (HTTP 502, the SOCKS5
reply code) and a log line that names the hop and the cause in words.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cli_e2e import BODY, assert_body, curl, fetch_via, on_every_backend, on_every_loop
from .test_cli_e2e import origin as origin  # the fixture
from .test_cli_run import START_TIMEOUT, PhtProcess, free_port, run_pht
from .test_cli_run import cli_backend as cli_backend  # the fixtures
from .test_cli_run import cli_backend_all as cli_backend_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

# --- helpers ---------------------------------------------------------------------------


class _Capture(http.server.BaseHTTPRequestHandler):
    """Records the headers of every request and answers 404."""

    seen: list[dict[str, str]]

    def _record(self) -> None:
        self.seen.append({name.lower(): value for name, value in self.headers.items()})
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_error(404)

    do_GET = do_POST = _record

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[int, list[dict[str, str]]]]:
    """An HTTP server that records request headers; yields (port, records)."""
    seen: list[dict[str, str]] = []
    handler = type("Capture", (_Capture,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


#: Sockets that hold :func:`closed_port`'s ports until the tests end.
_HELD_PORTS: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused.

    The port stays bound (not listening) until the tests end, so that no
    service started meanwhile can be given it (a free port, closed again,
    could be).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    port: int = sock.getsockname()[1]
    return port


def socks5_reply(proxy_port: int, host: str, port: int) -> int:
    """Ask the SOCKS5 proxy for ``host:port``; return the REP byte of its reply."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=START_TIMEOUT) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        reply = b""
        while len(reply) < 2:
            chunk = sock.recv(10)
            if not chunk:
                pytest.fail(f"the SOCKS5 proxy closed without a reply (got {reply!r})")
            reply += chunk
        return reply[1]


def http_status_via(proxy_port: int, url: str) -> subprocess.CompletedProcess[bytes]:
    return curl(url, "-x", f"http://127.0.0.1:{proxy_port}", "-w", "%{http_code}")


def metrics_port(process: PhtProcess) -> int:
    match = process.wait_for(r"metrics: listening on [^ ]*?:(\d+)\b")
    return int(match.group(1))


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the metrics endpoint."""
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/metrics", timeout=START_TIMEOUT
    ) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def scrape_settled(port: int, service: str = "service-0") -> dict[str, float]:
    """A scrape taken once no request of ``service`` is in flight (bounded wait):
    a handler logs its last line a moment before its connection is counted done."""
    for _ in range(300):
        samples = scrape(port)
        if sample(samples, "gost_service_requests_in_flight", service) == 0:
            return samples
        threading.Event().wait(0.05)
    pytest.fail(f"{service} still has requests in flight")


def sample(samples: dict[str, float], name: str, service: str) -> float:
    for key, value in samples.items():
        if key.startswith(name + "{") and f'service="{service}"' in key:
            return value
    raise AssertionError(f"no {name} for {service} in {sorted(samples)}")


# --- header.NAME=VALUE ------------------------------------------------------------------


@on_every_backend
def test_header_option_reaches_the_server(capture: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = capture
    node = f"socks5+pht://127.0.0.1:{port}?header.ServiceToken=t0k&header=X-Other:2"
    with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
        result = fetch_via(client.port(), "http", 9)
        assert result.returncode != 0
        client.wait_for("WARNING")
    assert seen, "no request reached the capture server"
    assert seen[0]["servicetoken"] == "t0k"
    assert seen[0]["x-other"] == "2"


def test_unknown_and_refused_options_are_said() -> None:
    with PhtProcess("-L", "http://127.0.0.1:0?keepAlive=1") as child:
        child.wait_for(r"WARNING .*unknown option 'keepAlive': ignored")
    result = run_pht("-L", "socks5+pht://127.0.0.1:0?udp=true")
    assert result.returncode == 2
    assert "option 'udp' (UDP relay) is not supported by pht" in result.stderr


# --- logging --------------------------------------------------------------------------


def wait_listening(port: int) -> None:
    """Wait (bounded) until something accepts connections on ``port``."""
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT).close()
            return
        except ConnectionRefusedError:
            threading.Event().wait(0.1)
    pytest.fail(f"nothing listens on port {port}")


def test_log_level_warning_shows_a_failed_tunnel() -> None:
    port = free_port()
    hop = f"socks5://127.0.0.1:{closed_port()}"
    with PhtProcess("--log-level", "warning", "-L", f"127.0.0.1:{port}", "-F", hop) as client:
        wait_listening(port)
        result = http_status_via(port, "http://127.0.0.1:9/")
        assert result.stdout.endswith(b"502")
        line = client.wait_for(r"WARNING http .*: 502 Bad Gateway: no way to 127\.0\.0\.1:9: .*")
        assert "hop-0 (socks5+tcp://127.0.0.1:" in line.group(0)
        assert "Connection refused" in line.group(0)
        assert "cannot reach" not in line.group(0)
        status, output = client.stop()
    assert status == 0
    assert " INFO " not in output.replace("INFO SIGINT", "")


def test_json_logs_parse_line_by_line(tmp_path: Path) -> None:
    log_file = tmp_path / "pht.log"
    hop = f"socks5://127.0.0.1:{closed_port()}"
    args = ("--log-format", "json", "--log-output", str(log_file), "-L", "127.0.0.1:0", "-F", hop)
    with PhtProcess(*args, "-L", "127.0.0.1:0?unknownThing=1") as client:
        entries = _wait_json(log_file, "service-0: listening on")
        port = next(
            int(match.group(1))
            for entry in entries
            if (match := re.match(r"service-0: listening on [^ ]*:(\d+) ", entry["msg"]))
        )
        result = http_status_via(port, "http://127.0.0.1:9/")
        assert result.stdout.endswith(b"502")
        entries = _wait_json(log_file, "502 Bad Gateway")
        status, output = client.stop()
    assert status == 0
    assert output == ""  # everything went to the file
    levels = {entry["level"] for entry in entries}
    assert {"info", "warning"} <= levels
    for entry in entries:
        assert set(entry) >= {"level", "msg", "time"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", entry["time"])
    assert any("unknown option 'unknownThing'" in entry["msg"] for entry in entries)


def _wait_json(path: Path, text: str) -> list[dict[str, str]]:
    """Every line of the JSON log, once one contains ``text`` (bounded wait)."""
    for _ in range(300):
        if path.exists():
            lines = path.read_text().splitlines()
            entries = [json.loads(line) for line in lines if line.endswith("}")]
            if any(text in entry["msg"] for entry in entries):
                return entries
        threading.Event().wait(0.1)
    pytest.fail(f"no JSON log line with {text!r} in {path}")


# --- metrics --------------------------------------------------------------------------

needs_prometheus = pytest.mark.skipif(
    importlib.util.find_spec("prometheus_client") is None,
    reason="prometheus-client is not installed (pip install 'pht-tunnel[metrics]')",
)


@on_every_backend
@needs_prometheus
def test_metrics_count_a_tunnel(origin: int) -> None:
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0", "-metrics", "127.0.0.1:0") as server:
        node = f"socks5+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node, "--metrics", "127.0.0.1:0") as client:
            before = scrape(metrics_port(client))
            assert sample(before, "gost_service_requests_total", "service-0") == 0
            assert before['gost_services{host="' + socket.gethostname() + '"}'] == 1
            assert_body(fetch_via(client.port(), "socks5", origin), server, client)
            client.wait_for(r"socks5 .* closed: ")
            after = scrape_settled(metrics_port(client))
            server.wait_for(r"socks5 .* closed: ")
            served = scrape_settled(metrics_port(server))
    assert sample(after, "gost_service_requests_total", "service-0") == 1
    assert sample(after, "gost_service_transfer_output_bytes_total", "service-0") > len(BODY)
    assert sample(after, "gost_service_transfer_input_bytes_total", "service-0") > 0
    assert sample(after, "gost_service_requests_in_flight", "service-0") == 0
    assert sample(after, "gost_service_handler_errors_total", "service-0") == 0
    assert sample(after, "gost_service_request_duration_seconds_count", "service-0") == 1
    assert sample(served, "gost_service_requests_total", "service-0") == 1
    assert sample(served, "gost_service_transfer_output_bytes_total", "service-0") > len(BODY)
    # PHT's own counters, fed by the server (the client's service is plain TCP).
    assert sample(served, "pht_sessions_total", "service-0") == 1
    assert sample(served, "pht_pushes_total", "service-0") >= 1
    assert sample(served, "pht_pulls_total", "service-0") >= 1
    assert not any(key.startswith("pht_") for key in after)


@on_every_backend
@needs_prometheus
def test_metrics_count_handler_and_chain_errors() -> None:
    hop = f"socks5://127.0.0.1:{closed_port()}"
    with PhtProcess("-L", "127.0.0.1:0", "-F", hop, "-metrics", "127.0.0.1:0") as client:
        assert http_status_via(client.port(), "http://127.0.0.1:9/").stdout.endswith(b"502")
        client.wait_for("502 Bad Gateway")
        samples = scrape_settled(metrics_port(client))
        output = client.output()
    assert sample(samples, "gost_service_requests_total", "service-0") == 1, output
    assert sample(samples, "gost_service_handler_errors_total", "service-0") == 1, output
    assert any(
        key.startswith("gost_chain_errors_total{") and 'node="node-0"' in key and value == 1
        for key, value in samples.items()
    )


# --- failures through chains: the protocol's own answer, a readable line -----------------


@on_every_backend
def test_relay_chain_wrong_password_is_a_502_for_http(origin: int) -> None:
    with PhtProcess("-L", "relay+pht://user:secret@127.0.0.1:0") as server:
        node = f"relay+pht://user:wrong@127.0.0.1:{server.port()}"
        with PhtProcess("-L", "127.0.0.1:0", "-F", node) as client:
            result = http_status_via(client.port(), f"http://127.0.0.1:{origin}/blob")
            assert result.stdout.endswith(b"502"), result.stderr
            line = client.wait_for(r"WARNING http .* 502 Bad Gateway: .*")
        server.wait_for(r"WARNING relay .*: wrong credentials \(user user\)")
    assert "hop-0 (relay+pht://127.0.0.1:" in line.group(0)
    assert "rejected the credentials" in line.group(0)
    assert "Error(" not in client.output()


@on_every_backend
@pytest.mark.parametrize("entry", ["http", "socks5"])
def test_eager_relay_chain_answers_each_cause(entry: str) -> None:
    refused = closed_port()
    server_args = ("-L", "relay+pht://user:secret@127.0.0.1:0?nodelay=true")
    with PhtProcess(*server_args) as server:
        good = f"relay+pht://user:secret@127.0.0.1:{server.port()}?nodelay=true"
        bad = f"relay+pht://user:wrong@127.0.0.1:{server.port()}?nodelay=true"
        with (
            PhtProcess("-L", f"{entry}://127.0.0.1:0", "-F", good) as ok_client,
            PhtProcess("-L", f"{entry}://127.0.0.1:0", "-F", bad) as bad_client,
        ):
            if entry == "socks5":
                # The target refuses: SOCKS5 "connection refused" (0x05).
                assert socks5_reply(ok_client.port(), "127.0.0.1", refused) == 0x05
                # The hop refuses the login: a general failure (0x01), not the target's.
                assert socks5_reply(bad_client.port(), "127.0.0.1", refused) == 0x01
            else:
                url = f"http://127.0.0.1:{refused}/"
                assert http_status_via(ok_client.port(), url).stdout.endswith(b"502")
                assert http_status_via(bad_client.port(), url).stdout.endswith(b"502")
            refused_line = ok_client.wait_for(rf"WARNING .*127\.0\.0\.1:{refused}.*").group(0)
            login_line = bad_client.wait_for(r"WARNING .*credentials.*").group(0)
    assert f"cannot reach 127.0.0.1:{refused}: connection refused" in refused_line
    assert "hop-0 (relay+pht://127.0.0.1:" in refused_line
    assert "cannot reach" not in login_line
    assert "hop-0 (relay+pht://127.0.0.1:" in login_line


@on_every_backend
def test_socks5_chain_target_refused_is_socks5_refused() -> None:
    refused = closed_port()
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0") as server:
        node = f"socks5+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "socks5://127.0.0.1:0", "-F", node) as client:
            assert socks5_reply(client.port(), "127.0.0.1", refused) == 0x05
            line = client.wait_for(r"WARNING socks5 .*").group(0)
    assert f"cannot reach 127.0.0.1:{refused}: connection refused" in line


@on_every_loop  # (asyncio's default loop words a refused connect its own way)
def test_unreachable_tunnel_server_is_the_hops_fault() -> None:
    node = f"socks5+pht://127.0.0.1:{closed_port()}"
    with PhtProcess("-L", "socks5://127.0.0.1:0", "-F", node) as client:
        assert socks5_reply(client.port(), "127.0.0.1", 9) == 0x01
        line = client.wait_for(r"WARNING socks5 .*").group(0)
    assert "no way to 127.0.0.1:9: hop-0 (socks5+pht://127.0.0.1:" in line
    assert "Connection refused" in line
    assert "cannot reach" not in line


@on_every_backend
def test_plain_pht_client_against_phts_server_gets_a_hint() -> None:
    with PhtProcess("-L", "socks5+phts://127.0.0.1:0") as server:
        node = f"socks5+pht://127.0.0.1:{server.port()}"
        with PhtProcess("-L", "socks5://127.0.0.1:0", "-F", node) as client:
            assert socks5_reply(client.port(), "127.0.0.1", 9) == 0x01
            line = client.wait_for(r"WARNING socks5 .*").group(0)
    assert "is it a phts server? then write phts://" in line


@on_every_backend
@pytest.mark.parametrize("scheme", ["http+pht", "socks5+pht"])
def test_wrong_password_at_a_hop_is_a_general_failure(scheme: str) -> None:
    with PhtProcess("-L", f"{scheme}://user:secret@127.0.0.1:0") as server:
        node = f"{scheme}://user:wrong@127.0.0.1:{server.port()}"
        with (
            PhtProcess("-L", "socks5://127.0.0.1:0", "-F", node) as socks_client,
            PhtProcess("-L", "http://127.0.0.1:0", "-F", node) as http_client,
        ):
            assert socks5_reply(socks_client.port(), "127.0.0.1", 9) == 0x01
            result = http_status_via(http_client.port(), "http://127.0.0.1:9/")
            assert result.stdout.endswith(b"502")
            for client in (socks_client, http_client):
                line = client.wait_for(r"WARNING .*").group(0)
                assert f"no way to 127.0.0.1:9: hop-0 ({scheme}://127.0.0.1:" in line
                assert "credentials" in line or "407" in line
                assert "Error(" not in line
        server.wait_for(r"WARNING .*(wrong credentials|Proxy-Authorization)")
