"""What every PHT server adapter shares beside the session machine: sans-IO bookkeeping.

:mod:`pht._server_session` decides the protocol (admission, verdicts,
session ends). This module holds the rest of what a server must keep per
session, per connection and per listener, so that an adapter (trio,
asyncio, ASGI) only moves bytes and waits:

- :class:`SessionBuffers`: one session's bytes between the client and its
  handler, their limits, the push deposit (:class:`Push`, stepped to a
  :class:`~pht._server_session.PushVerdict`) and what its pull does next
  (:class:`PullAction`).
- :class:`TimerWheel` and :class:`HeartbeatWheel`: when pulls need a
  heartbeat, at no cost per idle pull.
- :class:`Watchdog`, :class:`ConnectionTimer`, :class:`PullWriteTimer`: the
  deadlines that one periodic task enforces instead of a timer per request.
- :class:`ServerCore`: one listener's sessions, connection budgets, handler
  life and refusals (counted in the stats).

Nothing here waits, reads a clock or imports an event loop: time is passed
in, and where a waiter may proceed the core calls one of the adapter's
``_wake_*`` hooks (plain methods the adapter overrides to set its events).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ._events import (
    AuthorizeRequest,
    BadRequest,
    CloseRequest,
    PullRequest,
    PushData,
    PushRequest,
    ServerEvent,
)
from ._resume import (
    AckOutOfRange,
    GoneReason,
    OffsetGap,
    PullMeter,
    ResponseFields,
    ResumeConflict,
    ResumeHeaderError,
)
from ._server import NO_RESUME_FIELDS, ServerConnection
from ._server_session import Input, PushVerdict, ServerOptions, ServerSession, ServerSessions
from ._stats import NullStats, PHTStatsSink

__all__ = [
    "PARK_AFTER",
    "PULL_PROGRESS",
    "PULL_WRITE_SIZE",
    "TEARDOWN_BATCH",
    "UNPULLED_ROOM",
    "AcceptFailures",
    "ConnectionTimer",
    "Expiring",
    "HeartbeatTimer",
    "HeartbeatWheel",
    "PullAction",
    "PullInput",
    "PullWriteTimer",
    "Push",
    "ServerCore",
    "SessionBuffers",
    "ShutdownReport",
    "Timer",
    "TimerWheel",
    "Watchdog",
    "format_peer",
    "server_ssl_context",
    "short_token",
]

log = logging.getLogger("pht.server")

_NO_FIELDS = NO_RESUME_FIELDS

#: Bytes a handler may queue before the session's first pull attaches.
UNPULLED_ROOM = 16 * 1024
#: Sessions that start ending per scheduler batch (mass closes and expiries).
TEARDOWN_BATCH = 8
#: Seconds a connection idles between requests before it is parked
#: (:class:`ConnectionTimer`): long enough that a busy tunnel's push
#: connection, which idles milliseconds between writes, never is.
PARK_AFTER = 2.0
#: Bytes a pull write must get through within ``pull_write_timeout``: the
#: timeout bounds each piece of this size, not a whole write, so a slow
#: reader keeps its pull and one that stopped reading loses it.
PULL_PROGRESS = 64 * 1024
#: Raw bytes taken for one pull write.
PULL_WRITE_SIZE = 1024 * 1024


def short_token(token: str) -> str:
    """``token`` shortened for the logs."""
    return token[:8] + "…" if len(token) > 10 else token


def format_peer(host: str, port: int) -> str:
    """``host:port`` (``[host]:port`` for IPv6), as the logs and ``remote_address`` show it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_ssl_context(tls: object) -> Any:
    """The server's :class:`ssl.SSLContext` for a ``tls`` / ``ssl`` argument (``None``: plain).

    ``True`` makes GOST's self-signed certificate (ECDSA P-256,
    ``O=GOST, CN=gost.run``) at start-up; a
    :class:`~pht.SelfSignedCertificate` or an :class:`ssl.SSLContext` is
    served as given; ``False`` / ``None`` mean plain PHT.
    """
    if tls is None or tls is False:
        return None
    import ssl  # only servers that use TLS pay for it

    from ._tls import SelfSignedCertificate, make_self_signed_certificate

    if tls is True:
        return make_self_signed_certificate().server_context()
    if isinstance(tls, SelfSignedCertificate):
        return tls.server_context()
    if isinstance(tls, ssl.SSLContext):
        return tls
    raise TypeError(f"tls must be a bool or an ssl.SSLContext, not {type(tls).__name__}")


# --- one session's bytes -------------------------------------------------------------


class PullAction(enum.Enum):
    """What a session's pull writes next (see :meth:`SessionBuffers.pull_action`)."""

    __hash__ = object.__hash__

    WRITE = "write"  #: write :meth:`SessionBuffers.take_outbound`'s bytes
    HEARTBEAT = "heartbeat"  #: write a heartbeat line (already counted as written)
    END = "end"  #: write the pull's last chunk: the session is over
    CUT = "cut"  #: close the connection mid-answer: pushed bytes were refused
    WAIT = "wait"  #: nothing to do until woken (``_wake_pull``) or the heartbeat is due


class SessionBuffers:
    """One session's bytes: client -> handler (inbound) and handler -> client (outbound).

    The adapter subclasses it as its handler's stream and overrides the
    ``_wake_*`` hooks; the core calls them when a waiter may proceed:
    ``_wake_reader`` (bytes arrived or EOF), ``_wake_pushes`` (bytes taken:
    a push's verdict may have changed), ``_wake_pull`` (outbound bytes or
    the end), ``_wake_sender`` (room to queue), ``_wake_finished`` (nothing
    more goes to the client). Outbound room is ``max_buffered``, but only
    :data:`UNPULLED_ROOM` until a pull attaches, so that pushes to sessions
    nobody pulls cannot make the server hold ``max_buffered`` each.
    """

    __slots__ = (
        "_full_room",
        "_inbound",
        "_inbound_offset",
        "_outbound",
        "_sent_high",
        "bytes_in",
        "bytes_out",
        "finished",
        "fresh",
        "handler_closed",
        "meter",
        "pull_bytes",
        "remote_address",
        "response_over",
        "room",
        "session",
        "token",
    )

    def __init__(
        self, session: ServerSession[Any], remote_address: str | None, max_buffered: int
    ) -> None:
        self.session = session
        self.token = session.token
        self.remote_address = remote_address
        self._full_room = max_buffered
        self.room = min(max_buffered, UNPULLED_ROOM)
        # Made by the first push (an idle tunnel holds none: a deque is 600 bytes).
        self._inbound: deque[bytes] | None = None
        self._inbound_offset = 0
        self._outbound = bytearray()
        #: The handler closed its stream.
        self.handler_closed = False
        #: Nothing more will go to or come from the client.
        self.finished = False
        self.bytes_in = 0
        self.bytes_out = 0
        #: Resume: bytes of the last :meth:`take_outbound` that no pull carried before.
        self.fresh = 0
        self._sent_high = 0
        #: The bounds of the current pull response (``None``: unbounded pulls).
        self.meter: PullMeter | None = None
        #: Line bytes the current bounded pull response carried.
        self.pull_bytes = 0
        #: The current pull response was ended by its bound or the end of a
        #: resume stream: a hang-up after it is the client's normal close.
        self.response_over = False

    # -- hooks (the adapter overrides them) ---------------------------------------

    def _wake_reader(self) -> None:
        """Wake a handler waiting for bytes."""

    def _wake_pushes(self) -> None:
        """Wake the pushes waiting for their verdict."""

    def _wake_pull(self) -> None:
        """Wake the pull waiting for outbound bytes."""

    def _wake_sender(self) -> None:
        """Wake a handler waiting for outbound room."""

    def _wake_finished(self) -> None:
        """Tell whoever waits for :attr:`finished` that it is set."""

    def _finish(self) -> None:
        self.finished = True
        self._wake_finished()

    def _wake_all(self) -> None:
        self._wake_reader()
        self._wake_pushes()
        self._wake_pull()
        self._wake_sender()

    # -- the handler's side --------------------------------------------------------

    @property
    def readable(self) -> bool:
        """Whether :meth:`take` has bytes to return."""
        return bool(self._inbound)

    @property
    def at_eof(self) -> bool:
        """Nothing to read and nothing will come: the handler's read returns ``b""``."""
        return not self._inbound and self.session.closed

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` pushed bytes (only when :attr:`readable`)."""
        inbound = self._inbound
        assert inbound is not None
        head = inbound[0]
        start = self._inbound_offset
        end = start + max_bytes
        if end >= len(head):
            inbound.popleft()
            self._inbound_offset = 0
            data = head[start:] if start else head
        else:
            data = head[start:end]
            self._inbound_offset = end
        self.session.took(len(data))
        self._wake_pushes()
        return data

    @property
    def must_wait_room(self) -> bool:
        """Whether the handler's next send waits (outbound full, session still open).

        In a resume session the replay buffer is the room: a send waits
        while it is full (or bytes wait to go in), until an acknowledgement.
        """
        resume = self.session.resume
        if resume is not None:
            return (bool(self._outbound) or resume.downstream.full) and not self.session.closed
        return len(self._outbound) >= self.room and not self.session.closed

    @property
    def room_left(self) -> int:
        """Bytes the handler may queue before :attr:`must_wait_room` (0: none)."""
        resume = self.session.resume
        if resume is not None:
            return 0 if self._outbound else resume.downstream.room
        return max(0, self.room - len(self._outbound))

    def queue(self, data: bytes | bytearray | memoryview) -> None:
        """Queue the handler's bytes for the client (the adapter wakes its pull).

        In a resume session they go into the replay buffer; what it has no
        room for waits here (and the handler's next send waits).
        """
        resume = self.session.resume
        if resume is not None:
            taken = 0 if self._outbound else resume.write(data)
            size = len(data) if not isinstance(data, memoryview) else data.nbytes
            if taken < size:
                self._outbound += memoryview(data).cast("B")[taken:]
            self.bytes_out += size
            return
        self._outbound += data
        self.bytes_out += len(data)

    def close_handler(self) -> bool:
        """The handler closed its stream; returns whether it was open until now."""
        if self.handler_closed:
            return False
        self.handler_closed = True
        self._wake_all()
        resume = self.session.resume
        if resume is not None:
            if not self._outbound:
                resume.finish()  # pulls now end after the last byte, with PHT-End
        elif not self._outbound:
            self._finish()
        return True

    # -- resume ---------------------------------------------------------------------

    def negotiated(self) -> None:
        """The session became a resume session: what the handler queued goes in the replay."""
        self._restage()

    def acked(self) -> None:
        """The client acknowledged bytes: room in the replay buffer, maybe the end.

        Bytes waiting for room go in; once the handler finished and the client
        has every byte, the session is :attr:`finished` (its handler's part is over).
        """
        resume = self.session.resume
        if resume is None:
            return
        self._restage()
        if resume.done and not self.finished:
            self._finish()

    def _restage(self) -> None:
        resume = self.session.resume
        assert resume is not None
        staged = self._outbound
        if staged:
            taken = resume.write(staged)
            if taken:
                del staged[:taken]
                self._wake_pull()
        if not staged:
            if self.handler_closed:
                resume.finish()
                self._wake_pull()
            else:
                self._wake_sender()

    # -- the pull's side -----------------------------------------------------------

    @property
    def has_outbound(self) -> bool:
        resume = self.session.resume
        if resume is not None:
            return resume.pending > 0
        return bool(self._outbound)

    @property
    def pull_must_look(self) -> bool:
        """After a write the pull's own task did not make: whether it must still look.

        It must when bytes are left queued, when its response is bounded (the
        write may have reached the bound: the response ends), and in a resume
        session (what the replay buffer holds, and when the pull ends, are
        :meth:`pull_action`'s to say).
        """
        return bool(self._outbound) or self.meter is not None or self.session.resume is not None

    def take_outbound(self, limit: int = PULL_WRITE_SIZE) -> bytes:
        """Up to ``limit`` queued bytes for the pull.

        In a resume session they stay in the replay buffer (until acknowledged);
        :attr:`fresh` says how many of them no pull carried before.
        """
        meter = self.meter
        if meter is not None and meter.max_bytes is not None:
            # End the response near its bound: lines are base64, 4 bytes per 3.
            limit = max(1, min(limit, (meter.max_bytes - self.pull_bytes) * 3 // 4))
        resume = self.session.resume
        if resume is not None:
            data = resume.next_line(limit)
            end = resume.downstream.end - resume.pending
            self.fresh = max(0, end - self._sent_high)
            self._sent_high = max(self._sent_high, end)
        else:
            data = bytes(self._outbound[:limit])
            del self._outbound[:limit]
            if len(self._outbound) < self.room:
                self._wake_sender()
            if not self._outbound and self.handler_closed:
                self._finish()
        if meter is not None:
            size = len(data) * 4 // 3 + 4  # base64, its padding and the newline
            self.pull_bytes += size
            meter.line_sent(size)
        return data

    def pull_action(self, now: float) -> PullAction:
        """What the pull does next at ``now`` (a heartbeat is counted as written).

        A bounded pull (:attr:`meter`) ends after its bytes or its time, after
        a complete line (a heartbeat first if it carried none); a resume
        session's pull ends once the handler finished and every byte went
        out (the client polls again: the session is not over).
        """
        if self._outbound and self.session.resume is None and self.meter is None:
            return PullAction.WRITE  # plain PHT, unbounded: the common case first
        session = self.session
        meter = self.meter
        if meter is not None and meter.must_end(now) and not self.finished:
            if meter.needs_heartbeat:
                meter.line_sent(1)
                session.wrote(now)
                return PullAction.HEARTBEAT
            self.response_over = True
            return PullAction.END
        resume = session.resume
        if resume is not None:
            if resume.pending and not session.closed:
                return PullAction.WRITE
            if not self.finished and resume.end is not None and not resume.pending:
                self.response_over = True
                return PullAction.END
        elif self._outbound:
            return PullAction.WRITE
        if self.finished:
            # Refused pushed bytes: no last chunk, the client must see an error.
            return PullAction.CUT if session.lost_data else PullAction.END
        if now >= session.heartbeat_due():
            session.wrote(now)
            if meter is not None:
                meter.line_sent(1)
            return PullAction.HEARTBEAT
        return PullAction.WAIT

    def pull_deadline(self) -> float:
        """When a waiting pull must wake to end its bounded response (``inf``: never)."""
        meter = self.meter
        if meter is None:
            return math.inf
        deadline = meter.deadline()
        return math.inf if deadline is None else deadline

    def pull_attached(self) -> None:
        """A pull is attached: the handler may queue up to ``max_buffered`` now."""
        if self.room < self._full_room:
            self.room = self._full_room
            self._wake_sender()

    def close_from_client(self) -> None:
        """The machine ended the session: EOF for the handler, nothing more goes out."""
        self._outbound.clear()
        self._wake_all()
        self._finish()

    # -- pushes --------------------------------------------------------------------

    def push(
        self,
        data: bytes,
        now: float,
        offset: int | None = None,
        conn: ServerConnection | None = None,
    ) -> Push | bool:
        """Start handing pushed ``data`` over.

        ``True``: acknowledge at once (an empty push), ``False``: refuse at
        once (410: the session or the handler is over); else a :class:`Push`
        to :meth:`~Push.step` until it is not ``WAIT``. In a resume session
        ``offset`` is the data's upstream offset and ``conn`` the connection
        whose answer carries ``PHT-Received``.
        """
        if self.handler_closed or self.session.closed:
            return False
        if not data:
            return True
        self.session.wait_for_push(now)
        return Push(self, data, offset, conn)

    def _deposit(self, data: bytes, now: float) -> int:
        if self._inbound is None:
            self._inbound = deque()
        self._inbound.append(data)
        self.bytes_in += len(data)
        self._wake_reader()
        return self.session.deposit(len(data), now)

    def _drop_inbound(self) -> None:
        self._inbound = None
        self._inbound_offset = 0


class Push:
    """One push waiting for the handler to take its bytes.

    Pushes of one session take turns: a client pushing on several
    connections at once cannot queue more than one push's bytes. While
    :meth:`step` says ``WAIT``, the adapter waits until the stream's
    ``_wake_pushes`` hook fires (or the :class:`Watchdog` expires it at
    :attr:`deadline`), then steps again.
    """

    __slots__ = ("_data", "_goal", "conn", "offset", "stream")

    def __init__(
        self,
        stream: SessionBuffers,
        data: bytes,
        offset: int | None = None,
        conn: ServerConnection | None = None,
    ) -> None:
        self.stream = stream
        self._data: bytes | None = data
        self._goal: int | None = None
        #: Resume: the data's upstream offset (checked at the push's turn).
        self.offset = offset
        #: Resume: the connection whose answer carries ``PHT-Received``.
        self.conn = conn

    @property
    def deadline(self) -> float:
        """When the push is refused with 410 if still not consumed."""
        return self.stream.session.push_deadline

    def expire(self) -> None:
        """The watchdog found :attr:`deadline` passed: let the waiter step."""
        self.stream._wake_pushes()

    def step(self, now: float) -> PushVerdict:
        """Deposit when it is this push's turn; then the verdict (``ACK``, ``GONE``, ``WAIT``)."""
        stream = self.stream
        session = stream.session
        goal = self._goal
        if goal is None and session.may_deposit():
            data = self._data
            assert data is not None
            self._data = None
            if self.offset is not None and session.resume is not None:
                # At its turn: earlier pushes were delivered or failed by now.
                try:
                    part = session.resume.push(self.offset, data)
                except OffsetGap:
                    session.push_over(PushVerdict.CONFLICT)
                    return PushVerdict.CONFLICT
                if not part:  # a retry of bytes delivered already
                    session.push_over(PushVerdict.ACK)
                    return PushVerdict.ACK
                data = part if type(part) is bytes else bytes(part)
            goal = self._goal = stream._deposit(data, now)
        verdict = session.verdict(session.deposited if goal is None else goal, now)
        if verdict is PushVerdict.WAIT:
            if not stream.handler_closed:
                return verdict
            verdict = PushVerdict.GONE  # nobody will take them
        if verdict is PushVerdict.GONE and goal is not None:
            stream._drop_inbound()  # pushes take turns: all that is queued is this push's
        session.push_over(verdict)
        return verdict if goal is not None else PushVerdict.GONE


# --- timers ------------------------------------------------------------------------


class Timer:
    """An entry of a :class:`TimerWheel` (``slot`` is the wheel's bookkeeping)."""

    __slots__ = ("slot",)

    def __init__(self) -> None:
        self.slot: int | None = None


T = TypeVar("T", bound=Timer)


class TimerWheel(Generic[T]):
    """Timers filed by due time in slots of ``tick`` seconds.

    Due times are rounded up to the next slot, so a timer fires up to one
    tick late, never early. Adding, discarding and checking cost no more
    per timer than a set operation; nothing is done per timer while none
    is due.
    """

    __slots__ = ("slots", "tick")

    def __init__(self, tick: float) -> None:
        if not tick > 0:
            raise ValueError("tick must be a positive number of seconds")
        self.tick = tick
        self.slots: dict[int, set[T]] = {}

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.slots.values())

    def add(self, timer: T, due: float) -> bool:
        """File ``timer`` at ``due``; returns whether :meth:`next_deadline` got earlier."""
        before = self.next_deadline()
        slot = timer.slot = math.ceil(due / self.tick)
        bucket = self.slots.get(slot)
        if bucket is None:
            self.slots[slot] = {timer}
        else:
            bucket.add(timer)
        return slot * self.tick < before

    def discard(self, timer: T) -> None:
        """Take ``timer`` out (it may be filed or not)."""
        if timer.slot is None:
            return
        slot, timer.slot = timer.slot, None
        bucket = self.slots.get(slot)
        if bucket is not None:
            bucket.discard(timer)
            if not bucket:
                del self.slots[slot]

    def next_deadline(self) -> float:
        """When the earliest timer is due (``inf``: none filed)."""
        return min(self.slots) * self.tick if self.slots else math.inf

    def due(self, now: float) -> list[T]:
        """The timers due at ``now``, taken out of the wheel."""
        fired: list[T] = []
        for slot in [slot for slot in self.slots if slot * self.tick <= now]:
            for timer in self.slots.pop(slot):
                timer.slot = None
                fired.append(timer)
        return fired


class HeartbeatTimer(Timer):
    """One pull's place in the :class:`HeartbeatWheel`."""

    __slots__ = ("pull", "session")

    def __init__(self, session: ServerSession[Any], pull: object) -> None:
        super().__init__()
        self.session = session
        self.pull = pull


class HeartbeatWheel:
    """When pulls need a heartbeat line, for all pulls of a server.

    Filed in slots of ``interval / 8``, so the adapter's one heartbeat task
    sleeps until :meth:`next_deadline` and an idle server (or an idle pull
    between two heartbeats) costs nothing. Data written on a pull moves its
    session's due time only; the pull is re-filed when its slot comes up. A
    heartbeat goes out between ``interval`` and ``interval * 9 / 8`` after
    the last write.
    """

    __slots__ = ("_interval", "wheel")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self.wheel: TimerWheel[HeartbeatTimer] = TimerWheel(interval / 8)

    def add(self, session: ServerSession[Any], pull: object) -> tuple[HeartbeatTimer, bool]:
        """File ``session``'s current pull ``pull``: ``(its timer, whether to wake the task)``."""
        timer = HeartbeatTimer(session, pull)
        due = session.heartbeat_due()
        if due == math.inf:  # the pull is over already
            return timer, False
        return timer, self.wheel.add(timer, due)

    def discard(self, timer: HeartbeatTimer) -> None:
        self.wheel.discard(timer)

    def next_deadline(self) -> float:
        return self.wheel.next_deadline()

    def due(self, now: float) -> list[object]:
        """The pulls (as given to :meth:`add`) whose heartbeat is due at ``now``.

        Their adapter wakes them; each writes its heartbeat after asking
        :meth:`SessionBuffers.pull_action`. Pulls replaced or over drop out.
        """
        wake = []
        for timer in self.wheel.due(now):
            session = timer.session
            if session.pull is not timer.pull:
                continue  # replaced or over
            due = session.heartbeat_due()
            if now >= due:
                wake.append(timer.pull)
                due = now + self._interval
            self.wheel.add(timer, due)
        return wake


class Expiring(Protocol):
    """What a :class:`Watchdog` watches: a deadline, and what to do when it passes."""

    @property
    def deadline(self) -> float: ...

    def expire(self) -> None: ...


class Watchdog:
    """Deadlines checked a few times per timeout by one task, not a timer each.

    It watches waiting pushes (410 at ``push_timeout``), pull writes
    (``pull_write_timeout``) and connections (``request_timeout``,
    ``keepalive_timeout``): the adapter sleeps :attr:`interval` and calls
    :meth:`expire_due`. A cancel scope per request would cost more than the
    rest of the request.
    """

    __slots__ = ("add", "discard", "interval", "watched")

    def __init__(self, options: ServerOptions) -> None:
        self.interval = min(
            options.push_timeout / 8,
            options.request_timeout / 8,
            options.pull_write_timeout / 8,
            1.0,
        )
        self.watched: set[Expiring] = set()
        # The set's own methods: these run for every push, so no Python call.
        #: Watch an item (its ``deadline`` may change while it is watched).
        self.add: Callable[[Expiring], None] = self.watched.add
        #: Stop watching an item (it need not be watched).
        self.discard: Callable[[Expiring], None] = self.watched.discard

    def expire_due(self, now: float) -> int:
        """Call ``expire()`` on everything whose deadline passed; returns how many."""
        return sum(1 for _ in self.expiring(now))

    def expiring(self, now: float) -> Iterator[Expiring]:
        """Expire what is due at ``now``, one item per step; yields each expired item.

        The adapter may let other tasks run between steps (thousands of
        connections opened together idle out together): an item that stopped
        being watched, or whose deadline moved, meanwhile is left alone.
        """
        watched = self.watched
        for item in [item for item in watched if now >= item.deadline]:
            if now >= item.deadline and item in watched:
                item.expire()
                yield item


class ConnectionTimer:
    """When one connection's wait for its next request (or the rest of it) ends.

    Between requests a connection may idle ``keepalive_timeout``; once a
    request's first byte arrived, all of it must within ``request_timeout``
    (slowloris); while the request is answered, no deadline applies (the
    push and pull timeouts do). The adapter overrides :meth:`_close`, and
    :meth:`_park` if it ``parks``: a connection idle for :data:`PARK_AFTER`
    between requests is then parked (it stops costing its own wake-up when
    its client goes; see the asyncio adapter), once, until it closes; so is
    one whose answer just ended a session, at once (:meth:`idle`).
    """

    __slots__ = ("_options", "_parks", "between_requests", "deadline", "idle_until")

    #: When :meth:`expire` is due.
    deadline: float
    #: When the keep-alive allowance of an idle connection ends.
    idle_until: float
    #: Waiting for a request's first byte (or the handshake's end).
    between_requests: bool

    def __init__(self, options: ServerOptions, now: float, *, parks: bool = False) -> None:
        self._options = options
        self._parks = parks and options.keepalive_timeout > PARK_AFTER
        self.idle(now)

    def expire(self) -> None:
        """The deadline passed: an idle connection is parked, or else closed."""
        if self.between_requests and self.deadline < self.idle_until:
            self.deadline = self.idle_until
            self._park()
        else:
            self._close()

    def _park(self) -> None:
        """Park the idle connection (the adapter overrides it if it ``parks``)."""

    def _close(self) -> None:
        """Close the connection (the adapter overrides it)."""

    def handshaking(self, now: float) -> None:
        """A TLS handshake began: it must end within ``request_timeout``."""
        self.between_requests = False
        self.deadline = now + self._options.request_timeout

    def received(self, now: float) -> None:
        """Bytes arrived: a request began, or goes on."""
        if self.between_requests:
            self.between_requests = False
            self.deadline = now + self._options.request_timeout

    def answering(self) -> None:
        """A request is complete (or a piece of a long push is delivered)."""
        self.deadline = math.inf

    def reading_on(self, now: float) -> None:
        """A piece of a long push was delivered: the rest must follow in time."""
        self.deadline = now + self._options.request_timeout

    def idle(self, now: float, *, session_over: bool = False) -> bool:
        """The answer went out (or the handshake ended): keep-alive allowance.

        Returns whether to park the connection now rather than after
        :data:`PARK_AFTER`: when its answer ended a session (a close
        notification, a pull's last chunk), its client is about to hang up,
        and thousands of sessions closed together hang up together.
        """
        self.between_requests = True
        self.idle_until = now + self._options.keepalive_timeout
        if not self._parks:
            self.deadline = self.idle_until
            return False
        if session_over:
            self.deadline = self.idle_until
            return True
        self.deadline = now + PARK_AFTER
        return False


class PullWriteTimer:
    """The deadline of a pull's write in progress (``pull_write_timeout`` per piece).

    The adapter calls :meth:`writing` before each piece of
    :meth:`pieces` and :meth:`written` after the write; the watchdog sets
    :attr:`timed_out` and calls the adapter's :meth:`_cancel`.
    """

    __slots__ = ("_timeout", "deadline", "timed_out")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self.deadline = math.inf
        self.timed_out = False

    def writing(self, now: float) -> None:
        self.deadline = now + self._timeout

    def written(self) -> None:
        self.deadline = math.inf

    def expire(self) -> None:
        self.timed_out = True
        self._cancel()

    def _cancel(self) -> None:
        """Abort the write in progress (the adapter overrides it)."""

    @staticmethod
    def pieces(data: bytes) -> tuple[bytes, ...] | list[memoryview]:
        """``data`` in pieces of :data:`PULL_PROGRESS` bytes, each written under its deadline."""
        if len(data) <= PULL_PROGRESS:
            return (data,)
        view = memoryview(data)
        return [
            view[start : start + PULL_PROGRESS] for start in range(0, len(view), PULL_PROGRESS)
        ]


class PullInput:
    """What a client sends up a connection while its pull is open.

    The adapter reads the connection during a pull only to notice at once
    that the client went away (GOST waits for a failed write). What arrives
    is a pipelined request, kept for later: a proxy sends the next request
    as soon as the pull's end went out, and it may arrive before the pull is
    over. No client streams more than a request head up an open pull.
    """

    __slots__ = ("_conn", "_left")

    def __init__(self, conn: ServerConnection, options: ServerOptions) -> None:
        self._conn = conn
        self._left = options.max_header_size

    def received(self, data: bytes | bytearray) -> bool:
        """Keep ``data``; whether to read on (``False``: the client closed, or sent too much)."""
        if not data:
            return False
        self._conn.receive_data(data)  # never dropped
        self._left -= len(data)
        if self._left < 0:
            log.debug("pull connection sent more than a request head: no longer read")
            return False
        return True


# --- accepting ---------------------------------------------------------------------


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


class AcceptFailures:
    """What a listener does when ``accept()`` fails for lack of resources.

    At the file descriptor limit (and other resource errors) accepting backs
    off for :attr:`backoff` seconds, and one warning per :attr:`interval`
    says how many attempts failed since the last one, instead of an error
    with a traceback per attempt. Other errors are the listener's end.
    """

    __slots__ = ("_failures", "_warned_at", "backoff", "interval")

    def __init__(self, interval: float = 10.0, backoff: float = 0.1) -> None:
        self.interval = interval
        self.backoff = backoff
        self._failures = 0
        self._warned_at = -math.inf

    def failed(self, exc: OSError, now: float) -> None:
        """Count a failed ``accept()``; re-raises ``exc`` unless it is a resource error.

        The adapter then waits :attr:`backoff` seconds before accepting again.
        """
        if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
            raise exc
        self._failures += 1
        if now - self._warned_at >= self.interval:
            log.warning(
                "cannot accept connections: %s (%d times since the last warning);"
                " raise the file descriptor limit (ulimit -n) or lower max_sessions",
                exc.strerror or exc,
                self._failures,
            )
            self._warned_at, self._failures = now, 0


# --- one listener ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ShutdownReport:
    """What a graceful shutdown did (:func:`pht.serve_pht`, or an asyncio server's ``close()``)."""

    #: Sessions that ended on their own within the grace period.
    finished: int
    #: Sessions still open at the deadline and closed by the server (tokens
    #: shortened as in the logs).
    cut: tuple[str, ...]


S = TypeVar("S", bound=SessionBuffers)


class ServerCore(Generic[S]):
    """One listener's shared state: sessions, connection budgets, handlers, refusals.

    ``new_stream(session, remote_address, max_buffered)`` makes the
    adapter's stream (a :class:`SessionBuffers` subclass) for a session's
    first request. The adapter overrides :meth:`_start_handler` to run the
    handler of a stream in a task, and calls :meth:`handler_started` /
    :meth:`handler_done` around it.
    """

    def __init__(
        self,
        options: ServerOptions,
        sessions: ServerSessions[S],
        new_stream: type[S],
        stats: PHTStatsSink | None = None,
    ) -> None:
        self.options = options
        self.sessions = sessions
        self.new_stream = new_stream
        self.stats: PHTStatsSink = stats if stats is not None else NullStats()
        #: Streams whose handler runs.
        self.active: set[S] = set()
        self.connections_per_address: dict[str, int] = {}
        self.wheel = HeartbeatWheel(options.heartbeat_interval)
        self.watchdog = Watchdog(options)
        #: Seconds between two looks for expired sessions.
        self.reap_interval = max(
            1.0,
            min(options.issued_timeout, options.heartbeat_interval, options.lazy_timeout / 2),
        )

    def _start_handler(self, stream: S) -> None:
        """Run the handler of ``stream`` in a task of its own (the adapter overrides it)."""
        raise NotImplementedError

    # -- connections ---------------------------------------------------------------

    def connection_opened(self, host: str | None) -> bool:
        """Count a connection from ``host``; ``False``: over its budget, close it."""
        budget = self.sessions.connection_budget(host)
        if host is None or budget is None:
            return True
        count = self.connections_per_address.get(host, 0)
        if count >= budget:
            return False
        self.connections_per_address[host] = count + 1
        return True

    def connection_closed(self, host: str | None) -> None:
        """A connection that :meth:`connection_opened` admitted is closed."""
        if host is None or host not in self.connections_per_address:
            return
        count = self.connections_per_address[host] - 1
        if count:
            self.connections_per_address[host] = count
        else:
            del self.connections_per_address[host]

    # -- requests ------------------------------------------------------------------

    def new_connection(self) -> ServerConnection:
        """The HTTP machine of a connection just accepted."""
        options = self.options
        return ServerConnection(
            options.paths,
            max_push_line=options.max_push_line,
            max_header_size=options.max_header_size,
            resume=options.resume,
        )

    def answer(
        self, conn: ServerConnection, event: ServerEvent, peer: str | None, now: float
    ) -> bytes:
        """The bytes that answer an authorize, close or refused request (nothing to wait for)."""
        if isinstance(event, AuthorizeRequest):
            token = self.authorize(peer, conn.forwarded_for, now)
            if isinstance(token, str):
                return conn.send_token(token)
            return conn.send_status(self.refused(token))
        if isinstance(event, CloseRequest):
            log.debug("session %s: %s", short_token(event.token), event.reason)
            status = self._resume_close(conn, event.token, now)
            if status is not None:
                return conn.send_status(self.refused(status))
            self.close(event.token, now)
            return conn.send_push_ack()
        if isinstance(event, BadRequest):
            status = event.status_code
            log.info("refused a request from %s (%d): %s", peer, status, event.reason)
            if event.token is not None:
                self.close(event.token, now, Input.REFUSED)
            return conn.send_status(self.refused(status))
        raise TypeError(f"{type(event).__name__} is answered by the adapter")

    def bad_http(
        self, conn: ServerConnection, status: int, peer: str | None, why: object
    ) -> bytes:
        """The bytes that answer HTTP that cannot be parsed (the connection then closes)."""
        log.info("bad request from %s: %s", peer, why)
        return conn.send_status(self.refused(status))

    def _resume_close(self, conn: ServerConnection, token: str, now: float) -> int | None:
        """The resume rules of a close notification: a status to refuse it, or ``None``.

        ``None`` closes the session (its answer carries ``PHT-Received``
        in a resume session); ``409`` says bytes are missing (the session
        goes on); ``410`` answers a close for a session gone already.
        """
        fields = conn.resume
        if fields is _NO_FIELDS:
            return None
        gone = self.sessions.gone(token, fields, now)
        if gone is not None:
            conn.response_headers = ResponseFields.gone_headers(gone)
            return 410
        record = self.sessions.registry.get(token)
        session = None if record is None else record.payload
        resume = None if session is None else session.resume
        if resume is None:
            if fields.ack is not None or fields.offset is not None:
                return 400  # a session without the extension: not affected
            return None
        stream = session.handle if session is not None else None
        try:
            if fields.ack is not None:
                resume.apply_ack(fields.ack)
            if fields.offset is not None:
                resume.close(fields.offset)
        except OffsetGap:
            conn.response_headers = resume.received_headers()
            return 409
        except (AckOutOfRange, ResumeHeaderError) as exc:
            log.info("session %s: %s", short_token(token), exc)
            self.close(token, now, Input.REFUSED)
            return 400
        if stream is not None:
            stream.acked()
        conn.response_headers = resume.received_headers()
        return None

    def refused(self, status: int) -> int:
        """Count a refusal; returns ``status``."""
        self.stats.refused(status)
        return status

    def stream_for(
        self, token: str, peer: str | None, forwarded: bytes | None, now: float
    ) -> S | int:
        """The stream a push or pull for ``token`` goes to, or the status to answer."""
        sessions = self.sessions
        owner, remote_address = sessions.client_of(peer, forwarded)
        session = sessions.admit(token, now, owner)
        if isinstance(session, int):
            return session
        stream = session.handle
        if stream is None:
            stream = session.handle = self.new_stream(
                session, remote_address, self.options.max_buffered
            )
        return stream

    def _stream_of(
        self, conn: ServerConnection, token: str, peer: str | None, now: float
    ) -> S | int:
        """The stream a request on ``conn`` for ``token`` goes to, or the status to answer.

        A resume request for a session the server will never resume is
        answered ``410`` with the reason in its headers.
        """
        if conn.resume is not _NO_FIELDS:
            gone = self.sessions.gone(token, conn.resume, now)
            if gone is not None:
                conn.response_headers = ResponseFields.gone_headers(gone)
                return 410
        return self.stream_for(token, peer, conn.forwarded_for, now)

    def pull_for(
        self, conn: ServerConnection, event: PullRequest, peer: str | None, now: float
    ) -> S | int:
        """The stream a pull goes to, or the status to answer (with the resume rules).

        An opening pull that offers the extension negotiates it; a
        re-attaching one (``PHT-Ack``) gets its replay from the ack on. The
        answer's resume headers are set on ``conn``.
        """
        fields = conn.resume
        token = event.token
        stream = self._stream_of(conn, token, peer, now)
        if isinstance(stream, int) or fields is _NO_FIELDS:
            if not isinstance(stream, int) and stream.session.resume is not None:
                log.info("session %s: a pull without PHT-Resume", short_token(token))
                return 400
            return stream
        session = stream.session
        resume = session.resume
        if resume is None:
            if fields.ack is not None:
                return 400  # negotiated without the extension: not affected
            if fields.offer is None or not self.sessions.negotiate(session, fields):
                return stream
            resume = session.resume
            assert resume is not None
            stream.negotiated()
        elif fields.offer is None:
            log.info("session %s: a pull without PHT-Resume", short_token(token))
            return 400
        try:
            headers = resume.attach(fields.ack)
        except ResumeConflict as exc:
            log.info("session %s: %s", short_token(token), exc)
            return 409
        except AckOutOfRange as exc:
            log.info("session %s: %s", short_token(token), exc)
            self.close(token, now, Input.REFUSED)
            return 400
        stream.acked()
        conn.response_headers = headers
        return stream

    def authorize(self, peer: str | None, forwarded: bytes | None, now: float) -> str | int:
        """A token for an authorize request, or the status that refuses it."""
        owner = self.sessions.client_of(peer, forwarded)[0]
        return self.sessions.authorize(now, owner)

    def push(
        self, event: PushRequest | PushData, conn: ServerConnection, peer: str | None, now: float
    ) -> Push | int:
        """A push (or a piece of a long one) read from ``conn``: the status to
        answer, or a :class:`Push` to step.

        Starts the session's handler with its first pushed byte. ``conn``
        brings the forwarded address and the resume fields, and gets the
        answer's resume headers.
        """
        token, data = event.token, event.data
        fields = conn.resume
        stream = self._stream_of(conn, token, peer, now)
        if isinstance(stream, int):
            return stream
        session = stream.session
        if session.grace:
            self.sessions.pushed(session, now)  # a grace period running starts again
        offset = None
        resume = session.resume
        if resume is not None:
            if fields.offset is None or fields.ack is None:
                # A hop dropped the headers: data and retries look alike now.
                log.info("session %s: a push without PHT-Offset or PHT-Ack", short_token(token))
                self.close(token, now, Input.REFUSED)
                return 400
            try:
                resume.apply_ack(fields.ack)  # on arrival, not at the push's turn
            except AckOutOfRange as exc:
                log.info("session %s: %s", short_token(token), exc)
                self.close(token, now, Input.REFUSED)
                return 400
            stream.acked()
            if not data and conn.resume_offset is None:
                conn.response_headers = resume.received_headers()
                return 200  # an ack-only push: answered at once
            if stream.handler_closed:
                conn.response_headers = ResponseFields.gone_headers(GoneReason.CLOSED)
                return 410  # the session goes on until the client has every byte
            # A long push comes in pieces: each starts where the last ended.
            offset = conn.resume_offset
            if offset is None:
                offset = fields.offset
            conn.resume_offset = offset + len(data)
        elif fields is not _NO_FIELDS and (fields.ack is not None or fields.offset is not None):
            return 400  # a session without the extension: not affected
        if data and session.push_data():
            self._start_handler(stream)
        push = stream.push(data, now, offset, None if resume is None else conn)
        if push is True:
            if resume is not None:
                conn.response_headers = resume.received_headers()
            return 200
        if push is False:
            return self.push_refused(stream, now)
        return push

    def push_over(self, push: Push, verdict: PushVerdict, now: float) -> int:
        """The status that answers ``push``, given its final ``verdict``."""
        conn = push.conn  # a resume session's push only
        resume = push.stream.session.resume
        if conn is not None and resume is not None:
            if verdict is PushVerdict.GONE:
                conn.response_headers = ResponseFields.gone_headers(GoneReason.ABORTED)
            else:
                conn.response_headers = resume.received_headers()
        if verdict is PushVerdict.ACK:
            return 200
        if verdict is PushVerdict.CONFLICT:
            return 409
        return self.push_refused(push.stream, now)  # type: ignore[arg-type]

    def push_refused(self, stream: S, now: float) -> int:
        # GOST answers 410 when the bytes were not taken in time; the session ends.
        self.end_session(stream, now)
        return 410

    def push_answer(self, conn: ServerConnection, status: int) -> bytes:
        """The answer to a whole push that got ``status`` (counted): ``200`` acknowledges it."""
        if status == 200:
            self.stats.push()
            return conn.send_push_ack()
        self.stats.refused(status)
        return conn.send_status(status)

    def piece_delivered(self, conn: ServerConnection, status: int) -> None:
        """A piece of a long push got ``status``; a refusal is counted and drops the rest.

        ``conn`` then reads the body to its end and returns a :class:`BadRequest`
        with ``status`` for the adapter to answer (as for any refusal).
        """
        if status != 200:
            reason = "push not consumed in time" if status == 410 else "push refused"
            conn.discard_push(self.refused(status), reason)

    def attach_pull(self, stream: S, pull: object, now: float) -> tuple[object, bool]:
        """Attach ``pull`` to ``stream``'s session before its answer's head goes out.

        Returns ``(the pull it replaces or None, whether to start the
        handler)``: the adapter ends the replaced pull, writes the head, then
        calls :meth:`pull_started`.
        """
        stream.response_over = False
        options = self.options
        if options.bounded_pulls:
            max_ms = options.pull_max_ms
            meter = stream.meter = PullMeter(
                max_bytes=options.pull_max_bytes,
                max_seconds=None if max_ms is None else max_ms / 1000,
            )
            meter.began(now)
            stream.pull_bytes = 0
        return self.sessions.attach_pull(stream.session, pull, now)

    def pull_started(self, stream: S, pull: object, start: bool) -> tuple[HeartbeatTimer, bool]:
        """The pull's head went out: ``(its heartbeat timer, whether to wake the heartbeat task)``.

        The handler may now queue ``max_buffered``; it starts here if the
        pull was the session's first sign of life (``start``).
        """
        self.stats.pull()
        stream.pull_attached()
        if start:
            self._start_handler(stream)
        return self.wheel.add(stream.session, pull)

    def pull_over(
        self,
        stream: S,
        pull: object,
        timer: HeartbeatTimer | None,
        *,
        hung_up: bool,
        stalled: bool,
        now: float,
    ) -> None:
        """Pull ``pull`` is over; ends the session if nothing else can deliver its bytes."""
        if timer is not None:
            self.wheel.discard(timer)
        session = stream.session
        if stream.response_over and pull is session.pull:
            hung_up = stalled = False  # the response was complete: the client may go
        if session.pull_ended(pull, hung_up=hung_up, stalled=stalled):
            # The client stopped reading, or went away mid-pull and no newer
            # pull took over: the session cannot deliver anything any more.
            log.debug("session %s: pull %s", short_token(stream.token), session.ended_by)
            self.end_session(stream, now)
        elif session.detached:
            # It waits for its client to come back, for its grace period.
            if self.sessions.detach(session, now):
                log.debug("session %s: pull lost, in its grace period", short_token(stream.token))
            else:
                log.info("session %s: pull lost, no room for a grace period", stream.token[:8])
                self.end_session(stream, now)

    def linger(self, stream: S) -> float:
        """How long a finished handler's session waits for its client to take the last bytes.

        ``push_timeout``; in a resume session at least the grace period, since
        the client must come back and acknowledge them.
        """
        timeout = self.options.push_timeout
        if stream.session.resume is not None:
            return max(timeout, float(self.options.grace_period))
        return timeout

    def close(self, token: str, now: float, event: Input = Input.CLOSE) -> None:
        """End ``token``'s session, or make sure a late request cannot open one."""
        session = self.sessions.close(token, now, event)
        if session is not None and session.handle is not None:
            session.handle.close_from_client()

    def end_session(self, stream: S, now: float) -> None:
        """Carry out the end of a session its machine has closed."""
        stream.close_from_client()
        self.sessions.forget(stream.session, now)

    # -- handlers ------------------------------------------------------------------

    def handler_started(self, stream: S) -> None:
        self.active.add(stream)
        self.stats.session_opened()
        log.info("session %s accepted from %s", short_token(stream.token), stream.remote_address)

    def handler_done(self, stream: S, now: float, started: float) -> bool:
        """The handler returned and its last bytes went out (or had their chance).

        Returns whether no handler runs any more.
        """
        stream.session.end(Input.HANDLER_DONE)
        self.end_session(stream, now)
        self.active.discard(stream)
        self.stats.session_closed()
        log.info(
            "session %s closed after %.3fs: %d bytes in, %d bytes out",
            short_token(stream.token),
            now - started,
            stream.bytes_in,
            stream.bytes_out,
        )
        return not self.active

    # -- expiry and shutdown -------------------------------------------------------

    def reap(self, now: float) -> Iterator[None]:
        """End expired sessions, yielding after every :data:`TEARDOWN_BATCH` of them.

        The adapter lets other tasks run at each yield: thousands expiring at
        once (a flood's junk) must not stall every other tunnel.
        """
        for session in self.sessions.grace_expired(now):
            log.info("session %s: no pull came back in its grace period", session.token[:8])
            if session.handle is not None:
                self.end_session(session.handle, now)
            else:
                self.sessions.forget(session, now)
        for number, record in enumerate(self.sessions.registry.expired(now), 1):
            if number % TEARDOWN_BATCH == 0:
                yield
            if not self.sessions.expire(record, now):
                continue  # ended, active again meanwhile, or pulled
            log.info("session %s expired after idling", short_token(record.token))
            self.close(record.token, now, Input.EXPIRED)

    def drain(self) -> set[S]:
        """A graceful shutdown began; returns the sessions open now."""
        self.sessions.drain()
        log.info("shutting down: %d sessions open", len(self.active))
        return set(self.active)

    def cut(self, now: float) -> tuple[str, ...]:
        """The grace period is over: end the sessions still open (shortened tokens)."""
        cut = tuple(sorted(short_token(stream.token) for stream in self.active))
        for stream in list(self.active):
            stream.session.end(Input.SHUTDOWN)
            self.end_session(stream, now)
        if cut:
            log.warning("shutdown cut %d sessions: %s", len(cut), ", ".join(cut))
        return cut
