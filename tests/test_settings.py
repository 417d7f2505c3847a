"""Options as data: every adapter takes the same keywords, checked in one place.

The servers take :class:`pht.ServerOptions`' fields as keywords (typed as
:class:`pht.ServerSettings`) or one ``options=`` object; the clients take
:class:`pht.ClientSettings`. These tests keep the typed keyword lists and
the option objects in step, and check what a misused call raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import trio

import pht
import pht.asyncio
from pht.asgi import PHTApp

from .asyncio_support import run
from .support import echo, receive_exactly, start_server

PATH_KEYWORDS = {"authorize_path", "push_path", "pull_path"}
#: Where the ASGI server in front decides instead.
CONNECTION_KEYWORDS = {"max_connections_per_address", "request_timeout", "keepalive_timeout"}


def keywords(settings: Any) -> set[str]:
    return set(settings.__required_keys__ | settings.__optional_keys__)


def test_server_settings_are_the_server_options_fields() -> None:
    fields = {field.name for field in dataclasses.fields(pht.ServerOptions)}
    assert keywords(pht.ServerSettings) == fields - {"paths"} | PATH_KEYWORDS
    assert keywords(pht.AppSettings) == keywords(pht.ServerSettings) - CONNECTION_KEYWORDS
    # Every keyword may be left out: its default is the field's.
    assert not pht.ServerSettings.__required_keys__
    assert not pht.ClientSettings.__required_keys__


def test_client_settings_are_the_client_options_fields_and_config() -> None:
    fields = {field.name for field in dataclasses.fields(pht.ClientOptions)}
    # config carries authorize, the paths, headers and host_header; the
    # address and TLS are the adapters' own arguments; jitter is for tests.
    own = fields - {"config", "host", "port", "secure", "jitter"}
    assert keywords(pht.ClientSettings) == own | PATH_KEYWORDS | {
        "authorize",
        "headers",
        "host_header",
    }


def test_build_takes_the_keywords_and_names_the_caller_of_an_unknown_one() -> None:
    options = pht.ServerOptions.build(push_path="/up", backlog=7, trusted_proxies=["10.0.0.1"])
    assert options.paths == pht.Paths(push="/up")
    assert options.backlog == 7
    assert [str(network) for network in options.trusted_proxies] == ["10.0.0.1/32"]
    with pytest.raises(TypeError, match=r"^serve_pht\(\) got an unexpected keyword argument 'x'"):
        pht.ServerOptions.build(caller="serve_pht", x=1)  # type: ignore[call-arg]
    client = pht.ClientOptions.build("example.com", 80, pull_path="/down", push_window=3)
    assert client.config.paths == pht.Paths(pull="/down")
    assert client.push_window == 3
    with pytest.raises(TypeError, match=r"^f\(\) got an unexpected keyword argument 'tls'"):
        pht.ClientOptions.build("example.com", 80, caller="f", tls=True)  # type: ignore[call-arg]


async def test_serve_pht_refuses_an_unknown_keyword_before_listening() -> None:
    with pytest.raises(TypeError, match=r"serve_pht\(\) got an unexpected keyword argument"):
        await pht.serve_pht(echo, 0, host="127.0.0.1", idle_timout=5)  # type: ignore[call-arg]


async def test_serve_pht_refuses_options_and_keywords_together() -> None:
    with pytest.raises(TypeError, match=r"options= or keyword settings, not both.*backlog"):
        await pht.serve_pht(echo, 0, options=pht.ServerOptions(), backlog=4)
    with pytest.raises(TypeError, match=r"options must be a pht\.ServerOptions, not dict"):
        await pht.serve_pht(echo, 0, options={"backlog": 4})  # type: ignore[arg-type]


async def test_serve_pht_with_an_options_object_serves_by_it() -> None:
    options = pht.ServerOptions(paths=pht.Paths(authorize="/a", push="/up", pull="/down"))
    async with trio.open_nursery() as nursery:
        port = await start_server(nursery, options=options)
        with pytest.raises(pht.TunnelError):  # the default paths are not served
            await pht.open_pht_stream("127.0.0.1", port)
        stream = await pht.open_pht_stream(
            "127.0.0.1", port, authorize_path="/a", push_path="/up", pull_path="/down"
        )
        await stream.send_all(b"through /up and /down")
        assert await receive_exactly(stream, 21) == b"through /up and /down"
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_open_pht_stream_refuses_an_unknown_keyword_before_connecting() -> None:
    with pytest.raises(TypeError, match=r"open_pht_stream\(\) got an unexpected keyword"):
        await pht.open_pht_stream("127.0.0.1", 9, ssl=True)  # type: ignore[call-arg]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_asyncio_adapters_take_the_same_settings(loop: str) -> None:
    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    async def main() -> None:
        with pytest.raises(TypeError, match=r"start_pht_server\(\) got an unexpected keyword"):
            await pht.asyncio.start_pht_server(connected, "127.0.0.1", 0, tls=True)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="not both"):
            await pht.asyncio.start_pht_server(
                connected, "127.0.0.1", 0, options=pht.ServerOptions(), strict=True
            )
        with pytest.raises(TypeError, match=r"open_pht_connection\(\) got an unexpected keyword"):
            await pht.asyncio.open_pht_connection("127.0.0.1", 9, tls=True)  # type: ignore[call-arg]
        options = pht.ServerOptions(paths=pht.Paths(push="/up"))
        server = await pht.asyncio.start_pht_server(connected, "127.0.0.1", 0, options=options)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await pht.asyncio.open_pht_connection(
                "127.0.0.1", port, push_path="/up"
            )
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_asgi_app_takes_an_options_object() -> None:
    options = pht.ServerOptions(heartbeat_interval=3.0)
    app = PHTApp(lambda reader, writer: None, options=options)
    assert app.options is options
    with pytest.raises(TypeError, match="not both"):
        PHTApp(lambda reader, writer: None, options=options, strict=True)
