"""``serverName`` and ``secure`` of a phts node, against a real phts server on loopback.

``serverName`` is both the name sent in the TLS handshake (SNI, which a
front such as a CDN routes on) and, with ``secure=true``, the name the
certificate must carry, while the connection goes to the node's address.
"""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

import pytest
import trio

import pht
from pht import proxy
from pht.cli._chain import ChainDialer
from pht.cli._run import build_config
from pht.proxy._stream import as_trio


async def _echo(stream: trio.abc.Stream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


async def _round_trip(node: str, port: int) -> None:
    config = build_config([":0"], [node.format(port=port)])
    dialer = ChainDialer(config.chains[0])
    stream = as_trio(await dialer("target.invalid", 80))  # forward: the server's handler echoes
    async with stream:
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[pht.SelfSignedCertificate, Path]:
    made = pht.make_self_signed_certificate(common_name="tunnel.test")
    path = tmp_path / "ca.pem"
    path.write_bytes(made.cert_pem)
    return made, path


async def _serve(
    nursery: trio.Nursery, certificate: pht.SelfSignedCertificate, names: list[str | None]
) -> int:
    context = certificate.server_context()

    def record(sock: object, name: str | None, ctx: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = record
    serve = functools.partial(pht.serve_pht, _echo, 0, tls=context, host="127.0.0.1")
    listeners = await nursery.start(serve)
    port: int = listeners[0].transport_listener.socket.getsockname()[1]
    return port


async def test_server_name_is_sent_and_verified(
    certificate: tuple[pht.SelfSignedCertificate, Path],
) -> None:
    made, ca = certificate
    names: list[str | None] = []
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, made, names)
        node = f"forward+phts://127.0.0.1:{{port}}?secure=true&caFile={ca}&serverName=tunnel.test"
        with trio.fail_after(30):
            await _round_trip(node, port)
        nursery.cancel_scope.cancel()
    assert set(names) == {"tunnel.test"}


async def test_secure_refuses_a_name_the_certificate_lacks(
    certificate: tuple[pht.SelfSignedCertificate, Path],
) -> None:
    made, ca = certificate
    names: list[str | None] = []
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, made, names)
        node = f"forward+phts://127.0.0.1:{{port}}?secure=true&caFile={ca}&serverName=other.test"
        with trio.fail_after(30), pytest.raises(proxy.HopError, match=r"(?i)hostname mismatch"):
            await _round_trip(node, port)
        nursery.cancel_scope.cancel()
    assert names == ["other.test"]


async def test_without_secure_the_name_is_sent_but_not_checked(
    certificate: tuple[pht.SelfSignedCertificate, Path],
) -> None:
    made, _ = certificate
    names: list[str | None] = []
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, made, names)
        with trio.fail_after(30):
            await _round_trip("forward+phts://127.0.0.1:{port}?serverName=cdn.example", port)
        nursery.cancel_scope.cancel()
    assert set(names) == {"cdn.example"}
