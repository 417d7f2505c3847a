"""The ASGI adapter: :class:`PHTApp`, PHT served by any ASGI server or framework.

Each HTTP request the ASGI server hands over is one PHT request (authorize,
push or pull). Its method, path and headers are given to the core's
:class:`~pht._server.ServerConnection` as the HTTP/1.1 head they stand for,
and its body as it comes from ``receive()``: so the core routes it, decodes
the push line piece by piece, and picks every refusal status, exactly as
for :func:`pht.serve_pht`. The core's session machine
(:class:`~pht._server_session.ServerSessions`) decides the rest: admission,
acknowledgement only once the callback consumed the bytes (else ``410``),
pull replacement, heartbeats, expiry, draining.

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
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

from ._codec import encode_lines
from ._errors import RemoteProtocolError
from ._events import (
    NEED_DATA,
    AuthorizeRequest,
    BadRequest,
    CloseRequest,
    PullRequest,
    PushData,
    PushRequest,
    ServerConnectionState,
)
from ._server import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_PUSH_LINE,
    PULL_LINE_DATA,
    ServerConnection,
)
from ._server_session import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_PENDING_PER_ADDRESS,
    DEFAULT_MAX_SESSIONS_PER_ADDRESS,
    Input,
    Network,
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
)
from ._stats import NullStats, PHTStatsSink
from ._token import TokenSource, new_token

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

#: Bytes a callback may queue before the session's first pull attaches.
_UNPULLED_ROOM = 16 * 1024
#: Pushed bytes handed to the callback's StreamReader at a time: with the
#: reader's own flow control, at most about twice its limit plus this wait
#: in its buffer (the rest waits here, unacknowledged).
_DELIVER_PIECE = 64 * 1024
#: Raw bytes written per pull message.
_PULL_WRITE_SIZE = 256 * 1024
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
#: Options that belong to the ASGI server, which owns the connections.
_SERVER_OWNED = {
    "max_connections_per_address": "limit connections in the ASGI server or the proxy in front",
    "request_timeout": "set the ASGI server's own timeouts",
    "keepalive_timeout": "set the ASGI server's keep-alive timeout",
    "host": "the ASGI server listens",
    "port": "the ASGI server listens",
    "tls": "the ASGI server (or the proxy in front) terminates TLS",
}


class _SessionTransport(asyncio.Transport):
    """The callback's end of one session: asyncio's StreamReader and StreamWriter sit on it.

    Pushed bytes go to the reader through its protocol, a piece at a time
    and only while the reader does not ask to pause: what the reader took
    counts as consumed for the session machine. Written bytes wait here for
    the session's pull; past ``max_buffered`` the writer is paused, so that
    ``drain()`` waits for the pull to make room.
    """

    def __init__(
        self,
        session: ServerSession[_SessionTransport],
        loop: asyncio.AbstractEventLoop,
        peer: tuple[str, int] | None,
        remote_address: str | None,
        max_buffered: int,
    ) -> None:
        super().__init__(
            {"pht_token": session.token, "peername": peer, "pht_remote_address": remote_address}
        )
        self.session = session
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        # client -> callback
        self._inbound: deque[bytes] = deque()
        self._inbound_offset = 0
        self._reading_paused = False
        #: Set when the callback took pushed bytes (or will take none).
        self.consumed = asyncio.Event()
        # callback -> client
        self._outbound = bytearray()
        self._full_room = max_buffered
        self._room = min(max_buffered, _UNPULLED_ROOM)
        self._writing_paused = False
        #: Set when the pull has something to do (bytes, an end, a wake-up).
        self.outbound_ready = asyncio.Event()
        # life
        self._closing = False  # close() by the callback
        self._lost = False  # connection_lost() delivered
        #: Set when nothing more goes to or comes from the client.
        self.finished = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0

    # -- asyncio.BaseTransport ----------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """The callback is done with the session: what it wrote still goes out."""
        if self._closing:
            return
        self._closing = True
        self.consumed.set()  # a waiting push is refused: nobody will read it
        self.outbound_ready.set()
        if not self._outbound:
            self._finish()

    # -- asyncio.ReadTransport ----------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self.is_closing()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._deliver()

    # -- asyncio.WriteTransport ---------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}")
        if self._closing or self._lost:
            return  # as asyncio's socket transports do once the connection is lost
        if not len(data):
            return
        self._outbound += data
        self.bytes_out += len(data)
        self.outbound_ready.set()
        if not self._writing_paused and len(self._outbound) >= self._room:
            self._writing_paused = True
            protocol = self._protocol
            if isinstance(protocol, asyncio.Protocol):
                protocol.pause_writing()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # PHT has no half-close: either side's end closes both directions

    def write_eof(self) -> None:
        raise NotImplementedError("PHT has no half-close; close() ends the session")

    def abort(self) -> None:
        self._outbound.clear()
        self.close()
        self._finish()

    def get_write_buffer_size(self) -> int:
        return len(self._outbound)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, self._room)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            if high < 1:
                raise ValueError("high must be at least 1")
            self._full_room = high
            self._room = min(self._room, high)

    # -- called by the app ------------------------------------------------------------

    def attach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The reader and writer the callback gets, on this transport."""
        reader = asyncio.StreamReader(loop=self._loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
        self._protocol = protocol
        protocol.connection_made(self)
        writer = asyncio.StreamWriter(self, protocol, reader, self._loop)
        self._deliver()
        return reader, writer

    async def deposit(self, data: bytes) -> bool:
        """Hand pushed bytes to the callback and wait for the session machine's verdict.

        Returns ``True`` to acknowledge the push, ``False`` to refuse it
        (410): not consumed within push_timeout, or the session ended.
        """
        session = self.session
        if self._closing or session.closed:
            return False
        if not data:
            return True
        loop = self._loop
        session.wait_for_push(loop.time())
        goal = None
        while True:
            now = loop.time()
            if goal is None and session.may_deposit():
                self._inbound.append(data)
                self.bytes_in += len(data)
                goal = session.deposit(len(data), now)
                self._deliver()
            verdict = session.verdict(session.deposited if goal is None else goal, now)
            if verdict is PushVerdict.WAIT and (self._closing or self._lost):
                verdict = PushVerdict.GONE  # nobody will take them
            if verdict is PushVerdict.WAIT:
                self.consumed.clear()
                await _wait(self.consumed, session.push_deadline, loop)
                continue
            if verdict is PushVerdict.GONE and goal is not None:
                # Pushes take turns, so all that is queued is this push's.
                self._inbound.clear()
                self._inbound_offset = 0
            session.push_over(verdict)
            return verdict is PushVerdict.ACK and goal is not None

    def _deliver(self) -> None:
        """Give the reader pushed bytes while it takes them."""
        protocol = self._protocol
        if not isinstance(protocol, asyncio.Protocol):
            return  # the callback has not started yet
        inbound = self._inbound
        while inbound and not self._reading_paused and not self._lost:
            head = inbound[0]
            start = self._inbound_offset
            end = start + _DELIVER_PIECE
            if end >= len(head):
                inbound.popleft()
                self._inbound_offset = 0
                piece = head[start:] if start else head
            else:
                piece = head[start:end]
                self._inbound_offset = end
            self.session.took(len(piece))
            protocol.data_received(piece)
            self.consumed.set()

    @property
    def has_outbound(self) -> bool:
        return bool(self._outbound)

    def take_outbound(self, limit: int) -> bytes:
        """Up to ``limit`` written bytes, for the pull."""
        data = bytes(self._outbound[:limit])
        del self._outbound[:limit]
        if self._writing_paused and len(self._outbound) < self._room:
            self._writing_paused = False
            protocol = self._protocol
            if isinstance(protocol, asyncio.Protocol):
                protocol.resume_writing()
        if not self._outbound and self._closing:
            self._finish()
        return data

    def pull_attached(self) -> None:
        """A pull is attached: the callback may queue up to ``max_buffered`` now."""
        if self._room < self._full_room:
            self._room = self._full_room
            if self._writing_paused and len(self._outbound) < self._room:
                self._writing_paused = False
                protocol = self._protocol
                if isinstance(protocol, asyncio.Protocol):
                    protocol.resume_writing()

    def close_from_client(self) -> None:
        """Its machine ended the session: EOF for the callback, nothing more goes out."""
        self._outbound.clear()
        self._inbound.clear()
        self._inbound_offset = 0
        self._finish()

    def _finish(self) -> None:
        """Nothing more moves: the reader sees EOF, ``drain()`` and ``wait_closed()`` return."""
        self.finished.set()
        self.outbound_ready.set()
        self.consumed.set()
        if self._lost:
            return
        self._lost = True
        protocol = self._protocol
        if protocol is not None:
            # As asyncio's transports do: never from inside the caller's call.
            self._loop.call_soon(protocol.connection_lost, None)


class _Pull:
    """One pull response in progress (the identity the session machine keeps)."""

    __slots__ = ("hung_up", "replaced", "stalled")

    def __init__(self) -> None:
        self.hung_up = False  # http.disconnect: the client went away
        self.replaced = False  # a newer pull took over
        self.stalled = False  # a write made no progress in pull_write_timeout


class PHTApp:
    """An ASGI 3 application that serves PHT tunnels.

    ``client_connected_cb(reader, writer)`` runs once per session, as for
    :func:`asyncio.start_server`: ``reader`` and ``writer`` are an
    :class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` (the
    session's token is ``writer.get_extra_info("pht_token")``). The keyword
    arguments are :func:`pht.serve_pht`'s, less those that belong to the
    ASGI server (host, port, TLS, connection budgets and timeouts).

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
        authorize_path: str = "/authorize",
        push_path: str = "/push",
        pull_path: str = "/pull",
        backlog: int = 128,
        heartbeat_interval: float = 10.0,
        strict: bool = False,
        max_sessions: int = 10_000,
        max_sessions_per_address: int | None = DEFAULT_MAX_SESSIONS_PER_ADDRESS,
        max_pending_per_address: int | None = DEFAULT_MAX_PENDING_PER_ADDRESS,
        trusted_proxies: Iterable[str | Network] = (),
        idle_timeout: float | None = 600.0,
        issued_timeout: float = 60.0,
        lazy_timeout: float = 10.0,
        push_timeout: float = 30.0,
        pull_write_timeout: float = 60.0,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_push_line: int = DEFAULT_MAX_PUSH_LINE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        shutdown_timeout: float = 30.0,
        token_source: TokenSource = new_token,
        stats: PHTStatsSink | None = None,
        **server_owned: object,
    ) -> None:
        if server_owned:
            name = sorted(server_owned)[0]
            why = _SERVER_OWNED.get(name)
            if why is None:
                raise TypeError(f"PHTApp() got an unexpected keyword argument {name!r}")
            raise TypeError(f"PHTApp() does not take {name!r}: {why}")
        if not callable(client_connected_cb):
            raise TypeError("client_connected_cb must be callable (reader, writer)")
        self._callback = client_connected_cb
        #: The validated options (the same object every pht server builds).
        self.options = ServerOptions.build(
            authorize_path=authorize_path,
            push_path=push_path,
            pull_path=pull_path,
            trusted_proxies=trusted_proxies,
            backlog=backlog,
            heartbeat_interval=heartbeat_interval,
            strict=strict,
            max_sessions=max_sessions,
            max_sessions_per_address=max_sessions_per_address,
            max_pending_per_address=max_pending_per_address,
            idle_timeout=idle_timeout,
            issued_timeout=issued_timeout,
            lazy_timeout=lazy_timeout,
            push_timeout=push_timeout,
            pull_write_timeout=pull_write_timeout,
            max_buffered=max_buffered,
            max_push_line=max_push_line,
            max_header_size=max_header_size,
            shutdown_timeout=shutdown_timeout,
        )
        self._sessions: ServerSessions[_SessionTransport] = ServerSessions(
            self.options, token_source
        )
        self._stats: PHTStatsSink = stats if stats is not None else NullStats()
        self._stats.enable_pht()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._handlers: dict[asyncio.Task[None], _SessionTransport] = {}
        self._shut_down = False

    # -- ASGI ---------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
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

        A framework does not pass its lifespan events to mounted apps; this
        context manager is what they would have done: on exit, :meth:`shutdown`.
        """
        self._bind()
        try:
            yield
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """End the sessions, gracefully.

        New sessions are refused with ``503`` from now on; open ones may
        finish for up to ``shutdown_timeout`` seconds, then the rest are
        closed (their callbacks see EOF). Called on lifespan shutdown.
        """
        if self._shut_down:
            return
        self._shut_down = True
        self._sessions.drain()
        if self._reaper is not None:
            self._reaper.cancel()
        timeout = self.options.shutdown_timeout
        handlers = set(self._handlers)
        if handlers:
            log.info(
                "shutting down: %d sessions open, waiting up to %.1fs", len(handlers), timeout
            )
            await asyncio.wait(handlers, timeout=timeout)
        cut = [transport for task, transport in self._handlers.items() if not task.done()]
        for transport in cut:
            transport.session.end(Input.SHUTDOWN)
            self._end_session(transport)
        if cut:
            log.warning("shutdown cut %d sessions", len(cut))
            await asyncio.wait(set(self._handlers), timeout=min(timeout, 5.0))

    def _bind(self) -> asyncio.AbstractEventLoop:
        """The event loop this app serves (the first one it ran on)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            if not self._shut_down:
                self._reaper = loop.create_task(self._reap())
        elif self._loop is not loop:
            raise RuntimeError(
                "this PHTApp already serves another event loop: its sessions live in one"
                " loop; make one PHTApp per loop (per worker process)"
            )
        return loop

    # -- one request --------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = self._bind()
        options = self.options
        conn = ServerConnection(
            options.paths,
            max_push_line=options.max_push_line,
            max_header_size=options.max_header_size,
        )
        head, chunked = _request_head(scope)
        conn.receive_data(head)
        client = scope.get("client")
        peer = _peer_name(client)
        more_body = True
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                log.info("bad request from %s: %s", peer, exc)
                await _answer(send, self._refusal(conn, exc.status_hint))
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
                status = await self._deliver(event, conn, peer, client, loop)
                if status != 200:
                    self._stats.refused(status)
                    reason = "push not consumed in time" if status == 410 else "push refused"
                    conn.discard_push(status, reason)
                continue
            if isinstance(event, PushRequest):
                status = await self._deliver(event, conn, peer, client, loop)
                if status == 200:
                    self._stats.push()
                    await _answer(send, conn.send_push_ack())
                else:
                    await _answer(send, self._refusal(conn, status))
            elif isinstance(event, PullRequest):
                await self._pull(conn, event, peer, client, loop, receive, send)
            elif isinstance(event, CloseRequest):
                log.debug("session %s: %s", _short(event.token), event.reason)
                self._close_token(event.token, loop.time())
                await _answer(send, conn.send_push_ack())
            elif isinstance(event, AuthorizeRequest):
                owner = self._sessions.client_of(peer, conn.forwarded_for)[0]
                token = self._sessions.authorize(loop.time(), owner)
                if isinstance(token, str):
                    await _answer(send, conn.send_token(token))
                else:
                    await _answer(send, self._refusal(conn, token))
            elif isinstance(event, BadRequest):
                log.info(
                    "refused a request from %s (%d): %s", peer, event.status_code, event.reason
                )
                if event.token is not None:
                    self._close_token(event.token, loop.time())
                await _answer(send, self._refusal(conn, event.status_code))
            return

    def _refusal(self, conn: ServerConnection, status: int) -> bytes:
        self._stats.refused(status)
        return conn.send_status(status)

    def _session_for(
        self,
        token: str,
        peer: str | None,
        client: Any,
        conn: ServerConnection,
        loop: asyncio.AbstractEventLoop,
    ) -> _SessionTransport | int:
        """The session a push or pull for ``token`` goes to, or the status to answer."""
        owner, remote_address = self._sessions.client_of(peer, conn.forwarded_for)
        session = self._sessions.admit(token, loop.time(), owner)
        if isinstance(session, int):
            return session
        if session.handle is None:
            session.handle = _SessionTransport(
                session,
                loop,
                tuple(client) if client else None,
                remote_address,
                self.options.max_buffered,
            )
        return session.handle

    async def _deliver(
        self,
        event: PushRequest | PushData,
        conn: ServerConnection,
        peer: str | None,
        client: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> int:
        """Hand a push's bytes to its session: the status to answer (200, 410 or a refusal)."""
        transport = self._session_for(event.token, peer, client, conn, loop)
        if isinstance(transport, int):
            return transport
        if event.data and transport.session.push_data():
            self._start_handler(transport)
        if await transport.deposit(event.data):
            self._sessions.touch(transport.session, loop.time())
            return 200
        # GOST answers 410 when the bytes were not taken in time; the session ends.
        self._end_session(transport)
        return 410

    async def _pull(
        self,
        conn: ServerConnection,
        event: PullRequest,
        peer: str | None,
        client: Any,
        loop: asyncio.AbstractEventLoop,
        receive: Receive,
        send: Send,
    ) -> None:
        transport = self._session_for(event.token, peer, client, conn, loop)
        if isinstance(transport, int):
            await _answer(send, self._refusal(conn, transport))
            return
        session = transport.session
        pull = _Pull()
        replaced, start = self._sessions.attach_pull(session, pull, loop.time())
        if isinstance(replaced, _Pull):
            replaced.replaced = True  # a newer long poll replaces a stale one
            transport.outbound_ready.set()
        status, headers, _ = _split_response(conn.start_pull())
        watcher = loop.create_task(_watch_for_hangup(receive, pull, transport))
        complete = False
        try:
            await self._send_pull(
                send, pull, {"type": "http.response.start", "status": status, "headers": headers}
            )
            self._stats.pull()
            transport.pull_attached()
            if start:
                self._start_handler(transport)
            complete = await self._feed_pull(transport, pull, send, loop)
        except asyncio.CancelledError:
            pull.hung_up = True  # the ASGI server gave up on this request
            raise
        except OSError as exc:  # the ASGI server could not write: the client is gone
            log.debug("pull of session %s: %s", _short(session.token), exc)
            pull.hung_up = True
        finally:
            watcher.cancel()
            ended = session.pull_ended(pull, hung_up=pull.hung_up, stalled=pull.stalled)
            if ended:
                # The client stopped reading, or went away mid-pull and no
                # newer pull took over: the session cannot deliver any more.
                log.debug("session %s: pull %s", _short(session.token), session.ended_by)
                self._end_session(transport)
        if not complete:
            # No last chunk: returning now makes the ASGI server cut the
            # response, so the client sees an error, never a clean end.
            log.debug("pull of session %s cut", _short(session.token))

    async def _feed_pull(
        self,
        transport: _SessionTransport,
        pull: _Pull,
        send: Send,
        loop: asyncio.AbstractEventLoop,
    ) -> bool:
        """Write the session's bytes, heartbeats and the end; whether it ended cleanly."""
        session = transport.session
        while True:
            if pull.hung_up or pull.replaced or pull.stalled:
                return False
            if transport.has_outbound:
                data = transport.take_outbound(_PULL_WRITE_SIZE)
                body = encode_lines(data, PULL_LINE_DATA)
                await self._send_pull(send, pull, _body(body))
                now = loop.time()
                session.wrote(now)
                self._sessions.touch(session, now)
                continue
            if transport.finished.is_set():
                if session.lost_data:
                    return False  # pushed bytes were refused: never a clean end
                await self._send_pull(send, pull, {"type": "http.response.body", "body": b""})
                return not pull.stalled
            now = loop.time()
            if now >= session.heartbeat_due():
                session.wrote(now)
                await self._send_pull(send, pull, _body(b"\n"))
                continue
            transport.outbound_ready.clear()
            await _wait(transport.outbound_ready, session.heartbeat_due(), loop)

    async def _send_pull(self, send: Send, pull: _Pull, message: Message) -> None:
        """Send a pull message; one not taken within pull_write_timeout stalls the pull."""
        try:
            await _within(send(message), self.options.pull_write_timeout)
        except asyncio.TimeoutError:
            pull.stalled = True

    # -- sessions -----------------------------------------------------------------

    def _start_handler(self, transport: _SessionTransport) -> None:
        """Run the callback of ``transport``'s session (the machine said it is time)."""
        loop = transport._loop
        reader, writer = transport.attach()
        task = loop.create_task(self._run_handler(transport, reader, writer))
        self._handlers[task] = transport
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.pop(task, None)

    async def _run_handler(
        self,
        transport: _SessionTransport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = transport._loop
        started = loop.time()
        token = transport.session.token
        self._stats.session_opened()
        log.info(
            "session %s accepted from %s",
            _short(token),
            transport.get_extra_info("pht_remote_address"),
        )
        try:
            result = self._callback(reader, writer)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # One broken callback must not take the other tunnels down.
            log.exception("callback for session %s raised", _short(token))
        finally:
            transport.close()
            # Give the pull a moment to deliver what the callback wrote last.
            with contextlib.suppress(asyncio.TimeoutError):
                await _within(transport.finished.wait(), self.options.push_timeout)
            transport.session.end(Input.HANDLER_DONE)
            self._end_session(transport)
            self._stats.session_closed()
            log.info(
                "session %s closed after %.3fs: %d bytes in, %d bytes out",
                _short(token),
                loop.time() - started,
                transport.bytes_in,
                transport.bytes_out,
            )

    def _end_session(self, transport: _SessionTransport) -> None:
        """Carry out the end of a session its machine has closed."""
        transport.close_from_client()
        self._sessions.forget(transport.session, transport._loop.time())

    def _close_token(self, token: str, now: float, event: Input = Input.CLOSE) -> None:
        """End ``token``'s session, or make sure a late request cannot open one."""
        session = self._sessions.close(token, now, event)
        if session is not None and session.handle is not None:
            session.handle.close_from_client()

    async def _reap(self) -> None:
        """Close sessions idle for too long (and tokens issued and never used)."""
        options = self.options
        interval = max(
            1.0, min(options.issued_timeout, options.heartbeat_interval, options.lazy_timeout / 2)
        )
        loop = asyncio.get_running_loop()
        sessions = self._sessions
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for record in sessions.registry.expired(now):
                if not sessions.expire(record, now):
                    continue  # ended, active again meanwhile, or pulled
                log.info("session %s expired after idling", _short(record.token))
                self._close_token(record.token, now, Input.EXPIRED)


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


async def _watch_for_hangup(receive: Receive, pull: _Pull, transport: _SessionTransport) -> None:
    """Notice at once when a pulling client goes away (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
    pull.hung_up = True
    transport.outbound_ready.set()


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
    target = _route_path(scope).encode("utf-8", "surrogateescape")
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


def _peer_name(client: Any) -> str | None:
    """``host:port`` (``[v6]:port``) of the client, as the core's admission takes it."""
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def _short(token: str) -> str:
    return token[:8] + "…" if len(token) > 10 else token
