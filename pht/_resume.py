"""The resume extension's rules, sans-IO: headers, offsets, replay and back-off.

The extension (``docs/resume.md``) numbers each direction of a tunnel's byte
stream from offset 0, so that a cut request can be repeated without loss or
duplication. This module holds the pieces the client and server session
machines share; it does no I/O, reads no clock (``now`` is passed in) and
draws no random numbers of its own (a source is passed in):

- the header names, and strict formatting and parsing of their values
  (:class:`ResumeOffer`, :class:`ResumeTerms`, :func:`parse_offset`, ...),
  and the resume fields of a request or an answer gathered from its headers
  (:class:`RequestFields`, :class:`ResponseFields`);
- :class:`ReplayBuffer`: bytes sent and not yet acknowledged, bounded;
- :class:`InboundTracker`: the receiving end of a direction (what to deliver
  of a message starting at some offset, what to acknowledge);
- :class:`ServerResume` and :class:`ClientResume`: one session's state at
  each end, built from the above; the session machines hold one each;
- :class:`GraceTable` and :class:`Tombstones` (server) and :class:`Reconnect` / :class:`Backoff`
  (client): the grace period's bookkeeping on both ends;
- :class:`PullMeter`: when a bounded pull response should end.
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ._errors import LocalProtocolError, RemoteProtocolError, TunnelError

__all__ = [
    "ACK",
    "DEFAULT_GRACE",
    "DEFAULT_MAX_GRACE_SESSIONS",
    "DEFAULT_WINDOW",
    "END",
    "GONE",
    "MAX_GRACE",
    "MAX_HEADER_VALUE",
    "MAX_OFFSET",
    "MAX_WINDOW",
    "MIN_WINDOW",
    "OFFSET",
    "RECEIVED",
    "RESUME",
    "VERSION",
    "AckOutOfRange",
    "Backoff",
    "ClientResume",
    "GoneReason",
    "GraceTable",
    "InboundTracker",
    "OffsetGap",
    "PullMeter",
    "Reconnect",
    "ReplayBuffer",
    "RequestFields",
    "ResponseFields",
    "ResumeConflict",
    "ResumeHeaderError",
    "ResumeOffer",
    "ResumeSettings",
    "ResumeTerms",
    "ServerResume",
    "SessionGone",
    "Tombstones",
    "format_offset",
    "parse_gone",
    "parse_offset",
]

# --- names, limits, defaults --------------------------------------------------

#: Header names, lowercase as h11 hands them over (HTTP names are case-insensitive).
RESUME = b"pht-resume"
OFFSET = b"pht-offset"
ACK = b"pht-ack"
RECEIVED = b"pht-received"
END = b"pht-end"
GONE = b"pht-gone"

#: The only version of the extension.
VERSION = 1
#: Offsets are 63-bit: any HTTP stack parses them, and no stream gets there.
MAX_OFFSET = 2**63 - 1
#: The longest value of a resume header; longer is malformed.
MAX_HEADER_VALUE = 256

DEFAULT_WINDOW = 4 * 1024 * 1024
MIN_WINDOW = 64 * 1024
MAX_WINDOW = 64 * 1024 * 1024
DEFAULT_GRACE = 60
MAX_GRACE = 3600
DEFAULT_MAX_GRACE_SESSIONS = 1024

_OFFSET_RE = re.compile(rb"0|[1-9][0-9]{0,18}")
_PARAM_NAME_RE = re.compile(rb"[a-z0-9-]+")
_HTTP_OWS = b" \t"


# --- errors --------------------------------------------------------------------


class ResumeHeaderError(RemoteProtocolError):
    """A resume header is malformed (bad number, repeated, too long...): ``400``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_hint=400)


class OffsetGap(RemoteProtocolError):
    """A message starts beyond what the receiver has: bytes in between are missing.

    On the server (a push) this is a race the client repairs: answer ``409``
    with ``PHT-Received: expected``. On the client (a pull) it is a broken
    server. ``expected`` is the receiver's count, ``got`` the message's offset.
    """

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(
            f"resume offset {got} is beyond the {expected} bytes received: "
            f"{got - expected} bytes are missing; resend from offset {expected}",
            status_hint=409,
        )
        self.expected = expected
        self.got = got


class AckOutOfRange(RemoteProtocolError):
    """The peer acknowledged bytes that were never sent: ``400``, the session ends."""

    def __init__(self, ack: int, end: int) -> None:
        super().__init__(
            f"PHT-Ack {ack} is beyond the {end} bytes sent: the peer is broken",
            status_hint=400,
        )
        self.ack = ack
        self.end = end


class GoneReason(enum.Enum):
    """Why a resume session is gone (the ``PHT-Gone`` header of a ``410``)."""

    CLOSED = "closed"  #: ended cleanly: close notification, or end of stream acknowledged
    EXPIRED = "expired"  #: the grace period ran out before the client came back
    ABORTED = "aborted"  #: the server ended it otherwise (handler failed, shutdown, ...)
    UNKNOWN = "unknown"  #: the server has no record of the token


_GONE_EXPLAINED = {
    GoneReason.CLOSED: "the session was closed",
    GoneReason.EXPIRED: (
        "the server ended the session because the client did not come back within "
        "its grace period; data in flight is lost"
    ),
    GoneReason.ABORTED: "the server aborted the session; data in flight may be lost",
    GoneReason.UNKNOWN: (
        "the server does not know the session (it restarted, or forgot the token); "
        "data in flight is lost"
    ),
}


class SessionGone(TunnelError):
    """The server answered ``410`` with ``PHT-Gone``: it will never resume this session.

    ``reason`` says why; the message says what it means for the data.
    """

    def __init__(self, reason: GoneReason) -> None:
        super().__init__(
            f"resume failed: {_GONE_EXPLAINED[reason]} (410, PHT-Gone: {reason.value})",
            status=410,
        )
        self.reason = reason


# --- header values -------------------------------------------------------------


def format_offset(value: int) -> bytes:
    """The header value of an offset; refuses what the peer could not parse."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_OFFSET:
        raise LocalProtocolError(
            f"a resume offset must be an int in [0, 2**63 - 1], got {value!r}"
        )
    return b"%d" % value


def _strip(value: bytes, name: str) -> bytes:
    if len(value) > MAX_HEADER_VALUE:
        raise ResumeHeaderError(f"{name} is longer than {MAX_HEADER_VALUE} bytes")
    return value.strip(_HTTP_OWS)


def parse_offset(value: bytes, name: str = "PHT-Offset") -> int:
    """Parse an offset header value strictly: decimal digits, no sign, no leading zero."""
    text = _strip(value, name)
    if _OFFSET_RE.fullmatch(text) is None:
        raise ResumeHeaderError(f"{name} must be a decimal offset, got {text[:32]!r}")
    number = int(text)
    if number > MAX_OFFSET:
        raise ResumeHeaderError(f"{name} {number} is beyond 2**63 - 1")
    return number


def parse_gone(value: bytes) -> GoneReason:
    """Parse a ``PHT-Gone`` value (one lowercase word)."""
    text = _strip(value, "PHT-Gone")
    try:
        return GoneReason(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ResumeHeaderError(f"PHT-Gone has an unknown reason {text[:32]!r}") from None


def _parse_resume(value: bytes) -> tuple[int, dict[str, int]] | None:
    """``(version, params)`` of a ``PHT-Resume`` value; ``None`` for another version.

    Parameters other than the known ones are kept (the caller ignores them);
    a value that is not ``<digits> *(; name=number)`` is malformed.
    """
    text = _strip(value, "PHT-Resume")
    version_text, *parts = text.split(b";")
    version_text = version_text.strip(_HTTP_OWS)
    if _OFFSET_RE.fullmatch(version_text) is None or len(version_text) > 9:
        raise ResumeHeaderError(f"PHT-Resume must start with a version, got {text[:32]!r}")
    params: dict[str, int] = {}
    for part in parts:
        key, sep, raw = part.partition(b"=")
        key = key.strip(_HTTP_OWS)
        if not sep or _PARAM_NAME_RE.fullmatch(key) is None:
            raise ResumeHeaderError(f"PHT-Resume has a malformed parameter {part[:32]!r}")
        name = key.decode("ascii")
        if name in params:
            raise ResumeHeaderError(f"PHT-Resume repeats the parameter {name!r}")
        params[name] = parse_offset(raw, f"PHT-Resume's {name}")
    if int(version_text) != VERSION:
        return None
    return VERSION, params


@dataclass(frozen=True, kw_only=True, slots=True)
class ResumeOffer:
    """A client's ``PHT-Resume`` request header: it wants the extension.

    ``window`` optionally asks for a smaller replay window than the server's.
    """

    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise LocalProtocolError(
                f"resume window must be in [{MIN_WINDOW}, {MAX_WINDOW}] bytes, got {self.window}"
            )

    def format(self) -> bytes:
        """The header value, e.g. ``b"1"`` or ``b"1; window=1048576"``."""
        if self.window is None:
            return b"%d" % VERSION
        return b"%d; window=%d" % (VERSION, self.window)

    @classmethod
    def parse(cls, value: bytes) -> ResumeOffer | None:
        """The offer in a request header; ``None`` if it offers another version.

        A window outside the allowed range is clamped into it (the server
        decides the window anyway); a malformed value raises
        :class:`ResumeHeaderError`.
        """
        parsed = _parse_resume(value)
        if parsed is None:
            return None
        window = parsed[1].get("window")
        if window is not None:
            window = min(max(window, MIN_WINDOW), MAX_WINDOW)
        return cls(window=window)


@dataclass(frozen=True, kw_only=True, slots=True)
class ResumeTerms:
    """What a server granted: its ``PHT-Resume`` answer header.

    ``window`` is the replay window in bytes, ``grace`` the grace period in
    whole seconds.
    """

    window: int
    grace: int

    def __post_init__(self) -> None:
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise LocalProtocolError(
                f"resume window must be in [{MIN_WINDOW}, {MAX_WINDOW}] bytes, got {self.window}"
            )
        if not 1 <= self.grace <= MAX_GRACE:
            raise LocalProtocolError(
                f"resume grace must be in [1, {MAX_GRACE}] seconds, got {self.grace}"
            )

    def format(self) -> bytes:
        """The header value, e.g. ``b"1; window=4194304; grace=60"``."""
        return b"%d; window=%d; grace=%d" % (VERSION, self.window, self.grace)

    @classmethod
    def parse(cls, value: bytes) -> ResumeTerms:
        """The terms in a server's answer; anything but version 1 with both
        parameters in range raises :class:`ResumeHeaderError`."""
        parsed = _parse_resume(value)
        if parsed is None:
            raise ResumeHeaderError("PHT-Resume answers a version that was not offered")
        params = parsed[1]
        try:
            return cls(window=params["window"], grace=params["grace"])
        except KeyError as exc:
            raise ResumeHeaderError(f"PHT-Resume answer lacks {exc.args[0]!r}") from None
        except LocalProtocolError as exc:
            raise ResumeHeaderError(f"PHT-Resume answer out of range: {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class ResumeSettings:
    """A server's resume limits (validated); :meth:`grant` answers an offer."""

    window: int = DEFAULT_WINDOW
    grace: int = DEFAULT_GRACE
    max_grace_sessions: int = DEFAULT_MAX_GRACE_SESSIONS

    def __post_init__(self) -> None:
        ResumeTerms(window=self.window, grace=self.grace)  # the same range checks
        if self.max_grace_sessions < 1:
            raise LocalProtocolError(
                f"max_grace_sessions must be at least 1, got {self.max_grace_sessions}"
            )

    def grant(self, offer: ResumeOffer) -> ResumeTerms:
        """The terms for a client's offer: the smaller window of the two."""
        window = self.window if offer.window is None else min(self.window, offer.window)
        return ResumeTerms(window=window, grace=self.grace)


Headers = Iterable[tuple[bytes, bytes]]


def _collect(headers: Headers, names: tuple[bytes, ...]) -> dict[bytes, bytes]:
    """The resume headers among ``headers`` (lowercase names); a repeat is malformed."""
    found: dict[bytes, bytes] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        if name in names:
            if name in found:
                raise ResumeHeaderError(f"{name.decode()} appears twice")
            found[name] = bytes(value)
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestFields:
    """The resume fields of one request, from its headers (server side).

    ``offer`` is ``None`` when the request does not offer version 1; ``ack``
    and ``offset`` are ``None`` when absent. A request with ``ack`` continues
    a session and must never create one.
    """

    offer: ResumeOffer | None = None
    offset: int | None = None
    ack: int | None = None

    @classmethod
    def from_headers(cls, headers: Headers) -> RequestFields:
        """Gather and parse the fields; malformed ones raise :class:`ResumeHeaderError`."""
        found = _collect(headers, (RESUME, OFFSET, ACK))
        if not found:
            return _NO_FIELDS
        resume = found.get(RESUME)
        offset = found.get(OFFSET)
        ack = found.get(ACK)
        return cls(
            offer=None if resume is None else ResumeOffer.parse(resume),
            offset=None if offset is None else parse_offset(offset, "PHT-Offset"),
            ack=None if ack is None else parse_offset(ack, "PHT-Ack"),
        )

    @property
    def continues(self) -> bool:
        """Whether the request names an existing session (it carries ``PHT-Ack``)."""
        return self.ack is not None

    @staticmethod
    def pull_headers(offer: ResumeOffer, ack: int | None) -> list[tuple[bytes, bytes]]:
        """A pull's resume headers: the opening one (``ack=None``) or a re-attaching one."""
        headers = [(b"PHT-Resume", offer.format())]
        if ack is not None:
            headers.append((b"PHT-Ack", format_offset(ack)))
        return headers

    @staticmethod
    def push_headers(offset: int, ack: int) -> list[tuple[bytes, bytes]]:
        """A push's resume headers (data, ack-only or close notification alike)."""
        return [
            (b"PHT-Resume", b"%d" % VERSION),
            (b"PHT-Offset", format_offset(offset)),
            (b"PHT-Ack", format_offset(ack)),
        ]


_NO_FIELDS = RequestFields()


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseFields:
    """The resume fields of one answer, from its headers (client side)."""

    terms: ResumeTerms | None = None
    offset: int | None = None
    received: int | None = None
    end: int | None = None
    gone: GoneReason | None = None

    @classmethod
    def from_headers(cls, headers: Headers) -> ResponseFields:
        """Gather and parse the fields; malformed ones raise :class:`ResumeHeaderError`."""
        found = _collect(headers, (RESUME, OFFSET, RECEIVED, END, GONE))
        if not found:
            return _NO_RESPONSE_FIELDS
        resume, offset = found.get(RESUME), found.get(OFFSET)
        received, end, gone = found.get(RECEIVED), found.get(END), found.get(GONE)
        return cls(
            terms=None if resume is None else ResumeTerms.parse(resume),
            offset=None if offset is None else parse_offset(offset, "PHT-Offset"),
            received=None if received is None else parse_offset(received, "PHT-Received"),
            end=None if end is None else parse_offset(end, "PHT-End"),
            gone=None if gone is None else parse_gone(gone),
        )

    @staticmethod
    def pull_headers(
        terms: ResumeTerms, offset: int, end: int | None
    ) -> list[tuple[bytes, bytes]]:
        """A ``200`` pull answer's resume headers (``end`` once the stream has ended)."""
        headers = [(b"PHT-Resume", terms.format()), (b"PHT-Offset", format_offset(offset))]
        if end is not None:
            headers.append((b"PHT-End", format_offset(end)))
        return headers

    @staticmethod
    def push_headers(received: int) -> list[tuple[bytes, bytes]]:
        """A push answer's (``200`` or ``409``) resume header."""
        return [(b"PHT-Received", format_offset(received))]

    @staticmethod
    def gone_headers(reason: GoneReason) -> list[tuple[bytes, bytes]]:
        """A ``410`` answer's resume header."""
        return [(b"PHT-Gone", reason.value.encode("ascii"))]


_NO_RESPONSE_FIELDS = ResponseFields()


# --- the sending end: the replay buffer ---------------------------------------

# Writes smaller than this are gathered into one bytearray chunk, so that a
# stream of 1-byte writes does not become a million bytes objects.
_GATHER = 16 * 1024


class ReplayBuffer:
    """The bytes of one direction that were sent and not yet acknowledged.

    It covers the stream's offsets ``[start, end)``: :meth:`append` adds at
    ``end`` (up to ``limit`` bytes held: what it refuses is the caller's
    back-pressure), :meth:`read` returns bytes from any offset in range (to
    send, or to send again after a cut), :meth:`ack` frees everything before
    an offset. Bytes are kept in chunks, not per byte; a ``bytes`` object
    appended whole is kept without copying, small writes are gathered.
    """

    __slots__ = ("_chunks", "_first", "_starts", "end", "limit", "start")

    def __init__(self, limit: int, *, start: int = 0) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise LocalProtocolError(f"replay buffer limit must be a positive int, got {limit!r}")
        format_offset(start)
        self.limit = limit
        #: Offset of the oldest byte kept (everything before was acknowledged).
        self.start = start
        #: Offset just past the newest byte appended.
        self.end = start
        self._chunks: list[bytes | bytearray] = []
        self._starts: list[int] = []  # offset of each chunk's first byte
        self._first = 0  # index of the first live chunk (the ones before are freed)

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def room(self) -> int:
        """How many bytes :meth:`append` would take now."""
        return self.limit - (self.end - self.start)

    @property
    def full(self) -> bool:
        """Whether the sender must wait for an acknowledgement."""
        return self.end - self.start >= self.limit

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Add as much of ``data`` as fits; return how many bytes were taken.

        A return value below ``len(data)`` is back-pressure: keep the rest
        and append it after an :meth:`ack` made room.
        """
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        take = min(size, self.room)
        if take <= 0:
            return 0
        if self.end + take > MAX_OFFSET:
            raise LocalProtocolError("the stream reached the largest resume offset")
        chunks = self._chunks
        if isinstance(data, bytes) and take == size and take >= _GATHER:
            self._add_chunk(data)  # immutable: kept as is
            self.end += take
            return take
        view = memoryview(data).cast("B")[:take]
        last = chunks[-1] if len(chunks) > self._first else None
        if take < _GATHER and isinstance(last, bytearray) and len(last) + take <= _GATHER:
            last += view
        elif take < _GATHER:
            self._add_chunk(bytearray(view))  # gathers the writes that follow
        else:
            self._add_chunk(bytes(view))
        self.end += take
        return take

    def _add_chunk(self, chunk: bytes | bytearray) -> None:
        self._chunks.append(chunk)
        self._starts.append(self.end)

    def read(self, offset: int, max_size: int) -> bytes:
        """Up to ``max_size`` bytes from ``offset`` (``b""`` at ``end``).

        ``offset`` must lie in ``[start, end]``: the bytes before ``start``
        are gone (acknowledged), those after ``end`` do not exist yet. At
        most ``max_size`` bytes are copied; a read that is one whole
        appended ``bytes`` object is not copied.
        """
        if not self.start <= offset <= self.end:
            raise LocalProtocolError(
                f"read at offset {offset} outside the replay buffer [{self.start}, {self.end}]"
            )
        if max_size < 1:
            raise LocalProtocolError(f"max_size must be at least 1, got {max_size}")
        stop = min(self.end, offset + max_size)
        if stop == offset:
            return b""
        index = bisect.bisect_right(self._starts, offset, lo=self._first) - 1
        pieces: list[bytes] = []
        position = offset
        while position < stop:
            chunk = self._chunks[index]
            chunk_start = self._starts[index]
            low = position - chunk_start
            high = min(len(chunk), stop - chunk_start)
            if isinstance(chunk, bytes):
                pieces.append(chunk if low == 0 and high == len(chunk) else chunk[low:high])
            else:
                pieces.append(bytes(memoryview(chunk)[low:high]))
            position = chunk_start + high
            index += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def ack(self, offset: int) -> int:
        """Free the bytes before ``offset``; return how many were freed.

        An offset at or below ``start`` frees nothing (acknowledgements are
        cumulative and may arrive late); one beyond ``end`` raises
        :class:`AckOutOfRange`.
        """
        if offset > self.end:
            raise AckOutOfRange(offset, self.end)
        if offset <= self.start:
            return 0
        freed = offset - self.start
        self.start = offset
        chunks, starts = self._chunks, self._starts
        first = self._first
        while first < len(chunks) and starts[first] + len(chunks[first]) <= offset:
            chunks[first] = b""  # let it go now, compact later
            first += 1
        if first == len(chunks):
            chunks.clear()
            starts.clear()
            first = 0
        elif first > 64 and first * 2 > len(chunks):
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first
        return freed

    @property
    def chunk_count(self) -> int:
        """How many chunks hold the bytes (for tests of the memory layout)."""
        return len(self._chunks) - self._first


# --- the receiving end ---------------------------------------------------------


class InboundTracker:
    """The receiving end of one direction: the server's upstream, the client's downstream.

    :meth:`accept` takes a message's offset and data and returns the part
    that is new (a retry's overlap is dropped; a gap raises
    :class:`OffsetGap`). ``received`` is the count to acknowledge
    (``PHT-Received`` on the server, ``PHT-Ack`` on the client). The ack
    bookkeeping (:meth:`ack_due`, :meth:`ack_confirmed`) tells the client
    when the bytes the server does not know it has call for an ack-only push.
    """

    __slots__ = ("acknowledged", "received")

    def __init__(self, received: int = 0) -> None:
        format_offset(received)
        #: Bytes received and delivered, in order: the next expected offset.
        self.received = received
        #: The highest count the peer is known to have applied (an answered ``PHT-Ack``).
        self.acknowledged = received

    def accept(
        self, offset: int, data: bytes | bytearray | memoryview
    ) -> bytes | bytearray | memoryview:
        """The part of ``data`` (starting at stream offset ``offset``) to deliver.

        Counts it as received. An empty result means a pure retry (or an
        ack-only push). Slicing a ``memoryview`` of ``data``: nothing is
        copied.
        """
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if offset < 0 or offset + size > MAX_OFFSET:
            raise ResumeHeaderError(f"offset {offset} with {size} bytes is out of range")
        if offset > self.received:
            raise OffsetGap(self.received, offset)
        skip = self.received - offset
        if skip >= size:
            return b""
        self.received = offset + size
        if skip == 0:
            return data
        return memoryview(data).cast("B")[skip:]

    def check_start(self, offset: int) -> int:
        """How many leading bytes of a message at ``offset`` to drop (a replay's overlap).

        For a pull answer's ``PHT-Offset`` before any data arrives; raises
        :class:`OffsetGap` if the message would start beyond ``received``.
        """
        if offset > self.received:
            raise OffsetGap(self.received, offset)
        return self.received - offset

    def ack_due(self, window: int) -> bool:
        """Whether the unacknowledged bytes reached half the window (send an ack-only push).

        The client keeps at most one ack-only push in flight; one that fails
        is sent again (with the count of then), since the server may be
        waiting for it with a full buffer.
        """
        return self.received - self.acknowledged >= window // 2

    def ack_confirmed(self, value: int) -> None:
        """A request carrying ``PHT-Ack: value`` was answered.

        A server applies a request's ``PHT-Ack`` when the request arrives,
        so any answer to it (even a ``409``) proves the server has it; a
        request whose answer was lost proves nothing.
        """
        if value > self.received:
            raise LocalProtocolError(f"cannot acknowledge {value} bytes, {self.received} received")
        self.acknowledged = max(self.acknowledged, value)


# --- one session's resume state, each end ----------------------------------------


class ResumeConflict(RemoteProtocolError):
    """An opening pull (no ``PHT-Ack``) for a session that already acknowledged
    bytes: it cannot be the retry of the opening pull. ``409``, the session goes on."""

    def __init__(self, acknowledged: int) -> None:
        super().__init__(
            f"an opening pull (no PHT-Ack) for a session whose client acknowledged "
            f"{acknowledged} bytes: re-attach with PHT-Ack",
            status_hint=409,
        )


class ServerResume:
    """The resume state of one session on the server: its rules, no I/O.

    The server session machine creates one when it grants an offer
    (:meth:`negotiate`) and then feeds it every request of the session and
    every write of its handler:

    - any request's ``PHT-Ack``, when the request arrives: :meth:`apply_ack`;
    - a push, at its turn: :meth:`push` says what to hand to the handler
      (:class:`OffsetGap`: answer ``409`` with :meth:`received_headers`);
    - the close notification: :meth:`close`;
    - a pull: :meth:`attach` gives the ``200``'s resume headers, then
      :meth:`next_line` the data of each line to write;
    - the handler: :meth:`write` (what it refuses is back-pressure) and
      :meth:`finish`; :attr:`done` once the client has acknowledged the end.
    """

    __slots__ = ("_cursor", "downstream", "end", "terms", "upstream")

    def __init__(self, terms: ResumeTerms) -> None:
        self.terms = terms
        #: The client's bytes delivered to the handler (``PHT-Received``).
        self.upstream = InboundTracker()
        #: The handler's bytes not yet acknowledged by the client.
        self.downstream = ReplayBuffer(terms.window)
        #: The downstream's final length once the handler finished (``PHT-End``).
        self.end: int | None = None
        self._cursor = 0  # downstream offset of the current pull's next byte

    @classmethod
    def negotiate(cls, settings: ResumeSettings, fields: RequestFields) -> ServerResume | None:
        """The state of a new session opened by a pull with ``fields``.

        ``None`` when the pull offers no (known version of the) extension:
        serve the session as today, with no ``PHT-*`` header.
        """
        if fields.offer is None or fields.continues:
            return None
        return cls(settings.grant(fields.offer))

    def apply_ack(self, ack: int) -> None:
        """Free what the client acknowledged (on arrival of any of its requests).

        Raises :class:`AckOutOfRange` for bytes never sent: ``400``, end the session.
        """
        self.downstream.ack(ack)

    def push(self, offset: int, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """At a push's turn: the part of its data to hand to the handler.

        Call it once per piece as the push's data arrives (``offset`` then
        being the piece's own). Raises :class:`OffsetGap` (``409``).
        """
        part = self.upstream.accept(offset, data)
        return part if isinstance(part, (bytes, memoryview)) else bytes(part)

    def close(self, offset: int) -> None:
        """The close notification says the client pushed ``offset`` bytes in all.

        Returns when every byte arrived (end the session, answer ``200``);
        raises :class:`OffsetGap` if some are missing (``409``), or
        :class:`ResumeHeaderError` if the client claims fewer bytes than were
        received (a broken client: ``400``).
        """
        received = self.upstream.received
        if offset > received:
            raise OffsetGap(received, offset)
        if offset < received:
            raise ResumeHeaderError(
                f"the close notification says {offset} bytes were pushed, {received} arrived"
            )

    def received_headers(self) -> list[tuple[bytes, bytes]]:
        """The ``PHT-Received`` header of a push answer (``200`` or ``409``)."""
        return ResponseFields.push_headers(self.upstream.received)

    def attach(self, ack: int | None) -> list[tuple[bytes, bytes]]:
        """A pull (re)attaches with ``PHT-Ack: ack`` (``None``: the opening pull).

        Returns the resume headers of its ``200``; the pull then carries the
        bytes from ``PHT-Offset`` on. Raises :class:`AckOutOfRange` (``400``,
        end the session) or :class:`ResumeConflict` (``409``).
        """
        if ack is None:
            if self.downstream.start > 0:
                raise ResumeConflict(self.downstream.start)
            ack = 0
        self.downstream.ack(ack)
        self._cursor = max(ack, self.downstream.start)
        return ResponseFields.pull_headers(self.terms, self._cursor, self.end)

    def next_line(self, max_size: int) -> bytes:
        """The data of the current pull's next line (``b""``: nothing to send yet)."""
        if self._cursor >= self.downstream.end:
            return b""
        data = self.downstream.read(self._cursor, max_size)
        self._cursor += len(data)
        return data

    @property
    def pending(self) -> int:
        """Bytes the current pull has not carried yet."""
        return self.downstream.end - self._cursor

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """The handler sends ``data``: how much the replay buffer took (the rest must wait)."""
        if self.end is not None:
            raise LocalProtocolError("the handler wrote after it finished")
        return self.downstream.append(data)

    def finish(self) -> None:
        """The handler finished sending: pulls from now on carry ``PHT-End``."""
        if self.end is None:
            self.end = self.downstream.end

    @property
    def done(self) -> bool:
        """Whether the handler finished and the client acknowledged every byte:
        forget the session (a later request gets ``410``, ``PHT-Gone: closed``)."""
        return self.end is not None and self.downstream.start == self.end


class ClientResume:
    """The resume state of one session on the client: its rules, no I/O.

    The client session machine creates one from the opening pull's answer
    (:meth:`negotiated`; ``None`` means fall back silently) and then:

    - the application's writes go to :meth:`write` (what it refuses waits);
    - each push is :meth:`next_push` (offset and data) sent with
      :meth:`push_headers`; its answer goes to :meth:`push_answered`, its
      loss to :meth:`push_failed` (everything is then pushed again from
      what the server has);
    - each re-attaching pull is sent with :meth:`pull_headers`, its ``200``
      goes to :meth:`pull_started`, each complete line's data to
      :meth:`pull_data`; :attr:`eof` says when the stream has ended;
    - :meth:`ack_due` says when to send an ack-only push.
    """

    __slots__ = ("_next", "_pull_offset", "downstream", "end", "terms", "upstream")

    def __init__(self, terms: ResumeTerms, *, buffer_limit: int) -> None:
        self.terms = terms
        #: The application's bytes not yet in a ``PHT-Received``.
        self.upstream = ReplayBuffer(buffer_limit)
        #: The server's bytes received from complete lines (``PHT-Ack``).
        self.downstream = InboundTracker()
        #: The downstream's final length, once a pull said (``PHT-End``).
        self.end: int | None = None
        self._next = 0  # upstream offset of the next push's data
        self._pull_offset = 0  # downstream offset of the current pull's next line

    @staticmethod
    def offer(window: int | None = None) -> list[tuple[bytes, bytes]]:
        """The opening pull's resume header (``PHT-Resume: 1``)."""
        return RequestFields.pull_headers(ResumeOffer(window=window), None)

    @classmethod
    def negotiated(cls, fields: ResponseFields, *, buffer_limit: int) -> ClientResume | None:
        """The state for a session whose opening pull was answered ``200`` with ``fields``.

        ``None``: the server does not support the extension, fall back.
        """
        if fields.terms is None:
            return None
        if fields.offset != 0:
            raise ResumeHeaderError(
                f"the opening pull's answer must carry PHT-Offset: 0, got {fields.offset}"
            )
        resume = cls(fields.terms, buffer_limit=buffer_limit)
        resume.end = fields.end
        return resume

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """The application writes ``data``: how much was taken (the rest must wait)."""
        return self.upstream.append(data)

    def next_push(self, max_size: int) -> tuple[int, bytes]:
        """The offset and data of the next push (data ``b""``: nothing left to push)."""
        offset = max(self._next, self.upstream.start)  # a late answer may have acked more
        data = self.upstream.read(offset, max_size)
        self._next = offset + len(data)
        return offset, data

    def push_headers(self, offset: int) -> list[tuple[bytes, bytes]]:
        """The resume headers of a push (data, ack-only or close) starting at ``offset``."""
        return RequestFields.push_headers(offset, self.downstream.received)

    def ack_only(self) -> list[tuple[bytes, bytes]]:
        """The resume headers of an ack-only push (its body is ``b"\\n"``)."""
        return self.push_headers(max(self._next, self.upstream.start))

    def close_headers(self) -> list[tuple[bytes, bytes]]:
        """The resume headers of the close notification (an empty body).

        Send it once every push was answered: its offset is all that was written.
        """
        return self.push_headers(self.upstream.end)

    @property
    def unpushed(self) -> int:
        """Bytes written and not pushed yet (since the last rewind)."""
        return self.upstream.end - max(self._next, self.upstream.start)

    def push_answered(self, ack: int, status: int, fields: ResponseFields) -> None:
        """A push that carried ``PHT-Ack: ack`` was answered ``status`` with ``fields``.

        ``200`` and ``409`` free what the server has (a ``409`` also rewinds);
        ``410`` raises :class:`SessionGone`; a missing or impossible
        ``PHT-Received`` raises :class:`ResumeHeaderError` /
        :class:`AckOutOfRange` (fail the session).
        """
        if status == 410 and fields.gone is not None:
            raise SessionGone(fields.gone)
        if status not in (200, 409):
            raise LocalProtocolError(f"push_answered() takes 200, 409 or 410, got {status}")
        if fields.received is None:
            raise ResumeHeaderError(
                "a push answer of a resume session lacks PHT-Received: a server "
                "without the extension, or a hop that strips headers, answered"
            )
        self.downstream.ack_confirmed(ack)
        self.upstream.ack(fields.received)
        if status == 409:
            self.push_failed()

    def push_failed(self) -> None:
        """A push got no answer (or a ``409``): push again from what the server has.

        Call it once none of the session's pushes is in flight.
        """
        self._next = self.upstream.start

    def pull_headers(self) -> list[tuple[bytes, bytes]]:
        """The resume headers of a re-attaching pull."""
        return RequestFields.pull_headers(ResumeOffer(), self.downstream.received)

    def pull_started(self, ack: int, fields: ResponseFields) -> None:
        """A pull that carried ``PHT-Ack: ack`` was answered ``200`` with ``fields``."""
        if fields.terms is None or fields.offset is None:
            raise ResumeHeaderError(
                "a pull answer of a resume session lacks PHT-Resume or PHT-Offset: a "
                "server without the extension, or a hop that strips headers, answered"
            )
        if fields.terms != self.terms:
            raise ResumeHeaderError("the server changed the session's resume terms")
        self.downstream.check_start(fields.offset)
        self.downstream.ack_confirmed(ack)
        self._pull_offset = fields.offset
        if fields.end is not None:
            if fields.end < self.downstream.received:
                raise ResumeHeaderError(
                    f"PHT-End {fields.end} is before the {self.downstream.received} bytes received"
                )
            self.end = fields.end

    def pull_data(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """A complete line's data: the part to deliver (a replay's overlap is dropped)."""
        offset = self._pull_offset
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if self.end is not None and offset + size > self.end:
            raise ResumeHeaderError(f"the server sent bytes beyond its PHT-End {self.end}")
        part = self.downstream.accept(offset, data)
        self._pull_offset = offset + size
        return part if isinstance(part, (bytes, memoryview)) else bytes(part)

    @property
    def eof(self) -> bool:
        """Whether the stream has ended: every byte up to ``PHT-End`` arrived."""
        return self.end is not None and self.downstream.received == self.end

    def ack_due(self) -> bool:
        """Whether to send an ack-only push now (if none is in flight)."""
        return self.downstream.ack_due(self.terms.window)

    @staticmethod
    def gone(fields: ResponseFields) -> None:
        """A request got ``410``: return if the session ended cleanly, else raise.

        ``PHT-Gone: closed`` returns (for a pull: EOF; for the close
        notification: closed; for a push: writes fail); any other reason
        raises :class:`SessionGone`, and a ``410`` without ``PHT-Gone`` (not
        an answer of the extension) :class:`ResumeHeaderError`.
        """
        if fields.gone is None:
            raise ResumeHeaderError("a 410 answer of a resume session lacks PHT-Gone")
        if fields.gone is not GoneReason.CLOSED:
            raise SessionGone(fields.gone)


# --- the grace period ----------------------------------------------------------


class GraceTable:
    """Server side: the sessions that lost their pull, and when their grace runs out.

    Since every session gets the same grace period, a deadline set later is
    never earlier, so the table stays in deadline order: :meth:`expired` and
    :meth:`next_deadline` look only at its front.
    """

    __slots__ = ("_deadlines", "grace", "max_sessions")

    def __init__(
        self, grace: float = DEFAULT_GRACE, max_sessions: int = DEFAULT_MAX_GRACE_SESSIONS
    ) -> None:
        if not grace > 0:
            raise LocalProtocolError(f"grace must be positive, got {grace!r}")
        if max_sessions < 1:
            raise LocalProtocolError(f"max_sessions must be at least 1, got {max_sessions}")
        self.grace = grace
        self.max_sessions = max_sessions
        self._deadlines: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, token: object) -> bool:
        return token in self._deadlines

    def detach(self, token: str, now: float) -> bool:
        """``token``'s pull was lost at ``now``: start (or restart) its grace period.

        Returns ``False`` when the table is full: end that session now, with
        no grace (the sessions already waiting keep theirs).
        """
        deadlines = self._deadlines
        if token in deadlines:
            del deadlines[token]  # re-inserted last: the order stays the deadlines'
        elif len(deadlines) >= self.max_sessions:
            return False
        deadlines[token] = now + self.grace
        return True

    def touch(self, token: str, now: float) -> None:
        """A push for ``token`` arrived while it waits: the client is alive, restart."""
        if token in self._deadlines:
            self.detach(token, now)

    def attach(self, token: str) -> bool:
        """A pull re-attached ``token``: it leaves the table. Whether it was in it."""
        return self._deadlines.pop(token, None) is not None

    def deadline(self, token: str) -> float | None:
        """When ``token``'s grace runs out, if it is waiting."""
        return self._deadlines.get(token)

    def next_deadline(self) -> float | None:
        """The earliest deadline (when the adapter should call :meth:`expired`)."""
        return next(iter(self._deadlines.values()), None)

    def expired(self, now: float) -> list[str]:
        """Remove and return the tokens whose grace ran out by ``now``: end them."""
        gone: list[str] = []
        deadlines = self._deadlines
        for token, deadline in deadlines.items():
            if deadline > now:
                break
            gone.append(token)
        for token in gone:
            del deadlines[token]
        return gone


class Tombstones:
    """Server side: why recently ended resume sessions ended, for ``410`` answers.

    A request carrying ``PHT-Ack`` for a token with no live session is
    answered ``410`` with :meth:`reason`: what :meth:`bury` recorded, or
    ``unknown`` once forgotten. Entries last ``keep`` seconds (at least the
    grace period, so that a client coming back late learns ``expired``) and
    at most ``max_entries`` are kept (the oldest go first), so memory stays
    bounded whatever the churn.
    """

    __slots__ = ("_entries", "keep", "max_entries")

    def __init__(self, keep: float = DEFAULT_GRACE, max_entries: int = 65536) -> None:
        if not keep > 0:
            raise LocalProtocolError(f"keep must be positive, got {keep!r}")
        if max_entries < 1:
            raise LocalProtocolError(f"max_entries must be at least 1, got {max_entries}")
        self.keep = keep
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, GoneReason]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def bury(self, token: str, reason: GoneReason, now: float) -> None:
        """Session ``token`` ended at ``now`` for ``reason``."""
        entries = self._entries
        entries.pop(token, None)  # re-inserted last: the order stays the deadlines'
        entries[token] = (now + self.keep, reason)
        while len(entries) > self.max_entries:
            del entries[next(iter(entries))]

    def reason(self, token: str, now: float) -> GoneReason:
        """Why ``token`` has no session (``unknown`` if never seen or forgotten)."""
        self.forget(now)
        entry = self._entries.get(token)
        return GoneReason.UNKNOWN if entry is None else entry[1]

    def forget(self, now: float) -> None:
        """Drop the entries older than ``keep`` (cheap: only the expired are visited)."""
        entries = self._entries
        while entries:
            token, (deadline, _) = next(iter(entries.items()))
            if deadline > now:
                return
            del entries[token]


class Backoff:
    """A bounded, jittered exponential back-off schedule.

    The *n*-th delay in a row is drawn uniformly from ``[d/2, d]`` with
    ``d = min(initial * multiplier**n, maximum)``: never zero (no hammering),
    never above ``maximum``, and spread so that many clients cut at once do
    not come back at once. ``random`` returns a float in ``[0, 1)`` (e.g.
    ``random.Random(seed).random``).
    """

    __slots__ = ("_attempt", "initial", "maximum", "multiplier", "random")

    def __init__(
        self,
        random: Callable[[], float],
        *,
        initial: float = 0.1,
        maximum: float = 5.0,
        multiplier: float = 2.0,
    ) -> None:
        if not 0 < initial <= maximum:
            raise LocalProtocolError(
                f"back-off needs 0 < initial <= maximum, got {initial!r} and {maximum!r}"
            )
        if not multiplier >= 1:
            raise LocalProtocolError(f"back-off multiplier must be >= 1, got {multiplier!r}")
        self.random = random
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt (and count that attempt)."""
        ceiling = self.maximum
        if self._attempt < 64:  # beyond, the product is past any maximum anyway
            ceiling = min(self.initial * self.multiplier**self._attempt, self.maximum)
        self._attempt += 1
        draw = self.random()
        if not 0 <= draw < 1:
            raise LocalProtocolError(f"the random source must return [0, 1), got {draw!r}")
        return ceiling / 2 + draw * ceiling / 2

    def reset(self) -> None:
        """An attempt succeeded: the next failure starts the schedule over."""
        self._attempt = 0


class Reconnect:
    """Client side: retry a resume session's failed requests until its grace runs out.

    :meth:`failed` when a request of the session fails for a reason that
    may pass; it returns the delay before the next attempt, or ``None``
    once ``grace`` seconds have passed since the first failure in a row
    (then raise :meth:`gave_up`). :meth:`succeeded` after any successful
    request.
    """

    __slots__ = ("backoff", "grace", "since")

    def __init__(self, grace: float, backoff: Backoff) -> None:
        if not grace > 0:
            raise LocalProtocolError(f"grace must be positive, got {grace!r}")
        self.grace = grace
        self.backoff = backoff
        #: When the current run of failures began (``None``: none).
        self.since: float | None = None

    def failed(self, now: float) -> float | None:
        """A request failed at ``now``: seconds to wait before retrying, or ``None``."""
        if self.since is None:
            self.since = now
        remaining = self.since + self.grace - now
        if remaining <= 0:
            return None
        return min(self.backoff.next_delay(), remaining)

    def succeeded(self) -> None:
        """A request of the session succeeded: the connection is back."""
        self.since = None
        self.backoff.reset()

    def gave_up(self, cause: str) -> TunnelError:
        """The error to raise when :meth:`failed` returned ``None``."""
        return TunnelError(
            f"resume failed: the server could not be reached within the session's "
            f"{self.grace:g} s grace period (last failure: {cause})"
        )


# --- bounded pulls --------------------------------------------------------------


class PullMeter:
    """When a bounded pull response should end (server side).

    After ``max_bytes`` bytes of lines, or ``max_seconds`` after it began,
    a response ends after the line being written. ``None`` turns a bound
    off. :meth:`must_end` is asked after each line; :meth:`deadline` says
    when to wake an idle response, which then sends a heartbeat if it had
    no line (so that clients poll again) and ends.
    """

    __slots__ = ("_began", "_sent", "lines", "max_bytes", "max_seconds")

    def __init__(self, *, max_bytes: int | None = None, max_seconds: float | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise LocalProtocolError(f"pull_max_bytes must be at least 1, got {max_bytes}")
        if max_seconds is not None and not max_seconds >= 0.001:
            raise LocalProtocolError(f"pull_max_ms must be at least 1 ms, got {max_seconds!r} s")
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self._began = 0.0
        self._sent = 0
        #: Lines (data or heartbeat) the current response carried.
        self.lines = 0

    @property
    def bounded(self) -> bool:
        """Whether any bound is on."""
        return self.max_bytes is not None or self.max_seconds is not None

    def began(self, now: float) -> None:
        """A pull response began at ``now``."""
        self._began = now
        self._sent = 0
        self.lines = 0

    def line_sent(self, size: int) -> None:
        """A whole line of ``size`` bytes (with its newline) was written."""
        self._sent += size
        self.lines += 1

    def deadline(self) -> float | None:
        """When the time bound runs out (``None``: no time bound)."""
        return None if self.max_seconds is None else self._began + self.max_seconds

    def must_end(self, now: float) -> bool:
        """Whether to end the response now (after the line just written)."""
        if self.max_bytes is not None and self._sent >= self.max_bytes:
            return True
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    @property
    def needs_heartbeat(self) -> bool:
        """Whether the response must carry a heartbeat before it ends (it had no line)."""
        return self.lines == 0
