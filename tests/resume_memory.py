"""The two processes of the resume memory test (``test_resume_memory.py``).

``server``: a resume ``serve_pht`` whose handler sends ``--greeting`` bytes,
then reads until its stream ends. It prints ``port <n>`` once listening,
then answers each line on stdin with ``sessions <open>`` (its sessions not
yet ended, attached or in their grace period).

``client``: opens ``--sessions`` resume tunnels to ``--port``, reads each
greeting (which then sits unacknowledged in the server's replay buffer),
prints ``ready`` and waits to be killed: the kill cuts every connection at
once, as a client that loses its network.
"""

from __future__ import annotations

import argparse
import functools
import sys

import trio

import pht
from pht._stats import ServiceStats


async def greet(stream: pht.PHTStream, size: int) -> None:
    try:
        await stream.send_all(b"g" * size)
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


async def server(greeting: int, grace: int) -> None:
    stats = ServiceStats("memory")
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            pht.serve_pht,
            functools.partial(greet, size=greeting),
            0,
            host="127.0.0.1",
            resume=True,
            grace_period=grace,
            stats=stats,
            max_sessions_per_address=None,
            max_pending_per_address=None,
            max_connections_per_address=None,
        )
        listeners = await nursery.start(serve)
        sys.stdout.write(f"port {listeners[0].socket.getsockname()[1]}\n")
        sys.stdout.flush()
        while await trio.to_thread.run_sync(sys.stdin.readline):
            sys.stdout.write(f"sessions {stats.sessions_open}\n")
            sys.stdout.flush()
        nursery.cancel_scope.cancel()


async def client(port: int, sessions: int, greeting: int) -> None:
    streams: list[pht.PHTStream] = []
    limit = trio.CapacityLimiter(50)

    async def open_one() -> None:
        async with limit:
            stream = await pht.open_pht_stream("127.0.0.1", port, authorize=False, resume=True)
            got = 0
            while got < greeting:
                data = await stream.receive_some()
                assert data, "EOF before the greeting"
                got += len(data)
            streams.append(stream)

    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(open_one)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await trio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--greeting", type=int, default=16 * 1024)
    parser.add_argument("--grace", type=int, default=10)
    args = parser.parse_args()
    if args.role == "server":
        trio.run(server, args.greeting, args.grace)
    else:
        trio.run(client, args.port, args.sessions, args.greeting)
