"""The sans-IO server: :class:`ServerConnection` per HTTP connection, and
:class:`SessionRegistry` for the table of sessions.

A :class:`ServerConnection` turns bytes from one accepted connection into
request events (:class:`AuthorizeRequest`, :class:`PushRequest`,
:class:`CloseRequest`, :class:`PullRequest`, :class:`BadRequest`) and
answers into bytes. The :class:`SessionRegistry` decides what a token means:
issued, lazily created for a modern GOST client, unknown, or closed. Neither
reads a clock (``now`` is passed in) nor draws randomness (a token source is
passed in).
"""

from __future__ import annotations

import enum
import functools
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import parse_qs

import h11

from ._codec import LineDecoder, encode_chunk, encode_lines
from ._common import DEFAULT_PATHS, Paths
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    AuthorizeRequest,
    BadRequest,
    CloseRequest,
    NeedData,
    PullRequest,
    PushData,
    PushRequest,
    RequestKind,
    ServerConnectionState,
    ServerEvent,
)
from ._resume import ACK, OFFSET, RESUME, RequestFields, ResumeHeaderError
from ._token import TokenSource, is_plausible_token, new_token

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_PUSH_LINE",
    "LookupResult",
    "ServerConnection",
    "SessionRecord",
    "SessionRegistry",
    "SessionState",
]

#: Longest push line the server reads (base64 text, without the newline).
DEFAULT_MAX_PUSH_LINE = 8 * 1024 * 1024
#: Longest request head (request line and headers) the server reads.
DEFAULT_MAX_HEADER_SIZE = 16 * 1024
#: Base64 characters of a push line decoded at a time (48 KiB of data): a
#: longer line reaches the session as :class:`PushData` events, so no
#: connection holds more than about this much of it.
PUSH_PIECE = 64 * 1024
#: Raw bytes per pull line, as GOST's 32 KiB ``readBufferSize``.
PULL_LINE_DATA = 32 * 1024

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    410: b"Gone",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}
_SERVER_HEADERS: list[tuple[bytes, bytes]] = []
_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")

# The push fast path. A canonical push (what GOST's and pht's clients send) is
# parsed without h11, and its acknowledgement written from a template. The
# grammar below is a strict subset of what h11 accepts (RFC 9112 with CRLF
# line ends only, no obs-fold, printable ASCII only), so a request it matches
# means the same to both; anything else goes to h11 byte for byte.
_HEAD_END = re.compile(rb"\n\r?\n")  # h11's end-of-head rule (it accepts bare LF)
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n")
_CANONICAL_HEAD = re.compile(
    rb"POST (/[\x21-\x7e]*) HTTP/1\.1\r\n((?:"
    + _TOKEN
    + rb":[ \t]*"
    + _VALUE
    + rb"[ \t]*\r\n)*)\r\n"
)
_POST = b"POST "
#: Headers by which a proxy in front reports the client's address.
_FORWARDED_HEADERS = frozenset((b"x-forwarded-for", b"x-real-ip"))
#: The resume extension's request headers (docs/resume.md).
_RESUME_HEADERS = frozenset((RESUME, OFFSET, ACK))
#: A request's resume fields when it carries none (one object: compared by identity).
NO_RESUME_FIELDS = RequestFields.from_headers(())
#: Headers that change how h11 reads the request or the connection.
_H11_HEADERS = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
#: ``send_push_ack``'s bytes, exactly as h11 writes them for a keep-alive request.
_PUSH_ACK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
#: An empty pull line as one chunk.
_HEARTBEAT_CHUNK = b"1\r\n\n\r\n"
#: The head of a pull response to a fast-path push (a client's mistake,
#: answered as h11 answers it on the fallback path).
_PULL_HEAD = b"HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\n\r\n"
#: The end of a chunked body.
_LAST_CHUNK = b"0\r\n\r\n"
_AFTER_EOF = "receive_data() got bytes after b'' (the end of the connection)"


class ServerConnection:
    """One accepted HTTP connection of a PHT server.

    Feed bytes with :meth:`receive_data` (``b""`` at EOF); :meth:`next_event`
    returns one request event at a time, after the whole request (body
    included) has arrived. Answer each before the next one is produced:
    ``send_token`` for an authorize, ``send_push_ack`` for a push or close,
    ``start_pull`` then any number of ``send_pull_data`` / ``send_heartbeat``
    and finally ``end_pull`` for a pull, ``send_status`` for anything refused.
    Pipelined requests are answered in order.
    """

    # Thousands of idle tunnels hold one of these each: slots, not a dict.
    __slots__ = (
        "_body_left",
        "_body_pending",
        "_body_size",
        "_buffer",
        "_chunked_pull",
        "_content_length",
        "_decoder",
        "_eof",
        "_fast",
        "_fast_enabled",
        "_fast_request",
        "_h11",
        "_head_scan",
        "_in_body",
        "_is_form",
        "_kind",
        "_line_done",
        "_max_header_size",
        "_method",
        "_must_close",
        "_push_piece",
        "_refusal",
        "_routes",
        "_state",
        "_token",
        "forwarded_for",
        "max_push_line",
        "paths",
        "response_headers",
        "resume",
        "resume_enabled",
        "resume_offset",
    )

    def __init__(
        self,
        paths: Paths = DEFAULT_PATHS,
        *,
        max_push_line: int = DEFAULT_MAX_PUSH_LINE,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        resume: bool = True,
        _fast_path: bool = True,
        _push_piece: int = PUSH_PIECE,
    ) -> None:
        self.paths = paths
        self.max_push_line = max_push_line
        #: Whether the resume extension's request headers are read (else
        #: ignored, as a server without the extension does).
        self.resume_enabled = resume
        self._max_header_size = max_header_size
        # h11 is made when a request needs it (most never do: the fast path
        # reads them); an idle tunnel's two connections then hold none.
        self._h11: h11.Connection | None = None
        self._state = ServerConnectionState.IDLE
        self._routes = _routes(paths)
        self._must_close = False
        # Fast path state. While ``_fast`` is set, h11 sits between requests
        # with an empty buffer and every unread byte is in ``_buffer``.
        self._push_piece = _push_piece
        self._fast_enabled = _fast_path
        self._fast = True
        self._buffer = bytearray()
        self._eof = False
        self._head_scan = 0
        self._fast_request = False  # the current request was read without h11
        self._in_body = False  # a fast request's body is being read
        self._body_left = 0  # its bytes still to come
        self._body_pending = 0  # its bytes received since the last next_event()
        self._content_length = 0
        self._chunked_pull = True
        self._reset_request()

    @property
    def _conn(self) -> h11.Connection:
        """The h11 connection, made on first use (between requests, a fresh one is the same)."""
        conn = self._h11
        if conn is None:
            conn = self._h11 = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self._max_header_size
            )
        return conn

    def _reset_request(self) -> None:
        self._kind: RequestKind | None = None
        self._method = b""
        #: The client address a proxy in front reported for the current
        #: request (``X-Forwarded-For``, else ``X-Real-IP``), raw; whether to
        #: believe it is the caller's decision (trust only your own proxies).
        self.forwarded_for: bytes | None = None
        self._refusal: BadRequest | None = None
        #: The current request's resume fields (docs/resume.md), read on
        #: both paths; empty when it carries none or resume is off.
        self.resume: RequestFields = NO_RESUME_FIELDS
        #: Headers the answer to the current request carries besides its
        #: own (the resume extension's, set by the server core).
        self.response_headers: Sequence[tuple[bytes, bytes]] = ()
        #: Resume: the upstream offset of the current push's next piece (the core's).
        self.resume_offset: int | None = None
        self._token = ""
        self._is_form = False
        self._decoder: LineDecoder | None = None  # a push's line
        self._line_done = False  # its newline arrived (or it grew too long)
        self._body_size = 0

    @property
    def state(self) -> ServerConnectionState:
        return self._state

    # -- input ------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection; ``b""`` means the client closed it."""
        if not self._fast:
            try:
                self._conn.receive_data(bytes(data) if data else b"")
            except RuntimeError:
                self._state = ServerConnectionState.ERROR
                raise LocalProtocolError(_AFTER_EOF) from None
            return
        if not data:
            self._eof = True
        elif self._eof:
            self._state = ServerConnectionState.ERROR
            raise LocalProtocolError(_AFTER_EOF)
        elif self._body_left:
            # A fast push's body: straight into its line buffer (h11 would
            # make it one Data event at the next next_event()).
            left = self._body_left
            if len(data) > left:
                with memoryview(data) as view:
                    self._buffer += view[left:]
                    self._take_body(view[:left])
            else:
                self._take_body(data)
        else:
            self._buffer += data

    def _take_body(self, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        self._body_left -= size
        self._body_pending += size
        if self._decoder is not None:
            self._decoder.feed(data)

    def next_event(self) -> ServerEvent | NeedData:
        """Return the next complete request, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` for HTTP that cannot be parsed;
        its ``status_hint`` is the status to answer with (``send_status``
        still works once, then the connection is ``CLOSED``).
        """
        if self._state is not ServerConnectionState.IDLE:
            return NEED_DATA
        if self._fast:
            fast = self._fast_next_event()
            if fast is not None:
                if (
                    fast is not NEED_DATA
                    and type(fast) is not PushData
                    and self._state is ServerConnectionState.IDLE
                ):
                    self._state = ServerConnectionState.RESPONDING
                return fast
            self._hand_over_to_h11()
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._state = ServerConnectionState.ERROR
                raise RemoteProtocolError(
                    f"malformed request: {exc}", status_hint=exc.error_status_hint
                ) from None
            if not isinstance(event, h11.Event):  # NEED_DATA, or PAUSED between requests
                return NEED_DATA
            result = self._handle(event)
            if result is not None:
                if type(result) is not PushData and self._state is ServerConnectionState.IDLE:
                    self._state = ServerConnectionState.RESPONDING
                return result
            if isinstance(event, h11.ConnectionClosed):  # h11 would say so forever
                return NEED_DATA

    def _fast_next_event(self) -> ServerEvent | NeedData | None:
        """The next event of a canonical push, or ``None``: let h11 read it.

        Every request head passes through here whole (both with and without
        the fast path), so that a head with a bare LF line end is refused
        with 400 before h11, which accepts them, reads it.
        """
        if self._in_body:
            return self._fast_body()
        buffer = self._buffer
        if not buffer:
            return None if self._eof else NEED_DATA
        if buffer[0] < 0x21:
            return None  # h11 refuses this at once ("illegal request line")
        match = _HEAD_END.search(buffer, self._head_scan)
        if match is None:
            if self._eof or len(buffer) > self._max_header_size:
                return None  # h11 knows what an EOF means, and refuses too long a head
            self._head_scan = max(0, len(buffer) - 2)
            return NEED_DATA
        self._head_scan = 0
        end = match.end()
        if buffer.count(b"\n", 0, end) != buffer.count(b"\r\n", 0, end):
            # RFC 9112 lets a server accept a bare LF; pht does not: a front
            # proxy that reads such a head differently would smuggle requests.
            self._state = ServerConnectionState.ERROR
            raise RemoteProtocolError(
                "malformed request: bare LF line end in the request head", status_hint=400
            )
        if end > self._max_header_size:
            # Measured here as it arrived, for both paths alike (h11 bounds
            # only what it buffers while a head is incomplete).
            self._state = ServerConnectionState.ERROR
            raise RemoteProtocolError(
                f"request head larger than {self._max_header_size} bytes", status_hint=431
            )
        if self._eof or not self._fast_enabled or not _POST.startswith(buffer[:5]):
            return None  # h11 knows what an EOF means; this reads only pushes
        if end - match.start() != 3:
            return None
        head = _CANONICAL_HEAD.fullmatch(buffer, 0, end)
        if head is None:
            return None
        hosts, content_length, content_type = 0, None, None
        forwarded: list[bytes] = []
        real_ip = None
        resume: list[tuple[bytes, bytes]] | None = None
        for name, value in _FIELD.findall(buffer, head.start(2), head.end(2)):
            name = name.lower()
            if name in _FORWARDED_HEADERS:
                if name == b"x-forwarded-for":
                    forwarded.append(value)
                elif real_ip is None:
                    real_ip = value
            elif name == b"content-length":
                if content_length is not None or not value.isdigit() or len(value) > 18:
                    return None
                content_length = value
            elif name == b"host":
                hosts += 1
            elif name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name in _H11_HEADERS:
                return None
            elif name in _RESUME_HEADERS:
                if resume is None:
                    resume = []
                resume.append((name, value))
            elif name == b"connection" and b"close" in {
                option.strip().lower() for option in value.split(b",")
            }:
                return None  # h11 closes after the answer: let it
        if hosts != 1 or content_length is None:
            return None
        target = head.group(1).decode("latin-1")
        if self._routes.get(target.partition("?")[0]) is not RequestKind.PUSH:
            return None
        # From here on this is a push h11 would read exactly so: read it.
        self._fast_request = True
        self._begin_request(b"POST", target, content_length, content_type)
        self.forwarded_for = b",".join(forwarded) if forwarded else real_ip
        if resume is not None:
            self._read_resume(resume)
        if self._refusal is not None and self._refusal.status_code == 413:
            self._must_close = True  # refused before reading the body
            return self._refusal
        length = int(content_length)
        self._in_body = True
        self._content_length = self._body_left = length
        size = min(len(buffer) - end, length)
        if size:
            with memoryview(buffer) as view, view[end : end + size] as body:
                self._take_body(body)
        del buffer[: end + size]
        return self._fast_body()

    def _fast_body(self) -> ServerEvent | NeedData:
        """What h11's Data and EndOfMessage events would make of a fast push's body."""
        pending = self._body_pending
        if pending:
            self._body_pending = 0
            result = self._body_received(pending)
            if type(result) is PushData:
                return result  # the body goes on
            if result is not None:
                self._in_body = False
                self._body_left = 0
                return result
        if not self._body_left:
            self._in_body = False
            return self._end_request()
        if self._eof:
            self._state = ServerConnectionState.ERROR
            raise RemoteProtocolError(
                "malformed request: the connection closed in the body after"
                f" {self._content_length - self._body_left} of {self._content_length} bytes",
                status_hint=400,
            )
        return NEED_DATA

    def _hand_over_to_h11(self) -> None:
        """Give h11 every byte not read yet: it takes this request (and any after it)."""
        self._fast = False
        self._head_scan = 0
        if self._buffer:
            self._conn.receive_data(bytes(self._buffer))
            self._buffer.clear()
        if self._eof:
            self._conn.receive_data(b"")

    def _handle(self, event: h11.Event) -> ServerEvent | None:
        if isinstance(event, h11.Request):
            # Its head was measured as it arrived (see _fast_next_event).
            if _header(event, b"transfer-encoding") is not None and (
                _header(event, b"content-length") is not None
            ):
                # RFC 9112 section 6.3: h11 reads such a request by its
                # Transfer-Encoding; the connection must close after the
                # answer, or a request smuggled after it would be served.
                self._must_close = True
            self._start_request(event)
            if self._refusal is not None and self._refusal.status_code == 413:
                self._must_close = True  # refused before reading the body
                return self._refusal
        elif isinstance(event, h11.Data):
            if self._decoder is not None:
                self._decoder.feed(event.data)
            return self._body_received(len(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return self._end_request()
        elif isinstance(event, h11.ConnectionClosed):
            self._state = ServerConnectionState.CLOSED
        return None

    def _body_received(self, size: int) -> ServerEvent | PushData | None:
        """Account for ``size`` more body bytes (already fed to the line decoder)."""
        self._body_size += size
        decoder = self._decoder
        if decoder is not None and not self._line_done:
            if decoder.too_long:
                return self._refuse_now(413, "push line too long")
            if decoder.complete:
                self._line_done = True
                return None
            try:
                data = decoder.take_pieces()
            except RemoteProtocolError as exc:
                return self._refuse_now(400, str(exc))
            if data:
                return PushData(token=self._token, data=data)
        elif self._body_size > self.max_push_line:
            return self._refuse_now(413, "request body too large")
        return None

    def _start_request(self, request: h11.Request) -> None:
        self._begin_request(
            request.method,
            request.target.decode("latin-1"),
            _header(request, b"content-length"),
            _header(request, b"content-type"),
        )
        forwarded = [value for name, value in request.headers if name == b"x-forwarded-for"]
        if forwarded:
            self.forwarded_for = b",".join(forwarded)
        else:
            self.forwarded_for = _header(request, b"x-real-ip")
        self._read_resume(request.headers)

    def _read_resume(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Read the resume fields; a malformed one refuses the request with 400.

        The refusal names no token: the session is not affected.
        """
        if not self.resume_enabled or self._refusal is not None:
            return
        try:
            self.resume = RequestFields.from_headers(headers)
        except ResumeHeaderError as exc:
            self._refusal = BadRequest(status_code=400, reason=str(exc))
            self._decoder = None  # the body is read and dropped

    def _begin_request(
        self,
        method: bytes,
        target: str,
        content_length: bytes | None,
        content_type: bytes | None,
    ) -> None:
        self._reset_request()
        self._method = method
        if not target.startswith("/"):  # absolute-form, e.g. through a forward proxy
            scheme, sep, rest = target.partition("://")
            target = "/" + rest.partition("/")[2] if sep and scheme.isalpha() else target
        path, _, query = target.partition("?")
        kind = self._routes.get(path)
        self._kind = kind
        if method == b"CONNECT":
            # h11 would switch protocols after a 2xx answer; nothing here tunnels by CONNECT.
            self._refusal = BadRequest(status_code=405, reason="CONNECT is not supported")
            return
        if kind is None:
            self._refusal = BadRequest(status_code=404, reason=f"unknown path {path[:64]!r}")
            return
        if query.startswith("token=") and not any(c in query for c in "&%+"):
            tokens = [query[6:]]  # what parse_qs makes of it, quicker
        else:
            tokens = parse_qs(query, keep_blank_values=True).get("token", [])
        if len(tokens) > 1 and len(set(tokens)) > 1:
            self._refusal = BadRequest(status_code=400, reason="conflicting token parameters")
            return
        self._token = tokens[0] if tokens else ""
        if kind is RequestKind.PUSH and method != b"POST":
            self._refusal = BadRequest(status_code=400, reason="push must be a POST")
        elif kind is RequestKind.PULL and method != b"GET":
            self._refusal = BadRequest(status_code=400, reason="pull must be a GET")
        elif kind is RequestKind.PUSH:
            if content_length is not None and int(content_length) > self.max_push_line + 1:
                self._refusal = BadRequest(
                    status_code=413, reason="push body too large", token=self._token or None
                )
                return
            content_type = content_type or b""
            self._is_form = content_type.split(b";")[0].strip().lower() in _FORM_TYPES
            if not self._is_form:
                self._decoder = LineDecoder(self.max_push_line, self._push_piece)

    def _refuse_now(self, status: int, reason: str) -> BadRequest:
        """Refuse before the body has been read: the connection closes afterwards."""
        self._state = ServerConnectionState.RESPONDING
        self._must_close = True
        token = self._token or None if self._kind is RequestKind.PUSH else None
        return BadRequest(status_code=status, reason=reason, token=token)

    def _end_request(self) -> ServerEvent:
        kind, token = self._kind, self._token
        if self._refusal is not None:
            return self._refusal
        if kind is RequestKind.AUTHORIZE:
            return AuthorizeRequest()
        if kind is RequestKind.PULL:
            return PullRequest(token=token)
        # A push. GOST reads the body's first line and ignores the rest.
        if self._is_form:
            return CloseRequest(token=token, reason="form-encoded body")
        decoder = self._decoder
        if decoder is None or not decoder.complete:
            reason = "empty push" if self._body_size == 0 else "push without newline"
            return CloseRequest(token=token, reason=reason)
        try:
            data = decoder.take_rest()
        except RemoteProtocolError as exc:
            return BadRequest(status_code=400, reason=str(exc), token=token or None)
        return PushRequest(token=token, data=data)

    # -- output -----------------------------------------------------------------

    def send_token(self, token: str) -> bytes:
        """Answer an authorize request: ``token=<token>`` as GOST does."""
        body = f"token={token}".encode("ascii")
        headers = [
            (b"Content-Length", str(len(body)).encode()),
            (b"Content-Type", b"text/plain; charset=utf-8"),
        ]
        if self._method == b"HEAD":
            body = b""  # the length of the body a GET would get, no body
        return self._respond(200, headers, body)

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for ``100 Continue`` before sending the body.

        Send :meth:`send_continue` then (``Expect: 100-continue``); a client
        that waits in vain only sends its body after a delay of its own.
        """
        return (
            self._state is ServerConnectionState.IDLE
            and not self._fast
            and self._conn.they_are_waiting_for_100_continue
        )

    def send_continue(self) -> bytes:
        """``100 Continue``, for a client that :attr:`expects_continue`."""
        if not self.expects_continue:
            raise LocalProtocolError("no client is waiting for 100 Continue")
        return self._send(h11.InformationalResponse(status_code=100, headers=[]))

    def send_push_ack(self) -> bytes:
        """Acknowledge a push or a close: ``200`` with an empty body."""
        if (
            self._fast_request
            and not self._must_close
            and not self.response_headers
            and self._state is ServerConnectionState.RESPONDING
        ):
            self._next_cycle()
            return _PUSH_ACK
        return self._respond(200, [(b"Content-Length", b"0")], b"")

    def discard_push(self, status_code: int, reason: str = "push refused") -> None:
        """Refuse a push whose body is still arriving (after :class:`PushData`).

        The rest of the body is read and dropped (answering before it was
        read would make the client's kernel reset the connection, and the
        answer would be lost); then :meth:`next_event` returns a
        :class:`BadRequest` with ``status_code``: answer that.
        """
        if (
            self._kind is not RequestKind.PUSH
            or self._decoder is None
            or self._state is not ServerConnectionState.IDLE
        ):
            raise LocalProtocolError("discard_push() is for a push whose PushData was delivered")
        self._decoder = None
        self._refusal = BadRequest(status_code=status_code, reason=reason)

    def send_status(self, status_code: int) -> bytes:
        """Refuse the current request with ``status_code`` and an empty body.

        404 carries Go's ``404 page not found`` text, as GOST's server.
        """
        if status_code == 404:
            body = b"404 page not found\n"
            headers = [
                (b"Content-Type", b"text/plain; charset=utf-8"),
                (b"X-Content-Type-Options", b"nosniff"),
                (b"Content-Length", str(len(body)).encode()),
            ]
            if self._method == b"HEAD":
                body = b""  # the length of the body a GET would get, no body
        else:
            body, headers = b"", [(b"Content-Length", b"0")]
            if status_code == 405:
                headers.append((b"Allow", b"GET, HEAD, POST"))
        if self._state is ServerConnectionState.ERROR:
            # The request could not be parsed: answer and close.
            self._state = ServerConnectionState.RESPONDING
            self._must_close = True
        return self._respond(status_code, headers, body)

    def start_pull(self) -> bytes:
        """Open the pull response: headers flushed at once, chunked body."""
        self._expect(ServerConnectionState.RESPONDING, "start_pull")
        self._state = ServerConnectionState.PULLING
        extra = self.response_headers
        if self._fast_request:  # a push read without h11 (an odd answer, but allowed)
            self._chunked_pull = True
            if extra:
                fields = b"".join(b"%s: %s\r\n" % header for header in extra)
                return _PULL_HEAD[:-2] + fields + b"\r\n"
            return _PULL_HEAD
        response = h11.Response(
            status_code=200,
            headers=[
                (b"X-Accel-Buffering", b"no"),
                (b"Transfer-Encoding", b"chunked"),
                *extra,
            ],
            reason=b"OK",  # as GOST's (Go's) status line
        )
        data = self._send(response)
        # RFC 9112: an HTTP/1.1 client gets a chunked body; an HTTP/1.0 one
        # (nginx without proxy_http_version 1.1) gets it raw, closed at the
        # end; a HEAD request gets none, a CONNECT's 200 switches protocols.
        # Chunks are framed here, h11 (which keeps no state per chunk) only
        # writes the last one.
        self._chunked_pull = (
            self._fast_enabled
            and self._method != b"HEAD"
            and self._conn.our_state is h11.SEND_BODY
            and self._conn.their_http_version == b"1.1"
        )
        their_state = self._conn.their_state
        if self._chunked_pull and their_state in (h11.DONE, h11.MUST_CLOSE):
            # From here on h11 would only write the last chunk: drop it, so an
            # open pull (an idle tunnel's only connection) holds none. The end
            # is then written as a fast request's, and the connection closes
            # after it where h11 would have closed it (the client asked to).
            # What h11 had read past the request waits in the fast path's
            # buffer, as between requests.
            pending, closed = self._conn.trailing_data
            self._h11 = None
            self._fast = True
            self._fast_request = True
            self._buffer += pending
            self._eof = closed
            if their_state is h11.MUST_CLOSE:
                self._must_close = True
        return data

    def send_pull_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Send tunnel bytes as pull lines (at most 32 KiB of data per line)."""
        self._expect(ServerConnectionState.PULLING, "send_pull_data")
        if not len(data):
            raise LocalProtocolError("send_pull_data() needs data; an empty line is a heartbeat")
        if self._chunked_pull:
            # One chunk, framed by hand: h11 keeps no state per chunk.
            return encode_chunk(data, PULL_LINE_DATA)
        return self._send(h11.Data(data=encode_lines(data, PULL_LINE_DATA)))

    def send_heartbeat(self) -> bytes:
        """Send an empty pull line, which keeps proxies and the client content."""
        self._expect(ServerConnectionState.PULLING, "send_heartbeat")
        if self._chunked_pull:
            return _HEARTBEAT_CHUNK
        return self._send(h11.Data(data=b"\n"))

    def end_pull(self) -> bytes:
        """End the pull response; the session is over (or, legacy, this poll)."""
        self._expect(ServerConnectionState.PULLING, "end_pull")
        if self._fast_request:
            self._next_cycle()
            return _LAST_CHUNK
        data = self._send(h11.EndOfMessage())
        self._next_cycle()
        return data

    def send_failed(self) -> None:
        """Tell the connection that writing failed: it is unusable now."""
        self._conn.send_failed()
        self._state = ServerConnectionState.ERROR

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        self._expect(ServerConnectionState.RESPONDING, "a response")
        if self.response_headers:
            headers = [*headers, *self.response_headers]
        if self._must_close:
            headers = [*headers, (b"Connection", b"close")]
        if not 200 <= status <= 999:
            self._state = ServerConnectionState.ERROR
            raise LocalProtocolError(f"a final response needs a status 200-999, not {status}")
        reason = _REASONS.get(status, b"OK" if status == 200 else b"")
        if self._fast_request:
            # A keep-alive HTTP/1.1 request and a Content-Length body: the
            # response is this, on either path.
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
            lines += [b"%s: %s\r\n" % header for header in headers]
            lines += [b"\r\n", body]
            self._next_cycle()
            return b"".join(lines)
        data = self._send(h11.Response(status_code=status, headers=headers, reason=reason))
        if body:
            data += self._send(h11.Data(data=body))
        data += self._send(h11.EndOfMessage())
        self._next_cycle()
        return data

    def _expect(self, state: ServerConnectionState, what: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"cannot send {what} in state {self._state.name}")

    def _send(self, event: h11.Event) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            self._state = ServerConnectionState.ERROR
            raise LocalProtocolError(str(exc)) from None

    def _next_cycle(self) -> None:
        if self._fast_request:  # h11 never saw this request: it is still between requests
            self._fast_request = False
            closed = self._must_close
            self._state = ServerConnectionState.CLOSED if closed else ServerConnectionState.IDLE
            self._reset_request()
            return
        if (
            not self._must_close
            and self._conn.our_state is h11.DONE
            and self._conn.their_state is h11.DONE
        ):
            self._conn.start_next_cycle()
            self._state = ServerConnectionState.IDLE
            if not self._fast:
                # The next head goes through _fast_next_event's checks too:
                # a fresh h11 connection between requests is the same as the
                # old one, and what the old one had not read yet is moved over.
                pending, closed = self._conn.trailing_data
                if pending or closed:
                    self._h11 = None  # a fresh one when needed
                    self._buffer += pending
                    self._eof = closed
                self._fast = True
        else:
            self._state = ServerConnectionState.CLOSED
        self._reset_request()


@functools.lru_cache(maxsize=16)
def _routes(paths: Paths) -> dict[str, RequestKind]:
    """What each path is for (one table per set of paths, shared by the connections)."""
    return {
        paths.authorize: RequestKind.AUTHORIZE,
        paths.push: RequestKind.PUSH,
        paths.pull: RequestKind.PULL,
    }


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


# --- the session table --------------------------------------------------------


class SessionState(enum.Enum):
    """Life of a session in a :class:`SessionRegistry`."""

    ISSUED = "ISSUED"  #: token handed out by authorize, not used yet
    OPEN = "OPEN"  #: a push or pull has used it
    CLOSED = "CLOSED"  #: over; its token is refused from now on


P = TypeVar("P")


@dataclass(slots=True, eq=False)
class SessionRecord(Generic[P]):
    """One session: its token, state, timestamps and the adapter's payload."""

    token: str
    state: SessionState
    created_at: float
    last_active: float
    payload: P | None = field(default=None, repr=False)
    #: Who the session counts against (a client address), ``None`` for nobody.
    owner: str | None = None
    #: Whether the session showed a sign of life (a pull attached, a byte carried).
    alive: bool = False


class LookupResult(enum.Enum):
    """Why :meth:`SessionRegistry.lookup` found no usable session."""

    UNKNOWN = "unknown"  #: never issued (strict mode) or malformed token
    CLOSED = "closed"  #: closed earlier; it is not resurrected
    FULL = "full"  #: a new session would exceed ``max_sessions``
    OVER_BUDGET = "over budget"  #: its owner holds ``max_sessions_per_owner`` already

    @property
    def status_code(self) -> int:
        """The status to answer: 403 as GOST legacy for unknown (and closed) tokens."""
        return 403 if self in (LookupResult.UNKNOWN, LookupResult.CLOSED) else 429


class SessionRegistry(Generic[P]):
    """Which tokens exist, and what a request for a token means.

    - ``issue(now)`` hands out a token for ``/authorize`` (``None`` when the
      ``backlog`` of issued-but-unused tokens or ``max_sessions`` is full:
      answer ``429``).
    - ``lookup(token, now)`` returns the session record for a push or pull;
      an unknown token creates a session lazily (a modern GOST client made
      it), unless ``strict`` is set. A closed token is never resurrected.
    - ``close(token, now)`` ends a session; its token is remembered for
      ``closed_ttl`` seconds so late requests are refused, not re-opened.
    - ``expired(now)`` lists sessions idle for longer than ``idle_timeout``
      (issued ones after ``issued_timeout``, and sessions that never showed
      a sign of life, see :meth:`mark_alive`, after ``lazy_timeout``).

    Admission budgets: ``issue`` and ``lookup`` take the ``owner`` a new
    session counts against (the client's address); one owner holds at most
    ``max_sessions_per_owner`` sessions, of which at most
    ``max_issued_per_owner`` issued but unused, so that one party cannot
    take the whole ``max_sessions`` or ``backlog`` from everyone else.
    """

    def __init__(
        self,
        *,
        strict: bool = False,
        max_sessions: int = 10_000,
        backlog: int = 128,
        idle_timeout: float | None = 600.0,
        issued_timeout: float = 60.0,
        lazy_timeout: float = 10.0,
        closed_ttl: float = 600.0,
        max_sessions_per_owner: int | None = None,
        max_issued_per_owner: int | None = None,
        token_source: TokenSource = new_token,
    ) -> None:
        if max_sessions < 1 or backlog < 1:
            raise LocalProtocolError("max_sessions and backlog must be at least 1")
        for name, budget in (
            ("max_sessions_per_owner", max_sessions_per_owner),
            ("max_issued_per_owner", max_issued_per_owner),
        ):
            if budget is not None and budget < 1:
                raise LocalProtocolError(f"{name} must be at least 1 (or None: no budget)")
        self.strict = strict
        self.max_sessions = max_sessions
        self.backlog = backlog
        self.idle_timeout = idle_timeout
        self.issued_timeout = issued_timeout
        self.lazy_timeout = lazy_timeout
        self.closed_ttl = closed_ttl
        self.max_sessions_per_owner = max_sessions_per_owner
        self.max_issued_per_owner = max_issued_per_owner
        self._token_source = token_source
        self._sessions: dict[str, SessionRecord[P]] = {}
        self._issued = 0
        # owner -> [sessions, issued-but-unused sessions]
        self._owners: dict[str, list[int]] = {}
        self._closed: OrderedDict[str, float] = OrderedDict()  # sessions that existed
        self._closed_unseen: OrderedDict[str, float] = OrderedDict()  # closes of no session

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionRecord[P]]:
        return iter(list(self._sessions.values()))

    def get(self, token: str) -> SessionRecord[P] | None:
        """The record of session ``token``, or ``None`` if it is unknown (or forgotten)."""
        return self._sessions.get(token)

    def owned_by(self, owner: str) -> tuple[int, int]:
        """``(sessions, issued but unused)`` that count against ``owner``."""
        counts = self._owners.get(owner)
        return (counts[0], counts[1]) if counts else (0, 0)

    def _over_budget(self, owner: str | None, issued: bool) -> bool:
        if owner is None:
            return False
        counts = self._owners.get(owner)
        if counts is None:
            return False
        limit = self.max_sessions_per_owner
        if limit is not None and counts[0] >= limit:
            return True
        limit = self.max_issued_per_owner
        return issued and limit is not None and counts[1] >= limit

    def _add(self, record: SessionRecord[P]) -> None:
        self._sessions[record.token] = record
        if record.owner is not None:
            counts = self._owners.setdefault(record.owner, [0, 0])
            counts[0] += 1
            if record.state is SessionState.ISSUED:
                counts[1] += 1
                self._issued += 1
        elif record.state is SessionState.ISSUED:
            self._issued += 1

    def _used(self, record: SessionRecord[P]) -> None:
        """An issued session was used (or ended): it leaves the backlog."""
        self._issued -= 1
        if record.owner is not None:
            self._owners[record.owner][1] -= 1

    def issue(self, now: float, owner: str | None = None) -> str | None:
        """A new token for ``/authorize``, or ``None`` when full (answer 429).

        ``owner`` is who the token counts against until it is used or expires.
        """
        if self._issued >= self.backlog or len(self._sessions) >= self.max_sessions:
            return None
        if self._over_budget(owner, issued=True):
            return None
        for _ in range(8):
            token = self._token_source()
            if token not in self._sessions and token not in self._closed:
                self._closed_unseen.pop(token, None)
                break
        else:
            raise LocalProtocolError("token source keeps returning tokens already in use")
        self._add(SessionRecord(token, SessionState.ISSUED, now, now, owner=owner))
        return token

    def lookup(
        self, token: str, now: float, owner: str | None = None
    ) -> SessionRecord[P] | LookupResult:
        """The session a push or pull for ``token`` refers to (see class doc).

        A session created lazily here counts against ``owner``.
        """
        self._forget_closed(now)
        record = self._sessions.get(token)
        if record is not None:
            if record.state is SessionState.ISSUED:
                record.state = SessionState.OPEN
                self._used(record)
            record.last_active = now
            return record
        if token in self._closed or token in self._closed_unseen:
            return LookupResult.CLOSED
        if self.strict or not is_plausible_token(token):
            return LookupResult.UNKNOWN
        if len(self._sessions) >= self.max_sessions:
            return LookupResult.FULL
        if self._over_budget(owner, issued=False):
            return LookupResult.OVER_BUDGET
        record = SessionRecord(token, SessionState.OPEN, now, now, owner=owner)
        self._add(record)
        return record

    def mark_alive(self, record: SessionRecord[P], now: float) -> None:
        """The session showed a sign of life: ``idle_timeout`` applies from now on."""
        record.alive = True
        record.last_active = now

    def touch(self, record: SessionRecord[P], now: float) -> None:
        """Note activity on a session (data moved), postponing its expiry."""
        record.last_active = now

    def close(self, token: str, now: float) -> SessionRecord[P] | None:
        """End the session of ``token``; returns its record if it was live."""
        record = self._sessions.pop(token, None)
        if record is not None:
            if record.state is SessionState.ISSUED:
                self._used(record)
            if record.owner is not None:
                counts = self._owners[record.owner]
                counts[0] -= 1
                if not counts[0]:
                    del self._owners[record.owner]
            record.state = SessionState.CLOSED
        elif not is_plausible_token(token):
            return None
        elif token not in self._closed:
            # Even a token never seen is remembered: a modern client that
            # closed (or broke) its session must not get a fresh one by a
            # late request. These go in a table of their own, so that a flood
            # of junk closes evicts only junk, never a session that existed.
            table = self._closed_unseen
            table[token] = now
            table.move_to_end(token)
            while len(table) > self.max_sessions:
                table.popitem(last=False)
            return None
        self._closed[token] = now
        self._closed.move_to_end(token)
        while len(self._closed) > 4 * self.max_sessions:
            self._closed.popitem(last=False)
        return record

    def expired(self, now: float) -> list[SessionRecord[P]]:
        """Sessions that have been idle for too long (close them)."""
        return [record for record in self._sessions.values() if self.is_expired(record, now)]

    def is_expired(self, record: SessionRecord[P], now: float) -> bool:
        """Whether ``record`` is a live session idle for longer than its timeout."""
        if self._sessions.get(record.token) is not record:
            return False  # closed already
        idle = now - record.last_active
        if record.state is SessionState.ISSUED:
            return idle >= self.issued_timeout
        if not record.alive:
            return idle >= self.lazy_timeout
        return self.idle_timeout is not None and idle >= self.idle_timeout

    def _forget_closed(self, now: float) -> None:
        for closed in (self._closed, self._closed_unseen):
            while closed:
                when = next(iter(closed.values()))
                if now - when < self.closed_ttl:
                    break
                closed.popitem(last=False)
