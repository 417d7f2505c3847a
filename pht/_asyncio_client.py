"""The asyncio client adapter: :func:`open_pht_connection`.

The same :class:`~pht.ClientSession` and :class:`~pht.ClientChannel` as the
trio client decide everything; this module moves bytes. Each HTTP connection
is an asyncio protocol that feeds its channel as bytes arrive, so an idle
connection's close is already known when the session asks whether it may be
reused. The tunnel is a :class:`~pht._asyncio_common.PHTTransport` with two
tasks: the pull pump (events of the pull connection, as the session says) and
the push pump (the application's writes, in the steps the session gives).
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from ._asyncio_common import (
    DEFAULT_LIMIT,
    PHTTransport,
    SessionGoneResetError,
    TunnelResetError,
    open_streams,
    within,
)
from ._client import ClientChannel
from ._client_session import (
    ClientOptions,
    ClientSession,
    ClientSettings,
    CollectAck,
    Deliver,
    EndOfStream,
    Established,
    PollAgain,
    PushChunk,
    PushVerdict,
    Reattach,
    SendAuthorize,
    SendPull,
    ssl_context_for,
)
from ._common import plan_writes
from ._errors import LocalProtocolError, PHTError, RemoteProtocolError, TunnelError
from ._events import NEED_DATA, ChannelState, ClientEvent
from ._resume import SessionGone

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["TransportOpener", "TransportReader", "TransportWriter", "open_pht_connection"]

_BROKEN = (OSError, PHTError)
#: Bytes asked of an ``open_transport`` reader per read.
_READ_SIZE = 64 * 1024


class TransportReader(Protocol):
    """The reading half ``open_transport`` returns (an :class:`asyncio.StreamReader` is one).

    ``read(n)`` returns up to ``n`` bytes, ``b""`` at the end of the stream.
    """

    async def read(self, n: int = -1, /) -> bytes:
        """Up to ``n`` bytes, ``b""`` at the end of the stream."""
        ...


class TransportWriter(Protocol):
    """The writing half ``open_transport`` returns (an :class:`asyncio.StreamWriter` is one)."""

    def write(self, data: bytes, /) -> None:
        """Queue ``data`` to be sent."""
        ...

    async def drain(self) -> None:
        """Return once the queued bytes may be sent on (flow control)."""
        ...

    def close(self) -> None:
        """Close the stream (without waiting); the client calls it once done."""
        ...

    def get_extra_info(self, name: str, default: Any = None, /) -> Any:
        """Transport information (``"peername"``, ...), ``default`` if none."""
        ...


#: ``open_transport(host, port)``: a ``(reader, writer)`` pair to ``host:port``, as
#: :func:`asyncio.open_connection` returns (see :func:`open_pht_connection`).
TransportOpener = Callable[[str, int], Awaitable[tuple[TransportReader, TransportWriter]]]


def _reset(error: TunnelError) -> TunnelResetError:
    """``error`` as asyncio's readers and ``drain()`` raise it (and still a pht error)."""
    if isinstance(error, SessionGone):
        gone = SessionGoneResetError(error.reason, str(error))
        gone.status = error.status
        return gone
    return TunnelResetError(str(error), status=error.status)


class _Connection(asyncio.Protocol):
    """One HTTP connection of the client: an asyncio transport and its sans-IO channel."""

    def __init__(self, channel: ClientChannel, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.last_used = loop.time()
        #: How long the connection was idle before its latest request.
        self.idle_for = 0.0
        self._eof = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.channel.receive_data(data)
        except LocalProtocolError:  # bytes after an EOF: the connection is unusable anyway
            pass
        self._wake()

    def eof_received(self) -> bool:
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._end()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _end(self) -> None:
        if not self._eof:
            self._eof = True
            try:
                self.channel.receive_data(b"")
            except LocalProtocolError:
                pass
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # for the tunnel

    def reusable(self) -> bool:
        """Whether a request may be written here (:meth:`ClientChannel.reusable`)."""
        if self.channel.state is not ChannelState.IDLE:
            return False
        self.idle_for = self.loop.time() - self.last_used
        return self.channel.reusable(self.idle_for)

    async def send(self, pieces: bytes | list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        self.last_used = self.loop.time()
        if self._eof or transport.is_closing():
            self.channel.send_failed()
            raise ConnectionResetError("the connection to the PHT server is closed")
        if isinstance(pieces, bytes):
            transport.write(pieces)
        else:
            for write in plan_writes(pieces):
                transport.write(write)
        if self._drained is not None:
            await self._drained

    async def next_event(self) -> ClientEvent:
        channel = self.channel
        while True:
            event = channel.next_event()
            if event is not NEED_DATA:
                self.last_used = self.loop.time()
                return event
            if self._eof or channel.state in (ChannelState.CLOSED, ChannelState.ERROR):
                raise ConnectionResetError("connection to the PHT server is closed")
            self._waiter = waiter = self.loop.create_future()
            await waiter

    def pause_reading(self) -> None:
        if self.transport is not None and not self._eof:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._eof:
            self.transport.resume_reading()

    def close(self) -> None:
        # Not once the connection is lost: asyncio's transport, closed by an EOF
        # (eof_received) and done flushing, raises AttributeError on abort().
        if self.transport is not None and not self._lost:
            self.transport.abort()


class _StreamTransport(asyncio.Transport):
    """An ``open_transport`` pair (TLS on top, if asked) as a :class:`_Connection`'s transport.

    A task reads the pair and feeds the protocol as asyncio feeds a socket's;
    each write is drained in a task, the protocol paused meanwhile, so
    :meth:`_Connection.send` waits for it as for a socket's buffer. TLS runs
    in memory (:class:`ssl.SSLObject`) over the pair, whatever it is.
    """

    def __init__(
        self,
        reader: TransportReader,
        writer: TransportWriter,
        protocol: _Connection,
        tls: _ssl.SSLObject | None,
        bios: tuple[_ssl.MemoryBIO, _ssl.MemoryBIO] | None,
    ) -> None:
        super().__init__()
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self._tls = tls
        self._bios = bios
        self._closing = False
        self._draining: asyncio.Task[None] | None = None
        self._reading = asyncio.Event()
        self._reading.set()
        loop = protocol.loop
        protocol.connection_made(self)
        self._pump = loop.create_task(self._read_pump(), name="pht open_transport read")
        self._pump.add_done_callback(self._pump_done)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._tls is not None and name == "ssl_object":
            return self._tls
        if self._tls is not None and name in ("cipher", "peercert"):
            return self._tls.cipher() if name == "cipher" else self._tls.getpeercert()
        return self._writer.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        if self._tls is not None and self._bios is not None:
            self._tls.write(data)
            data = self._bios[1].read()
        self._writer.write(bytes(data))
        if self._draining is None:
            self._protocol.pause_writing()
            self._draining = self._protocol.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except Exception:  # the read pump reports the broken connection
            self.abort()
        finally:
            self._draining = None
            self._protocol.resume_writing()

    async def _read_pump(self) -> None:
        protocol = self._protocol
        while True:
            await self._reading.wait()
            data = await self._reader.read(_READ_SIZE)
            if self._tls is not None and self._bios is not None and data:
                self._bios[0].write(data)
                plain = _tls_read(self._tls)
                if plain is None:  # the peer's close_notify
                    data = b""
                elif not plain:
                    continue
                else:
                    data = plain
            if not data:
                protocol.eof_received()
                return
            protocol.data_received(data)

    def _pump_done(self, task: asyncio.Task[None]) -> None:
        self._closing = True
        self._writer.close()
        if self._draining is not None:
            self._draining.cancel()
        exc = None if task.cancelled() else task.exception()
        self._protocol.connection_lost(exc if isinstance(exc, Exception) else None)

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._closing = True
        self._pump.cancel()


def _tls_read(tls: _ssl.SSLObject) -> bytes | None:
    """The plaintext the TLS object has now (``b""``: none yet; ``None``: the peer closed)."""
    pieces: list[bytes] = []
    while True:
        try:
            piece = tls.read(_READ_SIZE)
        except _ssl.SSLWantReadError:
            break
        except _ssl.SSLZeroReturnError:
            return b"".join(pieces) or None
        if not piece:
            break
        pieces.append(piece)
    return b"".join(pieces)


async def _tls_handshake(
    reader: TransportReader,
    writer: TransportWriter,
    context: _ssl.SSLContext,
    server_hostname: str,
) -> tuple[_ssl.SSLObject, tuple[_ssl.MemoryBIO, _ssl.MemoryBIO]]:
    """A client TLS handshake over an ``open_transport`` pair, in memory."""
    incoming, outgoing = _ssl.MemoryBIO(), _ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    while True:
        try:
            tls.do_handshake()
        except _ssl.SSLWantReadError:
            pass
        else:
            break
        flight = outgoing.read()
        if flight:
            writer.write(flight)
            await writer.drain()
        data = await reader.read(_READ_SIZE)
        if data:
            incoming.write(data)
        else:
            incoming.write_eof()
    flight = outgoing.read()
    if flight:
        writer.write(flight)
        await writer.drain()
    return tls, (incoming, outgoing)


class _Connector:
    """Opens the HTTP connections of one tunnel (TCP, TLS, or to a proxy)."""

    def __init__(
        self,
        options: ClientOptions,
        ssl_context: _ssl.SSLContext | None,
        server_hostname: str | None,
        loop: asyncio.AbstractEventLoop,
        open_transport: TransportOpener | None = None,
    ) -> None:
        self.open_transport = open_transport
        self.options = options
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or options.host
        self.loop = loop

    async def open(self) -> _Connection:
        options = self.options
        channel = ClientChannel(options.config, push_window=options.channel_push_window)
        host, port = options.dial_address
        context = self.ssl_context
        if self.open_transport is not None:
            return await self._open_through(self.open_transport, channel)
        try:
            _, connection = await within(
                options.connect_timeout,
                self.loop.create_connection(
                    lambda: _Connection(channel, self.loop),
                    host,
                    port,
                    ssl=context,
                    server_hostname=None if context is None else self.server_hostname,
                ),
            )
        except TimeoutError:
            raise options.connect_timed_out() from None
        except (_ssl.SSLError, _ssl.CertificateError) as exc:
            raise options.tls_failed(exc) from exc
        except ConnectionResetError as exc:
            if context is None:
                raise options.connect_failed(exc) from exc
            raise options.tls_failed(exc) from exc
        except OSError as exc:
            raise options.connect_failed(exc) from exc
        return connection

    async def _open_through(self, opener: TransportOpener, channel: ClientChannel) -> _Connection:
        """A connection over ``open_transport``'s pair (TLS on top when ``ssl`` is set)."""
        options = self.options
        host, port = options.dial_address
        try:
            reader, writer = await within(options.connect_timeout, opener(host, port))
        except TimeoutError:
            raise options.connect_timed_out() from None
        except Exception as exc:  # OSError, or open_transport's own failures: chained
            raise options.connect_failed(exc) from exc
        tls = bios = None
        if self.ssl_context is not None:
            try:
                tls, bios = await within(
                    options.connect_timeout,
                    _tls_handshake(reader, writer, self.ssl_context, self.server_hostname),
                )
            except BaseException as exc:
                writer.close()
                if isinstance(exc, TimeoutError | _ssl.SSLError | OSError | PHTError):
                    raise options.tls_failed(exc) from exc
                raise
        connection = _Connection(channel, self.loop)
        _StreamTransport(reader, writer, connection, tls, bios)
        return connection


class _ClientTransport(PHTTransport):
    """The client's end of a tunnel: pumps bytes as its :class:`ClientSession` says."""

    def __init__(
        self,
        session: ClientSession,
        connector: _Connector,
        pull: _Connection,
        push: _Connection,
    ) -> None:
        options = session.options
        assert session.token is not None
        assert pull.transport is not None
        info = pull.transport.get_extra_info
        super().__init__(
            connector.loop,
            extra={
                "pht_token": session.token,
                "peername": info("peername"),
                "sockname": info("sockname"),
                "ssl_object": info("ssl_object"),
                "cipher": info("cipher"),
                "peercert": info("peercert"),
            },
            high_water=options.unanswered_bytes,
        )
        self.token = session.token
        self._session = session
        self._connector = connector
        self._pull = pull
        self._push: _Connection | None = push
        self._ack: _Connection | None = None  # ack-only pushes (resume)
        self._push_task: asyncio.Task[None] | None = None
        #: Set while the pull pump waits for the answers of pushes in flight.
        self._answers_heard: asyncio.Future[None] | None = None
        #: ``session.acknowledged`` as last reported to ``drain()``.
        self._reported = 0

    def start(self) -> None:
        """Start the pumps (once the protocol is attached)."""
        self.start_task(self._pull_pump(), name="pht pull")
        self._push_task = self.start_task(self._push_pump(), name="pht push")

    # -- the pull -----------------------------------------------------------------

    async def _pull_pump(self) -> None:
        session = self._session
        while True:
            pull = self._pull
            try:
                event = await pull.next_event()
            except _BROKEN as exc:
                quiet = self.loop.time() - pull.last_used
                if not session.resuming:
                    await self._hear_push_answers()  # a refusal names the cause
                try:
                    reattach = session.pull_broken(exc, quiet_for=quiet)
                except TunnelError as error:
                    raise _reset(error) from exc
                await self._reattach(reattach.reason)
                continue
            try:
                action = session.pull_event(event, pull.channel.resume_headers)
            except TunnelError as exc:
                raise _reset(exc) from None
            if type(action) is Deliver:
                self.deliver(action.data)
                if session.ack_due:
                    await self._send_ack_only()
                if not self.is_reading() and not self.is_closing():
                    pull.pause_reading()
                    await self.wait_reading()
                    pull.resume_reading()
            elif type(action) is EndOfStream:
                self.deliver_eof()
                return
            elif isinstance(action, Reattach):
                await self._reattach(action.reason)
            elif isinstance(action, PollAgain):
                try:
                    await self._poll_again(action.token)
                except _BROKEN as exc:
                    try:
                        reattach = session.repoll_broken(exc)
                    except TunnelError as error:
                        raise _reset(error) from exc
                    await self._reattach(reattach.reason)

    async def _hear_push_answers(self) -> None:
        """Before a cut pull is reported, let the pushes in flight be answered.

        A server cuts the pull of a session that refused pushed bytes (``410``)
        and answers the push about the same moment: when the cut comes first,
        the answer still names the cause, as the trio client reports it. A
        refusal ends the session from the push pump (this task is cancelled);
        an acknowledgement lets the pull's own failure be reported.
        """
        push = self._push
        if push is None or not push.channel.pushes_in_flight:
            return
        self._answers_heard = self.loop.create_future()
        try:
            await within(self._session.options.close_timeout, self._answers_heard)
        except TimeoutError:
            pass
        finally:
            self._answers_heard = None

    def _answers_done(self) -> None:
        waiter = self._answers_heard
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _poll_again(self, token: str) -> None:
        # Nothing of the new GET was written yet: a new connection is safe
        # when the old one ended (or aged) while idle.
        if not self._pull.reusable():
            self._pull.close()
            self._pull = await self._connector.open()
        await self._pull.send(self._pull.channel.pull(token, self._session.pull_headers()))

    async def _reattach(self, reason: BaseException | str) -> None:
        """Re-attach a resume session's pull on a new connection, after a back-off."""
        session = self._session
        while True:
            try:
                delay = session.pull_lost(reason, self.loop.time())
            except TunnelError as exc:
                raise _reset(exc) from None
            await asyncio.sleep(delay)
            self._pull.close()
            try:
                self._pull = await self._connector.open()
                await self._pull.send(self._pull.channel.pull(self.token, session.pull_headers()))
                return
            except _BROKEN as exc:
                reason = exc

    async def _send_ack_only(self) -> None:
        """Tell the server what arrived (its replay buffer is half full), on a
        connection of its own: never pipelined behind a data push."""
        session = self._session
        while session.ack_due:
            ack, headers = session.ack_only_headers()
            try:
                connection = self._ack
                if connection is not None and not connection.reusable():
                    connection.close()
                    self._ack = connection = None
                if connection is None:
                    connection = self._ack = await self._connector.open()
                await connection.send(connection.channel.ack_only(self.token, headers))
                event = await connection.next_event()
                again = session.ack_only_answer(ack, event, connection.channel.resume_headers)
                # Its PHT-Received may cover pushes whose own answers never come.
                self._report_acknowledged()
                if connection.channel.state is ChannelState.CLOSED:
                    connection.close()
                    self._ack = None
                if not again:
                    return
                reason: BaseException | str = f"the server answered {event}"
            except TunnelError as exc:
                if session.error is exc:
                    raise _reset(exc) from None
                reason = exc
            except _BROKEN as exc:
                reason = exc
            if self._ack is not None:
                self._ack.close()
                self._ack = None
            try:
                delay = session.retry_delay(reason, self.loop.time())
            except TunnelError as exc:
                raise _reset(exc) from None
            await asyncio.sleep(delay)

    # -- the pushes ---------------------------------------------------------------

    async def _push_pump(self) -> None:
        """Push what the application writes, each step as the session says;
        return once closing left nothing to do.

        In a resume session written bytes go through the replay buffer first
        (as room allows), and a push carries the buffer's next bytes.
        """
        session = self._session
        resume = session.resume
        while True:
            if resume is not None:
                if session.send_error is not None:
                    raise _reset(session.send_error)
                room = session.resume_room
                if self.queued and room:
                    session.resume_write(self.take_outbound(min(self.queued, room)))
            push = self._push
            in_flight = 0 if push is None else push.channel.pushes_in_flight
            if not self.queued and not session.settle_due(in_flight):
                if self.is_closing():
                    return
                await self.wait_outbound()
                continue
            if session.send_error is not None:
                raise _reset(session.send_error)
            unpushed = 0 if resume is None else resume.unpushed
            step = session.write_step(
                queued=self.queued,
                in_flight=in_flight,
                window=session.push_window_for(self.queued + unpushed),
                keep=0,  # answers are read as they come: drain() counts them
            )
            if type(step) is PushChunk:
                await self._push_once(step.size)
            elif type(step) is CollectAck:
                assert push is not None
                await self._collect(push)
            else:  # the replay buffer is full: wait for acknowledgements
                await self.wait_outbound()

    async def _push_once(self, size: int) -> None:
        """Write one push: ``size`` written bytes, or the replay buffer's next ones."""
        session = self._session
        connection = self._push
        if (
            connection is not None
            and not connection.channel.pushes_in_flight
            and not connection.reusable()  # it ended (or aged) while idle
        ):
            self._drop_push(connection)
        if self._push is None:
            try:
                self._push = await self._connector.open()
            except TunnelError as exc:
                await self._push_broke(None, exc)
                return
        connection = self._push
        if session.resume is not None:
            if not session.resume.unpushed:
                return  # an answer read meanwhile acknowledged it all: nothing to push
            data, headers = session.resume_push()
            request = connection.channel.push(self.token, data, headers)
        else:
            chunk = self.take_outbound(size)
            request = connection.channel.push(self.token, chunk)
        try:
            await connection.send(request)
        except _BROKEN as exc:
            await self._push_broke(connection, exc)
            return
        if session.resume is None:
            session.pushed(len(chunk))

    async def _collect(self, connection: _Connection) -> None:
        """Read and judge the answer to the oldest push on ``connection``."""
        session = self._session
        try:
            event = await connection.next_event()
        except _BROKEN as exc:
            await self._push_broke(connection, exc)
            return
        channel = connection.channel
        try:
            verdict = session.answer_push(
                event,
                channel.resume_headers,
                closed=channel.state is ChannelState.CLOSED,
                still_in_flight=channel.pushes_in_flight,
                now=connection.last_used,  # when the answer was read
            )
        except TunnelError as exc:
            self._drop_push(connection)
            raise _reset(exc) from None
        self._report_acknowledged()
        if verdict.drop:
            await self._follow(connection, verdict)
        elif not channel.pushes_in_flight:
            self._answers_done()

    async def _push_broke(self, connection: _Connection | None, exc: BaseException) -> None:
        """A push on ``connection`` failed with ``exc`` (``None``: connecting
        failed): drop the connection and do as the session says."""
        session = self._session
        now = self.loop.time()
        try:
            if connection is None:
                assert isinstance(exc, TunnelError)
                verdict = session.push_connect_failed(exc, now)
            else:
                verdict = session.push_broke(exc, idle_for=connection.idle_for, now=now)
        except TunnelError as error:
            if connection is not None:
                self._drop_push(connection)
            raise _reset(error) from exc
        await self._follow(connection, verdict)

    async def _follow(self, connection: _Connection | None, verdict: PushVerdict) -> None:
        """Drop the push ``connection`` and wait, as ``verdict`` says."""
        if verdict.drop and connection is not None:
            self._drop_push(connection)
        if verdict.retry_after is not None:
            await asyncio.sleep(verdict.retry_after)

    def _report_acknowledged(self) -> None:
        """Let ``drain()`` count what the server acknowledged since the last report.

        Any answer may acknowledge written bytes: a push's, or in a resume
        session an ack-only push's ``PHT-Received``, which may cover pushes
        whose own answers are lost (nothing is pushed again then).
        """
        acknowledged = self._session.acknowledged
        if acknowledged > self._reported:
            self.acknowledge(acknowledged - self._reported)
            self._reported = acknowledged

    def _drop_push(self, connection: _Connection) -> None:
        if self._push is connection:
            self._push = None
        connection.close()
        self._answers_done()

    # -- the end ------------------------------------------------------------------

    def _close_requested(self) -> None:
        self.start_task(self._close(), name="pht close")

    async def _close(self) -> None:
        """As asyncio's close: the queued bytes go out first (up to ``close_timeout``)."""
        session = self._session
        timeout = session.options.close_timeout
        refused: TunnelError | None = None
        push_pump = self._push_task
        if push_pump is not None and not push_pump.done():
            done, _ = await asyncio.wait([push_pump], timeout=timeout)
            if not done:
                push_pump.cancel()
                refused = _reset(session.acks_timed_out())
        if session.close(pushes_settled=refused is None):
            try:
                await within(timeout, self._notify_close())
            except (TimeoutError, *_BROKEN):
                pass
        self.lose(refused)

    async def _notify_close(self) -> None:
        """Send the close notification, as modern GOST clients do (best effort)."""
        push = self._push
        if push is None or not push.reusable():
            push = self._push = await self._connector.open()
        headers = self._session.close_headers()
        await push.send(push.channel.close_session(self.token, headers))
        await push.next_event()

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._push is not None:
            self._push.close()
        if self._ack is not None:
            self._ack.close()
        self._pull.close()
        super()._connection_lost(exc)


async def open_pht_connection(
    host: str,
    port: int,
    *,
    ssl: bool | _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limit: int = DEFAULT_LIMIT,
    open_transport: TransportOpener | None = None,
    **settings: Unpack[ClientSettings],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a PHT tunnel to ``host:port`` as :func:`asyncio.open_connection` opens a TCP one.

    The keyword arguments are :func:`pht.open_pht_stream`'s (the tuning ones
    are :class:`pht.ClientSettings`, described by :class:`pht.ClientOptions`),
    with asyncio's names where asyncio has one: ``ssl`` (``None``/``False``,
    ``True`` for a default verifying context, or an :class:`ssl.SSLContext`)
    instead of ``tls``, and ``limit`` (the reader's buffer limit). ``drain()`` waits for
    the server's acknowledgement of the written bytes: with ``push_window=1``
    (GOST's stop and wait) for all of them, with ``N`` until at most
    ``N - 1`` pushes' worth are unanswered.

    Returns once the server has accepted the pull; a refusal raises
    :class:`~pht.TunnelError` with the HTTP ``status``. Later failures reach
    the reader and ``drain()`` as :class:`~pht.asyncio.TunnelResetError` (a
    :class:`ConnectionResetError` and a :class:`~pht.TunnelError`).
    ``writer.close()`` sends what is queued, then the close notification;
    ``await writer.wait_closed()`` returns once nothing of the tunnel runs.

    With ``resume=True``, a session the server will never resume ends the
    reader with :class:`~pht.asyncio.SessionGoneResetError` (a
    :class:`~pht.SessionGone` and a :class:`ConnectionResetError`).

    ``open_transport(host, port)``, when given, replaces
    :func:`asyncio.open_connection` for every HTTP connection of the tunnel
    (handshake, pull, push, reconnects, close notification), e.g. to reach
    the server through other proxies. It returns a ``(reader, writer)`` pair
    as :func:`asyncio.open_connection` does (or anything with the same
    ``read``, ``write``, ``drain``, ``close`` and ``get_extra_info``:
    :class:`~pht.asyncio.TransportReader`, :class:`~pht.asyncio.TransportWriter`),
    so another tunnel's pair works too. It is called with the server's
    address (or ``proxy``'s) within ``connect_timeout``; whatever it raises
    becomes the :class:`~pht.TunnelError`'s cause. ``ssl`` then runs over the
    pair (in memory, whatever the pair is). The client owns the pair from
    then on and calls ``writer.close()`` when it is done with it.
    """
    ssl_context = ssl_context_for(ssl, name="ssl", none_ok=True)
    options = ClientOptions.build(
        host, port, secure=ssl_context is not None, caller="open_pht_connection", **settings
    )
    loop = asyncio.get_running_loop()
    connector = _Connector(options, ssl_context, server_hostname, loop, open_transport)
    session = ClientSession(options)
    pull = await connector.open()
    try:
        try:
            pull = await within(options.connect_timeout, _start_session(connector, pull, session))
        except TimeoutError:
            raise session.handshake_timed_out() from None
        push = await connector.open()
    except BaseException:
        pull.close()
        raise
    transport = _ClientTransport(session, connector, pull, push)
    reader, writer = open_streams(transport, limit=limit)
    transport.start()
    return reader, writer


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
            if isinstance(step, SendPull) and not pull.reusable():
                # Closed after the token: nothing of the pull was sent yet.
                pull.close()
                pull = await connector.open()
    except (OSError, RemoteProtocolError) as exc:
        pull.close()
        raise session.handshake_failed(exc) from exc
    except BaseException:
        pull.close()
        raise
    return pull
