"""Fixtures that start real nginx, squid and pht server processes for one test.

Every program gets its own configuration, logs and pid file in a scratch
directory, listens on a free 127.0.0.1 port, and is stopped at teardown.
A test is skipped only when the program is not installed
(``scripts/setup.sh --system`` installs them; CI does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import harness

NginxFactory = Callable[[Callable[[str], str]], harness.ManagedProcess]
SquidFactory = Callable[[Callable[[str, Path], str]], harness.ManagedProcess]
ServerFactory = Callable[[], harness.ManagedProcess]


def _require(program: str) -> None:
    if harness.find_program(program) is None:
        pytest.skip(f"{program} is not installed (run scripts/setup.sh --system)")


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[NginxFactory]:
    """``start_nginx(site_for)``: ``site_for(listen)`` returns the site config to run."""
    _require("nginx")
    started: list[harness.ManagedProcess] = []

    def start(site_for: Callable[[str], str]) -> harness.ManagedProcess:
        port = harness.free_port()
        directory = tmp_path / f"nginx-{len(started)}"
        process = harness.start_nginx(directory, site_for(f"127.0.0.1:{port}"), port)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_squid() -> Iterator[SquidFactory]:
    """``start_squid(rules_for)``: ``rules_for(listen, directory)`` returns squid's rules.

    ``directory`` is squid's scratch directory (readable by its user), where
    the rules may put a password file.
    """
    _require("squid")
    started: list[harness.ManagedProcess] = []
    with harness.squid_directory() as directory:

        def start(rules_for: Callable[[str, Path], str]) -> harness.ManagedProcess:
            port = harness.free_port()
            rules = rules_for(f"127.0.0.1:{port}", directory)
            process = harness.start_squid(directory, rules, port)
            started.append(process)
            return process

        yield start
        for process in started:
            process.stop()


@pytest.fixture
def start_pid_echo_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """``start_pid_echo_server()``: a pht server process; see ``pid_echo_server.py``."""
    started: list[harness.ManagedProcess] = []

    def start() -> harness.ManagedProcess:
        process = harness.start_pid_echo_server(tmp_path / "servers")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
