"""Pieces shared by the asyncio adapters: a PHT session as an :class:`asyncio.Transport`.

asyncio's streams (:class:`asyncio.StreamReader`, :class:`asyncio.StreamWriter`
and the :class:`asyncio.StreamReaderProtocol` between them) work over any
transport. A PHT session is one, so the asyncio adapters give their users
asyncio's own stream objects rather than look-alikes: ``read``,
``readexactly``, ``readline``, ``drain``, ``wait_closed`` and their errors
behave exactly as asyncio documents them, on the default loop and on uvloop.

:class:`PHTTransport` is the part both adapters share. Its protocol-facing
side is :class:`asyncio.Transport`'s API. Its adapter-facing side is small:

- inbound: :meth:`~PHTTransport.deliver` and :meth:`~PHTTransport.deliver_eof`
  hand the peer's bytes to the protocol; :meth:`~PHTTransport.wait_reading`
  returns once the protocol wants more (``pause_reading`` back-pressure);
- outbound: :meth:`~PHTTransport.wait_outbound` returns once the application
  wrote something (or closes); :meth:`~PHTTransport.take_outbound` takes it,
  and it counts as written-but-unacknowledged until
  :meth:`~PHTTransport.acknowledge`. ``get_write_buffer_size()`` is queued
  plus unacknowledged bytes, so ``drain()`` waits for acknowledgements
  (client: the server's answer to a push; server: room on the pull), through
  ``pause_writing`` / ``resume_writing`` as asyncio's flow control does;
- tasks and the end: :meth:`~PHTTransport.start_task` runs an adapter's pump
  task and returns it (what it raises ends the session with that error);
  :meth:`~PHTTransport.lose` ends the session: it cancels the other tasks,
  waits for them, then calls the protocol's ``connection_lost`` once, so
  no task is left running when ``wait_closed()`` returns. ``close()`` calls
  :meth:`~PHTTransport._close_requested` (an adapter flushes, then loses).

:func:`open_streams` connects a transport to asyncio's streams;
:func:`within` bounds an await by a timeout without losing a cancellation.
Mid-stream failures are :class:`TunnelResetError` (a
:class:`ConnectionResetError` and a :class:`~pht.TunnelError` with the
status), what asyncio code already catches for a reset connection.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, TypeVar

from ._errors import TunnelError
from ._resume import GoneReason, SessionGone

__all__ = ["DEFAULT_LIMIT", "PHTTransport", "TunnelResetError", "open_streams", "within"]

T = TypeVar("T")

_log = logging.getLogger("pht.asyncio")

#: The reader's buffer limit by default, as :func:`asyncio.open_connection`'s.
DEFAULT_LIMIT = 2**16
#: Writes after the end that are dropped before one warning is logged (as asyncio does).
_WARN_AFTER = 5


class TunnelResetError(ConnectionResetError, TunnelError):
    """A tunnel broke: asyncio's :class:`ConnectionResetError` and a :class:`~pht.TunnelError`.

    Readers and ``drain()`` raise it, as they raise :class:`ConnectionResetError`
    for a reset TCP connection; ``status`` holds the HTTP status when a
    refusal broke it (e.g. ``410``: the server dropped the session).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        ConnectionResetError.__init__(self, message)
        self.status = status


class SessionGoneResetError(TunnelResetError, SessionGone):
    """A resume session the server will never resume: :class:`~pht.SessionGone`
    as asyncio's readers raise it (a :class:`ConnectionResetError`)."""

    def __init__(self, reason: GoneReason, message: str | None = None) -> None:
        SessionGone.__init__(self, reason)
        ConnectionResetError.__init__(self, message if message is not None else str(self))


class PHTTransport(asyncio.Transport):
    """A PHT session as an :class:`asyncio.Transport` (see the module docstring).

    ``extra`` is what :meth:`get_extra_info` answers (``"pht_token"``,
    ``"peername"``, ``"sockname"``, ``"ssl_object"``, ...); an adapter may
    add entries with :meth:`set_extra`. ``high_water`` / ``low_water`` are
    the write buffer limits (bytes queued or unacknowledged) at which the
    protocol is paused and resumed; :meth:`set_write_buffer_limits` changes
    them as asyncio's transports allow. PHT has no half-close:
    :meth:`can_write_eof` is ``False``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        extra: Mapping[str, Any] | None = None,
        high_water: int = DEFAULT_LIMIT,
        low_water: int | None = None,
    ) -> None:
        super().__init__()
        self._info: dict[str, Any] = dict(extra or {})
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        # Made by the first write: an idle tunnel holds no deque (600 bytes).
        self._chunks: deque[bytes | memoryview] | None = None
        self._queued = 0
        self._unacknowledged = 0
        self._high = 0
        self._low = 0
        self._set_limits(high_water, low_water)
        self._writing_paused = False
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._dropped_writes = 0
        self._outbound_waiter: asyncio.Future[None] | None = None
        self._reading_waiter: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- asyncio.Transport: the protocol's side ------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._info.get(name, default)

    def set_extra(self, **values: Any) -> None:
        """Add or replace :meth:`get_extra_info` entries (adapter side)."""
        self._info.update(values)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        if self._protocol is None:
            raise RuntimeError("no protocol is attached to this PHT transport yet")
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once the queued bytes went out and were acknowledged (as asyncio's close)."""
        if self._closing:
            return
        self._closing = True
        self._wake_outbound()
        self._close_requested()

    def abort(self) -> None:
        """Close now: queued bytes are dropped, the pump tasks are cancelled."""
        self._closing = True
        self._chunks = None
        self._queued = 0
        self.lose(None)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        waiter, self._reading_waiter = self._reading_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._set_limits(high, low)
        self._maybe_pause()
        self._maybe_resume()

    def _set_limits(self, high: int | None, low: int | None) -> None:
        if high is None:
            high = DEFAULT_LIMIT if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes written by the application and not yet acknowledged by the peer."""
        return self._queued + self._unacknowledged

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if self._closing:
            # As asyncio's own transports: writes after the end are dropped.
            self._dropped_writes += 1
            if self._dropped_writes == _WARN_AFTER:
                _log.warning("writes to a closed PHT stream are dropped")
            return
        if not isinstance(data, bytes):
            data = memoryview(data).cast("B").tobytes()  # the caller may change its buffer
        if not data:
            return
        if self._chunks is None:
            self._chunks = deque()
        self._chunks.append(data)
        self._queued += len(data)
        self._wake_outbound()
        self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("PHT has no half-close; close() ends the tunnel")

    # -- the adapter's side --------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def lost(self) -> bool:
        """Whether :meth:`lose` was called (the session is over)."""
        return self._lost

    @property
    def queued(self) -> int:
        """Bytes written by the application and not taken yet."""
        return self._queued

    def deliver(self, data: bytes) -> None:
        """Hand the peer's ``data`` to the protocol (dropped once closing, as asyncio does)."""
        if data and not self._closing and self._protocol is not None:
            self._protocol.data_received(data)  # type: ignore[attr-defined]

    def deliver_eof(self) -> None:
        """The peer ended the session cleanly: the reader sees EOF."""
        if not self._closing and self._protocol is not None:
            self._protocol.eof_received()  # type: ignore[attr-defined]

    async def wait_reading(self) -> None:
        """Return once the protocol accepts more data (it may ``pause_reading``)."""
        while self._reading_paused and not self._closing:
            self._reading_waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._reading_waiter is waiter:
                    self._reading_waiter = None

    async def wait_outbound(self) -> None:
        """Return once bytes are queued, or the transport is closing."""
        while not self._queued and not self._closing:
            self._outbound_waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._outbound_waiter is waiter:
                    self._outbound_waiter = None

    def take_outbound(self, max_bytes: int) -> bytes | memoryview:
        """Up to ``max_bytes`` of the queued bytes (``b""`` if none), now unacknowledged.

        A queued ``bytes`` object that fits is returned as is; larger ones
        are returned in slices without copying.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        chunks = self._chunks
        if not chunks:
            return b""
        first = chunks[0]
        if len(first) > max_bytes:
            view = memoryview(first)
            chunks[0] = view[max_bytes:]
            taken: bytes | memoryview = view[:max_bytes]
        elif len(chunks) == 1 or len(first) + len(chunks[1]) > max_bytes:
            taken = chunks.popleft()
        else:
            pieces: list[bytes | memoryview] = []
            room = max_bytes
            while chunks and len(chunks[0]) <= room:
                piece = chunks.popleft()
                pieces.append(piece)
                room -= len(piece)
            taken = b"".join(pieces)
        self._queued -= len(taken)
        self._unacknowledged += len(taken)
        return taken

    def acknowledge(self, size: int) -> None:
        """The peer took ``size`` more of the taken bytes: ``drain()`` may return."""
        self._unacknowledged = max(0, self._unacknowledged - size)
        self._maybe_resume()

    def start_task(
        self, coro: Coroutine[Any, Any, None], *, name: str | None = None
    ) -> asyncio.Task[None]:
        """Run an adapter's task; an exception it raises ends the session with it."""
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.lose(task.exception())

    def lose(self, exc: BaseException | None) -> None:
        """End the session: cancel the other tasks, then tell the protocol (once).

        ``exc`` is what the reader and ``drain()`` raise from now on (``None``:
        a clean end). The protocol's ``connection_lost`` is called once every
        task of :meth:`start_task` has finished, so ``wait_closed()``
        returning means that nothing of the session runs any more.
        """
        if self._lost:
            return
        self._lost = self._closing = True
        self._chunks = None
        self._queued = 0
        self._wake_outbound()
        if self._reading_waiter is not None and not self._reading_waiter.done():
            self._reading_waiter.set_result(None)
        current = asyncio.current_task(self._loop) if self._loop.is_running() else None
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            if task is not current:
                task.cancel()
        if tasks:
            self._loop.create_task(self._lose_after(tasks, exc))
        else:
            self._loop.call_soon(self._connection_lost, exc)

    async def _lose_after(
        self, tasks: list[asyncio.Task[None]], exc: BaseException | None
    ) -> None:
        await asyncio.wait(tasks)
        self._connection_lost(exc)

    def _connection_lost(self, exc: BaseException | None) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.connection_lost(exc)  # type: ignore[arg-type]

    def _close_requested(self) -> None:
        """``close()`` was called: flush, then :meth:`lose`. By default: lose at once."""
        self.lose(None)

    def _wake_outbound(self) -> None:
        waiter, self._outbound_waiter = self._outbound_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _maybe_pause(self) -> None:
        if self._writing_paused or self.get_write_buffer_size() <= self._high:
            return
        self._writing_paused = True
        if self._protocol is not None:
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if not self._writing_paused or self.get_write_buffer_size() > self._low:
            return
        self._writing_paused = False
        if self._protocol is not None and not self._lost:
            self._protocol.resume_writing()


def open_streams(
    transport: PHTTransport, *, limit: int = DEFAULT_LIMIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio's own reader and writer over ``transport``, as :func:`asyncio.open_connection`.

    Call it before the adapter delivers anything: the protocol is attached
    here. ``limit`` is the reader's buffer limit (``pause_reading`` above
    twice that).
    """
    loop = transport.loop
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, or :class:`TimeoutError` after ``seconds``.

    :func:`asyncio.timeout` where there is one (Python 3.11+): before 3.12
    :func:`asyncio.wait_for` loses a cancellation that arrives as the awaited
    operation completes, and a cancelled open or close would then go on.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    try:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(awaitable, seconds)
    except asyncio.TimeoutError:  # pragma: no cover - not the builtin one before 3.11
        raise TimeoutError from None
