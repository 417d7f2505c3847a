"""The trio client adapter: :func:`open_pht_stream`."""

from __future__ import annotations

import operator
import select
import ssl
from collections.abc import Awaitable, Callable

import trio

from ._client import ClientChannel, ClientConfig, HeaderInput
from ._client_session import (
    DEFAULT_MAX_PUSH_SIZE,
    DEFAULT_RECONNECT_DELAY,
    ClientOptions,
    ClientSession,
    ClientSessionState,
    CollectAck,
    Deliver,
    EndOfStream,
    Established,
    PollAgain,
    PushChunk,
    Reattach,
    SendAuthorize,
    SendPull,
    describe_failure,
)
from ._errors import LocalProtocolError, PHTError, RemoteProtocolError, TunnelError
from ._events import NEED_DATA, ChannelState, ClientEvent
from ._resume import SessionGone
from ._tls_stream import TLSSocketStream
from ._token import TokenSource, new_token
from ._trio_common import (
    RECEIVE_SIZE,
    BrokenSessionGone,
    BrokenTunnelError,
    ClosedTunnelError,
    ConflictDetector,
    PHTStream,
    write_pieces,
)

__all__ = ["open_pht_stream"]

#: ``open_transport(host, port)``: a byte stream to ``host:port`` (see :func:`open_pht_stream`).
TransportOpener = Callable[[str, int], Awaitable[trio.abc.Stream]]

#: Bytes asked of the socket per read. Reads this size keep every buffer on the
#: pull path (socket read, h11's buffer, line reassembly) in cache and below
#: malloc's mmap threshold; 256 KiB reads cost page faults on each allocation.
_CLIENT_RECEIVE_SIZE = 64 * 1024


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
    """The client's end of a tunnel: moves bytes as its :class:`ClientSession` says."""

    def __init__(
        self, *, session: ClientSession, connect: _Connector, pull: _Connection, push: _Connection
    ) -> None:
        assert session.token is not None
        self.token = session.token
        self.remote_address = connect.address
        self._session = session
        self._connect = connect
        self._config = session.options.config
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
            if session.resume is not None:
                try:
                    await self._send_resumable(view)
                except trio.Cancelled:
                    session.break_sending("a send_all was cancelled; the stream is broken")
                    raise
                self._after_write()
                return
            try:
                push = self._push
                if push is not None and session.should_settle(
                    push.channel.pushes_in_flight, trio.current_time() - push.last_used
                ):
                    await self._pump_pushes(view[:0], window=1, keep=0)
                window = session.push_window_for(len(view))
                await self._pump_pushes(view, window=window, keep=session.keep_after_write)
            except trio.Cancelled:
                session.break_sending("a send_all was cancelled; the stream is broken")
                raise
            push = self._push
            if push is not None:
                session.write_returned(push.channel.pushes_in_flight)
            self._after_write()

    def _after_write(self) -> None:
        """A write returns: a waiting receive watches what it left in flight."""
        push = self._push
        in_flight = 0 if push is None else push.channel.pushes_in_flight
        if self._session.watch_answers(in_flight) and not self._receive_watching:
            self._wake_receive()

    async def _pump_pushes(self, view: memoryview, *, window: int, keep: int) -> None:
        """Push ``view`` and collect answers, each step as the session says."""
        session = self._session
        offset = 0
        while True:
            push = self._push
            step = session.next_push_step(
                queued=len(view) - offset,
                in_flight=0 if push is None else push.channel.pushes_in_flight,
                window=window,
                keep=keep,
            )
            if type(step) is PushChunk:
                end = offset + step.size
                await self._push_once(view[offset:end])
                offset = end
            elif type(step) is CollectAck:
                assert push is not None
                await self._collect_ack(push)
                if session.send_error is not None:  # a receive read a refusal
                    raise _broken(session.send_error)
            else:
                return

    async def _push_once(self, chunk: memoryview) -> None:
        connection = await self._push_connection()
        try:
            await connection.send(connection.channel.push(self.token, chunk))
        except (trio.BrokenResourceError, OSError, PHTError) as exc:
            raise await self._push_failed(connection, exc) from exc
        self._session.pushed(len(chunk))

    async def _collect_ack(self, connection: _Connection) -> None:
        """Read and judge the answer to the oldest push (unless another task did)."""
        async with self._answers_lock:
            channel = connection.channel
            if self._push is not connection or not channel.pushes_in_flight:
                return
            try:
                event = await connection.next_event()
            except (trio.BrokenResourceError, OSError, PHTError) as exc:
                raise await self._push_failed(connection, exc) from exc
            try:
                done = self._session.push_answer(
                    event,
                    closed=channel.state is ChannelState.CLOSED,
                    still_in_flight=channel.pushes_in_flight,
                )
            except TunnelError as exc:
                if self._session.refused is not None:
                    self._wake_receive()
                raise await self._drop_push(connection, exc) from None
            if done:
                self._push = None
                await connection.aclose()

    def _wake_receive(self) -> None:
        """Make a receive waiting for the pull look at the push side again."""
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def _push_failed(self, connection: _Connection, exc: BaseException) -> BrokenTunnelError:
        reason = describe_failure(exc, connection.idle_for)
        message = f"push to the PHT server failed: {reason}"
        return await self._drop_push(connection, self._session.push_failed(message))

    async def _drop_push(self, connection: _Connection, error: TunnelError) -> BrokenTunnelError:
        """Drop the push connection after ``error``; return the error to raise."""
        if self._push is connection:
            self._push = None
        await connection.aclose()
        return _broken(error)

    async def _push_connection(self) -> _Connection:
        """The push connection; a new one if the current one ended while idle.

        Replacing it is safe: nothing of the next push was written to it.
        """
        connection = self._push
        if (
            connection is not None
            and connection.channel.state is ChannelState.IDLE
            and not await connection.reusable()
        ):
            self._push = None
            await connection.aclose()
        if self._push is None:
            try:
                self._push = await self._connect.open(self._config)
            except TunnelError as exc:
                raise _broken(self._session.break_sending(str(exc))) from exc
        return self._push

    # -- sending, resume session -------------------------------------------------

    async def _send_resumable(self, view: memoryview, *, keep: int | None = None) -> None:
        """Write ``view`` through the replay buffer; pushes lost on the way are pushed again."""
        session = self._session
        window = session.push_window_for(len(view))
        if keep is None:
            keep = session.keep_after_write
        offset = 0
        while True:
            if session.send_error is not None:
                raise _broken(session.send_error)
            if offset < len(view):
                offset += session.resume_write(view[offset:])
            push = self._push
            step = session.resume_step(
                writing=offset < len(view),
                in_flight=0 if push is None else push.channel.pushes_in_flight,
                window=window,
                keep=keep,
            )
            if type(step) is PushChunk:
                await self._resume_push_once()
            elif type(step) is CollectAck:
                assert push is not None
                await self._resume_collect(push)
            else:
                return

    async def _resume_push_once(self) -> None:
        """Push the next bytes not pushed yet (one task at a time: ``_push_lock``)."""
        session = self._session
        async with self._push_lock:
            assert session.resume is not None
            if not session.resume.unpushed or session.send_error is not None:
                return  # another task pushed them, or sending broke meanwhile
            connection = self._push
            try:
                if (
                    connection is not None
                    and connection.channel.state is ChannelState.IDLE
                    and not await connection.reusable()
                ):
                    self._push = None
                    await connection.aclose()
                if self._push is None:
                    connection = None
                    # Shielded (connect_timeout bounds it): a receive that watches
                    # the pushes must not throw away a connection it just made.
                    with trio.CancelScope(shield=True):
                        self._push = await self._connect.open(self._config)
                connection = self._push
                assert connection is not None
                # A receive watching the pushes is cancelled when the pull has
                # data: better here, before the push is claimed and half written.
                await trio.lowlevel.checkpoint_if_cancelled()
                data, headers = session.resume_push()
                try:
                    await connection.send(connection.channel.push(self.token, data, headers))
                except trio.Cancelled:
                    # Part of the push may be out: drop the connection, push it all again.
                    if self._push is connection:
                        self._push = None
                    session.push_abandoned()
                    await trio.aclose_forcefully(connection.transport)
                    raise
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, PHTError) as exc:
                await self._resume_push_lost(exc, connection=connection)

    async def _resume_collect(self, connection: _Connection) -> None:
        """Read and judge the answer to the oldest push of a resume session."""
        session = self._session
        async with self._answers_lock:
            channel = connection.channel
            if self._push is not connection or not channel.pushes_in_flight:
                return  # another task read it, or the connection was dropped
            try:
                event = await connection.next_event()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, PHTError) as exc:
                await self._resume_push_lost(exc, connection=connection)
                return
            try:
                again = session.resume_push_answer(event, channel.resume_headers)
            except TunnelError as exc:
                if session.refused is not None:
                    self._wake_receive()
                raise await self._drop_push(connection, exc) from None
            if again:
                await self._resume_push_lost(f"the server answered {event}", connection=connection)
            elif channel.state is ChannelState.CLOSED:
                if channel.pushes_in_flight:
                    await self._resume_push_lost(
                        "the server closed the push connection", connection=connection
                    )
                else:
                    self._push = None
                    await connection.aclose()

    async def _resume_settle(self) -> None:
        """Push what is not pushed and collect every answer (a receive does this
        for writes that returned early; lost pushes are pushed again)."""
        session = self._session
        while session.send_error is None:
            push = self._push
            step = session.resume_step(
                writing=False,
                in_flight=0 if push is None else push.channel.pushes_in_flight,
                window=session.options.push_window,
                keep=0,
            )
            if type(step) is PushChunk:
                await self._resume_push_once()
            elif type(step) is CollectAck:
                assert push is not None
                await self._resume_collect(push)
            else:
                return

    async def _resume_push_lost(
        self, reason: BaseException | str, *, connection: _Connection | None
    ) -> None:
        """Drop the push connection: its pushes are pushed again after a back-off.

        ``connection`` is the one that failed (``None``: connecting failed);
        nothing happens if another task dropped it already.
        """
        if connection is not None:
            if self._push is not connection:
                return
            self._push = None
        try:
            delay = self._session.push_lost(reason, trio.current_time())  # rewinds
        except TunnelError as exc:
            raise _broken(exc) from None
        finally:
            if connection is not None:
                await connection.aclose()
        await trio.sleep(delay)

    async def _send_ack_only(self) -> None:
        """Tell the server what arrived (its replay buffer is half full), on a
        connection of its own: never pipelined behind a data push."""
        session = self._session
        while session.ack_due:
            ack, headers = session.ack_only_headers()
            try:
                connection = self._ack
                if connection is not None and not await connection.reusable():
                    self._ack = None
                    await connection.aclose()
                if self._ack is None:
                    self._ack = await self._connect.open(self._config)
                connection = self._ack
                await connection.send(connection.channel.ack_only(self.token, headers))
                event = await connection.next_event()
                again = session.ack_only_answer(ack, event, connection.channel.resume_headers)
                if connection.channel.state is ChannelState.CLOSED:
                    self._ack = None
                    await connection.aclose()
                if not again:
                    return
                reason: BaseException | str = f"the server answered {event}"
            except TunnelError as exc:
                if session.error is exc:
                    raise _broken(exc) from None
                reason = exc
            except (trio.BrokenResourceError, OSError, PHTError) as exc:
                reason = exc
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
            try:
                event = await self._next_pull_event()  # _poll_again may replace the pull
            except (trio.BrokenResourceError, OSError, PHTError) as exc:
                if self._closed:
                    raise ClosedTunnelError("stream was closed") from None
                if session.refused is not None:
                    raise _broken(session.refused) from None
                if session.resuming:
                    await self._reattach(exc)
                    continue
                quiet = trio.current_time() - self._pull.last_used
                raise _broken(session.pull_failed(exc, quiet_for=quiet)) from exc
            try:
                action = session.pull_event(event, self._pull.channel.resume_headers)
            except TunnelError as exc:
                raise _broken(exc) from None
            if isinstance(action, Deliver):
                self._pending, self._pending_offset = action.data, 0
                if session.ack_due:
                    await self._send_ack_only()
                return self._take(max_bytes)
            if isinstance(action, EndOfStream):
                await trio.lowlevel.checkpoint()
                return b""
            if isinstance(action, Reattach):
                await self._reattach(action.reason)
            elif isinstance(action, PollAgain):
                try:
                    await self._poll_again(action.token)
                except (TunnelError, trio.BrokenResourceError, OSError) as exc:
                    if not session.resuming:
                        raise _broken(session.repoll_failed(exc)) from exc
                    await self._reattach(exc)

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
            push = self._push
            watch = session.watch_answers(0 if push is None else push.channel.pushes_in_flight)
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                self._receive_watching = watch
                try:
                    if not watch:
                        return await self._pull.next_event()
                    return await self._pull_watching_answers(push)
                finally:
                    self._receive_scope = None
                    self._receive_watching = False
            # Woken by the sending side (the scope was cancelled): look again.

    async def _pull_watching_answers(self, push: _Connection | None) -> ClientEvent:
        """The pull's next event, reading the answers of the pushes in flight meanwhile
        (and, in a resume session, pushing again what was lost)."""
        failure: BaseException | None = None

        async def pull() -> None:
            nonlocal failure
            try:
                self._stashed_event = await self._pull.next_event()
            except (trio.BrokenResourceError, OSError, PHTError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull)
            if self._session.resume is not None:
                try:
                    await self._resume_settle()
                except BrokenTunnelError:
                    pass  # the session has it: a refusal, or sending broken
            while push is not None and push is self._push and push.channel.pushes_in_flight:
                try:
                    await self._collect_ack(push)
                except BrokenTunnelError:
                    break  # the session has it: a refusal, or sending broken
            self._receive_watching = False
            if self._session.refused is not None:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        event, self._stashed_event = self._stashed_event, None
        if event is None:
            assert self._session.refused is not None
            raise _broken(self._session.refused)
        return event

    async def _poll_again(self, token: str) -> None:
        # Nothing of the new GET was written yet: a new connection is safe
        # when the old one ended (or aged) while idle.
        if not await self._pull.reusable():
            await self._pull.aclose()
            self._pull = await self._connect.open(self._config)
        await self._pull.send(self._pull.channel.pull(token, self._session.pull_headers()))

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
                self._pull = await self._connect.open(self._config)
                await self._pull.send(self._pull.channel.pull(self.token, session.pull_headers()))
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
        """Wait (up to ``close_timeout``) for the acknowledgements still due."""
        session = self._session
        if session.resume is not None:
            if session.send_error is not None or (
                not session.resume.unpushed
                and (self._push is None or not self._push.channel.pushes_in_flight)
            ):
                return None
        elif self._push is None or not self._push.channel.pushes_in_flight:
            return None
        with trio.move_on_after(session.options.close_timeout):
            try:
                if session.resume is not None:
                    await self._send_resumable(memoryview(b""), keep=0)
                    return None
                await self._pump_pushes(memoryview(b""), window=1, keep=0)
            except BrokenTunnelError as exc:
                return exc
            return None
        return _broken(self._session.acks_timed_out())

    async def _notify_close(self, push: _Connection | None) -> None:
        """Send the close notification, as modern GOST clients do (best effort)."""
        with trio.move_on_after(self._session.options.close_timeout):
            try:
                if push is None or not await push.reusable():
                    push = await self._connect.open(self._config)
                    try:
                        await self._send_close(push)
                    finally:
                        await push.aclose()
                else:
                    await self._send_close(push)
            except (trio.BrokenResourceError, OSError, PHTError):
                pass

    async def _send_close(self, connection: _Connection) -> None:
        headers = self._session.close_headers()
        await connection.send(connection.channel.close_session(self.token, headers))
        await connection.next_event()


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
        self.push_window = options.channel_push_window
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or options.host
        self.options = options
        self.connect_timeout = options.connect_timeout
        self.address = options.address

    async def open(self, config: ClientConfig) -> _Connection:
        transport = await self._open_transport()
        if self.ssl_context is not None:
            transport = await self._start_tls(transport, self.ssl_context)
        return _Connection(transport, config, push_window=self.push_window)

    async def _open_transport(self) -> trio.abc.Stream:
        """A byte stream to the server (or the proxy): TCP, or ``open_transport``'s."""
        target_host, target_port = self.options.dial_address
        try:
            with trio.fail_after(self.connect_timeout):
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
            with trio.fail_after(self.connect_timeout):
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
    authorize: bool = True,
    authorize_path: str = "/authorize",
    push_path: str = "/push",
    pull_path: str = "/pull",
    headers: HeaderInput = None,
    host_header: str | None = None,
    proxy: str | None = None,
    token: str | None = None,
    token_source: TokenSource = new_token,
    max_push_size: int = DEFAULT_MAX_PUSH_SIZE,
    connect_timeout: float = 30.0,
    close_timeout: float = 5.0,
    push_window: int = 1,
    open_transport: TransportOpener | None = None,
    resume: bool = False,
    reconnect_delay: tuple[float, float] = DEFAULT_RECONNECT_DELAY,
) -> PHTStream:
    """Open a PHT tunnel to ``host:port`` and return it as a trio stream.

    With ``authorize=True`` (GOST's documented flow, and what legacy GOST
    servers require) the client first asks ``authorize_path`` for a token;
    with ``authorize=False`` it makes its own (``token``, or one from
    ``token_source``) as modern GOST clients do. ``tls`` is ``False``,
    ``True`` (a default, verifying context) or an :class:`ssl.SSLContext`.
    ``headers`` go on every request; ``host_header`` replaces the ``Host``
    header (GOST's ``host`` option). ``proxy="http://[user:pass@]host:port"``
    sends every request through a forward HTTP proxy in absolute form,
    without CONNECT. ``max_push_size`` bounds the bytes one POST carries.

    ``push_window`` is how many pushes may await their acknowledgement. With
    1 (the default, GOST's stop and wait) ``send_all`` returns once the
    server acknowledged all its bytes. With ``N > 1`` it may return while up
    to ``N - 1`` pushes are unanswered, so the next write overlaps the
    server's work: faster uploads. Their answers are read before later
    pushes exceed the window, by a ``receive_some`` waiting meanwhile, and in
    ``aclose`` (up to ``close_timeout``); a refused push then breaks the
    stream both ways: a waiting ``receive_some`` is woken, and the next
    ``send_all`` or ``receive_some`` (or ``aclose``) raises
    :class:`trio.BrokenResourceError` saying that an earlier push was
    refused, with its status. Pushes stay on one connection, in order (GOST's
    and ``pht``'s servers answer pipelined requests in order). Within one
    ``send_all`` larger than ``max_push_size`` two pushes are in flight even
    with a window of 1.

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

    ``resume=True`` offers the resume extension (``docs/resume.md``): if
    the server grants it, a cut pull or a push whose answer was lost is
    repeated on a new connection (with a jittered back-off, within the
    server's grace period) without losing or duplicating a byte, and the
    application sees only a slower stream. The server's ``410`` with a
    ``PHT-Gone`` other than ``closed``, or reconnects failing for the whole
    grace period, raise :class:`~pht.SessionGone` (also a
    :class:`trio.BrokenResourceError`). A server that does not grant it
    (GOST) gets today's protocol.
    ``reconnect_delay=(initial, maximum)`` is that back-off in seconds
    (default ``(0.1, 5.0)``): the *n*-th delay in a row is drawn in
    ``[d/2, d]`` with ``d = min(initial * 2**n, maximum)``; a smaller one
    comes back sooner after a cut, a larger one spares a struggling server.

    Returns once the server has accepted the pull, so a wrong path or an
    unknown token fails here with a :class:`TunnelError`.
    """
    ssl_context: ssl.SSLContext | None
    if tls is True:
        ssl_context = ssl.create_default_context()
    elif tls is False:
        ssl_context = None
    elif isinstance(tls, ssl.SSLContext):
        ssl_context = tls
    else:
        raise TypeError(f"tls must be a bool or an ssl.SSLContext, not {type(tls).__name__}")
    options = ClientOptions.build(
        host,
        port,
        secure=ssl_context is not None,
        authorize=authorize,
        authorize_path=authorize_path,
        push_path=push_path,
        pull_path=pull_path,
        headers=headers,
        host_header=host_header,
        proxy=proxy,
        token=token,
        token_source=token_source,
        max_push_size=max_push_size,
        push_window=push_window,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        resume=resume,
        reconnect_delay=reconnect_delay,
    )
    config = options.config
    connector = _Connector(options, ssl_context, server_hostname, open_transport)
    session = ClientSession(options)
    pull = await connector.open(config)
    try:
        try:
            with trio.fail_after(connect_timeout):
                pull = await _start_session(connector, pull, session)
        except trio.TooSlowError:
            raise session.handshake_timed_out() from None
        push = await connector.open(config)
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
                pull = await connector.open(session.options.config)
    except (trio.BrokenResourceError, OSError, RemoteProtocolError) as exc:
        await pull.aclose()
        raise session.handshake_failed(exc) from exc
    except BaseException:
        await pull.aclose()
        raise
    return pull
