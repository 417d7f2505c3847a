"""The server's session machine: every PHT session rule, with no I/O and no clock.

:class:`ServerSessions` is the table of one server's sessions (on top of
:class:`SessionRegistry`): it admits authorize, push and pull requests or
names the status that refuses them (``503`` while draining, ``429`` when
full or over an address's budget, ``403`` for unknown or closed tokens),
and says which sessions have expired. :class:`ServerSession` is one
session's machine: when its handler starts, when a push is acknowledged or
refused with ``410``, which pull is the current one, when a heartbeat is
due, and when the session ends.

Inputs are method calls with the current time (``now``) passed in; outputs
are return values (actions, statuses) and deadlines the adapter wakes at.
States are data: :data:`TRANSITIONS` is the machine's whole transition
table, :meth:`ServerSession._enter` the one place that changes the state,
and :meth:`ServerSession._fail` the one place that enters ``ERROR``.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypedDict, TypeVar

from ._common import DEFAULT_PATHS, Paths, take_paths
from ._errors import LocalProtocolError
from ._resume import (
    DEFAULT_GRACE,
    DEFAULT_MAX_GRACE_SESSIONS,
    DEFAULT_WINDOW,
    GoneReason,
    GraceTable,
    RequestFields,
    ResumeSettings,
    ServerResume,
    Tombstones,
)
from ._server import (
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_PUSH_LINE,
    LookupResult,
    SessionRecord,
    SessionRegistry,
)
from ._token import TokenSource, new_token

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's own from Python 3.11

__all__ = [
    "TRANSITIONS",
    "AppSettings",
    "Input",
    "PushVerdict",
    "ServerOptions",
    "ServerSession",
    "ServerSessionState",
    "ServerSessions",
    "ServerSettings",
    "transition_table_markdown",
]

#: Sessions one client address may hold, so that one party cannot take them all.
DEFAULT_MAX_SESSIONS_PER_ADDRESS = 256
#: Tokens issued by ``/authorize`` and not used yet, per client address.
DEFAULT_MAX_PENDING_PER_ADDRESS = 16
#: Open connections per client address (a tunnel uses two).
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 1024
#: Bytes a handler may queue for the client before ``send_all`` waits.
DEFAULT_MAX_BUFFERED = 1024 * 1024

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- options ---------------------------------------------------------------------


class AppSettings(TypedDict, total=False):
    """The keywords that tune a PHT server's sessions, as every pht server takes them.

    :func:`pht.serve_pht`, :func:`pht.asyncio.start_pht_server` and
    :class:`pht.asgi.PHTApp` take these as keyword arguments (the two
    servers also take :class:`ServerSettings`' connection keywords); each is
    the :class:`ServerOptions` field of the same name, with its default and
    meaning there, except the paths, given here as strings.
    A dict of them type-checks as such: ``serve_pht(handler, port, **settings)``.
    """

    authorize_path: str
    push_path: str
    pull_path: str
    backlog: int
    heartbeat_interval: float
    strict: bool
    max_sessions: int
    max_sessions_per_address: int | None
    max_pending_per_address: int | None
    trusted_proxies: Iterable[str | Network]
    idle_timeout: float | None
    issued_timeout: float
    lazy_timeout: float
    push_timeout: float
    pull_write_timeout: float
    max_buffered: int
    max_push_line: int
    max_header_size: int
    shutdown_timeout: float
    resume: bool
    resume_window: int
    grace_period: int
    max_grace_sessions: int
    legacy_grace: bool
    pull_max_bytes: int | None
    pull_max_ms: int | None


class ServerSettings(AppSettings, total=False):
    """:class:`AppSettings` and the keywords of a server that owns its connections.

    An ASGI app leaves these to the ASGI server in front of it.
    """

    max_connections_per_address: int | None
    request_timeout: float
    keepalive_timeout: float


#: The keywords :class:`ServerSettings` names, for the run-time check of a call.
SERVER_KEYWORDS = ServerSettings.__required_keys__ | ServerSettings.__optional_keys__


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerOptions:
    """Everything that tunes a PHT server, validated once, shared by every adapter.

    Every pht server takes these fields as keyword arguments
    (:class:`ServerSettings`; :meth:`build` makes the object from them), or
    a ready object as ``options=``. ``paths`` joins the three ``*_path``
    keywords; ``trusted_proxies`` holds parsed networks. Invalid values
    raise :class:`ValueError` (or :class:`TypeError` for a wrong type) here,
    before anything listens.

    Tokens issued by ``authorize_path`` and tokens that modern GOST clients
    make themselves are both accepted (``strict=True`` accepts only issued
    ones). ``backlog`` bounds tokens issued but not used yet (``429``
    beyond), ``max_sessions`` the session table. Pulls stay open and carry
    a heartbeat line every ``heartbeat_interval`` seconds. A push is
    acknowledged once the handler took its bytes; if it does not within
    ``push_timeout``, the answer is ``410`` and the session ends, as in
    GOST. Sessions idle for ``idle_timeout`` seconds (``None``: never;
    tokens never used: ``issued_timeout``) are closed. A connection must
    deliver each request within ``request_timeout`` seconds of its first
    byte (slow-header clients are cut) and is closed after
    ``keepalive_timeout`` idle seconds between requests. A pull write that
    takes longer than ``pull_write_timeout`` (the client stopped reading)
    ends its session. A handler may queue ``max_buffered`` bytes for its
    client before its writes wait; a push line may be ``max_push_line``
    bytes long and a request head ``max_header_size``.

    Admission: one client address holds at most ``max_sessions_per_address``
    sessions, ``max_pending_per_address`` issued-but-unused tokens and
    ``max_connections_per_address`` connections (``None``: no budget), so
    that one anonymous party cannot lock others out. Sessions a client made
    by pushing or pulling a token of its own are closed after
    ``lazy_timeout`` seconds unless a pull attaches to them; a session's
    handler starts with its first pushed byte or its first pull, never for a
    refused request. Behind a reverse proxy, list it in ``trusted_proxies``
    (addresses or networks): the client's address is then taken from
    ``X-Forwarded-For`` / ``X-Real-IP`` of its requests, for the budgets,
    the logs and the stream's remote address. See ``docs/security.md``.

    A graceful shutdown lets open sessions finish for up to
    ``shutdown_timeout`` seconds, then closes the rest.

    The resume extension (``docs/resume.md``) is served to a client that
    offers it on its opening pull (``resume=False``: plain PHT for
    everyone): byte offsets and acknowledgements, a replay buffer of
    ``resume_window`` bytes per session (64 KiB to 64 MiB; the handler's
    sends wait while it is full) and a grace period of ``grace_period``
    seconds (1 to 3600) in which a session whose pull was lost waits for its
    client, at most ``max_grace_sessions`` at once; an ended session's
    token gets ``410`` with ``PHT-Gone``, never a new session.
    ``legacy_grace=True`` gives sessions without the extension the same
    grace, so that a GOST client re-opening a dropped pull keeps its
    session (what the cut response carried is lost: GOST's own defect).
    ``pull_max_bytes`` / ``pull_max_ms`` end each pull response after that
    many bytes of lines or milliseconds, after a complete line, keeping the
    session (for a buffering proxy in front; ``None``: pulls stay open).
    """

    paths: Paths = DEFAULT_PATHS
    backlog: int = 128
    heartbeat_interval: float = 10.0
    strict: bool = False
    max_sessions: int = 10_000
    max_sessions_per_address: int | None = DEFAULT_MAX_SESSIONS_PER_ADDRESS
    max_pending_per_address: int | None = DEFAULT_MAX_PENDING_PER_ADDRESS
    max_connections_per_address: int | None = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    trusted_proxies: tuple[Network, ...] = ()
    idle_timeout: float | None = 600.0
    issued_timeout: float = 60.0
    lazy_timeout: float = 10.0
    push_timeout: float = 30.0
    pull_write_timeout: float = 60.0
    request_timeout: float = 60.0
    keepalive_timeout: float = 120.0
    max_buffered: int = DEFAULT_MAX_BUFFERED
    max_push_line: int = DEFAULT_MAX_PUSH_LINE
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    shutdown_timeout: float = 30.0
    resume: bool = True
    resume_window: int = DEFAULT_WINDOW
    grace_period: int = DEFAULT_GRACE
    max_grace_sessions: int = DEFAULT_MAX_GRACE_SESSIONS
    legacy_grace: bool = False
    pull_max_bytes: int | None = None
    pull_max_ms: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.paths, Paths):
            raise TypeError(f"paths must be a pht.Paths, not {type(self.paths).__name__}")
        if not math.isfinite(self.heartbeat_interval) or self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be a positive number of seconds")
        for name in (
            "push_timeout",
            "pull_write_timeout",
            "lazy_timeout",
            "request_timeout",
            "keepalive_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.max_buffered < 1 or self.max_push_line < 4:
            raise ValueError("max_buffered and max_push_line must be positive")
        if self.max_sessions < 1 or self.backlog < 1:
            raise ValueError("max_sessions and backlog must be at least 1")
        for name in (
            "max_sessions_per_address",
            "max_pending_per_address",
            "max_connections_per_address",
        ):
            budget = getattr(self, name)
            if budget is not None and budget < 1:
                raise ValueError(f"{name} must be at least 1 (or None: no budget)")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must not be negative")
        try:
            self.resume_settings  # noqa: B018 (validates the three of them)
        except LocalProtocolError as exc:
            raise ValueError(
                f"resume_window, grace_period or max_grace_sessions out of range: {exc}"
            ) from None
        for name, low in (("pull_max_bytes", 1), ("pull_max_ms", 1)):
            bound = getattr(self, name)
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
                raise TypeError(f"{name} must be an int (or None: unbounded)")
            if bound is not None and bound < low:
                raise ValueError(f"{name} must be at least {low} (or None: unbounded)")
        object.__setattr__(self, "trusted_proxies", parse_networks(self.trusted_proxies))

    @property
    def resume_settings(self) -> ResumeSettings:
        """The resume extension's limits (replay window, grace period, sessions in grace)."""
        return ResumeSettings(
            window=self.resume_window,
            grace=self.grace_period,
            max_grace_sessions=self.max_grace_sessions,
        )

    @property
    def bounded_pulls(self) -> bool:
        """Whether pull responses end after ``pull_max_bytes`` / ``pull_max_ms``."""
        return self.pull_max_bytes is not None or self.pull_max_ms is not None

    @classmethod
    def build(
        cls, *, caller: str = "ServerOptions.build", **settings: Unpack[ServerSettings]
    ) -> ServerOptions:
        """Options from a server's keyword arguments (:class:`ServerSettings`).

        ``caller`` names the function they were given to, for the
        :class:`TypeError` an unknown keyword raises.
        """
        fields: dict[str, Any] = dict(settings)
        paths = take_paths(caller, fields, SERVER_KEYWORDS)
        return cls(paths=paths, **fields)

    @classmethod
    def resolve(
        cls, caller: str, options: ServerOptions | None, settings: AppSettings
    ) -> ServerOptions:
        """A server's options: ``options=`` as given, or built from its keywords.

        Both at once is a :class:`TypeError`: which would win is not obvious.
        """
        if options is None:
            return cls.build(caller=caller, **settings)
        if not isinstance(options, ServerOptions):
            raise TypeError(f"options must be a pht.ServerOptions, not {type(options).__name__}")
        if settings:
            raise TypeError(
                f"{caller}() takes options= or keyword settings, not both "
                f"(got options= and {', '.join(sorted(settings))})"
            )
        return options


def parse_networks(trusted: Iterable[str | Network]) -> tuple[Network, ...]:
    """``trusted_proxies`` as networks; a bare address is a network of one."""
    if isinstance(trusted, (str, bytes)):
        raise TypeError("trusted_proxies must be a list of addresses or networks, not a str")
    networks = []
    for entry in trusted:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {exc}") from None
    return tuple(networks)


def host_of(peer: str | None) -> str | None:
    """The host part of ``host:port`` or ``[host]:port``."""
    if peer is None:
        return None
    host = peer.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def is_trusted(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``host`` is one of the trusted proxies."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_from_forwarded(value: bytes, trusted: tuple[Network, ...]) -> str | None:
    """The client address in an ``X-Forwarded-For`` (or ``X-Real-IP``) value.

    The rightmost entry that is not a trusted proxy: entries left of it
    were written by the client itself and prove nothing.
    """
    entries = value.decode("latin-1").split(",")
    for entry in reversed(entries):
        entry = entry.strip()
        if entry.startswith("[") and "]" in entry:  # [v6]:port
            entry = entry[1 : entry.index("]")]
        elif entry.count(":") == 1:  # v4:port
            entry = entry.partition(":")[0]
        try:
            address = ipaddress.ip_address(entry)
        except ValueError:
            return None  # garbage: fall back to the proxy's own address
        if not any(address in network for network in trusted):
            return str(address)
    return None


# --- one session -------------------------------------------------------------------


class ServerSessionState(enum.Enum):
    """Life of one session on the server."""

    # Members are singletons: hash by identity (in C), not by name (in
    # Python), since the machine looks them up on every request.
    __hash__ = object.__hash__

    ADMITTED = "ADMITTED"  #: known, but nothing started its handler yet
    STARTED = "STARTED"  #: its handler runs; no pull attached yet
    PULLED = "PULLED"  #: its handler runs and a pull is attached
    DETACHED = "DETACHED"  #: its handler runs; its pull was lost, it waits for one (grace)
    CLOSED = "CLOSED"  #: over (client close, expiry, 410, lost pull, shutdown, handler done)
    ERROR = "ERROR"  #: the adapter fed an input its state forbids


class Input(enum.Enum):
    """What can happen to a session (see :data:`TRANSITIONS`)."""

    # Members are singletons: hash by identity (in C), not by name (in
    # Python), since the machine looks them up on every request.
    __hash__ = object.__hash__

    PUSH_DATA = "push with data"  #: a push carried bytes for the handler
    PULL = "pull attached"  #: a pull attached (it replaces any older one)
    PULL_LOST = "pull lost"  #: the current pull's client hung up
    PULL_DETACHED = "pull lost, grace"  #: the pull was lost; the session waits for another
    PULL_STALLED = "pull stalled"  #: a pull write made no progress in pull_write_timeout
    PUSH_EXPIRED = "push expired"  #: a push was not consumed within push_timeout (410)
    CLOSE = "close"  #: the client closed the session (empty or form push)
    EXPIRED = "expired"  #: idle, lazy or issued timeout
    SHUTDOWN = "shutdown"  #: the server cut it at the end of a graceful shutdown
    HANDLER_DONE = "handler done"  #: the handler returned and its last bytes went out
    GRACE_EXPIRED = "grace expired"  #: no pull came back within the grace period
    REFUSED = "refused"  #: a request of the session was refused, and that ends it (400, 413)


_S = ServerSessionState
_ENDS = (
    Input.PULL_STALLED,
    Input.PUSH_EXPIRED,
    Input.CLOSE,
    Input.EXPIRED,
    Input.SHUTDOWN,
    Input.HANDLER_DONE,
    Input.REFUSED,
)

#: The session machine: ``(state, input) -> next state``. A pair that is not
#: here is a misuse by the adapter and enters ``ERROR``. A closed session
#: absorbs every input: connections of a session race with its end.
TRANSITIONS: dict[tuple[ServerSessionState, Input], ServerSessionState] = {
    (_S.ADMITTED, Input.PUSH_DATA): _S.STARTED,
    (_S.ADMITTED, Input.PULL): _S.PULLED,
    (_S.ADMITTED, Input.PULL_LOST): _S.CLOSED,
    **{(_S.ADMITTED, end): _S.CLOSED for end in _ENDS if end is not Input.HANDLER_DONE},
    (_S.STARTED, Input.PUSH_DATA): _S.STARTED,
    (_S.STARTED, Input.PULL): _S.PULLED,
    (_S.STARTED, Input.PULL_LOST): _S.CLOSED,
    (_S.STARTED, Input.PULL_DETACHED): _S.STARTED,  # no pull to lose
    (_S.STARTED, Input.GRACE_EXPIRED): _S.CLOSED,
    **{(_S.STARTED, end): _S.CLOSED for end in _ENDS},
    (_S.PULLED, Input.PUSH_DATA): _S.PULLED,
    (_S.PULLED, Input.PULL): _S.PULLED,
    (_S.PULLED, Input.PULL_LOST): _S.CLOSED,
    (_S.PULLED, Input.PULL_DETACHED): _S.DETACHED,
    (_S.PULLED, Input.GRACE_EXPIRED): _S.CLOSED,
    **{(_S.PULLED, end): _S.CLOSED for end in _ENDS},
    (_S.DETACHED, Input.PUSH_DATA): _S.DETACHED,
    (_S.DETACHED, Input.PULL): _S.PULLED,
    (_S.DETACHED, Input.PULL_LOST): _S.DETACHED,  # an older pull: it had been lost
    (_S.DETACHED, Input.PULL_DETACHED): _S.DETACHED,
    (_S.DETACHED, Input.GRACE_EXPIRED): _S.CLOSED,
    **{(_S.DETACHED, end): _S.CLOSED for end in _ENDS},
    **{(_S.CLOSED, event): _S.CLOSED for event in Input},
}


class PushVerdict(enum.Enum):
    """What to do with a push whose bytes were handed to the handler."""

    # Members are singletons: hash by identity (in C), not by name (in
    # Python), since the machine looks them up on every request.
    __hash__ = object.__hash__

    WAIT = "wait"  #: not consumed yet, deadline not reached: wait for consumption
    ACK = "ack"  #: consumed: answer 200
    GONE = "gone"  #: not consumed in time, or the session ended: answer 410
    CONFLICT = "conflict"  #: resume: the push starts beyond what arrived: answer 409


H = TypeVar("H")


@dataclass(eq=False, slots=True)
class ServerSession(Generic[H]):
    """One session's machine. The adapter keeps its own object in ``handle``.

    Pushes take turns: :meth:`may_deposit` says when the next one may hand
    its bytes over, :meth:`deposit` hands them over and returns the
    consumption goal, :meth:`verdict` says whether its push is acknowledged
    (``200``), refused (``410``: the session ends) or still waits.
    """

    token: str
    push_timeout: float
    heartbeat_interval: float
    handle: H | None = field(default=None, repr=False)
    state: ServerSessionState = ServerSessionState.ADMITTED
    #: Why the session ended (the input that closed it), once it has.
    ended_by: Input | None = None
    #: The current pull (an adapter-chosen id), ``None`` without one.
    pull: object = None
    #: Bytes handed to the handler and taken by it, over the whole session.
    deposited: int = 0
    consumed: int = 0
    #: When the push waiting now is refused with 410 (``inf``: none waits).
    push_deadline: float = math.inf
    #: When the current pull last carried something.
    last_write: float = 0.0
    #: The resume extension's state, once a pull negotiated it (``None``: plain PHT).
    resume: ServerResume | None = field(default=None, repr=False)
    #: Whether losing the pull starts a grace period (``DETACHED``) instead of the end.
    grace: bool = False

    # -- state ----------------------------------------------------------------

    def _enter(self, event: Input) -> bool:
        """Apply ``event``; returns whether it ended the session just now."""
        following = TRANSITIONS.get((self.state, event))
        if following is None:
            self._fail(f"{event.value!r} is not allowed in state {self.state.name}")
        ended = following is _S.CLOSED and self.state is not _S.CLOSED
        self.state = following
        if ended:
            self.ended_by = event
            self.pull = None
            self.push_deadline = math.inf
        return ended

    def _fail(self, message: str) -> NoReturn:  # the only way into ERROR
        self.state = _S.ERROR
        raise LocalProtocolError(f"session {self.token[:8]}: {message}")

    @property
    def closed(self) -> bool:
        return self.state is _S.CLOSED

    @property
    def lost_data(self) -> bool:
        """Whether the session ended refusing pushed bytes (410).

        Its pull must then be cut, not ended with the last chunk: a client
        that reads a clean end before the 410 would take it for EOF, and data
        lost is never EOF.
        """
        return self.ended_by is Input.PUSH_EXPIRED

    # -- pushes ---------------------------------------------------------------

    def push_data(self) -> bool:
        """A push carries bytes; returns whether the handler must start now.

        The handler starts on the first pushed byte or the first pull,
        whichever comes first: not before (a refused request, an empty push
        or an authorize would make a forwarding handler dial for nothing),
        not later (GOST's modern client may push before it pulls).
        """
        before = self.state
        self._enter(Input.PUSH_DATA)
        return before is _S.ADMITTED

    def may_deposit(self) -> bool:
        """Whether the next push may hand its bytes over (the previous one's were taken)."""
        return self.consumed >= self.deposited

    def deposit(self, size: int, now: float) -> int:
        """Hand ``size`` pushed bytes to the handler; returns the consumption goal."""
        if self.push_deadline == math.inf:
            self.push_deadline = now + self.push_timeout
        self.deposited += size
        return self.deposited

    def wait_for_push(self, now: float) -> None:
        """A push waits for its turn: its deadline runs from now."""
        if self.push_deadline == math.inf and self.state is not _S.CLOSED:
            self.push_deadline = now + self.push_timeout

    def took(self, size: int) -> None:
        """The handler took ``size`` pushed bytes."""
        self.consumed += size

    def verdict(self, goal: int, now: float) -> PushVerdict:
        """The answer to the push whose bytes end at ``goal`` (see :class:`PushVerdict`)."""
        if self.consumed >= goal:
            # Taken by the handler: acknowledged, even if the session ended
            # since (a handler that took its bytes and returned at once).
            return PushVerdict.ACK
        if self.state is _S.CLOSED:
            return PushVerdict.GONE
        if now >= self.push_deadline:
            return PushVerdict.GONE
        return PushVerdict.WAIT

    def push_over(self, verdict: PushVerdict) -> None:
        """The push got ``verdict``: a refused one ends the session, bytes untaken dropped.

        The client is told the write failed, so what the handler did not
        take must not reach it later.
        """
        if verdict is PushVerdict.GONE:
            self.deposited = self.consumed
            self._enter(Input.PUSH_EXPIRED)
        if self.consumed >= self.deposited:
            self.push_deadline = math.inf

    # -- pulls ----------------------------------------------------------------

    def attach_pull(self, pull: object, now: float) -> tuple[object, bool]:
        """Pull ``pull`` attached: ``(pull it replaces or None, whether to start the handler)``.

        A newer long poll replaces a stale one (the client re-polled, or a
        proxy kept the old connection open).
        """
        before, replaced = self.state, self.pull
        self._enter(Input.PULL)
        if self.state is _S.CLOSED:
            return None, False  # too late: the adapter ends the pull at once
        self.pull = pull
        self.last_write = now
        return replaced, before is _S.ADMITTED

    def pull_ended(self, pull: object, *, hung_up: bool, stalled: bool) -> bool:
        """Pull ``pull`` is over; returns whether that ends the session.

        A stalled pull (the client stopped reading) ends it; so does a pull
        whose client hung up, unless a newer pull replaced it: nothing else
        could deliver the handler's bytes. A session with :attr:`grace`
        enters ``DETACHED`` instead (the adapter starts its grace period) and
        waits for a pull to come back.
        """
        if self.grace and self.state is _S.PULLED:
            if pull is not self.pull:
                return False
            self.pull = None
            if hung_up or stalled:
                self._enter(Input.PULL_DETACHED)
            return False
        if stalled:
            return self._enter(Input.PULL_STALLED)
        if pull is not self.pull:
            return False
        self.pull = None
        if hung_up:
            return self._enter(Input.PULL_LOST)
        return False

    def wrote(self, now: float) -> None:
        """The current pull carried something: the heartbeat is due later."""
        self.last_write = now

    def heartbeat_due(self) -> float:
        """When the current pull needs a heartbeat line (``inf`` without a pull)."""
        if self.pull is None:
            return math.inf
        return self.last_write + self.heartbeat_interval

    def deadline(self) -> float:
        """The earliest time the adapter must wake for this session."""
        return min(self.push_deadline, self.heartbeat_due())

    # -- ends -----------------------------------------------------------------

    @property
    def detached(self) -> bool:
        """Whether the session lost its pull and waits for one (its grace period)."""
        return self.state is _S.DETACHED

    def gone_reason(self) -> GoneReason:
        """Why the session ended, as a ``410``'s ``PHT-Gone`` says it."""
        event = self.ended_by
        resume = self.resume
        if event is Input.CLOSE or (
            event is Input.HANDLER_DONE and resume is not None and resume.done
        ):
            return GoneReason.CLOSED
        if event is Input.GRACE_EXPIRED:
            return GoneReason.EXPIRED
        return GoneReason.ABORTED

    def end(self, event: Input) -> bool:
        """End the session by ``event`` (close, expiry, shutdown, handler done, grace over).

        Returns whether it ended just now (``False``: it was over already).
        """
        if event not in (
            Input.CLOSE,
            Input.EXPIRED,
            Input.SHUTDOWN,
            Input.HANDLER_DONE,
            Input.GRACE_EXPIRED,
            Input.REFUSED,
        ):
            self._fail(f"{event.value!r} does not end a session by itself")
        return self._enter(event)


# --- all sessions -------------------------------------------------------------------


class ServerSessions(Generic[H]):
    """One server's sessions: admission, refusals and expiry on top of a registry."""

    def __init__(self, options: ServerOptions, token_source: TokenSource = new_token) -> None:
        self.options = options
        self.registry: SessionRegistry[ServerSession[H]] = SessionRegistry(
            strict=options.strict,
            max_sessions=options.max_sessions,
            backlog=options.backlog,
            idle_timeout=options.idle_timeout,
            issued_timeout=options.issued_timeout,
            lazy_timeout=options.lazy_timeout,
            max_sessions_per_owner=options.max_sessions_per_address,
            max_issued_per_owner=options.max_pending_per_address,
            token_source=token_source,
        )
        #: Set by :meth:`drain`: requests that would open a session get 503.
        self.draining = False
        settings = options.resume_settings
        #: The resume extension's limits (``None``: resume is off).
        self.resume: ResumeSettings | None = settings if options.resume else None
        #: Sessions that lost their pull, until their grace period runs out.
        self.grace = GraceTable(settings.grace, settings.max_grace_sessions)
        #: Why recently ended resume sessions ended (their ``410``'s ``PHT-Gone``).
        self.tombstones = Tombstones(keep=max(settings.grace, 600))

    def client_of(
        self, peer: str | None, forwarded: bytes | None
    ) -> tuple[str | None, str | None]:
        """``(owner, remote_address)`` of a request from ``peer``.

        The owner (what admission budgets count against) is the client's
        host; behind a trusted proxy, the address the proxy reports.
        """
        host = host_of(peer)
        trusted = self.options.trusted_proxies
        if forwarded is None or host is None or not is_trusted(host, trusted):
            return host, peer
        real = client_from_forwarded(forwarded, trusted)
        return (real, real) if real is not None else (host, peer)

    def connection_budget(self, host: str | None) -> int | None:
        """Connections ``host`` may hold at once (``None``: no budget)."""
        if host is None or is_trusted(host, self.options.trusted_proxies):
            return None
        return self.options.max_connections_per_address

    def drain(self) -> None:
        """A graceful shutdown began: no new sessions from now on."""
        self.draining = True

    def authorize(self, now: float, owner: str | None) -> str | int:
        """A token for ``/authorize``, or the status that refuses it (503, 429)."""
        if self.draining:
            return 503
        token = self.registry.issue(now, owner)
        return 429 if token is None else token

    def gone(self, token: str, fields: RequestFields, now: float) -> GoneReason | None:
        """Why a request that continues a resume session must get ``410`` (``None``: admit it).

        A request with ``PHT-Ack`` never creates a session (no resurrection):
        without a live session for ``token`` it gets ``410`` with
        ``PHT-Gone`` (why the session ended, or ``unknown``).
        """
        if not fields.continues or self.resume is None:
            return None
        record = self.registry.get(token)
        live = None if record is None else record.payload
        if live is None or live.closed:
            return self.tombstones.reason(token, now)
        return None

    def admit(self, token: str, now: float, owner: str | None) -> ServerSession[H] | int:
        """The session a push or pull for ``token`` goes to, or the status to answer.

        503 while draining (unless the session is under way), 429 when full
        or over the owner's budget, 403 for an unknown (strict) or closed
        token. A token's first use creates its session machine.
        """
        registry = self.registry
        if self.draining:
            existing = registry.get(token)
            if existing is None or existing.payload is None:
                return 503
        record = registry.lookup(token, now, owner)
        if isinstance(record, LookupResult):
            return record.status_code
        session = record.payload
        if session is None:
            options = self.options
            session = ServerSession(token, options.push_timeout, options.heartbeat_interval)
            session.grace = options.legacy_grace
            record.payload = session
        return session

    def negotiate(self, session: ServerSession[H], fields: RequestFields) -> bool:
        """Whether an opening pull with ``fields`` makes ``session`` a resume session.

        Only a session's first pull negotiates, before any byte was pushed
        (a resume client pushes only once it is negotiated).
        """
        if (
            self.resume is None
            or session.resume is not None
            or session.state not in (_S.ADMITTED, _S.STARTED)
            or session.deposited
        ):
            return False
        resume = ServerResume.negotiate(self.resume, fields)
        if resume is None:
            return False
        session.resume = resume
        session.grace = True
        return True

    def detach(self, session: ServerSession[H], now: float) -> bool:
        """``session`` lost its pull: start its grace period; ``False``: end it now.

        The table of sessions in grace is bounded (``max_grace_sessions``):
        beyond it a session ends at once, the ones waiting keep theirs.
        """
        if self.grace.detach(session.token, now):
            return True
        session.end(Input.GRACE_EXPIRED)
        return False

    def grace_expired(self, now: float) -> list[ServerSession[H]]:
        """Sessions whose grace period ran out (now ``CLOSED``: end them)."""
        ended = []
        for token in self.grace.expired(now):
            record = self.registry.get(token)
            session = None if record is None else record.payload
            if session is not None and session.detached:
                session.end(Input.GRACE_EXPIRED)
                ended.append(session)
        return ended

    def next_grace_deadline(self) -> float:
        """When the earliest grace period runs out (``inf``: none runs)."""
        deadline = self.grace.next_deadline()
        return math.inf if deadline is None else deadline

    def pushed(self, session: ServerSession[H], now: float) -> None:
        """A push for ``session`` arrived: a grace period running starts again."""
        if session.detached:
            self.grace.touch(session.token, now)

    def _ended(self, session: ServerSession[H], now: float) -> None:
        """``session`` is over: out of the grace table, and buried if it resumed."""
        self.grace.attach(session.token)
        if session.resume is not None:
            self.tombstones.bury(session.token, session.gone_reason(), now)

    def record_of(self, session: ServerSession[H]) -> SessionRecord[ServerSession[H]] | None:
        """``session``'s registry record while the session is in the table."""
        record = self.registry.get(session.token)
        return record if record is not None and record.payload is session else None

    def attach_pull(
        self, session: ServerSession[H], pull: object, now: float
    ) -> tuple[object, bool]:
        """Attach ``pull`` to ``session`` (see :meth:`ServerSession.attach_pull`).

        A pull is the session's sign of life: ``idle_timeout`` applies to it
        from now on instead of ``lazy_timeout`` (a GOST client always pulls).
        """
        result = session.attach_pull(pull, now)
        self.grace.attach(session.token)
        record = self.record_of(session)
        if record is not None and not record.alive:
            self.registry.mark_alive(record, now)
        return result

    def touch(self, session: ServerSession[H], now: float) -> None:
        """Data moved: the session's idle expiry starts again."""
        record = self.record_of(session)
        if record is not None:
            self.registry.touch(record, now)

    def close(self, token: str, now: float, event: Input = Input.CLOSE) -> ServerSession[H] | None:
        """End ``token``'s session (or make sure a late request cannot open one).

        Returns the session's machine if the token had one (now ``CLOSED``).
        """
        record = self.registry.close(token, now)
        session = None if record is None else record.payload
        if session is not None:
            session.end(event)
            self._ended(session, now)
        return session

    def forget(self, session: ServerSession[H], now: float) -> None:
        """Drop an ended session from the table (its token stays refused)."""
        if self.record_of(session) is not None:
            self.registry.close(session.token, now)
            self._ended(session, now)

    def expired(self, now: float) -> list[SessionRecord[ServerSession[H]]]:
        """Sessions idle for too long. A session with a pull attached is alive, not idle."""
        due = []
        for record in self.registry.expired(now):
            if self.expire(record, now):
                due.append(record)
        return due

    def expire(self, record: SessionRecord[ServerSession[H]], now: float) -> bool:
        """Whether ``record`` is expired now; one with a pull attached is touched instead."""
        registry = self.registry
        if not registry.is_expired(record, now):
            return False
        session = record.payload
        if session is not None and session.pull is not None:
            registry.touch(record, now)
            return False
        return True


def transition_table_markdown() -> str:
    """:data:`TRANSITIONS` as a Markdown table (rendered into docs/protocol.md)."""
    states = [state for state in ServerSessionState if state is not _S.ERROR]
    lines = [
        "| state | " + " | ".join(event.value for event in Input) + " |",
        "|---|" + "---|" * len(Input),
    ]
    for state in states:
        cells = []
        for event in Input:
            following = TRANSITIONS.get((state, event))
            cells.append(following.name if following is not None else "ERROR")
        lines.append(f"| {state.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
