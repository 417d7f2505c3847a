"""pht through a real forward HTTP proxy (squid) that refuses CONNECT."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
import trio

import pht

from ..support import echo, receive_exactly
from . import harness
from .conftest import SquidFactory
from .tunnel_checks import HANG_BOUND, echo_roundtrip, pattern

pytestmark = pytest.mark.middlebox

NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"


async def _serve(nursery: trio.Nursery) -> int:
    serve = functools.partial(pht.serve_pht, echo, 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _open_rules(listen: str, directory: Path) -> str:
    return harness.render(harness.SQUID_OPEN_RULES, {"LISTEN": listen, "CLIENTS": "127.0.0.1/32"})


async def _http_status(port: int, request: bytes) -> int:
    """Send one raw request to 127.0.0.1:``port`` and return the answer's status code."""
    with trio.fail_after(HANG_BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            head = b""
            while b"\r\n" not in head:
                data = await stream.receive_some(4096)
                assert data, f"proxy closed the connection after {head!r}"
                head += data
    return int(head.split(b" ", 2)[1])


async def _check_tunnel(port: int, proxy: str, *, authorize: bool) -> None:
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize, proxy=proxy)
    async with stream:
        for index in range(5):
            message = f"message {index} through squid".encode()
            await stream.send_all(message)
            with trio.fail_after(HANG_BOUND):
                assert await receive_exactly(stream, len(message)) == message
        await echo_roundtrip(stream, pattern(3 * 1024 * 1024 + 3, seed=2))


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
async def test_tunnel_through_squid_without_connect(
    nursery: trio.Nursery, start_squid: SquidFactory, authorize: bool
) -> None:
    backend = await _serve(nursery)
    squid = start_squid(_open_rules)
    # The proxy relays plain requests but refuses to open a raw tunnel...
    connect = f"CONNECT 127.0.0.1:{backend} HTTP/1.1\r\nHost: 127.0.0.1:{backend}\r\n\r\n"
    assert await _http_status(squid.port, connect.encode()) == 403
    # ...which is all PHT needs.
    await _check_tunnel(backend, f"http://127.0.0.1:{squid.port}", authorize=authorize)
    await _assert_relayed(squid, backend)


async def _assert_relayed(squid: harness.ManagedProcess, backend: int) -> None:
    """squid's access log shows the pushes and pulls it relayed to the server.

    squid logs a request when its transaction ends, and a pull's ends only
    after squid notices the tunnel's close: the line may come a moment after
    the tunnel closed, so the log is read again for up to ``HANG_BOUND``.
    (squid's default strip_query_terms keeps the tokens out of its log.)
    """
    expected = [
        f"{method} http://127.0.0.1:{backend}{path}? "
        for method, path in (("POST", "/push"), ("GET", "/pull"))
    ]
    log = ""
    # squid writes access.log itself (no pipe to read it from): polled, bounded.
    with trio.move_on_after(HANG_BOUND):
        while True:
            log = (squid.log.parent / "access.log").read_text(errors="replace")
            if all(line in log for line in expected):
                return
            await trio.sleep(0.05)
    for line in expected:
        assert line in log, log[-2000:]


def _auth_rules(listen: str, directory: Path) -> str:
    hashed = subprocess.run(
        ["openssl", "passwd", "-apr1", "s3cret:pass"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    password_file = directory / "htpasswd"
    password_file.write_text(f"tunnel:{hashed}\n")
    values = {
        "LISTEN": listen,
        "CLIENTS": "127.0.0.1/32",
        "NCSA_AUTH": NCSA_AUTH,
        "PASSWORD_FILE": str(password_file),
    }
    return harness.render(harness.SQUID_AUTH_RULES, values)


@pytest.mark.skipif(not os.access(NCSA_AUTH, os.X_OK), reason=f"{NCSA_AUTH} is not installed")
async def test_tunnel_through_squid_with_proxy_authentication(
    nursery: trio.Nursery, start_squid: SquidFactory
) -> None:
    backend = await _serve(nursery)
    squid = start_squid(_auth_rules)
    with pytest.raises(pht.TunnelError, match="407"):
        await pht.open_pht_stream("127.0.0.1", backend, proxy=f"http://127.0.0.1:{squid.port}")
    with pytest.raises(pht.TunnelError, match="407"):
        await pht.open_pht_stream(
            "127.0.0.1", backend, proxy=f"http://tunnel:wrong@127.0.0.1:{squid.port}"
        )
    # The password has a ':' in it, percent-encoded in the URL.
    proxy = f"http://tunnel:s3cret%3Apass@127.0.0.1:{squid.port}"
    await _check_tunnel(backend, proxy, authorize=False)
    await _assert_relayed(squid, backend)
    connect = (
        f"CONNECT 127.0.0.1:{backend} HTTP/1.1\r\nHost: 127.0.0.1:{backend}\r\n"
        "Proxy-Authorization: Basic dHVubmVsOnMzY3JldDpwYXNz\r\n\r\n"
    )
    assert await _http_status(squid.port, connect.encode()) == 403
