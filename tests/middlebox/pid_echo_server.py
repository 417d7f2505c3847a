"""A pht server process for the scale-out tests: it tells each session who it is.

Every session first receives ``<pid>\\n`` (this process's id), then an echo of
whatever the client sends. The process prints ``port <n>`` on stdout once it
listens on 127.0.0.1 (``--port 0``, the default, picks a free port).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys

import trio

import pht


async def pid_echo(stream: pht.PHTStream, work: int = 0) -> None:
    try:
        await stream.send_all(f"{os.getpid()}\n".encode())
        while data := await stream.receive_some():
            for _ in range(work):  # a CPU-bound handler, for scale-out figures
                hashlib.sha256(data).digest()
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def main(port: int, heartbeat_interval: float, work: int) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            pht.serve_pht,
            functools.partial(pid_echo, work=work),
            port,
            host="127.0.0.1",
            heartbeat_interval=heartbeat_interval,
        )
        listeners = await nursery.start(serve)
        bound = listeners[0].socket.getsockname()[1]
        sys.stdout.write(f"port {bound}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--work", type=int, default=0, help="SHA-256 passes per echoed chunk")
    args = parser.parse_args()
    try:
        trio.run(main, args.port, args.heartbeat_interval, args.work)
    except KeyboardInterrupt:
        pass
