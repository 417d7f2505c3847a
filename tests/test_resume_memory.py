"""The server's memory stays flat while 1,000 resume sessions sit in their grace period.

A server process and a client process (``tests/resume_memory.py``): the
client opens 1,000 resume sessions and reads a 16 KiB greeting on each
(16 MiB in the server's replay buffers, unacknowledged), then is killed,
which cuts every connection at once. The server's resident memory (from
/proc) while the sessions wait is no more than with them attached, and
they all end when the grace period runs out.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

SCRIPT = Path(__file__).resolve().parent / "resume_memory.py"
SESSIONS = 1000
GREETING = 16 * 1024
GRACE = 8

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc"),
]


def read_line(stream: IO[str] | None, timeout: float = 120.0) -> str:
    """The next line a child process prints; fail instead of hanging."""
    assert stream is not None
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line from the child process within {timeout} s"
    return stream.readline().strip()


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Server:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "server",
                "--greeting",
                str(GREETING),
                "--grace",
                str(GRACE),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self._line().removeprefix("port "))

    def _line(self) -> str:
        line = read_line(self.process.stdout)
        assert line, f"the server process ended ({self.process.poll()})"
        return line

    def sessions(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self._line().removeprefix("sessions "))

    def rss(self) -> int:
        return rss_kib(self.process.pid)


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.process.kill()
    running.process.wait(10)


def test_rss_stays_flat_while_1000_sessions_are_in_grace(server: Server) -> None:
    before = server.rss()
    client = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPT),
            "client",
            "--port",
            str(server.port),
            "--sessions",
            str(SESSIONS),
            "--greeting",
            str(GREETING),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(client.stdout) == "ready"
        assert server.sessions() == SESSIONS
        attached = server.rss()
    finally:
        client.kill()  # every connection cut at once
        client.wait(10)
    cut = time.monotonic()
    waiting = []
    while time.monotonic() - cut < GRACE - 3:  # bounded: within the grace period
        assert server.sessions() == SESSIONS  # all still there, in their grace period
        waiting.append(server.rss())
        time.sleep(0.5)
    deadline = cut + GRACE + 10
    while server.sessions() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.sessions() == 0, "the grace period ran out, but sessions remain"
    after = server.rss()
    figures = (
        f"RSS (KiB): {before} idle, {attached} with {SESSIONS} sessions attached, "
        f"{min(waiting)}..{max(waiting)} while they wait, {after} after they expired"
    )
    print(figures)  # with pytest -s
    assert max(waiting) <= attached + 4 * 1024, figures  # flat: no growth while waiting
    assert attached - before < SESSIONS * 200, figures  # under 200 KiB a session
