"""The sans-IO client session: the PHT rules above single HTTP exchanges.

A :class:`ClientChannel` speaks HTTP on one connection. A PHT session spans
several: the authorize request and the long poll on one, the pushes on
another, new ones when an idle connection cannot be trusted. The rules that
join them live here, in :class:`ClientSession`, so that every adapter shares
them and tests reach them without sockets or a clock:

- the handshake: authorize (legacy GOST) or a self-made token (modern GOST),
  then the pull, which is established by :class:`PullStarted`;
- re-polling: a legacy server ends each long poll and expects a new ``GET``,
  on a new connection when the old one cannot be reused;
- the end: a modern pull that ends, a legacy poll answered with no line, or
  a ``403`` to a *re-poll* (a legacy server forgets a closed session's token)
  is the end of the stream; a ``410`` is data lost, an error; and once a
  push may have lost data, the end of the session is an error, never EOF;
- pushes: how many may await their acknowledgement, when idle ones are
  collected, what a refusal or a closed push connection means;
- the close notification, sent only when the session is still open.

The adapter feeds what happened (events, failures, the time) and does what
the returned values say. States are data: :data:`TRANSITIONS` lists every
allowed move and :meth:`ClientSession._enter` is the only place that sets
the state (:meth:`ClientSession._fail` the only one that enters ``ERROR``).
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import unquote, urlsplit

from ._client import ClientConfig, HeaderInput
from ._common import Paths, take_paths
from ._errors import LocalProtocolError, PHTError, TunnelError
from ._events import (
    Authorized,
    ClientEvent,
    DataReceived,
    Heartbeat,
    PullEnded,
    PullStarted,
    PushAcknowledged,
    Rejected,
    RequestKind,
)
from ._resume import Backoff, ClientResume, GoneReason, Reconnect, ResponseFields, SessionGone
from ._token import TokenSource, new_token

if TYPE_CHECKING:
    import ssl

    from typing_extensions import Unpack  # typing's own from Python 3.11

__all__ = [
    "TRANSITIONS",
    "ClientOptions",
    "ClientSession",
    "ClientSessionState",
    "ClientSettings",
    "CollectAck",
    "Deliver",
    "EndOfStream",
    "Established",
    "PollAgain",
    "PushChunk",
    "PushVerdict",
    "Reattach",
    "SendAuthorize",
    "SendPull",
    "Wait",
    "WriteDone",
    "render_transitions",
]

#: Raw bytes per push by default: one POST per MiB keeps round trips rare.
DEFAULT_MAX_PUSH_SIZE = 1024 * 1024
#: A resume session's reconnect back-off by default: ``(initial, maximum)`` seconds.
DEFAULT_RECONNECT_DELAY = (0.1, 5.0)
#: Unacknowledged pushes of a push connection unused this long are collected
#: before the next push, so that the connection's idleness can be checked.
SETTLE_ACKS = 1.0


def _positive_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _reconnect_delay(value: tuple[float, float]) -> None:
    if not isinstance(value, tuple) or len(value) != 2:
        raise TypeError(
            f"reconnect_delay must be a tuple (initial, maximum) of seconds, got {value!r}"
        )
    initial, maximum = value
    _positive_seconds("reconnect_delay's initial", initial)
    _positive_seconds("reconnect_delay's maximum", maximum)
    if initial > maximum:
        raise ValueError(
            f"reconnect_delay's initial ({initial!r} s) must not exceed its maximum "
            f"({maximum!r} s)"
        )


def _at_least_one(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")


def ssl_context_for(
    value: bool | ssl.SSLContext | None, *, name: str = "tls", none_ok: bool = False
) -> ssl.SSLContext | None:
    """The TLS context an adapter's ``tls=`` (or asyncio's ``ssl=``) argument asks for.

    ``True``: a default, verifying context; ``False`` (and ``None`` where
    ``none_ok``, as asyncio takes it): plain HTTP; a context: that one.
    Anything else is a :class:`TypeError` naming the argument.
    """
    import ssl  # here: the sans-IO core imports no socket module until TLS is asked for

    if value is True:
        return ssl.create_default_context()
    if value is False or (value is None and none_ok):
        return None
    if isinstance(value, ssl.SSLContext):
        return value
    kinds = "None, a bool" if none_ok else "a bool"
    raise TypeError(f"{name} must be {kinds} or an ssl.SSLContext, not {type(value).__name__}")


def parse_proxy(proxy: str | None) -> tuple[tuple[str, int] | None, tuple[str, str] | None]:
    """``http://[user:pass@]host:port`` as ``((host, port), (user, password))``."""
    if proxy is None:
        return None, None
    parts = urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"proxy must look like http://[user:pass@]host:port, got {proxy!r}")
    credentials = None
    if parts.username is not None:
        credentials = (unquote(parts.username), unquote(parts.password or ""))
    return (parts.hostname, parts.port or 8080), credentials


class ClientSettings(TypedDict, total=False):
    """The keywords that tune a PHT client, as every pht client takes them.

    :func:`pht.open_pht_stream` and :func:`pht.asyncio.open_pht_connection`
    take these as keyword arguments; :class:`ClientOptions` says what each
    does and its default. A dict of them type-checks as such.
    """

    authorize: bool
    authorize_path: str
    push_path: str
    pull_path: str
    headers: HeaderInput
    host_header: str | None
    proxy: str | None
    token: str | None
    token_source: TokenSource
    max_push_size: int
    connect_timeout: float
    close_timeout: float
    push_window: int
    resume: bool
    reconnect_delay: tuple[float, float]


#: The keywords :class:`ClientSettings` names, for the run-time check of a call.
CLIENT_KEYWORDS = ClientSettings.__required_keys__ | ClientSettings.__optional_keys__


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientOptions:
    """How a client session behaves, validated once, shared by every adapter.

    :meth:`build` makes one from a client's keyword arguments
    (:class:`ClientSettings`), which are:

    - ``authorize``: with ``True`` (GOST's documented flow, and what legacy
      GOST servers require) the client first asks ``authorize_path`` for a
      token; with ``False`` it makes its own (``token``, or one from
      ``token_source``) as modern GOST clients do.
    - ``authorize_path``, ``push_path``, ``pull_path``: the server's paths.
    - ``headers`` go on every request; ``host_header`` replaces the
      ``Host`` header (GOST's ``host`` option).
    - ``proxy="http://[user:pass@]host:port"`` sends every request through
      a forward HTTP proxy in absolute form, without CONNECT.
    - ``max_push_size`` bounds the raw bytes one POST carries.
    - ``push_window`` is how many pushes may await their acknowledgement.
      With 1 (the default, GOST's stop and wait) a write returns once the
      server acknowledged all its bytes. With ``N > 1`` it may return while
      up to ``N - 1`` pushes are unanswered, so the next write overlaps the
      server's work: faster uploads. Their answers are read before later
      pushes exceed the window, by a read waiting meanwhile, and in the
      close (up to ``close_timeout``); a refused push then breaks the
      stream both ways, and the next write, read or close raises an error
      saying that an earlier push was refused, with its status. Pushes stay
      on one connection, in order (GOST's and ``pht``'s servers answer
      pipelined requests in order). Within one write larger than
      ``max_push_size`` two pushes are in flight even with a window of 1.
    - ``connect_timeout`` bounds connecting and the handshake,
      ``close_timeout`` the acknowledgements and the close notification in a
      close.
    - ``resume=True`` offers the resume extension (``docs/resume.md``): if
      the server grants it, a cut pull or a push whose answer was lost is
      repeated on a new connection (with a jittered back-off, within the
      server's grace period) without losing or duplicating a byte, and the
      application sees only a slower stream. The server's ``410`` with a
      ``PHT-Gone`` other than ``closed``, or reconnects failing for the
      whole grace period, raise :class:`~pht.SessionGone`. A server that
      does not grant it (GOST) gets today's protocol.
    - ``reconnect_delay=(initial, maximum)`` is that back-off in seconds
      (default ``(0.1, 5.0)``): the *n*-th delay in a row is drawn in
      ``[d/2, d]`` with ``d = min(initial * 2**n, maximum)``; a smaller one
      comes back sooner after a cut, a larger one spares a struggling
      server.

    The fields: ``config`` forms the requests (host, paths, headers,
    generation); ``host``/``port`` is the server, reached through ``proxy``
    (an address) when set; ``secure`` says TLS (the adapter brings its
    context); ``jitter`` is the back-off's random source (a float in
    ``[0, 1)`` per call); the others are the keywords above.
    """

    config: ClientConfig
    host: str = "localhost"
    port: int = 80
    secure: bool = False
    proxy: tuple[str, int] | None = None
    token: str | None = None
    token_source: TokenSource = field(default=new_token, repr=False)
    max_push_size: int = DEFAULT_MAX_PUSH_SIZE
    push_window: int = 1
    connect_timeout: float = 30.0
    close_timeout: float = 5.0
    resume: bool = False
    reconnect_delay: tuple[float, float] = DEFAULT_RECONNECT_DELAY
    jitter: Callable[[], float] = field(default=random.random, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, ClientConfig):
            raise TypeError(f"config must be a ClientConfig, not {type(self.config).__name__}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"port must be an int, not {type(self.port).__name__}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port!r}")
        if self.proxy is not None and self.secure:
            raise ValueError(
                "proxy= sends plain HTTP requests through the proxy; it cannot carry phts"
            )
        _at_least_one("max_push_size", self.max_push_size)
        _at_least_one("push_window", self.push_window)
        _positive_seconds("connect_timeout", self.connect_timeout)
        if isinstance(self.close_timeout, bool) or not isinstance(self.close_timeout, int | float):
            raise TypeError("close_timeout must be a number of seconds")
        if math.isnan(self.close_timeout) or self.close_timeout < 0:
            raise ValueError(
                f"close_timeout must be 0 or more seconds, got {self.close_timeout!r}"
            )
        if not isinstance(self.resume, bool):
            raise TypeError(f"resume must be a bool, not {type(self.resume).__name__}")
        _reconnect_delay(self.reconnect_delay)
        if not callable(self.jitter):
            raise TypeError("jitter must be a callable returning a float in [0, 1)")
        if self.token is not None:
            if not isinstance(self.token, str) or not self.token:
                raise TypeError("token must be a non-empty str")
            if self.config.authorize:
                raise ValueError("token= is for authorize=False; the server issues it otherwise")

    @property
    def address(self) -> str:
        """The server as ``host:port`` (``[host]:port`` for IPv6), for messages."""
        return f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"

    @property
    def channel_push_window(self) -> int:
        """The push window a connection's :class:`~pht.ClientChannel` needs.

        Two at least: one write larger than ``max_push_size`` pipelines two
        pushes whatever ``push_window`` is (:meth:`ClientSession.push_window_for`).
        """
        return max(2, self.push_window)

    @property
    def unanswered_bytes(self) -> int:
        """How many written bytes may await their acknowledgement when a write returns.

        ``(push_window - 1) * max_push_size``: ``0`` for GOST's stop and wait.
        An adapter whose writes are queued (asyncio's ``drain()``) waits
        until no more than this is unanswered.
        """
        return (self.push_window - 1) * self.max_push_size

    @property
    def dial_address(self) -> tuple[str, int]:
        """Where every connection goes: the proxy when there is one, else the server."""
        return self.proxy or (self.host, self.port)

    def _dialled(self) -> str:
        if self.proxy is None:
            return self.address
        return f"proxy {self.proxy[0]}:{self.proxy[1]}"

    def connect_failed(self, exc: BaseException) -> TunnelError:
        """Connecting to :attr:`dial_address` failed with ``exc``."""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return TunnelError(f"cannot connect to {self._dialled()}: {reason}")

    def connect_timed_out(self) -> TunnelError:
        """Connecting to :attr:`dial_address` took longer than ``connect_timeout``."""
        return TunnelError(f"timed out connecting to {self._dialled()}")

    def tls_failed(self, cause: BaseException) -> TunnelError:
        """The TLS handshake failed (or timed out) with ``cause``."""
        return TunnelError(
            f"TLS handshake with {self.address} failed: {cause}; is the server "
            "speaking phts, and does the client trust its certificate?"
        )

    @classmethod
    def build(
        cls,
        host: str,
        port: int,
        *,
        secure: bool = False,
        caller: str = "ClientOptions.build",
        **settings: Unpack[ClientSettings],
    ) -> ClientOptions:
        """Options from a client's keyword arguments (:class:`ClientSettings`).

        ``caller`` names the function they were given to, for the
        :class:`TypeError` an unknown keyword raises.
        """
        fields: dict[str, Any] = dict(settings)
        paths = take_paths(caller, fields, CLIENT_KEYWORDS)
        authorize = fields.pop("authorize", True)
        headers = fields.pop("headers", None)
        host_header = fields.pop("host_header", None)
        proxy = fields.pop("proxy", None)
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        proxy_address, proxy_credentials = parse_proxy(proxy)
        host_value = host if ":" not in host else f"[{host}]"
        default_port = 443 if secure else 80
        config = ClientConfig.build(
            host_value if port == default_port else f"{host_value}:{port}",
            headers=headers,
            proxy_credentials=proxy_credentials,
            authorize=authorize,
            paths=paths,
            host_header=host_header,
            proxy_authority=None if proxy_address is None else f"{host_value}:{port}",
            scheme="https" if secure else "http",
        )
        return cls(
            config=config,
            host=host,
            port=port,
            secure=secure,
            proxy=proxy_address,
            **fields,
        )


class ClientSessionState(enum.Enum):
    """Where a client session is (the pull side decides; pushes never move it)."""

    # Members are singletons: hash by identity (in C), not by name (in
    # Python), since the machine looks them up on every request.
    __hash__ = object.__hash__

    #: Nothing sent yet.
    NEW = "new"
    #: The authorize request is out (legacy flow).
    AUTHORIZING = "authorizing"
    #: The first pull request is out; the session is established by its answer.
    STARTING = "starting"
    #: A pull response is open: data and heartbeats arrive.
    OPEN = "open"
    #: A legacy poll ended; the next one is out (or about to be).
    REPOLLING = "repolling"
    #: A resume session's pull ended or was lost; it is being re-attached
    #: (with back-off, within the grace period).
    RECONNECTING = "reconnecting"
    #: The server ended the session cleanly: the stream is at EOF.
    ENDED = "ended"
    #: The application closed the stream.
    CLOSED = "closed"
    #: The session failed; :attr:`ClientSession.error` says why.
    ERROR = "error"


S = ClientSessionState
#: Every allowed move, as (state, what happened) -> next state. ``ERROR`` and
#: ``CLOSED`` are reachable from every state (:meth:`ClientSession._fail`,
#: :meth:`ClientSession.close`) and not listed.
TRANSITIONS: dict[tuple[ClientSessionState, str], ClientSessionState] = {
    (S.NEW, "authorize sent"): S.AUTHORIZING,
    (S.NEW, "pull sent"): S.STARTING,
    (S.AUTHORIZING, "Authorized"): S.STARTING,
    (S.STARTING, "PullStarted"): S.OPEN,
    (S.OPEN, "DataReceived"): S.OPEN,
    (S.OPEN, "Heartbeat"): S.OPEN,
    (S.OPEN, "PullEnded, more to come"): S.REPOLLING,
    (S.OPEN, "PullEnded, session over"): S.ENDED,
    (S.REPOLLING, "PullStarted"): S.OPEN,
    (S.REPOLLING, "Rejected 403"): S.ENDED,
    (S.OPEN, "PullEnded, resume session"): S.RECONNECTING,
    (S.OPEN, "pull lost, resume session"): S.RECONNECTING,
    (S.OPEN, "PHT-End reached"): S.ENDED,
    (S.RECONNECTING, "pull lost, resume session"): S.RECONNECTING,
    (S.RECONNECTING, "Rejected 429/502/503/504"): S.RECONNECTING,
    (S.RECONNECTING, "PullStarted"): S.OPEN,
    (S.RECONNECTING, "Rejected 410, PHT-Gone: closed"): S.ENDED,
}
del S


def render_transitions() -> str:
    """:data:`TRANSITIONS` as a Markdown table (``docs/protocol.md`` shows it)."""
    rows = ["| state | what happened | next state |", "|---|---|---|"]
    for (state, what), target in TRANSITIONS.items():
        rows.append(f"| `{state.name}` | {what} | `{target.name}` |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True, slots=True)
class SendAuthorize:
    """Write the authorize request (the legacy flow's first step)."""


@dataclass(frozen=True, slots=True)
class Established:
    """The server accepted the pull: the handshake is over, the tunnel open."""


@dataclass(frozen=True, slots=True)
class SendPull:
    """Write the pull request for ``token`` (the handshake's second step)."""

    token: str


@dataclass(frozen=True, slots=True)
class PollAgain:
    """Write a new pull request for ``token``: on a new connection unless the
    current one is :meth:`~pht.ClientChannel.reusable`."""

    token: str


@dataclass(frozen=True, slots=True)
class Reattach:
    """Re-attach the resume session's pull: wait :meth:`ClientSession.pull_lost`'s
    delay, then write a new pull with :meth:`ClientSession.pull_headers`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``data`` to the application."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing for the application: keep reading the pull."""


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The session is over: the application's stream is at EOF."""


PullAction = SendPull | PollAgain | Reattach | Deliver | Wait | EndOfStream
#: Statuses that say a hop or the server is overwhelmed or restarting: retried
#: with back-off in a resume session (``docs/resume.md``, *Reconnecting*).
RETRY_STATUSES = frozenset({429, 502, 503, 504})


# Not frozen: one is made for every push, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs about a microsecond more.
@dataclass(slots=True)
class PushChunk:
    """Push the next ``size`` bytes (at most ``max_push_size``)."""

    size: int


@dataclass(frozen=True, slots=True)
class CollectAck:
    """Read the answer to the oldest push in flight, for :meth:`ClientSession.push_answer`."""


@dataclass(frozen=True, slots=True)
class WriteDone:
    """Nothing to push and no answer due: the write is complete."""


PushStep = PushChunk | CollectAck | WriteDone
_COLLECT_ACK = CollectAck()
_WRITE_DONE = WriteDone()
_WAIT = Wait()


@dataclass(frozen=True, slots=True)
class PushVerdict:
    """What becomes of the push connection after a push's answer or failure.

    ``drop``: close it; the next push goes on a new connection. ``retry_after``
    (resume sessions only, and only with ``drop``): wait that many seconds,
    then push again everything the server has not acknowledged (the next
    :meth:`ClientSession.write_step` says so).
    """

    drop: bool = False
    retry_after: float | None = None


_KEEP = PushVerdict()
_DROP = PushVerdict(drop=True)

_PATH_HINTS = {
    404: "the server has no such path; do the client's and server's paths match?",
    429: "the server has too many pending sessions; try again later",
    413: (
        "the request body is too large for the server or a proxy in front of it "
        "(nginx: client_max_body_size); lower max_push_size"
    ),
    410: "the session is gone (closed, or its data was not consumed in time)",
}


def describe_failure(exc: BaseException, idle_for: float) -> str:
    """``exc`` as a message; with the connection's idle time before the request, if long.

    A request that fails on a connection idle for a while points at a
    middlebox that dropped it; a sudden failure does not.
    """
    if idle_for >= 1.0:
        return f"{exc} (the connection had been idle for {idle_for:.0f} s)"
    return str(exc)


def explain_rejection(
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
    path_hint = _PATH_HINTS.get(event.status_code)
    return text if path_hint is None else f"{text}: {path_hint}"


class ClientSession:
    """The rules of one client PHT session (see the module docstring).

    Pull side: :meth:`handshake_step`, then :meth:`pull_event` for each
    event of the pull connection and :meth:`pull_broken` when it breaks.
    Push side: :meth:`push_window_for`, :meth:`should_settle`, then
    :meth:`write_step` for each step of a write, :meth:`answer_push` /
    :meth:`push_broke` / :meth:`push_connect_failed` for what an answer or a
    failure means (a :class:`PushVerdict`); the same calls whether the server
    granted resume or not. End: :meth:`settle_due`, :meth:`close`. Failures come back as
    :class:`~pht.TunnelError` (with the HTTP status when there is one). A
    failure of the pull puts the session in ``ERROR`` (:attr:`error` keeps
    it); a failure of a push only breaks sending (:attr:`send_error`), as the
    pull may still deliver what the server has, but the session's end is
    then an error, never an EOF. The exception is the refusal of a push of an
    earlier write (:attr:`refused`): no write reported it, so it ends
    receiving too (:meth:`watch_answers`).
    """

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._state = ClientSessionState.NEW
        self.token: str | None = None
        #: The error that put the session in ``ERROR``.
        self.error: TunnelError | None = None
        #: Why sending is impossible, once it is (the pull side may go on).
        self.send_error: TunnelError | None = None
        #: The refusal of a push of an earlier write (``push_window > 1``): the
        #: application has not been told by the write, so its next send or
        #: receive raises it, and a receive waiting for the pull is woken with it.
        self.refused: TunnelError | None = None
        self._pull_failure: str | None = None
        self._push_loss: str | None = None
        # Unanswered pushes of writes that have returned (push_window > 1).
        self._earlier_pushes = 0
        # Sizes of the pushes awaiting their answer, oldest first.
        self._push_sizes: deque[int] = deque()
        self._acknowledged = 0  # without resume: the sizes of the answered pushes
        #: How many pushes a write may leave unanswered: ``push_window - 1``.
        self.keep_after_write = options.push_window - 1
        #: The resume state, once the server granted the extension (else ``None``).
        self.resume: ClientResume | None = None
        self._reconnect: Reconnect | None = None
        self._pull_ack = 0  # the PHT-Ack of the current pull request
        #: The PHT-Ack and the end offset of each push in flight.
        self._push_acks: deque[tuple[int, int]] = deque()

    @property
    def state(self) -> ClientSessionState:
        return self._state

    @property
    def acknowledged(self) -> int:
        """Bytes the server acknowledged so far (an adapter reports progress from it).

        In a resume session, every ``PHT-Received`` counts, whichever answer
        carried it: a data push's or an ack-only push's.
        """
        if self.resume is not None:
            return self.resume.upstream.start
        return self._acknowledged

    @property
    def established(self) -> bool:
        """Whether the server accepted the pull once (the handshake is over)."""
        return self._state not in (
            ClientSessionState.NEW,
            ClientSessionState.AUTHORIZING,
            ClientSessionState.STARTING,
        )

    def _enter(self, what: str) -> None:
        """Take the move ``what`` from the current state, as :data:`TRANSITIONS` allows."""
        target = TRANSITIONS.get((self._state, what))
        if target is None:
            raise self._fail(f"unexpected {what} in session state {self._state.name}", local=True)
        self._state = target

    def _fail(self, message: str, *, status: int | None = None, local: bool = False) -> PHTError:
        """Enter ``ERROR`` (the only place that does); return the error to raise."""
        if self._state is not ClientSessionState.CLOSED:
            self._state = ClientSessionState.ERROR
        if local:
            return LocalProtocolError(message)
        error = TunnelError(message, status=status)
        if self.error is None:
            self.error = error
        return error

    # -- the pull side ------------------------------------------------------------

    def start(self) -> SendPull | None:
        """Begin the handshake: ``None`` means write the authorize request first."""
        if self.options.config.authorize:
            self._enter("authorize sent")
            return None
        self.token = self.options.token or self.options.token_source()
        self._enter("pull sent")
        return SendPull(self.token)

    def handshake_step(
        self, answer: ClientEvent | None = None, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> SendAuthorize | SendPull | Established:
        """The next step of the handshake: call it with ``None`` to begin, then
        with the answer to each request it named, until :class:`Established`.

        Write each request on the pull connection, or on a new one when that
        is not :meth:`~pht.ClientChannel.reusable` (a server may close the
        connection after the token). A refusal raises :class:`~pht.TunnelError`.
        """
        if answer is None:
            start = self.start()
            return SendAuthorize() if start is None else start
        action = self.pull_event(answer, headers)
        if isinstance(action, SendPull):
            return action
        # Any other answer moved the session to OPEN (PullStarted) or raised.
        assert self._state is ClientSessionState.OPEN, self._state
        return Established()

    def handshake_failed(self, exc: BaseException) -> TunnelError:
        """A connection of the handshake broke or spoke bad HTTP."""
        error = self._fail(f"PHT handshake with the server failed: {exc}")
        assert isinstance(error, TunnelError)
        return error

    def handshake_timed_out(self) -> TunnelError:
        """The server accepted the connection but did not answer in ``connect_timeout``."""
        options = self.options
        what = "authorize or " if options.config.authorize else ""
        error = self._fail(
            f"{options.address} accepted the connection but did not answer the {what}pull "
            f"request within {options.connect_timeout:g}s; is it a PHT server?"
        )
        assert isinstance(error, TunnelError)
        return error

    def pull_event(
        self, event: ClientEvent, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> PullAction:
        """What to do about ``event``, read from the pull connection.

        ``headers`` are the ``PHT-*`` headers of its response
        (:attr:`~pht.ClientChannel.resume_headers`; needed with ``resume``).
        Raises :class:`~pht.TunnelError` when the event ends the session in
        failure (a refusal, data lost).
        """
        state = self._state
        if state is ClientSessionState.CLOSED:
            # The application closed the stream; what the pull still brings
            # (the server ending it as it takes the close notification) is
            # nobody's business any more. The adapter answers its reader.
            return Wait()
        if isinstance(event, Authorized):
            self._enter("Authorized")
            self.token = event.token
            return SendPull(event.token)
        if isinstance(event, PullStarted):
            if self.options.resume and state is not ClientSessionState.OPEN:
                self._resume_pull_started(headers)
            self._enter("PullStarted")
            if self.resume is not None and self.resume.eof:
                self._enter("PHT-End reached")
                return self._end_of_session()
            return Wait()
        if isinstance(event, DataReceived):
            self._enter("DataReceived")
            if self.resume is not None:
                return self._resume_data(event.data)
            return Deliver(event.data)
        if isinstance(event, Heartbeat):
            self._enter("Heartbeat")
            return Wait()
        if isinstance(event, PullEnded):
            if self.resume is not None:
                # A resume session never ends with a response: PHT-End says where.
                if self.resume.eof:
                    self._enter("PHT-End reached")
                    return self._end_of_session()
                self._enter("PullEnded, resume session")
                assert self.token is not None
                return PollAgain(self.token)
            if event.session_over:
                self._enter("PullEnded, session over")
                return self._end_of_session()
            self._enter("PullEnded, more to come")
            assert self.token is not None
            return PollAgain(self.token)
        if isinstance(event, Rejected):
            if state is ClientSessionState.RECONNECTING and self.resume is not None:
                if event.status_code in RETRY_STATUSES:
                    self._enter("Rejected 429/502/503/504")
                    return Reattach(f"server answered {event.status_code} {event.reason}")
                if event.status_code == 410:
                    self._resume_gone(headers)  # raises unless closed
                    self._enter("Rejected 410, PHT-Gone: closed")
                    return self._end_of_session()
            if state is ClientSessionState.REPOLLING and event.status_code == 403:
                # A legacy server forgets a closed session's token: EOF.
                # (A 410 is no such end: it says that data was not consumed.)
                self._enter("Rejected 403")
                return self._end_of_session()
            config = self.options.config
            message = explain_rejection(
                event,
                config.paths,
                authorize=config.authorize,
                session_ended=self._how_session_ended() if self.established else None,
            )
            raise self._fail(message, status=event.status_code)
        raise self._fail(f"unexpected {type(event).__name__} on the pull")

    def pull_failed(self, exc: BaseException, *, quiet_for: float = 0.0) -> TunnelError:
        """The pull connection broke (``quiet_for``: seconds since it last delivered)."""
        text = str(exc)
        if quiet_for >= 1.0:  # tells a proxy's read timeout from a sudden cut
            text = f"{text} ({quiet_for:.0f} s after the server last sent anything)"
        self._pull_failure = f"its pull failed: {text}"
        if self._push_loss is not None:
            # The server cuts the pull of a session that refused pushed bytes.
            text = f"{text}; the session ended after a push failed: {self._push_loss}"
        error = self._fail(f"pull from the PHT server failed: {text}")
        assert isinstance(error, TunnelError)
        return error

    def repoll_failed(self, exc: BaseException) -> TunnelError:
        """The next legacy poll could not be sent."""
        self._pull_failure = f"it could not be polled again: {exc}"
        error = self._fail(f"pull from the PHT server failed: {exc}")
        assert isinstance(error, TunnelError)
        return error

    def _how_session_ended(self) -> str:
        if self._pull_failure is not None:
            return self._pull_failure
        if self._state is ClientSessionState.ENDED:
            return "the server closed it"
        return "closed by the server, its pull connection was cut, or it expired"

    def _end_of_session(self) -> EndOfStream:
        """The server ended the session: EOF, unless data was lost on the way."""
        if self._push_loss is not None:
            raise self._fail(f"the PHT session ended after a push failed: {self._push_loss}")
        if self.send_error is None:
            self.send_error = TunnelError("the PHT session is over")
        return EndOfStream()

    # -- resume: the pull side -------------------------------------------------------

    @property
    def resuming(self) -> bool:
        """Whether a lost pull is re-attached rather than an error (a granted resume)."""
        return self.resume is not None and self._state in (
            ClientSessionState.OPEN,
            ClientSessionState.RECONNECTING,
        )

    def pull_headers(self) -> list[tuple[bytes, bytes]]:
        """The resume headers of the next pull request (none without ``resume``).

        The opening pull offers the extension; once granted, every pull
        re-attaches with the downstream count; if the server did not grant
        it, no ``PHT-*`` header is sent again (GOST sees today's traffic).
        """
        if not self.options.resume:
            return []
        resume = self.resume
        if resume is None:
            return ClientResume.offer() if not self.established else []
        self._pull_ack = resume.downstream.received
        return resume.pull_headers()

    def pull_lost(self, reason: BaseException | str, now: float) -> float:
        """A resume session's pull broke (or was refused for now) at ``now``.

        Returns the seconds to wait before re-attaching it; raises once the
        grace period has passed since the first failure in a row.
        """
        assert self.resume is not None
        assert self._reconnect is not None
        self._enter("pull lost, resume session")
        delay = self._reconnect.failed(now)
        if delay is None:
            raise self._fail_with(self._gave_up(reason))
        return delay

    def _gave_up(self, reason: BaseException | str) -> SessionGone:
        """Reconnects failed for the whole grace period: the server has ended the
        session by now (``expired``), whatever it would say."""
        assert self._reconnect is not None
        error = SessionGone(GoneReason.EXPIRED)
        error.args = (str(self._reconnect.gave_up(str(reason))),)
        error.status = None  # no 410 came: the server was not reached
        return error

    def _fail_with(self, error: TunnelError) -> TunnelError:
        """Enter ``ERROR`` with ``error`` itself (a named one, e.g. :class:`SessionGone`)."""
        if self._state is not ClientSessionState.CLOSED:
            self._state = ClientSessionState.ERROR
        if self.error is None:
            self.error = error
        if self.send_error is None:
            self.send_error = error
        return error

    def _resume_fields(self, headers: Sequence[tuple[bytes, bytes]]) -> ResponseFields:
        try:
            return ResponseFields.from_headers(headers)
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None

    def _resume_pull_started(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        fields = self._resume_fields(headers)
        try:
            if self._state is ClientSessionState.STARTING:
                window = self.options.channel_push_window * self.options.max_push_size
                self.resume = ClientResume.negotiated(fields, buffer_limit=window)
                if self.resume is not None:
                    initial, maximum = self.options.reconnect_delay
                    backoff = Backoff(self.options.jitter, initial=initial, maximum=maximum)
                    self._reconnect = Reconnect(self.resume.terms.grace, backoff)
            elif self.resume is not None and self._reconnect is not None:
                self.resume.pull_started(self._pull_ack, fields)
                self._reconnect.succeeded()
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None

    def _resume_data(self, data: bytes) -> Deliver | Wait:
        assert self.resume is not None
        try:
            part = self.resume.pull_data(data)
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None
        if not len(part):
            return _WAIT  # all of it was a replay of bytes delivered before
        return Deliver(part if isinstance(part, bytes) else bytes(part))

    def _resume_gone(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """A ``410`` in a resume session: return if it ended cleanly, else raise."""
        fields = self._resume_fields(headers)
        try:
            ClientResume.gone(fields)
        except SessionGone as exc:
            raise self._fail_with(exc) from None
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None

    @property
    def ack_due(self) -> bool:
        """Whether to send an ack-only push now (the server's replay buffer fills)."""
        return self.resuming and self.resume is not None and self.resume.ack_due()

    def ack_only_headers(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The ack it carries and the headers of an ack-only push."""
        assert self.resume is not None
        return self.resume.downstream.received, self.resume.ack_only()

    def ack_only_answer(
        self, ack: int, event: ClientEvent, headers: Sequence[tuple[bytes, bytes]]
    ) -> bool:
        """Judge the answer to an ack-only push that carried ``ack``: ``True`` means
        retry it (after :meth:`pull_lost`'s kind of back-off, :meth:`push_lost`)."""
        resume = self.resume
        assert resume is not None
        if isinstance(event, Rejected):
            if event.status_code in RETRY_STATUSES:
                return True
            if event.status_code == 410:
                self._resume_gone(headers)
                return False  # closed: the pull reports the end
            if event.status_code != 409:
                raise self._fail(
                    f"resume failed: an ack-only push was answered {event.status_code}"
                )
        elif not isinstance(event, PushAcknowledged):
            raise self._fail(f"resume failed: unexpected answer to an ack-only push: {event}")
        fields = self._resume_fields(headers)
        try:
            resume.downstream.ack_confirmed(ack)
            if fields.received is not None:
                resume.upstream.ack(fields.received)
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None
        assert self._reconnect is not None
        self._reconnect.succeeded()
        return False

    # -- resume: the push side -------------------------------------------------------

    @property
    def resume_room(self) -> int:
        """How many written bytes the replay buffer takes now (``0``: wait for answers)."""
        assert self.resume is not None
        return self.resume.upstream.room

    def resume_write(self, data: bytes | bytearray | memoryview) -> int:
        """Keep ``data`` in the replay buffer: how much it took (the rest waits)."""
        assert self.resume is not None
        return self.resume.write(data)

    def resume_step(self, *, writing: bool, in_flight: int, window: int, keep: int) -> PushStep:
        """What a write of a resume session does next.

        ``writing``: the application's bytes do not all fit in the replay
        buffer yet. Push what was not pushed (within ``window``), collect
        answers while the buffer is full, then until at most ``keep`` pushes
        are unanswered (``0``: all, as before a close).
        """
        resume = self.resume
        assert resume is not None
        unpushed = resume.unpushed
        if unpushed and in_flight < window:
            return PushChunk(min(unpushed, self.options.max_push_size))
        if in_flight and (writing or unpushed or in_flight > keep):
            return _COLLECT_ACK
        return _WRITE_DONE

    def resume_push(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The data (at most ``max_push_size``) and headers of the next push."""
        resume = self.resume
        assert resume is not None
        offset, data = resume.next_push(self.options.max_push_size)
        self._push_acks.append((resume.downstream.received, offset + len(data)))
        return data, resume.push_headers(offset)

    def resume_push_answer(
        self, event: ClientEvent, headers: Sequence[tuple[bytes, bytes]]
    ) -> bool:
        """Judge the answer to the oldest push of a resume session.

        ``True``: push everything again from what the server has (a ``409``,
        or a hop's ``502``/``503``/``504``/``429``): drop the connection and
        call :meth:`push_lost`. Raises when the session cannot go on.
        """
        resume = self.resume
        assert resume is not None
        assert self._reconnect is not None
        if self._push_acks:
            ack, end = self._push_acks.popleft()
        else:
            ack, end = resume.downstream.acknowledged, 0
        if isinstance(event, Rejected):
            status = event.status_code
            if status in RETRY_STATUSES:
                return True
            if status == 410:
                self._resume_gone(headers)
                raise self.break_sending(
                    "the PHT session is over: the server's application finished "
                    "(410, PHT-Gone: closed)",
                    status=410,
                )
            if status != 409:
                config = self.options.config
                message = explain_rejection(
                    event, config.paths, authorize=config.authorize, session_ended=None
                )
                error = self.push_failed(message, status=status)
                if self.refused is None and self.keep_after_write:
                    self.refused = error  # a write may have returned before it: tell the reader
                raise error
        elif not isinstance(event, PushAcknowledged):
            raise self.push_failed(f"unexpected answer to a push: {event}")
        fields = self._resume_fields(headers)
        received = fields.received
        if isinstance(event, PushAcknowledged) and received is not None and received < end:
            # A 200 means the server has the push's bytes: nothing would ever
            # push them again, and drain() would wait for them for good.
            raise self._fail(
                f"resume failed: the server acknowledged a push ending at {end} "
                f"with PHT-Received: {received}"
            )
        try:
            resume.push_answered(ack, 200 if isinstance(event, PushAcknowledged) else 409, fields)
        except PHTError as exc:
            raise self._fail(f"resume failed: {exc}") from None
        if isinstance(event, Rejected):  # 409: pushed again from PHT-Received
            self._push_acks.clear()
            return True
        self._reconnect.succeeded()
        return False

    def push_abandoned(self) -> None:
        """A push write was interrupted (cancelled): its connection is dropped, and
        everything is pushed again from what the server has, without a back-off."""
        assert self.resume is not None
        self.resume.push_failed()
        self._push_acks.clear()

    def push_lost(self, reason: BaseException | str, now: float) -> float:
        """The pushes in flight of a resume session were lost at ``now`` (their
        connection is dropped): push again from what the server has, after the
        returned delay. Raises once the grace period has passed."""
        assert self.resume is not None
        assert self._reconnect is not None
        self.resume.push_failed()
        self._push_acks.clear()
        delay = self._reconnect.failed(now)
        if delay is None:
            raise self._fail_with(self._gave_up(reason))
        return delay

    def retry_delay(self, reason: BaseException | str, now: float) -> float:
        """A request of a resume session other than a pull or a data push (an
        ack-only push) failed at ``now``: the delay before sending it again."""
        assert self._reconnect is not None
        delay = self._reconnect.failed(now)
        if delay is None:
            raise self._fail_with(self._gave_up(reason))
        return delay

    def close_headers(self) -> list[tuple[bytes, bytes]]:
        """The resume headers of the close notification (none without resume)."""
        return [] if self.resume is None else self.resume.close_headers()

    # -- the push side ------------------------------------------------------------

    def push_window_for(self, size: int) -> int:
        """How many pushes may be unanswered while sending ``size`` bytes.

        Within one write larger than ``max_push_size`` two pushes may be in
        flight even with a window of 1: the write returns only once all are
        acknowledged anyway.
        """
        window = self.options.push_window
        return window if size <= self.options.max_push_size else max(2, window)

    def pushed(self, size: int) -> None:
        """A push of ``size`` bytes was written; its answer is due."""
        self._push_sizes.append(size)

    def should_settle(self, in_flight: int, unused_for: float) -> bool:
        """Whether to collect a push connection's answers before the next push.

        With ``push_window > 1`` a write may return with pushes in flight;
        their answers have long arrived once the connection has been unused
        for :data:`SETTLE_ACKS`, and only a connection with nothing in
        flight can be checked for a close. A resume session pipelines on
        (as it always has): what a dead connection loses is pushed again.
        """
        return self.resume is None and in_flight > 0 and unused_for >= SETTLE_ACKS

    def watch_answers(self, in_flight: int) -> bool:
        """Whether a receive must also read the answers of the ``in_flight`` pushes.

        A write that returns with pushes unanswered (``push_window > 1``) may
        be the application's last for a while: nothing else would read a
        refusal of them (a wrong ``push_path``, a ``410``), and a receive
        waiting for the server's reply would wait for nothing. So while such
        pushes are in flight, a waiting receive reads their answers too.
        """
        if not self.keep_after_write:
            return False
        if self.resume is not None:  # lost answers are pushed again, by the receive if need be
            return in_flight > 0 or self.resume.unpushed > 0
        return in_flight > 0

    def write_returned(self, in_flight: int) -> None:
        """A write returns with ``in_flight`` pushes unanswered (``push_window > 1``).

        Their answers come during a later write, which then reports a
        refusal as one of an earlier write's pushes.
        """
        self._earlier_pushes = in_flight

    def push_answer(self, event: ClientEvent, *, closed: bool, still_in_flight: int) -> bool:
        """Judge the answer to the oldest push; ``True``: the connection is done (closed).

        ``closed``: the server closed the connection after this answer, with
        ``still_in_flight`` pushes left unanswered. Raises on a refusal.
        """
        earlier = self._earlier_pushes > 0
        if earlier:
            self._earlier_pushes -= 1
        if isinstance(event, Rejected):
            config = self.options.config
            message = explain_rejection(
                event,
                config.paths,
                authorize=config.authorize,
                session_ended=self._how_session_ended(),
            )
            if not earlier:
                raise self.push_failed(message, status=event.status_code)
            error = self.push_failed(
                f"an earlier push was refused: {message}", status=event.status_code
            )
            if self.refused is None:
                self.refused = error
            raise error
        if not isinstance(event, PushAcknowledged):
            raise self.push_failed(f"unexpected answer to a push: {event}")
        if self._push_sizes:
            self._acknowledged += self._push_sizes.popleft()
        if closed and still_in_flight:
            raise self.push_failed("the server closed the push connection with pushes unanswered")
        return closed

    def push_failed(self, message: str, *, status: int | None = None) -> TunnelError:
        """A push may have lost data: sending is broken, and the end will be an error.

        The pull side goes on: data already on its way is still delivered.
        """
        self._push_loss = message
        self._earlier_pushes = 0  # the push connection is dropped with them
        self._push_sizes.clear()
        return self.break_sending(message, status=status)

    def break_sending(self, message: str, *, status: int | None = None) -> TunnelError:
        """Sending is impossible from now on (a cancelled write, unsettled pushes)."""
        if self.send_error is None:
            self.send_error = TunnelError(message, status=status)
        return TunnelError(message, status=status)

    def acks_timed_out(self) -> TunnelError:
        """The acknowledgements due at close did not come in time."""
        return self.break_sending("timed out waiting for the acknowledgement of earlier pushes")

    # -- the push side, one API for both kinds of session ------------------------
    #
    # An adapter drives a write with these alone, whether the server granted
    # resume or not: write_step says what to do next, answer_push and
    # push_broke what an answer or a failure means for the connection.

    def write_step(self, *, queued: int, in_flight: int, window: int, keep: int) -> PushStep:
        """What a write does next, with ``queued`` of its bytes not handed on yet.

        ``queued`` counts the bytes not pushed (a plain session), or not taken
        by the replay buffer yet (a resume session, after :meth:`resume_write`;
        see :meth:`resume_step`). Push while fewer than ``window`` pushes are
        unanswered (:meth:`push_window_for`), else collect the oldest answer;
        once all is pushed, collect answers until at most ``keep`` are
        unanswered (:attr:`keep_after_write` for a write that returns, ``0``
        to settle them all, as before a close), then the write is done. A
        :class:`PushChunk` means: push the next ``size`` queued bytes, or, in
        a resume session, :meth:`resume_push`'s.
        """
        if self.resume is not None:
            return self.resume_step(
                writing=queued > 0, in_flight=in_flight, window=window, keep=keep
            )
        if queued > 0:
            if in_flight < window:
                return PushChunk(min(queued, self.options.max_push_size))
            return _COLLECT_ACK
        return _COLLECT_ACK if in_flight > keep else _WRITE_DONE

    def settle_due(self, in_flight: int) -> bool:
        """Whether pushes remain to push, or answers to collect, before a close
        (or for a receive that watches the pushes, :meth:`watch_answers`).

        A resume session whose sending broke has nothing left to settle: its
        unacknowledged bytes cannot reach the server any more.
        """
        resume = self.resume
        if resume is None:
            return in_flight > 0
        return self.send_error is None and (in_flight > 0 or resume.unpushed > 0)

    def answer_push(
        self,
        event: ClientEvent,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        closed: bool,
        still_in_flight: int,
        now: float,
    ) -> PushVerdict:
        """Judge the answer to the oldest push (:meth:`push_answer` or
        :meth:`resume_push_answer`): what becomes of its connection.

        ``closed``: the server closed the connection after this answer, with
        ``still_in_flight`` pushes unanswered; ``headers`` are the answer's
        ``PHT-*`` headers. A resume session pushes again, after a back-off,
        what a ``409``, a hop's ``502``/``503``/``504``/``429`` or such a close
        lost. Raises :class:`~pht.TunnelError` when sending cannot go on (drop
        the connection then).
        """
        if self.resume is None:
            done = self.push_answer(event, closed=closed, still_in_flight=still_in_flight)
            return _DROP if done else _KEEP
        if self.resume_push_answer(event, headers):
            return self._push_again(f"the server answered {event}", now)
        if closed and still_in_flight:
            return self._push_again("the server closed the push connection", now)
        return _DROP if closed else _KEEP

    def push_broke(self, exc: BaseException, *, idle_for: float, now: float) -> PushVerdict:
        """Writing a push, or reading an answer, failed with ``exc`` at ``now``
        (the connection had been idle ``idle_for`` seconds before the push).

        A resume session pushes again after a back-off; otherwise data may be
        lost and this raises (:meth:`push_failed`).
        """
        if self.resume is not None:
            return self._push_again(exc, now)
        reason = describe_failure(exc, idle_for)
        raise self.push_failed(f"push to the PHT server failed: {reason}")

    def push_connect_failed(self, exc: TunnelError, now: float) -> PushVerdict:
        """No connection for the next push could be made (``exc``) at ``now``.

        Nothing was written: a resume session tries again after a back-off;
        otherwise sending is broken and this raises.
        """
        if self.resume is not None:
            return self._push_again(exc, now)
        raise self.break_sending(str(exc))

    def _push_again(self, reason: BaseException | str, now: float) -> PushVerdict:
        return PushVerdict(drop=True, retry_after=self.push_lost(reason, now))

    def push_interrupted(self) -> None:
        """A push write was interrupted (cancelled); drop its connection.

        A resume session pushes it again, without a back-off
        (:meth:`push_abandoned`); otherwise the cancelled write breaks
        sending (:meth:`break_sending`, which the write's caller reports).
        """
        if self.resume is not None:
            self.push_abandoned()

    # -- the pull side, failures -------------------------------------------------

    def pull_broken(self, exc: BaseException, *, quiet_for: float) -> Reattach:
        """The pull connection broke with ``exc``, ``quiet_for`` seconds after
        it last delivered: re-attach it (a resume session), else raise.

        A refusal of an earlier write's push is raised first: it explains the
        cut (a server ends the pull of a session that refused pushed bytes).
        """
        if self.refused is not None:
            raise self.refused
        if self.resuming:
            return Reattach(str(exc))
        raise self.pull_failed(exc, quiet_for=quiet_for)

    def repoll_broken(self, exc: BaseException) -> Reattach:
        """The next pull (:class:`PollAgain`) could not be written: re-attach
        it (a resume session), else raise (:meth:`repoll_failed`)."""
        if self.resuming:
            return Reattach(str(exc))
        raise self.repoll_failed(exc)

    # -- the end ------------------------------------------------------------------

    def close(self, *, pushes_settled: bool) -> bool:
        """The application closes: ``True`` means send the close notification.

        Modern GOST clients announce the close with an empty push; it is
        pointless once the server ended the session, and unsafe while a
        push's fate is unknown (``pushes_settled`` is ``False``).
        """
        notify = pushes_settled and self._state not in (
            ClientSessionState.ENDED,
            ClientSessionState.CLOSED,
        )
        self._state = ClientSessionState.CLOSED
        return notify
