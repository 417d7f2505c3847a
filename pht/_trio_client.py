"""The trio client adapter: :func:`open_pht_stream`."""

from __future__ import annotations

import operator
import select
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from ._client import ClientChannel, ClientConfig
from ._client_session import (
    ClientOptions,
    ClientSession,
    ClientSessionState,
    ClientSettings,
    CollectAck,
    Deliver,
    EndOfStream,
    Established,
    PollAgain,
    PullAction,
    PushChunk,
    PushVerdict,
    Reattach,
    SendAuthorize,
    SendPull,
    ssl_context_for,
)
from ._errors import LocalProtocolError, PHTError, RemoteProtocolError, TunnelError
from ._events import NEED_DATA, ChannelState, ClientEvent
from ._resume import SessionGone
from ._tls_stream import TLSSocketStream
from ._trio_common import (
    RECEIVE_SIZE,
    BrokenSessionGone,
    BrokenTunnelError,
    ClosedTunnelError,
    ConflictDetector,
    PHTStream,
    write_pieces,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["open_pht_stream"]

#: ``open_transport(host, port)``: a byte stream to ``host:port`` (see :func:`open_pht_stream`).
TransportOpener = Callable[[str, int], Awaitable[trio.abc.Stream]]

#: Bytes asked of the socket per read. Reads this size keep every buffer on the
#: pull path (socket read, h11's buffer, line reassembly) in cache and below
#: malloc's mmap threshold; 256 KiB reads cost page faults on each allocation.
_CLIENT_RECEIVE_SIZE = 64 * 1024
#: What a failed connection raises (a closed one: another task dropped it).
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, PHTError)


def _readable_now(fileno: int) -> bool:
    """Whether a read on ``fileno`` would not block (data, EOF or an error)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fileno], [], [], 0)[0])  # pragma: no cover - Windows


async def _read_ready(transport: trio.abc.Stream) -> bytes | bytearray | None:
    """What ``transport`` has delivered, without waiting: ``None`` if nothing.

    ``b""`` stands for an EOF and for a broken connection alike. A transport
    without a socket of its own (one ``open_transport`` wrapped, or
    ``trio.SSLStream`` over it) cannot be looked at without waiting: ``None``,
    so only the ``keepalive_expiry`` idle limit retires its idle connections.
    """
    try:
        if isinstance(transport, TLSSocketStream):
            return transport.receive_nowait(_CLIENT_RECEIVE_SIZE)
        sock = getattr(transport, "socket", None)
        if sock is None:
            return None
        if not _readable_now(sock.fileno()):
            return None
        return await transport.receive_some(_CLIENT_RECEIVE_SIZE)
    except (trio.BrokenResourceError, OSError):
        return b""


class _Connection:
    """One HTTP connection of the client: a transport and its sans-IO channel."""

    def __init__(
        self, transport: trio.abc.Stream, config: ClientConfig, *, push_window: int = 1
    ) -> None:
        self.transport = transport
        self.channel = ClientChannel(config, push_window=push_window)
        self.last_used = trio.current_time()
        #: How long the connection was idle before its latest request.
        self.idle_for = 0.0

    async def reusable(self) -> bool:
        """Whether a request may be written here (:meth:`ClientChannel.reusable`)."""
        channel = self.channel
        if channel.state is not ChannelState.IDLE:
            return False
        data = await _read_ready(self.transport)
        if data is not None:
            try:
                channel.receive_data(data)
            except LocalProtocolError:  # bytes after an EOF: unusable all the same
                pass
        self.idle_for = trio.current_time() - self.last_used
        return channel.reusable(self.idle_for)

    async def send(self, pieces: bytes | list[bytes]) -> None:
        self.last_used = trio.current_time()
        try:
            if isinstance(pieces, bytes):
                await self.transport.send_all(pieces)
            else:
                await write_pieces(self.transport, pieces)
        except BaseException:
            self.channel.send_failed()
            raise

    async def next_event(self) -> ClientEvent:
        channel = self.channel
        while True:
            event = channel.next_event()
            if event is not NEED_DATA:
                self.last_used = trio.current_time()
                return event
            if channel.state in (ChannelState.CLOSED, ChannelState.ERROR):
                raise BrokenTunnelError("connection to the PHT server is closed")
            data = await self.transport.receive_some(_CLIENT_RECEIVE_SIZE)
            channel.receive_data(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.transport)


class _ClientStream(PHTStream):
    """The client's end of a tunnel: moves bytes as its :class:`ClientSession` says.

    A write is a loop over :meth:`ClientSession.write_step`; what an answer
    or a failure means for the push connection is the session's
    :class:`PushVerdict`. The pull is a loop over
    :meth:`ClientSession.pull_event`.
    """

    def __init__(
        self, *, session: ClientSession, connect: _Connector, pull: _Connection, push: _Connection
    ) -> None:
        assert session.token is not None
        self.token = session.token
        self.remote_address = session.options.address
        self._session = session
        self._connect = connect
        self._pull = pull
        self._push: _Connection | None = push
        self._ack: _Connection | None = None  # ack-only pushes (resume)
        self._pending = b""
        self._pending_offset = 0
        self._closed = False
        self._send_conflict = ConflictDetector("another task is already sending on this stream")
        self._receive_conflict = ConflictDetector(
            "another task is already receiving on this stream"
        )
        # Push answers are read by one task at a time: the sending task, or a
        # receive waiting for the pull while pushes of earlier writes are in
        # flight (ClientSession.watch_answers). ``_receive_scope`` lets the
        # sending side wake such a receive: to report a refusal, or to make it
        # watch the pushes that a returning write left in flight.
        self._answers_lock = trio.Lock()
        self._push_lock = trio.Lock()  # resume: one task writes pushes at a time
        self._receive_scope: trio.CancelScope | None = None
        self._receive_watching = False
        # A pull event read just before such a wake-up: not lost, returned next.
        self._stashed_event: ClientEvent | None = None

    def _in_flight(self) -> int:
        push = self._push
        return 0 if push is None else push.channel.pushes_in_flight

    async def _ready(self, connection: _Connection | None, *, shield: bool = False) -> _Connection:
        """``connection`` if the next request may go on it (it pipelines pushes,
        or is idle and reusable), else a new one: nothing of the request was
        written to the old one, so replacing it is safe. ``shield``: a new one
        is made even if the caller is cancelled (``connect_timeout`` bounds it)."""
        if connection is not None:
            if connection.channel.pushes_in_flight or await connection.reusable():
                return connection
            await connection.aclose()
        with trio.CancelScope(shield=shield):
            new = await self._connect.open()
        return new

    # -- sending ----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_open()
            session = self._session
            if session.send_error is not None:
                raise _broken(session.send_error)
            view = memoryview(data)
            if not view.nbytes:
                await trio.lowlevel.checkpoint()
                return
            view = view.cast("B")
            try:
                push = self._push
                if push is not None and session.should_settle(
                    push.channel.pushes_in_flight, trio.current_time() - push.last_used
                ):
                    await self._pump(view[:0], window=1, keep=0)
                window = session.push_window_for(len(view))
                await self._pump(view, window=window, keep=session.keep_after_write)
            except trio.Cancelled:
                session.break_sending("a send_all was cancelled; the stream is broken")
                raise
            in_flight = self._in_flight()
            session.write_returned(in_flight)
            # A receive waiting for the pull watches what the write left in flight.
            if session.watch_answers(in_flight) and not self._receive_watching:
                self._wake_receive()

    async def _pump(self, view: memoryview, *, window: int, keep: int) -> None:
        """Hand ``view`` on and collect answers, each step as the session says."""
        session = self._session
        resume = session.resume
        offset = 0
        while True:
            if session.send_error is not None:
                raise _broken(session.send_error)
            if resume is not None and offset < len(view):
                offset += session.resume_write(view[offset:])
            push = self._push
            step = session.write_step(
                queued=len(view) - offset,
                in_flight=0 if push is None else push.channel.pushes_in_flight,
                window=window,
                keep=keep,
            )
            if type(step) is PushChunk:
                if resume is None:
                    end = offset + step.size
                    await self._push_once(view[offset:end])
                    offset = end
                else:
                    async with self._push_lock:  # a watching receive pushes too
                        if resume.unpushed and session.send_error is None:
                            await self._push_once(None)
            elif type(step) is CollectAck:
                assert push is not None
                await self._collect(push)
            else:
                return

    async def _push_once(self, chunk: memoryview | None) -> None:
        """Write one push: ``chunk``, or (``None``) the replay buffer's next bytes."""
        session = self._session
        try:
            # Shielded for a resume push: a receive that watches the pushes
            # must not throw away a connection it made.
            self._push = connection = await self._ready(self._push, shield=chunk is None)
        except TunnelError as exc:
            self._push = None
            await self._push_broke(None, exc)
            return
        data: bytes | memoryview
        headers: Sequence[tuple[bytes, bytes]] = ()
        if chunk is None:
            # A receive watching the pushes is cancelled when the pull has
            # data: better here, before the push is claimed and half written.
            await trio.lowlevel.checkpoint_if_cancelled()
            resume = session.resume
            assert resume is not None
            if not resume.unpushed:
                return  # an answer read meanwhile acknowledged it all: nothing to push
            data, headers = session.resume_push()
        else:
            data = chunk
        try:
            await connection.send(connection.channel.push(self.token, data, headers))
        except trio.Cancelled:
            session.push_interrupted()  # part of it may be out: not on this connection again
            await self._drop_push(connection)
            raise
        except _BROKEN as exc:
            await self._push_broke(connection, exc)
            return
        if chunk is not None:
            session.pushed(len(chunk))

    async def _collect(self, connection: _Connection) -> None:
        """Read and judge the answer to the oldest push (unless another task did)."""
        async with self._answers_lock:
            channel = connection.channel
            if self._push is not connection or not channel.pushes_in_flight:
                return
            try:
                event = await connection.next_event()
            except _BROKEN as exc:
                await self._push_broke(connection, exc)
                return
            session = self._session
            try:
                verdict = session.answer_push(
                    event,
                    channel.resume_headers,
                    closed=channel.state is ChannelState.CLOSED,
                    still_in_flight=channel.pushes_in_flight,
                    now=connection.last_used,  # when the answer was read
                )
            except TunnelError as exc:
                if session.refused is not None:
                    self._wake_receive()
                await self._drop_push(connection)
                raise _broken(exc) from None
            if verdict.drop:
                await self._follow(connection, verdict)

    async def _push_broke(self, connection: _Connection | None, exc: BaseException) -> None:
        """A push on ``connection`` failed with ``exc`` (``None``: connecting
        failed): do as the session says, unless another task saw it first."""
        if connection is not None and self._push is not connection:
            return
        session = self._session
        now = trio.current_time()
        try:
            if connection is None:
                assert isinstance(exc, TunnelError)
                verdict = session.push_connect_failed(exc, now)
            else:
                verdict = session.push_broke(exc, idle_for=connection.idle_for, now=now)
        except TunnelError as error:
            await self._drop_push(connection)
            raise _broken(error) from exc
        await self._follow(connection, verdict)

    async def _follow(self, connection: _Connection | None, verdict: PushVerdict) -> None:
        """Drop the push ``connection`` and wait, as ``verdict`` says."""
        if verdict.drop and connection is not None:
            await self._drop_push(connection)
        if verdict.retry_after is not None:
            await trio.sleep(verdict.retry_after)

    async def _drop_push(self, connection: _Connection | None) -> None:
        """Close the push ``connection``: the next push goes on a new one."""
        if connection is not None:
            if self._push is connection:
                self._push = None
            await connection.aclose()

    def _wake_receive(self) -> None:
        """Make a receive waiting for the pull look at the push side again."""
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def _send_ack_only(self) -> None:
        """Tell the server what arrived (its replay buffer is half full), on a
        connection of its own: never pipelined behind a data push."""
        session = self._session
        while session.ack_due:
            ack, headers = session.ack_only_headers()
            reason: BaseException | str
            try:
                self._ack = connection = await self._ready(self._ack)
                await connection.send(connection.channel.ack_only(self.token, headers))
                event = await connection.next_event()
            except _BROKEN as exc:
                reason = exc
            else:
                try:
                    again = session.ack_only_answer(ack, event, connection.channel.resume_headers)
                except TunnelError as exc:
                    raise _broken(exc) from None
                if not again:
                    return
                reason = f"the server answered {event}"
            if self._ack is not None:
                await self._ack.aclose()
                self._ack = None
            try:
                delay = session.retry_delay(reason, trio.current_time())
            except TunnelError as exc:
                raise _broken(exc) from None
            await trio.sleep(delay)

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()

    # -- receiving --------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_conflict:
            self._check_open()
            if self._session.refused is not None:
                raise _broken(self._session.refused)
            if max_bytes is None:
                max_bytes = RECEIVE_SIZE
            elif operator.index(max_bytes) < 1:
                raise ValueError("max_bytes must be at least 1")
            if self._pending_offset < len(self._pending):
                await trio.lowlevel.checkpoint()
                return self._take(max_bytes)
            state = self._session.state
            if state is ClientSessionState.ENDED:
                await trio.lowlevel.checkpoint()
                return b""
            if state is ClientSessionState.ERROR:
                assert self._session.error is not None
                raise _broken(self._session.error)
            return await self._receive(max_bytes)

    def _take(self, max_bytes: int) -> bytes:
        start = self._pending_offset
        if start == 0 and len(self._pending) <= max_bytes:
            data, self._pending = self._pending, b""
            return data
        end = start + max_bytes
        data = self._pending[start:end]
        if end >= len(self._pending):
            self._pending, self._pending_offset = b"", 0
        else:
            self._pending_offset = end
        return data

    async def _receive(self, max_bytes: int) -> bytes:
        session = self._session
        while True:
            action: PullAction
            try:
                event = await self._next_pull_event()  # _send_pull may replace the pull
            except _BROKEN as exc:
                if self._closed:
                    raise ClosedTunnelError("stream was closed") from None
                quiet = trio.current_time() - self._pull.last_used
                try:
                    action = session.pull_broken(exc, quiet_for=quiet)
                except TunnelError as error:
                    raise _broken(error) from exc
            else:
                try:
                    action = session.pull_event(event, self._pull.channel.resume_headers)
                except TunnelError as exc:
                    raise _broken(exc) from None
            if type(action) is Deliver:
                self._pending, self._pending_offset = action.data, 0
                if session.ack_due:
                    await self._send_ack_only()
                return self._take(max_bytes)
            if type(action) is EndOfStream:
                await trio.lowlevel.checkpoint()
                return b""
            if type(action) is PollAgain:
                try:
                    await self._send_pull()
                    continue
                except (TunnelError, trio.BrokenResourceError, OSError) as exc:
                    try:
                        action = session.repoll_broken(exc)
                    except TunnelError as error:
                        raise _broken(error) from exc
            if type(action) is Reattach:
                await self._reattach(action.reason)

    async def _next_pull_event(self) -> ClientEvent:
        """The pull's next event; a refusal of an earlier write's push raises instead."""
        session = self._session
        if not session.keep_after_write:  # stop and wait: writes settle their pushes
            return await self._pull.next_event()
        while True:
            if session.refused is not None:
                raise _broken(session.refused)
            event, self._stashed_event = self._stashed_event, None
            if event is not None:
                return event
            watch = session.watch_answers(self._in_flight())
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                self._receive_watching = watch
                try:
                    if not watch:
                        return await self._pull.next_event()
                    return await self._pull_watching_answers()
                finally:
                    self._receive_scope = None
                    self._receive_watching = False
            # Woken by the sending side (the scope was cancelled): look again.

    async def _pull_watching_answers(self) -> ClientEvent:
        """The pull's next event, settling the pushes in flight meanwhile (and,
        in a resume session, pushing again what was lost)."""
        failure: BaseException | None = None

        async def pull() -> None:
            nonlocal failure
            try:
                self._stashed_event = await self._pull.next_event()
            except _BROKEN as exc:
                failure = exc
            nursery.cancel_scope.cancel()

        session = self._session
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            try:
                await self._pump(memoryview(b""), window=session.push_window_for(0), keep=0)
            except BrokenTunnelError:
                pass  # the session has it: a refusal, or sending broken
            self._receive_watching = False
            if session.refused is not None:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        event, self._stashed_event = self._stashed_event, None
        if event is None:
            assert session.refused is not None
            raise _broken(session.refused)
        return event

    async def _send_pull(self) -> None:
        """Write the next pull (on a new connection if the current one ended)."""
        self._pull = pull = await self._ready(self._pull)
        await pull.send(pull.channel.pull(self.token, self._session.pull_headers()))

    async def _reattach(self, reason: BaseException | str) -> None:
        """Re-attach a resume session's pull on a new connection, after a back-off."""
        session = self._session
        while True:
            try:
                delay = session.pull_lost(reason, trio.current_time())
            except TunnelError as exc:
                raise _broken(exc) from None
            await trio.sleep(delay)
            await self._pull.aclose()
            try:
                self._pull = await self._connect.open()
                await self._send_pull()
                return
            except (TunnelError, trio.BrokenResourceError, OSError) as exc:
                reason = exc

    # -- closing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedTunnelError("stream was closed")

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        refused: BrokenTunnelError | None = None
        push = self._push
        sending = self._send_conflict.busy
        try:
            if not sending:
                refused = await self._finish_pushes()
                push = self._push
            if self._session.close(pushes_settled=not sending and refused is None):
                await self._notify_close(push)
        finally:
            self._push = None
            try:
                if push is not None:
                    await push.aclose()
            finally:  # a cancelled close of one still closes the other
                await self._pull.aclose()
                if self._ack is not None:
                    await self._ack.aclose()
        if refused is not None:
            raise refused

    async def _finish_pushes(self) -> BrokenTunnelError | None:
        """Settle the pushes (up to ``close_timeout``), as the session says."""
        session = self._session
        if not session.settle_due(self._in_flight()):
            return None
        with trio.move_on_after(session.options.close_timeout):
            try:
                await self._pump(memoryview(b""), window=session.push_window_for(0), keep=0)
            except BrokenTunnelError as exc:
                return exc
            return None
        return _broken(session.acks_timed_out())

    async def _notify_close(self, push: _Connection | None) -> None:
        """Send the close notification, as modern GOST clients do (best effort)."""
        with trio.move_on_after(self._session.options.close_timeout):
            try:
                connection = await self._ready(push)
                try:
                    headers = self._session.close_headers()
                    await connection.send(connection.channel.close_session(self.token, headers))
                    await connection.next_event()
                finally:
                    if connection is not push:
                        await connection.aclose()
            except _BROKEN:
                pass


def _broken(error: TunnelError) -> BrokenTunnelError:
    """``error`` as trio's stream contract wants it (and still a pht error)."""
    if isinstance(error, SessionGone):
        gone = BrokenSessionGone(error.reason, str(error))
        gone.status = error.status
        return gone
    return BrokenTunnelError(str(error), status=error.status)


class _Connector:
    """Opens the HTTP connections of one tunnel (TCP, TLS, or via a proxy)."""

    def __init__(
        self,
        options: ClientOptions,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        open_transport: TransportOpener | None = None,
    ) -> None:
        self.open_transport = open_transport
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or options.host
        self.options = options

    async def open(self) -> _Connection:
        """A new HTTP connection to the server, within ``connect_timeout``."""
        transport = await self._open_transport()
        if self.ssl_context is not None:
            transport = await self._start_tls(transport, self.ssl_context)
        options = self.options
        return _Connection(transport, options.config, push_window=options.channel_push_window)

    async def _open_transport(self) -> trio.abc.Stream:
        """A byte stream to the server (or the proxy): TCP, or ``open_transport``'s."""
        target_host, target_port = self.options.dial_address
        try:
            with trio.fail_after(self.options.connect_timeout):
                if self.open_transport is None:
                    return await trio.open_tcp_stream(target_host, target_port)
                return await self.open_transport(target_host, target_port)
        except trio.TooSlowError:
            raise self.options.connect_timed_out() from None
        except Exception as exc:  # OSError, or open_transport's own failures: chained
            raise self.options.connect_failed(exc) from exc

    async def _start_tls(
        self, transport: trio.abc.Stream, context: ssl.SSLContext
    ) -> trio.abc.Stream:
        """TLS over ``transport``; OpenSSL on the socket itself when it is one."""
        tls: trio.abc.Stream
        if isinstance(transport, trio.SocketStream):
            # OpenSSL on the socket: about twice trio.SSLStream's throughput.
            tls = socket_tls = TLSSocketStream.wrap(
                transport, context, server_side=False, server_hostname=self.server_hostname
            )
            handshake = socket_tls.do_handshake
        else:
            tls = stream_tls = trio.SSLStream(
                transport,
                context,
                server_hostname=self.server_hostname,
                https_compatible=True,
            )
            handshake = stream_tls.do_handshake
        try:
            with trio.fail_after(self.options.connect_timeout):
                await handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            await trio.aclose_forcefully(tls)
            raise self.options.tls_failed(exc.__cause__ or exc) from exc
        return tls


async def open_pht_stream(
    host: str,
    port: int,
    *,
    tls: bool | ssl.SSLContext = False,
    server_hostname: str | None = None,
    open_transport: TransportOpener | None = None,
    **settings: Unpack[ClientSettings],
) -> PHTStream:
    """Open a PHT tunnel to ``host:port`` and return it as a trio stream.

    ``tls`` is ``False``, ``True`` (a default, verifying context) or an
    :class:`ssl.SSLContext`; ``server_hostname`` is the name the
    certificate must carry (default: ``host``). The tunnel is tuned by
    keyword arguments, the fields of :class:`pht.ClientSettings`
    (``authorize``, ``proxy``, ``push_window``, ``resume``, ...), whose
    meanings and defaults :class:`pht.ClientOptions` gives.

    With ``push_window`` above 1, ``send_all`` may return before the server
    answered; a push refused later breaks the stream both ways: a waiting
    ``receive_some`` is woken, and the next ``send_all`` or
    ``receive_some`` (or ``aclose``) raises :class:`trio.BrokenResourceError`
    saying that an earlier push was refused, with its status. With
    ``resume=True``, a session the server will never resume raises
    :class:`~pht.SessionGone` (also a :class:`trio.BrokenResourceError`).

    ``open_transport(host, port)``, when given, replaces
    :func:`trio.open_tcp_stream` for every HTTP connection of the tunnel
    (handshake, pull, push, reconnects, close notification), e.g. to reach
    the server through another proxy; it is called with the server's address
    (or ``proxy``'s), within ``connect_timeout``, and whatever it raises
    becomes the :class:`TunnelError`'s cause, its message included. ``tls``
    then runs over the stream it returns. Unless that is a
    :class:`trio.SocketStream`, the client cannot peek at an idle connection
    for a close, so it retires idle connections by their idle time alone
    (``keepalive_expiry``, 50 s: below common servers' keep-alive limits).

    Returns once the server has accepted the pull, so a wrong path or an
    unknown token fails here with a :class:`TunnelError`.
    """
    ssl_context = ssl_context_for(tls)
    options = ClientOptions.build(
        host, port, secure=ssl_context is not None, caller="open_pht_stream", **settings
    )
    connector = _Connector(options, ssl_context, server_hostname, open_transport)
    session = ClientSession(options)
    pull = await connector.open()
    try:
        try:
            with trio.fail_after(options.connect_timeout):
                pull = await _start_session(connector, pull, session)
        except trio.TooSlowError:
            raise session.handshake_timed_out() from None
        push = await connector.open()
    except BaseException:
        await pull.aclose()
        raise
    return _ClientStream(session=session, connect=connector, pull=pull, push=push)


async def _start_session(
    connector: _Connector, pull: _Connection, session: ClientSession
) -> _Connection:
    """The handshake, as the session says; returns the connection the pull is on."""
    try:
        step = session.handshake_step()
        while not isinstance(step, Established):
            channel = pull.channel
            if isinstance(step, SendAuthorize):
                await pull.send(channel.authorize())
            else:
                await pull.send(channel.pull(step.token, session.pull_headers()))
            event = await pull.next_event()
            step = session.handshake_step(event, pull.channel.resume_headers)
            if isinstance(step, SendPull) and not await pull.reusable():
                # Closed after the token: nothing of the pull was sent yet.
                await pull.aclose()
                pull = await connector.open()
    except (trio.BrokenResourceError, OSError, RemoteProtocolError) as exc:
        await pull.aclose()
        raise session.handshake_failed(exc) from exc
    except BaseException:
        await pull.aclose()
        raise
    return pull
