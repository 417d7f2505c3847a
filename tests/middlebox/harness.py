"""Start real nginx, squid and pht server processes on loopback, for tests and benchmarks.

The configuration snippets here are the ones ``docs/deployment.md`` shows:
the documentation quotes them rendered with example addresses, and
``test_docs.py`` checks that the quoted text is exactly what these templates
render, so the tested configuration and the documented one cannot drift.
Placeholders are ``@NAME@`` (``$`` and ``{}`` belong to nginx).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "NGINX_SCALED_SITE",
    "NGINX_SINGLE_SITE",
    "SQUID_AUTH_RULES",
    "SQUID_OPEN_RULES",
    "ManagedProcess",
    "find_program",
    "free_port",
    "render",
    "render_nginx_scaled",
    "render_nginx_single",
    "start_nginx",
    "start_pid_echo_server",
    "start_squid",
    "wait_for_port",
]

HERE = Path(__file__).resolve().parent

# --- the documented configuration ----------------------------------------------------

#: One pht server behind nginx. nginx's response buffering stays at its
#: default (on): pht's pull answers carry ``X-Accel-Buffering: no``, which
#: switches it off for the pulls only. ``proxy_read_timeout`` must be longer
#: than the server's ``heartbeat_interval`` (10 s by default).
NGINX_SINGLE_SITE = """\
upstream pht_backend {
    server @BACKEND@;
    keepalive 32;
}

server {
    listen @LISTEN@;

    location / {
        proxy_pass http://pht_backend;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout @READ_TIMEOUT@;
        client_max_body_size @MAX_BODY@;
    }
}
"""

#: Several pht server processes behind one nginx: every request carries the
#: session's token in ``?token=``, so hashing on it sends a session's pushes
#: and pulls to the same process.
NGINX_SCALED_SITE = """\
upstream pht_backends {
    hash $arg_token consistent;
@SERVERS@
    keepalive 32;
}

server {
    listen @LISTEN@;

    location / {
        proxy_pass http://pht_backends;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout @READ_TIMEOUT@;
        client_max_body_size @MAX_BODY@;
    }
}
"""

#: A forward proxy that refuses CONNECT but relays plain HTTP requests.
SQUID_OPEN_RULES = """\
http_port @LISTEN@
acl clients src @CLIENTS@
acl CONNECT method CONNECT
http_access deny CONNECT
http_access allow clients
http_access deny all
cache deny all
"""

#: The same with proxy authentication (``user:password`` in a htpasswd file).
SQUID_AUTH_RULES = """\
http_port @LISTEN@
auth_param basic program @NCSA_AUTH@ @PASSWORD_FILE@
auth_param basic realm pht
acl clients src @CLIENTS@
acl authenticated proxy_auth REQUIRED
acl CONNECT method CONNECT
http_access deny CONNECT
http_access deny !clients
http_access allow authenticated
http_access deny all
cache deny all
"""

#: The values docs/deployment.md shows the snippets with.
DOC_VALUES: Mapping[str, str] = {
    "BACKEND": "127.0.0.1:8081",
    "LISTEN": "80",
    "READ_TIMEOUT": "60s",
    "MAX_BODY": "2m",
}
DOC_BACKENDS = ("127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083")
DOC_SQUID_VALUES: Mapping[str, str] = {
    "LISTEN": "3128",
    "CLIENTS": "10.0.0.0/8",
    "NCSA_AUTH": "/usr/lib/squid/basic_ncsa_auth",
    "PASSWORD_FILE": "/etc/squid/pht.htpasswd",
}

#: Largest push body: 1 MiB of data (pht's default max_push_size) as base64.
MAX_BODY = "2m"


def render(template: str, values: Mapping[str, str]) -> str:
    """Replace every ``@NAME@`` in ``template``; a placeholder left over is an error."""
    text = template
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    leftover = re.search(r"@[A-Z_]+@", text)
    if leftover is not None:
        raise ValueError(f"unrendered placeholder {leftover.group()} in config")
    return text


def render_nginx_single(
    listen: str, backend: str, *, read_timeout: str = "60s", max_body: str = MAX_BODY
) -> str:
    values = {
        "LISTEN": listen,
        "BACKEND": backend,
        "READ_TIMEOUT": read_timeout,
        "MAX_BODY": max_body,
    }
    return render(NGINX_SINGLE_SITE, values)


def render_nginx_scaled(
    listen: str, backends: list[str] | tuple[str, ...], *, read_timeout: str = "60s"
) -> str:
    servers = "\n".join(f"    server {backend};" for backend in backends)
    values = {
        "LISTEN": listen,
        "SERVERS": servers,
        "READ_TIMEOUT": read_timeout,
        "MAX_BODY": MAX_BODY,
    }
    return render(NGINX_SCALED_SITE, values)


# --- processes -----------------------------------------------------------------------


def find_program(name: str) -> str | None:
    """``name`` on PATH or in /usr/sbin (Debian puts nginx and squid there)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def free_port() -> int:
    """A loopback port free right now (programs that need a port in their config)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ManagedProcess:
    """A started program, its log file, and how to stop it."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.port = 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate, then kill if the program does not exit promptly."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def wait_for_port(port: int, process: ManagedProcess, *, timeout: float = 20.0) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; fail if the program died."""
    deadline = time.monotonic() + timeout
    while True:
        if process.process.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.process.returncode} before listening "
                f"on {port}:\n{process.log_tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                pass
            else:
                return
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(
                f"{process.name} did not listen on {port} within {timeout}s:\n{process.log_tail()}"
            )
        time.sleep(0.05)


_NGINX_MAIN = """\
@USER@
worker_processes 1;
pid @PREFIX@/nginx.pid;
error_log @PREFIX@/error.log notice;

events {
    worker_connections 1024;
}

http {
    access_log @PREFIX@/access.log;
    client_body_temp_path @PREFIX@/client_body;
    proxy_temp_path @PREFIX@/proxy;
    fastcgi_temp_path @PREFIX@/fastcgi;
    uwsgi_temp_path @PREFIX@/uwsgi;
    scgi_temp_path @PREFIX@/scgi;

@SITE@
}
"""


def start_nginx(directory: Path, site: str, port: int) -> ManagedProcess:
    """Run nginx in the foreground with ``site`` (an http-level snippet) in ``directory``."""
    nginx = find_program("nginx")
    if nginx is None:
        raise FileNotFoundError("nginx")
    directory.mkdir(parents=True, exist_ok=True)
    # As root, nginx's workers would switch to nobody, who cannot enter a
    # private temporary directory; keep them as root (tests only).
    user = "user root;" if os.geteuid() == 0 else ""
    indented = "\n".join(f"    {line}" if line else "" for line in site.splitlines())
    conf = render(_NGINX_MAIN, {"USER": user, "PREFIX": str(directory), "SITE": indented})
    conf_path = directory / "nginx.conf"
    conf_path.write_text(conf)
    log = directory / "error.log"
    process = subprocess.Popen(
        [nginx, "-p", str(directory), "-c", str(conf_path), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    managed = ManagedProcess("nginx", process, log)
    managed.port = port
    wait_for_port(port, managed)
    return managed


@contextlib.contextmanager
def squid_directory() -> Iterator[Path]:
    """A scratch directory squid's unprivileged user can write to (removed afterwards)."""
    directory = Path(tempfile.mkdtemp(prefix="pht-squid-"))
    try:
        os.chmod(directory, 0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _squid_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("proxy", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def start_squid(directory: Path, rules: str, port: int) -> ManagedProcess:
    """Run squid in the foreground (``-N``) with ``rules``, logs and pid in ``directory``."""
    squid = find_program("squid")
    if squid is None:
        raise FileNotFoundError("squid")
    user = _squid_user()
    harness = [
        f"pid_filename {directory}/squid.pid",
        f"cache_log {directory}/cache.log",
        f"access_log stdio:{directory}/access.log",
        f"coredump_dir {directory}",
        "visible_hostname pht-test",
        "shutdown_lifetime 0 seconds",
        "cache_mem 8 MB",
    ]
    if user is not None:
        harness.append(f"cache_effective_user {user}")
    conf_path = directory / "squid.conf"
    conf_path.write_text(rules + "\n".join(harness) + "\n")
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (directory, *directory.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    log = directory / "cache.log"
    stderr_path = directory / "stderr.log"
    process = subprocess.Popen(
        [squid, "-N", "-f", str(conf_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr_path.open("ab"),
    )
    managed = ManagedProcess("squid", process, log)
    managed.port = port
    try:
        wait_for_port(port, managed, timeout=30.0)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nstderr:\n{stderr_path.read_text(errors='replace')}") from None
    return managed


def start_pid_echo_server(
    log_dir: Path, *, heartbeat_interval: float = 10.0, work: int = 0
) -> ManagedProcess:
    """Run ``pid_echo_server.py`` in its own process; its port is in ``.port``.

    ``work`` adds that many SHA-256 passes over every chunk echoed (CPU-bound
    handlers, for the scale-out measurement).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"server-{time.monotonic_ns()}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "pid_echo_server.py"),
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--work",
            str(work),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
    )
    managed = ManagedProcess("pid echo server", process, log)
    assert process.stdout is not None
    first = process.stdout.readline().decode(errors="replace").split()
    if len(first) != 2 or first[0] != "port":
        managed.stop()
        raise RuntimeError(f"server did not report its port ({first!r}):\n{managed.log_tail()}")
    managed.port = int(first[1])
    return managed
