"""pht.asgi.PHTApp driven through the ASGI interface itself, in one asyncio loop.

No ASGI server here: each test is what a server would hand over (scopes,
``receive`` and ``send``), to reach what the real servers in
``test_asgi_servers.py`` cannot show on the wire: the lifespan, the mount's
``root_path``, pull replacement and hang-ups, the callback's streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any, TypeVar

import pytest

import pht
from pht.asgi import PHTApp

T = TypeVar("T")

#: Generous bound for "this must not hang"; never a performance expectation.
HANG_BOUND = 30.0

Message = MutableMapping[str, Any]


def run(coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a test body in a fresh asyncio loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine(), HANG_BOUND)

    return asyncio.run(bounded())


def http_scope(
    method: str,
    path: str,
    *,
    root_path: str = "",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    http_version: str = "1.1",
) -> Message:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query,
        "headers": headers if headers is not None else [(b"host", b"site")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


class Request:
    """One request in progress: its body goes in, the app's messages come out."""

    def __init__(self, app: PHTApp, scope: Message, body: list[bytes]) -> None:
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        for index, part in enumerate(body or [b""]):
            more = index < len(body) - 1
            self.incoming.put_nowait({"type": "http.request", "body": part, "more_body": more})
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> Message:
        return await self.incoming.get()

    async def _send(self, message: Message) -> None:
        await self.sent.put(message)

    def disconnect(self) -> None:
        self.incoming.put_nowait({"type": "http.disconnect"})

    async def start(self) -> tuple[int, dict[bytes, bytes]]:
        message = await self.sent.get()
        assert message["type"] == "http.response.start"
        return message["status"], dict(message["headers"])

    async def body_part(self) -> Message:
        message = await self.sent.get()
        assert message["type"] == "http.response.body"
        return message

    async def response(self) -> tuple[int, bytes]:
        status, _ = await self.start()
        body = bytearray()
        while True:
            part = await self.body_part()
            body += part.get("body", b"")
            if not part.get("more_body", False):
                break
        await self.task
        return status, bytes(body)


async def call(
    app: PHTApp, method: str, path: str, *, body: list[bytes] | None = None, **scope: Any
) -> tuple[int, bytes]:
    return await Request(app, http_scope(method, path, **scope), body or []).response()


async def send_push(app: PHTApp, token: str, data: bytes, **scope: Any) -> int:
    line = pht.encode_line(data)
    headers = [(b"host", b"site"), (b"content-length", str(len(line)).encode())]
    status, _ = await call(
        app,
        "POST",
        scope.pop("path", "/push"),
        body=[line],
        query=f"token={token}".encode(),
        headers=headers,
        **scope,
    )
    return status


class Recorder:
    """A callback that keeps what it read and whether it saw EOF."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.arrived = asyncio.Event()
        self.eof = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data
            self.arrived.set()
        self.eof.set()
        writer.close()

    async def wait_for(self, size: int) -> bytes:
        """What the callback read, once it is ``size`` bytes."""
        while len(self.received) < size:
            self.arrived.clear()
            await self.arrived.wait()
        return bytes(self.received)


def test_paths_are_relative_to_the_mount() -> None:
    async def main() -> None:
        app = PHTApp(Recorder(), shutdown_timeout=0)
        # Mounted at /tunnel, as Starlette's Mount gives it: root_path is the mount.
        status, body = await call(app, "GET", "/tunnel/authorize", root_path="/tunnel")
        assert status == 200
        assert body.startswith(b"token=")
        # A server run with a root path that it does not put into path.
        assert (await call(app, "GET", "/authorize", root_path="/tunnel"))[0] == 200
        # /tunnelx is not below /tunnel.
        assert (await call(app, "GET", "/tunnelx/authorize", root_path="/tunnel"))[0] == 404
        assert await call(app, "GET", "/tunnel/nope", root_path="/tunnel") == (
            404,
            b"404 page not found\n",
        )
        await app.shutdown()

    run(main)


def test_lifespan_shutdown_closes_the_sessions() -> None:
    async def main() -> None:
        recorder = Recorder()
        app = PHTApp(recorder, shutdown_timeout=0)
        incoming: asyncio.Queue[Message] = asyncio.Queue()
        answers: asyncio.Queue[str] = asyncio.Queue()

        async def send(message: Message) -> None:
            await answers.put(message["type"])

        life = asyncio.get_running_loop().create_task(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, send)
        )
        incoming.put_nowait({"type": "lifespan.startup"})
        assert await answers.get() == "lifespan.startup.complete"
        # A session: pushed bytes the callback took, no pull, nothing ends it...
        assert await send_push(app, "sessiontoken1", b"hello") == 200
        assert await recorder.wait_for(5) == b"hello"
        assert not recorder.eof.is_set()
        # ...but the server's shutdown.
        incoming.put_nowait({"type": "lifespan.shutdown"})
        assert await answers.get() == "lifespan.shutdown.complete"
        await life
        assert recorder.eof.is_set()
        report = await app.shutdown()
        assert report.cut == ("sessiont…",)
        # No new sessions once shut down.
        assert (await call(app, "GET", "/authorize"))[0] == 503

    run(main)


def test_framework_lifespan_context_shuts_down() -> None:
    async def main() -> None:
        recorder = Recorder()
        app = PHTApp(recorder, shutdown_timeout=0)
        async with app.lifespan(object()):
            assert await send_push(app, "sessiontoken2", b"x") == 200
        assert recorder.eof.is_set()

    run(main)


def test_options_of_the_asgi_server_are_refused_with_where_they_belong() -> None:
    with pytest.raises(TypeError, match="limit connections in the ASGI server"):
        PHTApp(Recorder(), max_connections_per_address=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="keep-alive"):
        PHTApp(Recorder(), keepalive_timeout=4)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        PHTApp(Recorder(), colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="heartbeat_interval"):
        PHTApp(Recorder(), heartbeat_interval=0)
    with pytest.raises(TypeError, match="callable"):
        PHTApp("not a callback")  # type: ignore[arg-type]


def test_one_app_serves_one_event_loop() -> None:
    app = PHTApp(Recorder(), shutdown_timeout=0)

    async def authorize() -> int:
        return (await call(app, "GET", "/authorize"))[0]

    assert run(authorize) == 200

    async def elsewhere() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            raise AssertionError("nothing is answered")

        await app(http_scope("GET", "/authorize"), receive, send)

    with pytest.raises(RuntimeError, match="one PHTApp per loop"):
        run(elsewhere)


def test_websocket_is_refused() -> None:
    async def main() -> list[Message]:
        app = PHTApp(Recorder(), shutdown_timeout=0)
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "websocket.connect"}

        async def send(message: Message) -> None:
            sent.append(message)

        await app({"type": "websocket", "path": "/pull"}, receive, send)
        return sent

    assert run(main) == [{"type": "websocket.close", "code": 1008}]


def test_a_push_body_of_unknown_length_is_decoded_as_it_comes() -> None:
    async def main() -> None:
        recorder = Recorder()
        app = PHTApp(recorder, shutdown_timeout=0)
        line = pht.encode_line(b"over HTTP/2, no content-length")
        parts = [line[:5], line[5:17], line[17:]]
        status, _ = await call(
            app, "POST", "/push", body=parts, query=b"token=sessiontoken3", http_version="2"
        )
        assert status == 200
        assert await recorder.wait_for(30) == b"over HTTP/2, no content-length"
        await app.shutdown()

    run(main)


async def open_pull(app: PHTApp, token: str) -> Request:
    request = Request(app, http_scope("GET", "/pull", query=f"token={token}".encode()), [])
    status, headers = await request.start()
    assert status == 200
    assert headers[b"x-accel-buffering"] == b"no"
    return request


def test_a_newer_pull_replaces_the_older_one() -> None:
    async def main() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(2)
            writer.write(b"for the newer pull")
            await writer.drain()
            await reader.read()

        app = PHTApp(greet, shutdown_timeout=0)
        older = await open_pull(app, "sessiontoken4")
        newer = await open_pull(app, "sessiontoken4")
        # The older one is cut (its app call returns without a last chunk).
        await older.task
        assert older.sent.empty()
        assert await send_push(app, "sessiontoken4", b"go") == 200
        part = await newer.body_part()
        assert part["more_body"]
        assert pht.decode_line(part["body"].rstrip(b"\n")) == b"for the newer pull"
        newer.disconnect()
        await newer.task
        await app.shutdown()

    run(main)


def test_a_pull_whose_client_hangs_up_ends_the_session() -> None:
    async def main() -> None:
        recorder = Recorder()
        app = PHTApp(recorder, shutdown_timeout=0)
        pull = await open_pull(app, "sessiontoken5")
        pull.disconnect()
        await pull.task
        await asyncio.wait_for(recorder.eof.wait(), HANG_BOUND)
        # The token is closed for good: a late pull is refused.
        assert (await call(app, "GET", "/pull", query=b"token=sessiontoken5"))[0] == 403
        await app.shutdown()

    run(main)


def test_the_callback_gets_asyncio_streams_with_the_token() -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        async def inspect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["reader"], seen["writer"] = reader, writer
            seen["token"] = writer.get_extra_info("pht_token")
            seen["peername"] = writer.get_extra_info("peername")
            seen["line"] = await reader.readline()
            writer.close()
            await writer.wait_closed()

        app = PHTApp(inspect, shutdown_timeout=0)
        pull = await open_pull(app, "sessiontoken6")
        assert await send_push(app, "sessiontoken6", b"a line\nrest") == 200
        # The callback closed: the pull ends cleanly, the session is over.
        part = await pull.body_part()
        assert part == {"type": "http.response.body", "body": b""}
        await pull.task
        assert type(seen["reader"]) is asyncio.StreamReader
        assert type(seen["writer"]) is asyncio.StreamWriter
        assert seen["token"] == "sessiontoken6"
        assert seen["peername"] == ("127.0.0.1", 40000)
        assert seen["line"] == b"a line\n"
        await app.shutdown()

    run(main)


def test_a_broken_callback_does_not_stop_the_others() -> None:
    async def main() -> None:
        async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raise RuntimeError("callback bug")

        app = PHTApp(broken, shutdown_timeout=0)
        pull = await open_pull(app, "sessiontoken7")
        await pull.body_part()  # ended: the callback returned (by raising)
        await pull.task
        assert (await call(app, "GET", "/authorize"))[0] == 200
        await app.shutdown()

    run(main)


def test_draining_refuses_new_sessions_with_503() -> None:
    async def main() -> None:
        app = PHTApp(Recorder(), shutdown_timeout=0)
        await app.shutdown()
        assert (await call(app, "GET", "/authorize"))[0] == 503
        assert await send_push(app, "sessiontoken8", b"late") == 503

    run(main)


def test_a_percent_encoded_path_routes_as_it_reads() -> None:
    async def main() -> None:
        app = PHTApp(Recorder(), shutdown_timeout=0)
        # ASGI gives the path decoded; an unknown one is a 404, not a malformed request.
        assert (await call(app, "GET", "/a path with spaces"))[0] == 404
        assert (await call(app, "GET", "/tunnel/\u00e9t\u00e9", root_path="/tunnel"))[0] == 404
        await app.shutdown()

    run(main)


def test_a_pull_the_server_cannot_write_ends_the_session() -> None:
    """A send() not done within pull_write_timeout: the client stopped reading."""

    async def main() -> None:
        ended = asyncio.Event()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
            ended.set()

        app = PHTApp(echo, pull_write_timeout=0.05, shutdown_timeout=0)

        async def receive() -> Message:
            await asyncio.Event().wait()  # no disconnect: the client is there, not reading
            raise AssertionError

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()  # the ASGI server's buffer stays full

        pull = asyncio.get_running_loop().create_task(
            app(http_scope("GET", "/pull", query=b"token=sessiontoken9"), receive, send)
        )
        assert await send_push(app, "sessiontoken9", b"x") == 200
        await pull  # the pull gave up, without a last chunk...
        await ended.wait()  # ...and the session ended: the callback read EOF
        assert (await call(app, "GET", "/pull", query=b"token=sessiontoken9"))[0] == 403
        await app.shutdown()

    run(main)
