"""The trio client adapter: :func:`open_pht_stream`."""

from __future__ import annotations

import math
import operator
import select
import ssl
from urllib.parse import unquote, urlsplit

import trio

from ._client import ClientChannel, ClientConfig, HeaderInput
from ._common import Paths
from ._errors import LocalProtocolError, PHTError, RemoteProtocolError, TunnelError
from ._events import (
    NEED_DATA,
    Authorized,
    ChannelState,
    ClientEvent,
    DataReceived,
    Heartbeat,
    PullEnded,
    PullStarted,
    PushAcknowledged,
    Rejected,
    RequestKind,
)
from ._tls_stream import TLSSocketStream
from ._token import TokenSource, new_token
from ._trio_common import RECEIVE_SIZE, PHTStream, write_pieces

__all__ = ["open_pht_stream"]

#: Raw bytes per push by default: one POST per MiB keeps round trips rare.
DEFAULT_MAX_PUSH_SIZE = 1024 * 1024
#: Bytes asked of the socket per read. Reads this size keep every buffer on the
#: pull path (socket read, h11's buffer, line reassembly) in cache and below
#: malloc's mmap threshold; 256 KiB reads cost page faults on each allocation.
_CLIENT_RECEIVE_SIZE = 64 * 1024
#: Unacknowledged pushes of a push connection unused this long are collected
#: before the next push, so the connection's idleness can be checked.
_SETTLE_ACKS = 1.0


def _readable_now(fileno: int) -> bool:
    """Whether a read on ``fileno`` would not block (data, EOF or an error)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fileno], [], [], 0)[0])  # pragma: no cover - Windows


async def _read_ready(transport: trio.abc.Stream) -> bytes | bytearray | None:
    """What ``transport`` has delivered, without waiting: ``None`` if nothing.

    ``b""`` stands for an EOF and for a broken connection alike.
    """
    try:
        if isinstance(transport, TLSSocketStream):
            return transport.receive_nowait(_CLIENT_RECEIVE_SIZE)
        sock = getattr(transport, "socket", None)
        if sock is None:  # pragma: no cover - pht opens socket streams only
            return None
        if not _readable_now(sock.fileno()):
            return None
        return await transport.receive_some(_CLIENT_RECEIVE_SIZE)
    except (trio.BrokenResourceError, OSError):
        return b""


def _explain_rejection(
    event: Rejected, paths: Paths, *, authorize: bool, session_ended: str | None = None
) -> str:
    """A rejection as a message with a hint that fits the situation.

    ``session_ended`` is set once the session was established: a ``403``
    then means the server has forgotten it (the paths did match), and says
    how, when the client knows.
    """
    path = {
        RequestKind.AUTHORIZE: paths.authorize,
        RequestKind.PUSH: paths.push,
        RequestKind.PULL: paths.pull,
    }[event.kind]
    text = f"server answered {event.status_code} {event.reason} to {path}"
    if event.status_code == 403 and session_ended is not None:
        return f"{text}: the server no longer knows this session; it ended ({session_ended})"
    if event.status_code == 403:
        hint = "the token is unknown to the server; do the client's and server's paths match?"
        if not authorize:
            hint += " (a legacy GOST server needs authorize=True)"
        return f"{text}: {hint}"
    if event.status_code == 404:
        return f"{text}: the server has no such path; do the client's and server's paths match?"
    if event.status_code == 429:
        return f"{text}: the server has too many pending sessions; try again later"
    if event.status_code == 413:
        return (
            f"{text}: the request body is too large for the server or a proxy in front of "
            "it (nginx: client_max_body_size); lower max_push_size"
        )
    if event.status_code == 410:
        return f"{text}: the session is gone (closed, or its data was not consumed in time)"
    return text


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

    def describe_failure(self, exc: BaseException) -> str:
        """``exc`` as a message; with the idle time before the request, when there was one."""
        if self.idle_for >= 1.0:
            return f"{exc} (the connection had been idle for {self.idle_for:.0f} s)"
        return str(exc)

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
                raise trio.BrokenResourceError("connection to the PHT server is closed")
            data = await self.transport.receive_some(_CLIENT_RECEIVE_SIZE)
            channel.receive_data(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.transport)


class _ClientStream(PHTStream):
    def __init__(
        self,
        *,
        connect: _Connector,
        config: ClientConfig,
        token: str,
        pull: _Connection,
        max_push_size: int,
        close_timeout: float,
        push_window: int = 1,
    ) -> None:
        self.token = token
        self.remote_address = connect.address
        self._connect = connect
        self._config = config
        self._pull = pull
        self._push: _Connection | None = None
        self._max_push_size = max_push_size
        self._close_timeout = close_timeout
        self._push_window = push_window
        # Acknowledgements still due for pushes of earlier send_all calls.
        self._earlier_pushes = 0
        self._pending = b""
        self._pending_offset = 0
        self._eof = False
        self._closed = False
        self._broken: str | None = None
        # Why the pull failed, and what a failed push may have lost: the end
        # of the session is then no clean EOF.
        self._pull_failure: str | None = None
        self._push_loss: str | None = None
        self._truncated: str | None = None  # the session ended with data lost
        self._sending = False
        self._receiving = False
        self._polls = 1

    # -- sending ----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_open()
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            view = memoryview(data)
            if not view.nbytes:
                await trio.lowlevel.checkpoint()
                return
            view = view.cast("B")
            size = self._max_push_size
            # Within one call two pushes may be in flight even with a window of
            # 1: the call returns only once all are acknowledged anyway.
            window = self._push_window if len(view) <= size else max(2, self._push_window)
            try:
                await self._settle_idle_pushes()
                for start in range(0, len(view), size):
                    await self._push_once(view[start : start + size], window)
                # A window of N lets this call return with N - 1 unacknowledged.
                await self._collect_acks(self._push_window - 1)
            except trio.Cancelled:
                self._broken = "a send_all was cancelled; the stream is broken"
                raise
            if self._push is not None:
                self._earlier_pushes = self._push.channel.pushes_in_flight
        finally:
            self._sending = False

    async def _push_once(self, chunk: memoryview, window: int) -> None:
        await self._collect_acks(window - 1)
        connection = await self._push_connection()
        try:
            await connection.send(connection.channel.push(self.token, chunk))
        except (trio.BrokenResourceError, OSError, PHTError) as exc:
            message = f"push to the PHT server failed: {connection.describe_failure(exc)}"
            raise await self._push_failed(connection, message) from exc

    async def _settle_idle_pushes(self) -> None:
        """Collect the answers to pushes left unacknowledged on an idle connection.

        With ``push_window > 1`` a ``send_all`` may return with pushes in
        flight; their answers have long arrived when the connection has been
        unused for a while, and only a connection with nothing in flight can
        be checked for a close (see :meth:`_push_connection`).
        """
        connection = self._push
        if (
            connection is not None
            and connection.channel.pushes_in_flight
            and trio.current_time() - connection.last_used >= _SETTLE_ACKS
        ):
            await self._collect_acks(0)

    async def _collect_acks(self, keep: int) -> None:
        """Read acknowledgements until at most ``keep`` pushes are unanswered."""
        connection = self._push
        while connection is not None and connection.channel.pushes_in_flight > keep:
            earlier = self._earlier_pushes > 0
            try:
                event = await connection.next_event()
            except (trio.BrokenResourceError, OSError, PHTError) as exc:
                message = f"push to the PHT server failed: {connection.describe_failure(exc)}"
                raise await self._push_failed(connection, message) from exc
            if earlier:
                self._earlier_pushes -= 1
            if isinstance(event, Rejected):
                message = _explain_rejection(
                    event,
                    self._config.paths,
                    authorize=self._config.authorize,
                    session_ended=self._how_session_ended(),
                )
                if earlier:
                    message = f"an earlier push was refused: {message}"
                cause = TunnelError(message, status=event.status_code)
                raise await self._push_failed(connection, message) from cause
            if not isinstance(event, PushAcknowledged):  # pragma: no cover - channel guarantees
                raise trio.BrokenResourceError(f"unexpected answer to a push: {event}")
            if connection.channel.state is ChannelState.CLOSED:
                if connection.channel.pushes_in_flight:
                    message = "the server closed the push connection with pushes unanswered"
                    raise await self._push_failed(connection, message)
                self._push = None
                await connection.aclose()
                return

    async def _push_failed(
        self, connection: _Connection, message: str
    ) -> trio.BrokenResourceError:
        """Drop the push connection, mark the stream broken; return the error to raise."""
        if self._push is connection:
            self._push = None
        self._earlier_pushes = 0
        await connection.aclose()
        self._broken = message
        self._push_loss = message
        return trio.BrokenResourceError(message)

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
                self._broken = str(exc)
                raise trio.BrokenResourceError(str(exc)) from exc
        return self._push

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()

    # -- receiving --------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            self._check_open()
            if max_bytes is None:
                max_bytes = RECEIVE_SIZE
            elif operator.index(max_bytes) < 1:
                raise ValueError("max_bytes must be at least 1")
            if self._pending_offset < len(self._pending):
                await trio.lowlevel.checkpoint()
                return self._take(max_bytes)
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            if self._truncated is not None:
                raise trio.BrokenResourceError(self._truncated)
            return await self._receive(max_bytes)
        finally:
            self._receiving = False

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
        while True:
            try:
                event = await self._pull.next_event()  # _poll_again may replace it
            except (trio.BrokenResourceError, OSError, RemoteProtocolError) as exc:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed") from None
                quiet = trio.current_time() - self._pull.last_used
                if quiet >= 1.0:  # tells a proxy's read timeout from a sudden cut
                    exc_text = f"{exc} ({quiet:.0f} s after the server last sent anything)"
                else:
                    exc_text = str(exc)
                self._pull_failure = f"its pull failed: {exc_text}"
                raise trio.BrokenResourceError(
                    f"pull from the PHT server failed: {exc_text}"
                ) from exc
            if isinstance(event, DataReceived):
                self._pending, self._pending_offset = event.data, 0
                return self._take(max_bytes)
            if isinstance(event, PullEnded):
                if event.session_over:
                    return await self._end_of_session()
                try:
                    await self._poll_again()
                except (TunnelError, trio.BrokenResourceError, OSError) as exc:
                    self._pull_failure = f"it could not be polled again: {exc}"
                    raise trio.BrokenResourceError(
                        f"pull from the PHT server failed: {exc}"
                    ) from exc
            elif isinstance(event, Rejected):
                if self._polls > 1 and event.status_code == 403:
                    # A legacy server forgets a closed session's token: EOF.
                    # (410 is no such end: it says that data was not consumed.)
                    return await self._end_of_session()
                message = _explain_rejection(
                    event,
                    self._config.paths,
                    authorize=self._config.authorize,
                    session_ended=self._how_session_ended(),
                )
                raise trio.BrokenResourceError(message) from TunnelError(
                    message, status=event.status_code
                )
            elif not isinstance(event, Heartbeat | PullStarted):  # pragma: no cover
                raise trio.BrokenResourceError(f"unexpected event on the pull: {event}")

    async def _poll_again(self) -> None:
        # The previous response ended cleanly: a new GET on a new connection is
        # safe when the old one ended (or aged) while idle.
        if not await self._pull.reusable():
            await self._pull.aclose()
            self._pull = await self._connect.open(self._config)
        self._polls += 1
        await self._pull.send(self._pull.channel.pull(self.token))

    def _how_session_ended(self) -> str:
        """What the client knows of how its (established) session ended."""
        if self._pull_failure is not None:
            return self._pull_failure
        if self._eof:
            return "the server closed it"
        return "closed by the server, its pull connection was cut, or it expired"

    async def _end_of_session(self) -> bytes:
        """The server ended the session: EOF, unless data was lost on the way."""
        if self._push_loss is not None:
            message = f"the PHT session ended after a push failed: {self._push_loss}"
            self._broken = self._truncated = message
            raise trio.BrokenResourceError(message)
        await trio.lowlevel.checkpoint()
        self._eof = True
        self._broken = self._broken or "the PHT session is over"
        return b""

    # -- closing ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        refused: trio.BrokenResourceError | None = None
        push = self._push
        try:
            if not self._sending:
                refused = await self._finish_pushes()
                push = self._push
            if not self._eof and not self._sending and refused is None:
                await self._notify_close(push)
        finally:
            self._push = None
            try:
                if push is not None:
                    await push.aclose()
            finally:  # a cancelled close of one still closes the other
                await self._pull.aclose()
        if refused is not None:
            raise refused

    async def _finish_pushes(self) -> trio.BrokenResourceError | None:
        """Wait (up to ``close_timeout``) for the acknowledgements still due."""
        if self._push is None or not self._push.channel.pushes_in_flight:
            return None
        with trio.move_on_after(self._close_timeout):
            try:
                await self._collect_acks(0)
            except trio.BrokenResourceError as exc:
                return exc
            return None
        message = "timed out waiting for the acknowledgement of earlier pushes"
        self._broken = message
        return trio.BrokenResourceError(message)

    async def _notify_close(self, push: _Connection | None) -> None:
        """Send the close notification, as modern GOST clients do (best effort)."""
        with trio.move_on_after(self._close_timeout) as scope:
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
        del scope

    async def _send_close(self, connection: _Connection) -> None:
        await connection.send(connection.channel.close_session(self.token))
        await connection.next_event()


class _Connector:
    """Opens the HTTP connections of one tunnel (TCP, TLS, or via a proxy)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None,
        proxy: tuple[str, int] | None,
        connect_timeout: float,
        push_window: int = 1,
    ) -> None:
        self.host, self.port = host, port
        # Channels allow two pushes in flight at least: one send_all pipelines its pushes.
        self.push_window = max(2, push_window)
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.proxy = proxy
        self.connect_timeout = connect_timeout
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    async def open(self, config: ClientConfig) -> _Connection:
        target_host, target_port = self.proxy or (self.host, self.port)
        where = f"proxy {target_host}:{target_port}" if self.proxy else self.address
        try:
            with trio.fail_after(self.connect_timeout):
                transport: trio.abc.Stream = await trio.open_tcp_stream(target_host, target_port)
        except trio.TooSlowError:
            raise TunnelError(f"timed out connecting to {where}") from None
        except OSError as exc:
            raise TunnelError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        if self.ssl_context is not None:
            assert isinstance(transport, trio.SocketStream)
            # OpenSSL on the socket: about twice trio.SSLStream's throughput.
            tls = TLSSocketStream.wrap(
                transport,
                self.ssl_context,
                server_side=False,
                server_hostname=self.server_hostname,
            )
            try:
                with trio.fail_after(self.connect_timeout):
                    await tls.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError) as exc:
                await trio.aclose_forcefully(tls)
                cause = exc.__cause__ or exc
                raise TunnelError(
                    f"TLS handshake with {self.address} failed: {cause}; is the server "
                    "speaking phts, and does the client trust its certificate?"
                ) from exc
            transport = tls
        return _Connection(transport, config, push_window=self.push_window)


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
    pushes exceed the window and in ``aclose`` (up to ``close_timeout``); a
    refused push then breaks the stream: the next ``send_all`` (or
    ``aclose``) raises :class:`trio.BrokenResourceError` saying that an
    earlier push was refused. Pushes stay on one connection, in order (GOST's
    and ``pht``'s servers answer pipelined requests in order). Within one
    ``send_all`` larger than ``max_push_size`` two pushes are in flight even
    with a window of 1.

    Returns once the server has accepted the pull, so a wrong path or an
    unknown token fails here with a :class:`TunnelError`.
    """
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    if max_push_size < 1:
        raise ValueError("max_push_size must be at least 1")
    if push_window < 1:
        raise ValueError("push_window must be at least 1")
    if not math.isfinite(connect_timeout) or connect_timeout <= 0:
        raise ValueError("connect_timeout must be a positive number of seconds")
    ssl_context: ssl.SSLContext | None
    if tls is True:
        ssl_context = ssl.create_default_context()
    elif tls is False:
        ssl_context = None
    elif isinstance(tls, ssl.SSLContext):
        ssl_context = tls
    else:
        raise TypeError(f"tls must be a bool or an ssl.SSLContext, not {type(tls).__name__}")
    proxy_address, proxy_credentials = _parse_proxy(proxy)
    if proxy_address is not None and ssl_context is not None:
        raise LocalProtocolError(
            "proxy= sends plain HTTP requests through the proxy; it cannot carry phts"
        )
    host_value = host if ":" not in host else f"[{host}]"
    default_port = 443 if ssl_context is not None else 80
    config = ClientConfig.build(
        host_value if port == default_port else f"{host_value}:{port}",
        headers=headers,
        proxy_credentials=proxy_credentials,
        authorize=authorize,
        paths=Paths(authorize=authorize_path, push=push_path, pull=pull_path),
        host_header=host_header,
        proxy_authority=None if proxy_address is None else f"{host_value}:{port}",
        scheme="https" if ssl_context is not None else "http",
    )
    connector = _Connector(
        host,
        port,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        proxy=proxy_address,
        connect_timeout=connect_timeout,
        push_window=push_window,
    )
    pull = await connector.open(config)
    try:
        try:
            with trio.fail_after(connect_timeout):
                session_token = await _start_session(pull, config, token, token_source)
        except trio.TooSlowError:
            raise TunnelError(
                f"{connector.address} accepted the connection but did not answer the "
                f"{'authorize or ' if authorize else ''}pull request within "
                f"{connect_timeout:g}s; is it a PHT server?"
            ) from None
        push = await connector.open(config)
    except BaseException:
        await pull.aclose()
        raise
    stream = _ClientStream(
        connect=connector,
        config=config,
        token=session_token,
        pull=pull,
        max_push_size=max_push_size,
        close_timeout=close_timeout,
        push_window=push_window,
    )
    stream._push = push
    return stream


async def _start_session(
    pull: _Connection, config: ClientConfig, token: str | None, token_source: TokenSource
) -> str:
    try:
        if config.authorize:
            if token is not None:
                raise ValueError("token= is for authorize=False; the server issues it otherwise")
            await pull.send(pull.channel.authorize())
            event = await pull.next_event()
            if isinstance(event, Rejected):
                raise TunnelError(
                    _explain_rejection(event, config.paths, authorize=True),
                    status=event.status_code,
                )
            assert isinstance(event, Authorized)
            token = event.token
            if pull.channel.state is ChannelState.CLOSED:
                raise TunnelError("server closed the connection after authorize")
        elif token is None:
            token = token_source()
        await pull.send(pull.channel.pull(token))
        event = await pull.next_event()
    except (trio.BrokenResourceError, OSError, RemoteProtocolError) as exc:
        raise TunnelError(f"PHT handshake with the server failed: {exc}") from exc
    if isinstance(event, Rejected):
        raise TunnelError(
            _explain_rejection(event, config.paths, authorize=config.authorize),
            status=event.status_code,
        )
    if not isinstance(event, PullStarted):  # pragma: no cover - channel guarantees
        raise TunnelError(f"unexpected answer to the pull: {event}")
    return token


def _parse_proxy(proxy: str | None) -> tuple[tuple[str, int] | None, tuple[str, str] | None]:
    if proxy is None:
        return None, None
    parts = urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"proxy must look like http://[user:pass@]host:port, got {proxy!r}")
    credentials = None
    if parts.username is not None:
        credentials = (unquote(parts.username), unquote(parts.password or ""))
    return (parts.hostname, parts.port or 8080), credentials
