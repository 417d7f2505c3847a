"""The ASGI adapter: :class:`PHTApp`, PHT served by any ASGI server or framework.

Each HTTP request the ASGI server hands over is one PHT request (authorize,
push or pull). Its method, path and headers go to the core's
:class:`~pht._server.ServerConnection` as the HTTP/1.1 head they stand for,
and its body as it comes from ``receive()``: so the core routes it, decodes
the push line piece by piece, and picks every refusal status, exactly as
for :func:`pht.serve_pht`. The server core (:class:`~pht._server_core.ServerCore`
over :class:`~pht._server_session.ServerSessions`) decides the rest:
admission, acknowledgement only once the callback consumed the bytes (else
``410``), pull replacement, heartbeats, expiry, draining. The callback gets
asyncio's own streams over a :class:`~pht._asyncio_common.PHTTransport`.

What an ASGI application cannot do is the ASGI server's: the connections
(per-address connection budgets, request and keep-alive timeouts, TLS).
Sessions live in one process: see ``docs/asgi.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from ._asyncio_common import DEFAULT_LIMIT, PHTTransport, open_streams
from ._codec import encode_lines
from ._errors import RemoteProtocolError
from ._events import (
    NEED_DATA,
    PullRequest,
    PushData,
    PushRequest,
    ServerConnectionState,
)
from ._server import PULL_LINE_DATA, ServerConnection
from ._server_core import (
    PULL_PROGRESS,
    PullAction,
    ServerCore,
    SessionBuffers,
    ShutdownReport,
    format_peer,
    short_token,
)
from ._server_session import (
    AppSettings,
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
)
from ._stats import PHTStatsSink
from ._token import TokenSource, new_token

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PHTApp"]

T = TypeVar("T")

log = logging.getLogger("pht.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ClientConnected = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object] | object
]

#: Raw bytes written per pull message. Each message must be taken by the
#: ASGI server within ``pull_write_timeout``: a client reading at least this
#: much per timeout (4.3 KiB/s by default) keeps its pull.
_PULL_WRITE_SIZE = 4 * PULL_PROGRESS
#: Request headers that only frame the request on its own connection: the
#: ASGI server has read the body by them already.
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"content-length",
        b"expect",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
#: Characters a request target's path may carry as they are (RFC 3986 pchar and "/").
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
#: Options that belong to the ASGI server, which owns the connections.
_SERVER_OWNED = {
    "max_connections_per_address": "limit connections in the ASGI server or the proxy in front",
    "request_timeout": "set the ASGI server's own timeouts",
    "keepalive_timeout": "set the ASGI server's keep-alive timeout",
    "host": "the ASGI server listens",
    "port": "the ASGI server listens",
    "tls": "the ASGI server (or the proxy in front) terminates TLS",
}


class _Stream(SessionBuffers):
    """One session: the core's buffers, and the asyncio transport the callback's streams use.

    Pushed bytes go from the buffers to the callback's StreamReader while it
    reads (``pause_reading`` stops them): what the reader took counts as
    consumed. The callback's writes go into the buffers, for the pull.
    """

    __slots__ = ("finished_event", "peername", "pull_ready", "pushes", "transport")

    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        super().__init__(session, remote_address, max_buffered)
        self.peername: tuple[str, int] | None = None
        self.transport: _Transport | None = None  # once the callback starts
        self.pushes = asyncio.Event()  # bytes taken: a push's verdict may have changed
        self.pull_ready = asyncio.Event()  # outbound bytes, the end, or a heartbeat due
        self.finished_event = asyncio.Event()

    def _wake_reader(self) -> None:
        self.deliver()

    def _wake_pushes(self) -> None:
        self.pushes.set()

    def _wake_pull(self) -> None:
        self.pull_ready.set()

    def _wake_sender(self) -> None:
        if self.transport is not None:
            self.transport.room_changed()

    def _wake_finished(self) -> None:
        self.finished_event.set()
        if self.transport is not None:
            self.transport.lose(None)  # the reader sees EOF, wait_closed() returns

    @property
    def queued_size(self) -> int:
        """Bytes the callback wrote that the pull has not taken yet."""
        return len(self._outbound)

    def deliver(self) -> None:
        """Give the reader pushed bytes while it takes them."""
        transport = self.transport
        if transport is None:
            return  # the callback has not started yet
        while self.readable and transport.is_reading():
            transport.deliver(self.take(DEFAULT_LIMIT))


class _Transport(PHTTransport):
    """A session's :class:`PHTTransport` whose writes go into the core's buffers.

    The writer is paused while the buffers have no room for the callback
    (``max_buffered``; less before the first pull), so ``drain()`` waits for
    the pull to make room; ``close()`` lets the pull deliver what is queued.
    """

    def __init__(self, stream: _Stream, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(
            loop,
            extra={
                "pht_token": stream.token,
                "peername": stream.peername,
                "pht_remote_address": stream.remote_address,
            },
        )
        self.stream = stream
        self._room_paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        stream = self.stream
        if self.is_closing() or not isinstance(data, (bytes, bytearray, memoryview)):
            super().write(data)  # its type check, or dropped (and counted) as asyncio does
            return
        if len(data) and not stream.session.closed:
            stream.queue(data)
            stream._wake_pull()
            self.room_changed()

    def get_write_buffer_size(self) -> int:
        return self.stream.queued_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.stream.room, self.stream.room

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raise NotImplementedError(
            "a PHT session's write buffer is the PHTApp's max_buffered option"
        )

    def resume_reading(self) -> None:
        super().resume_reading()
        self.stream.deliver()

    def room_changed(self) -> None:
        """Pause or resume the writer as the buffers' room says."""
        full = self.stream.must_wait_room
        if full == self._room_paused:
            return
        self._room_paused = full
        protocol = self.get_protocol()
        if isinstance(protocol, asyncio.Protocol) and not self.lost:
            if full:
                protocol.pause_writing()
            else:
                protocol.resume_writing()

    def _close_requested(self) -> None:
        self.stream.close_handler()  # the pull delivers what is queued, then it is lost


class _Pull:
    """One pull response in progress (the identity the session machine keeps)."""

    __slots__ = ("hung_up", "replaced", "stalled", "stream")

    def __init__(self, stream: _Stream) -> None:
        self.stream = stream
        self.hung_up = False  # http.disconnect: the client went away
        self.replaced = False  # a newer pull took over
        self.stalled = False  # a write was not taken within pull_write_timeout


class _Core(ServerCore[_Stream]):
    """The app's sessions, handlers, heartbeats and expiry, on one event loop."""

    def __init__(
        self,
        callback: ClientConnected,
        options: ServerOptions,
        sessions: ServerSessions[_Stream],
        stats: PHTStatsSink | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(options, sessions, _Stream, stats)
        self.callback = callback
        self.loop = loop
        self.handlers: set[asyncio.Task[None]] = set()
        self.beat_added = asyncio.Event()
        self.tasks = [
            loop.create_task(self._run_reaper()),
            loop.create_task(self._run_heartbeats()),
        ]

    def _start_handler(self, stream: _Stream) -> None:
        transport = stream.transport = _Transport(stream, self.loop)
        reader, writer = open_streams(transport)
        stream.deliver()
        task = self.loop.create_task(self._run_handler(stream, reader, writer))
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _run_handler(
        self, stream: _Stream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = self.loop
        started = loop.time()
        self.handler_started(stream)
        try:
            result = self.callback(reader, writer)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # One broken callback must not take the other tunnels down.
            log.exception("callback for session %s raised", short_token(stream.token))
        finally:
            writer.close()
            # Give the pull a moment to deliver what the callback wrote last.
            with contextlib.suppress(asyncio.TimeoutError):
                await _within(stream.finished_event.wait(), self.linger(stream))
            self.handler_done(stream, loop.time(), started)

    async def _run_reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            for _ in self.reap(self.loop.time()):
                await asyncio.sleep(0)  # thousands expiring: let the tunnels run

    async def _run_heartbeats(self) -> None:
        wheel, loop = self.wheel, self.loop
        while True:
            self.beat_added.clear()
            await _wait(self.beat_added, wheel.next_deadline(), loop)
            for pull in wheel.due(loop.time()):
                assert isinstance(pull, _Pull)
                pull.stream._wake_pull()

    async def shutdown(self) -> ShutdownReport:
        timeout = self.options.shutdown_timeout
        for task in self.tasks:
            task.cancel()
        at_start = self.drain()
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=timeout)
        cut = self.cut(self.loop.time())
        if self.handlers:
            await asyncio.wait(set(self.handlers), timeout=min(timeout, 5.0))
        return ShutdownReport(finished=max(len(at_start) - len(cut), 0), cut=cut)


class PHTApp:
    """An ASGI 3 application that serves PHT tunnels.

    ``client_connected_cb(reader, writer)`` runs once per session, as for
    :func:`asyncio.start_server`: ``reader`` and ``writer`` are asyncio's own
    :class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` (the
    session's token is ``writer.get_extra_info("pht_token")``). The keyword
    arguments are :func:`pht.serve_pht`'s (:class:`pht.AppSettings`, or one
    ``options=``), less those that belong to the ASGI server (host, port,
    TLS, connection budgets and timeouts): passing one of those raises
    :class:`TypeError` saying where it belongs.

    Paths are relative to where the app is mounted: under ``/tunnel`` it
    answers ``/tunnel/authorize``, ``/tunnel/push`` and ``/tunnel/pull``.
    Lifespan events are handled when the app is the ASGI server's own;
    mounted in a framework, pass :meth:`lifespan` to it (or call
    :meth:`shutdown`), so that a shutdown closes the sessions.

    One app serves one event loop; its sessions live in its process.
    """

    def __init__(
        self,
        client_connected_cb: ClientConnected,
        *,
        token_source: TokenSource = new_token,
        stats: PHTStatsSink | None = None,
        options: ServerOptions | None = None,
        **settings: Unpack[AppSettings],
    ) -> None:
        for name in sorted(settings):
            why = _SERVER_OWNED.get(name)
            if why is not None:
                raise TypeError(f"PHTApp() does not take {name!r}: {why}")
        if not callable(client_connected_cb):
            raise TypeError("client_connected_cb must be a callable taking (reader, writer)")
        self._callback = client_connected_cb
        #: The validated options (the same object every pht server builds).
        self.options = ServerOptions.resolve("PHTApp", options, settings)
        self._sessions: ServerSessions[_Stream] = ServerSessions(self.options, token_source)
        self._stats = stats
        self._core: _Core | None = None
        self._report: ShutdownReport | None = None

    # -- ASGI ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # PHT is plain HTTP
        else:
            raise ValueError(f"PHTApp cannot serve ASGI scope type {kind!r}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._bind()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """The app's life inside a framework's: ``Starlette(lifespan=pht_app.lifespan)``.

        Frameworks do not pass their lifespan events on to mounted apps; this
        context manager does what those events would: :meth:`shutdown` on exit.
        """
        self._bind()
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> ShutdownReport:
        """End the sessions, gracefully; the lifespan shutdown calls it.

        New sessions are refused with ``503`` from now on; open ones may
        finish for up to ``shutdown_timeout`` seconds, then the rest are
        closed (their callbacks see EOF). Calling it again returns the
        first call's report.
        """
        if self._report is not None:
            return self._report
        self._sessions.drain()
        core = self._core
        report = ShutdownReport(finished=0, cut=()) if core is None else await core.shutdown()
        self._report = report
        return report

    def _bind(self) -> _Core:
        """The core on the event loop this app serves (the first one it ran on)."""
        loop = asyncio.get_running_loop()
        core = self._core
        if core is None:
            core = self._core = _Core(
                self._callback, self.options, self._sessions, self._stats, loop
            )
            core.stats.enable_pht()
        elif core.loop is not loop:
            raise RuntimeError(
                "this PHTApp already serves another event loop: its sessions live in one"
                " loop; make one PHTApp per loop (per worker process)"
            )
        return core

    # -- one request --------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        core = self._bind()
        loop = core.loop
        conn = core.new_connection()
        head, chunked = _request_head(scope)
        conn.receive_data(head)
        client = scope.get("client")
        peer = _peer_name(client)
        more_body = True
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                await _answer(send, core.bad_http(conn, exc.status_hint, peer, exc))
                return
            if event is NEED_DATA:
                if conn.state is not ServerConnectionState.IDLE:
                    return
                if not more_body:
                    conn.receive_data(b"")  # the body ended short of its length
                    continue
                message = await receive()
                if message["type"] != "http.request":
                    return  # http.disconnect: nobody to answer
                body = message.get("body", b"")
                more_body = message.get("more_body", False)
                if chunked:
                    if body:
                        conn.receive_data(b"%x\r\n%s\r\n" % (len(body), body))
                    if not more_body:
                        conn.receive_data(b"0\r\n\r\n")
                elif body:
                    conn.receive_data(body)
                continue
            if type(event) is PushData:
                # A piece of a long push line: deliver it, read on.
                core.piece_delivered(conn, await self._deliver(core, event, conn, peer, client))
                continue
            if isinstance(event, PushRequest):
                status = await self._deliver(core, event, conn, peer, client)
                await _answer(send, core.push_answer(conn, status))
            elif isinstance(event, PullRequest):
                await self._pull(core, conn, event, peer, client, receive, send)
            else:  # authorize, close, or a request refused: nothing to wait for
                await _answer(send, core.answer(conn, event, peer, loop.time()))
            return

    async def _deliver(
        self,
        core: _Core,
        event: PushRequest | PushData,
        conn: ServerConnection,
        peer: str | None,
        client: Any,
    ) -> int:
        """Hand a push's bytes to its session: the status to answer (200, 410 or a refusal)."""
        loop = core.loop
        push = core.push(event, conn, peer, loop.time())
        if isinstance(push, int):
            return push
        stream = push.stream
        assert isinstance(stream, _Stream)
        _note_peer(stream, client)
        while (verdict := push.step(loop.time())) is PushVerdict.WAIT:
            stream.pushes.clear()
            await _wait(stream.pushes, push.deadline, loop)
        return core.push_over(push, verdict, loop.time())

    async def _pull(
        self,
        core: _Core,
        conn: ServerConnection,
        event: PullRequest,
        peer: str | None,
        client: Any,
        receive: Receive,
        send: Send,
    ) -> None:
        loop = core.loop
        stream = core.pull_for(conn, event, peer, loop.time())
        if isinstance(stream, int):
            await _answer(send, conn.send_status(core.refused(stream)))
            return
        _note_peer(stream, client)
        pull = _Pull(stream)
        replaced, start = core.attach_pull(stream, pull, loop.time())
        if isinstance(replaced, _Pull):
            replaced.replaced = True  # a newer long poll replaces a stale one
            stream._wake_pull()
        status, headers, _ = _split_response(conn.start_pull())
        watcher = loop.create_task(_watch_for_hangup(receive, pull))
        timer = None
        complete = False
        try:
            start_message = {"type": "http.response.start", "status": status, "headers": headers}
            await self._send_pull(send, pull, start_message)
            timer, wake = core.pull_started(stream, pull, start)
            if wake:
                core.beat_added.set()
            complete = await self._feed_pull(core, stream, pull, send)
        except asyncio.CancelledError:
            pull.hung_up = True  # the ASGI server gave up on this request
            raise
        except OSError as exc:  # the ASGI server could not write: the client is gone
            log.debug("pull of session %s: %s", short_token(stream.token), exc)
            pull.hung_up = True
        finally:
            watcher.cancel()
            core.pull_over(
                stream, pull, timer, hung_up=pull.hung_up, stalled=pull.stalled, now=loop.time()
            )
        if not complete:
            # No last chunk: returning now makes the ASGI server cut the
            # response, so the client sees an error, never a clean end.
            log.debug("pull of session %s cut", short_token(stream.token))

    async def _feed_pull(self, core: _Core, stream: _Stream, pull: _Pull, send: Send) -> bool:
        """Write the session's bytes, heartbeats and the end; whether it ended cleanly."""
        loop, session = core.loop, stream.session
        while True:
            if pull.hung_up or pull.replaced or pull.stalled:
                return False
            action = stream.pull_action(loop.time())
            if action is PullAction.WRITE:
                data = stream.take_outbound(_PULL_WRITE_SIZE)
                await self._send_pull(send, pull, _body(encode_lines(data, PULL_LINE_DATA)))
                session.wrote(loop.time())
                core.sessions.touch(session, session.last_write)
            elif action is PullAction.HEARTBEAT:
                await self._send_pull(send, pull, _body(b"\n"))
            elif action is PullAction.END:
                await self._send_pull(send, pull, {"type": "http.response.body", "body": b""})
                return not pull.stalled
            elif action is PullAction.CUT:
                return False  # pushed bytes were refused: never a clean end
            else:
                stream.pull_ready.clear()
                await _wait(stream.pull_ready, stream.pull_deadline(), loop)

    async def _send_pull(self, send: Send, pull: _Pull, message: Message) -> None:
        """Send a pull message; one not taken within pull_write_timeout stalls the pull."""
        try:
            await _within(send(message), self.options.pull_write_timeout)
        except asyncio.TimeoutError:
            pull.stalled = True


# --- helpers -------------------------------------------------------------------------


async def _wait(event: asyncio.Event, deadline: float, loop: asyncio.AbstractEventLoop) -> None:
    """Wait until ``event`` is set or the loop's clock reaches ``deadline``."""
    if deadline == math.inf:
        await event.wait()
        return
    timer = loop.call_at(deadline, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


async def _within(awaitable: Awaitable[T], timeout: float) -> T:
    """``awaitable``'s result, or :class:`asyncio.TimeoutError` after ``timeout`` seconds."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            return await awaitable
    return await asyncio.wait_for(awaitable, timeout)  # a task per call: Python 3.10 only


async def _watch_for_hangup(receive: Receive, pull: _Pull) -> None:
    """Notice at once when a pulling client goes away (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    pull.hung_up = True
    pull.stream._wake_pull()


def _body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (as Starlette's ``Mount`` gives it)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        path = path[len(root) :]
    return path or "/"


def _request_head(scope: Scope) -> tuple[bytes, bool]:
    """The HTTP/1.1 head the request stands for, and whether its body is framed as chunks.

    The body's length (or its chunking) is the one the ASGI server read it
    by; the other headers are the client's, so that the core sees what
    :func:`pht.serve_pht` would (``Host``, ``Content-Type``, ``X-Forwarded-For``...).
    """
    method: str = scope["method"]
    # ASGI paths are percent-decoded: encoded again, they make a request
    # target that routes the same (a path with a space is a 404, not a 400).
    target = quote(_route_path(scope), safe=_PATH_SAFE).encode("ascii")
    query: bytes = scope.get("query_string", b"")
    if query:
        target += b"?" + query
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target)]
    host = False
    length = None
    chunked = False
    for name, value in scope.get("headers", ()):
        name = bytes(name).lower()
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
        if name in _HOP_BY_HOP:
            continue
        if name == b"host":
            host = True
        lines.append(b"%s: %s\r\n" % (name, bytes(value)))
    if not host:
        lines.append(b"host: %s\r\n" % _host_of(scope))
    if length is not None and not chunked:
        lines.append(b"content-length: %s\r\n" % bytes(length))
    elif chunked or (method not in ("GET", "HEAD") and scope.get("http_version") in ("2", "3")):
        # A body of unknown length: framed as chunks for the core, as it came.
        chunked = True
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked


def _host_of(scope: Scope) -> bytes:
    server = scope.get("server")
    if server and server[1] is not None:
        return f"{server[0]}:{server[1]}".encode("idna")
    return b"localhost"


def _note_peer(stream: _Stream, client: Any) -> None:
    """Keep the address of a session's first request (``peername`` for the callback)."""
    if stream.peername is None and client:
        stream.peername = (client[0], client[1])
        if stream.transport is not None:  # started by this request, not running yet
            stream.transport.set_extra(peername=stream.peername)


def _peer_name(client: Any) -> str | None:
    """``host:port`` (``[v6]:port``) of the client, as the core's admission takes it."""
    return format_peer(client[0], client[1]) if client else None


def _split_response(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a response the core wrote as HTTP/1.1 bytes.

    The framing headers are left to the ASGI server, which frames the body
    for its own connection (chunked, HTTP/2 frames...).
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = head.split(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    headers = []
    for field in fields:
        name, _, value = field.partition(b":")
        name = name.strip().lower()
        if name not in (b"transfer-encoding", b"connection"):
            headers.append((name, value.strip()))
    return status, headers, body


async def _answer(send: Send, raw: bytes) -> None:
    """Send a whole response the core wrote."""
    status, headers, body = _split_response(raw)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
