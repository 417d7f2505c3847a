"""A resume tunnel through a real nginx (the documented config) survives its reload and restart.

``nginx -s reload`` (SIGHUP) starts new workers and lets the old ones finish
their requests; a stop (SIGTERM: nginx drops every connection) and a start
on the same port within the session's grace period cuts the pull and any
push in flight. Either way, in the middle of a 16 MiB echo, every byte comes
back once, in order (sha256), and the pull is re-attached.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import pht
from pht._stats import ServiceStats

from ..support import echo
from . import harness
from .conftest import NginxFactory
from .tunnel_checks import HANG_BOUND

pytestmark = pytest.mark.middlebox

SIZE = 16 * 1024 * 1024
PIECE = 256 * 1024


async def _serve(nursery: trio.Nursery, stats: ServiceStats) -> int:
    serve = functools.partial(
        pht.serve_pht, echo, 0, host="127.0.0.1", resume=True, grace_period=30, stats=stats
    )
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _echo_with_an_event(
    stream: pht.PHTStream, payload: bytes, event: Callable[[], Awaitable[None]]
) -> bytes:
    """Echo ``payload``; run ``event`` once a third of it came back, while data flows."""
    got = bytearray()

    async def read() -> None:
        fired = False
        while len(got) < len(payload):
            data = await stream.receive_some()
            assert data, f"EOF after {len(got)} bytes"
            got.extend(data)
            if not fired and len(got) >= len(payload) // 3:
                fired = True
                await event()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        for start in range(0, len(payload), PIECE):
            await stream.send_all(payload[start : start + PIECE])
    return bytes(got)


async def test_a_resume_tunnel_survives_nginx_reload(
    nursery: trio.Nursery, start_nginx: NginxFactory
) -> None:
    stats = ServiceStats("reload")
    backend = await _serve(nursery, stats)
    proxy = start_nginx(lambda listen: harness.render_nginx_single(listen, f"127.0.0.1:{backend}"))

    async def reload() -> None:
        proxy.process.send_signal(signal.SIGHUP)

    payload = os.urandom(SIZE)
    with trio.fail_after(HANG_BOUND):
        stream = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=False, resume=True)
        got = await _echo_with_an_event(stream, payload, reload)
        # After the reload, a new worker answers a new tunnel.
        await stream.aclose()
        second = await pht.open_pht_stream("127.0.0.1", proxy.port, authorize=False, resume=True)
        await second.send_all(b"after the reload")
        assert await second.receive_some() == b"after the reload"
        await second.aclose()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert "reconfiguring" in proxy.log.read_text(errors="replace"), proxy.log_tail()


async def test_a_resume_tunnel_survives_nginx_stop_and_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    if harness.find_program("nginx") is None:
        pytest.skip("nginx is not installed (run scripts/setup.sh --system)")
    stats = ServiceStats("restart")
    backend = await _serve(nursery, stats)
    port = harness.free_port()
    site = harness.render_nginx_single(f"127.0.0.1:{port}", f"127.0.0.1:{backend}")
    running = [harness.start_nginx(tmp_path / "nginx", site, port)]

    async def restart() -> None:
        await trio.to_thread.run_sync(running[-1].stop)  # SIGTERM: every connection dropped
        await trio.sleep(1.0)  # the client's requests fail meanwhile, and are retried
        started = await trio.to_thread.run_sync(
            harness.start_nginx, tmp_path / "nginx", site, port
        )
        running.append(started)

    payload = os.urandom(SIZE)
    try:
        with trio.fail_after(HANG_BOUND):
            stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, resume=True)
            got = await _echo_with_an_event(stream, payload, restart)
            await stream.aclose()
    finally:
        for process in running:
            process.stop()
    assert len(running) == 2
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert stats.pulls_total >= 2  # the pull was cut with nginx, and re-attached
