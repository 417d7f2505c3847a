"""The trio server adapter: :func:`serve_pht`."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import operator
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from ._errors import LocalProtocolError, RemoteProtocolError
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
from ._server import DEFAULT_MAX_HEADER_SIZE, DEFAULT_MAX_PUSH_LINE, PUSH_PIECE, ServerConnection
from ._server_session import (
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    DEFAULT_MAX_PENDING_PER_ADDRESS,
    DEFAULT_MAX_SESSIONS_PER_ADDRESS,
    Input,
    PushVerdict,
    ServerOptions,
    ServerSession,
    ServerSessions,
    host_of,
)
from ._stats import NullStats, PHTStatsSink
from ._tls import SelfSignedCertificate, make_self_signed_certificate
from ._tls_stream import TLSSocketStream
from ._token import TokenSource, new_token
from ._trio_common import RECEIVE_SIZE, ConflictDetector, PHTStream

__all__ = ["ShutdownReport", "serve_pht"]

log = logging.getLogger("pht.server")

Handler = Callable[[PHTStream], Awaitable[object]]

#: Bytes a handler may queue before the session's first pull attaches.
_UNPULLED_ROOM = 16 * 1024
#: Sessions that start ending per scheduler batch (see _Server.teardown).
_TEARDOWN_BATCH = 32
#: TCP_NOTSENT_LOWAT where the platform has it (Linux, macOS).
_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
#: Bytes a pull write must get through within pull_write_timeout. With
#: twice this much unsent allowed in the kernel, a client reading at least
#: 3 * _PULL_PROGRESS per pull_write_timeout (3.2 KiB/s by default) keeps
#: its pull.
_PULL_PROGRESS = 64 * 1024
#: Raw bytes written per pull write.
_PULL_WRITE_SIZE = 1024 * 1024


class _ServerStream(PHTStream):
    """The server's end of one session, handed to the handler."""

    def __init__(
        self,
        session: ServerSession[_ServerStream],
        remote_address: str | None,
        max_buffered: int,
        waiting_pushes: set[_ServerStream],
    ) -> None:
        self.session = session
        self.token = session.token
        self._waiting_pushes = waiting_pushes
        self.pull_writer: _PullWriter | None = None
        self.pull_parked = False
        self.remote_address = remote_address
        # Until a pull attaches, nothing can leave: a handler may queue
        # only a little (a greeting), so that pushes to sessions nobody
        # pulls cannot make the server hold max_buffered each.
        self._full_room = max_buffered
        self._max_buffered = min(max_buffered, _UNPULLED_ROOM)
        # client -> handler
        self._inbound: deque[bytes] = deque()
        self._inbound_offset = 0
        self._data_arrived = trio.Event()
        self._consumed_lot = trio.lowlevel.ParkingLot()
        self._push_waiters = 0
        # handler -> client
        self._outbound = bytearray()
        self._outbound_ready = trio.Event()
        self._outbound_drained = trio.Event()
        # life
        self._handler_closed = False  # aclose() by the handler
        self.finished = trio.Event()  # nothing more will go to or come from the client
        self._receiving = ConflictDetector("another task is already receiving on this stream")
        self._sending = ConflictDetector("another task is already sending on this stream")
        self.bytes_in = 0
        self.bytes_out = 0

    # -- called by the handler --------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be at least 1")
        with self._receiving:
            if self._handler_closed:
                raise trio.ClosedResourceError("stream was closed")
            waited = False
            while not self._inbound:
                if self.session.closed:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return b""
                self._data_arrived = trio.Event()
                await self._data_arrived.wait()
                waited = True
                if self._handler_closed:
                    raise trio.ClosedResourceError("stream was closed")
            if not waited:  # every receive is a checkpoint, but one is enough
                await trio.lowlevel.checkpoint()
            return self._take(max_bytes or RECEIVE_SIZE)

    def _take(self, max_bytes: int) -> bytes:
        head = self._inbound[0]
        start = self._inbound_offset
        end = start + max_bytes
        if end >= len(head):
            self._inbound.popleft()
            self._inbound_offset = 0
            data = head[start:] if start else head
        else:
            data = head[start:end]
            self._inbound_offset = end
        self.session.took(len(data))
        self._consumed_lot.unpark_all()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            if self._handler_closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._wait_room()
            if self.session.closed:
                raise trio.BrokenResourceError("the PHT client closed the session")
            if len(data):
                self._outbound += data
                self.bytes_out += len(data)
                writer = self.pull_writer
                if writer is not None and self.pull_parked and writer.available:
                    # The pull is idle: write in this task, at once. That saves
                    # a task switch, and the bytes leave before the push that
                    # caused them is acknowledged (the client sees both sooner).
                    await writer.write(self.take_outbound(_PULL_WRITE_SIZE))
                    if self._outbound or writer.error is not None or not self.pull_parked:
                        self._outbound_ready.set()  # the rest, an error, or a waiter
                    return
                self._outbound_ready.set()
            await trio.lowlevel.checkpoint()

    async def _wait_room(self) -> None:
        while len(self._outbound) >= self._max_buffered and not self.session.closed:
            self._outbound_drained = trio.Event()
            await self._outbound_drained.wait()
            if self._handler_closed:
                raise trio.ClosedResourceError("stream was closed")

    async def wait_send_all_might_not_block(self) -> None:
        if self._handler_closed:
            raise trio.ClosedResourceError("stream was closed")
        await self._wait_room()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._handler_closed:
            self._handler_closed = True
            self._wake_all()
            if not self._outbound:
                self.finished.set()
        await trio.lowlevel.checkpoint()

    # -- called by the connection tasks -------------------------------------------

    async def deposit(self, data: bytes) -> bool:
        """Queue pushed bytes and wait for the session machine's verdict on them.

        Returns ``True`` to acknowledge the push, ``False`` to refuse it
        (410): not consumed within push_timeout, or the session ended.
        """
        session = self.session
        if self._handler_closed or session.closed:
            return False
        if not data:
            return True
        # No cancel scope per push (one costs more than the rest of this
        # method): the server's watchdog wakes the push at its deadline.
        session.wait_for_push(trio.current_time())
        self._waiting_pushes.add(self)
        self._push_waiters += 1
        try:
            # Pushes of one session take turns: a client pushing on several
            # connections at once cannot queue more than one push here.
            goal = None
            while True:
                now = trio.current_time()
                if goal is None and session.may_deposit():
                    self._inbound.append(data)
                    self.bytes_in += len(data)
                    goal = session.deposit(len(data), now)
                    self._data_arrived.set()
                verdict = session.verdict(session.deposited if goal is None else goal, now)
                if verdict is PushVerdict.WAIT and self._handler_closed:
                    verdict = PushVerdict.GONE  # nobody will take them
                if verdict is PushVerdict.WAIT:
                    await self._consumed_lot.park()
                    continue
                if verdict is PushVerdict.GONE and goal is not None:
                    # Pushes take turns, so all that is queued is this push's.
                    self._inbound.clear()
                    self._inbound_offset = 0
                session.push_over(verdict)
                return verdict is PushVerdict.ACK and goal is not None
        finally:
            self._push_waiters -= 1
            if not self._push_waiters:
                self._waiting_pushes.discard(self)

    def expire_push(self, now: float) -> None:
        """Wake the waiting push if its deadline has passed."""
        if now >= self.session.push_deadline:
            self._consumed_lot.unpark_all()

    def take_outbound(self, limit: int) -> bytes:
        data = bytes(self._outbound[:limit])
        del self._outbound[:limit]
        if len(self._outbound) < self._max_buffered:
            self._outbound_drained.set()
        if not self._outbound and self._handler_closed:
            self.finished.set()
        return data

    @property
    def has_outbound(self) -> bool:
        return bool(self._outbound)

    async def wait_outbound(self) -> None:
        if not self._outbound and not self.finished.is_set():
            self._outbound_ready = trio.Event()
            await self._outbound_ready.wait()

    async def wait_writer(self) -> None:
        """Wait until the handler's own pull write is over."""
        self._outbound_ready = trio.Event()
        await self._outbound_ready.wait()

    def wake_writer(self) -> None:
        """Wake the pull writer waiting in :meth:`wait_outbound`."""
        self._outbound_ready.set()

    def pull_attached(self) -> None:
        """A pull is attached: the handler may queue up to ``max_buffered`` now."""
        if self._max_buffered < self._full_room:
            self._max_buffered = self._full_room
            self._outbound_drained.set()

    def close_from_client(self) -> None:
        """Its machine ended the session: EOF for the handler, nothing more goes out."""
        self._outbound.clear()
        self._wake_all()
        self.finished.set()

    def _wake_all(self) -> None:
        self._data_arrived.set()
        self._consumed_lot.unpark_all()
        self._outbound_ready.set()
        self._outbound_drained.set()


class _Server:
    """State shared by every connection of one :func:`serve_pht` call."""

    def __init__(
        self,
        handler: Handler,
        nursery: trio.Nursery,
        options: ServerOptions,
        sessions: ServerSessions[_ServerStream],
        ssl_context: ssl.SSLContext | None,
        stats: PHTStatsSink | None = None,
    ) -> None:
        self.handler = handler
        self.stats: PHTStatsSink = stats if stats is not None else NullStats()
        self.nursery = nursery
        self.options = options
        self.sessions = sessions
        self.registry = sessions.registry
        self.ssl_context = ssl_context
        self.active: set[_ServerStream] = set()
        self.waiting_pushes: set[_ServerStream] = set()
        self.connections: set[_Deadline] = set()
        self.connections_per_address: dict[str, int] = {}
        self.pull_writers: set[_PullWriter] = set()
        self.wheel = _HeartbeatWheel(options.heartbeat_interval)
        # Ending a session wakes its handler, its pull and their clean-up:
        # when thousands end at once (a client or proxy closing everything),
        # that work would all land in one scheduler batch and stall every
        # other tunnel. Ends take turns through this gate instead, a few
        # dozen per batch.
        self.teardown = trio.CapacityLimiter(_TEARDOWN_BATCH)
        self.all_done = trio.Event()
        self.all_done.set()

    # -- sessions -----------------------------------------------------------------

    def session_for(
        self, token: str, peer: str | None, conn: ServerConnection
    ) -> _ServerStream | int:
        """The session a push or pull for ``token`` goes to, or the status to answer."""
        owner, remote_address = self.sessions.client_of(peer, conn.forwarded_for)
        session = self.sessions.admit(token, trio.current_time(), owner)
        if isinstance(session, int):
            return session
        if session.handle is None:
            session.handle = _ServerStream(
                session, remote_address, self.options.max_buffered, self.waiting_pushes
            )
        return session.handle

    def start_handler(self, stream: _ServerStream) -> None:
        """Run the handler of ``stream``'s session (the machine said it is time)."""
        self.nursery.start_soon(self._run_handler, stream)

    async def _run_handler(self, stream: _ServerStream) -> None:
        started = trio.current_time()
        self.active.add(stream)
        self.all_done = trio.Event()
        self.stats.session_opened()
        log.info("session %s accepted from %s", _short(stream.token), stream.remote_address)
        try:
            await self.handler(stream)
        except Exception:
            # One broken handler must not take the other tunnels down.
            log.exception("handler for session %s raised", _short(stream.token))
        finally:
            await stream.aclose()
            # Give the pull a moment to deliver what the handler wrote last.
            with trio.move_on_after(self.options.push_timeout):
                await stream.finished.wait()
            stream.session.end(Input.HANDLER_DONE)
            self.end_session(stream)
            self.active.discard(stream)
            self.stats.session_closed()
            if not self.active:
                self.all_done.set()
            log.info(
                "session %s closed after %.3fs: %d bytes in, %d bytes out",
                _short(stream.token),
                trio.current_time() - started,
                stream.bytes_in,
                stream.bytes_out,
            )

    def end_session(self, stream: _ServerStream) -> None:
        """Carry out the end of a session its machine has closed."""
        stream.close_from_client()
        self.sessions.forget(stream.session, trio.current_time())

    async def watchdog(self) -> None:
        """Enforce the deadlines that would cost a cancel scope per request.

        Pushes not consumed within ``push_timeout`` get 410; connections that
        take longer than ``request_timeout`` to send a request, or idle longer
        than ``keepalive_timeout`` between requests, are closed.
        """
        options = self.options
        interval = min(
            options.push_timeout / 8,
            options.request_timeout / 8,
            options.pull_write_timeout / 8,
            1.0,
        )
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for stream in list(self.waiting_pushes):
                stream.expire_push(now)
            for writer in self.pull_writers:
                if now - writer.since >= options.pull_write_timeout:
                    writer.timed_out = True
                    writer.scope.cancel()
            for connection in self.connections:
                if now >= connection.deadline:
                    connection.scope.cancel()

    async def reap(self) -> None:
        registry = self.registry
        interval = max(
            1.0,
            min(
                registry.issued_timeout,
                self.options.heartbeat_interval,
                registry.lazy_timeout / 2,
            ),
        )
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for number, record in enumerate(self.registry.expired(now), 1):
                if number % _TEARDOWN_BATCH == 0:
                    # Thousands expiring at once (a flood's junk) end a few
                    # dozen per scheduler batch, as in _Server.teardown.
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()
                if not self.sessions.expire(record, now):
                    continue  # ended, active again meanwhile, or pulled
                log.info("session %s expired after idling", _short(record.token))
                self.close_token(record.token, Input.EXPIRED)

    # -- connections --------------------------------------------------------------

    async def handle_connection(self, transport: trio.abc.Stream) -> None:
        peer = _peer_of(transport)
        host = host_of(peer)
        budget = self.sessions.connection_budget(host)
        if host is not None and budget is not None:
            count = self.connections_per_address.get(host, 0)
            if count >= budget:
                log.debug("refused a connection from %s: over its budget", peer)
                await _close_transport(transport)
                return
            self.connections_per_address[host] = count + 1
            try:
                await self._handle_connection(transport, peer)
            finally:
                count = self.connections_per_address[host] - 1
                if count:
                    self.connections_per_address[host] = count
                else:
                    del self.connections_per_address[host]
        else:
            await self._handle_connection(transport, peer)

    async def _handle_connection(self, transport: trio.abc.Stream, peer: str | None) -> None:
        if _NOTSENT_LOWAT is not None and isinstance(transport, trio.SocketStream):
            # The kernel holds at most this much not yet sent (beyond what is
            # in flight): a pull that stopped reading shows as a stalled write
            # at once, and one that reads slowly shows progress with every
            # window update, instead of after megabytes of send buffer drain.
            with contextlib.suppress(OSError):
                transport.setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, 2 * _PULL_PROGRESS)
        options = self.options
        conn = ServerConnection(
            options.paths,
            max_push_line=options.max_push_line,
            max_header_size=options.max_header_size,
        )
        watch = _Deadline(trio.current_time() + options.keepalive_timeout)
        self.connections.add(watch)
        try:
            with watch.scope:
                if self.ssl_context is not None and isinstance(transport, trio.SocketStream):
                    watch.deadline = trio.current_time() + options.request_timeout
                    transport = TLSSocketStream.wrap(transport, self.ssl_context, server_side=True)
                    try:
                        await transport.do_handshake()
                    except trio.BrokenResourceError as exc:
                        log.info("connection from %s: %s", peer, exc)
                        return
                    watch.deadline = trio.current_time() + options.keepalive_timeout
                await self._serve_requests(transport, conn, peer, watch)
            if watch.scope.cancelled_caught:
                log.debug("connection from %s timed out", peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError) as exc:
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            self.connections.discard(watch)
            await _close_transport(transport)

    async def _serve_requests(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        peer: str | None,
        watch: _Deadline,
    ) -> None:
        """Answer the requests of one connection until it closes."""
        options = self.options
        streaming = False
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                log.info("bad request from %s: %s", peer, exc)
                await transport.send_all(self.refusal(conn, exc.status_hint))
                return
            if event is NEED_DATA:
                if conn.state is not ServerConnectionState.IDLE:
                    return
                if conn.expects_continue:
                    await transport.send_all(conn.send_continue())
                # In a long push line, read a piece at a time: what is read
                # is held until the handler took it.
                data = await transport.receive_some(PUSH_PIECE if streaming else RECEIVE_SIZE)
                conn.receive_data(data)
                if not data:
                    return
                del data  # the core has it: not kept alive while a push waits
                if watch.between_requests:
                    # A request has begun: all of it must arrive in time
                    # (slowloris), whatever the keep-alive allowance was.
                    watch.between_requests = False
                    watch.deadline = trio.current_time() + options.request_timeout
                continue
            watch.deadline = math.inf  # answering: push_timeout etc. apply
            if type(event) is PushData:
                # A piece of a long push line: deliver it, read on.
                streaming = True
                status = await self._deliver(event, conn, peer)
                if status != 200:
                    gone = "push not consumed in time"
                    self.stats.refused(status)
                    conn.discard_push(status, gone if status == 410 else "push refused")
                watch.deadline = trio.current_time() + options.request_timeout
                continue
            streaming = False
            if isinstance(event, PushRequest):
                status = await self._deliver(event, conn, peer)
                if status == 200:
                    self.stats.push()
                    answer = conn.send_push_ack()
                else:
                    answer = self.refusal(conn, status)
                await transport.send_all(answer)
            elif isinstance(event, PullRequest):
                await self._pull(transport, conn, event, peer)
            elif isinstance(event, CloseRequest):
                log.debug("session %s: %s", _short(event.token), event.reason)
                async with self.teardown:
                    self.close_token(event.token)
                await transport.send_all(conn.send_push_ack())
            elif isinstance(event, AuthorizeRequest):
                owner = self.sessions.client_of(peer, conn.forwarded_for)[0]
                token = self.sessions.authorize(trio.current_time(), owner)
                if isinstance(token, str):
                    answer = conn.send_token(token)
                else:
                    answer = self.refusal(conn, token)
                await transport.send_all(answer)
            elif isinstance(event, BadRequest):
                status = event.status_code
                log.info("refused a request from %s (%d): %s", peer, status, event.reason)
                if event.token is not None:
                    self.close_token(event.token)
                await transport.send_all(self.refusal(conn, event.status_code))
            if conn.state is ServerConnectionState.CLOSED:
                return
            watch.between_requests = True
            watch.deadline = trio.current_time() + options.keepalive_timeout

    def refusal(self, conn: ServerConnection, status: int) -> bytes:
        """The bytes that answer a request with the error ``status``, counted."""
        self.stats.refused(status)
        return conn.send_status(status)

    def close_token(self, token: str, event: Input = Input.CLOSE) -> None:
        """End ``token``'s session, or make sure a late request cannot open one."""
        session = self.sessions.close(token, trio.current_time(), event)
        if session is not None and session.handle is not None:
            session.handle.close_from_client()

    async def _deliver(
        self, event: PushRequest | PushData, conn: ServerConnection, peer: str | None
    ) -> int:
        """Hand a push's bytes to its session: the status to answer (200, 410 or a refusal).

        A long push arrives as PushData pieces, each delivered so.
        """
        stream = self.session_for(event.token, peer, conn)
        if isinstance(stream, int):
            return stream
        if event.data and stream.session.push_data():
            self.start_handler(stream)
        if await stream.deposit(event.data):
            return 200
        # GOST answers 410 when the bytes were not taken in time; the session ends.
        self.end_session(stream)
        return 410

    async def _pull(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        event: PullRequest,
        peer: str | None,
    ) -> None:
        stream = self.session_for(event.token, peer, conn)
        if isinstance(stream, int):
            await transport.send_all(self.refusal(conn, stream))
            return
        session = stream.session
        hung_up = trio.Event()
        async with trio.open_nursery() as nursery:
            writer = _PullWriter(transport, conn, stream, nursery.cancel_scope)
            replaced, start = self.sessions.attach_pull(session, writer, trio.current_time())
            if isinstance(replaced, _PullWriter):
                replaced.scope.cancel()  # a newer long poll replaces a stale one
            self.pull_writers.add(writer)
            beat = _HeartbeatTimer(stream, writer)
            try:
                await writer.send(conn.start_pull())
                self.stats.pull()
                stream.pull_attached()
                if start:
                    self.start_handler(stream)
                nursery.start_soon(
                    self._watch_for_hangup, transport, conn, hung_up, nursery.cancel_scope
                )
                self.wheel.add(beat)
                stream.pull_writer = writer
                await self._feed_pull(stream, writer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                hung_up.set()  # the write failed: the client is gone
            finally:
                self.wheel.discard(beat)
                self.pull_writers.discard(writer)
                if stream.pull_writer is writer:
                    stream.pull_writer = None
                nursery.cancel_scope.cancel()
        ended = session.pull_ended(writer, hung_up=hung_up.is_set(), stalled=writer.timed_out)
        if ended:
            # The client stopped reading, or went away mid-pull and no newer
            # pull took over: the session cannot deliver anything any more.
            log.debug("session %s: pull %s", _short(stream.token), session.ended_by)
            self.end_session(stream)
        if writer.timed_out:
            raise trio.BrokenResourceError("pull write timed out")

    async def _feed_pull(self, stream: _ServerStream, writer: _PullWriter) -> None:
        """Write the session's bytes, heartbeats and finally the end of the pull."""
        conn, session = writer.conn, stream.session
        while True:
            if writer.error is not None:
                raise trio.BrokenResourceError("pull write failed") from writer.error
            if writer.busy:  # the handler is writing: wait until it is done
                await stream.wait_writer()
                continue
            if stream.has_outbound:
                await writer.write(stream.take_outbound(_PULL_WRITE_SIZE))
                self.sessions.touch(session, session.last_write)
                continue
            if stream.finished.is_set():
                if session.lost_data:
                    # No last chunk: the connection closes mid-answer.
                    raise trio.BrokenResourceError("session ended with pushed bytes refused")
                await writer.send(conn.end_pull())
                return
            now = trio.current_time()
            if now >= session.heartbeat_due():
                session.wrote(now)
                await writer.send(conn.send_heartbeat())
                continue
            stream.pull_parked = True
            try:
                await stream.wait_outbound()
            finally:
                stream.pull_parked = False

    async def _watch_for_hangup(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        hung_up: trio.Event,
        scope: trio.CancelScope,
    ) -> None:
        """Notice at once when a pulling client goes away (GOST waits for a failed write)."""
        allowance = self.options.max_header_size  # a pipelined request head, at most
        try:
            while True:
                data = await transport.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                # A pipelined request is kept for later. Never drop bytes here:
                # a proxy sends the next request as soon as the pull's end has
                # gone out, and it may arrive before this task is cancelled.
                conn.receive_data(data)
                allowance -= len(data)
                if allowance < 0:
                    # No client streams data up an open pull: stop reading
                    # (at most one read past the bound is buffered).
                    log.debug("pull connection sent more than a request head: dropped")
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
        hung_up.set()
        async with self.teardown:  # see _Server.teardown
            scope.cancel()


class _Deadline:
    """When a connection's wait for its next request (or the rest of it) ends."""

    __slots__ = ("between_requests", "deadline", "scope")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.between_requests = True
        self.scope = trio.CancelScope()


class _PullWriter:
    """The open pull response of a session: its pull task or its handler writes.

    Whoever writes sets ``busy``; a failed or interrupted write is kept in
    ``error`` for the pull task, which then ends the pull.
    """

    __slots__ = ("busy", "conn", "error", "scope", "session", "since", "timed_out", "transport")

    def __init__(
        self,
        transport: trio.abc.Stream,
        conn: ServerConnection,
        stream: _ServerStream,
        scope: trio.CancelScope,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.session = stream.session
        self.scope = scope  # the pull's: cancelled when a write takes too long
        self.since = math.inf  # when the write in progress began
        self.timed_out = False
        self.busy = False
        self.error: BaseException | None = None

    async def send(self, data: bytes) -> None:
        """Write response bytes, under the server's pull write timeout.

        The timeout bounds each piece of ``_PULL_PROGRESS`` bytes, not the
        whole write: a slow client that keeps reading is not cut, one that
        stopped is.
        """
        transport = self.transport
        try:
            if len(data) <= _PULL_PROGRESS:
                self.since = trio.current_time()
                await transport.send_all(data)
                return
            with memoryview(data) as view:
                for start in range(0, len(view), _PULL_PROGRESS):
                    self.since = trio.current_time()
                    await transport.send_all(view[start : start + _PULL_PROGRESS])
        finally:
            self.since = math.inf

    @property
    def available(self) -> bool:
        return not self.busy and self.error is None

    async def write(self, data: bytes) -> None:
        """Write tunnel bytes; failures are recorded, not raised (except Cancelled)."""
        self.busy = True
        try:
            await self.send(self.conn.send_pull_data(data))
            self.session.wrote(trio.current_time())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.error = exc
        except BaseException as exc:  # cancelled mid-write: the chunk may be cut
            self.error = exc
            raise
        finally:
            self.busy = False


class _HeartbeatTimer:
    """One pull's place in the heartbeat wheel."""

    __slots__ = ("pull", "slot", "stream")

    def __init__(self, stream: _ServerStream, pull: _PullWriter) -> None:
        self.stream = stream
        self.pull = pull
        self.slot = 0  # the wheel's slot it is filed under


class _HeartbeatWheel:
    """Wakes every pull whose session machine says a heartbeat is due.

    One task for all pulls, filed by due time in slots of ``interval / 8``:
    it wakes when the earliest slot is due, and an idle server (or an idle
    pull between two heartbeats) costs nothing. Data written on a pull
    moves the due time only; the pull is re-filed when its slot comes up.
    A heartbeat goes out between ``interval`` and ``interval * 9 / 8`` after
    the last write.
    """

    def __init__(self, interval: float) -> None:
        self.tick = interval / 8
        self.slots: dict[int, set[_HeartbeatTimer]] = {}
        self._added = trio.Event()

    def add(self, beat: _HeartbeatTimer) -> None:
        due = beat.stream.session.heartbeat_due()
        if due < math.inf:  # else the pull is over already
            self._file(beat, due)
            self._added.set()

    def discard(self, beat: _HeartbeatTimer) -> None:
        bucket = self.slots.get(beat.slot)
        if bucket is not None:
            bucket.discard(beat)
            if not bucket:
                del self.slots[beat.slot]

    def _file(self, beat: _HeartbeatTimer, due: float) -> None:
        beat.slot = slot = math.ceil(due / self.tick)
        bucket = self.slots.get(slot)
        if bucket is None:
            self.slots[slot] = {beat}
        else:
            bucket.add(beat)

    async def run(self) -> None:
        while True:
            if not self.slots:
                self._added = trio.Event()
                await self._added.wait()
                continue
            await trio.sleep_until(min(self.slots) * self.tick)
            now = trio.current_time()
            for slot in [slot for slot in self.slots if slot * self.tick <= now]:
                for beat in self.slots.pop(slot):
                    session = beat.stream.session
                    if session.pull is not beat.pull:
                        continue  # replaced or over: its pull discards nothing now
                    due = session.heartbeat_due()
                    if now >= due:
                        beat.stream.wake_writer()
                        due = now + self.tick * 8
                    self._file(beat, due)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShutdownReport:
    """What a graceful shutdown of :func:`serve_pht` did."""

    #: Sessions that ended on their own within the grace period.
    finished: int
    #: Sessions still open at the deadline and closed by the server (tokens
    #: shortened as in the logs).
    cut: tuple[str, ...]


def _peer_of(transport: trio.abc.Stream) -> str | None:
    inner: Any = transport
    while isinstance(inner, trio.SSLStream):
        inner = inner.transport_stream
    if isinstance(inner, trio.SocketStream):
        try:
            address = inner.socket.getpeername()
        except OSError:
            return None
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


#: accept() errors that mean "out of resources", not "listener broken".
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    code
    for code in (
        getattr(errno, "EMFILE", None),
        getattr(errno, "ENFILE", None),
        getattr(errno, "ENOMEM", None),
        getattr(errno, "ENOBUFS", None),
    )
    if code is not None
)
#: Seconds between two "out of file descriptors" warnings.
_ACCEPT_WARNING_INTERVAL = 10.0
#: Seconds accept() waits after running out of file descriptors.
_ACCEPT_BACKOFF = 0.1


async def _accept_loop(
    listener: trio.abc.Listener[Any],
    handle: Callable[[Any], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections until cancelled.

    At the file descriptor limit (and other resource errors) accept backs
    off briefly and logs one warning per interval with the count since the
    last one, instead of an error with a traceback per attempt.
    """
    failures = 0
    warned_at = -math.inf
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            failures += 1
            now = trio.current_time()
            if now - warned_at >= _ACCEPT_WARNING_INTERVAL:
                log.warning(
                    "cannot accept connections: %s (%d times since the last warning);"
                    " raise the file descriptor limit (ulimit -n) or lower max_sessions",
                    exc.strerror or exc,
                    failures,
                )
                warned_at, failures = now, 0
            await trio.sleep(_ACCEPT_BACKOFF)
            continue
        nursery.start_soon(handle, stream)


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


def _short(token: str) -> str:
    return token[:8] + "…" if len(token) > 10 else token


async def serve_pht(
    handler: Handler,
    port: int,
    *,
    host: str | bytes | None = None,
    tls: bool | ssl.SSLContext | SelfSignedCertificate = False,
    authorize_path: str = "/authorize",
    push_path: str = "/push",
    pull_path: str = "/pull",
    backlog: int = 128,
    listen_backlog: int | None = None,
    heartbeat_interval: float = 10.0,
    strict: bool = False,
    max_sessions: int = 10_000,
    max_sessions_per_address: int | None = DEFAULT_MAX_SESSIONS_PER_ADDRESS,
    max_pending_per_address: int | None = DEFAULT_MAX_PENDING_PER_ADDRESS,
    max_connections_per_address: int | None = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
    trusted_proxies: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
    idle_timeout: float | None = 600.0,
    issued_timeout: float = 60.0,
    lazy_timeout: float = 10.0,
    push_timeout: float = 30.0,
    pull_write_timeout: float = 60.0,
    request_timeout: float = 60.0,
    keepalive_timeout: float = 120.0,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    max_push_line: int = DEFAULT_MAX_PUSH_LINE,
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    token_source: TokenSource = new_token,
    handler_nursery: trio.Nursery | None = None,
    shutdown: trio.Event | None = None,
    shutdown_timeout: float = 30.0,
    stats: PHTStatsSink | None = None,
    task_status: trio.TaskStatus[
        list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
    ] = trio.TASK_STATUS_IGNORED,
) -> ShutdownReport:
    """Serve PHT tunnels on ``port``, running ``handler(stream)`` for each session.

    Like :func:`trio.serve_tcp`: each handler runs in its own task (in
    ``handler_nursery`` if given), and ``task_status.started()`` reports the
    listeners, so a caller that passed ``port=0`` can read the bound port.
    ``tls`` is ``False``, an :class:`ssl.SSLContext`, a
    :class:`SelfSignedCertificate`, or ``True`` for a self-signed certificate
    made at start-up (ECDSA P-256, ``O=GOST, CN=gost.run``, as GOST does).

    Tokens issued by ``authorize_path`` and tokens that modern GOST clients
    make themselves are both accepted (``strict=True`` accepts only issued
    ones). ``backlog`` bounds tokens issued but not used yet (``429``
    beyond), ``max_sessions`` the session table; ``listen_backlog`` is the
    kernel's queue of connections not accepted yet (``None``: the OS
    maximum). Pulls stay open and carry a
    heartbeat line every ``heartbeat_interval`` seconds. A push is
    acknowledged once the handler took its bytes; if it does not within
    ``push_timeout``, the answer is ``410`` and the session ends, as in GOST.
    Sessions idle for ``idle_timeout`` seconds (tokens never used:
    ``issued_timeout``) are closed. A connection must deliver each request
    within ``request_timeout`` seconds of its first byte (slow-header
    clients are cut) and is closed after ``keepalive_timeout`` idle seconds
    between requests. A pull write that takes longer than
    ``pull_write_timeout`` (the client stopped reading) ends its session.

    Admission: one client address holds at most ``max_sessions_per_address``
    sessions, ``max_pending_per_address`` issued-but-unused tokens and
    ``max_connections_per_address`` connections (``None``: no budget), so
    that one anonymous party cannot lock others out. Sessions a client made
    by pushing or pulling a token of its own are closed after
    ``lazy_timeout`` seconds unless a pull attaches to them; a session's
    handler starts with its first pushed byte or its first pull, never for a
    refused request. Behind a reverse proxy,
    list it in ``trusted_proxies`` (addresses or networks): the client's
    address is then taken from ``X-Forwarded-For`` / ``X-Real-IP`` of its
    requests, for the budgets, the logs and the stream's ``remote_address``.
    See ``docs/security.md``.

    Without ``shutdown`` it serves until cancelled. When the ``shutdown``
    event is set, it shuts down gracefully: it stops accepting connections,
    answers ``503`` to requests that would open a session, lets the open
    sessions finish for up to ``shutdown_timeout`` seconds, then closes the
    rest (their handlers see EOF) and returns a :class:`ShutdownReport`.

    ``stats`` (a :class:`pht._stats.PHTStatsSink`, such as the command
    line's per-service counters) is told of sessions opened and closed,
    pushes and pulls accepted, and requests refused, by status.
    """
    options = ServerOptions.build(
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
        max_connections_per_address=max_connections_per_address,
        idle_timeout=idle_timeout,
        issued_timeout=issued_timeout,
        lazy_timeout=lazy_timeout,
        push_timeout=push_timeout,
        pull_write_timeout=pull_write_timeout,
        request_timeout=request_timeout,
        keepalive_timeout=keepalive_timeout,
        max_buffered=max_buffered,
        max_push_line=max_push_line,
        max_header_size=max_header_size,
        shutdown_timeout=shutdown_timeout,
    )
    sessions: ServerSessions[_ServerStream] = ServerSessions(options, token_source)
    ssl_context: ssl.SSLContext | None
    if tls is True:
        ssl_context = make_self_signed_certificate().server_context()
    elif tls is False:
        ssl_context = None
    elif isinstance(tls, SelfSignedCertificate):
        ssl_context = tls.server_context()
    elif isinstance(tls, ssl.SSLContext):
        ssl_context = tls
    else:
        raise TypeError(f"tls must be a bool or an ssl.SSLContext, not {type(tls).__name__}")
    listeners: list[Any]
    if ssl_context is None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=listen_backlog)
    else:
        listeners = await trio.open_ssl_over_tcp_listeners(
            port, ssl_context, host=host, https_compatible=True, backlog=listen_backlog
        )
    async with trio.open_nursery() as nursery:
        server = _Server(
            handler, handler_nursery or nursery, options, sessions, ssl_context, stats
        )
        server.stats.enable_pht()
        nursery.start_soon(server.reap)
        nursery.start_soon(server.wheel.run)
        nursery.start_soon(server.watchdog)
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
    server.sessions.drain()
    at_start = set(server.active)
    log.info("shutting down: %d sessions open, waiting up to %.1fs", len(at_start), timeout)
    with trio.move_on_after(timeout):
        await server.all_done.wait()
    cut = tuple(sorted(_short(stream.token) for stream in server.active))
    for stream in list(server.active):
        stream.session.end(Input.SHUTDOWN)
        server.end_session(stream)
    with trio.move_on_after(min(timeout, 5.0)):
        await server.all_done.wait()  # handlers see EOF and return
    finished = len(at_start) - len(cut)
    if cut:
        log.warning("shutdown cut %d sessions: %s", len(cut), ", ".join(cut))
    return ShutdownReport(finished=max(finished, 0), cut=cut)
