"""pht.asgi under the real uvicorn and hypercorn commands, mounted in a Starlette site.

Each test starts ``tests/asgi_site.py`` with the server's own command line on
a free loopback port; pht's trio client tunnels through it, beside the
site's ordinary route, directly and through a real nginx.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import pht
import pht.asyncio

from .adapters import ProcessOutput, Reports, start_watched
from .middlebox import harness
from .middlebox.tunnel_checks import HANG_BOUND, pattern
from .support import receive_exactly

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "asgi.md"

#: docs/asgi.md's recipe for several server processes: nginx sends every
#: request of a session (they all carry ``?token=``) to one process, and the
#: site's other pages to any.
NGINX_ASGI_SCALED_SITE = """\
upstream pht_tunnels {
    hash $arg_token consistent;
@SERVERS@
    keepalive 32;
}

upstream site {
@SERVERS@
    keepalive 32;
}

server {
    listen @LISTEN@;

    location /tunnel/ {
        proxy_pass http://pht_tunnels;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout @READ_TIMEOUT@;
        client_max_body_size @MAX_BODY@;
    }

    location / {
        proxy_pass http://site;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
    }
}
"""


def render_nginx_asgi_scaled(listen: str, backends: list[str]) -> str:
    servers = "\n".join(f"    server {backend};" for backend in backends)
    values = {
        "LISTEN": listen,
        "SERVERS": servers,
        "READ_TIMEOUT": "60s",
        "MAX_BODY": harness.MAX_BODY,
    }
    return harness.render(NGINX_ASGI_SCALED_SITE, values)


BIN = Path(sys.executable).parent
#: uvicorn runs on uvloop when it is installed (the tests' requirements pin
#: it), and on asyncio's own loop when told to; hypercorn on asyncio's.
SERVERS = ("uvicorn", "uvicorn-asyncio-loop", "hypercorn")
#: Seconds the servers give open requests when told to stop.
GRACE = 2


class Site(harness.ManagedProcess):
    """The Starlette site run by ``server``; its output (with session ends) is ``log``."""

    server = ""
    #: Its output as it comes (``None``: only its log file, e.g. nginx's).
    watch: ProcessOutput | None = None

    def paths(self, mount: str = "/tunnel") -> dict[str, str]:
        return {
            "authorize_path": f"{mount}/authorize",
            "push_path": f"{mount}/push",
            "pull_path": f"{mount}/pull",
        }

    async def open(self, mount: str = "/tunnel", **kwargs: object) -> pht.PHTStream:
        return await pht.open_pht_stream(
            "127.0.0.1",
            self.port,
            **self.paths(mount),  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )

    def output(self) -> str:
        if self.watch is not None:
            return self.watch.text()
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str, timeout: float = HANG_BOUND) -> None:
        """Wait (bounded) until a line of the output holds ``text``: woken by each line."""
        assert self.watch is not None
        self.watch.wait_for(lambda lines: any(text in line for line in lines), timeout)


def start_site(
    server: str,
    directory: Path,
    *,
    heartbeat: float = 10.0,
    app: str = "tests.asgi_site:app",
    certificate: tuple[Path, Path] | None = None,
    also: Reports | None = None,
) -> Site:
    """Run ``app`` with ``server``'s command (as a user types it) on a free port.

    ``certificate`` (key file, certificate file) makes it serve HTTPS; ``also``
    gets the site's output lines too (to wait on several sites at once).
    """
    port = harness.free_port()
    command = [str(BIN / server.partition("-")[0]), app]
    if server.startswith("uvicorn"):
        command += ["--host", "127.0.0.1", "--port", str(port)]
        command += ["--timeout-graceful-shutdown", str(GRACE), "--log-level", "warning"]
        command += ["--loop", "asyncio" if server.endswith("asyncio-loop") else "auto"]
        if certificate is not None:
            command += ["--ssl-keyfile", str(certificate[0])]
            command += ["--ssl-certfile", str(certificate[1])]
    else:
        command += ["--bind", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE)]
        if certificate is not None:
            command += ["--keyfile", str(certificate[0]), "--certfile", str(certificate[1])]
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"{server}.log"
    env = {**os.environ, "PHT_HEARTBEAT": str(heartbeat), "PYTHONUNBUFFERED": "1"}
    process, watch = start_watched(command, log, also=also, cwd=ROOT, env=env)
    site = Site(server, process, log)
    site.watch = watch
    site.server = server
    site.port = port
    harness.wait_for_port(port, site)
    return site


@pytest.fixture(params=SERVERS)
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    started = start_site(request.param, tmp_path)
    yield started
    started.stop()


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send one raw request (which asks to close the connection): ``(status, body)``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = bytearray()
        with trio.fail_after(HANG_BOUND):
            while data := await stream.receive_some():
                answer += data
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(path: str, *extra: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: site\r\n%sConnection: close\r\n\r\n" % (
        path.encode(),
        b"".join(extra),
    )


async def wait_for_output(site: Site, text: str) -> None:
    """Wait (bounded) until the site printed ``text``: it runs in another process."""
    await trio.to_thread.run_sync(site.wait_for_line, text)
    assert text in site.output(), site.output()


async def exchange(stream: pht.PHTStream, size: int, seed: int) -> None:
    """Send ``size`` bytes while reading their echo; compare both sides' sha256."""
    payload = pattern(size, seed)
    sent, received = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        for start in range(0, size, 1024 * 1024):
            piece = payload[start : start + 1024 * 1024]
            await stream.send_all(piece)
            sent.update(piece)

    with trio.fail_after(HANG_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            left = size
            while left:
                data = await stream.receive_some(min(left, 1024 * 1024))
                assert data, f"EOF after {size - left} of {size} bytes"
                received.update(data)
                left -= len(data)
    assert received.hexdigest() == sent.hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
async def test_16_mib_each_way(site: Site, authorize: bool) -> None:
    stream = await site.open(authorize=authorize)
    async with stream:
        await exchange(stream, 16 * 1024 * 1024, seed=1)
    assert stream.token is not None
    await wait_for_output(site, f"session-ended {stream.token} {16 * 1024 * 1024}")


@pytest.mark.parametrize("server", SERVERS)
async def test_phts_when_the_server_terminates_tls(server: str, tmp_path: Path) -> None:
    """The ASGI server's TLS (its own options) carries phts, pht's TLS client through it."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    key, chain = tmp_path / "key.pem", tmp_path / "chain.pem"
    issued.private_key_pem.write_to_path(key)
    issued.cert_chain_pems[0].write_to_path(chain)
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(chain, append=True)
    site = start_site(server, tmp_path / server, certificate=(key, chain))
    try:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        for authorize in (True, False):
            stream = await site.open(authorize=authorize, tls=context)
            async with stream:
                await exchange(stream, 2 * 1024 * 1024 + 1, seed=7)
    finally:
        site.stop()


async def test_several_tunnels_at_once(site: Site) -> None:
    async def one(index: int) -> None:
        stream = await site.open(authorize=bool(index % 2))
        async with stream:
            await exchange(stream, 256 * 1024 + index, seed=index)

    async with trio.open_nursery() as nursery:
        for index in range(16):
            nursery.start_soon(one, index)


async def test_ordinary_route_answers_beside_open_tunnels(site: Site) -> None:
    stream = await site.open(authorize=False)
    async with stream:
        await stream.send_all(b"ping")
        with trio.fail_after(HANG_BOUND):
            assert await receive_exactly(stream, 4) == b"ping"
        assert await http(site.port, get("/hello")) == (200, b"hello from the site\n")
        await stream.send_all(b"pong")
        with trio.fail_after(HANG_BOUND):
            assert await receive_exactly(stream, 4) == b"pong"


async def test_close_from_the_client_ends_the_session(site: Site) -> None:
    stream = await site.open(authorize=False)
    await stream.send_all(b"hello")
    with trio.fail_after(HANG_BOUND):
        assert await receive_exactly(stream, 5) == b"hello"
    await stream.aclose()
    token = stream.token
    # The callback saw EOF, and the token is closed for good.
    await wait_for_output(site, f"session-ended {token} 5")
    status, _ = await http(site.port, get(f"/tunnel/pull?token={token}"))
    assert status == 403


async def test_close_from_the_server_is_eof_after_the_last_bytes(site: Site) -> None:
    stream = await site.open("/farewell", authorize=False)
    async with stream:
        with trio.fail_after(HANG_BOUND):
            assert await receive_exactly(stream, 24) == b"farewell from the server"
            assert await stream.receive_some() == b""


async def test_paths_are_relative_to_the_mount(site: Site) -> None:
    status, body = await http(site.port, get("/tunnel/authorize"))
    assert status == 200
    assert body.startswith(b"token=")
    # The app's paths exist only under its mount; beside it is the site's 404.
    assert (await http(site.port, get("/authorize")))[0] == 404
    status, body = await http(site.port, get("/tunnel/elsewhere"))
    assert (status, body) == (404, b"404 page not found\n")


async def test_bad_input_gets_the_servers_statuses(site: Site) -> None:
    port = site.port
    # A pull must be a GET, a push a POST (400, as GOST).
    assert (
        await http(
            port,
            b"POST /tunnel/pull?token=a HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        )
    )[0] == 400
    assert (await http(port, get("/tunnel/push?token=a")))[0] == 400
    # CONNECT tunnels nothing here: 405.
    connect = b"CONNECT /tunnel/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert (await http(port, connect))[0] == 405
    # Invalid base64 in a push: 400.
    body = b"not base64!\n"
    push = b"POST /tunnel/push?token=b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    assert (await http(port, push + b"Connection: close\r\n\r\n" + body))[0] == 400
    # A push body larger than max_push_line: 413 before it is read.
    big = b"POST /tunnel/push?token=c HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
    assert (await http(port, big + b"Connection: close\r\n\r\n"))[0] == 413
    # Request headers larger than the app's max_header_size (8 KiB here): 431.
    assert (await http(port, get("/tunnel/authorize", b"X-Big: %s\r\n" % (b"a" * 10000))))[
        0
    ] == 431
    # The tunnels carry on.
    stream = await site.open(authorize=False)
    async with stream:
        await exchange(stream, 1000, seed=3)


async def test_a_full_token_table_answers_429(site: Site) -> None:
    assert (await http(site.port, get("/small/authorize")))[0] == 200
    assert (await http(site.port, get("/small/authorize")))[0] == 429


async def test_a_push_the_callback_does_not_consume_gets_410(site: Site) -> None:
    stream = await site.open("/stuck", authorize=False)
    # The callback's StreamReader takes up to its flow-control limit; the
    # rest of a 1 MiB push is never consumed: 410 after push_timeout.
    with trio.fail_after(HANG_BOUND), pytest.raises(trio.BrokenResourceError) as caught:
        await stream.send_all(pattern(1024 * 1024))
    assert "410" in str(caught.value) or "410" in repr(caught.value.__cause__)
    await stream.aclose()


@pytest.mark.parametrize(
    ("app", "mount"),
    [("tests.asgi_site:app", "/tunnel"), ("tests.asgi_site:tunnel", "")],
    ids=["mounted-in-starlette", "served-alone"],
)
async def test_stopping_the_server_closes_the_sessions(
    tmp_path: Path, app: str, mount: str
) -> None:
    """Mounted, the framework's lifespan hands over; alone, PHTApp answers the lifespan."""
    for server in SERVERS:
        site = start_site(server, tmp_path / server, app=app)
        try:
            # A session whose client pushed, and has no pull open: only the
            # app's lifespan shutdown can end it.
            body = pht.encode_line(b"lonely")
            push = b"POST %s/push?token=lonelytoken HTTP/1.1\r\nHost: x\r\n" % mount.encode()
            push += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            assert (await http(site.port, push + body))[0] == 200
            site.process.send_signal(signal.SIGTERM)
            assert site.watch is not None
            # Its output ends as it exits: woken by that, not polled.
            assert await trio.to_thread.run_sync(site.watch.wait_ended, HANG_BOUND)
            site.process.wait(HANG_BOUND)
            assert "session-ended lonelytoken 6" in site.output(), site.output()
        finally:
            site.stop()


@pytest.mark.middlebox
@pytest.mark.parametrize("server", SERVERS)
async def test_through_nginx_with_default_buffering(server: str, tmp_path: Path) -> None:
    """nginx as docs/deployment.md configures it (its buffering on) in front of the site."""
    nginx = harness.find_program("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (run scripts/setup.sh --system)")
    site = start_site(server, tmp_path / server, heartbeat=0.5)
    proxy = None
    try:
        port = harness.free_port()
        config = harness.render_nginx_single(
            f"127.0.0.1:{port}", f"127.0.0.1:{site.port}", read_timeout="2s"
        )
        proxy = harness.start_nginx(tmp_path / "nginx", config, port)
        stream = await pht.open_pht_stream(
            "127.0.0.1",
            proxy.port,
            authorize=False,
            **site.paths(),  # type: ignore[arg-type]
        )
        async with stream:
            # One byte is not held back: the pull says X-Accel-Buffering: no.
            for byte in (b"x", b"y", b"z"):
                await stream.send_all(byte)
                with trio.fail_after(HANG_BOUND):
                    assert await stream.receive_some() == byte
            # Idle past nginx's proxy_read_timeout: the heartbeats keep the pull.
            # Real time: nginx's own timer is what is under test (its 2 s is
            # four of the site's 0.5 s heartbeats: margin on a loaded machine).
            await trio.sleep(3)
            await exchange(stream, 3 * 1024 * 1024 + 7, seed=4)
        assert (await http(proxy.port, get("/hello")))[0] == 200
        # pht's asyncio client through the same nginx.
        front = Site("nginx", proxy.process, proxy.log)
        front.port = proxy.port

        async def asyncio_client() -> None:
            reader, writer = await open_connection(front, authorize=False)
            await asyncio_exchange(reader, writer, 1024 * 1024 + 3, seed=6)
            writer.close()
            await writer.wait_closed()

        await trio.to_thread.run_sync(run_client, "asyncio", asyncio_client)
    finally:
        if proxy is not None:
            proxy.stop()
        site.stop()


# --- pht's asyncio client (on asyncio's loop and on uvloop) ---------------------------

LOOPS = ("asyncio", "uvloop")


def run_client(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an asyncio client program on ``loop``, bounded."""

    async def bounded() -> None:
        await asyncio.wait_for(main(), HANG_BOUND)

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


async def open_connection(
    site: Site, mount: str = "/tunnel", **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await pht.asyncio.open_pht_connection(
        "127.0.0.1",
        site.port,
        authorize_path=f"{mount}/authorize",
        push_path=f"{mount}/push",
        pull_path=f"{mount}/pull",
        **kwargs,
    )


async def asyncio_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, seed: int
) -> None:
    """Send ``size`` bytes while reading their echo; compare both sides' sha256."""
    payload = pattern(size, seed)

    async def send() -> None:
        for start in range(0, size, 1024 * 1024):
            writer.write(payload[start : start + 1024 * 1024])
            await writer.drain()

    sending = asyncio.ensure_future(send())
    echoed = await reader.readexactly(size)
    await sending
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
def test_asyncio_client_16_mib_each_way(site: Site, loop: str, authorize: bool) -> None:
    async def main() -> None:
        reader, writer = await open_connection(site, authorize=authorize)
        await asyncio_exchange(reader, writer, 16 * 1024 * 1024, seed=5)
        writer.close()
        await writer.wait_closed()

    run_client(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncio_client_several_tunnels_and_closes_from_both_sides(site: Site, loop: str) -> None:
    async def one(index: int) -> None:
        reader, writer = await open_connection(site, authorize=bool(index % 2))
        await asyncio_exchange(reader, writer, 128 * 1024 + index, seed=index)
        writer.close()  # closed by the client
        await writer.wait_closed()

    async def farewell() -> None:
        reader, writer = await open_connection(site, "/farewell", authorize=False)
        # Closed by the server: its last bytes, then EOF.
        assert await reader.read() == b"farewell from the server"
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        await asyncio.gather(farewell(), *(one(index) for index in range(16)))

    run_client(loop, main)
    # Every echo callback saw its client's close (the site prints it as it happens).
    assert site.watch is not None
    site.watch.wait_for(lambda lines: sum("session-ended" in x for x in lines) >= 16, HANG_BOUND)
    assert site.output().count("session-ended") == 16


def test_documented_multi_process_recipe_is_the_tested_one() -> None:
    documented = render_nginx_asgi_scaled("80", ["127.0.0.1:8001", "127.0.0.1:8002"])
    assert f"```nginx\n{documented}```" in DOC.read_text()


@pytest.mark.middlebox
async def test_several_processes_behind_nginx_hashing_the_token(tmp_path: Path) -> None:
    """docs/asgi.md's recipe: two uvicorn processes, each session kept on one of them."""
    if harness.find_program("nginx") is None:
        pytest.skip("nginx is not installed (run scripts/setup.sh --system)")
    both = Reports()  # the two sites' output lines, to wait on them at once
    sites = [start_site("uvicorn", tmp_path / f"site-{i}", also=both) for i in range(2)]
    proxy = None
    try:
        port = harness.free_port()
        backends = [f"127.0.0.1:{site.port}" for site in sites]
        config = render_nginx_asgi_scaled(f"127.0.0.1:{port}", backends)
        proxy = harness.start_nginx(tmp_path / "nginx", config, port)
        front = Site("nginx", proxy.process, proxy.log)
        front.port = port
        tokens: list[str] = []

        async def one(index: int) -> None:
            stream = await front.open(authorize=bool(index % 2))
            async with stream:
                await exchange(stream, 64 * 1024 + index, seed=index)
            tokens.append(stream.token)

        async with trio.open_nursery() as nursery:
            for index in range(16):
                nursery.start_soon(one, index)
        # Each session lived in one process (its echo worked, so its pushes
        # and pulls met there), and both processes had some.
        await trio.to_thread.run_sync(
            both.wait_for,
            lambda lines: all(any(t in line for line in lines) for t in tokens),
            HANG_BOUND,
        )
        for token in tokens:
            assert sum(f"session-ended {token}" in site.output() for site in sites) == 1
        assert all("session-ended" in site.output() for site in sites)
        assert (await http(port, get("/hello")))[0] == 200
    finally:
        if proxy is not None:
            proxy.stop()
        for site in sites:
            site.stop()
