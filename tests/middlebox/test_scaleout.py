"""Several pht server processes behind one nginx, routed by the session token."""

from __future__ import annotations

import collections

import pytest
import trio

import pht

from ..support import receive_exactly
from . import harness
from .conftest import NginxFactory, ServerFactory
from .tunnel_checks import HANG_BOUND, pattern

pytestmark = pytest.mark.middlebox

SESSIONS = 40


async def _read_pid_line(stream: pht.PHTStream) -> int:
    line = bytearray()
    while not line.endswith(b"\n"):
        line += await receive_exactly(stream, 1)
        assert len(line) < 16, f"no pid line: {bytes(line)!r}"
    return int(line)


async def _session(port: int, index: int, authorize: bool, pids: collections.Counter[int]) -> None:
    stream = await pht.open_pht_stream("127.0.0.1", port, authorize=authorize)
    async with stream:
        with trio.fail_after(HANG_BOUND):
            pid = await _read_pid_line(stream)
            # Every push must reach the process that owns the pull: if one
            # went elsewhere, its bytes would never come back.
            for round_ in range(3):
                payload = pattern(1000 + 7919 * index + round_ * 50_000, seed=index)
                await stream.send_all(payload)
                assert await receive_exactly(stream, len(payload)) == payload
    pids[pid] += 1


async def test_sessions_stick_to_one_process_and_spread_over_all(
    start_pid_echo_server: ServerFactory, start_nginx: NginxFactory
) -> None:
    servers = [start_pid_echo_server() for _ in range(2)]
    backends = [f"127.0.0.1:{server.port}" for server in servers]
    proxy = start_nginx(lambda listen: harness.render_nginx_scaled(listen, backends))
    pids: collections.Counter[int] = collections.Counter()
    async with trio.open_nursery() as nursery:
        for index in range(SESSIONS):
            # Half modern (self-made token), half legacy flow (token from /authorize;
            # the authorize may reach the other process, see docs/deployment.md).
            nursery.start_soon(_session, proxy.port, index, index % 2 == 0, pids)
    assert sum(pids.values()) == SESSIONS
    assert set(pids) == {server.process.pid for server in servers}, pids
