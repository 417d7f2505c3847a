"""The command line with resume: two ``pht`` processes, a fault relay between them.

``pht -L tcp://...  -F forward+pht://relay?resume=true`` on one side,
``pht -L pht://.../echo`` on the other, the fault relay cutting their
connections (FIN and RST, pushes and pulls, heads and bodies), and plain TCP
programs at both ends: 16 MiB go through and come back byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from .faults import CutEveryConnection, FaultRelay
from .support import tcp_echo_server
from .test_cli_run import PhtProcess
from .test_resume_scale import RelayThread, relay_thread, summary

__all__ = ["relay_thread"]  # the fixture, used here

pytestmark = pytest.mark.slow

SIZE = 16 * 1024 * 1024
CUTS = 40
TIMEOUT = 120.0


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain TCP echo server (the program behind the far end of the tunnel)."""
    with tcp_echo_server() as port:
        yield port


def _echo_through(port: int, payload: bytes) -> bytes:
    """A TCP program: send ``payload`` to ``port`` while reading back as much."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            data = sock.recv(1024 * 1024)
            assert data, f"EOF after {len(got)} bytes"
            got += data
        sender.join(TIMEOUT)
        return bytes(got)


def test_tcp_forwarding_with_resume_survives_cuts(
    relay_thread: RelayThread, echo_port: int
) -> None:
    payload = os.urandom(SIZE)
    with PhtProcess("-L", f"pht://127.0.0.1:0/127.0.0.1:{echo_port}") as server:
        relay = FaultRelay(server.port(), fin_linger=1.0)
        relay.planner = CutEveryConnection(relay, 51, until=CUTS)
        relay_port = relay_thread.start(relay)
        node = f"forward+pht://127.0.0.1:{relay_port}?resume=true"
        with PhtProcess("-L", f"tcp://127.0.0.1:0/127.0.0.1:{echo_port}", "-F", node) as client:
            try:
                got = _echo_through(client.port(), payload)
            except (AssertionError, OSError) as exc:
                raise AssertionError(
                    f"{exc}\n{summary(relay)}\n{client.output()}\n{server.output()}"
                ) from exc
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), summary(relay)
    assert len(relay.faults) >= CUTS, summary(relay)
    print(summary(relay).splitlines()[0])  # the figure, with pytest -s
