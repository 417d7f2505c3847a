"""The asyncio server adapter: :func:`start_pht_server`, shaped like :func:`asyncio.start_server`.

Every rule comes from the server core (:mod:`pht._server_core` and the
session machine beneath it), as in the trio adapter: this module reads
requests, writes the core's answers and waits where the core says. Each
session is a :class:`~pht._asyncio_common.PHTTransport` under asyncio's own
:class:`asyncio.StreamReader` / :class:`asyncio.StreamWriter`, fed by two
pump tasks: pushed bytes go to the reader as the handler's protocol accepts
them (a push is acknowledged once they are in its buffer, GOST's
"consumed"), and what the application writes goes into the core's
outbound buffer for the pull; ``drain()`` returns once the pull wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import select
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from ._asyncio_common import DEFAULT_LIMIT, PHTTransport, open_streams
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    CloseRequest,
    PullRequest,
    PushData,
    PushRequest,
    ServerConnectionState,
)
from ._server import PUSH_PIECE, ServerConnection
from ._server_core import (
    PULL_PROGRESS,
    TEARDOWN_BATCH,
    ConnectionTimer,
    PullAction,
    PullWriteTimer,
    ServerCore,
    SessionBuffers,
    ShutdownReport,
    format_peer,
    server_ssl_context,
    short_token,
)
from ._server_session import (
    Input,
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
    ServerSettings,
    host_of,
)
from ._stats import PHTStatsSink
from ._tls import SelfSignedCertificate
from ._token import TokenSource, new_token

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PHTServer", "start_pht_server"]

log = logging.getLogger("pht.server")

ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]

#: Bytes asked of a connection per read.
_RECEIVE_SIZE = 256 * 1024
_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
_BROKEN = (ConnectionError, OSError, LocalProtocolError)
#: Readable, the peer's end of the connection closed, or an error (Linux).
_HANG_UP_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0
#: Parked connections let back to the loop's reading per turn (see :class:`_HangUps`).
HANG_UP_BATCH = 4


class _Signal:
    """:class:`asyncio.Event`'s ``set``, ``clear`` and ``wait``, a tenth of its size.

    An Event holds a deque (about 600 bytes) from its start; a session has
    five and an idle one waits on two: this holds a list only while a task
    waits, and only one per waiting task.
    """

    __slots__ = ("_flag", "_waiters")

    def __init__(self) -> None:
        self._flag = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        if self._flag:
            return
        self._flag = True
        waiters, self._waiters = self._waiters, None
        if waiters is not None:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self) -> None:
        if self._flag:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)  # cancelled before set()
                if not waiters:
                    self._waiters = None


class _Stream(SessionBuffers):
    """A session's buffers with the core's wake-ups as signals."""

    __slots__ = (
        "consumed",
        "finished_event",
        "inbound_scheduled",
        "outbound_task",
        "pull_event",
        "pull_parked",
        "room_event",
        "started",
        "transport",
    )

    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        super().__init__(session, remote_address, max_buffered)
        self.transport: _SessionTransport | None = None
        self.started = 0.0
        #: The inbound pump is due to run (a callback, not a task).
        self.inbound_scheduled = False
        #: The outbound pump's task, while the application's bytes or close wait for it.
        self.outbound_task: asyncio.Task[None] | None = None
        #: The pull's task waits for something to write (see _PullWriter.beat).
        self.pull_parked = False
        self.consumed = _Signal()
        self.pull_event = _Signal()
        self.room_event = _Signal()
        self.finished_event = _Signal()

    def _wake_reader(self) -> None:
        transport = self.transport
        if transport is not None and not self.inbound_scheduled:
            self.inbound_scheduled = True
            transport.loop.call_soon(_pump_inbound, self)

    def _wake_pushes(self) -> None:
        self.consumed.set()

    def _wake_pull(self) -> None:
        self.pull_event.set()

    def _wake_sender(self) -> None:
        self.room_event.set()

    def _wake_finished(self) -> None:
        self.finished_event.set()
        if self.handler_closed and not self.session.closed and self.transport is not None:
            # The application closed and its last bytes are out: the session
            # ends now, before the pull's last chunk reaches the client (a
            # request it sends next must find the token closed).
            self.transport.session_done()


#: Sessions that start ending per turn of the loop. Each end runs on over a
#: few more turns (the pull, the handler's EOF, the transport), so a turn
#: carries several batches' work, and a mass close's unparked connections
#: (:data:`HANG_UP_BATCH`) come on top: 4 keeps such a turn within a few
#: milliseconds (10,000 tunnels hung up at once: the canary's worst echo
#: 193 ms with 32, 85-106 ms with 8 when both of a tunnel's connections close).
TEARDOWN_PER_TURN = 4


class _Turns:
    """Lets :data:`TEARDOWN_PER_TURN` ends through per turn of the event loop, in order.

    A mass close would otherwise run every session's end in one turn, and
    every other tunnel would wait for all of them. An end is a task that
    awaits :meth:`turn`, or a callback given to :meth:`call` (what a
    connection's protocol hands over when its client hangs up: no task
    wakes for it until its turn).
    """

    __slots__ = ("_left", "_loop", "_scheduled", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._left = TEARDOWN_PER_TURN
        self._waiters: deque[asyncio.Future[None] | Callable[[], None]] = deque()
        self._scheduled = False

    async def turn(self) -> None:
        """Return in this turn of the loop if its batch has room, else in a later one."""
        if self._left > 0 and not self._waiters:
            self._left -= 1
            self._schedule()
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        self._schedule()
        await waiter

    def call(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in a later turn, in order (never in the caller's turn).

        Thousands of calls in one turn (as many hang-ups seen in one poll of
        the sockets) cost a queued callback each until their turns come.
        """
        self._waiters.append(callback)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._left = TEARDOWN_PER_TURN
        waiters = self._waiters
        while waiters and self._left > 0:
            waiter = waiters.popleft()
            if not isinstance(waiter, asyncio.Future):
                self._left -= 1
                try:
                    waiter()
                except Exception:  # the other ends still take their turns
                    log.exception("ending a session failed")
            elif not waiter.done():  # else cancelled while waiting
                waiter.set_result(None)
                self._left -= 1
        if waiters or self._left < TEARDOWN_PER_TURN:
            self._schedule()


class _HangUps:
    """Lets parked pull connections' news reach the loop a batch per turn (Linux).

    The loop reports every ready socket of one poll in one turn: when
    thousands of pulling clients hang up together, uvloop (or asyncio's
    selector loop) reads thousands of ends of file in one turn, tens of
    milliseconds in which no other tunnel moves. So a plain TCP pull's
    connection stops being read by the loop (``pause_reading()``) and sits
    in an epoll set of the server's own instead, which the loop watches as
    one descriptor; each turn lets :data:`HANG_UP_BATCH` of the connections
    that turned readable (an end of file, a reset, a pipelined request) back
    to the loop's reading, where their protocol takes it from there.
    """

    __slots__ = ("_epoll", "_loop", "_parked")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll: Any = select.epoll() if _HANG_UP_EVENTS else None
        #: Parked connections by socket descriptor.
        self._parked: dict[int, _Connection] = {}
        if self._epoll is not None:
            loop.add_reader(self._epoll.fileno(), self._ready)

    def park(self, connection: _Connection, transport: asyncio.Transport) -> int | None:
        """Stop the loop reading ``transport``; its descriptor, or ``None`` if it cannot be."""
        if self._epoll is None or transport.get_extra_info("ssl_object") is not None:
            return None  # TLS reads what it must on its own
        sock = transport.get_extra_info("socket")
        fd = -1 if sock is None else sock.fileno()
        if fd < 0 or not transport.is_reading():
            return None
        transport.pause_reading()
        self._epoll.register(fd, _HANG_UP_EVENTS)
        self._parked[fd] = connection
        return fd

    def unpark(self, fd: int, connection: _Connection) -> None:
        """Stop watching ``fd`` for ``connection`` (before its socket closes)."""
        if self._parked.get(fd) is connection:
            del self._parked[fd]
            with contextlib.suppress(OSError):  # already closed: epoll forgot it
                self._epoll.unregister(fd)

    def _ready(self) -> None:
        # Level-triggered: what is left is reported again in the next turn.
        for fd, _ in self._epoll.poll(0, HANG_UP_BATCH):
            connection = self._parked[fd]
            self.unpark(fd, connection)
            connection.unparked()

    def close(self) -> None:
        """Stop watching: nothing is parked from now on (the server stops)."""
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            self._loop.remove_reader(epoll.fileno())
            epoll.close()
            self._parked.clear()


def _pump_inbound(stream: _Stream) -> None:
    """Pushed bytes to the reader as it accepts them; EOF once the session ended.

    A callback, scheduled by each wake-up of the reader (pushed bytes, the
    session's end, ``resume_reading()``): an idle session has no task for it.
    """
    stream.inbound_scheduled = False
    transport = stream.transport
    if transport is None:
        return
    try:
        while not transport.is_closing():  # else the outbound pump ends the session
            if stream.readable:
                if not transport.is_reading():
                    return  # resume_reading() wakes it
                transport.deliver(stream.take(_RECEIVE_SIZE))
            else:
                if stream.session.closed:
                    transport.deliver_eof()
                    transport.lose(None)
                return
    except Exception as exc:  # as a pump task's exception: the session ends with it
        transport.lose(exc)


async def _wait(event: asyncio.Event | _Signal) -> None:
    event.clear()
    await event.wait()


class _SessionTransport(PHTTransport):
    """The application's transport of one session; its end ends the handler's part."""

    def __init__(self, server: _Server, stream: _Stream, extra: dict[str, Any]) -> None:
        super().__init__(server.loop, extra=extra)
        self._server = server
        self._stream = stream

    def _close_requested(self) -> None:
        if self._stream.session.closed:
            self.lose(None)  # nothing can go out any more
        else:
            self._stream._wake_reader()  # the outbound pump flushes, then ends it

    def session_done(self) -> None:
        """The handler's part is over: end the session's machine at once."""
        self._server.end_handled(self._stream)

    def resume_reading(self) -> None:
        super().resume_reading()
        self._stream._wake_reader()

    def _wake_outbound(self) -> None:
        # Bytes written, or close(): the outbound pump runs until they are
        # handed over (an idle session has no task for it).
        super()._wake_outbound()
        stream = self._stream
        if stream.outbound_task is None and not self.lost:
            stream.outbound_task = self.start_task(
                self._server.outbound(stream, self), name="pht outbound"
            )

    def _connection_lost(self, exc: BaseException | None) -> None:
        super()._connection_lost(exc)
        self._server.session_lost(self._stream)


class _Deadline(ConnectionTimer):
    """A connection's timer: the watchdog parks the idle connection, or ends it."""

    __slots__ = ("fired", "protocol")

    def __init__(self, options: ServerOptions, now: float, protocol: _Connection) -> None:
        super().__init__(options, now, parks=True)
        self.protocol = protocol
        self.fired = False

    def _park(self) -> None:
        self.protocol.park_idle()

    def _close(self) -> None:
        self.fired = True
        protocol = self.protocol
        if protocol.task is not None:
            protocol.task.cancel()
        else:  # parked idle: no task to cancel
            protocol.close()


class _PullWriter(PullWriteTimer):
    """An open pull answer; ``ended`` says why its task was cancelled, if it was."""

    __slots__ = ("conn", "connection", "ended", "loop", "stream", "task")

    def __init__(
        self,
        connection: _Connection,
        stream: _Stream,
        task: asyncio.Task[Any],
        options: ServerOptions,
    ) -> None:
        super().__init__(options.pull_write_timeout)
        self.connection = connection
        self.conn = connection.conn
        self.stream = stream
        self.task = task
        self.loop = task.get_loop()
        self.ended: str | None = None

    def _cancel(self) -> None:
        self.end("stalled")

    def end(self, why: str) -> None:
        """End the pull from outside its task (replaced, hung up, stalled)."""
        if self.ended is None:
            self.ended = why
            self.task.cancel()

    def hang_up(self) -> None:
        """The client went away (or sent more than a request head) while it pulled."""
        self.end("hung up")

    def beat(self, now: float) -> bool:
        """Write a due heartbeat for the pull's task, without waking it; ``False``: wake it.

        Only while the task waits with nothing to write and the connection
        holds no unsent bytes, so the write cannot block (a write that might
        stays the task's, under the pull write timeout). The heartbeat task
        then costs one write per idle pull, not a task's wake-up and wait.
        """
        transport = self.connection.transport
        if (
            not self.stream.pull_parked
            or self.ended is not None
            or transport.is_closing()
            or transport.get_write_buffer_size()
        ):
            return False
        action = self.stream.pull_action(now)
        if action is PullAction.HEARTBEAT:
            try:
                transport.write(self.conn.send_heartbeat())
            except _BROKEN:
                self.end("hung up")
            return True
        return action is PullAction.WAIT

    async def send(self, data: bytes) -> None:
        """Write response bytes, each piece under the server's pull write timeout."""
        connection = self.connection
        try:
            for piece in self.pieces(data):
                self.writing(self.loop.time())
                connection.write(piece)
                await connection.drain()
        finally:
            self.written()


#: A parked idle connection's waiting read returns this: its task ends.
_PARKED = None
#: Bytes a connection buffers before the loop stops reading it (a long push
#: line is read a piece at a time, each held until the handler took it).
_BUFFER_LIMIT = 2 * DEFAULT_LIMIT


class _Connection(asyncio.Protocol):
    """An accepted connection: its bytes, its HTTP state, and the task answering it, if any.

    The server reads requests with :meth:`read` and writes with
    :meth:`write` / :meth:`drain` (asyncio's stream reader and writer, cut
    to what the server uses: one buffer, a waiter only while a task waits).

    A connection is *parked* (:class:`_HangUps`) while a pull streams on it,
    and once idle for ``PARK_AFTER`` between requests. Parked, the loop does
    not read it; when it turns readable (a request, an end of file, a reset)
    the server lets it back a batch per turn. A parked idle connection has
    no task: its waiting read returns :data:`_PARKED` and the task ends,
    leaving the connection's state here; unparking starts a new task that
    goes on with the next request. While a pull streams, this protocol also
    notices the client going away (an end of file, a reset, or more than a
    request head sent up the pull) and hands the pull's end to the server's
    turns (:class:`_Turns`). What a client sends up a pull stays buffered,
    in order, for the connection's next request.
    """

    __slots__ = (
        "_buffer",
        "_drain_waiter",
        "_eof",
        "_error",
        "_lost",
        "_parked",
        "_read_waiter",
        "_tls",
        "_watch_left",
        "_watched",
        "_writing_paused",
        "conn",
        "host",
        "peer",
        "server",
        "task",
        "transport",
        "watch",
    )

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.task: asyncio.Task[None] | None = None
        self.conn = server.new_connection()
        self.watch: _Deadline | None = None
        self.peer: str | None = None
        self.host: str | None = None
        self._tls = False
        self._buffer: bytes | bytearray = b""
        self._eof = False
        self._lost = False
        #: Why the connection was lost, if it broke.
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[bool] | None = None
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        #: The pull this connection streams, while it does.
        self._watched: _PullWriter | None = None
        #: Bytes the client may still send up the watched pull.
        self._watch_left = 0
        #: The socket's descriptor while the server's :class:`_HangUps` watches it.
        self._parked: int | None = None

    # -- asyncio's protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.task = self.server.loop.create_task(self.server.connection(self))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if not buffer:
            self._buffer = data  # most reads take it whole: no copy
        elif isinstance(buffer, bytearray):
            buffer += data
        else:
            joined = self._buffer = bytearray(buffer)
            joined += data
        if len(self._buffer) > _BUFFER_LIMIT:
            self.transport.pause_reading()
        self._wake_reader(False)
        if self._watched is not None:
            # A proxy may send its next request before the pull is over; no
            # client streams more than a request head up an open pull.
            self._watch_left -= len(data)
            if self._watch_left < 0:
                log.debug("pull connection sent more than a request head")
                self._hung_up()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader(False)
        self._hung_up()
        return not self._tls  # half-closed: the answer may still go out (TLS closes)

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._forget_parked()
        self._wake_reader(False)
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        self._hung_up()
        if self.task is None and self.watch is not None:
            self.server.connection_over(self)  # parked idle: no task to do it

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- what the server uses -------------------------------------------------------

    async def read(self, size: int) -> bytes | bytearray | None:
        """Up to ``size`` bytes; ``b""`` at the end; :data:`_PARKED` once parked idle."""
        while not self._buffer:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            waiter = self._read_waiter = self.server.loop.create_future()
            try:
                if await waiter and self._parked is not None:
                    return _PARKED  # else unparked meanwhile: read on
            finally:
                self._read_waiter = None
        buffer = self._buffer
        if len(buffer) <= size:
            self._buffer = b""
            data = buffer
        elif isinstance(buffer, bytearray):
            data = bytes(memoryview(buffer)[:size])
            del buffer[:size]  # bytearray drops a prefix without moving the rest
        else:
            data = buffer[:size]
            self._buffer = bytearray(memoryview(buffer)[size:])
        if len(data) + len(self._buffer) > _BUFFER_LIMIT >= len(self._buffer):
            self._read_on()
        return data

    def _wake_reader(self, parked: bool) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(parked)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        """Return once the transport's buffer is below its high-water mark."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._writing_paused:
            waiter = self._drain_waiter = self.server.loop.create_future()
            await waiter

    def close(self) -> None:
        """Close at once (unsent bytes are dropped), and let the server forget it."""
        self._forget_parked()
        self.transport.abort()
        self.server.connection_over(self)

    # -- pulls and parking ----------------------------------------------------------

    def watch_pull(self, pull: _PullWriter) -> None:
        """Until :meth:`unwatch_pull`, the client hanging up ends ``pull`` (in its turn)."""
        self._watched = pull
        self._watch_left = self.server.options.max_header_size
        if self._eof:
            self._hung_up()
        else:
            self.park()

    def unwatch_pull(self) -> None:
        self._watched = None
        if self._parked is not None:
            self._forget_parked()
            self._read_on()

    def park(self) -> bool:
        """Leave the connection to :class:`_HangUps` unless something waits to be read.

        Whether it is parked (TLS, a server without epoll, or one that
        stopped cannot park).
        """
        if self._parked is None and not self._eof and not self._buffer:
            self._parked = self.server.hang_ups.park(self, self.transport)
        return self._parked is not None

    def park_idle(self) -> None:
        """Idle between requests for long: parked, and the waiting task ends."""
        if self._read_waiter is not None and self.park():
            self._wake_reader(True)

    def unparked(self) -> None:
        """The connection turned readable (:class:`_HangUps`): the loop reads it again."""
        self._parked = None
        self._read_on()
        if self.task is None and self.watch is not None and not self._lost:
            self.task = self.server.loop.create_task(self.server.serve(self))

    def _forget_parked(self) -> None:
        fd, self._parked = self._parked, None
        if fd is not None:
            self.server.hang_ups.unpark(fd, self)

    def _read_on(self) -> None:
        transport = self.transport
        if (
            self._parked is None
            and not transport.is_closing()
            and len(self._buffer) <= _BUFFER_LIMIT
        ):
            transport.resume_reading()

    def _hung_up(self) -> None:
        pull, self._watched = self._watched, None
        if pull is not None:
            self.server.teardown.call(pull.hang_up)


class _Server(ServerCore[_Stream]):
    """One :func:`start_pht_server` listener's state, on top of the server core."""

    def __init__(
        self,
        callback: ClientConnected,
        options: ServerOptions,
        sessions: ServerSessions[_Stream],
        stats: PHTStatsSink | None,
        limit: int,
    ) -> None:
        super().__init__(options, sessions, _Stream, stats)
        self.callback = callback
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        #: Admitted connections not yet over (parked idle ones have no task).
        self.connections: set[_Connection] = set()
        self.handlers: set[asyncio.Task[Any]] = set()
        self.background: list[asyncio.Task[None]] = []
        #: Open pulls, and an event set whenever there are none.
        self.pulls: set[_PullWriter] = set()
        self.no_pulls = asyncio.Event()
        self.no_pulls.set()
        self.beat_added = asyncio.Event()
        self.all_done = asyncio.Event()
        self.all_done.set()
        # Ending a session wakes its handler, its pull and their clean-up:
        # when thousands end at once (a client or proxy closing everything),
        # that work would all run in one turn of the loop and stall every
        # other tunnel. Ends take turns instead, as on the trio server.
        self.teardown = _Turns(self.loop)
        self.hang_ups = _HangUps(self.loop)

    # -- sessions -------------------------------------------------------------------

    def _start_handler(self, stream: _Stream) -> None:
        info = {"pht_token": stream.token, "peername": stream.remote_address}
        transport = stream.transport = _SessionTransport(self, stream, info)
        reader, writer = open_streams(transport, limit=self.limit)
        stream.started = self.loop.time()
        self.handler_started(stream)
        self.all_done.clear()
        stream._wake_reader()  # pushed bytes may be waiting already
        try:
            result = self.callback(reader, writer)
        except Exception:
            log.exception("handler for session %s raised", short_token(stream.token))
            transport.close()
            return
        if asyncio.iscoroutine(result):
            task = self.loop.create_task(result)
            self.handlers.add(task)
            task.add_done_callback(lambda done: self._handler_returned(done, stream))

    def _handler_returned(self, task: asyncio.Task[Any], stream: _Stream) -> None:
        self.handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # One broken handler must not take the other tunnels down.
            log.error(
                "handler for session %s raised",
                short_token(stream.token),
                exc_info=task.exception(),
            )
            if stream.transport is not None:
                stream.transport.close()

    def end_handled(self, stream: _Stream) -> None:
        stream.session.end(Input.HANDLER_DONE)
        self.end_session(stream, self.loop.time())

    def session_lost(self, stream: _Stream) -> None:
        """The session's transport is gone: the handler's part is over."""
        if self.handler_done(stream, self.loop.time(), stream.started):
            self.all_done.set()

    async def outbound(self, stream: _Stream, transport: _SessionTransport) -> None:
        """The application's bytes into the core's buffer for the pull, as room allows.

        Started when the application writes or closes; returns once nothing
        is left to hand over (the next write starts it again).
        """
        try:
            while transport.queued:
                while stream.must_wait_room:
                    await _wait(stream.room_event)
                if stream.session.closed:
                    return  # the inbound pump ends the session
                stream.queue(transport.take_outbound(stream.room_left))
                stream._wake_pull()
            if transport.is_closing():
                stream.close_handler()
                # Give the pull a moment to deliver what the handler wrote last.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stream.finished_event.wait(), self.linger(stream))
                transport.lose(None)
        finally:
            stream.outbound_task = None

    # -- background tasks -----------------------------------------------------------

    def start_background(self) -> None:
        for coro in (self._watchdog(), self._reaper(), self._heartbeats()):
            self.background.append(self.loop.create_task(coro))

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog.interval)
            for number, _ in enumerate(self.watchdog.expiring(self.loop.time()), 1):
                if number % TEARDOWN_BATCH == 0:
                    await asyncio.sleep(0)  # a batch per turn

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            for _ in self.reap(self.loop.time()):
                await asyncio.sleep(0)

    async def _heartbeats(self) -> None:
        wheel = self.wheel
        while True:
            deadline = wheel.next_deadline()
            if deadline == float("inf"):
                await _wait(self.beat_added)
                continue
            await asyncio.sleep(max(0.0, deadline - self.loop.time()))
            for number, pull in enumerate(wheel.due(self.loop.time()), 1):
                assert isinstance(pull, _PullWriter)
                if not pull.beat(self.loop.time()):
                    pull.stream._wake_pull()
                if number % TEARDOWN_BATCH == 0:
                    # Pulls opened together beat together: a batch per loop
                    # turn, not thousands of writes in one.
                    await asyncio.sleep(0)

    # -- connections ----------------------------------------------------------------

    def protocol(self) -> _Connection:
        """The listener's protocol factory: one :class:`_Connection` per accepted connection."""
        return _Connection(self)

    async def connection(self, protocol: _Connection) -> None:
        """Admit one accepted connection, then answer its requests (:meth:`serve`)."""
        transport = protocol.transport
        protocol.peer = peer = _peer_of(transport.get_extra_info("peername"))
        protocol.host = host_of(peer)
        if not self.connection_opened(protocol.host):
            log.debug("refused a connection from %s: over its budget", peer)
            protocol.task = None
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if _NOTSENT_LOWAT is not None and sock is not None:
            # As the trio server: a pull that stopped reading shows at once.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 2 * PULL_PROGRESS)
        self.connections.add(protocol)
        protocol.watch = _Deadline(self.options, self.loop.time(), protocol)
        self.watchdog.add(protocol.watch)
        await self.serve(protocol)

    async def serve(self, protocol: _Connection) -> None:
        """Answer the connection's requests until it closes, or is parked idle."""
        watch = protocol.watch
        assert watch is not None
        parked = False
        try:
            parked = await self._serve_requests(protocol, protocol.conn, protocol.peer, watch)
        except asyncio.CancelledError:
            # Timed out, or the server stops: the connection ends here.
            task = asyncio.current_task()
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            if watch.fired:
                log.debug("connection from %s timed out", protocol.peer)
        except _BROKEN as exc:
            log.debug("connection from %s ended: %s", protocol.peer, exc)
        except Exception:  # a bug: this connection ends, the others go on
            log.exception("connection from %s failed", protocol.peer)
        finally:
            protocol.task = None
            if not parked:
                protocol.close()

    def connection_over(self, protocol: _Connection) -> None:
        """The connection is closed: forget it (once)."""
        watch, protocol.watch = protocol.watch, None
        if watch is not None:
            self.watchdog.discard(watch)
            self.connections.discard(protocol)
            self.connection_closed(protocol.host)

    async def _serve_requests(
        self,
        protocol: _Connection,
        conn: ServerConnection,
        peer: str | None,
        watch: _Deadline,
    ) -> bool:
        """Answer requests until the connection closes (``False``) or is parked idle (``True``).

        A client that pipelines gets one answer per turn of the loop: its
        next request was read already, and answering every one in one step
        would make every other connection wait for all of them (64
        connections flooding ``/authorize`` kept other tunnels' echoes
        waiting 0.6 s).
        """
        streaming = park = pipelined = False
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                protocol.write(self.bad_http(conn, exc.status_hint, peer, exc))
                await protocol.drain()
                return False
            if event is NEED_DATA:
                if conn.state is not ServerConnectionState.IDLE:
                    return False
                if conn.expects_continue:
                    protocol.write(conn.send_continue())
                if park and protocol.park():  # its task ends
                    return True
                pipelined = False
                data = await protocol.read(PUSH_PIECE if streaming else _RECEIVE_SIZE)
                if data is _PARKED:
                    return True
                conn.receive_data(data)
                if not data:
                    return False
                del data  # the core has it: not kept alive while a push waits
                watch.received(self.loop.time())
                continue
            if pipelined:  # the client did not wait for the last answer
                pipelined = False
                await asyncio.sleep(0)  # other connections' turn (see above)
            watch.answering()
            if type(event) is PushData:
                streaming = True
                self.piece_delivered(conn, await self._deliver(event, conn, peer))
                watch.reading_on(self.loop.time())
                continue
            streaming = session_over = False
            if isinstance(event, PushRequest):
                status = await self._deliver(event, conn, peer)
                protocol.write(self.push_answer(conn, status))
            elif isinstance(event, PullRequest):
                session_over = await self._pull(protocol, event)
            else:
                if type(event) is CloseRequest:
                    session_over = True
                    await self.teardown.turn()  # see _Server.teardown
                protocol.write(self.answer(conn, event, peer, self.loop.time()))
            await protocol.drain()
            if conn.state is ServerConnectionState.CLOSED:
                return False
            park = watch.idle(self.loop.time(), session_over=session_over)
            pipelined = True  # until a read shows the client waits for the answer

    async def _deliver(
        self, event: PushRequest | PushData, conn: ServerConnection, peer: str | None
    ) -> int:
        push = self.push(event, conn, peer, self.loop.time())
        if isinstance(push, int):
            return push
        stream = push.stream
        assert isinstance(stream, _Stream)
        self.watchdog.add(push)
        try:
            while (verdict := push.step(self.loop.time())) is PushVerdict.WAIT:
                await _wait(stream.consumed)
        finally:
            self.watchdog.discard(push)
        return self.push_over(push, verdict, self.loop.time())

    async def _pull(self, protocol: _Connection, event: PullRequest) -> bool:
        """Answer a pull; whether its end was the session's."""
        conn = protocol.conn
        stream = self.pull_for(conn, event, protocol.peer, self.loop.time())
        if isinstance(stream, int):
            protocol.write(conn.send_status(self.refused(stream)))
            return False
        task = asyncio.current_task()
        assert task is not None
        pull = _PullWriter(protocol, stream, task, self.options)
        replaced, start = self.attach_pull(stream, pull, self.loop.time())
        if isinstance(replaced, _PullWriter):
            replaced.end("replaced")  # a newer long poll replaces a stale one
        self.watchdog.add(pull)
        self.pulls.add(pull)
        self.no_pulls.clear()
        timer = None
        hung_up = False
        try:
            await pull.send(conn.start_pull())
            timer, wake = self.pull_started(stream, pull, start)
            if wake:
                self.beat_added.set()
            protocol.watch_pull(pull)  # notices at once when the client goes away (as on trio)
            await self._feed_pull(stream, pull)
        except asyncio.CancelledError:
            if pull.ended is None:
                raise
            hung_up = pull.ended == "hung up"
        except _BROKEN:
            hung_up = True  # the write failed: the client is gone
        finally:
            if pull.ended is None:
                pull.ended = "over"  # from now on, nobody cancels this task for it
            self.watchdog.discard(pull)
            self.pulls.discard(pull)
            if not self.pulls:
                self.no_pulls.set()
            protocol.unwatch_pull()
        self.pull_over(
            stream,
            pull,
            timer,
            hung_up=hung_up,
            stalled=pull.timed_out,
            now=self.loop.time(),
        )
        if pull.timed_out or hung_up:
            raise ConnectionResetError("pull write timed out" if pull.timed_out else "hung up")
        return stream.finished

    async def _feed_pull(self, stream: _Stream, pull: _PullWriter) -> None:
        conn, session = pull.conn, stream.session
        while True:
            action = stream.pull_action(self.loop.time())
            if action is PullAction.WRITE:
                data = stream.take_outbound()
                if session.resume is not None and stream.transport is not None:
                    # Taken into the replay buffer: counted now, since a pull cut
                    # during the send replays them later as not fresh.
                    stream.transport.acknowledge(stream.fresh)
                await pull.send(conn.send_pull_data(data))
                session.wrote(self.loop.time())
                self.sessions.touch(session, session.last_write)
                if session.resume is None and stream.transport is not None:
                    stream.transport.acknowledge(len(data))
            elif action is PullAction.HEARTBEAT:
                await pull.send(conn.send_heartbeat())
            elif action is PullAction.END:
                await pull.send(conn.end_pull())
                return
            elif action is PullAction.CUT:
                raise ConnectionResetError("session ended with pushed bytes refused")
            else:
                deadline = stream.pull_deadline()
                stream.pull_parked = True  # a heartbeat may be written meanwhile: see beat()
                try:
                    if deadline == math.inf:
                        await _wait(stream.pull_event)
                    else:  # a bounded pull ends at its deadline
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(
                                _wait(stream.pull_event), max(0.0, deadline - self.loop.time())
                            )
                finally:
                    stream.pull_parked = False

    # -- shutdown -------------------------------------------------------------------

    async def shut_down(self, timeout: float) -> ShutdownReport:
        """Let the sessions finish for up to ``timeout`` seconds, then cut the rest."""
        at_start = self.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), timeout)
        cut = self.cut(self.loop.time())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.all_done.wait(), min(timeout, 5.0))  # handlers see EOF
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.no_pulls.wait(), 1.0)  # the pulls' last chunks
        await self.stop()
        return ShutdownReport(finished=max(len(at_start) - len(cut), 0), cut=cut)

    async def stop(self) -> None:
        """End what is left: sessions, connections and background tasks; wait for them."""
        for stream in list(self.active):
            if stream.transport is not None:
                stream.transport.abort()  # a reader that never read its EOF
        tasks = list(self.background)
        for protocol in list(self.connections):
            if protocol.task is not None:
                tasks.append(protocol.task)
            else:  # parked idle
                protocol.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.hang_ups.close()


def _peer_of(address: Any) -> str | None:
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    return format_peer(address[0], address[1])


class PHTServer:
    """A running :func:`start_pht_server`: the :class:`asyncio.Server` API.

    ``close()`` shuts down gracefully, as :func:`pht.serve_pht`'s
    ``shutdown`` event does: the listeners close, requests that would open
    a session get ``503``, open sessions have ``shutdown_timeout`` seconds
    to end, then the rest are closed (their readers see EOF).
    ``wait_closed()`` returns once that is done and no task of the server
    runs any more; :attr:`shutdown_report` then tells what happened.
    """

    def __init__(self, listener: asyncio.Server, server: _Server) -> None:
        self._listener = listener
        self._server = server
        self._loop = server.loop
        self._closing: asyncio.Task[ShutdownReport] | None = None
        self._serving_forever: asyncio.Future[None] | None = None
        #: Set once a shutdown is over.
        self.shutdown_report: ShutdownReport | None = None

    def __repr__(self) -> str:
        return f"<PHTServer sockets={self.sockets!r}>"

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once closed)."""
        return tuple(self._listener.sockets) if self._closing is None else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts new tunnels (``False`` once closing)."""
        return self._closing is None

    async def start_serving(self) -> None:
        """Already serving since :func:`start_pht_server` returned (as its default)."""
        if self._closing is not None:
            raise RuntimeError(f"{self!r} is closed")

    async def serve_forever(self) -> None:
        """Serve until cancelled; then close, as :meth:`asyncio.Server.serve_forever`."""
        if self._closing is not None:
            raise RuntimeError(f"{self!r} is closed")
        if self._serving_forever is not None:
            raise RuntimeError(f"{self!r} is already being awaited on serve_forever()")
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None

    def close(self) -> None:
        """Stop listening and begin the graceful shutdown (see the class docstring)."""
        if self._closing is not None:
            return
        self._listener.close()
        self._closing = self._loop.create_task(
            self._server.shut_down(self._server.options.shutdown_timeout)
        )
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` is over (returns at once if it was never called)."""
        if self._closing is None:
            return
        self.shutdown_report = await asyncio.shield(self._closing)
        await self._listener.wait_closed()

    async def __aenter__(self) -> PHTServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


async def start_pht_server(
    client_connected_cb: ClientConnected,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    ssl: bool | _ssl.SSLContext | SelfSignedCertificate | None = None,
    limit: int = DEFAULT_LIMIT,
    listen_backlog: int | None = None,
    token_source: TokenSource = new_token,
    stats: PHTStatsSink | None = None,
    options: ServerOptions | None = None,
    **settings: Unpack[ServerSettings],
) -> PHTServer:
    """Serve PHT tunnels, calling ``client_connected_cb(reader, writer)`` per session.

    As :func:`asyncio.start_server`: the callback gets asyncio's own
    :class:`asyncio.StreamReader` and :class:`asyncio.StreamWriter` (a
    coroutine callback runs as a task), ``limit`` is the reader's buffer
    limit, and the returned :class:`PHTServer` has the
    :class:`asyncio.Server` API. ``writer.get_extra_info("pht_token")`` is
    the session's token, ``"peername"`` the client's ``host:port``.
    ``ssl`` is ``None`` / ``False``, an :class:`ssl.SSLContext`, a
    :class:`~pht.SelfSignedCertificate`, or ``True`` for GOST's self-signed
    certificate made at start-up.

    ``listen_backlog``, ``token_source``, ``stats`` and the tuning keywords
    (the fields of :class:`pht.ServerOptions`, or one ``options=``) are
    :func:`pht.serve_pht`'s, with the same meanings and defaults. A push is
    acknowledged once its bytes are in the reader's buffer; ``drain()``
    returns once the pull wrote what was written. The session ends when the
    client closes it (the reader sees EOF) or when the application closes
    its writer (after its last bytes went out).
    """
    options = ServerOptions.resolve("start_pht_server", options, settings)
    if not callable(client_connected_cb):
        raise TypeError("client_connected_cb must be callable")
    ssl_context: _ssl.SSLContext | None = server_ssl_context(ssl)
    sessions: ServerSessions[_Stream] = ServerSessions(options, token_source)
    server = _Server(client_connected_cb, options, sessions, stats, limit)
    listener = await server.loop.create_server(
        server.protocol,
        host,
        cast(int, port),  # None as for asyncio.start_server (the stubs want an int)
        ssl=ssl_context,
        ssl_handshake_timeout=options.request_timeout if ssl_context is not None else None,
        backlog=listen_backlog if listen_backlog is not None else socket.SOMAXCONN,
    )
    server.stats.enable_pht()
    server.start_background()
    return PHTServer(listener, server)
