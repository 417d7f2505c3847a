"""The trio server adapter: :func:`serve_pht`."""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import operator
import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

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
    AcceptFailures,
    ConnectionTimer,
    PullAction,
    PullInput,
    PullWriteTimer,
    ServerCore,
    SessionBuffers,
    ShutdownReport,
    format_peer,
    server_ssl_context,
    short_token,
)
from ._server_session import (
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
    ServerSettings,
    host_of,
)
from ._stats import PHTStatsSink
from ._tls import SelfSignedCertificate
from ._tls_stream import TLSSocketStream
from ._token import TokenSource, new_token
from ._trio_common import RECEIVE_SIZE, ConflictDetector, PHTStream

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ShutdownReport", "serve_pht"]

log = logging.getLogger("pht.server")

Handler = Callable[[PHTStream], Awaitable[object]]

#: TCP_NOTSENT_LOWAT where the platform has it (Linux, macOS).
_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
#: Whether the heartbeat task may write a heartbeat straight to a parked
#: pull's socket descriptor (``os.write``): POSIX only.
_WRITE_DESCRIPTOR = os.name == "posix"
#: Whether pulls' hang-ups are watched by one task (:class:`_HangUps`): Linux.
_EPOLL = hasattr(select, "epoll")
#: Readable, the peer's end of the connection closed, or an error.
_HANG_UP_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if _EPOLL else 0
#: Hang-ups handled per turn of the scheduler: each ends a session (its pull,
#: handler and connection, a few hundred microseconds in all), so that other
#: tunnels wait a millisecond or so per turn while thousands end at once.
_HANG_UP_BATCH = 4
#: Heartbeats handled per turn of the scheduler: written at once, each costs
#: about one system call, so a batch takes around a millisecond.
_HEARTBEAT_BATCH = 64


class _ServerStream(SessionBuffers, PHTStream):
    """The server's end of one session, handed to the handler: the core's buffers, awaitable."""

    # Thousands of idle tunnels hold one each: slots, not a dict.
    __slots__ = (
        "_data_arrived",
        "_finished_event",
        "_outbound_drained",
        "_outbound_ready",
        "_receiving",
        "_sending",
        "consumed",
        "pull_parked",
        "pull_writer",
    )

    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        super().__init__(session, remote_address, max_buffered)
        self.pull_writer: _PullWriter | None = None
        self.pull_parked = False
        # Each event is made when a task is about to wait on it (``None``:
        # nobody waits): thousands of idle tunnels hold none of them.
        self._data_arrived: trio.Event | None = None
        #: Pushes waiting for the handler to take their bytes (made by the first).
        self.consumed: trio.lowlevel.ParkingLot | None = None
        self._outbound_ready: trio.Event | None = None
        self._outbound_drained: trio.Event | None = None
        self._finished_event: trio.Event | None = None
        self._receiving = ConflictDetector("another task is already receiving on this stream")
        self._sending = ConflictDetector("another task is already sending on this stream")

    def _wake_reader(self) -> None:
        if self._data_arrived is not None:
            self._data_arrived.set()

    def _wake_pushes(self) -> None:
        if self.consumed is not None:
            self.consumed.unpark_all()

    def _wake_pull(self) -> None:
        if self._outbound_ready is not None:
            self._outbound_ready.set()

    def _wake_sender(self) -> None:
        if self._outbound_drained is not None:
            self._outbound_drained.set()

    def _wake_finished(self) -> None:
        if self._finished_event is not None:
            self._finished_event.set()

    async def wait_finished(self) -> None:
        """Wait until nothing more goes to or comes from the client."""
        if not self.finished:
            self._finished_event = trio.Event()
            await self._finished_event.wait()

    # -- called by the handler --------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._receiving:
            if self.handler_closed:
                raise trio.ClosedResourceError("stream was closed")
            waited = False
            while not self._inbound:  # the core's buffer (read here: hot path)
                if self.session.closed:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return b""
                self._data_arrived = arrived = trio.Event()
                await arrived.wait()
                waited = True
                if self.handler_closed:
                    raise trio.ClosedResourceError("stream was closed")
            if not waited:  # every receive is a checkpoint, but one is enough
                await trio.lowlevel.checkpoint()
            return self.take(max_bytes or RECEIVE_SIZE)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            if self.handler_closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._wait_room()
            if self.session.closed:
                raise trio.BrokenResourceError("the PHT client closed the session")
            if len(data):
                self.queue(data)
                writer = self.pull_writer
                if writer is not None and self.pull_parked and writer.available:
                    # The pull is idle: write in this task, at once. That saves
                    # a task switch, and the bytes leave before the push that
                    # caused them is acknowledged (the client sees both sooner).
                    await writer.write(self.take_outbound())
                    if self.pull_must_look or writer.error is not None or not self.pull_parked:
                        self._wake_pull()
                    return
                self._wake_pull()
            await trio.lowlevel.checkpoint()

    async def _wait_room(self) -> None:
        while self.must_wait_room:
            self._outbound_drained = drained = trio.Event()
            await drained.wait()
            if self.handler_closed:
                raise trio.ClosedResourceError("stream was closed")

    async def wait_send_all_might_not_block(self) -> None:
        if self.handler_closed:
            raise trio.ClosedResourceError("stream was closed")
        await self._wait_room()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.close_handler()
        await trio.lowlevel.checkpoint()

    # -- called by the pull -------------------------------------------------------

    async def wait_outbound(self) -> None:
        if not self.has_outbound and not self.finished:
            self._outbound_ready = ready = trio.Event()
            if self.meter is None:
                await ready.wait()
            else:  # a bounded pull ends at its deadline
                with trio.move_on_at(self.pull_deadline()):
                    await ready.wait()

    async def wait_writer(self) -> None:
        """Wait until the handler's own pull write is over."""
        self._outbound_ready = trio.Event()
        await self._outbound_ready.wait()


class _Server(ServerCore[_ServerStream]):
    """State shared by every connection of one :func:`serve_pht` call."""

    def __init__(
        self,
        handler: Handler,
        nursery: trio.Nursery,
        options: ServerOptions,
        sessions: ServerSessions[_ServerStream],
        ssl_context: ssl.SSLContext | None,
        stats: PHTStatsSink | None = None,
        connections: trio.Nursery | None = None,
    ) -> None:
        super().__init__(options, sessions, _ServerStream, stats)
        self.handler = handler
        self.nursery = nursery
        #: Where connections' tasks run (a parked connection's task is started again here).
        self.connections = connections or nursery
        self.ssl_context = ssl_context
        self._beat_added = trio.Event()
        # Ending a session wakes its handler, its pull and their clean-up:
        # when thousands end at once (a client or proxy closing everything),
        # that work would all land in one scheduler batch and stall every
        # other tunnel. Ends take turns through this gate instead.
        self.teardown = trio.CapacityLimiter(TEARDOWN_BATCH)
        self.hang_ups = _HangUps(options, self._resume, self._parked_closed)
        self.all_done = trio.Event()
        self.all_done.set()

    # -- tasks ----------------------------------------------------------------------

    def _start_handler(self, stream: _ServerStream) -> None:
        self.nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: _ServerStream) -> None:
        started = trio.current_time()
        self.handler_started(stream)
        self.all_done = trio.Event()
        try:
            await self.handler(stream)
        except Exception:
            # One broken handler must not take the other tunnels down.
            log.exception("handler for session %s raised", short_token(stream.token))
        finally:
            await stream.aclose()
            # Give the pull a moment to deliver what the handler wrote last.
            with trio.move_on_after(self.linger(stream)):
                await stream.wait_finished()
            if self.handler_done(stream, trio.current_time(), started):
                self.all_done.set()

    async def run_watchdog(self) -> None:
        while True:
            await trio.sleep(self.watchdog.interval)
            for number, _ in enumerate(self.watchdog.expiring(trio.current_time()), 1):
                if number % TEARDOWN_BATCH == 0:
                    await trio.lowlevel.checkpoint()  # a batch per turn

    async def run_reaper(self) -> None:
        while True:
            await trio.sleep(self.reap_interval)
            for _ in self.reap(trio.current_time()):
                await trio.lowlevel.checkpoint()

    async def run_heartbeats(self) -> None:
        wheel = self.wheel
        while True:
            deadline = wheel.next_deadline()
            if deadline == math.inf:
                self._beat_added = trio.Event()
                await self._beat_added.wait()
                continue
            await trio.sleep_until(deadline)
            now = trio.current_time()
            for number, pull in enumerate(wheel.due(now), 1):
                assert isinstance(pull, _PullWriter)
                pull.beat(now)
                if number % _HEARTBEAT_BATCH == 0:
                    # Pulls opened together beat together: a batch per
                    # scheduler turn, not thousands of writes in one.
                    await trio.lowlevel.checkpoint()

    # -- connections --------------------------------------------------------------

    async def handle_connection(self, transport: trio.abc.Stream) -> None:
        peer = _peer_of(transport)
        host = host_of(peer)
        if not self.connection_opened(host):
            log.debug("refused a connection from %s: over its budget", peer)
            await _close_transport(transport)
            return
        try:
            if _NOTSENT_LOWAT is not None and isinstance(transport, trio.SocketStream):
                # The kernel holds at most this much not yet sent (beyond what is
                # in flight): a pull that stopped reading shows as a stalled write
                # at once, and one that reads slowly shows progress with every
                # window update, instead of after megabytes of send buffer drain.
                with contextlib.suppress(OSError):
                    transport.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 2 * PULL_PROGRESS)
            parks = self.ssl_context is None and self.hang_ups.can_watch(transport)
            watch = _Deadline(
                self.options,
                trio.current_time(),
                transport,
                self.new_connection(),
                peer,
                host,
                self.hang_ups if parks else None,
            )
        except BaseException:
            await _close_transport(transport)
            self.connection_closed(host)
            raise
        self.watchdog.add(watch)
        await self._run_connection(watch, handshake=self.ssl_context is not None)

    def _resume(self, watch: _Deadline) -> None:
        """A parked connection's next request began (:class:`_HangUps` read it): serve it."""
        watch.parked = False
        self.connections.start_soon(self._run_connection, watch)

    def _parked_closed(self, watch: _Deadline) -> None:
        """:class:`_HangUps` closed a parked connection (its client went, keep-alive, shutdown)."""
        self.watchdog.discard(watch)
        try:
            _close_socket(watch.transport)
        finally:
            self.connection_closed(watch.host)
        log.debug("connection from %s closed while idle", watch.peer)

    async def _run_connection(self, watch: _Deadline, *, handshake: bool = False) -> None:
        """Serve a connection until it closes, or until it is parked.

        A parked connection has no task: :class:`_HangUps` holds it (and
        its count against its address) until its next request begins, its
        client goes, its keep-alive ends or the server shuts down.
        """
        parked = False
        try:
            parked = await self._serve_connection(watch, handshake)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError) as exc:
            log.debug("connection from %s ended: %s", watch.peer, exc)
        finally:
            if not parked:
                self.watchdog.discard(watch)
                try:
                    await _close_transport(watch.transport)
                finally:
                    self.connection_closed(watch.host)

    async def _serve_connection(self, watch: _Deadline, handshake: bool) -> bool:
        """Serve a connection; ``True``: it was parked (:class:`_HangUps` holds it now)."""
        peer = watch.peer
        while True:
            after = _After.CLOSE
            with watch.scope:
                if handshake:
                    handshake = False
                    assert self.ssl_context is not None
                    transport = watch.transport
                    if isinstance(transport, trio.SocketStream):
                        watch.handshaking(trio.current_time())
                        watch.transport = transport = TLSSocketStream.wrap(
                            transport, self.ssl_context, server_side=True
                        )
                        try:
                            await transport.do_handshake()
                        except trio.BrokenResourceError as exc:
                            log.info("connection from %s: %s", peer, exc)
                            return False
                        watch.idle(trio.current_time())
                after = await self._serve_requests(watch.transport, watch.conn, peer, watch)
            if after is _After.SERVE_ON:
                watch.parked = False
                watch.scope = trio.CancelScope()
                continue
            if after is _After.PARK or (watch.parked and watch.scope.cancelled_caught):
                assert watch.hang_ups is not None
                # A new scope for when it is served again (a scope serves one
                # ``with``; a cancelled one holds its cancel reason, too).
                watch.scope = trio.CancelScope()
                return watch.hang_ups.park(watch)  # not once the server stops
            if watch.scope.cancelled_caught:
                log.debug("connection from %s timed out", peer)
            return False

    async def _serve_requests(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        peer: str | None,
        watch: _Deadline,
    ) -> _After:
        """Answer the requests of one connection until it closes, or is parked.

        The watchdog parks a connection idle between requests by cancelling
        ``watch.scope`` (and setting ``watch.parked``), which ends its wait
        for the next request: the caller hands it to :class:`_HangUps`.
        :attr:`_After.SERVE_ON`: the next request began just as it was parked
        (the bytes were read already), so the caller goes on serving in a new
        scope. :attr:`_After.PARK`: an answer ended a session, park it now.
        """
        streaming = park = False
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                await transport.send_all(self.bad_http(conn, exc.status_hint, peer, exc))
                return _After.CLOSE
            if event is NEED_DATA:
                if conn.state is not ServerConnectionState.IDLE:
                    return _After.CLOSE
                if conn.expects_continue:
                    await transport.send_all(conn.send_continue())
                if park:
                    return _After.PARK
                # In a long push line, read a piece at a time: what is read
                # is held until the handler took it.
                data = await transport.receive_some(PUSH_PIECE if streaming else RECEIVE_SIZE)
                conn.receive_data(data)
                if not data:
                    return _After.CLOSE
                del data  # the core has it: not kept alive while a push waits
                if watch.between_requests:
                    watch.received(trio.current_time())
                    if watch.parked:  # too late to park: its scope is cancelled, though
                        return _After.SERVE_ON
                continue
            watch.answering()  # push_timeout etc. apply
            if type(event) is PushData:
                # A piece of a long push line: deliver it, read on.
                streaming = True
                self.piece_delivered(conn, await self._deliver(event, conn, peer))
                watch.reading_on(trio.current_time())
                continue
            streaming = session_over = False
            if isinstance(event, PushRequest):
                status = await self._deliver(event, conn, peer)
                await transport.send_all(self.push_answer(conn, status))
            elif isinstance(event, PullRequest):
                session_over = await self._pull(transport, conn, event, peer)
            elif type(event) is CloseRequest:
                session_over = True
                async with self.teardown:  # see _Server.teardown
                    answer = self.answer(conn, event, peer, trio.current_time())
                await transport.send_all(answer)
            else:
                await transport.send_all(self.answer(conn, event, peer, trio.current_time()))
            if conn.state is ServerConnectionState.CLOSED:
                return _After.CLOSE
            park = watch.idle(trio.current_time(), session_over=session_over)

    async def _deliver(
        self, event: PushRequest | PushData, conn: ServerConnection, peer: str | None
    ) -> int:
        """Hand a push's bytes to its session: the status to answer (200, 410 or a refusal)."""
        push = self.push(event, conn, peer, trio.current_time())
        if isinstance(push, int):
            return push
        # No cancel scope per push (one costs more than the rest of this
        # method): the watchdog wakes the push at its deadline.
        self.watchdog.add(push)
        try:
            while (verdict := push.step(trio.current_time())) is PushVerdict.WAIT:
                stream = push.stream
                assert isinstance(stream, _ServerStream)
                if stream.consumed is None:
                    stream.consumed = trio.lowlevel.ParkingLot()
                await stream.consumed.park()
        finally:
            self.watchdog.discard(push)
        return self.push_over(push, verdict, trio.current_time())

    async def _pull(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        event: PullRequest,
        peer: str | None,
    ) -> bool:
        """Answer a pull; whether its end was the session's."""
        stream = self.pull_for(conn, event, peer, trio.current_time())
        if isinstance(stream, int):
            await transport.send_all(conn.send_status(self.refused(stream)))
            return False
        timer = None
        async with trio.open_nursery() as nursery:
            writer = _PullWriter(transport, conn, stream, nursery.cancel_scope, self.options)
            replaced, start = self.attach_pull(stream, writer, trio.current_time())
            if isinstance(replaced, _PullWriter):
                replaced.scope.cancel()  # a newer long poll replaces a stale one
            self.watchdog.add(writer)
            try:
                await writer.send(conn.start_pull())
                timer, wake = self.pull_started(stream, writer, start)
                if wake:
                    self._beat_added.set()
                if not self.hang_ups.watch(writer):
                    nursery.start_soon(
                        self._watch_for_hangup, transport, conn, writer, nursery.cancel_scope
                    )
                stream.pull_writer = writer
                await self._feed_pull(stream, writer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                writer.hung_up = True  # the write failed: the client is gone
            finally:
                self.hang_ups.forget(writer)
                self.watchdog.discard(writer)
                if stream.pull_writer is writer:
                    stream.pull_writer = None
                nursery.cancel_scope.cancel()
        self.pull_over(
            stream,
            writer,
            timer,
            hung_up=writer.hung_up,
            stalled=writer.timed_out,
            now=trio.current_time(),
        )
        if writer.timed_out:
            raise trio.BrokenResourceError("pull write timed out")
        return stream.finished

    async def _feed_pull(self, stream: _ServerStream, writer: _PullWriter) -> None:
        """Write the session's bytes, heartbeats and finally the end of the pull."""
        conn, session = writer.conn, stream.session
        while True:
            if writer.error is not None:
                raise trio.BrokenResourceError("pull write failed") from writer.error
            if writer.rest:  # a heartbeat the heartbeat task could not write whole
                rest, writer.rest = writer.rest, b""
                await writer.send(rest)
                continue
            if writer.busy:  # the handler is writing: wait until it is done
                await stream.wait_writer()
                continue
            action = stream.pull_action(trio.current_time())
            if action is PullAction.WRITE:
                await writer.write(stream.take_outbound())
                self.sessions.touch(session, session.last_write)
            elif action is PullAction.HEARTBEAT:
                await writer.send(conn.send_heartbeat())
            elif action is PullAction.END:
                await writer.send(conn.end_pull())
                return
            elif action is PullAction.CUT:
                # No last chunk: the connection closes mid-answer.
                raise trio.BrokenResourceError("session ended with pushed bytes refused")
            else:
                stream.pull_parked = True
                try:
                    await stream.wait_outbound()
                finally:
                    stream.pull_parked = False

    async def _watch_for_hangup(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        writer: _PullWriter,
        scope: trio.CancelScope,
    ) -> None:
        """Notice at once when a pulling client goes away (GOST waits for a failed write).

        A task per pull: where :class:`_HangUps` cannot watch it (TLS, no epoll).
        """
        watch = PullInput(conn, self.options)
        try:
            while watch.received(await transport.receive_some(RECEIVE_SIZE)):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
        writer.hung_up = True
        async with self.teardown:  # see _Server.teardown
            scope.cancel()


class _After(enum.Enum):
    """What :meth:`_Server._serve_requests` leaves its connection to."""

    #: It is over: close it.
    CLOSE = enum.auto()
    #: Its next request began just as the watchdog parked it: serve on.
    SERVE_ON = enum.auto()
    #: An answer ended a session (its client is about to go): park it now.
    PARK = enum.auto()


class _HangUps:
    """Notices clients hanging up on their pulls, from one task, a batch per scheduler turn.

    A task per pull waiting for its socket to turn readable would do, but
    when thousands of clients go at once (a client process or a proxy
    closing everything) trio wakes all those tasks in one turn of its
    scheduler, and every other tunnel waits for them (a second at 10,000
    pulls). Here plain-socket pulls sit in an epoll set of their own (Linux),
    which :meth:`run` reads :data:`_HANG_UP_BATCH` events per turn; a hang-up
    cancels the pull, whose task then ends it. What a client sends up an open
    pull is kept for later (:class:`PullInput`).

    Connections idle between requests are parked here too (:meth:`park`),
    without a task: an idle keep-alive connection costs its socket, its
    HTTP state and its timer, not a task and its frames. When one turns
    readable, :meth:`run` reads it: the start of its next request goes to
    its HTTP state and a new task serves it; its end (or a reset) closes
    it, no task needed. So thousands of clients hanging up (or sending
    requests) at once are handled a batch per turn too.
    """

    __slots__ = ("_closed", "_epoll", "_idle", "_input", "_options", "_pulls", "_resume")

    #: Bytes read at a time from a pull's connection (a pipelined request head).
    READ_SIZE = 16 * 1024

    def __init__(
        self,
        options: ServerOptions,
        resume: Callable[[_Deadline], None],
        closed: Callable[[_Deadline], None],
    ) -> None:
        self._options = options
        self._epoll: Any = select.epoll() if _EPOLL else None
        #: Watched pulls by socket descriptor.
        self._pulls: dict[int, _PullWriter] = {}
        #: Parked idle connections by socket descriptor.
        self._idle: dict[int, _Deadline] = {}
        #: Serves a parked connection whose next request began (a task of its own).
        self._resume = resume
        #: Closes a parked connection (taken out of here already).
        self._closed = closed
        #: What pulls' clients sent (only those that did: most send nothing).
        self._input: dict[int, PullInput] = {}

    def can_watch(self, transport: trio.abc.Stream) -> bool:
        """Whether ``transport`` can be watched here (a plain socket, on Linux)."""
        return self._epoll is not None and type(transport) is trio.SocketStream

    def watch(self, writer: _PullWriter) -> bool:
        """Watch ``writer``'s connection; ``False``: it needs a task of its own."""
        transport = writer.transport
        if not self.can_watch(transport):
            return False
        assert isinstance(transport, trio.SocketStream)
        fd = transport.socket.fileno()
        self._epoll.register(fd, _HANG_UP_EVENTS)
        self._pulls[fd] = writer
        return True

    def park(self, watch: _Deadline) -> bool:
        """Hold ``watch``'s connection, idle between requests, its task gone.

        ``False`` once the server stops (:meth:`run` is over): close it instead.
        """
        if self._epoll is None:
            return False
        fd = _descriptor(watch.transport)
        self._epoll.register(fd, _HANG_UP_EVENTS)
        self._idle[fd] = watch
        return True

    def close(self, watch: _Deadline) -> bool:
        """Close ``watch``'s connection if it is parked here; whether it was."""
        fd = _descriptor(watch.transport)
        if self._idle.get(fd) is not watch:
            return False
        del self._idle[fd]
        self._epoll.unregister(fd)  # before the socket closes
        self._closed(watch)
        return True

    def forget(self, writer: _PullWriter) -> None:
        """The pull is over: stop watching it (before its socket closes)."""
        transport = writer.transport
        if type(transport) is not trio.SocketStream:
            return
        fd = transport.socket.fileno()
        if self._pulls.get(fd) is writer:
            self._unwatch(fd)

    def _unwatch(self, fd: int) -> None:
        del self._pulls[fd]
        self._input.pop(fd, None)
        self._epoll.unregister(fd)

    async def run(self) -> None:
        """Watch until cancelled (nothing to do without epoll)."""
        epoll = self._epoll
        if epoll is None:
            await trio.sleep_forever()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                # Level-triggered: what is left is reported again next turn.
                for fd, _ in epoll.poll(0, _HANG_UP_BATCH):
                    watch = self._idle.get(fd)
                    if watch is not None:
                        self._readable(fd, watch)
                        continue
                    writer = self._pulls[fd]
                    if not self._received(fd, writer):
                        self._unwatch(fd)
                        writer.hung_up = True
                        writer.scope.cancel()
        finally:
            self._pulls.clear()
            parked, self._idle = self._idle, {}
            for watch in parked.values():  # the server shuts down
                self._closed(watch)
            trio.lowlevel.notify_closing(epoll.fileno())
            epoll.close()
            self._epoll = None  # nothing is watched or parked from now on

    def _readable(self, fd: int, watch: _Deadline) -> None:
        """A parked connection turned readable: its next request began, or its client went."""
        try:
            data = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            return  # nothing after all: it stays parked
        except OSError:  # reset
            data = b""
        del self._idle[fd]
        self._epoll.unregister(fd)
        if not data:
            self._closed(watch)
            return
        # Kept in the connection's HTTP state: its task reads on from there.
        watch.conn.receive_data(data)
        watch.received(trio.current_time())
        self._resume(watch)

    def _received(self, fd: int, writer: _PullWriter) -> bool:
        """Read what arrived on ``fd``; whether to watch on."""
        try:
            data = os.read(fd, self.READ_SIZE)
        except BlockingIOError:
            return True
        except OSError:  # reset
            return False
        watch = self._input.get(fd)
        if watch is None:
            if not data:
                return False
            watch = self._input[fd] = PullInput(writer.conn, self._options)
        try:
            return watch.received(data)
        except LocalProtocolError:
            return False


class _Deadline(ConnectionTimer):
    """A connection: its timer, and what serves it when it has no task.

    The watchdog cancels :attr:`scope` at the deadline, which ends the
    connection. A connection idle :data:`PARK_AFTER` between requests is
    parked instead (if it ``parks``: a plain socket where :class:`_HangUps`
    can watch it): :attr:`parked` is set and :attr:`scope` cancelled, which
    ends its task's wait for the next request (nothing was read: a
    cancelled wait reads nothing), and the task hands the connection to
    :attr:`hang_ups`. One cancel scope per connection (a new one each time
    it is served again), not one per request.
    """

    __slots__ = ("conn", "hang_ups", "host", "parked", "peer", "scope", "transport")

    def __init__(
        self,
        options: ServerOptions,
        now: float,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        peer: str | None,
        host: str | None,
        hang_ups: _HangUps | None,
    ) -> None:
        super().__init__(options, now, parks=hang_ups is not None)
        self.scope = trio.CancelScope()
        self.transport = transport
        self.conn = conn
        self.peer = peer
        self.host = host
        #: Where it is parked (``None``: it is not, TLS or no epoll).
        self.hang_ups = hang_ups
        #: The watchdog parked it (its task may not have left yet).
        self.parked = False

    def _park(self) -> None:
        self.parked = True
        self.scope.cancel()

    def _close(self) -> None:
        if self.hang_ups is None or not self.hang_ups.close(self):
            self.scope.cancel()


class _PullWriter(PullWriteTimer):
    """The open pull response of a session: its pull task or its handler writes.

    Whoever writes sets ``busy``; a failed or interrupted write is kept in
    ``error`` for the pull task, which then ends the pull. The heartbeat
    task writes the heartbeat of a parked pull itself (:meth:`beat`).
    """

    __slots__ = ("busy", "conn", "error", "hung_up", "rest", "scope", "stream", "transport")

    def __init__(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        stream: _ServerStream,
        scope: trio.CancelScope,
        options: ServerOptions,
    ) -> None:
        super().__init__(options.pull_write_timeout)
        self.transport = transport
        self.conn = conn
        self.stream = stream
        self.scope = scope  # the pull's: cancelled when a write takes too long
        self.busy = False
        self.error: BaseException | None = None
        #: The client went away (a flag: nobody waits for it, an Event would cost 400 bytes).
        self.hung_up = False
        #: What :meth:`beat` could not write at once: the pull task writes it first.
        self.rest = b""

    def _cancel(self) -> None:
        self.scope.cancel()

    async def send(self, data: bytes) -> None:
        """Write response bytes, each piece under the server's pull write timeout."""
        transport = self.transport
        try:
            for piece in self.pieces(data):
                self.writing(trio.current_time())
                await transport.send_all(piece)
        finally:
            self.written()

    @property
    def available(self) -> bool:
        return not self.busy and self.error is None and not self.rest

    def beat(self, now: float) -> None:
        """The heartbeat is due (the heartbeat task calls this): write it, or wake the pull.

        A parked pull on a plain socket gets its heartbeat line written here,
        in one system call: no task switch and no event per idle pull (10,000
        idle pulls take 1,000 heartbeats a second). What a full send buffer
        does not take is left in :attr:`rest` for the pull task, which waits
        for room under the pull write timeout; a pull that is writing, or
        over TLS, is woken and writes its heartbeat itself, as does one with
        something else to do (bytes queued meanwhile, its end).
        """
        stream = self.stream
        transport = self.transport
        if not (
            _WRITE_DESCRIPTOR
            and stream.pull_parked
            and self.available
            and type(transport) is trio.SocketStream
        ):
            stream._wake_pull()
            return
        action = stream.pull_action(now)
        if action is not PullAction.HEARTBEAT:
            if action is not PullAction.WAIT:
                stream._wake_pull()
            return
        data = self.conn.send_heartbeat()
        try:
            sent = os.write(transport.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # the connection broke: the pull task ends the pull
            self.error = exc
            stream._wake_pull()
            return
        if sent < len(data):
            self.rest = data[sent:]
            stream._wake_pull()

    async def write(self, data: bytes) -> None:
        """Write tunnel bytes; failures are recorded, not raised (except Cancelled)."""
        self.busy = True
        try:
            await self.send(self.conn.send_pull_data(data))
            self.stream.session.wrote(trio.current_time())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
        except BaseException as exc:  # cancelled mid-write: the chunk may be cut
            self.error = exc
            raise
        finally:
            self.busy = False


def _peer_of(transport: trio.abc.Stream) -> str | None:
    inner: Any = transport
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            address = inner.socket.getpeername()
        except OSError:
            return None
        return format_peer(address[0], address[1])
    return None


async def _accept_loop(
    listener: trio.abc.Listener[Any],
    handle: Callable[[Any], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections until cancelled (resource errors: see :class:`AcceptFailures`)."""
    failures = AcceptFailures()
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            failures.failed(exc, trio.current_time())
            await trio.sleep(failures.backoff)
            continue
        nursery.start_soon(handle, stream)


def _descriptor(transport: trio.abc.Stream) -> int:
    """The socket descriptor of a plain connection (:meth:`_HangUps.can_watch`)."""
    assert isinstance(transport, trio.SocketStream)
    return transport.socket.fileno()


def _close_socket(transport: trio.abc.Stream) -> None:
    """Close a plain connection at once (see :func:`_close_transport`)."""
    assert type(transport) is trio.SocketStream
    transport.socket.close()


async def _close_transport(transport: trio.abc.Stream) -> None:
    """Close a connection at once, without waiting for anything.

    A plain socket is closed directly: trio.aclose_forcefully would raise
    and catch a Cancelled per connection, which adds up when thousands of
    connections close at once (every other tunnel waits meanwhile).
    """
    if type(transport) is trio.SocketStream:
        transport.socket.close()
    else:
        await trio.aclose_forcefully(transport)


async def serve_pht(
    handler: Handler,
    port: int,
    *,
    host: str | bytes | None = None,
    tls: bool | ssl.SSLContext | SelfSignedCertificate = False,
    listen_backlog: int | None = None,
    token_source: TokenSource = new_token,
    handler_nursery: trio.Nursery | None = None,
    shutdown: trio.Event | None = None,
    stats: PHTStatsSink | None = None,
    options: ServerOptions | None = None,
    task_status: trio.TaskStatus[
        list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    ] = trio.TASK_STATUS_IGNORED,
    **settings: Unpack[ServerSettings],
) -> ShutdownReport:
    """Serve PHT tunnels on ``port``, running ``handler(stream)`` for each session.

    Like :func:`trio.serve_tcp`: each handler runs in its own task (in
    ``handler_nursery`` if given), and ``task_status.started()`` reports the
    listeners, so a caller that passed ``port=0`` can read the bound port.
    ``tls`` is ``False``, an :class:`ssl.SSLContext`, a
    :class:`SelfSignedCertificate`, or ``True`` for a self-signed certificate
    made at start-up (ECDSA P-256, ``O=GOST, CN=gost.run``, as GOST does).
    ``listen_backlog`` is the kernel's queue of connections not accepted yet
    (``None``: the OS maximum); ``token_source`` makes the tokens
    ``/authorize`` issues.

    The server's behaviour is tuned by keyword arguments, the fields of
    :class:`pht.ServerOptions` (``backlog``, ``strict``, ``idle_timeout``,
    ``max_sessions_per_address``, ``resume``, ...: their meanings and
    defaults are there), or by one ``options=ServerOptions(...)``.

    Without ``shutdown`` it serves until cancelled. When the ``shutdown``
    event is set, it shuts down gracefully: it stops accepting connections,
    answers ``503`` to requests that would open a session, lets the open
    sessions finish for up to ``shutdown_timeout`` seconds, then closes the
    rest (their handlers see EOF) and returns a :class:`ShutdownReport`.

    ``stats`` (a :class:`pht._stats.PHTStatsSink`, such as the command
    line's per-service counters) is told of sessions opened and closed,
    pushes and pulls accepted, and requests refused, by status.
    """
    options = ServerOptions.resolve("serve_pht", options, settings)
    sessions: ServerSessions[_ServerStream] = ServerSessions(options, token_source)
    ssl_context: ssl.SSLContext | None = server_ssl_context(tls)
    listeners: list[Any]
    if ssl_context is None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=listen_backlog)
    else:
        listeners = await trio.open_ssl_over_tcp_listeners(
            port, ssl_context, host=host, https_compatible=True, backlog=listen_backlog
        )
    async with trio.open_nursery() as nursery:
        server = _Server(
            handler,
            handler_nursery or nursery,
            options,
            sessions,
            ssl_context,
            stats,
            connections=nursery,
        )
        server.stats.enable_pht()
        nursery.start_soon(server.run_reaper)
        nursery.start_soon(server.run_heartbeats)
        nursery.start_soon(server.run_watchdog)
        nursery.start_soon(server.hang_ups.run)
        accepting = trio.CancelScope()

        # TLS listeners are reported (as trio.serve_ssl_over_tcp does), but
        # the TLS layer is pht's own: see _tls_stream.
        sockets = [getattr(listener, "transport_listener", listener) for listener in listeners]

        async def accept() -> None:
            with accepting:
                try:
                    async with trio.open_nursery() as accepters:
                        for listener in sockets:
                            accepters.start_soon(
                                _accept_loop, listener, server.handle_connection, nursery
                            )
                finally:
                    for listener in sockets:
                        await trio.aclose_forcefully(listener)

        nursery.start_soon(accept)
        task_status.started(listeners)
        if shutdown is None:
            await trio.sleep_forever()
        assert shutdown is not None
        await shutdown.wait()
        report = await _drain(server, accepting, options.shutdown_timeout)
        nursery.cancel_scope.cancel()  # idle keep-alive connections, the reaper
    return report


async def _drain(server: _Server, accepting: trio.CancelScope, timeout: float) -> ShutdownReport:
    accepting.cancel()  # closes the listeners
    at_start = server.drain()
    with trio.move_on_after(timeout):
        await server.all_done.wait()
    cut = server.cut(trio.current_time())
    with trio.move_on_after(min(timeout, 5.0)):
        await server.all_done.wait()  # handlers see EOF and return
    return ShutdownReport(finished=max(len(at_start) - len(cut), 0), cut=cut)
