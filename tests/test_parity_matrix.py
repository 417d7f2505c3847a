"""Every client adapter against every server adapter, over real loopback sockets.

Clients: trio, asyncio, uvloop; servers: trio, asyncio, uvloop and PHTApp
under uvicorn (see :mod:`tests.adapters`). Each pair moves 4 MiB each way
with sha256, closes from either side (the other side sees EOF), uses custom
paths and headers, phts, and survives heartbeats; each server adapter gives
the hardening answers (413, 431, 429, 410) to raw HTTP requests. The trio
pair is the reference: a test that fails for another pair is a difference
in behaviour, marked ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .adapters import (
    CLIENT_ADAPTERS,
    GUARD,
    SERVER_ADAPTERS,
    Client,
    Endpoint,
    ServerSet,
    Spec,
    TunnelBroken,
    run_client,
)
from .parity_site import digest, payload

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
BULK = 4 * MIB
#: What the 'source' endpoint writes before it closes the session.
SOURCE_SIZE = MIB + 1
CUSTOM_PATHS = {"authorize_path": "/a/auth", "push_path": "/a/in", "pull_path": "/a/out"}

SPECS = [
    Spec("echo"),
    Spec("sink", "sink"),
    Spec("source", "source", SOURCE_SIZE),
    Spec("paths", options=CUSTOM_PATHS),
    Spec("beat", options={"heartbeat_interval": 0.1}),
    Spec("limits", options={"max_push_line": 4096, "max_header_size": 2048}),
    Spec("full", options={"max_sessions": 2}),
    Spec("stuck", "stuck", options={"push_timeout": 0.5}),
    Spec("single", options={"max_sessions": 1}),
    Spec("strict", options={"strict": True}),
    Spec("crash", "crash"),
]
FLOWS = pytest.mark.parametrize("authorize", [True, False], ids=["legacy-flow", "modern-flow"])


@pytest.fixture(scope="module", params=SERVER_ADAPTERS, ids=lambda name: f"server={name}")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerSet]:
    started = ServerSet(request.param, SPECS, directory=tmp_path_factory.mktemp(request.param))
    yield started
    started.stop()


@pytest.fixture(scope="module", params=SERVER_ADAPTERS, ids=lambda name: f"server={name}")
def tls_servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerSet]:
    directory = tmp_path_factory.mktemp(f"{request.param}-tls")
    started = ServerSet(request.param, [Spec("echo")], tls=True, directory=directory)
    yield started
    started.stop()


@pytest.fixture(params=CLIENT_ADAPTERS, ids=lambda name: f"client={name}")
def client(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


async def echo_exchange(
    client: Client, endpoint: Endpoint, size: int, seed: int, **options: Any
) -> str:
    """Open a tunnel, send ``size`` bytes while reading their echo, close; the echo's sha256."""
    tunnel = await client.open(endpoint, **options)
    data = payload(size, seed)
    echoed = bytearray()

    async def send() -> None:
        for start in range(0, size, 256 * 1024):
            await tunnel.send(data[start : start + 256 * 1024])

    async def receive() -> None:
        echoed.extend(await tunnel.receive_exactly(size))

    await client.both(send, receive)
    await tunnel.close()
    return digest(bytes(echoed))


def test_4_mib_each_way(client: str, servers: ServerSet) -> None:
    async def scenario(client: Client) -> str:
        return await echo_exchange(client, servers["echo"], BULK, seed=1, authorize=False)

    assert run_client(client, scenario) == digest(payload(BULK, seed=1))


@FLOWS
def test_close_from_the_client_is_eof_for_the_server(
    client: str, servers: ServerSet, authorize: bool
) -> None:
    data = payload(MIB + 3, seed=2)

    async def scenario(client: Client) -> str:
        tunnel = await client.open(servers["sink"], authorize=authorize)
        for start in range(0, len(data), 64 * 1024):
            await tunnel.send(data[start : start + 64 * 1024])
        await tunnel.close()
        return tunnel.token

    token = run_client(client, scenario)
    # The handler read to EOF: every byte, in order, and then the end.
    assert servers.wait_report("sink", token) == ["sink", token, str(len(data)), digest(data)]


@FLOWS
def test_close_from_the_server_is_eof_for_the_client(
    client: str, servers: ServerSet, authorize: bool
) -> None:
    async def scenario(client: Client) -> bytes:
        tunnel = await client.open(servers["source"], authorize=authorize)
        received = await tunnel.receive_until_eof()
        assert await tunnel.receive() == b""  # EOF stays EOF
        with pytest.raises(TunnelBroken, match="session is over"):  # no half-close
            await tunnel.send(b"too late")
        await tunnel.close()
        return received

    received = run_client(client, scenario)
    assert (len(received), digest(received)) == (SOURCE_SIZE, digest(payload(SOURCE_SIZE)))


def test_custom_paths_and_headers(client: str, servers: ServerSet) -> None:
    headers = {"X-Parity": "yes", "Authorization": "Bearer not-checked"}

    async def scenario(client: Client) -> list[str]:
        return [
            await echo_exchange(
                client, servers["paths"], 70_000, seed=3, authorize=authorize, headers=headers
            )
            for authorize in (True, False)
        ]

    assert run_client(client, scenario) == [digest(payload(70_000, seed=3))] * 2


def test_default_paths_are_not_served_when_custom_ones_are_set(servers: ServerSet) -> None:
    endpoint = servers["paths"]
    status, _, _ = http(endpoint, get(endpoint.prefix + "/authorize"))
    assert status == 404
    status, _, body = http(endpoint, get(endpoint.path("authorize")))
    assert status == 200
    assert body.startswith(b"token=")


def test_phts(client: str, tls_servers: ServerSet) -> None:
    async def scenario(client: Client) -> list[str]:
        return [
            await echo_exchange(client, tls_servers["echo"], 300_000, seed=4, authorize=authorize)
            for authorize in (True, False)
        ]

    assert run_client(client, scenario) == [digest(payload(300_000, seed=4))] * 2


@FLOWS
def test_heartbeats_bring_no_data(client: str, servers: ServerSet, authorize: bool) -> None:
    """Idle over a few heartbeats (every 0.1 s): the tunnel lives, reads only what was sent."""

    async def scenario(client: Client) -> list[bytes]:
        tunnel = await client.open(servers["beat"], authorize=authorize)
        await tunnel.send(b"before")
        first = await tunnel.receive_exactly(6)
        await client.idle(0.35)
        await tunnel.send(b"after")
        second = await tunnel.receive_exactly(5)
        await tunnel.close()
        return [first, second]

    assert run_client(client, scenario) == [b"before", b"after"]


def test_sixteen_tunnels_at_once(client: str, servers: ServerSet) -> None:
    """Both flows side by side (half of them authorize), each echo checked by sha256."""

    async def scenario(client: Client) -> dict[int, str]:
        digests: dict[int, str] = {}

        async def one(index: int) -> None:
            digests[index] = await echo_exchange(
                client, servers["echo"], 32 * 1024 + index, seed=index, authorize=index % 2 == 0
            )

        async def many(indexes: list[int]) -> None:
            if len(indexes) == 1:
                await one(indexes[0])
            else:
                half = len(indexes) // 2
                await client.both(lambda: many(indexes[:half]), lambda: many(indexes[half:]))

        await many(list(range(16)))
        return digests

    expected = {index: digest(payload(32 * 1024 + index, seed=index)) for index in range(16)}
    assert run_client(client, scenario) == expected


def test_a_push_nobody_consumes_is_an_error_not_eof(client: str, servers: ServerSet) -> None:
    """410 after push_timeout: the client's send fails, and reading says so (no EOF).

    The server cuts the session's pull as it refuses the push; whichever the
    client hears first, the 410 is what it reports.
    """

    async def scenario(client: Client) -> tuple[int | None, int | None]:
        tunnel = await client.open(servers["stuck"], authorize=False)
        try:
            await tunnel.send(payload(MIB))
        except TunnelBroken as exc:
            sent = exc.status
        else:
            sent = None
        try:
            data = await tunnel.receive()
        except TunnelBroken as exc:
            received = exc.status
        else:
            received = -len(data)  # EOF (0) or data: neither is right
        await tunnel.close()
        return sent, received

    assert run_client(client, scenario) == (410, 410)


def test_a_full_table_refuses_a_client_with_429(client: str, servers: ServerSet) -> None:
    async def scenario(client: Client) -> list[int | None]:
        first = await client.open(servers["single"], authorize=False)
        statuses = []
        for authorize in (True, False):
            try:
                extra = await client.open(servers["single"], authorize=authorize)
            except TunnelBroken as exc:
                statuses.append(exc.status)
            else:
                statuses.append(None)
                await extra.close()
        await first.send(b"still here")
        statuses.append(len(await first.receive_exactly(10)))
        await first.close()
        return statuses

    assert run_client(client, scenario) == [429, 429, 10]


def test_a_strict_server_knows_only_the_tokens_it_issued(client: str, servers: ServerSet) -> None:
    async def scenario(client: Client) -> tuple[str, int | None]:
        issued = await echo_exchange(client, servers["strict"], 1000, seed=6, authorize=True)
        try:
            tunnel = await client.open(servers["strict"], authorize=False)
            await tunnel.send(b"mine")
            await tunnel.receive()
        except TunnelBroken as exc:
            return issued, exc.status
        await tunnel.close()
        return issued, None

    assert run_client(client, scenario) == (digest(payload(1000, seed=6)), 403)


def test_a_handler_that_raises_ends_only_its_session(client: str, servers: ServerSet) -> None:
    """The trio server's rule: its client reads EOF; the server and other tunnels carry on."""

    async def scenario(client: Client) -> list[bytes]:
        outcomes = []
        for authorize in (True, False):
            tunnel = await client.open(servers["crash"], authorize=authorize)
            await tunnel.send(b"x")
            outcomes.append(await tunnel.receive())
            await tunnel.close()
        return outcomes

    assert run_client(client, scenario) == [b"", b""]
    echo_works(servers["echo"])


@pytest.mark.parametrize("client_name", CLIENT_ADAPTERS, ids=lambda name: f"client={name}")
@settings(max_examples=6, deadline=None)
@given(
    writes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=6),
    authorize=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_any_write_boundaries_come_back_in_order(
    client_name: str, servers: ServerSet, writes: list[int], authorize: bool, seed: int
) -> None:
    """A property: whatever the writes' sizes (empty ones too), the echo is the same bytes."""
    data = payload(sum(writes), seed)

    async def scenario(client: Client) -> bytes:
        tunnel = await client.open(servers["echo"], authorize=authorize)
        echoed = bytearray()

        async def send() -> None:
            offset = 0
            for size in writes:
                await tunnel.send(data[offset : offset + size])
                offset += size

        async def receive() -> None:
            echoed.extend(await tunnel.receive_exactly(len(data)))

        await client.both(send, receive)
        await tunnel.close()
        return bytes(echoed)

    assert run_client(client_name, scenario) == data


# --- the hardening answers, from raw HTTP ---------------------------------------------


def http(endpoint: Endpoint, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a fresh connection; ``(status, headers, body)`` of its answer."""
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=GUARD) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        status_line = reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[bytes, bytes] = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get(b"transfer-encoding") == b"chunked":
            while size := int(reader.readline().split(b";")[0], 16):
                body += reader.read(size)
                reader.readline()
        else:
            body = reader.read(int(headers.get(b"content-length", b"0")))
        return int(status_line.split()[1]), headers, body


def get(target: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n" % (target.encode(), extra)


def push(endpoint: Endpoint, token: str, body: bytes) -> bytes:
    return (
        b"POST %s?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (endpoint.path("push").encode(), token.encode(), len(body))
    ) + body


def line(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\n"


def echo_works(endpoint: Endpoint) -> None:
    """An ordinary tunnel on the same server still carries data (trio client)."""

    async def scenario(client: Client) -> str:
        # Pushes of 2 KiB: their lines stay under the endpoint's max_push_line.
        return await echo_exchange(
            client, endpoint, 5000, seed=5, authorize=False, max_push_size=2048
        )

    assert run_client("trio", scenario) == digest(payload(5000, seed=5))


def test_too_long_push_line_is_413(servers: ServerSet) -> None:
    endpoint = servers["limits"]
    token = f"long-line-{servers.adapter}-0001"
    assert http(endpoint, push(endpoint, token, line(b"hi")))[0] == 200
    assert http(endpoint, push(endpoint, token, line(b"x" * 8192)))[0] == 413
    assert http(endpoint, push(endpoint, token, line(b"hi")))[0] == 403  # and over for good
    echo_works(endpoint)


def test_huge_headers_are_431(servers: ServerSet) -> None:
    endpoint = servers["limits"]
    status, _, _ = http(
        endpoint, get(endpoint.path("authorize"), b"X-Big: %s\r\n" % (b"a" * 8192))
    )
    assert status == 431
    echo_works(endpoint)


def test_a_full_session_table_is_429(servers: ServerSet) -> None:
    endpoint = servers["full"]
    assert http(endpoint, get(endpoint.path("authorize")))[0] == 200
    assert http(endpoint, get(endpoint.path("authorize")))[0] == 200
    assert http(endpoint, get(endpoint.path("authorize")))[0] == 429
    # A modern client's own token finds the table full too.
    assert http(endpoint, push(endpoint, f"table-full-{servers.adapter}", line(b"hi")))[0] == 429


def test_a_push_not_consumed_within_push_timeout_is_410(servers: ServerSet) -> None:
    endpoint = servers["stuck"]
    token = f"unread-{servers.adapter}-0001"
    # 1 MiB: more than any reader buffer takes without its application reading.
    assert http(endpoint, push(endpoint, token, line(b"y" * MIB)))[0] == 410
    assert http(endpoint, push(endpoint, token, line(b"hi")))[0] == 403


def test_heartbeats_are_empty_lines_on_an_open_pull(servers: ServerSet) -> None:
    endpoint = servers["beat"]
    token = f"heartbeat-{servers.adapter}-0001"
    request = b"GET %s?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % (
        endpoint.path("pull").encode(),
        token.encode(),
    )
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=GUARD) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        assert reader.readline().split(b" ")[1] == b"200"
        headers = set()
        while (header := reader.readline()) != b"\r\n":
            headers.add(header.lower().strip())
        assert b"x-accel-buffering: no" in headers
        assert b"transfer-encoding: chunked" in headers
        body = b""
        while body.count(b"\n") < 3:
            size = int(reader.readline(), 16)
            assert size, "the pull ended"
            body += reader.read(size)
            reader.readline()
        assert body == b"\n\n\n"
    # Close the session (the pull is gone; an empty push is the close notification).
    http(endpoint, push(endpoint, token, b""))
