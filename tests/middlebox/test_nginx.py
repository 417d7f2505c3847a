"""pht behind a real nginx reverse proxy, with nginx's default buffering."""

from __future__ import annotations

import functools

import pytest
import trio

import pht

from ..support import echo, receive_exactly
from . import harness
from .conftest import NginxFactory
from .tunnel_checks import HANG_BOUND, echo_roundtrip, pattern

pytestmark = pytest.mark.middlebox


async def _serve(nursery: trio.Nursery, *, heartbeat_interval: float = 10.0) -> int:
    serve = functools.partial(
        pht.serve_pht, echo, 0, host="127.0.0.1", heartbeat_interval=heartbeat_interval
    )
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])
async def test_tunnel_through_nginx(
    nursery: trio.Nursery, start_nginx: NginxFactory, authorize: bool
) -> None:
    backend = await _serve(nursery)
    proxy = start_nginx(lambda listen: harness.render_nginx_single(listen, f"127.0.0.1:{backend}"))
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=authorize)
    async with stream:
        for index in range(5):
            message = f"message {index} through nginx".encode()
            await stream.send_all(message)
            with trio.fail_after(HANG_BOUND):
                assert await receive_exactly(stream, len(message)) == message
        # Pushes of pht's default size (1 MiB of data per POST) and pulls of many lines.
        await echo_roundtrip(stream, pattern(3 * 1024 * 1024 + 7), piece=1024 * 1024)


async def test_one_byte_is_not_held_back_by_buffering(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    """nginx buffers responses by default; the pull's X-Accel-Buffering: no turns that off.

    A buffering nginx would sit on a 1-byte pull line (a few bytes of HTTP)
    until its buffer filled or the response ended: the echo would never come.
    """
    backend = await _serve(nursery)
    proxy = start_nginx(lambda listen: harness.render_nginx_single(listen, f"127.0.0.1:{backend}"))
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=False)
    async with stream:
        for byte in (b"x", b"y", b"z"):
            await stream.send_all(byte)
            with trio.fail_after(HANG_BOUND):
                assert await stream.receive_some() == byte


async def test_heartbeats_keep_an_idle_tunnel_open_past_proxy_read_timeout(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    backend = await _serve(nursery, heartbeat_interval=0.5)
    proxy = start_nginx(
        lambda listen: harness.render_nginx_single(
            listen, f"127.0.0.1:{backend}", read_timeout="2s"
        )
    )
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=False)
    async with stream:
        # Idle past nginx's proxy_read_timeout (2 s; heartbeats every 0.5 s).
        # Real time: nginx's own timer is what is under test.
        await trio.sleep(3)
        await stream.send_all(b"still there?")
        with trio.fail_after(HANG_BOUND):
            assert await receive_exactly(stream, 12) == b"still there?"


async def test_without_heartbeats_nginx_cuts_the_idle_pull(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    """The control: heartbeats slower than proxy_read_timeout, and nginx ends the pull."""
    backend = await _serve(nursery, heartbeat_interval=30.0)
    proxy = start_nginx(
        lambda listen: harness.render_nginx_single(
            listen, f"127.0.0.1:{backend}", read_timeout="1s"
        )
    )
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=False)
    async with stream:
        with trio.fail_after(HANG_BOUND):
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()


async def test_nginx_default_body_limit_needs_smaller_pushes(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    """nginx's default client_max_body_size (1m) refuses a 1 MiB push (base64: 1.33 MiB).

    Either raise the limit (the documented recipe says 2m) or keep pushes
    under 768 KiB of data with ``max_push_size``, as here.
    """
    backend = await _serve(nursery)
    proxy = start_nginx(
        lambda listen: harness.render_nginx_single(listen, f"127.0.0.1:{backend}", max_body="1m")
    )
    stream = await pht.open_pht_stream("127.0.0.1", proxy.port, max_push_size=512 * 1024)
    async with stream:
        await echo_roundtrip(stream, pattern(2 * 1024 * 1024, seed=1), piece=1024 * 1024)
    refused = await pht.open_pht_stream("127.0.0.1", proxy.port)
    async with refused:
        with pytest.raises(trio.BrokenResourceError, match=r"413.*lower max_push_size"):
            await refused.send_all(pattern(1024 * 1024))
