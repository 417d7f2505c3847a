"""The main job, end to end: a real PHT tunnel moving a real download.

Starts, on loopback: an HTTP server with a 32 MiB random file, a PHT server
(`pht -L socks5+pht://...`, as GOST's documentation writes it), and a local
HTTP proxy whose connections go through the tunnel
(`pht -L http://... -F socks5+pht://...`). Then curl downloads the file
through the proxy, and the script checks it byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable


def start(args: list[str], name: str) -> tuple[subprocess.Popen[str], str]:
    """Start a pht command and wait for its 'listening on' line."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "pht", *args], stderr=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        print(f"  [{name}] {line.rstrip()}")
        match = re.search(r"listening on \S*:(\d+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"demo: {name} did not start")


def main() -> int:
    if shutil.which("curl") is None:
        raise SystemExit("demo: curl is needed (scripts/setup.sh demo installs it)")
    with tempfile.TemporaryDirectory() as folder:
        payload = os.urandom(32 * 1024 * 1024)
        Path(folder, "file.bin").write_bytes(payload)
        web = subprocess.Popen(
            [PYTHON, "-m", "http.server", "0", "--bind", "127.0.0.1"],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        procs: list[subprocess.Popen[str]] = [web]
        try:
            assert web.stdout is not None
            web_port = re.search(r"port (\d+)", web.stdout.readline())
            assert web_port, "http.server did not report its port"
            print(f"web server on 127.0.0.1:{web_port.group(1)} with a 32 MiB file")
            server, pht_port = start(["-L", "socks5+pht://127.0.0.1:0"], "server")
            procs.append(server)
            client, proxy_port = start(
                ["-L", "http://127.0.0.1:0", "-F", f"socks5+pht://127.0.0.1:{pht_port}"],
                "client",
            )
            procs.append(client)
            url = f"http://127.0.0.1:{web_port.group(1)}/file.bin"
            started = time.perf_counter()
            body = subprocess.run(
                ["curl", "-sS", "--fail", "-x", f"http://127.0.0.1:{proxy_port}", url],
                capture_output=True,
                check=True,
                timeout=120,
            ).stdout
            elapsed = time.perf_counter() - started
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=10)
    ok = body == payload
    print(
        f"curl -> HTTP proxy -> PHT tunnel (SOCKS5 inside) -> web server: "
        f"{len(body)} bytes in {elapsed:.2f} s ({len(body) / elapsed / 1e6:.0f} MB/s), "
        f"sha256 {hashlib.sha256(body).hexdigest()[:16]}…, "
        f"{'identical to the original' if ok else 'DIFFERENT from the original'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
