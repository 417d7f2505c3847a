"""The sans-IO client: one :class:`ClientChannel` per HTTP connection.

A PHT client keeps two keep-alive HTTP/1.1 connections to the server: one
carries the authorize request and then the long-lived pull, the other the
pushes. Each is a :class:`ClientChannel`: call a request method (it returns
the bytes to write), feed what the socket reads to :meth:`receive_data`
(``b""`` at EOF) and take events from :meth:`next_event` until it returns
:data:`NEED_DATA`. No sockets, clock or randomness are touched here.

Keep-alive connections end while idle: the server's keep-alive timeout, a
proxy's (nginx: 75 s) or a NAT's. Before sending a request on a connection
that is not busy, ask :meth:`ClientChannel.reusable`; when it says no, send
the request on a new connection. That is the only retry, and why it is safe:

- A request is sent again on a new connection only if **not one byte of it
  was written** to the old one (the old one was seen ended, or too old to
  trust, before the write). The server cannot have seen it.
- Once any byte of a push may have left, the push is **never replayed**: the
  server may have taken its data before the connection broke, and PHT has no
  sequence numbers, so a replay could deliver it twice. The same holds for a
  pull (the server may have written data into the lost response) and for the
  close notification. Such a failure is an error for the application.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import h11

from ._codec import BASE64_BACKEND, LineBuffer, decode_line, encode_line
from ._common import DEFAULT_PATHS, Paths
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Authorized,
    ChannelState,
    ClientEvent,
    DataReceived,
    Heartbeat,
    NeedData,
    PullEnded,
    PullStarted,
    PushAcknowledged,
    Rejected,
    RequestKind,
)

__all__ = ["ClientChannel", "ClientConfig"]

#: Longest pull line a client accepts (base64 text). GOST's lines hold at
#: most 32 KiB of data; ``pht``'s server never sends more than 64 KiB.
DEFAULT_MAX_PULL_LINE = 4 * 1024 * 1024
_MAX_SMALL_BODY = 64 * 1024
#: Seconds after which an idle connection is not reused: below nginx's default
#: ``keepalive_timeout`` (75 s) and ``pht``'s (120 s), so such a close cannot
#: race a request, and short enough for most NATs to still know the connection.
DEFAULT_KEEPALIVE_EXPIRY = 50.0
_USER_AGENT = "pht"

if BASE64_BACKEND == "pybase64":  # pragma: no branch - depends on the installation
    from pybase64 import b64encode as _b64encode
else:  # pragma: no cover
    _b64encode = None  # type: ignore[assignment]
#: From this size on a push body is sent as ``[base64, b"\n"]``: appending the
#: newline would copy a large line (a fresh allocation: ~1.7 ms per MiB, 30x the
#: encoding itself).
_SEPARATE_NEWLINE_FROM = 64 * 1024

#: Whether new channels take the push fast path (below) unless told otherwise.
#: Tests turn it off to get the pure-h11 reference behaviour.
_FAST_PATH = True
#: A push acknowledgement head longer than this goes to h11 instead.
_MAX_ACK_HEAD = 4096
_ACK_PREFIX = b"HTTP/1.1 200 "
# Stricter than HTTP (and than h11): anything these refuse goes to h11, which
# then decides. Printable ASCII only, no bare CR or LF, no obs-fold.
_ACK_STATUS_LINE = re.compile(rb"HTTP/1\.1 200 [ -~]*")
_ACK_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([!-~]+(?: +[!-~]+)*)?[ \t]*")
_CONTENT_LENGTH_ZERO = b"Content-Length: 0\r\n"
_BLANK_LINE = re.compile(rb"\n\r?\n")
#: A pull response head not complete within this many bytes goes to h11 whole
#: (h11's own default bound on an incomplete head).
_MAX_PULL_HEAD = 16 * 1024
_AFTER_EOF = "the connection delivered data after its end; this is a bug in the caller"
#: A chunk-size line longer than this (extensions included) goes to h11.
_MAX_CHUNK_SIZE_LINE = 256
# As h11's chunk header rule (the line without its CRLF); size 0 is left to h11.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*")


_HEADER_VALUE = re.compile(rb"[!-~]+(?: [!-~]+)*")


def _check_value(value: bytes) -> bytes:
    """A resume header value as the fast push head writes it: printable, no CR or LF."""
    if _HEADER_VALUE.fullmatch(value) is None:
        raise LocalProtocolError(f"invalid header value {value!r}")
    return value


class _Fallback:
    """Marks a response the fast path leaves to h11."""


_FALLBACK = _Fallback()


def _parse_ack(
    buffer: bytearray,
) -> tuple[int, bool, list[tuple[bytes, bytes]]] | _Fallback | None:
    """Recognise a plain push acknowledgement at the start of ``buffer``.

    Returns ``(head length, connection closes, resume headers)`` for
    ``HTTP/1.1 200`` with ``Content-Length: 0`` and no ``Transfer-Encoding``;
    ``None`` while the head is incomplete (and still short); :data:`_FALLBACK`
    for anything else. The resume headers are the ``PHT-*`` ones, with
    lowercase names as h11 gives them.
    """
    size = len(buffer)
    if buffer[:13] != _ACK_PREFIX[: min(size, 13)]:
        return _FALLBACK
    # The head ends where h11 sees it end: at the first blank line, CRLF or not.
    blank = _BLANK_LINE.search(buffer)
    if blank is None:
        return _FALLBACK if size > _MAX_ACK_HEAD else None
    end = blank.start() - 1
    if end > _MAX_ACK_HEAD or blank.end() - end != 4 or buffer[end] != 13:
        return _FALLBACK
    lines = bytes(buffer[:end]).split(b"\r\n")
    if _ACK_STATUS_LINE.fullmatch(lines[0]) is None:
        return _FALLBACK
    length_seen = close = False
    resume: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        match = _ACK_HEADER_LINE.fullmatch(line)
        if match is None:
            return _FALLBACK
        name = match[1].lower()
        if name == b"content-length":
            if length_seen or match[2] != b"0":
                return _FALLBACK
            length_seen = True
        elif name == b"transfer-encoding":
            return _FALLBACK
        elif name.startswith(b"pht-"):
            resume.append((name, match[2] or b""))
        elif name == b"connection":
            value = (match[2] or b"").lower()
            if value == b"close":
                close = True
            elif value != b"keep-alive":
                return _FALLBACK
    if not length_seen:
        return _FALLBACK
    return end + 4, close, resume


HeaderInput = Mapping[str, str] | Sequence[tuple[str, str]] | None


def _normalise_headers(headers: HeaderInput) -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    items: Iterable[tuple[str, str]] = headers.items() if isinstance(headers, Mapping) else headers
    result = []
    for name, value in items:
        if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n"):
            raise LocalProtocolError(f"invalid header {name!r}: {value!r}")
        if name.lower() in {"host", "content-length", "transfer-encoding", "connection"}:
            raise LocalProtocolError(
                f"header {name!r} is managed by pht; use host_header= for Host"
            )
        result.append((name, value))
    return tuple(result)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientConfig:
    """What a client needs to know to form its requests.

    ``host`` is the value of the ``Host`` header (``host_header`` overrides
    it, as GOST's ``host`` option). ``authorize`` selects the generation:
    ``True`` asks the server for a token first (legacy GOST), ``False``
    uses a self-made token (modern GOST). ``proxy_authority`` makes requests
    absolute-form (``POST http://host/push?...``), for a forward HTTP proxy;
    ``proxy_authorization`` is then sent as ``Proxy-Authorization``. A
    connection idle for ``keepalive_expiry`` seconds is not reused (see
    :meth:`ClientChannel.reusable`).
    """

    host: str
    authorize: bool = True
    paths: Paths = DEFAULT_PATHS
    headers: tuple[tuple[str, str], ...] = ()
    host_header: str | None = None
    proxy_authority: str | None = None
    proxy_authorization: str | None = field(default=None, repr=False)
    scheme: str = "http"
    max_pull_line: int = DEFAULT_MAX_PULL_LINE
    keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY

    @classmethod
    def build(
        cls,
        host: str,
        *,
        headers: HeaderInput = None,
        proxy_credentials: tuple[str, str] | None = None,
        **kwargs: object,
    ) -> ClientConfig:
        """Build a config, validating headers and encoding proxy credentials."""
        authorization = None
        if proxy_credentials is not None:
            user, password = proxy_credentials
            raw = f"{user}:{password}".encode()
            authorization = "Basic " + base64.b64encode(raw).decode("ascii")
        return cls(
            host=host,
            headers=_normalise_headers(headers),
            proxy_authorization=authorization,
            **kwargs,  # type: ignore[arg-type]
        )


class ClientChannel:
    """One client HTTP connection: requests out, events in.

    Use it for one request at a time: a request method is only allowed in
    the ``IDLE`` state, and the channel returns to ``IDLE`` when the answer
    is complete (``CLOSED`` if the server closes the connection then).

    Pushes may be pipelined: with ``push_window=N`` up to ``N`` pushes (or
    close notifications) may be sent before their acknowledgements arrive.
    The channel is ``PUSHING`` while at least one is unacknowledged
    (:attr:`pushes_in_flight`); ``push`` is allowed in ``IDLE`` and, below
    the window, in ``PUSHING``. Acknowledgements come in request order, one
    :class:`PushAcknowledged` each; a :class:`Rejected` closes the channel
    and the pushes behind it are never answered. Other requests still need
    ``IDLE``.
    """

    def __init__(self, config: ClientConfig, *, push_window: int = 1) -> None:
        if push_window < 1:
            raise ValueError("push_window must be at least 1")
        self.config = config
        self._push_window = push_window
        self._conn = h11.Connection(h11.CLIENT)
        self._state = ChannelState.IDLE
        self._events: deque[ClientEvent] = deque()
        self._lines = LineBuffer(config.max_pull_line)
        self._body = bytearray()
        self._status = 0
        self._lines_in_response = 0
        #: The ``PHT-*`` headers (lowercase names) of the response that the
        #: event :meth:`next_event` returned last belongs to (resume extension).
        self.resume_headers: list[tuple[bytes, bytes]] = []
        self._host = config.host_header or config.host
        self._base_headers: list[tuple[str, str]] = [
            ("Host", self._host),
            ("User-Agent", _USER_AGENT),
        ]
        if config.proxy_authorization is not None:
            self._base_headers.append(("Proxy-Authorization", config.proxy_authorization))
        self._extra_headers = list(config.headers)
        # The push fast path: push heads are written from a per-target template
        # and plain acknowledgements parsed by hand, without h11. While
        # ``_fast_in`` is not None the channel is in fast mode: h11 sits idle
        # with an empty buffer and received bytes collect in ``_fast_in``.
        # ``_deferred`` holds the targets of pushes sent but not yet told to
        # h11, oldest first. Anything unusual (see :func:`_parse_ack`) leaves
        # fast mode: h11 is told about the oldest deferred push (its bytes
        # are discarded) and fed the buffered bytes, so it answers exactly as
        # if it had handled everything.
        self._fast_enabled = _FAST_PATH
        self._fast_in: bytearray | None = bytearray() if _FAST_PATH else None
        self._fast_eof = False
        self._deferred: deque[str] = deque()
        self._push_template: tuple[str, bytes, bytes] | None = None
        # The pull fast path: the pull response's head is found here and only
        # the head is given to h11 (``_head_in`` collects it; ``_after_head``
        # keeps what came after it). Once h11 has parsed a chunked pull
        # response's head, the chunk framing is parsed here (``_chunk_next``). While
        # ``_chunk_in`` is not None received bytes collect there; h11's
        # chunked reader stays at the start of a chunk header, and is fed the
        # rest from the last chunk's ``0`` line on (or from any size line
        # this parser does not take), so it ends the response as before.
        self._pull_fast_enabled = _FAST_PATH
        self._head_in: bytearray | None = None
        self._head_eof = False
        self._after_head: bytes | None = None
        self._chunk_in: list[bytes] | None = None
        self._chunk_eof = False
        self._chunk_left = 0  # data bytes still to come in the current chunk
        self._chunk_footer = b""  # what is left of the CRLF after a chunk's data

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def pushes_in_flight(self) -> int:
        """Pushes sent whose acknowledgement has not been returned yet."""
        if self._state is not ChannelState.PUSHING:
            return 0
        # In fast mode every unanswered push is deferred; otherwise h11 has one more.
        return len(self._deferred) + (self._fast_in is None)

    # -- requests ---------------------------------------------------------------

    def authorize(self) -> bytes:
        """Ask for a session token; expect :class:`Authorized` or :class:`Rejected`."""
        return self._request(
            ChannelState.AUTHORIZING, "GET", self._target(self.config.paths.authorize)
        )

    def pull(self, token: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """Start the long poll for ``token``'s data; ``headers`` are extra (resume) ones."""
        request = self._request(
            ChannelState.PULLING, "GET", self._target(self.config.paths.pull, token), extra=headers
        )
        self._lines_in_response = 0
        if self._pull_fast_enabled:
            self._head_in = bytearray()
            self._head_eof = False
        return request

    def push(
        self,
        token: str,
        data: bytes | bytearray | memoryview,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> list[bytes]:
        """Return the pieces of one POST carrying ``data``; expect :class:`PushAcknowledged`.

        Write the pieces in order: the head, then the body, which is the line
        itself or (for large data) its text and its newline. The body is a
        single base64 line, sent with ``Content-Length`` and no
        ``Content-Type`` (GOST's server would swallow a form body). ``data``
        must not be empty: an empty push is the close notification.
        ``headers`` are extra ones (the resume extension's).
        """
        if not len(data):
            raise LocalProtocolError("push() needs data; use close_session() to close")
        return self._push_line(token, data, headers)

    def ack_only(self, token: str, headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """An ack-only push (resume extension): a body of one empty line, with ``headers``."""
        return self._push_line(token, b"", headers)

    def _push_line(
        self,
        token: str,
        data: bytes | bytearray | memoryview,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> list[bytes]:
        target = self._target(self.config.paths.push, token)
        large = len(data) >= _SEPARATE_NEWLINE_FROM and _b64encode is not None
        if large and self._fast_push_allowed():
            assert _b64encode is not None
            text: bytes = _b64encode(data)
            return [self._fast_push_head(target, len(text) + 1, headers), text, b"\n"]
        line = encode_line(data) if len(data) else b"\n"
        if self._fast_push_allowed():
            return [self._fast_push_head(target, len(line), headers), line]
        head = self._request(ChannelState.PUSHING, "POST", target, len(line), extra=headers)
        self._send(h11.Data(data=line))
        self._send(h11.EndOfMessage())
        return [head, line]

    def close_session(self, token: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        """The close notification: a push with an empty body (``headers``: extra ones)."""
        target = self._target(self.config.paths.push, token)
        if self._fast_push_allowed():
            return self._fast_push_head(target, 0, headers)
        head = self._request(ChannelState.PUSHING, "POST", target, 0, extra=headers)
        return head + self._send(h11.EndOfMessage())

    def _fast_push_allowed(self) -> bool:
        if not self._fast_enabled:
            return False
        if self._state is ChannelState.PUSHING:  # pipelining, within the window
            return self.pushes_in_flight < self._push_window
        if self._state is not ChannelState.IDLE:
            return False
        if self._fast_in is None:
            # Back to fast mode only from a clean h11: idle, nothing buffered.
            conn = self._conn
            if conn.our_state is not h11.IDLE or conn.their_state is not h11.IDLE:
                return False
            if conn.trailing_data != (b"", False):
                return False
            self._fast_in = bytearray()
        return True

    def _fast_push_head(
        self, target: str, content_length: int, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> bytes:
        template = self._push_template
        if template is None or template[0] != target:
            template = self._push_template = self._make_push_template(target)
        self._deferred.append(target)
        self._state = ChannelState.PUSHING
        if headers:  # after Content-Length: the template's rest starts with its CRLF
            extra = b"".join(
                b"%s: %s\r\n" % (name, _check_value(value)) for name, value in headers
            )
            return b"%s%d\r\n%s%s" % (template[1], content_length, extra, template[2][2:])
        return b"%s%d%s" % (template[1], content_length, template[2])

    def _make_push_template(self, target: str) -> tuple[str, bytes, bytes]:
        # h11 writes the head once (same headers, same order, same checks as a
        # push through h11); only the Content-Length value changes per push.
        headers = list(self._base_headers)
        headers.append(("Content-Length", "0"))
        headers.extend(self._extra_headers)
        request = h11.Request(method="POST", target=target, headers=headers)
        head = h11.Connection(h11.CLIENT).send(request) or b""
        # The target and header values hold no CR or LF: the first match is the header.
        start = head.index(b"\r\n" + _CONTENT_LENGTH_ZERO) + 2
        return target, head[: start + 16], head[start + 17 :]

    def _leave_fast_mode(self) -> None:
        """Hand everything to h11 (see ``__init__``)."""
        buffered, self._fast_in = self._fast_in, None
        if self._deferred:
            self._tell_h11_next_push()
        if buffered:
            self._conn.receive_data(bytes(buffered))
        if self._fast_eof:
            self._conn.receive_data(b"")

    def _tell_h11_next_push(self) -> None:
        target = self._deferred.popleft()
        # Only the method matters to h11 for reading the answer.
        request = h11.Request(
            method="POST", target=target, headers=[("Host", self._host), ("Content-Length", "0")]
        )
        self._conn.send(request)
        self._conn.send(h11.EndOfMessage())
        self._status = 0
        self._body.clear()

    def _target(self, path: str, token: str | None = None) -> str:
        target = path if token is None else f"{path}?token={quote(token, safe='')}"
        if self.config.proxy_authority is not None:
            authority = self.config.host_header or self.config.proxy_authority
            return f"{self.config.scheme}://{authority}{target}"
        return target

    def _request(
        self,
        state: ChannelState,
        method: str,
        target: str,
        content_length: int | None = None,
        *,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> bytes:
        if self._state is not ChannelState.IDLE:
            raise LocalProtocolError(f"cannot send a request in state {self._state.name}")
        if self._fast_in is not None:
            self._leave_fast_mode()
        headers = list(self._base_headers)
        if content_length is not None:
            headers.append(("Content-Length", str(content_length)))
        headers.extend(self._extra_headers)
        headers.extend((name.decode("ascii"), value.decode("ascii")) for name, value in extra)
        data = self._send(h11.Request(method=method, target=target, headers=headers))
        if method == "GET":
            data += self._send(h11.EndOfMessage())
        self._state = state
        self._status = 0
        self._body.clear()
        return data

    def _send(self, event: h11.Event) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            self._state = ChannelState.ERROR
            raise LocalProtocolError(str(exc)) from None

    def reusable(self, idle_for: float) -> bool:
        """Whether the next request may be written on this connection.

        Ask before a request on a connection with nothing in flight, after
        feeding :meth:`receive_data` whatever the connection delivered while
        idle (``b""`` for an EOF or a reset). A server sends nothing between
        answers, so anything received means that the server, or a proxy on
        the way, ended the connection; one idle for ``idle_for`` seconds, at
        least ``config.keepalive_expiry``, may have ended unseen (a NAT forgot
        it, or a close is on its way and would race the request). ``False``
        closes the channel: write the request on a new connection instead, as
        nothing of it was written here (see the module docstring).
        """
        if self._state is not ChannelState.IDLE:
            return False
        fast_in = self._fast_in
        if fast_in is not None:
            quiet = not fast_in and not self._fast_eof
        else:
            quiet = self._conn.trailing_data == (b"", False)
        if quiet and idle_for < self.config.keepalive_expiry:
            return True
        self._state = ChannelState.CLOSED
        return False

    def send_failed(self) -> None:
        """Tell the channel that writing its request failed: it is unusable now.

        Some of the request may have reached the server: do not send it again
        (see the module docstring).
        """
        self._conn.send_failed()
        self._deferred.clear()
        self._state = ChannelState.ERROR

    # -- responses --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection; ``b""`` means the server closed it."""
        head_in = self._head_in
        if head_in is not None:
            if not data:
                self._head_eof = True
            elif self._head_eof:
                self._state = ChannelState.ERROR
                raise LocalProtocolError(_AFTER_EOF)
            else:
                head_in += data
            return
        chunk_in = self._chunk_in
        if chunk_in is not None:
            if not data:
                self._chunk_eof = True
            elif self._chunk_eof:
                self._state = ChannelState.ERROR
                raise LocalProtocolError(_AFTER_EOF)
            else:
                chunk_in.append(bytes(data))
            return
        fast_in = self._fast_in
        if fast_in is not None:
            if not data:
                self._fast_eof = True
            elif self._fast_eof:
                self._state = ChannelState.ERROR
                raise LocalProtocolError(_AFTER_EOF)
            else:
                fast_in += data
            return
        try:
            self._conn.receive_data(bytes(data) if data else b"")
        except RuntimeError:  # h11 refuses data after EOF
            self._state = ChannelState.ERROR
            raise LocalProtocolError(_AFTER_EOF) from None

    def next_event(self) -> ClientEvent | NeedData:
        """Return the next event, or :data:`NEED_DATA`."""
        while not self._events:
            if self._state in (ChannelState.CLOSED, ChannelState.ERROR):
                return NEED_DATA
            if self._head_in is not None:
                if not self._head_next():
                    return NEED_DATA
                continue
            if self._chunk_in is not None:
                try:
                    progressed = self._chunk_next()
                except RemoteProtocolError:
                    self._state = ChannelState.ERROR
                    raise
                if not progressed:
                    return NEED_DATA
                continue
            if self._fast_in is not None:
                if not self._fast_next():
                    return NEED_DATA
                continue
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                message = self._explain_h11_error(exc)
                self._state = ChannelState.ERROR
                raise RemoteProtocolError(message) from None
            if not isinstance(event, h11.Event):  # NEED_DATA (or PAUSED, never reached)
                return NEED_DATA
            try:
                self._handle(event)
            except RemoteProtocolError:
                self._state = ChannelState.ERROR
                raise
            if self._after_head is not None:  # the chunk fast path did not take it
                self._body_to_h11()
        return self._events.popleft()

    def _head_next(self) -> bool:
        """Give h11 the pull response's head, and only it; ``False``: more data needed."""
        buffer = self._head_in
        assert buffer is not None
        blank = _BLANK_LINE.search(buffer)
        if blank is None:
            if len(buffer) <= _MAX_PULL_HEAD and not self._head_eof:
                return False
            # Too long, or cut short: h11 has it all and decides.
            self._head_in = None
            self._conn.receive_data(bytes(buffer))
            if self._head_eof:
                self._conn.receive_data(b"")
            return True
        self._head_in = None
        self._after_head = bytes(buffer[blank.end() :])
        self._conn.receive_data(bytes(buffer[: blank.end()]))
        return True

    def _body_to_h11(self) -> None:
        """What followed the head goes to h11, with the EOF if one came."""
        rest, self._after_head = self._after_head, None
        if rest:
            self._conn.receive_data(rest)
        if self._head_eof:
            self._conn.receive_data(b"")

    def _explain_h11_error(self, exc: h11.RemoteProtocolError) -> str:
        """Say "closed by the server" for an early EOF, not "malformed HTTP"."""
        buffered, closed = self._conn.trailing_data
        if closed:
            what = {
                ChannelState.AUTHORIZING: "authorize request",
                ChannelState.PUSHING: "push",
                ChannelState.PULLING: "pull",
            }.get(self._state, "request")
            if not self._status and not buffered:  # not a byte of the answer came
                return f"the server closed the connection without answering the {what}"
            return f"the server closed the connection in the middle of its answer to the {what}"
        return f"malformed HTTP from server: {exc}"

    def _fast_next(self) -> bool:
        """One step in fast mode; ``False`` means more data is needed."""
        fast_in = self._fast_in
        assert fast_in is not None
        if self._deferred:
            result = _parse_ack(fast_in)
            if isinstance(result, tuple):
                del fast_in[: result[0]]
                self.resume_headers = result[2]
                self._deferred.popleft()
                self._events.append(PushAcknowledged())
                if result[1]:
                    self._state = ChannelState.CLOSED
                elif not self._deferred:
                    self._state = ChannelState.IDLE
                return True
            if result is None and not self._fast_eof:
                return False
        elif not fast_in and not self._fast_eof:
            return False
        # Unusual bytes (or an EOF): h11 takes over and decides.
        self._leave_fast_mode()
        return True

    def _handle(self, event: h11.Event) -> None:
        state = self._state
        if isinstance(event, h11.Response):
            self._status = event.status_code
            self.resume_headers = [item for item in event.headers if item[0].startswith(b"pht-")]
            if event.status_code != 200:
                kind = {
                    ChannelState.AUTHORIZING: RequestKind.AUTHORIZE,
                    ChannelState.PUSHING: RequestKind.PUSH,
                }.get(state, RequestKind.PULL)
                reason = event.reason.decode("latin-1", "replace")
                self._state = ChannelState.CLOSED
                self._events.append(
                    Rejected(kind=kind, status_code=event.status_code, reason=reason)
                )
            elif state is ChannelState.PULLING:
                self._events.append(PullStarted())
                if self._pull_fast_enabled and any(
                    name == b"transfer-encoding" for name, _ in event.headers
                ):
                    self._start_chunk_fast_path()
        elif isinstance(event, h11.InformationalResponse):
            return
        elif isinstance(event, h11.Data):
            if state is ChannelState.PULLING:
                self._receive_pull_data(event.data)
            else:
                self._body += event.data
                if len(self._body) > _MAX_SMALL_BODY:
                    raise RemoteProtocolError("server sent an oversized response body")
        elif isinstance(event, h11.EndOfMessage):
            self._end_of_response(state)
        elif isinstance(event, h11.ConnectionClosed):
            if state is ChannelState.PULLING:
                raise RemoteProtocolError("server closed the connection in the middle of a pull")
            if state is not ChannelState.IDLE:
                raise RemoteProtocolError(
                    f"server closed the connection before answering ({state.name.lower()})"
                )
            self._state = ChannelState.CLOSED
        else:  # pragma: no cover - h11 produces no other events for a client
            raise RemoteProtocolError(f"unexpected {type(event).__name__} from server")

    def _start_chunk_fast_path(self) -> None:
        # h11 accepts no Transfer-Encoding but chunked, so the body is chunked.
        # h11 was given the head alone (``_head_next``): its chunked reader
        # waits at the first chunk header, and the body is in ``_after_head``.
        data = self._after_head
        if data is None or self._head_eof:  # an EOF already: h11 reports it as before
            return
        self._after_head = None
        self._chunk_in = [data] if data else []
        self._chunk_eof = False
        self._chunk_left = 0
        self._chunk_footer = b""

    def _chunk_to_h11(self, rest: bytes | memoryview) -> None:
        """Hand the pull response back to h11, from a chunk-size line on."""
        self._chunk_in = None
        if rest:
            self._conn.receive_data(bytes(rest))
        if self._chunk_eof:
            self._conn.receive_data(b"")

    def _chunk_next(self) -> bool:
        """Parse the buffered chunked pull body; ``False`` means more data is needed."""
        pending = self._chunk_in
        assert pending is not None
        if not pending:
            if not self._chunk_eof:
                return False
            data = b""
        else:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
        view = memoryview(data)
        size = len(data)
        position = 0
        lines_before = self._lines_in_response
        decoded: list[bytes] = []
        while position < size:
            left = self._chunk_left
            if left:
                end = min(size, position + left)
                self._take_pull_bytes(data, view, position, end, decoded)
                self._chunk_left = left - (end - position)
                position = end
                if not self._chunk_left:
                    self._chunk_footer = b"\r\n"
            elif self._chunk_footer:
                footer = self._chunk_footer
                got = data[position : position + len(footer)]
                if got != footer[: len(got)]:
                    raise RemoteProtocolError(
                        f"malformed HTTP from server: a chunk of the pull response ends "
                        f"in {got!r}, not in CRLF"
                    )
                position += len(got)
                self._chunk_footer = footer[len(got) :]
            else:
                line_end = data.find(b"\r\n", position, position + _MAX_CHUNK_SIZE_LINE + 2)
                if line_end < 0:
                    if size - position > _MAX_CHUNK_SIZE_LINE or self._chunk_eof:
                        self._chunk_to_h11(view[position:])
                    else:
                        pending.append(data[position:])
                    break
                match = _CHUNK_SIZE_LINE.fullmatch(data, position, line_end)
                chunk_size = int(match[1], 16) if match is not None else 0
                if not chunk_size:  # the last chunk, or a line for h11 to judge
                    self._chunk_to_h11(view[position:])
                    break
                self._chunk_left = chunk_size
                position = line_end + 2
        else:
            if self._chunk_eof:
                if self._chunk_left or self._chunk_footer:
                    raise RemoteProtocolError(
                        "the server closed the connection in the middle of its answer "
                        "to the pull (within a chunk)"
                    )
                self._chunk_to_h11(b"")
        count = self._lines_in_response - lines_before
        self._emit_pull_lines(decoded, count)
        return self._chunk_in is None or bool(decoded) or bool(count)

    def _take_pull_bytes(
        self, data: bytes, view: memoryview, start: int, end: int, decoded: list[bytes]
    ) -> None:
        """Split ``data[start:end]`` (chunk data) into lines; decode the complete ones."""
        lines = self._lines
        if lines.pending:
            newline = data.find(b"\n", start, end)
            if newline < 0:
                lines.feed(view[start:end])
                for _ in lines.lines():  # only checks the bound
                    pass
                return
            lines.feed(view[start : newline + 1])
            self._count_lines(lines.lines(), decoded)
            start = newline + 1
        last = data.rfind(b"\n", start, end)
        if last >= 0:
            limit = self.config.max_pull_line
            while start <= last:
                newline = data.find(b"\n", start, last + 1)
                if newline - start > limit:
                    raise RemoteProtocolError(f"line longer than {limit} bytes", status_hint=413)
                self._count_lines((view[start:newline],), decoded)
                start = newline + 1
        if start < end:
            lines.feed(view[start:end])
            for _ in lines.lines():  # only checks the bound
                pass

    def _count_lines(self, lines: Iterable[bytes | memoryview], decoded: list[bytes]) -> None:
        for line in lines:
            self._lines_in_response += 1
            if line:
                decoded.append(decode_line(line))

    def _emit_pull_lines(self, decoded: list[bytes], count: int) -> None:
        if decoded:
            self._events.append(
                DataReceived(data=decoded[0] if len(decoded) == 1 else b"".join(decoded))
            )
        elif count:
            self._events.append(Heartbeat())

    def _receive_pull_data(self, data: bytes | bytearray | memoryview) -> None:
        self._lines.feed(data)
        decoded = []
        heartbeats = 0
        for line in self._lines.lines():
            if line:
                decoded.append(decode_line(line))
            else:
                heartbeats += 1
        self._lines_in_response += heartbeats + len(decoded)
        if decoded:
            self._events.append(
                DataReceived(data=decoded[0] if len(decoded) == 1 else b"".join(decoded))
            )
        elif heartbeats:
            self._events.append(Heartbeat())

    def _end_of_response(self, state: ChannelState) -> None:
        if state is ChannelState.PULLING:
            if self._lines.pending:
                raise RemoteProtocolError("pull response ended in the middle of a line")
            # A legacy server ends each long poll after a heartbeat and expects a
            # new GET; a response with no line at all means the session is over.
            # A modern server only ends the response when the session closes.
            over = not self.config.authorize or self._lines_in_response == 0
            self._events.append(PullEnded(session_over=over))
        elif state is ChannelState.AUTHORIZING:
            text = bytes(self._body).decode("utf-8", "replace").strip()
            name, sep, token = text.partition("=")
            if name != "token" or not sep or not token:
                raise RemoteProtocolError(f"authorize answer has no token: {text[:80]!r}")
            self._events.append(Authorized(token=token))
        elif state is ChannelState.PUSHING:
            self._events.append(PushAcknowledged())
        self._next_cycle()

    def _next_cycle(self) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._state = ChannelState.IDLE
            if self._deferred:  # pipelined pushes wait for their answers
                self._state = ChannelState.PUSHING
                if conn.trailing_data == (b"", False):
                    self._fast_in = bytearray()  # h11 is clean: fast mode again
                else:
                    self._tell_h11_next_push()
        else:
            self._state = ChannelState.CLOSED
