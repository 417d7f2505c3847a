"""GOST's TLS options and the http_proxy environment reach the dialers and listeners."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing

import pht
from pht.cli._chain import ChainDialer, _proxy_url
from pht.cli._run import build_config, prepare
from pht.cli._spec import ConfigError
from pht.proxy._stream import as_trio

from .support import start_server


def test_listener_options_on_the_generated_certificate() -> None:
    config = build_config(["phts://127.0.0.1:0?minVersion=VersionTLS13&alpn=http/1.1"], [])
    (service,) = prepare(config)
    assert isinstance(service.tls, ssl.SSLContext)
    assert service.tls.minimum_version is ssl.TLSVersion.TLSv1_3


def test_listener_without_options_keeps_the_servers_default() -> None:
    (service,) = prepare(build_config(["phts://127.0.0.1:0"], []))
    assert service.tls is True


def test_dialer_options() -> None:
    config = build_config(
        [":0"], ["phts://127.0.0.1:1?maxVersion=1.2&cipherSuites=ECDHE-RSA-AES128-GCM-SHA256"]
    )
    dialer = ChainDialer(config.chains[0])
    (context,) = dialer._contexts.values()
    assert context.maximum_version is ssl.TLSVersion.TLSv1_2
    names = {cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] != "TLSv1.3"}
    assert names == {"ECDHE-RSA-AES128-GCM-SHA256"}


def test_unknown_cipher_is_a_config_error() -> None:
    config = build_config([":0"], ["phts://127.0.0.1:1?cipherSuites=NOPE"])
    with pytest.raises(ConfigError, match="cipherSuites 'NOPE': no usable cipher"):
        ChainDialer(config.chains[0])


# --- http_proxy / no_proxy (here for the same in-process ChainDialer checks) ----------


def _proxies(monkeypatch: pytest.MonkeyPatch, node: str, **env: str) -> list[str | None]:
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dialer = ChainDialer(build_config([":0"], [node]).chains[0])
    return [
        _proxy_url(dialer._proxies.get(id(item), item.proxy))
        for item in dialer.chain.hops[0].nodes
    ]


def test_http_proxy_environment_carries_a_pht_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://u:p@127.0.0.1:3128"
    assert _proxies(monkeypatch, "pht://a.example:1", http_proxy=url) == [url]
    assert _proxies(monkeypatch, "pht://a.example:1") == [None]
    # no_proxy, the proxy= option and phts (which would need CONNECT) win.
    assert _proxies(
        monkeypatch, "pht://a.example:1,b.example:1", http_proxy=url, no_proxy="a.example"
    ) == [None, url]
    assert _proxies(monkeypatch, "pht://a.example:1?proxy=direct", http_proxy=url) == [None]
    other = "http://127.0.0.1:8080"
    assert _proxies(monkeypatch, f"pht://a.example:1?proxy={other}", http_proxy=url) == [other]
    assert _proxies(monkeypatch, "phts://a.example:1", http_proxy=url) == [None]


def test_proxy_hop_credentials_become_the_proxy_url() -> None:
    config = build_config([":0"], ["http://tunnel:s3cret%3Apass@127.0.0.1:3128", "pht://s:1"])
    dialer = ChainDialer(config.chains[0])
    (hop,) = dialer._hops
    (node,) = hop.nodes
    assert dialer._proxies[id(node)] == "http://tunnel:s3cret%3Apass@127.0.0.1:3128"


# --- pushWindow reaches the PHT dialer -------------------------------------------------


@pytest.mark.parametrize(("window", "returned"), [(4, 3), (1, 0)])
async def test_push_window_lets_writes_return_before_their_answer(
    window: int, returned: int
) -> None:
    # The server answers a push only once its handler took the bytes. With
    # pushWindow=4, three writes return while the handler reads nothing; with
    # pushWindow=1 (GOST's stop-and-wait) the first one waits for the handler.
    read = trio.Event()
    received = bytearray()

    async def late_reader(stream: pht.PHTStream) -> None:
        await read.wait()
        while len(received) < 3 * 1024:
            received.extend(await stream.receive_some())

    writes = 0

    async def writer(stream: trio.abc.Stream) -> None:
        nonlocal writes
        for _ in range(3):
            await stream.send_all(b"x" * 1024)
            writes += 1

    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, late_reader)
        config = build_config([":0"], [f"forward+pht://127.0.0.1:{port}?pushWindow={window}"])
        stream = as_trio(await ChainDialer(config.chains[0])("127.0.0.1", 1))
        with trio.fail_after(10):
            async with trio.open_nursery() as writing:
                writing.start_soon(writer, stream)
                # Client and server run in this process: once every task waits,
                # the pushes sent so far have reached the server.
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert writes == returned
                read.set()
            while len(received) < 3 * 1024:
                await trio.sleep(0.01)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert received == b"x" * 3 * 1024


# --- resume reaches the PHT dialer ------------------------------------------------------


async def test_resume_is_offered_and_granted_through_the_chain() -> None:
    async def handler(stream: pht.PHTStream) -> None:
        await stream.send_all(await stream.receive_some())

    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, handler, resume=True)
        for query, resumed in (("?resume=true", True), ("", False)):
            config = build_config([":0"], [f"forward+pht://127.0.0.1:{port}{query}"])
            stream = as_trio(await ChainDialer(config.chains[0])("127.0.0.1", 1))
            with trio.fail_after(10):
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
            assert _resumed(stream) is resumed
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _resumed(stream: object) -> bool:
    """Whether the tunnel under the chain's stream got a resume grant."""
    seen: set[int] = set()
    todo = [stream]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        session = getattr(item, "_session", None)
        if session is not None and hasattr(session, "resume"):
            return session.resume is not None
        todo.extend(value for value in vars(item).values() if hasattr(value, "__dict__"))
    raise AssertionError("no PHT session under the stream")
