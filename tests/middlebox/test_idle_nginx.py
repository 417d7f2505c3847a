"""An idle tunnel behind nginx survives nginx closing its idle client connections.

nginx closes a client's keep-alive connection after ``keepalive_timeout``
(75 s by default); the client's next push must go on a new connection. The
timeout is 1 s here, so the test idles in real time for a few seconds (nginx
runs in its own process: no mock clock).
"""

from __future__ import annotations

import functools

import pytest
import trio

import pht

from ..support import echo, receive_exactly
from ..test_cli_run import PhtProcess
from . import harness
from .conftest import NginxFactory
from .tunnel_checks import HANG_BOUND, pattern

pytestmark = pytest.mark.middlebox

KEEPALIVE = 1


def _site_with_short_keepalive(listen: str, backend: str) -> str:
    site = harness.render_nginx_single(listen, backend)
    line = f"    listen {listen};\n"
    assert line in site
    return site.replace(line, f"{line}    keepalive_timeout {KEEPALIVE}s;\n")


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
async def test_idle_tunnel_behind_nginx_echoes_after_nginx_keepalive(
    nursery: trio.Nursery, start_nginx: NginxFactory, authorize: bool
) -> None:
    serve = functools.partial(pht.serve_pht, echo, 0, host="127.0.0.1", heartbeat_interval=0.5)
    listeners = await nursery.start(serve)
    backend = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    proxy = start_nginx(lambda listen: _site_with_short_keepalive(listen, backend))
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=authorize)
    async with stream:
        for round_ in range(2):
            message = pattern(1000 + round_, seed=round_)
            with trio.fail_after(HANG_BOUND):
                await stream.send_all(message)
                assert await receive_exactly(stream, len(message)) == message
            # Real time: nginx's keep-alive timer closes the idle push connection.
            await trio.sleep(KEEPALIVE * 2.5)
        with trio.fail_after(HANG_BOUND):
            await stream.send_all(b"after idling")
            assert await receive_exactly(stream, 12) == b"after idling"


async def test_cli_tunnel_behind_nginx_echoes_after_nginx_keepalive(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    """Every party as users run it: ``pht`` client and server processes, nginx between."""

    async def echo_target(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    target = await nursery.start(
        functools.partial(trio.serve_tcp, echo_target, 0, host="127.0.0.1")
    )
    target_port = target[0].socket.getsockname()[1]
    with PhtProcess("-L", f"forward+pht://127.0.0.1:0/127.0.0.1:{target_port}") as server:
        backend = f"127.0.0.1:{await trio.to_thread.run_sync(server.port)}"
        proxy = start_nginx(lambda listen: _site_with_short_keepalive(listen, backend))
        node = f"forward+pht://127.0.0.1:{proxy.port}"
        with PhtProcess("-L", "tcp://127.0.0.1:0/127.0.0.1:1", "-F", node) as client:
            local = await trio.to_thread.run_sync(client.port)
            connection = await trio.open_tcp_stream("127.0.0.1", local)
            async with connection:
                with trio.fail_after(HANG_BOUND):
                    await connection.send_all(b"before idling")
                    assert await receive_exactly(connection, 13) == b"before idling"
                # Real time: nginx's keep-alive timer closes the idle push connection.
                await trio.sleep(KEEPALIVE * 2.5)
                with trio.fail_after(HANG_BOUND):
                    await connection.send_all(b"after idling")
                    assert await receive_exactly(connection, 12) == b"after idling"
