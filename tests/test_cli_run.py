"""`python -m pht` as a user runs it: start-up lines, errors, signals.

The helpers here (:class:`PhtProcess`, :func:`free_port`) are shared with
``test_cli_e2e.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

import pht
from pht.cli import main

# Generous bounds: they only stop a broken test from hanging, nothing is timed.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


#: The event loops the command line can run on here (``--backend``).
BACKENDS = ["trio", "asyncio", *(["uvloop"] if importlib.util.find_spec("uvloop") else [])]
#: The ``--backend`` of the pht processes a test starts (``None``: pht's default);
#: set by the :func:`cli_backend` fixture.
_backend: str | None = None


def pht_command(*args: str) -> list[str]:
    loop = ["--backend", _backend] if _backend is not None else []
    return [sys.executable, "-m", "pht", *args, *loop]


#: What most I/O tests run on: trio, and the asyncio loop ``auto`` picks (uvloop
#: when installed). The widest tests run on every loop (:func:`cli_backend_all`).
IO_BACKENDS = ["trio", "uvloop" if "uvloop" in BACKENDS else "asyncio"]


@contextlib.contextmanager
def backend_of_pht_processes(name: str) -> Iterator[str]:
    """Within it, the pht processes a test starts get ``--backend name``."""
    global _backend
    _backend = name
    try:
        yield name
    finally:
        _backend = None


@pytest.fixture(params=IO_BACKENDS)
def cli_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test on trio and on asyncio (uvloop): its pht processes get ``--backend``."""
    with backend_of_pht_processes(request.param) as name:
        yield name


@pytest.fixture(params=BACKENDS)
def cli_backend_all(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test on every event loop installed (trio, asyncio, uvloop)."""
    with backend_of_pht_processes(request.param) as name:
        yield name


def child_env() -> dict[str, str]:
    """The environment for child programs: unbuffered, and no proxy settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A loopback port that was free a moment ago (for a service whose port
    another service must know before it starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PhtProcess:
    """A running ``python -m pht ...``; its stderr is collected line by line."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.args = args
        self.process = subprocess.Popen(
            pht_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env=child_env(),
        )
        self.lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._ended = True
                self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first output line (old or new) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = 0
        with self._changed:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return match
                    index += 1
                if self._ended:
                    pytest.fail(
                        f"pht {self.args} exited ({self.process.wait()}) without printing "
                        f"{pattern!r}:\n" + "\n".join(self.lines)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(
                        f"no line matching {pattern!r} from pht {self.args}:\n"
                        + "\n".join(self.lines)
                    )
                self._changed.wait(remaining)

    def port(self, service: str = "service-0") -> int:
        """The port ``service`` listens on, from its "listening on" line."""
        match = self.wait_for(rf"{re.escape(service)}: listening on [^ ]*?:(\d+)\b")
        return int(match.group(1))

    def stop(self, signum: int = signal.SIGINT) -> tuple[int, str]:
        """Send ``signum``, wait for the exit; return (status, whole output)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"pht {self.args} did not stop on signal {signum}:\n{self.output()}")
        self._reader.join(timeout=STOP_TIMEOUT)
        return status, self.output()

    def __enter__(self) -> PhtProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self._reader.join(timeout=STOP_TIMEOUT)
            self.process.stdout.close()


def run_pht(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a pht command that is expected to exit on its own."""
    return subprocess.run(
        pht_command(*args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], status: int, *parts: str
) -> str:
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("pht: error: ")
    for part in parts:
        assert part in line
    return line


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listening socket on it for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- errors exit at once with one line --------------------------------------------------


def test_bad_url() -> None:
    result = run_pht("-L", "socks5+pht://:notaport")
    assert_one_line_error(result, 2, "-L 'socks5+pht://:notaport'", "'notaport' is not a number")


def test_unsupported_transport() -> None:
    result = run_pht("-L", ":1080", "-F", "socks5+wss://server:443")
    assert_one_line_error(result, 2, "dialer 'wss' is not supported")


def test_unknown_option() -> None:
    result = run_pht("-L", ":1080", "--frobnicate")
    assert_one_line_error(result, 2, "unrecognized arguments: --frobnicate")


def test_nothing_to_run() -> None:
    assert_one_line_error(run_pht(), 2, "nothing to run")
    assert_one_line_error(run_pht("-F", "pht://server:8443"), 2, "-F needs a -L service")


@pytest.mark.usefixtures("cli_backend")
@pytest.mark.parametrize("scheme", ["socks5", "socks5+pht", "http+phts"])
def test_port_in_use(busy_port: int, scheme: str) -> None:
    result = run_pht("-L", f"{scheme}://127.0.0.1:{busy_port}")
    assert_one_line_error(
        result, 1, f"cannot listen on 127.0.0.1:{busy_port}", "Address already in use"
    )


def test_port_in_use_stops_the_other_services(busy_port: int) -> None:
    result = run_pht("-L", "socks5://127.0.0.1:0", "-L", f"http://127.0.0.1:{busy_port}")
    assert result.returncode == 1
    assert "service-0: listening on" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("pht: error: service-1: cannot listen")


def test_missing_certificate_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pem"
    result = run_pht("-L", f"http+phts://127.0.0.1:0?certFile={missing}&keyFile={missing}")
    assert_one_line_error(result, 2, f"certificate file '{missing}': not found")


def test_unusable_certificate_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    result = run_pht("-L", f"http+phts://127.0.0.1:0?certFile={bogus}")
    assert_one_line_error(result, 2, f"cannot load certificate '{bogus}'")


def test_missing_ca_file_for_a_client(tmp_path: Path) -> None:
    result = run_pht(
        "-L", "127.0.0.1:0", "-F", f"phts://127.0.0.1:1?secure=true&caFile={tmp_path / 'ca.pem'}"
    )
    assert_one_line_error(result, 2, "CA file", "not found")


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_pht("-C", str(tmp_path / "gost.yaml"))
    assert_one_line_error(result, 2, "No such file or directory")


def test_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "gost.yaml"
    path.write_text("services:\n- addr: 8443\n")
    result = run_pht("-C", str(path))
    assert_one_line_error(result, 2, f"{path}: services[0]", "addr: expected a string")


def test_version() -> None:
    result = run_pht("--version")
    assert result.returncode == 0
    assert result.stdout.strip().startswith(f"pht {pht.__version__} ")


def test_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-L", "tcp://:2222"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("pht: error: -L 'tcp://:2222': handler 'tcp' needs a target")
    assert main(["--help"]) == 0
    assert "-L URL" in capsys.readouterr().out


# --- start-up lines and signals ---------------------------------------------------------


@pytest.mark.usefixtures("cli_backend_all")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(signum: int) -> None:
    with PhtProcess(
        "-L",
        "socks5+pht://127.0.0.1:0?pushPath=/tx",
        "-L",
        "tcp://127.0.0.1:0/127.0.0.1:9",
        "-L",
        "127.0.0.1:0",
        "-F",
        "socks5+pht://127.0.0.1:1",
    ) as child:
        child.wait_for(
            r"service-0: listening on 127\.0\.0\.1:\d+ "
            r"\(socks5\+pht via socks5\+pht://127\.0\.0\.1:1\)$"
        )
        child.wait_for(
            r"service-1: listening on 127\.0\.0\.1:\d+ "
            r"\(tcp\+tcp to 127\.0\.0\.1:9 via socks5\+pht://127\.0\.0\.1:1\)$"
        )
        child.wait_for(r"service-2: listening on 127\.0\.0\.1:\d+ \(auto\+tcp via ")
        status, output = child.stop(signum)
    assert status == 0, output
    assert "Traceback" not in output
    assert f"{signal.Signals(signum).name}: stopping" in output


def test_all_interfaces_and_yaml_log_level(tmp_path: Path) -> None:
    config = tmp_path / "gost.yaml"
    config.write_text(
        "services:\n"
        "- name: tunnel\n"
        "  addr: '127.0.0.1:0'\n"
        "  handler: {type: relay}\n"
        "  listener: {type: phts, metadata: {unknownThing: 1}}\n"
        "log: {level: debug}\n"
    )
    with PhtProcess("-C", str(config)) as child:
        child.wait_for(r"tunnel: listening on 127\.0\.0\.1:\d+ \(relay\+phts\)")
        status, output = child.stop()
    assert status == 0
    # An option pht does not know is a WARNING, never silence.
    assert "WARNING services[0] (tunnel).listener.metadata: unknown option 'unknownThing'" in (
        output
    )
    # log.level: debug shows the DEBUG lines (the versions in use).
    assert "DEBUG" in output


def test_yaml_log_level_warn_hides_info(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gost.yaml"
    config.write_text(
        f"services:\n- addr: '127.0.0.1:{port}'\n  listener: {{metadata: {{unknownThing: 1}}}}\n"
        "log: {level: warn}\n"
    )
    with PhtProcess("-C", str(config)) as child:
        child.wait_for("unknown option 'unknownThing'")
        # No start-up line at this level: wait until it accepts connections,
        # so that the signal finds it running.
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT).close()
                break
            except ConnectionRefusedError:
                threading.Event().wait(0.1)
        status, output = child.stop()
    assert status == 0
    assert " INFO " not in output


def test_debug_flag_overrides_nothing_but_level() -> None:
    with PhtProcess("-D", "-L", "http://127.0.0.1:0?someOption=1") as child:
        child.wait_for("WARNING .*unknown option 'someOption': ignored")
        child.port()
        status, _ = child.stop()
    assert status == 0


@pytest.mark.usefixtures("cli_backend")
def test_connections_do_not_outlive_a_failing_upstream() -> None:
    # The only target is a closed port: the connection is refused and logged,
    # the service keeps running.
    dead = free_port()
    with PhtProcess("-L", f"tcp://127.0.0.1:0/127.0.0.1:{dead}") as child:
        port = child.port()
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=STOP_TIMEOUT) as conn:
                assert conn.recv(1) == b""
        child.wait_for(rf"cannot reach 127\.0\.0\.1:{dead}")
        status, output = child.stop()
    assert status == 0
    assert "Traceback" not in output


def test_log_output_and_format_apply_to_warnings_before_an_error() -> None:
    result = run_pht(
        "--log-output",
        "stdout",
        "--log-format",
        "json",
        "-L",
        "http://127.0.0.1:0?keepAlive=1&udp=1",
    )
    assert result.returncode == 2
    (line,) = result.stdout.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert "unknown option 'keepAlive'" in entry["msg"]
    assert result.stderr.startswith("pht: error: ")
    assert "option 'udp' (UDP relay) is not supported by pht" in result.stderr


def test_log_output_to_an_unwritable_file_is_an_error(tmp_path: Path) -> None:
    result = run_pht("--log-output", str(tmp_path / "missing" / "pht.log"), "-L", ":0")
    assert_one_line_error(result, 2, "log.output")


def test_ctrl_c_while_checking_the_configuration_is_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pht.cli._run as run_module

    def interrupted(*args: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "build_config", interrupted)
    assert main(["-L", ":0"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_log_level_accepts_gosts_warn() -> None:
    result = run_pht("--log-level", "warn", "-L", "http://127.0.0.1:0?keepAlive=1&udp=1")
    assert result.returncode == 2
    assert "WARNING" in result.stderr  # the keepAlive warning is shown at this level
    assert "option 'udp'" in result.stderr
